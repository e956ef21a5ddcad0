"""The documentation runs as written and builds without warnings.

- Every ```python block of README.md and of each docs/*.md page runs, in order, in one
  namespace per file. Blocks are found by their fence info: exactly ```python is
  executed; other fences (```bash, ```text, ...) are shown, not run.
- The package's docstring examples (doctests) pass.
- ``sphinx-build -W --keep-going -b html docs <tmp>`` succeeds (warnings are errors), offline,
  and the site it builds reads offline: no page loads a script, stylesheet or font from the
  network, math is rendered by the MathJax copied into the site, the notebook page shows its
  executed outputs, the API page names public types and the constants' own docs.
- README links work outside the repository (no relative links).
"""

import doctest
import html
import html.parser
import importlib
import inspect
import pathlib
import pkgutil
import re
import subprocess
import sys
import tempfile

import pytest

import adaact_optax
from conftest import ROOT

_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(path) -> list[str]:
  """The ```python blocks of a Markdown file, in order."""
  return _FENCE.findall(path.read_text())


def test_fence_finder_runs_only_python_fences():
  text = "```python\na = 1\n```\n```bash\nexit 1\n```\n```text\nx\n```\n```python\nb = a\n```\n"
  assert _FENCE.findall(text) == ["a = 1\n", "b = a\n"]


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_code_blocks_run(path, tmp_path, monkeypatch):
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # checkpoints etc. go to tmp_path
  monkeypatch.chdir(tmp_path)
  namespace = {"__name__": f"docs_{path.stem}"}
  for i, block in enumerate(python_blocks(path)):
    code = compile(block, f"{path.relative_to(ROOT)} python block {i}", "exec")
    exec(code, namespace)


# The example and tool programs the documents name: `python -m examples.lm.train`,
# `python examples/quickstart.py`, `tools/compare.py`, `examples.images.models.get_model`.
_EXAMPLE_MODULE = re.compile(r"python -m ((?:examples|tools)(?:\.\w+)+)")
_EXAMPLE_FILE = re.compile(r"(?<![\w/.-])((?:examples|tools)/[\w/]+\.py)\b")
_EXAMPLE_NAME = re.compile(r"(?<![\w/.-])((?:examples|tools)(?:\.\w+)+)")


def _names_a_module(dotted: str) -> bool:
  """``examples.lm.models.ByteGPT``: its packages are folders, then a module file (the
  rest names something inside it) or a package."""
  path = ROOT
  for part in dotted.split("."):
    if (path / f"{part}.py").is_file():
      return True
    if not (path / part / "__init__.py").is_file():
      return False
    path = path / part
  return True
EXAMPLE_DOCS = [*DOC_FILES, ROOT / "benchmarks" / "README.md", ROOT / "notebooks" / "quickstart.ipynb"]


@pytest.mark.parametrize("path", EXAMPLE_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_example_commands_name_existing_programs(path):
  # The examples moved into one folder per task: no document may send a reader to a
  # module or file that is gone.
  text = path.read_text()
  modules = set(_EXAMPLE_MODULE.findall(text))
  missing = [m for m in modules if not (ROOT / (m.replace(".", "/") + ".py")).is_file()]
  missing += [f for f in set(_EXAMPLE_FILE.findall(text)) if not (ROOT / f).is_file()]
  missing += [n for n in set(_EXAMPLE_NAME.findall(text)) if not _names_a_module(n)]
  assert not missing, f"{path.relative_to(ROOT)} names programs that do not exist: {sorted(set(missing))}"


def _modules():
  # Every module, the private implementation (adaact_optax._src) included: a function's
  # doctest runs in the module that defines it, a re-exported class's in its public module.
  names = [adaact_optax.__name__]
  names += [m.name for m in pkgutil.walk_packages(adaact_optax.__path__, "adaact_optax.")]
  return sorted(names)


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0, f"{result.failed} doctest failure(s) in {name} (output above)"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
  """The HTML site, built once as the README says: ``sphinx-build -W --keep-going``, offline."""
  out = tmp_path_factory.mktemp("docs")
  # A fresh process: Sphinx imports the package itself, as a docs build would.
  result = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
       "-d", str(out / "doctrees"), str(ROOT / "docs"), str(out / "html")],
      capture_output=True, text=True, timeout=900, cwd=ROOT)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
  return out / "html"


@pytest.mark.slow  # builds the whole site
def test_sphinx_build_has_no_warnings(site):
  assert (site / "api.html").exists()


class _Assets(html.parser.HTMLParser):
  """The scripts and stylesheets a page loads (``<script src>``, ``<link href>``: a
  stylesheet, a preloaded font or script) and its inline ``<style>`` text."""

  def __init__(self):
    super().__init__()
    self.urls, self.styles, self._in_style = [], [], False

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if tag == "script" and attrs.get("src"):
      self.urls.append(attrs["src"])
    elif tag == "link" and attrs.get("href"):
      self.urls.append(attrs["href"])
    self._in_style = tag == "style"

  def handle_endtag(self, tag):
    self._in_style = False

  def handle_data(self, data):
    if self._in_style:
      self.styles.append(data)


def _path(url: str) -> str:
  """A local URL without its query (``?v=...``, Sphinx's cache busting) or fragment."""
  return re.split(r"[?#]", url)[0]


def _assets(page: pathlib.Path) -> _Assets:
  parser = _Assets()
  parser.feed(page.read_text())
  return parser


_REMOTE = re.compile(r"^\s*(https?:)?//", re.I)
# url(...) and @import in CSS that reach the network: fonts (@font-face) and stylesheets.
_REMOTE_CSS = re.compile(r"(url\(\s*['\"]?|@import\s+['\"])\s*(https?:)?//", re.I)


@pytest.mark.slow  # builds the whole site
def test_site_loads_no_script_stylesheet_or_font_from_the_network(site):
  pages = sorted(site.rglob("*.html"))
  assert len(pages) > 20
  remote = [(p.name, url) for p in pages for url in _assets(p).urls if _REMOTE.match(url)]
  assert not remote, f"pages load from the network: {remote[:10]}"
  inline = [p.name for p in pages if any(_REMOTE_CSS.search(s) for s in _assets(p).styles)]
  assert not inline, f"inline <style> loading from the network: {inline}"
  css = [str(c.relative_to(site)) for c in site.rglob("*.css") if _REMOTE_CSS.search(c.read_text())]
  assert not css, f"stylesheets loading fonts or styles from the network: {css}"
  # Every local script and stylesheet a page names is in the build.
  missing = {(p.name, url) for p in pages for url in _assets(p).urls
             if _path(url).endswith((".js", ".css")) and not (p.parent / _path(url)).exists()}
  assert not missing, f"pages name assets the build lacks: {sorted(missing)[:10]}"


@pytest.mark.slow  # builds the whole site
def test_math_is_rendered_by_the_mathjax_shipped_with_the_site(site):
  page = site / "rule.html"
  text = page.read_text()
  assert r"\hat V_t" in text                     # the rule's formulas are on the page, as TeX
  mathjax = [_path(url) for url in _assets(page).urls if "mathjax" in url.lower()]
  assert mathjax == ["_static/mathjax/tex-chtml.js"], mathjax
  script = site / mathjax[0]
  assert "MathJax" in script.read_text()
  # MathJax's CommonHTML output loads its fonts from beside the script.
  fonts = script.parent / "output" / "chtml" / "fonts" / "woff-v2"
  assert (fonts / "MathJax_Main-Regular.woff").exists() and (fonts / "MathJax_Math-Italic.woff").exists()


@pytest.mark.slow  # builds the whole site
def test_notebook_page_shows_its_outputs(site):
  # The notebook is committed without outputs (tests/end_to_end/test_notebook.py); the build executes it.
  text = (site / "quickstart.html").read_text()
  acc = re.findall(r"test accuracy (\d\.\d+)", text)
  assert len(acc) == 1 and float(acc[0]) > 0.8, acc
  images = re.findall(r'<img [^>]*src="([^"]+\.png)"', text)
  assert len(images) == 1 and (site / images[0]).stat().st_size > 10_000, images  # the 2 panels


@pytest.mark.slow  # builds the whole site
def test_wide_tables_use_the_site_stylesheet(site):
  assert "_static/tables.css" in map(_path, _assets(site / "lm.html").urls)
  css = (site / "_static" / "tables.css").read_text()
  assert "white-space: nowrap" in css and ":has(" in css


@pytest.mark.slow  # builds the whole site
def test_api_page_shows_public_type_names_and_the_constants_own_docs(site):
  text = html.unescape(re.sub(r"<[^>]+>", "", (site / "api.html").read_text()))
  # optax's private modules must not leak into signatures; the capture module's prose
  # may still point contributors at adaact_optax._src.
  for private in ("TypeAliasForwardRef", r"(?<!adaact_)optax\._src", "_alignment",
                  r"jaxlib\._jax"):
    assert not re.search(private, text), private
  assert "mu_dtype (jax.typing.DTypeLike | None)" in text
  assert "optax.GradientTransformation)" in text
  # Constants carry their own docs, not those of their type (str, tuple, float).
  for builtin_doc in ("Create a new string object", "Built-in immutable sequence",
                      "Convert a string or number to a floating point number"):
    assert builtin_doc not in text, builtin_doc
  for name, doc in [("linen.COLLECTION", "The Flax variable collection"),
                    ("layout.UNCAPTURED_SHAPE = (0,)", "The shape, (0,), of the float32"),
                    ("moments.EMBEDDING_FLOOR = 0.01", "The default floor")]:
    assert re.search(re.escape(f"adaact_optax.{name}#") + r"\s+" + re.escape(doc), text), name


def test_docs_build_command_keeps_its_outputs_in_ignored_folders():
  # myst-nb writes the executed notebook to <outdir>/../jupyter_execute: building into
  # docs/_build/html keeps it in docs/_build, which git ignores.
  commands = re.findall(r"sphinx-build (.*)", (ROOT / "README.md").read_text())
  assert commands
  for command in commands:
    outdir = command.split("#")[0].split()[-1]
    assert outdir.startswith("docs/_build/") and outdir.strip("/") != "docs/_build", command
  assert "docs/_build/" in (ROOT / ".gitignore").read_text().splitlines()


_AUTODOC = re.compile(r"^\.\. auto(?:function|class|exception|data|module):: ([\w.]+)", re.M)


def public_names(module) -> set[str]:
  """A module's public API: ``__all__`` if it has one, else the functions, classes and
  UPPERCASE constants it defines whose names do not start with an underscore."""
  if hasattr(module, "__all__"):
    return set(module.__all__)
  return {name for name, obj in vars(module).items()
          if not name.startswith("_")
          and (getattr(obj, "__module__", None) == module.__name__ or name.isupper())}


# Helpers that issue 15's public-surface tidy makes private (or moves to an internal module):
# not documented as API. Remove a name here when it gets its underscore.
TO_BE_PRIVATE: set = set()  # issue 15's helpers are private now (underscored modules/names)


def api_names() -> set[str]:
  """``adaact_optax.__all__`` and the public names of the modules it exports; a module
  member that the package also exports at the top level counts as the top-level name."""
  names = {f"adaact_optax.{name}" for name in adaact_optax.__all__}
  exported = {id(getattr(adaact_optax, name)) for name in adaact_optax.__all__}
  for name in adaact_optax.__all__:
    module = getattr(adaact_optax, name)
    if inspect.ismodule(module):
      names |= {f"{module.__name__}.{member}" for member in public_names(module)
                if id(getattr(module, member)) not in exported}
  return names


def test_api_reference_lists_exactly_the_public_names():
  documented = set(_AUTODOC.findall((ROOT / "docs" / "api.md").read_text()))
  public = api_names()
  assert TO_BE_PRIVATE <= public, f"already private, drop from TO_BE_PRIVATE: {TO_BE_PRIVATE - public}"
  expected = public - TO_BE_PRIVATE
  assert documented == expected, (
      f"missing from docs/api.md: {sorted(expected - documented)}; "
      f"documented but not public: {sorted(documented - expected)}")


def test_readme_is_short_and_free_of_lab_notes():
  text = (ROOT / "README.md").read_text()
  assert len(text.splitlines()) <= 200
  assert "/tmp/" not in text                                   # no temporary paths
  assert not re.search(r"`[0-9a-f]{7,40}`", text)              # no commit hashes
  assert not re.search(r"\b\d+(\.\d+)? ?(ms|s)\b", text.split("## Citation")[0]), \
      "timings go stale: put them in docs/benchmarks.md"


def _documented_objects():
  text = (ROOT / "docs" / "api.md").read_text()
  for name in re.findall(r"^\.\. auto(?:function|class|exception):: ([\w.]+)", text, re.M):
    module_name, _, attr = name.rpartition(".")
    yield name, getattr(importlib.import_module(module_name), attr)


def test_every_documented_function_and_class_has_a_doctested_example():
  # test_docstring_examples runs them; this checks that there is one to run.
  finder = doctest.DocTestFinder(recurse=False)
  missing = [name for name, obj in _documented_objects()
             if not any(t.examples for t in finder.find(obj, name))]
  assert not missing, f"docstrings without a >>> example: {missing}"


_MD_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)[^)]*\)")


def test_readme_has_no_relative_links():
  # README.md is the package's long description (PyPI shows it): relative links break there.
  links = _MD_LINK.findall((ROOT / "README.md").read_text())
  links += re.findall(r'(?:src|href)="([^"]+)"', (ROOT / "README.md").read_text())
  assert links, "the link finder found nothing"
  relative = [url for url in links if not re.match(r"(https?|mailto):", url)]
  assert not relative, f"relative links in README.md: {relative}"
