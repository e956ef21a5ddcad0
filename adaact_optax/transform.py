"""AdaAct as an Optax gradient transformation.

Reference: H. Seung, J. Lee, H. Ko, "An Adaptive Method Stabilizing
Activations for Enhanced Generalization", ICDM Workshops 2024,
arXiv:2506.08353.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree
from optax import tree_utils as otu

from adaact_optax import matching

_UNMATCHED = ("sgd", "momentum", "error")


class ScaleByAdaActState(NamedTuple):
  """State of ``scale_by_adaact``.

  Attributes:
    count: int32 scalar, number of updates taken.
    mu: first moment of the gradients, like the params, in ``mu_dtype``.
    nu: float32 EMA of the squared layer inputs, one value per input feature,
      in the keep-rank layout of ``adaact_optax.matching``: a parameter of
      shape ``K`` has ``K[:-1] + (1,)`` (or the ``stats_shapes`` override),
      vectors ``(1,)``, scalars ``()``. Never parameter-sized.
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates


def _check(name, value, ok, requirement):
  # Hyperparameters may be tracers under optax.inject_hyperparams; check numbers only.
  if isinstance(value, (int, float)) and not ok(value):
    raise ValueError(f"{name} must be {requirement}, got {value!r}")


def _validate(b1, b2, eps, power, unmatched):
  _check("b1", b1, lambda v: 0 <= v < 1, "in [0, 1)")
  _check("b2", b2, lambda v: 0 <= v < 1, "in [0, 1)")
  _check("eps", eps, lambda v: v >= 0, ">= 0")
  _check("power", power, lambda v: v > 0, "> 0")
  if unmatched not in _UNMATCHED:
    hint = (" (an optax transformation is accepted by adaact(), not scale_by_adaact: "
            "wrap scale_by_adaact in optax.partition instead)"
            if isinstance(unmatched, optax.GradientTransformation) else "")
    raise ValueError(f"unmatched must be one of {_UNMATCHED} or, for adaact(), an optax "
                     f"transformation; got {unmatched!r}{hint}")


def _missing_stats_error():
  return ValueError(
      "scale_by_adaact needs the layer-input statistics: call "
      "tx.update(grads, opt_state, params, activation_stats=stats), with stats = "
      "adaact_optax.linen.apply(model, variables, x)[1][adaact_optax.linen.COLLECTION] "
      "or adaact_optax.nnx.apply(model, x)[1]. Pass activation_stats={} to update every "
      "parameter as unmatched.")


def _uncaptured_error(names):
  return ValueError(
      f"AdaAct has no statistics for {names}: the capture saw these weights multiply an "
      "activation but could not record their input (see the UncapturedWeightWarning it "
      "emitted), and unmatched='error' refuses to train them without. Fix: record the "
      "layer's input with the sow hatch (adaact_optax.linen.sow_input / the NNX "
      "equivalent) in the custom layer, or pass unmatched='sgd' or unmatched='momentum' "
      "to accept plain updates for them.")


def pmean_tree(tree, axis_name):
  """Mean of a pytree over a mapped axis with one collective (leaves raveled)."""
  flat, unravel = ravel_pytree(tree)
  if flat.size == 0:
    return tree
  return unravel(jax.lax.pmean(flat, axis_name))


def step_scale(v_hat: jax.Array, power, eps, bc1=1.0) -> jax.Array:
  """The factor AdaAct multiplies ``M_hat`` by: ``1 / (v_hat ** power + eps)``.

  With ``bc1`` (the first moment's bias correction) it is the factor of the
  raw ``M_t`` instead: ``1 / ((v_hat ** power + eps) * bc1)``.
  """
  if isinstance(power, (int, float)):
    root = jnp.sqrt(v_hat) if power == 0.5 else v_hat ** power
  else:  # an array under inject_hyperparams: keep the exact sqrt at 0.5
    root = jnp.where(power == 0.5, jnp.sqrt(v_hat), v_hat ** power)
  return 1 / ((root + eps) * bc1)


def scale_by_adaact(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    power: float = 0.5,
    *,
    mu_dtype: Any | None = None,
    unmatched: str = "sgd",
    stats_shapes: Any | None = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales gradients by the second moment of each layer's input activations.

  For a parameter with statistics ``A_t`` (one value per input feature, from
  ``activation_stats``) and gradient ``g_t``::

    M_t = b1 M_{t-1} + (1 - b1) g_t        M_hat = M_t / (1 - b1^t)
    V_t = b2 V_{t-1} + (1 - b2) A_t        V_hat = V_t / (1 - b2^t)
    update = M_hat / (V_hat^power + eps)   (V_hat broadcast over output axes)

  A bias's statistic is the constant input 1, so its update is
  ``M_hat / (1 + eps)``. Parameters without statistics (norm scales, ...)
  pass the raw gradient (``unmatched="sgd"``, the authors' rule) or
  ``M_hat`` (``unmatched="momentum"``).

  Args:
    b1: decay of the gradient EMA, in [0, 1).
    b2: decay of the activation second-moment EMA, in [0, 1).
    eps: added to ``V_hat^power``, >= 0.
    power: exponent of ``V_hat`` (0.5 in the paper), > 0.
    mu_dtype: dtype of the first moment; ``None`` keeps the params' dtype.
      The second moment is always float32.
    unmatched: ``"sgd"`` or ``"momentum"``, see above; ``"error"`` is
      ``"sgd"`` for parameters without statistics, but raises a ValueError
      (at trace time, naming the paths) for parameters the capture marked
      uncaptured (``matching.UNCAPTURED_SHAPE`` leaves).
    stats_shapes: optional tree of statistics shapes keyed like the params
      (keep-rank or 0.1.0 forms, see ``adaact_optax.matching``), for layers
      whose statistics are not the default ``K[:-1] + (1,)`` (grouped
      convolutions); see ``adaact_optax.linen.stats_shapes``.
    axis_name: a ``pmap``/``shard_map`` axis over which the statistics are
      averaged (one collective per step). Assumes equal local batch sizes.

  Returns:
    A ``GradientTransformationExtraArgs`` whose ``update`` takes
    ``activation_stats``: a tree keyed like the params (see README).
  """
  _validate(b1, b2, eps, power, unmatched)
  mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

  def init_fn(params):
    if unmatched == "error" and matching.uncaptured_paths(stats_shapes):
      raise _uncaptured_error(matching.uncaptured_paths(stats_shapes))
    mu = otu.tree_zeros_like(params, dtype=mu_dtype)
    nu = matching.moment_zeros(params, stats_shapes)
    return ScaleByAdaActState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu)

  def update_fn(updates, state, params=None, *, activation_stats=None, **extra_args):
    del params, extra_args
    if activation_stats is None:
      raise _missing_stats_error()
    if axis_name is not None:
      activation_stats = pmean_tree(activation_stats, axis_name)
    stats = matching.align(activation_stats, updates, state.nu)
    if unmatched == "error":
      # Only parameters this transform owns (optax.masked/partition drop the rest).
      owned = set(matching.param_names(updates))
      refused = [n for n in matching.uncaptured_paths(activation_stats) if n in owned]
      if refused:
        raise _uncaptured_error(refused)
    count = optax.safe_increment(state.count)
    t = count.astype(jnp.float32)
    # float32 arrays, so the plain optimizer and one under optax.inject_hyperparams
    # (whose hyperparameters are arrays) round every product identically.
    b1_, b2_, eps_ = (jnp.asarray(h, jnp.float32) for h in (b1, b2, eps))
    bc1, bc2 = 1 - b1_ ** t, 1 - b2_ ** t

    def leaf(path, g, m, v, a):
      if a is None and unmatched != "momentum":
        return g, m, v
      m_new = b1_ * m.astype(jnp.float32) + (1 - b1_) * g.astype(jnp.float32)
      if a is None:
        u = m_new * (1 / bc1)
      else:
        v = b2_ * v + (1 - b2_) * a
        # 1/bc1 is folded into the small per-input-feature scale, so each weight
        # costs one multiply and no divide; as one reciprocal (not a product of
        # two) XLA:CPU compiles it identically with constant and with
        # inject_hyperparams' array hyperparameters, bit for bit.
        scale = step_scale(v / bc2, power, eps_, bc1)
        u = matching.apply_scale(m_new, scale, matching.path_name(path))
      return u.astype(g.dtype), m_new.astype(m.dtype), v

    results = jax.tree_util.tree_map_with_path(leaf, updates, state.mu, state.nu, stats)
    treedef = jax.tree.structure(updates)
    new_updates, mu, nu = (treedef.unflatten(x) for x in zip(*treedef.flatten_up_to(results)))
    return new_updates, ScaleByAdaActState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class ScaleByActivationRMSState(NamedTuple):
  """State of ``scale_by_activation_rms``.

  Attributes:
    count: int32 scalar, number of updates taken.
    nu: float32 EMA of the squared layer inputs, exactly as
      ``ScaleByAdaActState.nu`` (same shapes, same partitioning metadata).
  """

  count: jax.Array
  nu: optax.Updates


def scale_by_activation_rms(
    b2: float = 0.999,
    eps: float = 1e-8,
    power: float = 0.5,
    *,
    stats_shapes: Any | None = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AdaAct's activation preconditioner on its own, as an optax building block.

  Keeps only the EMA of each weight's squared inputs ``V`` (one value per
  input feature, the keep-rank layout of ``adaact_optax.matching``) and a
  count, and divides the incoming updates ``u`` by it::

    V_t = b2 V_{t-1} + (1 - b2) A_t        V_hat = V_t / (1 - b2^t)
    out = u / (V_hat^power + eps)          (V_hat broadcast over output axes)

  A bias's statistic is the constant 1, so it is divided by ``1 + eps``;
  the updates of parameters without statistics (or with the UNCAPTURED
  marker) pass through unchanged. AdaAct is the chain::

    optax.chain(optax.ema(b1, debias=True), scale_by_activation_rms(b2, eps),
                optax.add_decayed_weights(wd), optax.scale_by_learning_rate(lr))
    # == adaact(lr, b1, b2, eps, wd, unmatched="momentum") up to float32 rounding

  Args:
    b2: decay of the activation second-moment EMA, in [0, 1).
    eps: added to ``V_hat^power``, >= 0.
    power: exponent of ``V_hat``, > 0.
    stats_shapes: optional tree of statistics shapes, as in ``scale_by_adaact``.
    axis_name: a ``pmap``/``shard_map`` axis over which the statistics are
      averaged, as in ``scale_by_adaact``.

  Returns:
    A ``GradientTransformationExtraArgs`` whose ``update`` takes
    ``activation_stats`` (a tree keyed like the params).
  """
  _validate(0.0, b2, eps, power, "sgd")

  def init_fn(params):
    return ScaleByActivationRMSState(count=jnp.zeros([], jnp.int32),
                                     nu=matching.moment_zeros(params, stats_shapes))

  def update_fn(updates, state, params=None, *, activation_stats=None, **extra_args):
    del params, extra_args
    if activation_stats is None:
      raise _missing_stats_error()
    if axis_name is not None:
      activation_stats = pmean_tree(activation_stats, axis_name)
    stats = matching.align(activation_stats, updates, state.nu)
    count = optax.safe_increment(state.count)
    b2_, eps_ = (jnp.asarray(h, jnp.float32) for h in (b2, eps))
    bc2 = 1 - b2_ ** count.astype(jnp.float32)

    def leaf(path, u, v, a):
      if a is None:
        return u, v
      v = b2_ * v + (1 - b2_) * a
      scale = step_scale(v / bc2, power, eps_)
      out = matching.apply_scale(u.astype(jnp.float32), scale, matching.path_name(path))
      return out.astype(u.dtype), v

    results = jax.tree_util.tree_map_with_path(leaf, updates, state.nu, stats)
    treedef = jax.tree.structure(updates)
    new_updates, nu = (treedef.unflatten(x) for x in zip(*treedef.flatten_up_to(results)))
    return new_updates, ScaleByActivationRMSState(count=count, nu=nu)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _unmatched_needs_stats_shapes():
  return ValueError(
      "adaact(unmatched=<an optax transformation>) needs stats_shapes=: which parameters "
      "have statistics must be known at init, so the transformation's state covers only the "
      "others. Pass the layout the capture reports, e.g. stats_shapes="
      "adaact_optax.linen.stats_shapes(model, variables, x) (or adaact_optax.nnx."
      "stats_shapes(model, x)); or use a string unmatched='sgd'/'momentum'.")


def _with_unmatched_optimizer(adaact_tx, other, stats_shapes):
  """``optax.partition`` of ``adaact_tx`` (parameters with statistics) and ``other``."""
  labels = lambda params: jax.tree.map(
      lambda has: "adaact" if has else "unmatched",
      matching.with_statistics(params, stats_shapes))
  tx = optax.partition({"adaact": adaact_tx, "unmatched": other}, labels)

  def update_fn(updates, state, params=None, *, activation_stats=None, **extra_args):
    if activation_stats is None:
      raise _missing_stats_error()
    # The split was fixed at init from stats_shapes; statistics that disagree
    # with it would be dropped (or missed) silently, so they are an error.
    owned = set(matching.param_names(updates))
    expected = {n for n, has in zip(matching.param_names(updates),
                                    jax.tree.leaves(matching.with_statistics(updates,
                                                                             stats_shapes)))
                if has}
    given = {n for n, leaf in matching.stats_leaves(activation_stats).items()
             if n in owned and not matching.is_uncaptured(leaf)}
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
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 2e-3,
    *,
    power: float = 0.5,
    mask: Any | None = None,
    mu_dtype: Any | None = None,
    unmatched: str | optax.GradientTransformation = "sgd",
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

  See ``scale_by_adaact`` for the other arguments.

  Raises:
    ValueError: a hyperparameter out of range; ``unmatched`` a transformation
      without ``stats_shapes``.
  """
  _check("weight_decay", weight_decay, lambda v: v >= 0, ">= 0")
  if isinstance(unmatched, optax.GradientTransformation):
    if stats_shapes is None:
      raise _unmatched_needs_stats_shapes()
    inner = adaact(learning_rate, b1, b2, eps, weight_decay, power=power, mask=mask,
                   mu_dtype=mu_dtype, unmatched="sgd", stats_shapes=stats_shapes,
                   axis_name=axis_name)
    return _with_unmatched_optimizer(inner, unmatched, stats_shapes)
  return optax.chain(
      scale_by_adaact(b1, b2, eps, power, mu_dtype=mu_dtype, unmatched=unmatched,
                      stats_shapes=stats_shapes, axis_name=axis_name),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
