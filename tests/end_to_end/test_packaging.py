"""Packaging metadata: the license file matches pyproject, and the package is marked typed."""

import re
import subprocess
import sys
import tarfile
import tomllib

import pytest

from conftest import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_license_file_matches_pyproject():
  assert PYPROJECT["project"]["license"] == "Apache-2.0"   # an SPDX expression (PEP 639)
  assert PYPROJECT["project"]["license-files"] == ["LICENSE"]
  text = (ROOT / "LICENSE").read_text()
  assert "Apache License" in text and "Version 2.0, January 2004" in text


def test_py_typed_marker_is_package_data():
  assert (ROOT / "adaact_optax" / "py.typed").is_file()
  assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["adaact_optax"]


def test_docs_tooling_is_the_docs_extra_and_in_the_test_extra():
  # tests/end_to_end/test_docs.py builds the site; the README's test command installs the test extra.
  extras = PYPROJECT["project"]["optional-dependencies"]
  docs = {re.split(r"[<>=\[]", requirement)[0] for requirement in extras["docs"]}
  for package in ("sphinx", "myst-nb", "myst-parser", "sphinx-book-theme",
                  "sphinx-mathjax-offline", "ipykernel"):
    assert package in docs, package
  assert any(re.fullmatch(r"adaact-optax\[.*\bdocs\b.*\]", r) for r in extras["test"]), extras["test"]


def test_chex_is_a_test_dependency_only():
  # Only tests use chex; the package itself must not need it at run time.
  runtime = " ".join(PYPROJECT["project"]["dependencies"])
  assert "chex" not in runtime
  assert "chex" in " ".join(PYPROJECT["project"]["optional-dependencies"]["test"])
  for source in (ROOT / "adaact_optax").glob("*.py"):
    assert "chex" not in source.read_text(), source.name


def test_requires_python_is_what_jax_needs():
  # jax 0.10 supports Python >= 3.11; the classifiers name the versions the suite runs on.
  assert PYPROJECT["project"]["requires-python"] == ">=3.11"
  assert sys.version_info >= (3, 11)
  assert f"Programming Language :: Python :: {sys.version_info.major}.{sys.version_info.minor}" \
      in PYPROJECT["project"]["classifiers"]


def test_sdist_ships_the_library_without_a_partial_test_suite(tmp_path):
  # The tests need fixtures, shared/, the examples and tools/: the sdist ships none of them.
  subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir",
                  str(tmp_path), str(ROOT)], check=True, capture_output=True)
  (sdist,) = tmp_path.glob("*.tar.gz")
  with tarfile.open(sdist) as tar:
    names = [n.split("/", 1)[1] for n in tar.getnames() if "/" in n]
  assert "adaact_optax/__init__.py" in names and "adaact_optax/py.typed" in names
  assert "LICENSE" in names and "README.md" in names
  assert not [n for n in names if n.startswith(("tests/", "docs/", "examples/", "tools/"))], names


def _package_imports():
  """{module: {(imported module, names)}} for every import statement in adaact_optax,
  the ones inside functions (lazy imports) included."""
  import ast
  graph = {}
  for path in sorted((ROOT / "adaact_optax").rglob("*.py")):
    parts = path.relative_to(ROOT).with_suffix("").parts
    module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    package = module if parts[-1] == "__init__" else module.rpartition(".")[0]
    edges = graph.setdefault(module, set())
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        edges |= {(a.name, ()) for a in node.names if a.name.startswith("adaact_optax")}
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                          + ([base] if base else []))
        if base.startswith("adaact_optax"):
          edges.add((base, tuple(a.name for a in node.names)))
  return graph


def test_the_package_has_no_import_cycles():
  graph = _package_imports()
  modules = set(graph)

  def targets(module):
    for base, names in graph[module]:
      # "from pkg import mod" names a module; "from mod import f" names the module itself.
      subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]
      yield from subs or ([base] if base in modules else [])

  state: dict[str, int] = {}  # 1: on the current path, 2: done

  def visit(module, path):
    state[module] = 1
    for target in targets(module):
      if target == "adaact_optax" and module != "adaact_optax":
        raise AssertionError(f"{module} imports the package root (its __init__)")
      if state.get(target) == 1:
        raise AssertionError("import cycle: " + " -> ".join(path + [module, target]))
      if target not in state:
        visit(target, path + [module])
    state[module] = 2

  for module in sorted(modules):
    if module not in state:
      visit(module, [])


def test_no_module_imports_another_modules_private_names():
  graph = _package_imports()
  crossing = sorted(f"{module} <- {base}.{name}" for module, edges in graph.items()
                    for base, names in edges for name in names
                    if name.startswith("_") and not name.startswith("__"))
  assert not crossing, crossing


def test_flax_is_imported_only_by_the_flax_layer():
  import ast
  offenders = []
  for path in sorted((ROOT / "adaact_optax").rglob("*.py")):
    rel = path.relative_to(ROOT).as_posix()
    if rel.startswith("adaact_optax/_src/flax/") or rel in ("adaact_optax/linen.py",
                                                            "adaact_optax/nnx.py"):
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import)
               else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      offenders += [f"{rel}: {n}" for n in names if n == "flax" or n.startswith("flax.")]
  assert not offenders, offenders


@pytest.mark.slow  # type-checks the whole package
def test_mypy_reports_nothing(tmp_path, monkeypatch):
  # py.typed ships, so the package's annotations are a promise: [tool.mypy] in pyproject.
  from mypy import api
  monkeypatch.chdir(ROOT)
  stdout, stderr, status = api.run(["--cache-dir", str(tmp_path / "mypy_cache")])
  assert status == 0, stdout + stderr


def test_the_package_never_reads_the_environment():
  # What the optimizer computes depends on its arguments only: no switch in
  # os.environ (a leftover debugging flag) may change a training run.
  for source in (ROOT / "adaact_optax").rglob("*.py"):
    text = source.read_text()
    for needle in ("environ", "getenv"):
      assert needle not in text, f"{source.relative_to(ROOT)} reads the environment ({needle})"
