"""notebooks/quickstart.ipynb runs top to bottom and is committed without outputs."""

import json
import os
import pathlib
import sys

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def _kernel_manager(tmp_path) -> KernelManager:
  # A kernel spec for *this* interpreter, so the notebook runs in the same
  # environment as the tests whatever kernels the machine has registered, and
  # with this checkout importable (installed or not).
  spec_dir = tmp_path / "kernels" / "adaact-test"
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "adaact tests", "language": "python",
      "env": {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
  }))
  specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
  return KernelManager(kernel_name="adaact-test", kernel_spec_manager=specs)


def test_notebook_is_committed_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_notebook_runs(tmp_path):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=120,
                          resources={"metadata": {"path": str(NOTEBOOK.parent)}})
  client.execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  acc = float(text.split("test accuracy ")[1].split()[0])
  assert acc > 0.8, text
  assert sum("image/png" in o.get("data", {}) for o in outputs) == 1   # the two-panel figure
