"""The README's core usage example runs as written.

The guide sections have their own tests, which run their snippets in context:
NNX, Embeddings and Diagnostics in tests/test_nnx.py, the Optax and Flax idioms in
tests/test_optax_composition.py.
"""

import pytest

from conftest import readme_snippets

BLOCKS = readme_snippets("Usage with Flax Linen and `TrainState`")


def test_readme_has_examples():
  assert BLOCKS


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index):
  exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {"__name__": "readme"})
