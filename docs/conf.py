"""Sphinx configuration: MyST Markdown pages, the executed notebook, and an API reference.

Built offline with warnings as errors by tests/test_docs.py:
  sphinx-build -W --keep-going -b html docs docs/_build/html

The site needs no network, neither to build (no intersphinx) nor to read: MathJax, the theme's
scripts, stylesheets and fonts are all files under ``_static``.
"""

import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # document this checkout's package, installed or not
# The notebook's kernel is a child process: it inherits the checkout through PYTHONPATH.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

import adaact_optax  # noqa: E402

project = "adaact-optax"
author = "adaact-optax authors"
copyright = "2026, adaact-optax authors"
release = adaact_optax.__version__

extensions = [
    "myst_nb",  # MyST Markdown pages and notebooks (includes myst_parser)
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax 3 (scripts and fonts) copied into _static/mathjax
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints"]

# MyST: $...$ / $$...$$ math, ::: fences, heading anchors for #links.
myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# The notebook is committed without outputs and executed by every build (its page shows the
# accuracy and the plot). A failing cell fails the build. The executed copy goes to
# <outdir>/../jupyter_execute, so build into docs/_build/html to keep it under docs/_build.
nb_execution_mode = "force"
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_show_tb = True

# Google-style docstrings (Args/Returns/Raises), as optax writes them.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_default_options = {"members": False, "show-inheritance": False}
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
# Keep Optax's and JAX's alias names instead of their expanded unions.
autodoc_type_aliases = {
    name: name for name in (
        "PyTree", "Padding", "optax.ScalarOrSchedule", "optax.Params", "optax.Updates",
        "optax.OptState", "optax.GradientTransformation", "optax.GradientTransformationExtraArgs",
        "jax.Array", "jax.typing.ArrayLike", "jax.typing.DTypeLike", "ArrayLike", "DTypeLike")
}
autodoc_member_order = "bysource"
# Type hints name JAX/Optax/Flax types that this offline build cannot cross-reference.
nitpicky = False

html_theme = "sphinx_book_theme"
html_title = "adaact-optax"
html_theme_options = {
    "show_toc_level": 2,
}
html_static_path = ["_static"]
html_css_files = ["tables.css"]


# Public spellings of types whose class lives in a private module: jax.Array's qualified name
# is jaxlib._jax.Array, which napoleon prints as the type of a NamedTuple field.
_PUBLIC_TYPE_NAMES = {"jax.jaxlib._jax.Array": "jax.Array"}


def _alias_name(self) -> str:
  return self.name


def _public_type_names(app, what, name, obj, options, lines):
  for i, line in enumerate(lines):
    for private, public in _PUBLIC_TYPE_NAMES.items():
      line = line.replace(private, public)
    lines[i] = line


def setup(app):
  # Sphinx 9 shows an alias of autodoc_type_aliases inside a union (``DTypeLike | None``) by
  # the repr of its placeholder, "TypeAliasForwardRef('jax.typing.DTypeLike')": show the name.
  from sphinx.util import inspect as sphinx_inspect
  sphinx_inspect.TypeAliasForwardRef.__repr__ = _alias_name
  app.connect("autodoc-process-docstring", _public_type_names, priority=900)  # after napoleon

