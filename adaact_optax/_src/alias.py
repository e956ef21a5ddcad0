"""``adaact``: the optimizer as optax builds its aliases, a chain of ``scale_by_adaact``,
decoupled weight decay and the learning rate; the unmatched partition; the whole-step skip."""

from __future__ import annotations

from typing import Any, Literal

import math

import jax
import jax.numpy as jnp
import optax

from adaact_optax._src import alignment, checks, errors, transform


def _with_unmatched_optimizer(adaact_tx, other, stats_shapes):
  """``optax.partition`` of ``adaact_tx`` (parameters with statistics) and ``other``."""
  labels = lambda params: jax.tree.map(
      lambda has: "adaact" if has else "unmatched",
      alignment.with_statistics(params, stats_shapes))
  tx = optax.partition({"adaact": adaact_tx, "unmatched": other}, labels)

  def update_fn(updates, state, params=None, *, activation_stats=None, **extra_args):
    if activation_stats is None:
      raise errors.missing_stats_error()
    # The split was fixed at init from stats_shapes; statistics that disagree
    # with it would be dropped (or missed) silently, so they are an error.
    owned = set(alignment.param_names(updates))
    expected = {n for n, has in zip(alignment.param_names(updates),
                                    jax.tree.leaves(alignment.with_statistics(updates,
                                                                             stats_shapes)))
                if has}
    given = {n for n, leaf in alignment.stats_leaves(activation_stats).items()
             if n in owned and not alignment.is_uncaptured(leaf)}
    if given != expected:
      raise ValueError(
          "adaact(unmatched=<an optax transformation>): activation_stats and the "
          "stats_shapes the optimizer was built with disagree: statistics at "
          f"{sorted(given - expected)} but stats_shapes has none there, none at "
          f"{sorted(expected - given)} where stats_shapes has them. Build the optimizer "
          "with the stats_shapes of the model and inputs you train (the capture's "
          "stats_shapes function).")
    return tx.update(updates, state, params, activation_stats=activation_stats, **extra_args)

  return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def adaact(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    weight_decay: jax.typing.ArrayLike = 2e-3,
    *,
    power: jax.typing.ArrayLike = 0.5,
    mask: Any | None = None,
    mu_dtype: jax.typing.DTypeLike | None = None,
    unmatched: Literal["sgd", "momentum", "error"] | optax.GradientTransformation = "sgd",
    stats_shapes: Any | None = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """The AdaAct optimizer: ``theta -= lr * (adaact_update + weight_decay * theta)``.

  ``scale_by_adaact`` chained with decoupled weight decay (optionally masked,
  as in ``optax.adamw``) and the learning rate (a float or an optax
  schedule). The paper's defaults: lr 0.1, b1 0.9, b2 0.999, eps 1e-8,
  weight decay 2e-3. Works inside ``optax.inject_hyperparams``.

  ``unmatched`` may also be a complete optax optimizer for the parameters
  without statistics (norm scales, embeddings, ...), applied as given with
  its own learning rate, schedule and weight decay; ``learning_rate`` and
  ``weight_decay`` then apply to the parameters with statistics only. The
  split is fixed at ``init`` from ``stats_shapes`` (required then: the
  parameters with a non-marker entry have statistics), and the
  transformation's state covers the other parameters only. It is
  ``optax.partition({'adaact': adaact(...), 'unmatched': tx}, labels)``::

    tx = adaact_optax.adaact(1.0, unmatched=optax.adamw(3e-3, weight_decay=0.1),
                             stats_shapes=adaact_optax.linen.stats_shapes(model, variables, x))

  Args:
    learning_rate: a float or an optax schedule (a function of the step).
    b1: decay of the gradient EMA, in [0, 1).
    b2: decay of the activation second-moment EMA, in [0, 1).
    eps: added to ``V_hat^power``, >= 0; with 0, a feature whose ``V_hat``
      is 0 (it never carried input) gets a zero update.
    weight_decay: decoupled weight decay, >= 0.
    power: exponent of ``V_hat`` (0.5 in the paper), > 0.
    mask: a tree of booleans like the params (or a function of them) saying
      which parameters get weight decay, as in ``optax.adamw``.
    mu_dtype: dtype of the first moment; ``None`` keeps the params' dtype.
    unmatched: ``"sgd"``, ``"momentum"`` or ``"error"`` (see
      :func:`scale_by_adaact`), or an optax transformation (above).
    stats_shapes: the statistics' shapes, keyed like the params (the
      capture's ``stats_shapes`` functions); needed for grouped
      convolutions and with a transformation as ``unmatched``.
    axis_name: a ``pmap``/``shard_map`` axis to average the statistics over.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` takes
    ``activation_stats=``. Its state's first element is the
    :class:`ScaleByAdaActState` (unless ``unmatched`` is a transformation).

  Raises:
    ValueError: a hyperparameter out of range; ``unmatched`` a transformation
      without ``stats_shapes``. ``update`` raises as :func:`scale_by_adaact`'s.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import adaact_optax
    >>> def loss(params, x, y):
    ...   return jnp.mean((x @ params["w"] - y) ** 2)
    >>> x = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    >>> y = jnp.array([[1.0], [2.0], [3.0]])
    >>> params = {"w": jnp.zeros((2, 1))}
    >>> tx = adaact_optax.adaact(learning_rate=0.02)
    >>> opt_state = tx.init(params)
    >>> for _ in range(5):
    ...   value, grads, stats = adaact_optax.value_grad_and_stats(loss)(params, x, y)
    ...   updates, opt_state = tx.update(grads, opt_state, params, activation_stats=stats)
    ...   params = optax.apply_updates(params, updates)
    ...   print(f"{value:.3f}")
    4.667
    2.237
    0.884
    0.238
    0.023

  References:
    Seung, Lee and Ko, `An Adaptive Method Stabilizing Activations for
    Enhanced Generalization <https://arxiv.org/abs/2506.08353>`_, ICDM
    Workshops 2024.
  """
  checks.check_learning_rate(learning_rate)
  checks.check("weight_decay", weight_decay, lambda v: 0 <= v < math.inf, "finite and >= 0")
  if isinstance(unmatched, optax.GradientTransformation):
    if stats_shapes is None:
      raise errors.unmatched_needs_stats_shapes()
    inner = adaact(learning_rate, b1, b2, eps, weight_decay, power=power, mask=mask,
                   mu_dtype=mu_dtype, unmatched="sgd", stats_shapes=stats_shapes,
                   axis_name=axis_name)
    return _skip_whole_step(_with_unmatched_optimizer(inner, unmatched, stats_shapes),
                            optax.PartitionState)
  return _skip_whole_step(optax.chain(
      transform.scale_by_adaact(b1, b2, eps, power, mu_dtype=mu_dtype, unmatched=unmatched,
                      stats_shapes=stats_shapes, axis_name=axis_name),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  ), tuple)


def _skip_whole_step(tx, state_type):
  """``tx`` whose whole step (weight decay, schedule counts, other branches) is
  skipped when its AdaAct transform skipped a step of non-finite statistics."""
  is_scale = lambda x: isinstance(x, transform.ScaleByAdaActState)

  def update_fn(updates, state, params=None, **extra_args):
    if not isinstance(state, state_type):
      raise errors.not_a_state_error(state, "adaact")
    new_updates, new_state = tx.update(updates, state, params, **extra_args)
    counters = lambda tree: [s.skipped for s in jax.tree.leaves(tree, is_leaf=is_scale)
                             if is_scale(s)]
    if not counters(state):
      return new_updates, new_state
    skip = jnp.any(jnp.stack([n > o for n, o in zip(counters(new_state), counters(state))]))
    # AdaAct's own state already handled the skip (and counted it); restore the rest.
    new_state = jax.tree.map(lambda n, o: n if is_scale(n) else jnp.where(skip, o, n),
                             new_state, state, is_leaf=is_scale)
    new_updates = jax.tree.map(lambda u: jnp.where(skip, jnp.zeros_like(u), u), new_updates)
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(tx.init, update_fn)
