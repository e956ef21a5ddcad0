"""Packaging metadata: the license file matches pyproject, and the package is marked typed."""

import re

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


def test_docs_tooling_is_the_docs_extra_and_in_the_test_extra():
  # tests/test_docs.py builds the site; the README's test command installs the test extra.
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
