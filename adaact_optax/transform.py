"""AdaAct as an Optax gradient transformation.

Reference: H. Seung, J. Lee, H. Ko, "An Adaptive Method Stabilizing
Activations for Enhanced Generalization", ICDM Workshops 2024,
arXiv:2506.08353.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adaact_optax import _alignment

_UNMATCHED = ("sgd", "momentum", "error")


class ScaleByAdaActState(NamedTuple):
  """State of ``scale_by_adaact``.

  Attributes:
    count: int32 scalar, number of updates taken.
    mu: first moment of the gradients, like the params, in ``mu_dtype``.
    nu: float32 EMA of the squared layer inputs, one value per input feature,
      in the keep-rank layout of ``adaact_optax.layout``: a parameter of
      shape ``K`` has ``K[:-1] + (1,)`` (or the ``stats_shapes`` override),
      vectors ``(1,)``, scalars ``()``. Never parameter-sized.
    skipped: int32 scalar, number of steps skipped because their statistics
      were not finite (those steps left ``count``, ``mu`` and ``nu`` as they
      were). New in 0.2.0; see ``migrate_state`` for 0.1.0 checkpoints.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import adaact_optax
    >>> state = adaact_optax.scale_by_adaact().init({"w": jnp.ones((3, 2)), "b": jnp.zeros(2)})
    >>> int(state.count), jax.tree.map(jnp.shape, state.mu), jax.tree.map(jnp.shape, state.nu)
    (0, {'b': (2,), 'w': (3, 2)}, {'b': (1,), 'w': (3, 1)})
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  skipped: jax.Array


def _concrete(name, value):
  """``value`` as a Python float, or None when it is traced (exempt from checks).

  Python numbers, numpy scalars and concrete jax arrays (also the arrays
  ``optax.inject_hyperparams`` passes at ``init``) are converted with
  ``float()``; a tracer refuses the conversion and is exempt.
  """
  if isinstance(value, (str, bytes)):
    raise ValueError(f"{name} must be a number, got the string {value!r}")
  try:
    return float(value)
  except jax.errors.ConcretizationTypeError:
    return None  # traced (jit, inject_hyperparams under jit): cannot be checked here
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a real scalar, got {value!r} of type "
                     f"{type(value).__name__}") from None


def _check(name, value, ok, requirement):
  v = _concrete(name, value)
  if v is not None and not ok(v):
    raise ValueError(f"{name} must be {requirement}, got {value!r}")


def _below_one_in_float32(v) -> bool:
  # The transform computes 1 - b**t in float32: b must stay below 1 there.
  return 0 <= v and float(np.float32(v)) < 1


def _validate(b1, b2, eps, power, unmatched):
  requirement = "in [0, 1) (also once rounded to float32, where the optimizer computes)"
  _check("b1", b1, _below_one_in_float32, requirement)
  _check("b2", b2, _below_one_in_float32, requirement)
  _check("eps", eps, lambda v: 0 <= v < math.inf, "finite and >= 0")
  _check("power", power, lambda v: 0 < v < math.inf, "finite and > 0")
  if isinstance(unmatched, str) and unmatched not in _UNMATCHED or not isinstance(
      unmatched, (str, optax.GradientTransformation)):
    raise ValueError(f"unmatched must be one of {_UNMATCHED} or, for adaact(), an optax "
                     f"transformation; got {unmatched!r}")
  if not isinstance(unmatched, str):
    raise ValueError("unmatched=<an optax transformation> is accepted by adaact(), not by "
                     "scale_by_adaact: wrap scale_by_adaact in optax.partition instead")


def _check_mu_dtype(mu_dtype):
  if mu_dtype is None:
    return None
  try:
    dtype = jnp.dtype(mu_dtype)
  except TypeError:
    raise ValueError(f"mu_dtype must be a floating dtype (e.g. jnp.bfloat16), got "
                     f"{mu_dtype!r}") from None
  if not jnp.issubdtype(dtype, jnp.inexact):
    raise ValueError(f"mu_dtype must be a floating (or complex) dtype, got {dtype}: an "
                     "integer or bool first moment would truncate the momentum. Use e.g. "
                     "jnp.bfloat16 or jnp.float32, or None for the parameters' dtype.")
  return dtype


def _check_learning_rate(learning_rate):
  if not callable(learning_rate):
    _check("learning_rate", learning_rate, math.isfinite, "a finite number or an optax schedule")


def _missing_stats_error():
  return ValueError(
      "AdaAct needs the layer-input statistics: call "
      "tx.update(grads, opt_state, params, activation_stats=stats), with stats = "
      "adaact_optax.linen.apply(model, variables, x)[1][adaact_optax.linen.COLLECTION] "
      "or adaact_optax.nnx.apply(model, x)[1]. Pass activation_stats={} to update every "
      "parameter as unmatched. With flax.training.train_state.TrainState: its "
      "apply_gradients calls tx.update(grads, opt_state, params) and never forwards "
      "activation_stats= (it treats extra keywords as fields to replace), so the "
      "statistics are lost even when you pass them; use adaact_optax.TrainState, whose "
      "apply_gradients(grads=..., activation_stats=...) passes them to the optimizer.")


def _not_a_state_error(state, expected: str):
  return ValueError(
      f"{expected}.update got a state of type {type(state).__name__}, not the state "
      f"{expected}.init returns. A checkpoint restored without a target gives plain "
      "dicts and lists: restore it with the target tx.init(params) (orbax: "
      "ocp.args.StandardRestore(tx.init(params))). A checkpoint written by adaact-optax "
      "0.1.0 (no skip counter, second moment of shape K[:-1]) converts with "
      "adaact_optax.migrate_state(old_state, tx, params).")


def _tree_unzip(updates, results, n):
  """``n`` trees shaped like ``updates`` from its tree of ``n``-tuples ``results``."""
  outer = jax.tree.structure(updates)
  if outer.num_leaves == 0:  # jax.tree.transpose cannot rebuild n empty trees
    return (results,) * n
  return jax.tree.transpose(outer, jax.tree.structure((0,) * n), results)


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _compute_dtype(x):
  # float32 arithmetic for real parameters (bfloat16 included), complex64 for
  # complex ones, so the imaginary part is never dropped.
  return jnp.complex64 if jnp.iscomplexobj(x) else jnp.float32


def _uncaptured_error(names):
  return ValueError(
      f"AdaAct has no statistics for {names}: the capture saw these weights multiply an "
      "activation but could not record their input (see the UncapturedWeightWarning it "
      "emitted), and unmatched='error' refuses to train them without. Fix: record the "
      "layer's input with the sow hatch (adaact_optax.linen.sow_input / the NNX "
      "equivalent) in the custom layer, or pass unmatched='sgd' or unmatched='momentum' "
      "to accept plain updates for them.")


def _step_scale(v_hat: jax.Array, power: jax.typing.ArrayLike, eps: jax.typing.ArrayLike,
               bc1: jax.typing.ArrayLike = 1.0) -> jax.Array:
  """The factor AdaAct multiplies ``M_hat`` by: ``1 / (v_hat ** power + eps)``.

  With ``bc1`` (the first moment's bias correction) it is the factor of the
  raw ``M_t`` instead: ``1 / ((v_hat ** power + eps) * bc1)``.
  """
  if isinstance(power, (int, float)):
    root = jnp.sqrt(v_hat) if power == 0.5 else v_hat ** power
  else:  # an array under inject_hyperparams: keep the exact sqrt at 0.5
    root = jnp.where(power == 0.5, jnp.sqrt(v_hat), v_hat ** power)
  return 1 / ((root + eps) * bc1)


def _aligned_stats(state, state_type, name, updates, activation_stats, axis_name):
  """The checks every statistics-taking ``update`` makes, then the aligned statistics."""
  if not isinstance(state, state_type):
    raise _not_a_state_error(state, name)
  if activation_stats is None:
    raise _missing_stats_error()
  if axis_name is not None:  # one mean over the devices' rows
    activation_stats = jax.lax.pmean(activation_stats, axis_name)
  return _alignment.align(activation_stats, updates, state.nu)


def scale_by_adaact(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    power: jax.typing.ArrayLike = 0.5,
    *,
    mu_dtype: jax.typing.DTypeLike | None = None,
    unmatched: Literal["sgd", "momentum", "error"] = "sgd",
    stats_shapes: Any | None = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales gradients by the second moment of each layer's input activations.

  See :func:`adaact_optax.adaact` for the full optimizer. For a parameter
  with gradient :math:`g_t` and statistic :math:`A_t` (from
  ``activation_stats``: the mean over rows of the squared input elements each
  of its weights multiplies, in the keep-rank layout of
  :mod:`adaact_optax.layout`), at step :math:`t`:

  .. math::

    \begin{aligned}
      M_t &= \beta_1 M_{t-1} + (1 - \beta_1)\, g_t, &
        \hat M_t &= M_t / (1 - \beta_1^t), \\
      V_t &= \beta_2 V_{t-1} + (1 - \beta_2)\, A_t, &
        \hat V_t &= V_t / (1 - \beta_2^t), \\
      u_t &= \hat M_t \,/\, (\hat V_t^{\,p} + \epsilon), &&
    \end{aligned}

  where :math:`\beta_1, \beta_2, \epsilon, p` are ``b1``, ``b2``, ``eps``,
  ``power``, and :math:`\hat V_t` is broadcast over the parameter elements
  each statistic covers (the output axes). A bias's statistic is the
  constant input 1, so its update is :math:`\hat M_t / (1 + \epsilon)`.
  Parameters without statistics (norm scales, ...) pass the raw gradient
  (``unmatched="sgd"``, the authors' rule) or :math:`\hat M_t`
  (``unmatched="momentum"``).

  A step whose statistics are not all finite (an input that overflows
  float32 when squared, a NaN) is skipped as ``optax.apply_if_finite``
  skips a non-finite gradient: zero updates, ``mu``, ``nu`` and ``count``
  unchanged, and ``skipped`` (in the state) counts it. Complex parameters
  keep their momentum in their own (complex) dtype; the statistics are real.

  Args:
    b1: decay of the gradient EMA, in [0, 1).
    b2: decay of the activation second-moment EMA, in [0, 1).
    eps: added to ``V_hat^power``, >= 0.
    power: exponent of ``V_hat`` (0.5 in the paper), > 0.
    mu_dtype: dtype of the first moment (floating); ``None`` keeps the
      params' dtype. The second moment is always float32.
    unmatched: ``"sgd"`` or ``"momentum"``, see above; ``"error"`` is
      ``"sgd"`` for parameters without statistics, but raises a ValueError
      (at trace time, naming the paths) for parameters the capture marked
      uncaptured (``_alignment.UNCAPTURED_SHAPE`` leaves).
    stats_shapes: optional tree of statistics shapes keyed like the params
      (keep-rank or 0.1.0 forms, see ``adaact_optax.layout``), for layers
      whose statistics are not the default ``K[:-1] + (1,)`` (grouped
      convolutions); see ``adaact_optax.linen.stats_shapes``.
    axis_name: a ``pmap``/``shard_map`` axis over which the statistics are
      averaged (one collective per step). Assumes equal local batch sizes.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`ScaleByAdaActState` and whose
    ``update(updates, state, params=None, *, activation_stats)`` needs the
    statistics tree, keyed like the params (``docs/statistics.md``).

  Raises:
    ValueError: at construction, a concrete hyperparameter out of range
      (Python, numpy or jax scalars; traced values are not checked), a
      string, an integer/bool ``mu_dtype`` or an unknown ``unmatched``; at
      ``init``, a complex parameter with a real ``mu_dtype``, a ``stats_shapes`` entry that is
      not a parameter path or cannot scale its parameter (or an uncaptured
      marker with ``unmatched="error"``); at trace time in ``update``,
      missing ``activation_stats``, a statistics leaf at no parameter's path
      or of a shape that cannot scale its parameter (naming the path and
      the shapes), or an uncaptured marker with ``unmatched="error"``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adaact_optax
    >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    >>> grads = {"w": jnp.full((3, 2), 0.5), "b": jnp.full(2, 0.5)}
    >>> stats = {"w": jnp.array([[4.0], [1.0], [0.25]]), "b": jnp.ones(1)}
    >>> tx = adaact_optax.scale_by_adaact()
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params, activation_stats=stats)
    >>> [round(u, 4) for u in updates["w"][:, 0].tolist()]   # step 1: g / sqrt(A)
    [0.25, 0.5, 1.0]

  References:
    Seung, Lee and Ko, `An Adaptive Method Stabilizing Activations for
    Enhanced Generalization <https://arxiv.org/abs/2506.08353>`_, ICDM
    Workshops 2024.
  """
  _validate(b1, b2, eps, power, unmatched)
  mu_dtype = _check_mu_dtype(mu_dtype)

  def init_fn(params):
    if unmatched == "error" and _alignment.uncaptured_paths(stats_shapes):
      raise _uncaptured_error(_alignment.uncaptured_paths(stats_shapes))
    if mu_dtype is not None and not jnp.issubdtype(mu_dtype, jnp.complexfloating):
      complex_params = [_alignment.path_name(p) for p, x in
                        jax.tree.leaves_with_path(params) if jnp.iscomplexobj(x)]
      if complex_params:
        raise ValueError(f"mu_dtype={mu_dtype} is real, but the parameters {complex_params} "
                         "are complex: their momentum would lose its imaginary part. Pass "
                         "mu_dtype=None (the parameters' dtype) or a complex dtype.")
    mu = optax.tree.zeros_like(params, dtype=mu_dtype)
    nu = _alignment.moment_zeros(params, stats_shapes)
    zero = jnp.zeros([], jnp.int32)
    return ScaleByAdaActState(count=zero, mu=mu, nu=nu, skipped=zero)

  def update_fn(updates, state, params=None, *, activation_stats=None, **extra_args):
    del params, extra_args
    stats = _aligned_stats(state, ScaleByAdaActState, "scale_by_adaact", updates,
                           activation_stats, axis_name)
    if unmatched == "error":
      # Only parameters this transform owns (optax.masked/partition drop the rest).
      owned = set(_alignment.param_names(updates))
      refused = [n for n in _alignment.uncaptured_paths(activation_stats) if n in owned]
      if refused:
        raise _uncaptured_error(refused)
    count = optax.safe_increment(state.count)
    t = count.astype(jnp.float32)
    # float32 arrays, so the plain optimizer and one under optax.inject_hyperparams
    # (whose hyperparameters are arrays) round every product identically.
    b1_, b2_, eps_ = (jnp.asarray(h, jnp.float32) for h in (b1, b2, eps))
    bc1, bc2 = 1 - b1_ ** t, 1 - b2_ ** t
    # A step with non-finite statistics is skipped whole (see the docstring)
    # through the arithmetic itself: decays of 1 and zeroed inputs leave mu and
    # nu exactly as they were, and a zero step factor zeroes the update. Only
    # small arrays and the incoming gradient (fused into its one read) are selected.
    ok = _all_finite(stats)
    decay1, decay2 = jnp.where(ok, b1_, 1.0), jnp.where(ok, b2_, 1.0)

    def leaf(path, g, m, v, a):
      g = jnp.where(ok, g, jnp.zeros_like(g))
      if a is None and unmatched != "momentum":
        return g, m, v
      dtype = _compute_dtype(g)
      m_new = decay1 * m.astype(dtype) + (1 - decay1) * g.astype(dtype)
      if a is None:
        u = m_new * jnp.where(ok, 1 / bc1, 0.0)
      else:
        v = decay2 * v + (1 - decay2) * jnp.where(ok, a, 0.0)
        # 1/bc1 is folded into the small per-input-feature scale, so each weight
        # costs one multiply and no divide; as one reciprocal (not a product of
        # two) XLA:CPU compiles it identically with constant and with
        # inject_hyperparams' array hyperparameters, bit for bit.
        scale = jnp.where(ok, _step_scale(v / bc2, power, eps_, bc1), 0.0)
        u = _alignment.apply_scale(m_new, scale, _alignment.path_name(path))
      return u.astype(g.dtype), m_new.astype(m.dtype), v

    results = jax.tree_util.tree_map_with_path(leaf, updates, state.mu, state.nu, stats)
    new_updates, mu, nu = _tree_unzip(updates, results, 3)
    new_state = ScaleByAdaActState(count=jnp.where(ok, count, state.count), mu=mu, nu=nu,
                                   skipped=state.skipped + (~ok).astype(jnp.int32))
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class ScaleByActivationRMSState(NamedTuple):
  """State of ``scale_by_activation_rms``.

  Attributes:
    count: int32 scalar, number of updates taken.
    nu: float32 EMA of the squared layer inputs, exactly as
      ``ScaleByAdaActState.nu`` (same shapes, same partitioning metadata).
    skipped: int32 scalar, number of steps skipped for non-finite statistics.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import adaact_optax
    >>> state = adaact_optax.scale_by_activation_rms().init({"w": jnp.ones((3, 2))})
    >>> int(state.count), int(state.skipped), jax.tree.map(jnp.shape, state.nu)
    (0, 0, {'w': (3, 1)})
  """

  count: jax.Array
  nu: optax.Updates
  skipped: jax.Array


def scale_by_activation_rms(
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    power: jax.typing.ArrayLike = 0.5,
    *,
    stats_shapes: Any | None = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AdaAct's activation preconditioner on its own, as an optax building block.

  Keeps only the EMA of each weight's squared inputs ``V`` (one value per
  input feature, the keep-rank layout of ``adaact_optax.layout``) and a
  count, and divides the incoming updates ``u`` by it::

    V_t = b2 V_{t-1} + (1 - b2) A_t        V_hat = V_t / (1 - b2^t)
    out = u / (V_hat^power + eps)          (V_hat broadcast over output axes)

  A bias's statistic is the constant 1, so it is divided by ``1 + eps``;
  the updates of parameters without statistics (or with the UNCAPTURED
  marker) pass through unchanged. A step whose statistics are not finite
  gives zero updates and leaves ``nu`` and ``count`` unchanged (``skipped``
  counts it); the other transformations of a chain still update their own
  state. AdaAct is the chain::

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

  Raises:
    ValueError: a hyperparameter out of range; in ``update``, missing
      ``activation_stats`` or statistics that cannot scale their parameter.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adaact_optax
    >>> tx = adaact_optax.scale_by_activation_rms()
    >>> params = {"w": jnp.ones((3, 2))}
    >>> stats = {"w": jnp.array([[4.0], [1.0], [0.25]])}
    >>> updates, state = tx.update({"w": jnp.ones((3, 2))}, tx.init(params),
    ...                            activation_stats=stats)
    >>> [round(u, 4) for u in updates["w"][:, 0].tolist()]   # step 1: u / sqrt(A)
    [0.5, 1.0, 2.0]
  """
  _validate(0.0, b2, eps, power, "sgd")

  def init_fn(params):
    zero = jnp.zeros([], jnp.int32)
    return ScaleByActivationRMSState(count=zero, nu=_alignment.moment_zeros(params, stats_shapes),
                                     skipped=zero)

  def update_fn(updates, state, params=None, *, activation_stats=None, **extra_args):
    del params, extra_args
    stats = _aligned_stats(state, ScaleByActivationRMSState, "scale_by_activation_rms",
                           updates, activation_stats, axis_name)
    count = optax.safe_increment(state.count)
    b2_, eps_ = (jnp.asarray(h, jnp.float32) for h in (b2, eps))
    bc2 = 1 - b2_ ** count.astype(jnp.float32)

    def leaf(path, u, v, a):
      if a is None:
        return u, v
      v = b2_ * v + (1 - b2_) * a
      scale = _step_scale(v / bc2, power, eps_)
      out = _alignment.apply_scale(u.astype(_compute_dtype(u)), scale, _alignment.path_name(path))
      return out.astype(u.dtype), v

    results = jax.tree_util.tree_map_with_path(leaf, updates, state.nu, stats)
    new_updates, nu = _tree_unzip(updates, results, 2)
    ok = _all_finite(stats)
    new_updates = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), new_updates)
    return new_updates, ScaleByActivationRMSState(
        count=jnp.where(ok, count, state.count),
        nu=jax.tree.map(lambda new, old: jnp.where(ok, new, old), nu, state.nu),
        skipped=state.skipped + (~ok).astype(jnp.int32))

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
      _alignment.with_statistics(params, stats_shapes))
  tx = optax.partition({"adaact": adaact_tx, "unmatched": other}, labels)

  def update_fn(updates, state, params=None, *, activation_stats=None, **extra_args):
    if activation_stats is None:
      raise _missing_stats_error()
    # The split was fixed at init from stats_shapes; statistics that disagree
    # with it would be dropped (or missed) silently, so they are an error.
    owned = set(_alignment.param_names(updates))
    expected = {n for n, has in zip(_alignment.param_names(updates),
                                    jax.tree.leaves(_alignment.with_statistics(updates,
                                                                             stats_shapes)))
                if has}
    given = {n for n, leaf in _alignment.stats_leaves(activation_stats).items()
             if n in owned and not _alignment.is_uncaptured(leaf)}
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
    eps: added to ``V_hat^power``, >= 0.
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
  _check_learning_rate(learning_rate)
  _check("weight_decay", weight_decay, lambda v: 0 <= v < math.inf, "finite and >= 0")
  if isinstance(unmatched, optax.GradientTransformation):
    if stats_shapes is None:
      raise _unmatched_needs_stats_shapes()
    inner = adaact(learning_rate, b1, b2, eps, weight_decay, power=power, mask=mask,
                   mu_dtype=mu_dtype, unmatched="sgd", stats_shapes=stats_shapes,
                   axis_name=axis_name)
    return _skip_whole_step(_with_unmatched_optimizer(inner, unmatched, stats_shapes),
                            optax.PartitionState)
  return _skip_whole_step(optax.chain(
      scale_by_adaact(b1, b2, eps, power, mu_dtype=mu_dtype, unmatched=unmatched,
                      stats_shapes=stats_shapes, axis_name=axis_name),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  ), tuple)


def _skip_whole_step(tx, state_type):
  """``tx`` whose whole step (weight decay, schedule counts, other branches) is
  skipped when its AdaAct transform skipped a step of non-finite statistics."""
  is_scale = lambda x: isinstance(x, ScaleByAdaActState)

  def update_fn(updates, state, params=None, **extra_args):
    if not isinstance(state, state_type):
      raise _not_a_state_error(state, "adaact")
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


def migrate_state(old_state: Any, tx: optax.GradientTransformation, params: Any) -> Any:
  """Converts an optimizer state written by adaact-optax 0.1.0 into ``tx.init(params)``'s.

  0.2.0 changed AdaAct's state: the second moment ``nu`` is keep-rank
  (``K[:-1] + (1,)`` where 0.1.0 had ``K[:-1]``; ``(1,)`` for vectors where
  0.1.0 had ``()``; ``(*k, C/G, G)`` for grouped convolutions where 0.1.0
  had ``(*k, C)``), and AdaAct's states gained a ``skipped`` counter.
  ``old_state`` may be the state object of 0.1.0 or a checkpoint restored
  without a target (nested dicts and lists, e.g. orbax's
  ``checkpointer.restore(path)``); it is matched to the new state by path
  names, so any wrapper (chain, ``inject_hyperparams``, ``MultiSteps``,
  ``optax.partition``) works as long as ``tx`` is built like the old one.

  Args:
    old_state: the 0.1.0 optimizer state (or its restored tree).
    tx: the optimizer, built as the checkpoint's was (same hyperparameters,
      wrappers and ``stats_shapes``).
    params: the parameters (or their ``jax.ShapeDtypeStruct`` shapes).

  Returns:
    A state with the structure, shapes and dtypes of ``tx.init(params)``:
    old values carried over (second moments converted to keep-rank), the
    new skip counters at 0.

  Raises:
    ValueError: a leaf of the new state the old one lacks (or the reverse),
      or a shape that no 0.1.0 rule converts, naming the path.

  With a checkpoint, pass the optimizer-state entry of a restore made
  without a target (Orbax's ``StandardCheckpointer().restore(path)``).

  Examples:
    >>> import jax.numpy as jnp
    >>> import adaact_optax
    >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    >>> tx = adaact_optax.adaact(0.1)
    >>> old = [{"count": jnp.array(4), "mu": {"w": jnp.ones((3, 2)), "b": jnp.ones(2)},
    ...         "nu": {"w": jnp.full(3, 0.5), "b": jnp.array(1.0)}}, {}, {}]
    >>> new = adaact_optax.migrate_state(old, tx, params)   # the 0.1.0 layout, as restored
    >>> new[0].nu["w"].shape, new[0].nu["b"].shape, int(new[0].skipped)
    ((3, 1), (1,), 0)
  """
  template = jax.eval_shape(tx.init, params)
  old = {_alignment.path_name(p): leaf
         for p, leaf in jax.tree.leaves_with_path(old_state)}
  param_shapes = {_alignment.path_name(p): tuple(jnp.shape(x))
                  for p, x in jax.tree.leaves_with_path(params)}
  states = (ScaleByAdaActState, ScaleByActivationRMSState)
  new_counters = {
      "/".join(filter(None, (_alignment.path_name(p), "skipped")))
      for p, node in jax.tree.leaves_with_path(
          template, is_leaf=lambda x: isinstance(x, states)) if isinstance(node, states)}
  used = set()

  def param_for(name):
    # The longest parameter path that ends the state path ('0/nu/Dense_0/kernel').
    hits = [p for p in param_shapes if name == p or name.endswith("/" + p)]
    return max(hits, key=len) if hits else None

  def convert(path, t):
    name = _alignment.path_name(path)
    if name not in old:
      if name in new_counters:
        return jnp.zeros(t.shape, t.dtype)
      raise ValueError(
          f"migrate_state: the new state has '{name}' (shape {t.shape}), which the old state "
          f"lacks; its paths: {sorted(old)[:8]}... Build tx exactly as the checkpoint's "
          "optimizer was built (the same wrappers and hyperparameters).")
    used.add(name)
    value = jnp.asarray(old[name])
    if value.shape == t.shape:
      return value.astype(t.dtype)
    param = param_for(name)
    if param is None:
      raise ValueError(f"migrate_state: '{name}' has shape {value.shape} in the old state and "
                       f"{t.shape} in the new one, and is no parameter's second moment")
    converted = _alignment.to_keep_rank(value, param_shapes[param], param)
    if not all(d in (1, n) for d, n in zip(converted.shape, t.shape)):
      raise ValueError(
          f"migrate_state: the 0.1.0 second moment at '{name}' of shape {value.shape} "
          f"(keep-rank {converted.shape}) does not fit the new state's {t.shape}: build tx "
          "with the stats_shapes the checkpoint's optimizer had")
    return jnp.broadcast_to(converted, t.shape).astype(t.dtype)

  new_state = jax.tree_util.tree_map_with_path(convert, template)
  unused = sorted(set(old) - used)
  if unused:
    raise ValueError(f"migrate_state: the old state has {unused[:8]}, which the new state "
                     "lacks: it was written by another optimizer, or tx is built differently")
  return new_state
