"""Orbax checkpoints: a resume in a fresh process continues bit for bit.

tests/checkpoint_job.py trains a tiny model on digits, saving mid-training
(``run``), then a second process restores and continues (``resume``). Both
are subprocesses, so nothing but the checkpoint carries over.
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
JOB = ROOT / "tests" / "checkpoint_job.py"
SAVE_AT = 4  # checkpoint_job.SAVE_AT


def _job(framework, mode, directory):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  done = subprocess.run([sys.executable, str(JOB), framework, mode, str(directory)], env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_resume_in_a_fresh_process_is_bit_identical(tmp_path, framework):
  _job(framework, "run", tmp_path)
  _job(framework, "resume", tmp_path)
  run, resumed = np.load(tmp_path / "run.npz"), np.load(tmp_path / "resume.npz")
  dropped, no_nu = np.load(tmp_path / "dropped.npz"), np.load(tmp_path / "no_nu.npz")
  assert set(run.files) == set(resumed.files)
  finals = [k for k in run.files if k.startswith("final/")]
  assert len(finals) == 4 and any(k.startswith("nu/") for k in run.files)
  for key in run.files:  # restored nu and count == saved; final params == uninterrupted
    assert resumed[key].dtype == run[key].dtype, key
    np.testing.assert_array_equal(resumed[key], run[key], err_msg=key)
  assert int(resumed["count"]) == SAVE_AT
  # Resuming without the optimizer state, or without the activation averages
  # (as the authors' optimizer does), ends elsewhere.
  for other in (dropped, no_nu):
    assert not all(np.allclose(other[k], run[k], rtol=1e-3) for k in finals)
