"""Flax NNX adapter: captures AdaAct's statistics from an unmodified NNX model.

``apply(model, *args)`` runs ``model(*args)`` while every ``nnx.Linear``,
``nnx.LinearGeneral`` and ``nnx.Conv`` call (and ``nnx.Embed``, with
``embeddings=``) records its input's second moments, and returns them as an
``nnx.State`` at the paths of ``nnx.state(model, nnx.Param)``. NNX has no
method interception, so for the duration of the call these classes'
``__call__`` is wrapped (and restored afterwards, even on error); a subclass
is captured when its ``__call__`` reaches the base class's.

Layers called inside NNX transforms nested in the forward pass
(``nnx.scan``, ``nnx.vmap``, ``nnx.remat``) see copies of their
parameters and are reported as an error; apply those transforms outside
``apply`` (``nnx.jit``, ``nnx.grad`` and ``nnx.value_and_grad`` around it
are fine).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import threading
from typing import Any

import jax
from flax import nnx

from adaact_optax import linen as _linen
from adaact_optax import moments


def _linear(layer, x):
  return _linen.with_bias(moments.dense_moments(x), layer.use_bias)


def _linear_general(layer, x):
  # Kernel (*batch_axis sizes, *in_features, *out_features): the statistics
  # are (*batch, *contracted), as moments.dense_moments orders them.
  kernel = moments.dense_moments(x, layer.axis, tuple(layer.batch_axis.keys()))
  return _linen.with_bias(kernel, layer.use_bias)


def _conv(layer, x):
  return _linen.with_bias(_linen.conv_layer_moments(layer, x), layer.use_bias)


# The layers AdaAct scales and how each one's input becomes statistics.
_LAYERS = {nnx.Linear: _linear, nnx.LinearGeneral: _linear_general, nnx.Conv: _conv}


def layer_moments(layer: nnx.Module, x: jax.Array, *, embeddings: bool | float = False
                  ) -> dict[str, moments.InputMoments]:
  """Statistics of one supported NNX layer's input, keyed by parameter name.

  Returns ``{}`` for layers AdaAct does not scale (``nnx.Embed`` unless
  ``embeddings``; see ``apply``).
  """
  floor = _linen.embedding_floor(embeddings)
  if isinstance(layer, nnx.Embed):
    return {} if floor is None else {
        "embedding": moments.token_moments(x, layer.num_embeddings, floor)}
  for cls, fn in _LAYERS.items():
    if isinstance(layer, cls):
      return fn(layer, x)
  return {}


class _Recorder:
  """Statistics of every captured call, pooled per layer instance."""

  def __init__(self, embeddings: bool | float):
    _linen.embedding_floor(embeddings)  # validate once, before the forward pass
    self.embeddings = embeddings
    self.calls: dict[int, tuple[nnx.Module, dict[str, moments.InputMoments]]] = {}

  def record(self, layer, x):
    stats = layer_moments(layer, x, embeddings=self.embeddings)
    if not stats:
      return
    if id(layer) in self.calls:
      # Repeated use: the mean over all rows of all calls.
      previous = self.calls[id(layer)][1]
      stats = {k: moments.combine(previous[k], v) for k, v in stats.items()}
    self.calls[id(layer)] = (layer, stats)

  def state(self, model) -> nnx.State:
    """The recorded statistics at the paths ``nnx.state(model, nnx.Param)`` uses."""
    # nnx.state holds the model's Variable objects themselves, so a layer's
    # Param identifies its path (the first one, for a shared layer).
    paths = {id(v): p for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    flat = {}
    for layer, stats in self.calls.values():
      for name, stat in stats.items():
        path = paths.get(id(getattr(layer, name)))
        if path is None:
          raise ValueError(
              f"adaact_optax.nnx.apply: a {type(layer).__name__} whose '{name}' of shape "
              f"{getattr(layer, name).shape} is not among nnx.state(model, nnx.Param) ran "
              "during the forward pass. It is either not part of `model`, or was called "
              "inside an NNX transform (nnx.scan/vmap/remat) nested in the forward pass, "
              "which works on copies of the parameters; neither is supported.")
        flat[path] = stat.mean
    return nnx.from_flat_state(flat)


_recorder: contextvars.ContextVar[_Recorder | None] = contextvars.ContextVar(
    "adaact_nnx_recorder", default=None)
_patch_lock = threading.Lock()
_patch_depth = 0
_originals: dict[type, Any] = {}


def _wrap(original):
  @functools.wraps(original)
  def __call__(self, inputs, *args, **kwargs):
    recorder = _recorder.get()
    if recorder is not None:
      recorder.record(self, inputs)
    return original(self, inputs, *args, **kwargs)
  return __call__


@contextlib.contextmanager
def _patched():
  """Wraps the supported classes' ``__call__`` while any capture is active."""
  global _patch_depth
  with _patch_lock:
    if _patch_depth == 0:
      for cls in (*_LAYERS, nnx.Embed):
        _originals[cls] = cls.__dict__["__call__"]
        cls.__call__ = _wrap(_originals[cls])
    _patch_depth += 1
  try:
    yield
  finally:
    with _patch_lock:
      _patch_depth -= 1
      if _patch_depth == 0:
        for cls, original in _originals.items():
          cls.__call__ = original
        _originals.clear()


def apply(model: nnx.Module, *args, embeddings: bool | float = False, **kwargs):
  """Runs ``model(*args, **kwargs)``; returns ``(output, activation_stats)``.

  ``activation_stats`` is an ``nnx.State`` with one float32 leaf per
  captured parameter, at its path in ``nnx.state(model, nnx.Param)``:
  ``(*contracted,)`` for a ``Linear``/``LinearGeneral`` kernel (batch axes
  first), ``(*kernel_size, in_channels)`` for a ``Conv`` kernel, ``()`` for
  biases. Pass it to ``optimizer.update(model, grads, activation_stats=...)``.
  A layer called several times pools all its rows.

  Args:
    model: an NNX module (or anything whose Params ``nnx.state`` finds).
    *args: the model's positional arguments.
    **kwargs: the model's keyword arguments.
    embeddings: ``nnx.Embed`` tables are unmatched by default; ``True``
      gives them token-frequency statistics with the floor
      ``moments.EMBEDDING_FLOOR``, a float sets the floor (see
      ``moments.token_moments``).
  """
  recorder = _Recorder(embeddings)
  token = _recorder.set(recorder)
  try:
    with _patched():
      out = model(*args, **kwargs)
  finally:
    _recorder.reset(token)
  return out, recorder.state(model)


def stats_shapes(model: nnx.Module, *args, **kwargs) -> nnx.State:
  """Shapes of ``apply``'s statistics (``jax.ShapeDtypeStruct`` leaves), no FLOPs.

  Pass it as ``stats_shapes=`` to ``adaact``/``scale_by_adaact`` when the
  model has grouped convolutions. The model is not modified (its batch
  statistics, RNG counters... are untouched).
  """
  graphdef, state = nnx.split(model)
  # Trace a copy so the forward pass's own updates (BatchNorm statistics)
  # cannot leak tracers into `model`.
  return jax.eval_shape(lambda s: apply(nnx.merge(graphdef, s), *args, **kwargs)[1], state)
