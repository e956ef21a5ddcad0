"""Flax Linen adapter: captures AdaAct's statistics from an unmodified model.

``capture()`` intercepts every ``nn.Dense``, ``nn.DenseGeneral`` and
``nn.Conv`` call (via ``flax.linen.intercept_methods``) and writes the
input's second moments into the mutable collection ``COLLECTION``, at the
same paths as the layer's ``kernel`` and ``bias``. ``apply`` wraps
``model.apply`` with it. Layers under ``nn.scan``/``nn.vmap`` need
``COLLECTION`` in ``variable_axes`` like ``'params'``, so their statistics
stack like their parameters.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any

import flax.linen as nn
import jax
from flax.core.scope import union_filters
from flax.linen.linear import canonicalize_padding

from adaact_optax import moments

COLLECTION = "adaact_stats"

# Rows already pooled per (scope, leaf) in the current capture, so a layer
# applied several times averages over all its rows. Row counts are static.
_rows_seen: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "adaact_rows_seen", default=None)
# The token-frequency floor while nn.Embed is captured, None while it is not.
_embedding_floor: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "adaact_embedding_floor", default=None)


def _as_tuple(value, rank):
  if value is None:
    value = 1
  return (value,) * rank if isinstance(value, int) else tuple(value)


def embedding_floor(embeddings: bool | float) -> float | None:
  """The ``embeddings=`` flag as a floor: False -> None (unmatched), True -> default."""
  if embeddings is True:
    return moments.EMBEDDING_FLOOR
  if embeddings is False or embeddings is None:
    return None
  if not embeddings >= 0:
    raise ValueError(f"embeddings must be a bool or a floor >= 0, got {embeddings!r}")
  return float(embeddings)


def layer_moments(module: nn.Module, x: jax.Array, *, embeddings: bool | float = False
                  ) -> dict[str, moments.InputMoments]:
  """Statistics of one supported Linen layer's input, keyed by parameter name.

  Returns ``{}`` for modules AdaAct does not scale (``nn.Embed`` unless
  ``embeddings``: see ``capture``).
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
    kernel = conv_layer_moments(module, x)
  else:
    return {}
  return with_bias(kernel, module.use_bias)


def conv_layer_moments(layer, x: jax.Array) -> moments.InputMoments:
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
      padding=canonicalize_padding(layer.padding, rank),
      input_dilation=_as_tuple(layer.input_dilation, rank),
      kernel_dilation=_as_tuple(layer.kernel_dilation, rank))


def with_bias(kernel: moments.InputMoments, use_bias: bool) -> dict[str, moments.InputMoments]:
  """``{'kernel': kernel}``, plus the bias's constant-input statistic if it has one."""
  out = {"kernel": kernel}
  if use_bias:
    out["bias"] = moments.constant_moments(kernel.rows)
  return out


def _record(module: nn.Module, name: str, stat: moments.InputMoments, seen: dict):
  # Each call of a shared layer gets a fresh scope object, so key by path. A
  # leaf this apply has not written yet (stale input or a re-trace) starts over.
  key = (module.scope.path, name)
  if module.has_variable(COLLECTION, name) and key in seen:
    previous = moments.InputMoments(module.get_variable(COLLECTION, name), seen[key])
    stat = moments.combine(previous, stat)
  seen[key] = stat.rows
  module.put_variable(COLLECTION, name, stat.mean)


def _interceptor(next_fun, args, kwargs, context):
  module = context.module
  seen = _rows_seen.get()
  floor = _embedding_floor.get()
  layers = (nn.Dense, nn.DenseGeneral, nn.Conv) + ((nn.Embed,) if floor is not None else ())
  if (seen is None or context.method_name != "__call__"
      or not isinstance(module, layers)
      or module.is_initializing() or not module.is_mutable_collection(COLLECTION)):
    return next_fun(*args, **kwargs)
  x = args[0] if args else kwargs["inputs"]
  out = next_fun(*args, **kwargs)
  embeddings = False if floor is None else floor
  for name, stat in layer_moments(module, x, embeddings=embeddings).items():
    _record(module, name, stat, seen)
  return out


@contextlib.contextmanager
def capture(embeddings: bool | float = False):
  """Context manager: supported layers write statistics into ``COLLECTION``.

  Only while ``COLLECTION`` is mutable (``model.apply(..., mutable=[COLLECTION])``);
  enter it inside the traced (jitted) function. ``nn.Embed`` tables are
  unmatched unless ``embeddings``: ``True`` records token frequencies plus
  ``moments.EMBEDDING_FLOOR``, a float sets the floor (``moments.token_moments``).
  """
  token = _rows_seen.set({})
  floor_token = _embedding_floor.set(embedding_floor(embeddings))
  try:
    with nn.intercept_methods(_interceptor):
      yield
  finally:
    _embedding_floor.reset(floor_token)
    _rows_seen.reset(token)


def apply(model: nn.Module, variables, *args, mutable=False, embeddings: bool | float = False,
          **kwargs):
  """``model.apply`` under ``capture(embeddings)``; returns ``(output, mutated_variables)``.

  ``mutated_variables[COLLECTION]`` mirrors ``variables['params']`` for every
  captured layer and is what ``tx.update(..., activation_stats=...)`` takes.
  Other mutable collections (``'batch_stats'``, ...) come back as usual.
  """
  variables = {k: v for k, v in variables.items() if k != COLLECTION}
  with capture(embeddings):
    out, mutated = model.apply(variables, *args, mutable=union_filters(mutable, COLLECTION),
                               **kwargs)
  mutated = dict(mutated)
  mutated.setdefault(COLLECTION, {})
  return out, mutated


def stats_shapes(model: nn.Module, variables, *args, **kwargs) -> Any:
  """Shapes of the statistics tree (``jax.ShapeDtypeStruct`` leaves), no FLOPs.

  Pass it as ``stats_shapes=`` to ``adaact``/``scale_by_adaact`` when a model
  has grouped convolutions, so ``init`` sizes their state per input channel.
  """
  return jax.eval_shape(lambda: apply(model, variables, *args, **kwargs)[1][COLLECTION])
