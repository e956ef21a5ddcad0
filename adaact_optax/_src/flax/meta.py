"""Flax partitioning metadata on AdaAct's second moment.

Imported only once Flax is loaded (``adaact_optax._src.boxes`` checks
``sys.modules`` first), so the transform and the math stay free of Flax.

``tx.init`` of boxed parameters (Linen ``nn.Partitioned`` /
``nn.LogicallyPartitioned`` from ``nn.with_partitioning`` /
``nn.with_logical_partitioning``, possibly stacked by ``nn.scan`` with a
``PARTITION_NAME``; NNX Variables with ``out_sharding`` metadata from
``nnx.with_partitioning``, in the ``nnx.State`` that ``nnx.Optimizer``
initialises from) maps its zeros inside the boxes, so every state leaf keeps
its parameter's box. That is right for parameter-shaped leaves (``mu``) and
wrong for ``nu``, whose shape differs: ``rebox_moments`` gives each ``nu``
box the names of the axes ``nu`` keeps (``alignment.state_axes``), so
``nn.get_partition_spec`` / ``nnx.get_partition_spec`` of the state are
valid without unboxing anything.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from flax.core import meta

from adaact_optax._src import alignment

PyTree = Any


def is_box(x) -> bool:
  """A Linen metadata box (``nn.Partitioned``...) or an NNX Variable."""
  return isinstance(x, (meta.AxisMetadata, nnx.Variable))


def _value(box):
  if isinstance(box, nnx.Variable):
    return box.get_raw_value()
  if isinstance(box, meta.Partitioned):
    return box.value  # no sharding constraint: shapes only
  return box.unbox()


def rebox_moment(param_box, moment_box):
  """``moment_box`` (the param's box holding a moment) with the names of the axes it keeps.

  Args:
    param_box: the parameter's box (``meta.AxisMetadata`` or ``nnx.Variable``).
    moment_box: the same kind of box around the moment (what mapping over
      the parameter's leaves builds), e.g. ``nu`` of shape ``K[:-1] + (1,)``.

  Returns:
    ``moment_box`` with per-axis names ``alignment.state_axes(names, moment
    shape, K)``; boxes without per-axis names are returned as they are.
  """
  param, moment = _value(param_box), _value(moment_box)
  if not (hasattr(param, "shape") and hasattr(moment, "shape")):
    return moment_box  # e.g. optax.MaskedNode in a box: a branch that owns no array here
  k, shape = tuple(param.shape), tuple(moment.shape)
  if isinstance(moment_box, meta.Partitioned):
    return moment_box.replace(names=alignment.state_axes(moment_box.names, shape, k))
  if isinstance(moment_box, nnx.Variable) and moment_box.get_metadata("out_sharding", None):
    names = alignment.state_axes(moment_box.get_metadata("out_sharding"), shape, k)
    return moment_box.replace(out_sharding=names)
  return moment_box


def rebox_moments(params: PyTree, moments: PyTree) -> PyTree:
  """``rebox_moment`` at every boxed parameter of ``params``.

  Args:
    params: the tree ``tx.init`` received (boxes or plain arrays).
    moments: a tree made by mapping over ``params``' leaves (so boxed where
      ``params`` is), with leaves of any shape.
  """
  def rebox(p, m):
    return rebox_moment(p, m) if is_box(p) else m
  return jax.tree.map(rebox, params, moments, is_leaf=is_box)


def unbox(tree: PyTree) -> PyTree:
  """``tree`` with every box replaced by its value (no sharding constraint)."""
  return jax.tree.map(lambda x: _value(x) if is_box(x) else x, tree, is_leaf=is_box)
