import os
import pathlib

# Multi-device tests run on 8 simulated CPU devices; XLA reads this flag once,
# before jax is first imported, so it is set here for the whole session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The authors' trajectories live in ../shared/fixtures beside the checkout; a
# copy is vendored in tests/fixtures so a bare clone can run the suite too.
_CANDIDATES = [
    pathlib.Path(os.environ["ADAACT_FIXTURES"]) if "ADAACT_FIXTURES" in os.environ else None,
    ROOT.parent / "shared" / "fixtures",
    ROOT / "tests" / "fixtures",
]


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
  for c in _CANDIDATES:
    if c is not None and (c / "adaact_parity_mlp.npz").exists():
      return c
  raise FileNotFoundError(f"AdaAct parity fixtures not found in {_CANDIDATES}")
