"""The capture's entry points (re-exported by ``adaact_optax.capture``)."""

from __future__ import annotations

import warnings
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import tree_util

from adaact_optax._src import alignment
from adaact_optax._src import moments
from adaact_optax._src.capture import jax_internals as jc
from adaact_optax._src.capture.argument_order import data_as_weight
from adaact_optax._src.capture.assemble import finalize
from adaact_optax._src.capture.kinds import DATA, NeedsEvaluation, identity_view
from adaact_optax._src.capture.report import (CoverageReport, warn_argument_order,
                                              warn_uncaptured)
from adaact_optax._src.capture.walker import (Interpreter, Reader, Trace, forward_part,
                                               top_interpreter)


def embedding_floor(embeddings) -> float | None:
  """The ``embeddings=`` flag as a floor: False -> None (unmatched), True -> default."""
  if embeddings is True:
    return moments.EMBEDDING_FLOOR
  if embeddings is False or embeddings is None:
    return None
  if isinstance(embeddings, str) or not float(embeddings) >= 0:
    raise ValueError(f"embeddings must be a bool or a floor >= 0, got {embeddings!r}")
  return float(embeddings)


DYNAMIC = (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)


def split_dynamic(args, kwargs):
  """``(arrays, rebuild)``: the array leaves of ``(args, kwargs)`` and a function
  putting new values for them back (other leaves, e.g. flags, stay static)."""
  leaves, treedef = tree_util.tree_flatten((args, kwargs))
  idx = [i for i, x in enumerate(leaves) if isinstance(x, DYNAMIC)]

  def rebuild(values):
    full = list(leaves)
    for i, x in zip(idx, values):
      full[i] = x
    return tree_util.tree_unflatten(treedef, full)
  return [leaves[i] for i in idx], rebuild


def flat_inputs(params, args, kwargs):
  """``(treedef, paths, parameter leaves, array args, rebuild)`` for both capture routes."""
  flat, treedef = tree_util.tree_flatten_with_path(params)
  paths = [alignment.path_name(p) for p, _ in flat]
  dyn_vals, rebuild = split_dynamic(args, kwargs)
  return treedef, paths, [jnp.asarray(x) for _, x in flat], dyn_vals, rebuild


def argument_names(args, kwargs) -> list:
  """Names of the array leaves of ``(args, kwargs)`` in ``split_dynamic``'s order
  (``args[1]`` is ``fun``'s second argument)."""
  names = []
  for path, x in tree_util.tree_flatten_with_path((args, kwargs))[0]:
    if isinstance(x, DYNAMIC):
      kind, rest = path[0].idx, path[1:]
      head = f"args[{rest[0].idx + 1}]" if kind == 0 else f"kwargs[{rest[0].key!r}]"
      names.append(head + tree_util.keystr(rest[1:]))
  return names


_version_warned: list[bool] = []


def check_version():
  if not jc.is_tested_version() and not _version_warned:
    _version_warned.append(True)
    warnings.warn(f"adaact_optax.capture was tested on jax {jc.TESTED_JAX[0]}..{jc.TESTED_JAX[1]}, "
                  f"not {jax.__version__}: run tests/capture/test_jax_compat.py to check the internals "
                  "it reads", stacklevel=3)


def capture_call(fun: Callable, params, args: tuple = (), kwargs: dict | None = None, *,
                 embeddings: bool | float = False, row_mask=None):
  """Runs ``fun(params, *args, **kwargs)`` and captures AdaAct's statistics.

  The lower-level entry of ``value_grad_and_stats``: differentiable with
  respect to ``params`` (use it inside your own loss function), emits no
  warnings itself.

  Args:
    fun: called as ``fun(params, *args, **kwargs)``.
    params: the parameter pytree.
    args: ``fun``'s other positional arguments (a tuple).
    kwargs: ``fun``'s keyword arguments (a dict, or ``None``).
    embeddings: as for :func:`value_grad_and_stats`.
    row_mask: as for :func:`value_grad_and_stats`.

  Returns:
    ``(output, stats_leaves, report)``: ``fun``'s output; one entry per leaf
    of ``params`` (in ``jax.tree.leaves`` order): a keep-rank float32
    statistic, the ``(0,)``-shaped uncaptured marker, or ``None``; and a
    ``CoverageReport``.

  Raises:
    ValueError: a ``row_mask`` whose shape is the leading shape of none of
      the array arguments (it would weigh no rows).

  Examples:
    >>> import jax.numpy as jnp
    >>> from adaact_optax import capture
    >>> def loss(params, x):
    ...   return jnp.mean(jnp.tanh(x @ params["w"] + params["b"]) ** 2)
    >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    >>> out, leaves, report = capture.capture_call(loss, params, (jnp.ones((4, 3)),))
    >>> [leaf.shape for leaf in leaves]                # leaves order: "b", "w"
    [(1,), (3, 1)]
  """
  return capture_core(fun, params, args, kwargs, embeddings, row_mask)[:3]


def capture_core(fun, params, args, kwargs, embeddings, row_mask, check_order=False):
  """``capture_call``'s ``(output, stats_leaves, report)``, plus, with
  ``check_order``, ``data_as_weight``'s evidence that ``fun``'s arguments are
  swapped (else None)."""
  check_version()
  kwargs = kwargs or {}
  floor = embedding_floor(embeddings)
  treedef, paths, p_leaves, dyn_vals, rebuild = flat_inputs(params, args, kwargs)

  def flat_fun(p, d):
    a, kw = rebuild(d)
    return fun(tree_util.tree_unflatten(treedef, p), *a, **kw)

  closed, out_shape = jax.make_jaxpr(flat_fun, return_shape=True)(p_leaves, dyn_vals)
  shapes = [x.shape for x in p_leaves]
  trace = Trace(shapes, floor)
  interp = top_interpreter(trace, row_mask, closed.jaxpr.invars[len(p_leaves):],
                           walker=Interpreter)
  kinds = [identity_view(i, s) for i, s in enumerate(shapes)] + [DATA] * len(dyn_vals)
  outs, _, _ = interp.run(closed.jaxpr, closed.consts, p_leaves + dyn_vals, kinds)
  out = tree_util.tree_unflatten(tree_util.tree_structure(out_shape), outs)
  stats, report = finalize(trace, interp.contributions, paths, shapes)
  hint = (data_as_weight(closed.jaxpr, len(p_leaves), argument_names(args, kwargs))
          if check_order else None)
  return out, stats, report, hint


def capture_differentiated(fun, has_aux, params, args, kwargs, embeddings, row_mask):
  """The fast route: ``value_grad_and_stats`` on a jaxpr JAX has already differentiated.

  Traces ``value_and_grad(fun)`` as JAX does (its cached rules for nested
  ``jit``s make this far cheaper than differentiating the engine's
  equation-by-equation re-evaluation), reads the forward pass's equations
  with a ``Reader`` (binding nothing), then evaluates the whole jaxpr as one
  inlined call that also returns the contractions' inputs, from which the
  statistics are computed. Returns ``None`` when a parameter enters a
  higher-order primitive of the differentiated jaxpr (``scan``, ``while``,
  ``cond``, a non-inlined ``jit``, ``custom_jvp``): those need
  ``evaluate_differentiated``. (A ``checkpoint``'s forward and a
  ``custom_vjp``'s ``fwd`` are staged inline when differentiated, so they
  stay on this route.)

  Args:
    embeddings: the ``embeddings=`` flag or its floor (``embedding_floor``).

  Returns:
    ``(value, grads, stats_leaves, report, hint)`` or ``None``; ``hint``:
    ``data_as_weight``'s evidence that ``fun``'s arguments are swapped.
  """
  check_version()
  floor = embedding_floor(embeddings)
  treedef, paths, p_leaves, dyn_vals, rebuild = flat_inputs(params, args, kwargs)

  def value_and_grad(p, d):
    def loss(q):
      a, kw = rebuild(d)
      return fun(tree_util.tree_unflatten(treedef, q), *a, **kw)
    return jax.value_and_grad(loss, has_aux=has_aux)(p)

  closed, out_shape = jax.make_jaxpr(value_and_grad, return_shape=True)(p_leaves, dyn_vals)
  jaxpr = closed.jaxpr
  if jaxpr.effects:
    return None
  value_tree = tree_util.tree_structure(out_shape[0])
  n_value = value_tree.num_leaves
  shapes = [x.shape for x in p_leaves]
  trace = Trace(shapes, floor)
  reader = top_interpreter(trace, row_mask, jaxpr.invars[len(p_leaves):], walker=Reader)
  forward = forward_part(jaxpr, n_value)
  kinds = [identity_view(i, s) for i, s in enumerate(shapes)] + [DATA] * len(dyn_vals)
  try:
    reader.run(forward, jaxpr.constvars, jaxpr.invars, kinds)
  except NeedsEvaluation:
    return None
  # Before the inlined call below stages the whole jaxpr again: this walk's
  # per-equation bookkeeping is freed before that, not added to its peak.
  hint = data_as_weight(forward, len(p_leaves), argument_names(args, kwargs))
  inputs = set(jaxpr.constvars) | set(jaxpr.invars)
  values = [v for _, _, value, _, _ in reader.pending
            for v in (value if isinstance(value, tuple) else (value,))]
  needed = list(dict.fromkeys(v for v in values if isinstance(v, jc.Var) and v not in inputs))
  args_in = list(closed.consts) + p_leaves + dyn_vals
  outs = jc.call_inline(jc.with_outputs(jaxpr, needed), args_in, "value_grad_and_stats")
  n_out = len(jaxpr.outvars)
  env = dict(zip(list(jaxpr.constvars) + list(jaxpr.invars), args_in))
  env.update(zip(needed, outs[n_out:]))
  reader.resolve(env)
  stats, report = finalize(trace, reader.contributions, paths, shapes)
  value = tree_util.tree_unflatten(value_tree, outs[:n_value])
  return value, treedef.unflatten(outs[n_value:n_out]), stats, report, hint


def evaluate_differentiated(fun, has_aux, params, args, kwargs, embeddings, row_mask):
  """The evaluating route: ``jax.value_and_grad`` over ``capture_call``.

  Every parameter inside a higher-order primitive needs it; ``linen.apply``
  and ``nnx.apply`` are this route run inside the caller's own
  ``value_and_grad``.

  Returns:
    ``(value, grads, stats_leaves, report, hint)``, as ``capture_differentiated``.
  """
  found = []  # the report and hint are not arrays: they leave the trace on the side

  def inner(p):
    out, stats, report, hint = capture_core(fun, p, args, kwargs, embeddings, row_mask,
                                            check_order=True)
    found.append((report, hint))
    loss, aux = out if has_aux else (out, None)
    return loss, (aux, stats)

  (loss, (aux, stats)), grads = jax.value_and_grad(inner, has_aux=True)(params)
  value = (loss, aux) if has_aux else loss
  return (value, grads, stats) + found[-1]


def value_grad_and_stats(fun: Callable, has_aux: bool = False, *,
                         embeddings: bool | float = False) -> Callable:
  """Like ``jax.value_and_grad``, also returning AdaAct's statistics.

  ``fun(params, *args, **kwargs)`` is any JAX function whose first argument
  is the parameter pytree (Flax ``variables['params']``, the ``nnx.Param``
  state of ``nnx.split``, an ``eqx.filter``-ed model, Haiku params, a dict)
  and that returns a scalar loss (or ``(loss, aux)`` with ``has_aux``). The
  first argument is the one differentiated: a loss written ``fun(x, params)``
  whose other arguments hold the weights gets an ``ArgumentOrderWarning``. The
  returned function runs one forward pass and is jittable. Its jaxpr is
  ``jax.value_and_grad(fun)``'s plus a few equations per weight (see the
  module docstring for the fallback route).

  Statistics are read from the computation (see ``adaact_optax.capture``):
  every parameter that meets an activation in a ``dot_general`` or
  ``conv_general_dilated`` gets the mean of the squared input elements each
  of its elements multiplies, in the keep-rank layout (same rank as the
  parameter; size 1 along the axes the statistic does not vary along); a
  bias added to such a product (or to a part or a sum of such products,
  ``W_i x + W_h h + b``) gets ones; embedding tables used only by a
  lookup get token frequencies when ``embeddings`` is set. A weight that
  meets an activation but cannot be captured gets the ``(0,)``-shaped
  uncaptured marker and an ``UncapturedWeightWarning``.

  Args:
    fun: the loss function.
    has_aux: whether ``fun`` returns ``(loss, aux)``.
    embeddings: ``False``: lookup-only tables get no statistics; ``True``
      or a float floor: token frequencies plus the floor (see
      ``adaact_optax.moments.token_moments``). A table that also multiplies
      an activation (``Embed.attend``, a tied output ``h @ table.T``) gets
      that product's statistics (``(1, d)`` for attend) whatever
      ``embeddings`` is: its lookups are not counted.

  Returns:
    ``g(params, *args, row_mask=None, **kwargs) -> (value, grads, stats)``:
    ``value`` is the loss (``(loss, aux)`` with ``has_aux``), ``grads`` the
    gradient with respect to ``params``, ``stats`` a tree with ``params``'
    structure (``None`` where a parameter has no statistics), ready for
    ``tx.update(grads, opt_state, params, activation_stats=stats)``.
    ``row_mask`` (optional, float or bool, shape of the leading batch/time
    axes of the inputs) excludes padded rows from the statistics of every
    weight whose input carries those leading axes; a mask whose shape is no
    input's leading shape raises a ValueError (at trace time).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import adaact_optax
    >>> def loss(params, x):
    ...   return jnp.mean(jnp.tanh(x @ params["w"] + params["b"]) ** 2)
    >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    >>> _, grads, stats = adaact_optax.value_grad_and_stats(loss)(params, jnp.ones((4, 3)))
    >>> stats["w"].shape, stats["b"].shape
    ((3, 1), (1,))
  """
  def g(params, *args, row_mask=None, **kwargs):
    shapes = {alignment.path_name(k): jnp.shape(v)
              for k, v in tree_util.tree_flatten_with_path(params)[0]}
    route = capture_differentiated(fun, has_aux, params, args, kwargs, embeddings, row_mask)
    if route is None:
      route = evaluate_differentiated(fun, has_aux, params, args, kwargs, embeddings, row_mask)
    value, grads, stats, report, hint = route
    warn_uncaptured(report, shapes)
    warn_argument_order(hint, "value_grad_and_stats")
    return value, grads, jax.tree.structure(params).unflatten(stats)
  return g


def abstract_capture(fun, params, args, kwargs, embeddings):
  """``(stats_leaves as ShapeDtypeStructs, report, hint)`` of ``capture_core``, without FLOPs."""
  found = []  # the report and hint are not arrays: they leave the trace on the side
  dyn_vals, rebuild = split_dynamic(args, kwargs)

  def run(p, d):
    a, kw = rebuild(d)
    _, stats, report, hint = capture_core(fun, p, a, kw, embeddings, None, check_order=True)
    found.append((report, hint))
    return stats
  stats = jax.eval_shape(run, params, dyn_vals)
  return (stats,) + found[-1]


def stats_shapes(fun: Callable, params, *args, embeddings: bool | float = False, **kwargs):
  """Shapes of ``value_grad_and_stats(fun)``'s statistics, without FLOPs.

  Returns a tree with ``params``' structure and ``jax.ShapeDtypeStruct``
  leaves (``None`` where a parameter has no statistics; shape ``(0,)`` for
  an uncaptured weight), for ``adaact(..., stats_shapes=...)``: it sizes the
  optimizer state to the statistics' layout (which axes are input axes).

  Args:
    fun: the loss function, ``fun(params, *args, **kwargs)``.
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``).
    *args: ``fun``'s other positional arguments (arrays or shapes).
    embeddings: as for :func:`value_grad_and_stats`.
    **kwargs: ``fun``'s keyword arguments.

  Returns:
    The tree of shapes described above.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import adaact_optax
    >>> def loss(params, x):   # a grouped convolution: C=4 input channels, G=2 groups
    ...   y = jax.lax.conv_general_dilated(x, params["kernel"], (1, 1), "SAME",
    ...       dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2)
    ...   return jnp.mean(y ** 2)
    >>> params = {"kernel": jnp.ones((3, 3, 2, 6))}
    >>> shapes = adaact_optax.stats_shapes(loss, params, jnp.ones((1, 5, 5, 4)))
    >>> shapes["kernel"].shape
    (3, 3, 2, 2)
    >>> tx = adaact_optax.adaact(0.1, stats_shapes=shapes)
    >>> tx.init(params)[0].nu["kernel"].shape
    (3, 3, 2, 2)
  """
  stats, _, hint = abstract_capture(fun, params, args, kwargs, embeddings)
  warn_argument_order(hint, "stats_shapes")
  return jax.tree.unflatten(jax.tree.structure(params), stats)


def coverage(fun: Callable, params, *args, embeddings: bool | float = False,
             **kwargs) -> CoverageReport:
  """Which parameters of ``fun(params, *args, **kwargs)`` get statistics, and why not.

  Traces ``fun`` abstractly (no FLOPs, no ``UncapturedWeightWarning``: the
  report lists those weights; an ``ArgumentOrderWarning`` when ``fun``'s
  first argument looks like data). ``print(report)``
  gives a table; ``report.unmatched`` maps each uncaptured weight's path to
  the reason.

  Args:
    fun: the loss function, ``fun(params, *args, **kwargs)``.
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``).
    *args: ``fun``'s other positional arguments (arrays or shapes).
    embeddings: as for :func:`value_grad_and_stats`.
    **kwargs: ``fun``'s keyword arguments.

  Returns:
    A :class:`CoverageReport`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adaact_optax
    >>> def loss(params, x):
    ...   return params["scale"] * jnp.mean(jnp.tanh(x @ params["w"] + params["b"]) ** 2)
    >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2), "scale": jnp.ones(())}
    >>> print(adaact_optax.coverage(loss, params, jnp.ones((4, 3))))
    AdaAct coverage: 2 with statistics, 0 uncaptured, 1 without
      ok    b  (1,)
      ok    w  (3, 1)
      --    scale
  """
  _, report, hint = abstract_capture(fun, params, args, kwargs, embeddings)
  warn_argument_order(hint, "coverage")
  return report
