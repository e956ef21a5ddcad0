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

# ----------------------------------------------------------------------------
# Row tags: with a row mask, which mask axis each activation axis is, followed
# from the inputs' leading axes through the ops that keep rows apart.


def propagate_tags(eqn, tags: dict):
  ins = [None if jc.is_literal(v) else tags.get(v) for v in eqn.invars]
  if not any(ins):
    return
  name, p = eqn.primitive.name, eqn.params
  outs = [v.aval.shape for v in eqn.outvars]
  t0 = ins[0]
  out = None
  if name == "transpose" and t0:
    out = [tuple(t0[i] for i in p["permutation"])]
  elif name == "broadcast_in_dim" and t0:
    t = [None] * len(p["shape"])
    for i, j in enumerate(p["broadcast_dimensions"]):
      if eqn.invars[0].aval.shape[i] == p["shape"][j]:
        t[j] = t0[i]
    out = [tuple(t)]
  elif name == "reshape" and t0:
    shape_in, k = eqn.invars[0].aval.shape, 0
    while k < min(len(shape_in), len(outs[0])) and shape_in[k] == outs[0][k]:
      k += 1
    out = [t0[:k] + (None,) * (len(outs[0]) - k)]
  elif name == "squeeze" and t0:
    dims = {d % len(t0) for d in p["dimensions"]}
    out = [tuple(t for i, t in enumerate(t0) if i not in dims)]
  elif name == jc.DOT:
    lc, rc, lb, rb = jc.dot_dimensions(eqn)
    lt, rt = (ins[0] or (None,) * eqn.invars[0].aval.ndim,
              ins[1] or (None,) * eqn.invars[1].aval.ndim)
    out = [tuple(lt[i] for i in lb)
           + tuple(t for i, t in enumerate(lt) if i not in lc and i not in lb)
           + tuple(t for i, t in enumerate(rt) if i not in rc and i not in rb)]
  elif name == jc.CONV and t0:
    dn = p["dimension_numbers"]
    t = [None] * len(outs[0])
    t[dn.out_spec[0]] = t0[dn.lhs_spec[0]]
    out = [tuple(t)]
  elif name == jc.GATHER and ins[1] and not t0:
    # A lookup: the output's non-offset axes are the indices' batch axes.
    offset = set(p["dimension_numbers"].offset_dims)
    batch = iter(ins[1][:-1])
    out = [tuple(None if i in offset else next(batch, None) for i in range(len(outs[0])))]
  elif name.startswith("reduce_") or name in ("argmax", "argmin"):
    axes = set(p.get("axes", ()))
    if t0:
      out = [tuple(t for i, t in enumerate(t0) if i not in axes)] * len(outs)
  elif name in ("rev", "sort", "gather", "scatter", "scatter-add", "dynamic_update_slice"):
    out = None  # rows move: forget
  else:  # elementwise and the like: an output shaped like a tagged input keeps its tags
    for v, t in zip(eqn.invars, ins):
      if t and all(tuple(o) == tuple(v.aval.shape) for o in outs):
        out = [t] * len(outs)
        break
  if out:
    for var, t in zip(eqn.outvars, out):
      if t is not None and any(x is not None for x in t) and not jc.is_dropvar(var):
        tags[var] = t

