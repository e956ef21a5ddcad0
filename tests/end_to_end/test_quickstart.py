"""The README's main job: the quickstart reaches 97% test accuracy on digits."""

import re
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # end to end: deselect with -m 'not slow'


def test_quickstart_reaches_97_percent():
  result = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  epochs = re.findall(r"epoch +(\d+) +train loss ([\d.]+) +test accuracy ([\d.]+)%", result.stdout)
  assert len(epochs) == 20
  assert float(epochs[-1][1]) < float(epochs[0][1])
  final = float(re.search(r"final test accuracy ([\d.]+)%", result.stdout).group(1))
  assert final >= 97.0, result.stdout
