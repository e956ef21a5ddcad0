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

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from adaact_optax._src import alignment, boxes
from adaact_optax._src import errors


class MultiStepsState(NamedTuple):
  """``optax.MultiStepsState``'s fields, plus ``acc_stats``.

  Attributes:
    mini_step, gradient_step, inner_opt_state, acc_grads, skip_state: as in
      ``optax.MultiStepsState``.
    acc_stats: float32 mean of the statistics of this step's micro-batches so
      far, a params-shaped tree of per-input-feature arrays (AdaAct's ``nu``
      shapes); zeros at parameters without statistics.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import adaact_optax
    >>> tx = adaact_optax.MultiSteps(adaact_optax.adaact(0.1), every_k_schedule=2)
    >>> state = tx.init({"w": jnp.ones((3, 2))})
    >>> int(state.mini_step), jax.tree.map(jnp.shape, state.acc_stats)
    (0, {'w': (3, 1)})
  """

  mini_step: jax.Array
  gradient_step: jax.Array
  inner_opt_state: Any
  acc_grads: Any
  skip_state: Any
  acc_stats: Any


class MultiSteps:
  """``optax.MultiSteps`` that averages ``activation_stats`` like the gradients.

  Same arguments and behaviour as ``optax.MultiSteps`` (schedules of k,
  ``should_skip_update_fn``, ``has_updated``), plus ``stats_shapes`` for
  models with grouped convolutions (as in ``adaact_optax.adaact``). The
  statistics are always averaged over the micro-batches, also with
  ``use_grad_mean=False`` (a mean over rows is what AdaAct's statistic is).
  A skipped micro-batch leaves them untouched.

  Args:
    opt: the optimizer to wrap (``adaact(...)``, or a chain containing it).
    every_k_schedule: k, the number of micro-batches per step, or a
      function of the step giving it, as in ``optax.MultiSteps``.
    use_grad_mean: average the gradients (``True``) or sum them.
    should_skip_update_fn: as in ``optax.MultiSteps``.
    accumulator_dtype: dtype of the gradient accumulator.
    stats_shapes: the statistics' shapes, as for ``adaact``.

  Examples:
    Two micro-batches make one step whose statistics are their mean:

    >>> import jax.numpy as jnp
    >>> import adaact_optax
    >>> def loss(params, x):
    ...   return jnp.mean((x @ params["w"]) ** 2)
    >>> params = {"w": jnp.ones((3, 2))}
    >>> tx = adaact_optax.MultiSteps(adaact_optax.adaact(0.1), every_k_schedule=2)
    >>> state = tx.init(params)
    >>> for scale in (1.0, 2.0):   # inputs of mean square 1, then 4
    ...   x = jnp.full((4, 3), scale)
    ...   _, grads, stats = adaact_optax.value_grad_and_stats(loss)(params, x)
    ...   updates, state = tx.update(grads, state, params, activation_stats=stats)
    ...   print(bool(tx.has_updated(state)))
    False
    True
    >>> nu = state.inner_opt_state[0].nu["w"]          # (1 - b2) * mean of 1 and 4
    >>> round(float(nu[0, 0]) / (1 - 0.999), 3)
    2.5

    Under ``nnx.Optimizer`` or ``TrainState``, pass
    ``tx.gradient_transformation()`` as the ``tx``.
  """

  def __init__(
      self,
      opt: optax.GradientTransformation,
      every_k_schedule: int | Callable[[jax.typing.ArrayLike], jax.typing.ArrayLike],
      use_grad_mean: bool = True,
      should_skip_update_fn: Optional[optax.ShouldSkipUpdateFunction] = None,
      accumulator_dtype: jax.typing.DTypeLike = jnp.float32,
      *,
      stats_shapes: Any | None = None,
  ):
    # Composition, not inheritance: optax.MultiSteps does the gradient
    # accumulation and owns its state; this wrapper only adds ``acc_stats``.
    self._multi_steps = optax.MultiSteps(opt, every_k_schedule, use_grad_mean,
                                         should_skip_update_fn, accumulator_dtype)
    self._stats_shapes = stats_shapes

  @property
  def inner_opt(self) -> optax.GradientTransformationExtraArgs:
    """The wrapped optimizer, as ``optax.MultiSteps.inner_opt``."""
    return self._multi_steps.inner_opt

  def init(self, params: optax.Params) -> MultiStepsState:
    """``optax.MultiSteps.init``'s state plus zero ``acc_stats``."""
    acc_stats = boxes.moment_zeros(params, self._stats_shapes)
    return _with_stats(self._multi_steps.init(params), acc_stats)

  def update(self, updates: optax.Updates, state: MultiStepsState,
             params: optax.Params | None = None, *, activation_stats: Any = None,
             **extra_args) -> tuple[optax.Updates, MultiStepsState]:
    """Accumulates gradients and statistics; the inner update sees their means.

    Raises:
      ValueError: ``state`` is not this wrapper's state, or ``activation_stats``
        is missing.
    """
    if not isinstance(state, MultiStepsState):
      raise errors.not_a_state_error(state, "adaact_optax.MultiSteps")
    if activation_stats is None:
      raise errors.missing_stats_error()
    # Per-parameter, state-shaped statistics (None where a parameter has none).
    stats = alignment.align(activation_stats, updates, state.acc_stats)
    is_none = lambda x: x is None
    n = state.mini_step.astype(jnp.float32)
    acc = jax.tree.map(lambda m, a: m if a is None else _running_mean(m, a, n),
                       state.acc_stats, stats, is_leaf=is_none)
    mean_stats = jax.tree.map(lambda m, a: None if a is None else m, acc, stats,
                              is_leaf=is_none)
    inner = _without_stats(state)
    new_updates, new = self._multi_steps.update(updates, inner, params,
                                                activation_stats=mean_stats, **extra_args)
    # MultiSteps moves neither counter when should_skip_update_fn rejects a call.
    skipped = (new.mini_step == inner.mini_step) & (new.gradient_step == inner.gradient_step)
    emitted = jnp.logical_not(skipped) & (new.mini_step == 0)
    acc = jax.tree.map(
        lambda old, a: jnp.where(skipped, old, jnp.where(emitted, jnp.zeros_like(a), a)),
        state.acc_stats, acc)
    return new_updates, _with_stats(new, acc)

  def has_updated(self, state: MultiStepsState) -> jax.Array:
    """Whether the last ``update`` applied the inner optimizer (bool scalar)."""
    return self._multi_steps.has_updated(_without_stats(state))

  def gradient_transformation(self) -> optax.GradientTransformationExtraArgs:
    """``init`` and ``update`` as a transformation (for ``TrainState``, ``nnx.Optimizer``)."""
    return optax.GradientTransformationExtraArgs(init=self.init, update=self.update)


def _running_mean(mean: jax.Array, a: jax.Array, n: jax.Array) -> jax.Array:
  """The mean of ``n`` micro-batches' statistics updated with an ``n+1``-th, ``a``.

  Welford's update, the one MultiSteps applies to the gradients. The
  capture's no-rows marker ``-0.0`` counts as 0 in the mean, and the mean
  stays ``-0.0`` while no micro-batch had rows (``+0.0 + -0.0`` would be
  ``+0.0``, and the accumulator starts at ``+0.0``), so AdaAct still leaves
  that feature's second moment untouched.
  """
  new = mean + (a - mean) / (n + 1)
  no_rows = alignment.is_no_rows(a) & (alignment.is_no_rows(mean) | (n == 0))
  return jnp.where(no_rows, jnp.float32(alignment.NO_ROWS), new)


def _with_stats(state: optax.MultiStepsState, acc_stats: Any) -> MultiStepsState:
  # By field name, so a field optax adds fails here loudly (and in
  # test_state_fields_follow_optax) instead of shifting positions.
  return MultiStepsState(**state._asdict(), acc_stats=acc_stats)


def _without_stats(state: MultiStepsState) -> optax.MultiStepsState:
  return optax.MultiStepsState(**{f: getattr(state, f) for f in optax.MultiStepsState._fields})
