"""Implementation of ``adaact_optax.nnx`` (the public module re-exports it; its docstring is the documentation)."""

from __future__ import annotations

import contextvars
import warnings
from typing import Any

import jax
from flax import nnx

from adaact_optax._src.capture import api as _capture_api
from adaact_optax._src.capture import report as _capture_report
from adaact_optax._src import alignment, moments


class _SowRecorder:
  """Statistics recorded by ``sow_input`` during one ``apply``, pooled per Variable."""

  def __init__(self, row_mask=None):
    self.row_mask = row_mask   # apply()'s row_mask: weights the rows of sown inputs
    self.stats: dict[int, tuple[Any, moments.InputMoments]] = {}

  def record(self, variable, stat: moments.InputMoments):
    if id(variable) in self.stats:
      stat = moments.combine(self.stats[id(variable)][1], stat)
    self.stats[id(variable)] = (variable, stat)

  def by_path(self, model, wrt) -> dict:
    paths = {id(v): alignment.path_name(p) for p, v in nnx.to_flat_state(nnx.state(model, wrt))}
    return {paths[i]: s.mean for i, (_, s) in self.stats.items() if i in paths}


_recorder: contextvars.ContextVar[_SowRecorder | None] = contextvars.ContextVar(
    "adaact_nnx_sow", default=None)


def sow_input(module: nnx.Module, name: str, x: jax.Array, *, x_axes=(-1,), param_axes=(0,)):
  """Records, from inside a custom layer, the input that its parameter ``name`` multiplies.

  The NNX twin of ``adaact_optax.linen.sow_input``: call it in the layer's
  ``__call__`` with the activation the weight multiplies; ``apply`` then uses
  this statistic (mean of ``x**2`` over every axis but ``x_axes``, laid over
  the parameter's ``param_axes``; ``apply``'s ``row_mask`` weights the rows
  when ``x`` carries its leading axes) instead of warning that the weight could
  not be captured. Does nothing outside ``apply``.

  Args:
    module: the layer (``self``).
    name: the attribute holding the parameter (e.g. ``"kernel"``).
    x: the activation the parameter multiplies.
    x_axes: the axes of ``x`` the parameter contracts.
    param_axes: the parameter's axes that multiply ``x_axes``, in the same order.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import adaact_optax
    >>> class MaskedLinear(nnx.Module):   # the mask hides the kernel from the capture
    ...   def __init__(self):
    ...     self.kernel = nnx.Param(jnp.ones((3, 3)))
    ...   def __call__(self, x):
    ...     adaact_optax.nnx.sow_input(self, "kernel", x)
    ...     return x @ (self.kernel[...] * jnp.tril(jnp.ones((3, 3))))
    >>> _, stats = adaact_optax.nnx.apply(MaskedLinear(), jnp.full((4, 3), 2.0))
    >>> stats["kernel"][...].ravel().tolist()
    [4.0, 4.0, 4.0]
  """
  recorder = _recorder.get()
  if recorder is None:
    return
  variable = getattr(module, name)
  recorder.record(variable, moments.input_moments(x, x_axes, param_axes, variable.shape,
                                                  recorder.row_mask))


def _key(k):
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return getattr(k, attr)
  return k


def apply(model: nnx.Module, *args, embeddings: bool | float = False, row_mask=None,
          wrt=nnx.Param, **kwargs):
  """Runs ``model(*args, **kwargs)``; returns ``(output, activation_stats)``.

  ``activation_stats`` is an ``nnx.State`` with one keep-rank float32 leaf per
  parameter with statistics, at its path in ``nnx.state(model, wrt)``: an
  ``nnx.Linear`` kernel ``(in, out)`` gets ``(in, 1)``, a ``Conv`` kernel
  ``(kh, kw, C, O)`` gets ``(kh, kw, C, 1)`` (``(kh, kw, C/G, G)`` when
  grouped), a bias ``(1,)`` of ones. Pass it to
  ``optimizer.update(model, grads, activation_stats=...)``. Repeated uses of
  a layer pool all their rows.

  Args:
    model: an NNX module.
    *args: the model's positional arguments.
    **kwargs: the model's keyword arguments.
    embeddings: ``nnx.Embed`` tables used only for lookups get no statistics
      by default; ``True`` (or a float floor) gives them token frequencies
      plus a floor (see ``moments.token_moments``). A table also used by
      ``Embed.attend`` (tied) gets attend's ``(1, features)`` statistics
      whatever ``embeddings`` is: its lookups are not counted.
    row_mask: optional weights of the inputs' leading (batch, or batch x
      time) axes; rows with weight 0 do not count (padding). A mask of any
      other shape is a ValueError.
    wrt: the parameters to capture (a filter, as ``nnx.Optimizer``'s
      ``wrt``). It need not match the optimizer's: AdaAct ignores the
      statistics of parameters outside the tree it updates, so with
      ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` the default captures
      the frozen base kernels too, and ``wrt=nnx.LoRAParam`` only skips that
      work.

  Returns:
    ``(output, activation_stats)``.

  Raises:
    ValueError: if ``row_mask``'s shape is the leading shape of none of the
      inputs (at trace time).

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import adaact_optax
    >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> y, stats = adaact_optax.nnx.apply(model, jnp.ones((4, 3)))
    >>> jax.tree.map(jnp.shape, nnx.to_pure_dict(stats))
    {'bias': (1,), 'kernel': (3, 1)}
  """
  graphdef, params, rest = nnx.split(model, wrt, ...)  # type: ignore[misc]  # two filters: three parts

  def fun(p, rest, *args, **kwargs):
    m = nnx.merge(graphdef, p, rest)
    recorder = _SowRecorder(row_mask)
    token = _recorder.set(recorder)
    try:
      out = m(*args, **kwargs)
    finally:
      _recorder.reset(token)
    _, _, new_rest = nnx.split(m, wrt, ...)
    return out, new_rest, recorder.by_path(m, wrt)

  (out, new_rest, sown), leaves, report = _capture_api.capture_call(
      fun, params, (rest, *args), kwargs, embeddings=embeddings, row_mask=row_mask)
  nnx.update(model, new_rest)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  stats, shapes = {}, {}
  for (path, x), leaf in zip(flat, leaves):
    name = alignment.path_name(path)
    shapes[name] = x.shape
    keys = tuple(_key(k) for k in path if not (
        isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value"))
    if name in sown:
      stats[keys] = sown[name]
    elif leaf is not None:
      stats[keys] = leaf
  _capture_report.warn_uncaptured(report, shapes, skip=set(sown))
  return out, nnx.from_flat_state(stats)


def stats_shapes(model: nnx.Module, *args, **kwargs) -> nnx.State:
  """Shapes of ``apply``'s statistics (``jax.ShapeDtypeStruct`` leaves), no FLOPs.

  Pass it as ``stats_shapes=`` to ``adaact``/``scale_by_adaact``: it sizes the
  optimizer's state to the statistics' layout (grouped convolutions, (out, in)
  kernels, ``Embed.attend`` tables, per-block fused projections). The model is
  not modified (its batch statistics, RNG counters... are untouched).

  Args:
    model: an NNX module.
    *args: as for :func:`apply`.
    **kwargs: as for :func:`apply`.

  Returns:
    An ``nnx.State`` like :func:`apply`'s statistics, with
    ``jax.ShapeDtypeStruct`` leaves.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import adaact_optax
    >>> model = nnx.Conv(4, 6, (3, 3), feature_group_count=2, rngs=nnx.Rngs(0))
    >>> shapes = adaact_optax.nnx.stats_shapes(model, jnp.ones((1, 5, 5, 4)))
    >>> shapes["kernel"].shape                  # kernel (3, 3, 2, 6): (kh, kw, C/G, G)
    (3, 3, 2, 2)
    >>> optimizer = nnx.Optimizer(model, adaact_optax.adaact(0.1, stats_shapes=shapes),
    ...                           wrt=nnx.Param)
  """
  graphdef, state = nnx.split(model)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", _capture_report.UncapturedWeightWarning)
    arrays, rebuild = _capture_api.split_dynamic(args, kwargs)

    def stats(state, arrays):
      a, kw = rebuild(arrays)
      return apply(nnx.merge(graphdef, state), *a, **kw)[1]
    return jax.eval_shape(stats, state, arrays)
