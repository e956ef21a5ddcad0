"""notebooks/quickstart.ipynb is committed without outputs.

The documentation build executes it (``nb_execution_mode = "force"`` in docs/conf.py, a failing
cell fails the build) and tests/end_to_end/test_docs.py checks that its page shows the test accuracy and the
figure, so the outputs a reader sees are always those of the current code.
"""

import nbformat

from conftest import ROOT

NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def test_notebook_is_committed_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None for c in code)
