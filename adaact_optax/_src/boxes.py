"""Parameter boxes (Flax partitioning metadata) seen from the Flax-free core.

A parameter tree may hold Flax boxes (Linen ``nn.Partitioned`` and
``nn.LogicallyPartitioned``, NNX Variables with ``out_sharding``). Only the
Flax layer (``adaact_optax._src.flax.meta``) knows them; this module calls it
when, and only when, Flax is already imported (a tree cannot hold a Flax box
otherwise), so the core never imports Flax itself.
"""

from __future__ import annotations

import sys
from typing import Any

from adaact_optax._src import alignment

PyTree = Any


def _flax_meta():
  """The Flax layer's metadata module, or None when Flax is not loaded."""
  if "flax" not in sys.modules:
    return None
  from adaact_optax._src.flax import meta
  return meta


def moment_zeros(params: PyTree, stats_shapes: PyTree | None = None) -> PyTree:
  """``alignment.moment_zeros`` whose boxes name the axes the second moment keeps."""
  zeros = alignment.moment_zeros(params, stats_shapes)
  meta = _flax_meta()
  return zeros if meta is None else meta.rebox_moments(params, zeros)


def unbox(tree: PyTree) -> PyTree:
  """``tree`` with every Flax box replaced by its value (no sharding constraint)."""
  meta = _flax_meta()
  return tree if meta is None else meta.unbox(tree)
