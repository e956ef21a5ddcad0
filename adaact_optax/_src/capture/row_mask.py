"""Row-mask tags: which mask axis each activation axis is, and the rows' weights."""

from __future__ import annotations

import math
from typing import Sequence

import jax.numpy as jnp
from jax import lax

from adaact_optax._src.capture import jax_internals as jc


def row_weights(mask, tags, shape, free: Sequence[int]):
  """``mask`` laid over an activation whose axes carry ``tags`` (mask axis or None).

  Applies only when every mask axis is one of the activation's row (free)
  axes; returns ``(weights broadcastable to the activation, total row weight)``
  or ``None``.
  """
  if mask is None or tags is None:
    return None
  pos = {t: ax for ax, t in enumerate(tags) if t is not None}
  if set(pos) != set(range(mask.ndim)) or not all(ax in free for ax in pos.values()):
    return None
  order = sorted(range(mask.ndim), key=lambda t: pos[t])
  w = jnp.transpose(lax.stop_gradient(mask).astype(jnp.float32), order)
  tagged = set(pos.values())
  w = w.reshape([shape[ax] if ax in tagged else 1 for ax in range(len(shape))])
  untagged = math.prod(shape[ax] for ax in free if ax not in tagged)
  return w, jnp.sum(w) * untagged


def check_row_mask(mask_shape: tuple, input_shapes: list):
  """Raises a ValueError unless ``mask_shape`` is the leading shape of an input.

  A mask that matches no input would weigh no rows: every statistic would
  silently ignore it.
  """
  m = len(mask_shape)
  if m and any(tuple(s[:m]) == mask_shape for s in input_shapes):
    return
  shown = list(dict.fromkeys(tuple(s) for s in input_shapes))
  listed = ", ".join(map(str, shown[:8])) + (", ..." if len(shown) > 8 else "")
  why = ("has no axes: it names no rows" if not m else
         "is the leading shape of none of the inputs")
  raise ValueError(
      f"row_mask of shape {mask_shape} {why}; the inputs' shapes are [{listed}]. A row_mask "
      "weighs the rows of the inputs' leading axes: for an input of shape (batch, time, "
      "features) pass a mask of shape (batch,) or (batch, time), e.g. 1.0 for real rows "
      "and 0.0 for padding.")


# ----------------------------------------------------------------------------
# Row tags: with a row mask, which mask axis each activation axis is, followed
# from the inputs' leading axes through the ops that keep rows apart.


def propagate_tags(eqn, tags: dict, rule):
  """Sets the tags of ``eqn``'s outputs in ``tags`` with the primitive's tag ``rule``."""
  ins = [None if jc.is_literal(v) else tags.get(v) for v in eqn.invars]
  if not any(ins):
    return
  out = rule(eqn, ins)
  if out:
    for var, t in zip(eqn.outvars, out):
      if t is not None and any(x is not None for x in t) and not jc.is_dropvar(var):
        tags[var] = t


# Tag rules: ``rule(eqn, ins) -> one tag tuple per output, or None``; ``ins``
# are the inputs' tags (None where untagged), at least one of them set.


def elementwise_tags(eqn, ins):
  """Elementwise and the like: an output shaped like a tagged input keeps its tags."""
  outs = [v.aval.shape for v in eqn.outvars]
  for v, t in zip(eqn.invars, ins):
    if t and all(tuple(o) == tuple(v.aval.shape) for o in outs):
      return [t] * len(outs)
  return None


def forget_tags(eqn, ins):
  """Rows move (reversed, sorted, scattered): forget."""
  return None


def transpose_tags(eqn, ins):
  t0 = ins[0]
  if not t0:
    return elementwise_tags(eqn, ins)
  return [tuple(t0[i] for i in eqn.params["permutation"])]


def broadcast_tags(eqn, ins):
  t0, p = ins[0], eqn.params
  if not t0:
    return elementwise_tags(eqn, ins)
  t = [None] * len(p["shape"])
  for i, j in enumerate(p["broadcast_dimensions"]):
    if eqn.invars[0].aval.shape[i] == p["shape"][j]:
      t[j] = t0[i]
  return [tuple(t)]


def reshape_tags(eqn, ins):
  t0 = ins[0]
  if not t0:
    return elementwise_tags(eqn, ins)
  out_shape = eqn.outvars[0].aval.shape
  shape_in, k = eqn.invars[0].aval.shape, 0
  while k < min(len(shape_in), len(out_shape)) and shape_in[k] == out_shape[k]:
    k += 1
  return [t0[:k] + (None,) * (len(out_shape) - k)]


def squeeze_tags(eqn, ins):
  t0 = ins[0]
  if not t0:
    return elementwise_tags(eqn, ins)
  dims = {d % len(t0) for d in eqn.params["dimensions"]}
  return [tuple(t for i, t in enumerate(t0) if i not in dims)]


def dot_tags(eqn, ins):
  lc, rc, lb, rb = jc.dot_dimensions(eqn)
  lt, rt = (ins[0] or (None,) * eqn.invars[0].aval.ndim,
            ins[1] or (None,) * eqn.invars[1].aval.ndim)
  return [tuple(lt[i] for i in lb)
          + tuple(t for i, t in enumerate(lt) if i not in lc and i not in lb)
          + tuple(t for i, t in enumerate(rt) if i not in rc and i not in rb)]


def conv_tags(eqn, ins):
  t0 = ins[0]
  if not t0:
    return elementwise_tags(eqn, ins)
  dn = eqn.params["dimension_numbers"]
  t = [None] * len(eqn.outvars[0].aval.shape)
  t[dn.out_spec[0]] = t0[dn.lhs_spec[0]]
  return [tuple(t)]


def gather_tags(eqn, ins):
  if not ins[1] or ins[0]:
    return None
  # A lookup: the output's non-offset axes are the indices' batch axes.
  offset = set(eqn.params["dimension_numbers"].offset_dims)
  batch = iter(ins[1][:-1])
  return [tuple(None if i in offset else next(batch, None)
                for i in range(len(eqn.outvars[0].aval.shape)))]


def reduce_tags(eqn, ins):
  """Reductions keep the tags of the axes they keep."""
  t0 = ins[0]
  if not t0:
    return None
  axes = set(eqn.params.get("axes", ()))
  return [tuple(t for i, t in enumerate(t0) if i not in axes)] * len(eqn.outvars)
