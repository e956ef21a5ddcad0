"""Internal: aligns a statistics tree with a params tree (paths, shapes, broadcasting).

This module is the one place that knows the statistics layout (version 0.2,
"keep-rank"); its public helpers are re-exported by ``adaact_optax.layout``, and
docs/statistics.md states the layout for users:

* A statistics leaf sits at the path of the parameter it scales; any pytree
  whose paths name the same keys works (dict, FrozenDict, ``nnx.State``,
  Equinox modules, flat dicts ``{'Dense_0/kernel': ...}``). Parameters
  without a leaf (or with ``None``) are *unmatched*. Leaves at paths outside
  the params tree (parameters the optimizer does not update) are ignored; a
  tree none of whose leaves is at a parameter path is an error.
* For a parameter of shape ``K`` a statistics leaf is float32 with the same
  rank as ``K``. Along each axis its size ``s`` divides ``K[ax]``:
  ``s == K[ax]`` (statistics vary along that axis: an input axis),
  ``s == 1`` (broadcast: an output axis), or ``1 < s < K[ax]`` (blocks:
  element ``i`` covers the ``K[ax]/s`` consecutive parameter elements
  ``i*K[ax]/s ... (i+1)*K[ax]/s - 1``). A Dense kernel ``(in, out)`` has
  ``(in, 1)``, a grouped conv kernel ``(kh, kw, C/G, C_out)`` has
  ``(kh, kw, C/G, G)``, a bias ``(out,)`` has ``(1,)``, a scalar ``()``.
* Version 0.1.0 leaves are still accepted: a leaf of lower rank than ``K``
  means ``K``'s leading axes (padded with trailing 1s), and the grouped-conv
  form ``(*k, C)`` becomes ``(*k, C/G, G)``.
* A float32 leaf of shape ``UNCAPTURED_SHAPE == (0,)`` marks a parameter a
  capture saw multiply an activation but could not record: it is unmatched
  (``unmatched="error"`` refuses it).
* An element equal to ``NO_ROWS == -0.0`` marks a feature that met no rows
  this step: the transforms leave its second moment as it was.
* AdaAct's second moment ``nu`` has the keep-rank shape of the statistics:
  by default ``K[:-1] + (1,)`` for rank >= 2, ``(1,)`` for vectors, ``()``
  for scalars; ``stats_shapes=`` overrides it.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import tree_util

PyTree = Any

#: Shape of the statistics leaf that marks an uncaptured weight.
UNCAPTURED_SHAPE: tuple[int, ...] = (0,)

#: The statistic of a feature that met no rows this step (IEEE negative zero):
#: the transforms leave that feature's second moment as it was.
NO_ROWS: float = -0.0


def path_name(path) -> str:
  """``(DictKey('Dense_0'), DictKey('kernel'))`` -> ``'Dense_0/kernel'``.

  ``GetAttrKey('value')``, the key of an ``nnx.Variable``'s payload, is
  dropped, so ``nnx.state(model)`` (what ``nnx.Optimizer`` initialises
  from) and its pure arrays name the same paths.
  """
  return tree_util.keystr(
      tuple(k for k in path if not (isinstance(k, tree_util.GetAttrKey) and k.name == "value")),
      simple=True, separator="/")


def _is_shape(x) -> bool:
  # type(x) is tuple: optax.MaskedNode (an empty NamedTuple) is no shape.
  return type(x) is tuple and all(isinstance(d, (int, np.integer)) for d in x)


def _shape_of(x) -> tuple[int, ...]:
  return tuple(int(d) for d in x) if _is_shape(x) else tuple(jnp.shape(x))


def is_uncaptured(x) -> bool:
  """True for the UNCAPTURED marker: a leaf (array, ``ShapeDtypeStruct`` or
  shape tuple) of shape ``(0,)``.

  Args:
    x: a statistics leaf, a shape tuple, or ``None``.

  Returns:
    Whether ``x`` marks a weight the capture saw but could not record.

  Examples:
    >>> import jax.numpy as jnp
    >>> from adaact_optax import layout
    >>> layout.is_uncaptured(jnp.zeros((0,))), layout.is_uncaptured(jnp.ones((3, 1)))
    (True, False)
  """
  return x is not None and _shape_of(x) == UNCAPTURED_SHAPE


def is_no_rows(a) -> jax.Array:
  """Where a statistics array holds the no-rows marker ``NO_ROWS`` (``-0.0``).

  A feature that met no rows in a step (a weight in the ``lax.cond`` branch
  not taken, an expert routed no tokens) has no mean square; the capture
  gives it ``-0.0``, which a real mean square never is, and AdaAct keeps
  that feature's second moment. ``+0.0`` (rows of zeros) and NaNs are not
  the marker.

  Args:
    a: a statistics array.

  Returns:
    A bool array of ``a``'s shape.

  Examples:
    >>> import jax.numpy as jnp
    >>> from adaact_optax import layout
    >>> layout.is_no_rows(jnp.array([-0.0, 0.0, 2.0, -jnp.nan])).tolist()
    [True, False, False, False]
  """
  return (a == 0) & jnp.signbit(a)


def default_moment_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """State shape for a parameter of ``shape`` without ``stats_shapes``.

  All axes but the last are input axes: ``K[:-1] + (1,)`` for rank >= 2,
  ``(1,)`` for a vector (a bias: one constant input), ``()`` for a scalar.
  """
  shape = tuple(shape)
  return shape[:-1] + (1,) if shape else ()


def _shape_error(stat_shape, param_shape, name: str) -> ValueError:
  k = tuple(param_shape)
  example = default_moment_shape(k)
  return ValueError(
      f"AdaAct statistics of shape {tuple(stat_shape)} at '{name}' cannot scale the "
      f"parameter of shape {k}: expected the parameter's rank with, along each axis, its "
      f"size (an input axis), 1 (an output axis) or a divisor of it (blocks), e.g. "
      f"{example}; or the 0.1.0 forms (the leading axes {k[:-1]}, or (*kernel_size, "
      f"in_channels) for a grouped convolution)")


def _legacy_grouped(s, k) -> bool:
  # 0.1.0 grouped conv: kernel (*k, C/G, C_out), statistics (*k, C), G | C_out.
  return (len(s) == len(k) - 1 and len(k) >= 2 and s[:-1] == k[:-2] and k[-2] > 0
          and s[-1] % k[-2] == 0 and (s[-1] // k[-2]) > 0 and k[-1] % (s[-1] // k[-2]) == 0)


def keep_rank_shape(stat_shape, param_shape, name: str) -> tuple[int, ...]:
  """The keep-rank shape of a statistics leaf (0.1.0 forms converted).

  Args:
    stat_shape: the leaf's shape (keep-rank, a prefix of ``param_shape``, or
      the 0.1.0 grouped form ``(*k, C)``). Not the UNCAPTURED marker.
    param_shape: the parameter's shape ``K``.
    name: the parameter's path, for the error.

  Returns:
    A shape of ``K``'s rank whose sizes divide ``K``'s.

  Raises:
    ValueError: naming the path and both shapes when no form applies.

  Examples:
    >>> from adaact_optax import layout
    >>> layout.keep_rank_shape((3,), (3, 2), "Dense_0/kernel")          # 0.1.0 prefix
    (3, 1)
    >>> layout.keep_rank_shape((3, 3, 4), (3, 3, 2, 8), "Conv_0/kernel")  # 0.1.0 grouped
    (3, 3, 2, 2)
  """
  s, k = _shape_of(stat_shape), tuple(param_shape)
  if len(s) == len(k):
    if all(d > 0 and kk % d == 0 for d, kk in zip(s, k)):
      return s
    raise _shape_error(s, k, name)
  if len(s) < len(k):
    if k[:len(s)] == s:
      return s + (1,) * (len(k) - len(s))
    if _legacy_grouped(s, k):
      return s[:-1] + (k[-2], s[-1] // k[-2])
  raise _shape_error(s, k, name)


def to_keep_rank(a: jax.Array, param_shape, name: str) -> jax.Array:
  """``a`` (keep-rank or a 0.1.0 form) in the keep-rank layout, float32.

  The 0.1.0 grouped form ``(*k, C)`` holds input channel ``c = g*C/G + i``
  at ``[..., c]``; the keep-rank form ``(*k, C/G, G)`` holds it at
  ``[..., i, g]``.

  Args:
    a: a statistics leaf.
    param_shape: the parameter's shape.
    name: the parameter's path, for the error.

  Returns:
    ``a`` as float32 in the shape :func:`keep_rank_shape` gives.

  Raises:
    ValueError: as :func:`keep_rank_shape`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from adaact_optax import layout
    >>> old = jnp.arange(4.0).reshape(1, 1, 4)     # channels 0..3 of a 2-group conv
    >>> layout.to_keep_rank(old, (1, 1, 2, 4), "Conv_0/kernel")[0, 0].tolist()
    [[0.0, 2.0], [1.0, 3.0]]
  """
  a = jnp.asarray(a, jnp.float32)
  s, k = tuple(a.shape), tuple(param_shape)
  target = keep_rank_shape(s, k, name)
  if len(s) < len(k) and k[:len(s)] != s:  # the 0.1.0 grouped form
    per_group, groups = target[-2], target[-1]
    return jnp.swapaxes(a.reshape(s[:-1] + (groups, per_group)), -1, -2)
  return a.reshape(target)


def _drop_masked(names, tree: PyTree) -> list[str]:
  """``names`` not at or under an empty node of ``tree``: ``optax.masked`` and
  ``optax.partition`` put an ``optax.MaskedNode`` where another transform owns
  the parameters (a leaf or, with a prefix mask, a whole subtree)."""
  is_empty = lambda x: isinstance(x, tuple) and len(x) == 0
  leaves = jax.tree.leaves_with_path(tree, is_leaf=is_empty)
  masked = tuple(path_name(p) for p, leaf in leaves if is_empty(leaf))
  return sorted(n for n in names if not any(n == m or n.startswith(m + "/") for m in masked))


def stats_leaves(tree: PyTree) -> dict[str, Any]:
  """``{path name: leaf}`` of a statistics tree (shape tuples count as leaves)."""
  if tree is None:
    return {}
  leaves = jax.tree.leaves_with_path(tree, is_leaf=_is_shape)
  return {path_name(p): leaf for p, leaf in leaves}


def param_names(params: PyTree) -> list[str]:
  return [path_name(p) for p, _ in jax.tree.leaves_with_path(params)]


def _unknown_paths_error(what: str, extra, shapes, params: PyTree) -> ValueError:
  names = param_names(params)
  more = lambda xs: f"{xs[:8]}{'...' if len(xs) > 8 else ''}"
  return ValueError(
      f"{what} matches no parameter of the tree the optimizer was given: its entries at "
      f"{more(extra)} (shapes {more(shapes)}) are not parameter paths; parameters: "
      f"{more(names)}. Entries for parameters outside the tree (frozen, outside "
      "nnx.Optimizer's wrt=, in another optax.partition branch) are ignored, but none "
      f"matching means {what} is not keyed like the params: pass the statistics "
      "collection itself (mutated[adaact_optax.linen.COLLECTION], not mutated), without an "
      "extra top-level key such as 'params', captured from the model whose parameters "
      "the optimizer updates (the same paths, not a submodule's)")


def _check_overlap(what: str, entries: dict, tree: PyTree) -> None:
  """Refuses a statistics (or shapes) tree that has no entry at a parameter of ``tree``.

  Entries at paths outside ``tree`` are statistics of parameters this
  transform does not update (frozen ones, those outside ``nnx.Optimizer``'s
  ``wrt=``, another ``optax.partition`` branch's, which sit under an
  ``optax.MaskedNode``): ignored. The transform cannot tell those from a
  misspelled path, and ignoring a misspelled entry only leaves its parameter
  unmatched, as a missing entry does. But when no entry is at a parameter
  path of ``tree`` (or under its masked nodes) the tree is not keyed like
  the params at all (the whole ``mutated`` dict, an extra top-level key, a
  submodule's optimizer): a ``ValueError`` naming the paths and shapes.
  A tree with no leaves (``optax.tree_map_params``' placeholders) is not
  checked.
  """
  names = set(param_names(tree))
  outside = sorted(entries.keys() - names)
  if not outside or not jax.tree.leaves(tree):
    return
  unmasked = _drop_masked(outside, tree)
  if len(unmasked) == len(entries):  # nothing in the tree, nothing masked
    raise _unknown_paths_error(what, unmasked, [_shape_of(entries[e]) for e in unmasked], tree)


def moment_shapes(params: PyTree, stats_shapes: PyTree | None = None) -> PyTree:
  """The second-moment state's shape for every parameter (a tree of tuples).

  Args:
    params: the parameter tree (arrays or anything with ``.shape``).
    stats_shapes: optional tree, keyed by the same paths, of statistics
      shapes (tuples, arrays or ``jax.ShapeDtypeStruct``; keep-rank or
      0.1.0 forms, e.g. from ``adaact_optax.linen.stats_shapes``). Its
      leaves override ``default_moment_shape``; the UNCAPTURED marker gives
      ``(0,)`` (no state); paths it lacks keep the default.

  Raises:
    ValueError: no entry at a parameter path (entries outside ``params``
      are otherwise ignored, see ``_check_overlap``), or a shape that cannot
      scale its parameter (naming the path and the shapes).
  """
  overrides = stats_leaves(stats_shapes)
  _check_overlap("stats_shapes", overrides, params)

  def shape_for(path, p):
    name = path_name(path)
    k = tuple(jnp.shape(p))
    if name not in overrides:
      return default_moment_shape(k)
    if is_uncaptured(overrides[name]):
      return UNCAPTURED_SHAPE
    return keep_rank_shape(_shape_of(overrides[name]), k, name)

  return tree_util.tree_map_with_path(shape_for, params)


def moment_zeros(params: PyTree, stats_shapes: PyTree | None = None) -> PyTree:
  """float32 zeros of ``moment_shapes(params, stats_shapes)``: a fresh second-moment tree.

  Boxed parameters (Flax metadata) give zeros in the same boxes, whose axis
  names still describe the parameter: ``boxes.moment_zeros`` renames them.
  """
  shapes = moment_shapes(params, stats_shapes)
  return jax.tree.map(lambda _, s: jnp.zeros(s, jnp.float32), params, shapes)


def with_statistics(params: PyTree, stats_shapes: PyTree) -> PyTree:
  """A bool tree like ``params``: True where ``stats_shapes`` has statistics.

  Absent entries, ``None`` and the UNCAPTURED marker are False; entries at
  paths outside ``params`` are ignored, and a ``stats_shapes`` with no entry
  at a path of ``params`` is a ``ValueError``. A label tree for
  ``optax.partition`` / ``optax.masked`` (which parameters AdaAct scales).

  Examples:
    >>> import jax.numpy as jnp
    >>> from adaact_optax import layout
    >>> params = {"w": jnp.ones((3, 2)), "scale": jnp.ones(2)}
    >>> layout.with_statistics(params, {"w": (3, 1)})
    {'scale': False, 'w': True}
  """
  entries = stats_leaves(stats_shapes)
  _check_overlap("stats_shapes", entries, params)
  return tree_util.tree_map_with_path(
      lambda path, _: path_name(path) in entries and not is_uncaptured(entries[path_name(path)]),
      params)


def uncaptured_paths(stats: PyTree) -> list[str]:
  """Sorted paths of the UNCAPTURED markers in a statistics (or shapes) tree."""
  return sorted(n for n, leaf in stats_leaves(stats).items() if is_uncaptured(leaf))


def broadcast_plan(moment_shape, param_shape, name: str) -> str:
  """0.1.0 layout only: 'prefix' or 'grouped' for a lower-rank leaf.

  Kept for code written against 0.1.0; new code uses ``keep_rank_shape``.
  """
  n, k = tuple(moment_shape), tuple(param_shape)
  if k[:len(n)] == n:
    return "prefix"
  if _legacy_grouped(n, k):
    return "grouped"
  raise _shape_error(n, k, name)


def apply_scale(x: jax.Array, scale: jax.Array, name: str) -> jax.Array:
  """``x * scale``, the per-input-feature ``scale`` broadcast over ``x``.

  ``scale`` is keep-rank (0.1.0 forms are converted first). Axes where its
  size is 1 or ``x``'s broadcast as usual; on a block axis (size ``s``,
  ``1 < s < K``) ``x``'s axis is viewed as ``(s, K/s)`` and the scale as
  ``(s, 1)``, so nothing parameter-sized is materialised but the product.
  """
  k = tuple(x.shape)
  if scale.ndim != len(k):
    scale = to_keep_rank(scale, k, name)
  s = tuple(scale.shape)
  keep_rank_shape(s, k, name)  # validates divisibility, names the path
  if all(d in (1, kk) for d, kk in zip(s, k)):
    return x * scale
  x_view, s_view = [], []
  for d, kk in zip(s, k):
    if d in (1, kk):
      x_view.append(kk)
      s_view.append(d)
    else:
      x_view += [d, kk // d]
      s_view += [d, 1]
  return (x.reshape(x_view) * scale.reshape(s_view)).reshape(k)


#: The calls that give ``stats_shapes=`` its tree, one per model style.
STATS_SHAPES_CALLS = (
    "stats_shapes=adaact_optax.stats_shapes(loss_fn, params, *batch) for a pure-JAX loss "
    "(the function value_grad_and_stats differentiates), "
    "stats_shapes=adaact_optax.linen.stats_shapes(model, variables, *args) for Linen, "
    "stats_shapes=adaact_optax.nnx.stats_shapes(model, *args) for NNX")


def _layout_mismatch_error(name: str, given, stat_shape, param_shape, state_shape) -> ValueError:
  """Statistics whose layout is not the one the state was sized for at ``init``."""
  k, s, state = tuple(param_shape), tuple(stat_shape), tuple(state_shape)
  shapes = (f"AdaAct statistics at '{name}' have shape {tuple(given)} (keep-rank {s}), but the "
            f"optimizer state for the parameter of shape {k} has shape {state}.")
  if state == UNCAPTURED_SHAPE:
    return ValueError(f"{shapes} The optimizer was built with stats_shapes marking this "
                      "parameter as uncaptured (no statistics): rebuild it with the "
                      f"stats_shapes of this model: {STATS_SHAPES_CALLS}.")
  axes = [ax for ax, (d, n) in enumerate(zip(s, state)) if d not in (1, n)]
  if len(state) != len(k) or not axes:
    why = ""
  elif any(1 < d < n for d, n in zip(s, k)):
    why = (f" The statistics come in blocks along axis {axes[0]} (a grouped convolution, a "
           "per-block fused projection), which the state, sized at init for another layout, "
           "does not have.")
  else:
    where = "axis" if len(axes) == 1 else "axes"
    sized = ("for the default layout (every axis but the last is an input axis)"
             if state == default_moment_shape(k) else "for another layout")
    why = (f" The statistics vary along {where} {', '.join(map(str, axes))}, the weight's "
           f"input {where} (as for a tied Embed.attend table or an (out, in) kernel used as "
           f"x @ W.T), while the state was sized at init {sized}.")
  return ValueError(f"{shapes}{why} Build the optimizer with the statistics' shapes so init "
                    f"sizes the state like them: {STATS_SHAPES_CALLS}.")


def align(stats: PyTree, updates: PyTree, nu: PyTree) -> PyTree:
  """Places each statistics leaf at its parameter, shaped like the state.

  Args:
    stats: the statistics tree (keep-rank or 0.1.0 leaves, ``None`` or
      missing for parameters without statistics, the UNCAPTURED marker).
    updates: the updates (or params) tree; its paths name the parameters.
    nu: the second-moment tree (the state's shapes).

  Returns:
    A tree with ``updates``' structure whose leaves are float32 statistics
    of the state's shape (a keep-rank leaf with size 1 where the state has
    more is broadcast), or ``None`` for unmatched parameters (missing leaf,
    ``None``, UNCAPTURED marker).

  Raises:
    ValueError (at trace time) when no leaf of ``stats`` is at a
    parameter path of ``updates`` (leaves outside it are otherwise ignored,
    see ``_check_overlap``) or a shape cannot be matched, naming the path
    and the shapes.
  """
  by_name = stats_leaves(stats)
  _check_overlap("activation_stats", by_name, updates)

  def place(path, g, v):
    name = path_name(path)
    a = by_name.get(name)
    if a is None:
      return None
    if is_uncaptured(a):
      return None
    k, state_shape = tuple(jnp.shape(g)), tuple(v.shape)
    a = to_keep_rank(a, k, name)
    if not all(d in (1, n) for d, n in zip(a.shape, state_shape)) or len(state_shape) != len(k):
      raise _layout_mismatch_error(name, tuple(jnp.shape(by_name[name])), tuple(a.shape), k,
                                   state_shape)
    return a if a.shape == state_shape else jnp.broadcast_to(a, state_shape)

  return tree_util.tree_map_with_path(place, updates, nu)


def state_axes(entries: Sequence[Any], state_shape: Sequence[int],
               param_shape: Sequence[int]) -> tuple:
  """The partitioning of a state leaf from its parameter's: the one rule.

  Works on mesh axis names (``PartitionSpec`` entries) and on Flax logical
  axis names alike.

  Args:
    entries: the parameter's per-axis names (a ``PartitionSpec``, a tuple of
      names; shorter than the parameter's rank means replicated after).
    state_shape: the state leaf's shape.
    param_shape: the parameter's shape ``K``.

  Returns:
    A tuple with one entry per axis of the state leaf: ``entries[ax]`` where
    ``state_shape[ax] == K[ax]``, ``None`` elsewhere. A lower-rank leaf that
    is a prefix of ``K`` keeps the leading entries; any other shape gets
    ``None`` everywhere.

  Examples:
    >>> from adaact_optax import sharding   # state_axes is public there
    >>> sharding.state_axes(("embed", "mlp"), (8, 1), (8, 16))   # nu of an (8, 16) kernel
    ('embed', None)
  """
  s, k = tuple(state_shape), tuple(param_shape)
  entries = tuple(entries) + (None,) * max(len(k) - len(tuple(entries)), 0)
  if len(s) == len(k):
    return tuple(e if d == kk else None for e, d, kk in zip(entries, s, k))
  if len(s) < len(k) and k[:len(s)] == s:
    return entries[:len(s)]
  return (None,) * len(s)
