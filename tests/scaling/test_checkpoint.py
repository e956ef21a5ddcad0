"""Orbax checkpoints: a resume in a fresh process continues bit for bit.

tests/scaling/checkpoint_job.py trains a tiny model on digits, saving mid-training
(``run``), then a second process restores and continues (``resume``). Both
are subprocesses, so nothing but the checkpoint carries over.
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from conftest import xla_flags

pytestmark = pytest.mark.slow  # end to end: deselect with -m 'not slow'

ROOT = pathlib.Path(__file__).resolve().parents[2]
JOB = ROOT / "tests" / "scaling" / "checkpoint_job.py"
SAVE_AT = 4  # checkpoint_job.SAVE_AT


# Relative distance of the final params from the uninterrupted run's, measured
# (linen, nnx): a fresh optimizer 0.062, 0.047; no nu (V = 0, so the first
# resumed step divides by ~eps) 5176, 4541. The bounds are about half the
# smaller; a bit-identical resume gives 0.
MIN_RELATIVE_CHANGE = {"dropped": 0.02, "no_nu": 2000.0}


def _relative_distance(a, b, keys) -> float:
  """||a - b|| / ||b|| over the arrays ``keys`` of two npz files, as one vector."""
  diff = sum(float(np.sum((a[k].astype(np.float64) - b[k]) ** 2)) for k in keys)
  norm = sum(float(np.sum(b[k].astype(np.float64) ** 2)) for k in keys)
  return (diff / norm) ** 0.5


def _job(framework, mode, directory):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=xla_flags(1),
             PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"),
                                         os.environ.get("PYTHONPATH", "")]))
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
  # (as the authors' optimizer does), ends elsewhere: by the relative distance
  # of the final params, at least MIN_RELATIVE_CHANGE (measured above).
  for name, other in (("dropped", dropped), ("no_nu", no_nu)):
    change = _relative_distance(other, run, finals)
    assert change > MIN_RELATIVE_CHANGE[name], (name, change)
