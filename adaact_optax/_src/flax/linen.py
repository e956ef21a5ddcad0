"""Implementation of ``adaact_optax.linen`` (the public module re-exports it; its docstring is the documentation)."""

from __future__ import annotations

import contextlib
import contextvars
import sys
from typing import Any

import warnings

import flax.linen as nn
import jax

from adaact_optax._src.capture import api as _capture_api
from adaact_optax._src.capture import report as _capture_report
from adaact_optax._src import alignment, moments

# The Flax variable collection, ``"adaact_stats"``, in which ``apply`` returns the statistics.
# ``mutated[COLLECTION]`` is the statistics tree, keyed like the params.
COLLECTION = "adaact_stats"

# Rows already pooled per (scope, leaf) in the current capture, so a layer
# applied several times averages over all its rows. Row counts are static.
_rows_seen: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "adaact_rows_seen", default=None)
# apply()'s row_mask while it runs, for sow_input.
_row_mask: contextvars.ContextVar[Any] = contextvars.ContextVar("adaact_row_mask", default=None)
# The token-frequency floor while nn.Embed is captured, None while it is not.
_embedding_floor: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "adaact_embedding_floor", default=None)


def _as_tuple(value, rank):
  if value is None:
    value = 1
  return (value,) * rank if isinstance(value, int) else tuple(value)


embedding_floor = _capture_api.embedding_floor


def _padding(padding, rank):
  """A Linen conv's ``padding`` attribute as ``moments.conv_moments`` takes it."""
  if isinstance(padding, str) or isinstance(padding, int):
    return padding
  return tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)


def layer_moments(module: nn.Module, x: jax.Array, *, embeddings: bool | float = False
                  ) -> dict[str, moments.InputMoments]:
  """Statistics of one supported Linen layer's input, keyed by parameter name.

  Returns ``{}`` for modules AdaAct does not scale (``nn.Embed`` unless
  ``embeddings``: see ``capture``).

  Args:
    module: a bound or unbound ``nn.Dense``, ``nn.DenseGeneral``, ``nn.Conv``
      or ``nn.Embed``.
    x: the layer's input.
    embeddings: as for ``capture``.

  Returns:
    ``{parameter name: moments.InputMoments}`` in the 0.1.0 layout (a Dense
    kernel's mean is ``(in,)``, a bias's a scalar).

  Examples:
    >>> import flax.linen as nn
    >>> import jax.numpy as jnp
    >>> from adaact_optax import linen as aa_linen
    >>> stats = aa_linen.layer_moments(nn.Dense(2), jnp.ones((4, 3)))
    >>> {name: (m.mean.shape, m.rows) for name, m in stats.items()}
    {'kernel': ((3,), 4), 'bias': ((), 4)}
  """
  if isinstance(module, nn.Embed):
    floor = embedding_floor(embeddings)
    return {} if floor is None else {
        "embedding": moments.token_moments(x, module.num_embeddings, floor)}
  if isinstance(module, nn.Dense):
    kernel = moments.dense_moments(x)
  elif isinstance(module, nn.DenseGeneral):
    axis = _as_tuple(module.axis, 1)
    kernel = moments.dense_moments(x, axis, _as_tuple(module.batch_dims, 1) if module.batch_dims else ())
  elif isinstance(module, nn.Conv):
    kernel = _conv_layer_moments(module, x)
  else:
    return {}
  return _with_bias(kernel, module.use_bias)


def _conv_layer_moments(layer, x: jax.Array) -> moments.InputMoments:
  """``moments.conv_moments`` configured from a conv layer's attributes.

  Shared by the Linen and NNX adapters: ``nn.Conv`` and ``nnx.Conv`` name
  their settings alike (``kernel_size``, ``strides``, ``padding``,
  ``input_dilation``, ``kernel_dilation``).
  """
  size = _as_tuple(layer.kernel_size, 1)
  rank = len(size)
  return moments.conv_moments(
      x, size,
      strides=_as_tuple(layer.strides, rank),
      padding=_padding(layer.padding, rank),
      input_dilation=_as_tuple(layer.input_dilation, rank),
      kernel_dilation=_as_tuple(layer.kernel_dilation, rank))


def _with_bias(kernel: moments.InputMoments, use_bias: bool) -> dict[str, moments.InputMoments]:
  """``{'kernel': kernel}``, plus the bias's constant-input statistic if it has one."""
  out = {"kernel": kernel}
  if use_bias:
    out["bias"] = moments.constant_moments(kernel.rows)
  return out


def _record(module: nn.Module, name: str, stat: moments.InputMoments, seen: dict):
  # Each call of a shared layer gets a fresh scope object, so key by path. A
  # leaf this apply has not written yet (stale input or a re-trace) starts over.
  assert module.scope is not None  # a bound module (apply / the interceptor)
  key = (module.scope.path, name)
  if module.has_variable(COLLECTION, name) and key in seen:
    previous = moments.InputMoments(module.get_variable(COLLECTION, name), seen[key])
    stat = moments.combine(previous, stat)
  seen[key] = stat.rows
  module.put_variable(COLLECTION, name, stat.mean)


def _record_attend(module: nn.Embed, query: jax.Array, seen: dict):
  """``Embed.attend(query)`` is ``query @ table.T``: the table's input axis is its last
  (features), so its statistic is the keep-rank ``(1, features)`` mean of ``query**2``.
  As in ``apply``, it replaces the table's lookup frequencies (``embeddings=``)."""
  assert module.scope is not None  # a bound module (apply / the interceptor)
  if ("attend", module.scope.path) not in seen:  # the first attend: lookups recorded so far go
    seen[("attend", module.scope.path)] = 0
    seen.pop((module.scope.path, "embedding"), None)
  stat = moments.dense_moments(query)
  _record(module, "embedding", moments.InputMoments(stat.mean[None, :], stat.rows), seen)


# Set by capture() while its block runs: {"traced": True} once a module method ran.
_capture_block: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "adaact_capture_block", default=None)
# (file, line) of the `with capture():` statements whose block traced a module
# once: a later run of the same statement that traces nothing reuses that trace.
_traced_capture_sites: set = set()


def _interceptor(next_fun, args, kwargs, context):
  module = context.module
  seen = _rows_seen.get()
  floor = _embedding_floor.get()
  block = _capture_block.get()
  if block is not None:
    block["traced"] = True
  layers = (nn.Dense, nn.DenseGeneral, nn.Conv) + ((nn.Embed,) if floor is not None else ())
  if (seen is None or module.is_initializing() or not module.is_mutable_collection(COLLECTION)):
    return next_fun(*args, **kwargs)
  if isinstance(module, nn.Embed) and context.method_name == "attend":
    out = next_fun(*args, **kwargs)
    _record_attend(module, args[0] if args else kwargs["query"], seen)
    return out
  if context.method_name != "__call__":
    return next_fun(*args, **kwargs)
  if not isinstance(module, layers):
    out = next_fun(*args, **kwargs)
    own = module.variables.get("params", {})
    if (not isinstance(module, (nn.Embed, nn.LayerNorm, nn.BatchNorm, nn.GroupNorm, nn.RMSNorm))
        and any(not hasattr(v, "items") for v in own.values())
        and ("warned", module.scope.path) not in seen):
      seen[("warned", module.scope.path)] = 0
      warnings.warn(_capture_report.UncapturedWeightWarning(
          f"adaact_optax.linen.capture() does not see into the {type(module).__name__} at "
          f"'{'/'.join(module.scope.path)}': its parameters get no statistics. Use "
          "adaact_optax.linen.apply(model, variables, x), which captures any layer."),
          stacklevel=2)
    return out
  x = args[0] if args else kwargs["inputs"]
  out = next_fun(*args, **kwargs)
  if isinstance(module, nn.Embed) and ("attend", module.scope.path) in seen:
    return out  # a tied table: its attend statistics win over the lookups
  embeddings = False if floor is None else floor
  for name, stat in layer_moments(module, x, embeddings=embeddings).items():
    _record(module, name, stat, seen)
  return out


@contextlib.contextmanager
def capture(embeddings: bool | float = False):
  """Context manager: supported layers write statistics into ``COLLECTION``.

  Only while ``COLLECTION`` is mutable (``model.apply(..., mutable=[COLLECTION])``);
  enter it inside the traced (jitted) function. ``nn.Embed`` lookups are
  unmatched unless ``embeddings``: ``True`` records token frequencies plus
  ``moments.EMBEDDING_FLOOR``, a float sets the floor (``moments.token_moments``).
  ``Embed.attend`` records the mean of its query's square, keep-rank
  ``(1, features)`` (no 0.1.0 form), and a table it uses gets those
  statistics alone, whatever ``embeddings`` is, as with ``apply``.
  The older path: ``apply`` sees every weight and returns the keep-rank layout.

  Around an already-traced ``jax.jit`` function (JAX reuses the compiled
  function without running the modules, so ``COLLECTION`` comes back empty)
  the block warns (``UncapturedWeightWarning``, on exit) that no module ran,
  unless the same ``with`` statement traced the function before.

  Args:
    embeddings: ``False``, ``True`` or a float floor, as above.

  Raises:
    ValueError: if ``embeddings`` is neither a bool nor a float >= 0.

  Examples:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> from adaact_optax import linen as aa_linen
    >>> dense = nn.Dense(2)
    >>> variables = dense.init(jax.random.key(0), jnp.ones((4, 3)))
    >>> with aa_linen.capture():   # inside your own jitted function, around model.apply
    ...   _, mutated = dense.apply(variables, jnp.ones((4, 3)), mutable=[aa_linen.COLLECTION])
    >>> {k: v.shape for k, v in mutated[aa_linen.COLLECTION].items()}   # the 0.1.0 layout
    {'kernel': (3,), 'bias': ()}
  """
  token = _rows_seen.set({})
  floor_token = _embedding_floor.set(embedding_floor(embeddings))
  block: dict = {}
  block_token = _capture_block.set(block)
  site = _caller_site()
  try:
    with nn.intercept_methods(_interceptor):
      yield
  finally:
    _capture_block.reset(block_token)
    _embedding_floor.reset(floor_token)
    _rows_seen.reset(token)
  _warn_if_nothing_traced(block, site)


def _caller_site():
  """``(file, line)`` of the ``with capture():`` statement (None if unknown)."""
  try:
    frame = sys._getframe(3)  # pylint: disable=protected-access
  except ValueError:
    return None
  return frame.f_code.co_filename, frame.f_lineno


def _warn_if_nothing_traced(block: dict, site):
  """Warns when no Linen module ran inside a ``capture()`` block: the block
  called code traced elsewhere (a ``jax.jit`` cache hit), whose statistics
  collection is empty unless it was traced inside this same statement before."""
  if block.get("traced"):
    if site is not None:
      _traced_capture_sites.add(site)
    return
  if site is not None and site in _traced_capture_sites:
    return
  warnings.warn(_capture_report.UncapturedWeightWarning(
      f"adaact_optax.linen.capture(): no Linen module ran inside this `with` block, so "
      f"nothing was written to the '{COLLECTION}' collection: model.apply(..., "
      f"mutable=['{COLLECTION}']) returns it empty ({{}}). A function jitted and traced "
      "outside the block is reused from JAX's cache without running its modules again. Use "
      "adaact_optax.linen.apply(model, variables, x) inside the function you jit (it needs "
      "no context manager), or enter capture() inside the jitted function, around "
      "model.apply."), stacklevel=4)


def _with_collection(mutable):
  """``model.apply``'s ``mutable`` argument with ``COLLECTION`` added."""
  if mutable is True:
    return True
  if mutable is False or mutable is None:
    return [COLLECTION]
  if isinstance(mutable, str):
    return [mutable, COLLECTION]
  if isinstance(mutable, (list, tuple)):
    return [*mutable, COLLECTION]
  raise TypeError(f"adaact_optax.linen.apply: mutable must be a bool, a collection name or a "
                  f"list of names, got {mutable!r}")


def _nested(flat: dict) -> dict:
  """``{'a/b': x}`` -> ``{'a': {'b': x}}``."""
  out: dict = {}
  for path, leaf in flat.items():
    node = out
    *head, last = path.split("/")
    for key in head:
      node = node.setdefault(key, {})
    node[last] = leaf
  return out


def _flat(tree) -> dict:
  return {alignment.path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def apply(model: nn.Module, variables, *args, mutable=False, embeddings: bool | float = False,
          row_mask=None, **kwargs):
  """``model.apply`` with AdaAct's statistics; returns ``(output, mutated_variables)``.

  ``mutated_variables[COLLECTION]`` mirrors ``variables['params']`` for every
  parameter with statistics (keep-rank float32 leaves: a Dense kernel
  ``(in, out)`` gets ``(in, 1)``, a Conv kernel ``(kh, kw, C, O)`` gets
  ``(kh, kw, C, 1)``, a bias ``(1,)`` of ones; the ``(0,)`` marker for a
  weight seen but not captured, with an ``UncapturedWeightWarning``). It is
  what ``tx.update(..., activation_stats=...)`` takes. Other mutable
  collections (``'batch_stats'``, ...) come back as usual. Jittable; call it
  inside the function you differentiate.

  Args:
    model: the Linen module.
    variables: its variables (``{'params': ..., 'batch_stats': ...}``).
    *args: as for ``model.apply``.
    **kwargs: as for ``model.apply`` (``rngs=``, ``method=``, flags).
    mutable: as for ``model.apply``.
    embeddings: ``nn.Embed`` tables used only for lookups get no statistics
      by default; ``True`` (or a float floor) gives them token frequencies
      plus a floor (``moments.token_moments``). A table also used by
      ``Embed.attend`` (tied) gets attend's ``(1, features)`` statistics
      whatever ``embeddings`` is: its lookups are not counted.
    row_mask: optional weights (e.g. 0/1 padding mask) of shape equal to the
      leading axes of the model's inputs (batch, or batch x time); rows with
      weight 0 do not count in the statistics of layers whose input carries
      those leading axes. A mask of any other shape is a ValueError.

  Returns:
    ``(output, mutated_variables)`` as ``model.apply(..., mutable=...)``
    returns them, with the statistics under ``COLLECTION``.

  Raises:
    TypeError: if ``mutable`` is not a bool, a collection name or a list.
    ValueError: if ``row_mask``'s shape is the leading shape of none of the
      inputs (at trace time).

  Examples:
    >>> import flax.linen as nn
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from adaact_optax import linen as aa_linen
    >>> model, x = nn.Dense(2), jnp.ones((4, 3))
    >>> variables = model.init(jax.random.key(0), x)
    >>> y, mutated = aa_linen.apply(model, variables, x)
    >>> jax.tree.map(jnp.shape, mutated[aa_linen.COLLECTION])
    {'bias': (1,), 'kernel': (3, 1)}
  """
  variables = {k: v for k, v in variables.items() if k != COLLECTION}
  params = variables.get("params", {})
  rest = {k: v for k, v in variables.items() if k != "params"}
  mut = _with_collection(mutable)

  def fun(p, rest, *args, **kwargs):
    token = _rows_seen.set({})  # for sow_input's pooling of repeated calls
    mask_token = _row_mask.set(row_mask)
    try:
      return model.apply({"params": p, **rest}, *args, mutable=mut, **kwargs)
    finally:
      _row_mask.reset(mask_token)
      _rows_seen.reset(token)

  (out, mutated), leaves, report = _capture_api.capture_call(
      fun, params, (rest, *args), kwargs, embeddings=embeddings, row_mask=row_mask)
  mutated = dict(mutated)
  sown = _flat(mutated.get(COLLECTION, {}))
  paths = list(_flat(params))
  stats = {path: leaf for path, leaf in zip(paths, leaves) if leaf is not None}
  stats.update(sown)
  _capture_report.warn_uncaptured(report, {p: x.shape for p, x in _flat(params).items()},
                           skip=set(sown))
  mutated[COLLECTION] = _nested(stats)
  return out, mutated


def stats_shapes(model: nn.Module, variables, *args, **kwargs) -> Any:
  """Shapes of ``apply``'s statistics tree (``jax.ShapeDtypeStruct`` leaves), no FLOPs.

  Pass it as ``stats_shapes=`` to ``adaact``/``scale_by_adaact``: it sizes the
  optimizer's state to the statistics' layout (grouped convolutions, (out, in)
  kernels, ``Embed.attend`` tables, per-block fused projections).

  Args:
    model: the Linen module.
    variables: its variables (arrays or ``jax.ShapeDtypeStruct``).
    *args: as for :func:`apply`.
    **kwargs: as for :func:`apply`.

  Returns:
    The statistics tree of :func:`apply`, with ``jax.ShapeDtypeStruct`` leaves.

  Examples:
    >>> import flax.linen as nn
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import adaact_optax
    >>> from adaact_optax import linen as aa_linen
    >>> model, x = nn.Conv(6, (3, 3), feature_group_count=2), jnp.ones((1, 5, 5, 4))
    >>> variables = model.init(jax.random.key(0), x)
    >>> shapes = aa_linen.stats_shapes(model, variables, x)
    >>> shapes["kernel"].shape                  # kernel (3, 3, 2, 6): (kh, kw, C/G, G)
    (3, 3, 2, 2)
    >>> tx = adaact_optax.adaact(0.1, stats_shapes=shapes)
  """
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", _capture_report.UncapturedWeightWarning)
    arrays, rebuild = _capture_api.split_dynamic(args, kwargs)

    def stats(variables, arrays):
      a, kw = rebuild(arrays)
      return apply(model, variables, *a, **kw)[1][COLLECTION]
    # Variables and inputs may be abstract (jax.ShapeDtypeStruct).
    return jax.eval_shape(stats, variables, arrays)


def sow_input(module: nn.Module, name: str, x: jax.Array, *, x_axes=(-1,), param_axes=(0,)):
  """Records, from inside a custom layer, the input that its parameter ``name`` multiplies.

  For layers whose weight the capture cannot follow to a matmul (a quantized
  kernel dequantised before use, a weight computed by arithmetic): call it in
  the layer's ``__call__`` with the activation the weight multiplies. The
  statistic (mean of ``x**2`` over every axis but ``x_axes``, laid over the
  parameter's ``param_axes``; repeated calls pool their rows; ``apply``'s
  ``row_mask`` weights the rows when ``x`` carries its leading axes) goes into
  ``COLLECTION`` at the parameter's path, and ``apply`` then uses it instead
  of warning. Does nothing unless ``COLLECTION`` is mutable (outside
  ``apply``/``capture``) or while initialising.

  Args:
    module: the layer (``self``).
    name: the parameter's name in the layer (e.g. ``"kernel"``).
    x: the layer's input.
    x_axes: the axes of ``x`` the parameter contracts.
    param_axes: the parameter's axes that multiply ``x_axes``, in the same order.

  Examples:
    >>> import flax.linen as nn
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from adaact_optax import linen as aa_linen
    >>> class MaskedDense(nn.Module):     # the mask hides the kernel from the capture
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     kernel = self.param("kernel", nn.initializers.ones, (x.shape[-1], 3))
    ...     aa_linen.sow_input(self, "kernel", x)
    ...     return x @ (kernel * jnp.tril(jnp.ones_like(kernel)))
    >>> model, x = MaskedDense(), jnp.full((4, 3), 2.0)
    >>> _, mutated = aa_linen.apply(model, model.init(jax.random.key(0), x), x)
    >>> mutated[aa_linen.COLLECTION]["kernel"].ravel().tolist()
    [4.0, 4.0, 4.0]
  """
  seen = _rows_seen.get()
  if seen is None or module.is_initializing() or not module.is_mutable_collection(COLLECTION):
    return
  shape: tuple[int, ...] = module.get_variable("params", name).shape
  _record(module, name, moments.input_moments(x, x_axes, param_axes, shape, _row_mask.get()),
          seen)
