"""Sphinx configuration: MyST Markdown pages, the notebook, and an API reference from docstrings.

Built offline (no intersphinx) with warnings as errors by tests/test_docs.py:
  sphinx-build -W --keep-going -b html docs docs/_build
"""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # document this checkout's package, installed or not

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
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints"]

# MyST: $...$ / $$...$$ math, ::: fences, heading anchors for #links.
myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# The notebook is rendered as committed (without outputs); the test suite executes it.
nb_execution_mode = "off"

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
        "optax.OptState", "jax.typing.ArrayLike", "jax.typing.DTypeLike", "ArrayLike",
        "DTypeLike")
}
autodoc_member_order = "bysource"
# Type hints name JAX/Optax/Flax types that this offline build cannot cross-reference.
nitpicky = False

html_theme = "sphinx_book_theme"
html_title = "adaact-optax"
html_theme_options = {
    "show_toc_level": 2,
}
