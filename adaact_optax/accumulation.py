"""Gradient accumulation that also accumulates AdaAct's statistics.

``optax.MultiSteps`` averages the gradients of k micro-batches, but hands the
wrapped optimizer the ``extra_args`` of the *current* call only: at the k-th
micro-batch AdaAct would see the last micro-batch's statistics, not the
mean over all k. ``MultiSteps`` here is a drop-in replacement that keeps a
running mean of the statistics beside the gradients (float32, one value per
input feature, shaped like AdaAct's ``nu``), so k equal micro-batches give
the step of the concatenated batch (up to rounding) on models whose layers
treat examples independently.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from adaact_optax import matching
from adaact_optax.transform import _missing_stats_error, _not_a_state_error


class MultiStepsState(NamedTuple):
  """``optax.MultiStepsState``'s fields, plus ``acc_stats``.

  Attributes:
    mini_step, gradient_step, inner_opt_state, acc_grads, skip_state: as in
      ``optax.MultiStepsState``.
    acc_stats: float32 mean of the statistics of this step's micro-batches so
      far, a params-shaped tree of per-input-feature arrays (AdaAct's ``nu``
      shapes); zeros at parameters without statistics.
  """

  mini_step: jax.Array
  gradient_step: jax.Array
  inner_opt_state: Any
  acc_grads: Any
  skip_state: Any
  acc_stats: Any


class MultiSteps(optax.MultiSteps):
  """``optax.MultiSteps`` that averages ``activation_stats`` like the gradients.

  Same arguments and behaviour as ``optax.MultiSteps`` (schedules of k,
  ``should_skip_update_fn``, ``has_updated``), plus ``stats_shapes`` for
  models with grouped convolutions (as in ``adaact_optax.adaact``). The
  statistics are always averaged over the micro-batches, also with
  ``use_grad_mean=False`` (a mean over rows is what AdaAct's statistic is).
  A skipped micro-batch leaves them untouched.

  Example::

    tx = adaact_optax.MultiSteps(adaact_optax.adaact(0.1), every_k_schedule=4)
    updates, opt_state = tx.update(grads, opt_state, params, activation_stats=stats)
  """

  def __init__(
      self,
      opt: optax.GradientTransformation,
      every_k_schedule: Union[int, Callable[[jax.Array], jax.Array]],
      use_grad_mean: bool = True,
      should_skip_update_fn: Optional[optax.ShouldSkipUpdateFunction] = None,
      accumulator_dtype: Any = jnp.float32,
      *,
      stats_shapes: Any | None = None,
  ):
    super().__init__(opt, every_k_schedule, use_grad_mean, should_skip_update_fn,
                     accumulator_dtype)
    self._stats_shapes = stats_shapes

  def init(self, params: optax.Params) -> MultiStepsState:
    acc_stats = matching.moment_zeros(params, self._stats_shapes)
    return MultiStepsState(*super().init(params), acc_stats=acc_stats)

  def update(self, updates, state: MultiStepsState, params=None, *,
             activation_stats=None, **extra_args):
    """Accumulates gradients and statistics; the inner update sees their means."""
    if not isinstance(state, MultiStepsState):
      raise _not_a_state_error(state, "adaact_optax.MultiSteps")
    if activation_stats is None:
      raise _missing_stats_error()
    # Per-parameter, state-shaped statistics (None where a parameter has none).
    stats = matching.align(activation_stats, updates, state.acc_stats)
    is_none = lambda x: x is None
    n = state.mini_step.astype(jnp.float32)
    # Welford running mean, the same update MultiSteps applies to the gradients.
    acc = jax.tree.map(lambda m, a: m if a is None else m + (a - m) / (n + 1),
                       state.acc_stats, stats, is_leaf=is_none)
    mean_stats = jax.tree.map(lambda m, a: None if a is None else m, acc, stats,
                              is_leaf=is_none)
    inner = optax.MultiStepsState(*state[:5])
    new_updates, new = super().update(updates, inner, params,
                                      activation_stats=mean_stats, **extra_args)
    # MultiSteps moves neither counter when should_skip_update_fn rejects a call.
    skipped = (new.mini_step == inner.mini_step) & (new.gradient_step == inner.gradient_step)
    emitted = jnp.logical_not(skipped) & (new.mini_step == 0)
    acc = jax.tree.map(
        lambda old, a: jnp.where(skipped, old, jnp.where(emitted, jnp.zeros_like(a), a)),
        state.acc_stats, acc)
    return new_updates, MultiStepsState(*new, acc_stats=acc)

  def gradient_transformation(self) -> optax.GradientTransformationExtraArgs:
    return optax.GradientTransformationExtraArgs(init=self.init, update=self.update)
