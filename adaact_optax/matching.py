"""Aligns a statistics tree with a params tree: paths, shapes, broadcasting.

Conventions (the README states them for users):

* A statistics leaf sits at the path of the parameter it scales; any pytree
  whose paths name the same keys works (dict, FrozenDict, ``nnx.State``).
  Parameters without a leaf are *unmatched*.
* The second-moment state of a parameter of shape ``K`` has, by default,
  shape ``K[:-1]`` ("every axis but the last is an input axis"), and ``()``
  for vectors and scalars. A statistics leaf may have exactly that shape, or
  a prefix of it (a multi-output ``DenseGeneral`` kernel ``(in, heads, dim)``
  gets ``(in,)`` statistics, repeated over ``heads`` in the state).
* Grouped convolutions: kernel ``(*k, C/G, C_out)``, statistics ``(*k, C)``.
  Their state needs ``stats_shapes`` (see ``scale_by_adaact``), because
  ``init(params)`` cannot see the group count.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import tree_util

PyTree = Any


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_name(path) -> str:
  """``(DictKey('Dense_0'), DictKey('kernel'))`` -> ``'Dense_0/kernel'``.

  ``GetAttrKey('value')``, the key of an ``nnx.Variable``'s payload, is
  dropped, so ``nnx.state(model)`` (what ``nnx.Optimizer`` initialises
  from) and its pure arrays name the same paths.
  """
  return "/".join(_key_name(k) for k in path
                  if not (isinstance(k, tree_util.GetAttrKey) and k.name == "value"))


def default_moment_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """State shape for a parameter: all axes but the last are input axes."""
  return tuple(shape[:-1])


def _is_shape(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def _drop_masked(names, tree: PyTree) -> list[str]:
  """``names`` not at or under an empty node of ``tree``: ``optax.masked`` and
  ``optax.partition`` put an ``optax.MaskedNode`` where another transform owns
  the parameters (a leaf or, with a prefix mask, a whole subtree)."""
  is_empty = lambda x: isinstance(x, tuple) and len(x) == 0
  leaves, _ = tree_util.tree_flatten_with_path(tree, is_leaf=is_empty)
  masked = tuple(path_name(p) for p, leaf in leaves if is_empty(leaf))
  return sorted(n for n in names if not any(n == m or n.startswith(m + "/") for m in masked))


def moment_shapes(params: PyTree, stats_shapes: PyTree | None = None) -> PyTree:
  """The second-moment state's shape for every parameter (a tree of tuples).

  Args:
    params: the parameter tree (arrays or anything with ``.shape``).
    stats_shapes: optional tree, keyed by the same paths, of statistics
      shapes (tuples, arrays or ``jax.ShapeDtypeStruct``, e.g. from
      ``adaact_optax.linen.stats_shapes``). Its leaves override the default
      ``shape[:-1]``; paths it lacks keep the default.
  """
  overrides = {}
  if stats_shapes is not None:
    leaves, _ = tree_util.tree_flatten_with_path(stats_shapes, is_leaf=_is_shape)
    overrides = {path_name(p): tuple(l if _is_shape(l) else l.shape) for p, l in leaves}
    known = {path_name(p) for p, _ in tree_util.tree_flatten_with_path(params)[0]}
    for name in _drop_masked(overrides.keys() - known, params):
      raise ValueError(f"stats_shapes has an entry at '{name}', which is not a parameter "
                       f"path; parameters: {sorted(known)[:8]}...")

  def shape_for(path, p):
    name = path_name(path)
    shape = overrides.get(name, default_moment_shape(jnp.shape(p)))
    broadcast_plan(shape, jnp.shape(p), name)  # fail early on a bad override
    return shape

  return tree_util.tree_map_with_path(shape_for, params)


def moment_zeros(params: PyTree, stats_shapes: PyTree | None = None) -> PyTree:
  """float32 zeros of ``moment_shapes(params, stats_shapes)``: a fresh second-moment tree."""
  shapes = moment_shapes(params, stats_shapes)
  return jax.tree.map(lambda _, s: jnp.zeros(s, jnp.float32), params, shapes)


def broadcast_plan(moment_shape, param_shape, name: str) -> str:
  """How a per-input-feature array reaches its parameter: 'prefix' or 'grouped'.

  Raises ValueError naming the path and both shapes when neither applies.
  """
  n, k = tuple(moment_shape), tuple(param_shape)
  if k[:len(n)] == n:
    return "prefix"
  if (len(n) == len(k) - 1 and len(k) >= 2 and n[:-1] == k[:-2] and k[-2] > 0
      and n[-1] % k[-2] == 0 and k[-1] % (n[-1] // k[-2]) == 0):
    return "grouped"
  raise ValueError(
      f"AdaAct statistics of shape {n} at '{name}' cannot scale the parameter of "
      f"shape {k}: expected the parameter's leading (input) axes, e.g. {k[:-1]}, "
      f"or (*kernel_size, in_channels) for a grouped convolution")


def apply_scale(x: jax.Array, scale: jax.Array, name: str) -> jax.Array:
  """``x * scale`` with a per-input-feature ``scale`` broadcast over ``x``'s outputs.

  Grouped conv: kernel ``(*k, C/G, C_out)`` and scale ``(*k, C)``; output
  channel ``j`` of group ``g = j // (C_out/G)`` reads input channel
  ``g*C/G + i``, so ``x`` is viewed as ``(*k, C/G, G, C_out/G)``.
  """
  k = x.shape
  if broadcast_plan(scale.shape, k, name) == "prefix":
    return x * scale.reshape(scale.shape + (1,) * (len(k) - scale.ndim))
  per_group, groups = k[-2], scale.shape[-1] // k[-2]
  grouped = scale.reshape(scale.shape[:-1] + (groups, per_group))
  grouped = jnp.swapaxes(grouped, -1, -2)[..., None]        # (*k, C/G, G, 1)
  view = x.reshape(k[:-1] + (groups, k[-1] // groups))
  return (view * grouped).reshape(k)


def align(stats: PyTree, updates: PyTree, nu: PyTree) -> PyTree:
  """Places each statistics leaf at its parameter, shaped like the state.

  Returns a tree with ``updates``' structure whose leaves are float32
  statistics of the state's shape, or ``None`` for unmatched parameters.
  Raises ValueError (at trace time) for a path that is not a parameter or a
  shape that cannot be matched, naming the path and the shapes.
  """
  by_name = {path_name(p): leaf for p, leaf in tree_util.tree_flatten_with_path(stats)[0]}
  seen = set()

  def place(path, g, v):
    shape = v.shape
    name = path_name(path)
    a = by_name.get(name)
    if a is None:
      return None
    seen.add(name)
    a_shape = jnp.shape(a)
    if tuple(shape[:len(a_shape)]) != a_shape:
      hint = ""
      if broadcast_plan(a_shape, jnp.shape(g), name) == "grouped":
        hint = (" This looks like a grouped convolution: build the optimizer with "
                "stats_shapes=adaact_optax.linen.stats_shapes(model, variables, x) "
                "(or adaact_optax.nnx.stats_shapes) so its state is per input channel.")
      raise ValueError(f"AdaAct statistics at '{name}' have shape {a_shape}, but the "
                       f"optimizer state for the parameter of shape {jnp.shape(g)} has "
                       f"shape {tuple(shape)}.{hint}")
    a = jnp.asarray(a, jnp.float32)
    return jnp.broadcast_to(a.reshape(a_shape + (1,) * (len(shape) - len(a_shape))), shape)

  placed = tree_util.tree_map_with_path(place, updates, nu)
  # Statistics of parameters masked out of this transform are not errors.
  extra = _drop_masked(by_name.keys() - seen, updates)
  if extra:
    param_names = [path_name(p) for p, _ in tree_util.tree_flatten_with_path(updates)[0]]
    raise ValueError(f"activation_stats has entries at {extra} (shapes "
                     f"{[jnp.shape(by_name[e]) for e in extra]}) that are not parameter "
                     f"paths; parameters: {param_names[:8]}"
                     f"{'...' if len(param_names) > 8 else ''}")
  return placed
