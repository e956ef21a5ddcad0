"""Real multi-process training: 2 processes x 2 CPU devices, gloo collectives on loopback.

Each test launches ``python -m examples.multihost.train`` as two processes (a free port,
a hard timeout so nothing can hang, both outputs shown on failure) and
compares with the same steps run in this process on one process's devices.
"""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import assert_f32_close, xla_flags
from examples.multihost import train as multihost

pytestmark = pytest.mark.slow  # end to end: deselect with -m 'not slow'

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = 5
TIMEOUT_S = 150
COMMON = ["--steps", str(STEPS), "--depth", "1", "--global-batch", "16"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(tmp: pathlib.Path, *flags: str, n: int = 2):
  """Runs n processes to completion; returns [(returncode, output)] per process."""
  port = free_port()
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             # Each child has 2 devices (conftest gives this process 8), and the
             # runs share compiled programs through a cache in tmp.
             XLA_FLAGS=xla_flags(2),
             JAX_COMPILATION_CACHE_DIR=str(tmp.parent / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  procs, logs = [], []
  for i in range(n):
    log = open(tmp / f"process{i}.log", "w+")
    cmd = [sys.executable, "-m", "examples.multihost.train", "--coordinator",
           f"127.0.0.1:{port}", "--num-processes", str(n), "--process-id", str(i), *flags]
    procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp))
    logs.append(log)
  try:
    for p in procs:
      p.wait(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    pytest.fail(f"multi-process run exceeded {TIMEOUT_S}s:\n" + outputs(logs))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return [(p.returncode, read(log)) for p, log in zip(procs, logs)]


def read(log) -> str:
  log.seek(0)
  return log.read()


def outputs(logs) -> str:
  return "\n".join(f"--- process {i} ---\n{read(log)[-6000:]}" for i, log in enumerate(logs))


def show(results) -> str:
  return "\n".join(f"--- process {i} (exit {rc}) ---\n{out[-6000:]}"
                   for i, (rc, out) in enumerate(results))


def load(path) -> dict:
  with np.load(path) as data:
    return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def reference():
  """The same 5 steps on one process (this one: 8 devices, a 4x2 mesh)."""
  return multihost.train(multihost.parse_args(COMMON))


def assert_close(params: dict, ref: dict):
  # The runs differ in summation order (across processes) in each step's passes and means;
  # the attention key biases (zero gradient in exact arithmetic) hold rounding only.
  assert params.keys() == ref.keys()
  assert_f32_close(params, ref, steps=STEPS, ulps_per_step=64, scale="tree")


def shard_views(saved: dict) -> dict:
  """{(leaf, index): values} of the shards one process held."""
  return {tuple(k[len("shard"):].split("@")): v for k, v in saved.items() if k.startswith("shard")}


def test_two_processes_equal_one_process(tmp_path, reference):
  results = launch(tmp_path, *COMMON, "--metrics", "metrics.jsonl",
                   "--save-params", "params{process}.npz")
  assert all(rc == 0 for rc, _ in results), show(results)
  saved = [load(tmp_path / f"params{i}.npz") for i in range(2)]
  for s in saved:
    assert_close({k[len("full"):]: v for k, v in s.items() if k.startswith("full")}, reference)
  # Both processes hold identical parameters: the gathered copies agree
  # exactly, and so does every shard both processes hold (replicated params).
  full = [{k: v for k, v in s.items() if k.startswith("full")} for s in saved]
  for k in full[0]:
    np.testing.assert_array_equal(full[0][k], full[1][k])
  views = [shard_views(s) for s in saved]
  shared = views[0].keys() & views[1].keys()
  assert shared, "some parameters are replicated over the processes"
  for key in shared:
    np.testing.assert_array_equal(views[0][key], views[1][key])
  # Process 0 alone prints progress and writes metrics.
  assert f"step {STEPS}/{STEPS}" in results[0][1] and "step 1/" not in results[1][1]
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == STEPS


def test_dead_process_fails_the_other_and_restart_resumes(tmp_path, reference):
  flags = [*COMMON, "--checkpoint-dir", "ckpt", "--heartbeat-timeout", "5"]
  results = launch(tmp_path, *flags, "--crash-at-step", "3", "--crash-process", "1")
  (rc0, out0), (rc1, out1) = results
  assert rc1 == 17, show(results)
  assert rc0 != 0, show(results)
  # The coordination service's verdict (usually first), or gloo's if the
  # collective notices the closed connection before the heartbeat times out.
  clear = ("another task died", "stopped sending heartbeats", "Connection closed by peer",
           "Connection reset by peer")
  assert any(c in out0 for c in clear), show(results)
  assert sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit())[-1] == 3

  results = launch(tmp_path, *flags, "--resume", "--save-params", "params{process}.npz")
  assert all(rc == 0 for rc, _ in results), show(results)
  assert "starting at step 3" in results[0][1], show(results)
  for i in range(2):
    saved = load(tmp_path / f"params{i}.npz")
    assert_close({k[len("full"):]: v for k, v in saved.items() if k.startswith("full")}, reference)


def test_batch_the_data_axis_does_not_divide_is_refused():
  # 8 devices here, model axis 2: the data axis has 4 shards; 6 rows cannot split evenly.
  with pytest.raises(ValueError, match="global-batch 6 must be a multiple of the data axis size 4"):
    multihost.train(multihost.parse_args(["--global-batch", "6", "--steps", "1"]))
