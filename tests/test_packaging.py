"""Packaging metadata: the license file matches pyproject, and the package is marked typed."""

try:
  import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest itself depends on tomli there
  import tomli as tomllib

from conftest import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_license_file_matches_pyproject():
  assert PYPROJECT["project"]["license"] == {"text": "Apache-2.0"}
  text = (ROOT / "LICENSE").read_text()
  assert "Apache License" in text and "Version 2.0, January 2004" in text


def test_py_typed_marker_is_package_data():
  assert (ROOT / "adaact_optax" / "py.typed").is_file()
  assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["adaact_optax"]


def test_docs_tooling_is_in_the_test_extra():
  # tests/test_docs.py builds the site; the README's test command installs this extra.
  extra = " ".join(PYPROJECT["project"]["optional-dependencies"]["test"])
  for package in ("sphinx", "myst-nb", "myst-parser", "sphinx-book-theme"):
    assert package in extra, package


def test_chex_is_a_test_dependency_only():
  # Only tests use chex; the package itself must not need it at run time.
  runtime = " ".join(PYPROJECT["project"]["dependencies"])
  assert "chex" not in runtime
  assert "chex" in " ".join(PYPROJECT["project"]["optional-dependencies"]["test"])
  for source in (ROOT / "adaact_optax").glob("*.py"):
    assert "chex" not in source.read_text(), source.name


def test_the_package_never_reads_the_environment():
  # What the optimizer computes depends on its arguments only: no switch in
  # os.environ (a leftover debugging flag) may change a training run.
  for source in (ROOT / "adaact_optax").glob("*.py"):
    text = source.read_text()
    for needle in ("environ", "getenv"):
      assert needle not in text, f"{source.name} reads the environment ({needle})"
