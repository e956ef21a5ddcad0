"""AdaAct as an Optax gradient transformation.

Reference: H. Seung, J. Lee, H. Ko, "An Adaptive Method Stabilizing
Activations for Enhanced Generalization", ICDM Workshops 2024,
arXiv:2506.08353.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adaact_optax._src import alignment, boxes, checks, errors


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

  count: jax.Array  # type: ignore[assignment]  # a field, shadowing tuple.count as optax's states do
  mu: optax.Updates
  nu: optax.Updates
  skipped: jax.Array


def _tree_unzip(updates, results, n):
  """``n`` trees shaped like ``updates`` from its tree of ``n``-tuples ``results``."""
  outer = jax.tree.structure(updates)
  if outer.num_leaves == 0:  # jax.tree.transpose cannot rebuild n empty trees
    return (results,) * n
  return jax.tree.transpose(outer, jax.tree.structure((0,) * n), results)


def _all_finite(tree) -> jax.Array:
  """One bool scalar: whether every element of every leaf is finite."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.asarray(True)
  # One check over all leaves laid end to end (a copy of the statistics: one float per
  # input feature), not per-leaf flags joined by ANDs: XLA copies such a chain of L scalar
  # ANDs into each of the L per-weight update fusions, and the compiled update grows as L^2.
  return jnp.all(jnp.isfinite(jnp.concatenate([jnp.ravel(x) for x in leaves])))


class _StepSkip:
  """The one step-skip of both rules: a step whose statistics are not all finite.

  It is skipped through the arithmetic itself: decays of 1 and zeroed inputs
  leave the moments exactly as they were, a zero step factor zeroes the
  update, ``count`` stays and ``skipped`` counts the step. Only small arrays
  and the incoming gradient (fused into its one read) are selected, so no
  second copy of the moments is materialised. ``adaact``'s alias extends the
  same decision (read from ``skipped``) to the rest of its chain.
  """

  def __init__(self, stats: Any):
    self.ok = _all_finite(stats)

  def decay(self, b: jax.Array) -> jax.Array:
    return jnp.where(self.ok, b, 1.0)

  def zero(self, x: jax.Array) -> jax.Array:
    return jnp.where(self.ok, x, jnp.zeros_like(x))

  def counters(self, count: jax.Array, state: Any) -> tuple[jax.Array, jax.Array]:
    """The new state's ``count`` and ``skipped``."""
    return jnp.where(self.ok, count, state.count), state.skipped + (~self.ok).astype(jnp.int32)


def _compute_dtype(x):
  # float32 arithmetic for real parameters (bfloat16 included), complex64 for
  # complex ones, so the imaginary part is never dropped.
  return jnp.complex64 if jnp.iscomplexobj(x) else jnp.float32


def step_scale(v_hat: jax.Array, power: jax.typing.ArrayLike, eps: jax.typing.ArrayLike,
               bc1: jax.typing.ArrayLike = 1.0) -> jax.Array:
  """The factor AdaAct multiplies ``M_hat`` by: ``1 / (v_hat ** power + eps)``.

  With ``bc1`` (the first moment's bias correction) it is the factor of the
  raw ``M_t`` instead: ``1 / ((v_hat ** power + eps) * bc1)``. Where the
  denominator is 0 (``eps=0`` and a feature that never carried input) the
  factor is 0: that feature's weights get no gradient and no momentum, and
  ``0 * inf`` would be NaN. Computed per input feature, never per weight.
  """
  denominator = scale_denominator(v_hat, power, eps) * bc1
  return jnp.where(denominator == 0, 0.0, 1 / denominator)


def scale_denominator(v_hat: jax.Array, power: jax.typing.ArrayLike,
                      eps: jax.typing.ArrayLike) -> jax.Array:
  """AdaAct's per-input-feature denominator ``v_hat ** power + eps``."""
  if isinstance(power, (int, float)):
    root = jnp.sqrt(v_hat) if power == 0.5 else v_hat ** power
  else:  # an array under inject_hyperparams: keep the exact sqrt at 0.5
    root = jnp.where(power == 0.5, jnp.sqrt(v_hat), v_hat ** power)
  return root + eps


def _keep_where_no_rows(a: jax.Array, v_old: jax.Array, v_new: jax.Array) -> jax.Array:
  """``v_new``, but ``v_old`` at features whose statistic is the no-rows marker.

  The capture marks a feature that met no rows this step (a weight in the
  ``cond`` branch not taken, an expert routed no tokens) with ``-0.0``: its
  second moment is left as it was instead of decaying towards 0.
  """
  return jnp.where(alignment.is_no_rows(a), v_old, v_new)


def _pmean_keeping_no_rows(stats, axis_name: str):
  """``lax.pmean`` of the statistics across devices, keeping the no-rows marker.

  A sum of ``-0.0``s reduces to ``+0.0``, so the marker is encoded in the
  sum itself, keeping one all-reduce of the statistics' own size: a device
  without rows sends ``-tiny``, one with rows ``a + n * tiny`` (``tiny`` the
  smallest normal float32, ``n`` devices). The sum is negative exactly when
  no device had rows (then ``-0.0``); otherwise it is the sum of the
  devices' statistics (a device without rows counts as 0) plus at most
  ``n**2 * tiny``, below float32 rounding for any mean square above about
  ``n * 1e-31``.
  """
  n = jax.lax.axis_size(axis_name)
  tiny = np.float32(np.finfo(np.float32).tiny)

  def encode(a):
    a = jnp.asarray(a, jnp.float32)
    return jnp.where(alignment.is_no_rows(a), -tiny, a + np.float32(n) * tiny)

  total = jax.lax.psum(jax.tree.map(encode, stats), axis_name)
  decode = lambda s: jnp.where((s < 0) & jnp.isfinite(s), jnp.float32(alignment.NO_ROWS), s / n)
  return jax.tree.map(decode, total)


def _aligned_stats(state, state_type, name, updates, activation_stats, axis_name):
  """The checks every statistics-taking ``update`` makes, then the aligned statistics."""
  if not isinstance(state, state_type):
    raise errors.not_a_state_error(state, name)
  if activation_stats is None:
    raise errors.missing_stats_error()
  if axis_name is not None:  # one mean over the devices' rows
    activation_stats = _pmean_keeping_no_rows(activation_stats, axis_name)
  return alignment.align(activation_stats, updates, state.nu)


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
  With :math:`\epsilon = 0`, an input feature whose :math:`\hat V_t` is 0
  (it never carried input, so its weights have no gradient either) gets
  :math:`u_t = 0` rather than :math:`0/0`; so does one that a gradient
  reached only through rows a ``row_mask`` excluded (rather than an
  infinite update). Parameters without statistics (norm scales, ...) pass the raw gradient
  (``unmatched="sgd"``, the authors' rule) or :math:`\hat M_t`
  (``unmatched="momentum"``).

  A statistic of ``-0.0`` (IEEE negative zero, ``jnp.signbit`` set) means
  "no rows this step": the capture gives it to a weight in the ``cond``
  branch not taken, an expert routed no tokens, a stacked slice no iteration
  used. That feature's :math:`V` is left as it was (not decayed towards 0);
  :math:`M` and the step are updated as usual (with the gradient, zero for
  an unused weight). A real mean square is never negative, so the marker
  costs nothing; ``MultiSteps`` and ``axis_name`` averaging keep it where
  every micro-batch (device) had no rows and count it as 0 otherwise.

  A step whose statistics are not all finite (an input that overflows
  float32 when squared, a NaN) is skipped as ``optax.apply_if_finite``
  skips a non-finite gradient: zero updates, ``mu``, ``nu`` and ``count``
  unchanged, and ``skipped`` (in the state) counts it. Complex parameters
  keep their momentum in their own (complex) dtype; the statistics are real.

  Args:
    b1: decay of the gradient EMA, in [0, 1).
    b2: decay of the activation second-moment EMA, in [0, 1).
    eps: added to ``V_hat^power``, >= 0; with 0, a feature whose ``V_hat``
      is 0 gets a zero update (not 0/0).
    power: exponent of ``V_hat`` (0.5 in the paper), > 0.
    mu_dtype: dtype of the first moment (floating); ``None`` keeps the
      params' dtype. The second moment is always float32.
    unmatched: ``"sgd"`` or ``"momentum"``, see above; ``"error"`` is
      ``"sgd"`` for parameters without statistics, but raises a ValueError
      (at trace time, naming the paths) for parameters the capture marked
      uncaptured (``adaact_optax.layout.UNCAPTURED_SHAPE`` leaves).
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
    statistics tree, keyed like the params (``docs/statistics.md``). Its
    entries for parameters outside ``updates`` (frozen ones, those outside
    ``nnx.Optimizer``'s ``wrt=``, another ``optax.partition`` branch's) are
    ignored, so the statistics of the whole model can be passed.

  Raises:
    ValueError: at construction, a concrete hyperparameter out of range
      (Python, numpy or jax scalars; traced values are not checked), a
      string, an integer/bool ``mu_dtype`` or an unknown ``unmatched``; at
      ``init``, a complex parameter with a real ``mu_dtype``, a ``stats_shapes`` with no
      entry at a parameter path, an entry that cannot scale its parameter
      (or an uncaptured marker with ``unmatched="error"``); at trace time
      in ``update``, missing ``activation_stats``, statistics with no leaf at
      a parameter path (not keyed like the params) or a leaf of a shape that
      cannot scale its parameter (naming the path and the shapes), or an
      uncaptured marker with ``unmatched="error"``.

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
  checks.validate(b1, b2, eps, power, unmatched)
  mu_dtype = checks.check_mu_dtype(mu_dtype)

  def init_fn(params):
    if unmatched == "error" and alignment.uncaptured_paths(stats_shapes):
      raise errors.uncaptured_error(alignment.uncaptured_paths(stats_shapes))
    if mu_dtype is not None and not jnp.issubdtype(mu_dtype, jnp.complexfloating):
      complex_params = [alignment.path_name(p) for p, x in
                        jax.tree.leaves_with_path(params) if jnp.iscomplexobj(x)]
      if complex_params:
        raise ValueError(f"mu_dtype={mu_dtype} is real, but the parameters {complex_params} "
                         "are complex: their momentum would lose its imaginary part. Pass "
                         "mu_dtype=None (the parameters' dtype) or a complex dtype.")
    mu = optax.tree.zeros_like(params, dtype=mu_dtype)
    nu = boxes.moment_zeros(params, stats_shapes)
    # Two arrays, not one twice: a step that donates its state (donate_argnums)
    # needs every leaf in its own buffer.
    return ScaleByAdaActState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu,
                              skipped=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, *, activation_stats=None, **extra_args):
    del params, extra_args
    stats = _aligned_stats(state, ScaleByAdaActState, "scale_by_adaact", updates,
                           activation_stats, axis_name)
    if unmatched == "error":
      # Only parameters this transform owns (optax.masked/partition drop the rest).
      owned = set(alignment.param_names(updates))
      refused = [n for n in alignment.uncaptured_paths(activation_stats) if n in owned]
      if refused:
        raise errors.uncaptured_error(refused)
    count = optax.safe_increment(state.count)
    t = count.astype(jnp.float32)
    # float32 arrays, so the plain optimizer and one under optax.inject_hyperparams
    # (whose hyperparameters are arrays) round every product identically.
    b1_, b2_, eps_ = (jnp.asarray(h, jnp.float32) for h in (b1, b2, eps))
    bc1, bc2 = 1 - b1_ ** t, 1 - b2_ ** t
    skip = _StepSkip(stats)
    decay1, decay2 = skip.decay(b1_), skip.decay(b2_)

    def leaf(path, g, m, v, a):
      g = skip.zero(g)
      if a is None and unmatched != "momentum":
        return g, m, v
      dtype = _compute_dtype(g)
      m_new = decay1 * m.astype(dtype) + (1 - decay1) * g.astype(dtype)
      if a is None:
        u = m_new * skip.zero(1 / bc1)
      else:
        v = _keep_where_no_rows(a, v, decay2 * v + (1 - decay2) * skip.zero(a))
        # 1/bc1 is folded into the small per-input-feature scale, so each weight
        # costs one multiply and no divide; as one reciprocal (not a product of
        # two) XLA:CPU compiles it identically with constant and with
        # inject_hyperparams' array hyperparameters, bit for bit.
        scale = skip.zero(step_scale(v / bc2, power, eps_, bc1))
        u = alignment.apply_scale(m_new, scale, alignment.path_name(path))
      return u.astype(g.dtype), m_new.astype(m.dtype), v

    results = jax.tree_util.tree_map_with_path(leaf, updates, state.mu, state.nu, stats)
    new_updates, mu, nu = _tree_unzip(updates, results, 3)
    count, skipped = skip.counters(count, state)
    return new_updates, ScaleByAdaActState(count=count, mu=mu, nu=nu, skipped=skipped)

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

  count: jax.Array  # type: ignore[assignment]  # a field, shadowing tuple.count as optax's states do
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
  with ``eps=0`` a feature whose ``V_hat`` is 0 gets a zero update (not
  0/0); the updates of parameters without statistics (or with the UNCAPTURED
  marker) pass through unchanged. A ``-0.0`` statistic (no rows this step,
  see :func:`scale_by_adaact`) leaves that feature's ``V`` as it was. A step
  whose statistics are not finite
  gives zero updates and leaves ``nu`` and ``count`` unchanged (``skipped``
  counts it); the other transformations of a chain still update their own
  state. AdaAct is the chain::

    optax.chain(optax.ema(b1, debias=True), scale_by_activation_rms(b2, eps),
                optax.add_decayed_weights(wd), optax.scale_by_learning_rate(lr))
    # == adaact(lr, b1, b2, eps, wd, unmatched="momentum") up to float32 rounding

  Args:
    b2: decay of the activation second-moment EMA, in [0, 1).
    eps: added to ``V_hat^power``, >= 0; with 0, a feature whose ``V_hat``
      is 0 gets a zero update.
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
  checks.validate(0.0, b2, eps, power, "sgd")

  def init_fn(params):
    return ScaleByActivationRMSState(count=jnp.zeros([], jnp.int32),  # own buffers, as above
                                     nu=boxes.moment_zeros(params, stats_shapes),
                                     skipped=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, *, activation_stats=None, **extra_args):
    del params, extra_args
    stats = _aligned_stats(state, ScaleByActivationRMSState, "scale_by_activation_rms",
                           updates, activation_stats, axis_name)
    count = optax.safe_increment(state.count)
    b2_, eps_ = (jnp.asarray(h, jnp.float32) for h in (b2, eps))
    bc2 = 1 - b2_ ** count.astype(jnp.float32)
    skip = _StepSkip(stats)
    decay2 = skip.decay(b2_)

    def leaf(path, u, v, a):
      u = skip.zero(u)
      if a is None:
        return u, v
      v = _keep_where_no_rows(a, v, decay2 * v + (1 - decay2) * skip.zero(a))
      scale = skip.zero(step_scale(v / bc2, power, eps_))
      out = alignment.apply_scale(u.astype(_compute_dtype(u)), scale, alignment.path_name(path))
      return out.astype(u.dtype), v

    results = jax.tree_util.tree_map_with_path(leaf, updates, state.nu, stats)
    new_updates, nu = _tree_unzip(updates, results, 2)
    count, skipped = skip.counters(count, state)
    return new_updates, ScaleByActivationRMSState(count=count, nu=nu, skipped=skipped)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
