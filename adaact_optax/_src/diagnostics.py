"""Per-layer summaries of AdaAct's activation statistics and of its step, cheap enough to log
every step: ``activation_summary`` (how large ``V_hat`` and the step scale are) and
``scaling_summary`` (how non-uniform the scaling is across input features, and how large the
update is)."""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp
from jax import tree_util

from adaact_optax._src import alignment
from adaact_optax._src.alias import adaact
from adaact_optax._src.transform import (ScaleByActivationRMSState, ScaleByAdaActState,
                                         scale_denominator, step_scale)

# States holding AdaAct's second moment `nu` and its `count`.
_STATES = (ScaleByAdaActState, ScaleByActivationRMSState)

# adaact()'s defaults, read from its signature so they cannot drift: used for
# hyperparameters neither passed nor injected.
_DEFAULTS = {name: inspect.signature(adaact).parameters[name].default
             for name in ("b1", "b2", "eps", "power")}


def _raw(x):
  # Unwraps nnx.Optimizer's OptArray/OptVariable (pytrees around one array).
  return tree_util.tree_leaves(x)[0]


def _is_injected(x) -> bool:
  # optax.inject_hyperparams' states (stateless or stateful schedules alike).
  return hasattr(x, "hyperparams") and hasattr(x, "inner_state")


def _adaact_states(tree, hyperparams: dict):
  """Yields every AdaAct state in ``tree`` with its injected hyperparameters."""
  is_node = lambda x: isinstance(x, _STATES) or _is_injected(x)
  for node in tree_util.tree_leaves(tree, is_leaf=is_node):
    if isinstance(node, _STATES):
      yield node, hyperparams
    elif _is_injected(node):
      yield from _adaact_states(node.inner_state, {**hyperparams, **node.hyperparams})


def activation_summary(opt_state: Any, *, b2: jax.typing.ArrayLike | None = None,
                       eps: jax.typing.ArrayLike | None = None,
                       power: jax.typing.ArrayLike | None = None) -> dict[str, jax.Array]:
  """Mean and max of ``V_hat`` and of the step scale, per parameter, as float32 scalars.

  For every parameter whose state has more than one per-input-feature
  entry (kernels, embedding tables; not biases or norm parameters, whose
  state has one entry), with ``V_hat = nu / (1 - b2**count)`` (the bias-corrected mean
  square of each input feature, in the input's units squared) and
  ``scale = 1 / (V_hat**power + eps)`` (what multiplies ``M_hat``), returns
  ``{'<path>/v_hat_mean', '<path>/v_hat_max', '<path>/scale_mean',
  '<path>/scale_max'}``, e.g. ``'Dense_0/kernel/v_hat_mean'``. A parameter
  that never received statistics (unmatched) reports ``V_hat`` 0 and
  ``scale`` ``1/eps``. Before the first update every ``V_hat`` is 0.

  Jit-able; one reduction per parameter. ``opt_state`` may be the bare
  ``ScaleByAdaActState``, the ``adaact(...)`` chain's state, or any state
  holding it (``optax.inject_hyperparams``, ``optax.MultiSteps``,
  ``nnx.Optimizer.opt_state``), and ``scale_by_activation_rms``'s state
  in a chain of building blocks.

  Args:
    opt_state: an optimizer state containing one or more ``ScaleByAdaActState``
      (or ``ScaleByActivationRMSState``).
    b2, eps, power: the optimizer's values. Each defaults to the value
      injected by ``optax.inject_hyperparams`` if there is one, else to
      ``adaact``'s default (0.999, 1e-8, 0.5): pass them if you built the
      optimizer with other values.

  Returns:
    A flat dict of float32 scalars, four per parameter (see above).

  Raises:
    ValueError: if ``opt_state`` holds no ``ScaleByAdaActState``, or two
      of them name the same parameter path.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adaact_optax
    >>> params = {"w": jnp.ones((3, 2))}
    >>> tx = adaact_optax.adaact(0.1)
    >>> stats = {"w": jnp.array([[4.0], [1.0], [0.25]])}   # mean squares of 3 inputs
    >>> _, opt_state = tx.update({"w": jnp.ones((3, 2))}, tx.init(params), params,
    ...                          activation_stats=stats)
    >>> summary = adaact_optax.activation_summary(opt_state)
    >>> {k: round(float(v), 4) for k, v in summary.items()}
    {'w/v_hat_mean': 1.75, 'w/v_hat_max': 4.0, 'w/scale_mean': 1.1667, 'w/scale_max': 2.0}
  """
  given = {"b2": b2, "eps": eps, "power": power}
  out: dict[str, jax.Array] = {}
  for name, _, _, h, v_hat in _v_hat_leaves("activation_summary", opt_state, given):
    scale = step_scale(v_hat, h["power"], h["eps"])
    out[f"{name}/v_hat_mean"] = jnp.mean(v_hat)
    out[f"{name}/v_hat_max"] = jnp.max(v_hat)
    out[f"{name}/scale_mean"] = jnp.mean(scale)
    out[f"{name}/scale_max"] = jnp.max(scale)
  return out


def _v_hat_leaves(caller: str, opt_state: Any, given: dict):
  """Yields ``(name, state, mu, hyperparameters, V_hat)`` for every parameter
  of every AdaAct state in ``opt_state`` whose ``nu`` has more than one entry
  (``mu``: the parameter's first moment, ``None`` in a
  ``ScaleByActivationRMSState``).

  ``given``: the caller's hyperparameters (``None``: injected, else
  ``adaact``'s default); ``eps`` comes back as a float32 array, ``V_hat`` as
  the transform computes it (float32 ``1 - b2**count``; 0 before step 1).
  """
  found = list(_adaact_states(opt_state, {}))
  if not found:
    raise ValueError(f"{caller}: no ScaleByAdaActState in the optimizer state "
                     f"of type {type(opt_state).__name__}")
  seen: set[str] = set()
  for state, injected in found:
    h = {k: given[k] if given[k] is not None else
         _raw(injected[k]) if k in injected else _DEFAULTS[k] for k in given}
    h["eps"] = jnp.asarray(h["eps"], jnp.float32)
    # As the transform computes it: float32 hyperparameters, t = count.
    count = jnp.asarray(_raw(state.count))
    bias_correction = 1 - jnp.asarray(h["b2"], jnp.float32) ** count.astype(jnp.float32)
    bias_correction = jnp.where(count > 0, bias_correction, 1.0)  # nu is 0 before step 1
    mus = {} if not hasattr(state, "mu") else {
        alignment.path_name(p): m for p, m in jax.tree.leaves_with_path(state.mu)}
    for path, nu in jax.tree.leaves_with_path(state.nu):
      if jnp.size(nu) <= 1:  # a bias, a norm scale, an uncaptured marker: nothing to summarise
        continue
      name = alignment.path_name(path)
      if name in seen:
        raise ValueError(f"{caller}: two AdaAct states have a parameter at '{name}'")
      seen.add(name)
      yield name, state, mus.get(name), h, nu / bias_correction


def scaling_summary(opt_state: Any, updates: Any | None = None, *,
                    b1: jax.typing.ArrayLike | None = None,
                    b2: jax.typing.ArrayLike | None = None,
                    eps: jax.typing.ArrayLike | None = None,
                    power: jax.typing.ArrayLike | None = None) -> dict[str, jax.Array]:
  """How non-uniform AdaAct's scaling is across input features, and the update's size.

  AdaAct divides each weight's momentum by ``d = V_hat**power + eps``, one
  value per input feature (``sqrt(V_hat)`` at the default power: the RMS of
  that feature). If ``d`` is nearly constant across a layer's input features
  (inputs that come out of a LayerNorm, say), the layer gets one learning
  rate, ``lr / d``, and nothing per feature. For every parameter whose state
  has more than one per-input-feature entry (as in ``activation_summary``),
  returns float32 scalars keyed ``'<path>/<stat>'``:

  - ``denom_cv``: the coefficient of variation of ``d`` over its entries
    (population std / mean; 0 when the mean is 0);
  - ``denom_max_over_min``: ``max(d) / min(d)`` (1 when ``d`` is all 0,
    ``inf`` when only its minimum is);
  - ``update_rms``: ``sqrt(mean(u**2))`` over the parameter's elements, with
    ``u`` the parameter's leaf of ``updates`` when given (what
    ``tx.update`` returned: learning rate and weight decay included), else
    ``M_hat / d`` from the state (``mu``, ``nu``, ``count``): the direction
    before the learning rate and weight decay. A
    ``ScaleByActivationRMSState`` has no ``mu``: its parameters report
    ``update_rms`` only when ``updates`` is given.

  The entries of ``d`` are the input features: a Dense kernel ``(in, out)``
  has ``in``, a conv kernel ``(*window, C, O)`` has ``prod(window) * C``
  (patch elements), an attention query kernel ``(in, heads, head_dim)`` has
  ``in``, a tied embedding table read by ``Embed.attend`` has the ``dim``
  features it multiplies. Before the first update ``V_hat`` is 0, so ``d``
  is ``eps`` everywhere: CV 0, ratio 1, and ``update_rms`` from the state is 0.

  Jit-able (no host transfer; one reduction per parameter and, for
  ``update_rms``, one pass over the update). ``opt_state`` is found inside
  the same wrappers as in ``activation_summary``.

  Args:
    opt_state: an optimizer state containing one or more ``ScaleByAdaActState``
      (or ``ScaleByActivationRMSState``).
    updates: optional; the updates tree ``tx.update`` returned with this
      state, keyed like the params (``optax.MaskedNode`` leaves of a
      partition are fine: only the AdaAct parameters are read).
    b1, b2, eps, power: the optimizer's values; each defaults to the value
      injected by ``optax.inject_hyperparams``, else to ``adaact``'s default
      (0.9, 0.999, 1e-8, 0.5). ``b1`` is used only without ``updates``.

  Returns:
    A flat dict of float32 scalars, three per parameter (two for a
    ``ScaleByActivationRMSState`` parameter without ``updates``).

  Raises:
    ValueError: ``opt_state`` holds no ``ScaleByAdaActState``, two of them
      name the same parameter path, or ``updates`` has no leaf (or a leaf of
      another shape) at a summarised parameter's path.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adaact_optax
    >>> params = {"w": jnp.ones((3, 2))}
    >>> tx = adaact_optax.adaact(0.1, eps=0.0, weight_decay=0.0)
    >>> stats = {"w": jnp.array([[4.0], [1.0], [0.25]])}   # RMS of the inputs: 2, 1, 0.5
    >>> updates, opt_state = tx.update({"w": jnp.ones((3, 2))}, tx.init(params), params,
    ...                                activation_stats=stats)
    >>> # Step 1: M_hat = g = 1, so the rows of the step are 1/2, 1, 2 (times lr 0.1).
    >>> summary = adaact_optax.scaling_summary(opt_state, updates, eps=0.0)
    >>> {k: round(float(v), 4) for k, v in summary.items()}
    {'w/denom_cv': 0.5345, 'w/denom_max_over_min': 4.0, 'w/update_rms': 0.1323}
    >>> round(float(adaact_optax.scaling_summary(opt_state, eps=0.0)["w/update_rms"]), 4)
    1.3229
  """
  given = {"b1": b1, "b2": b2, "eps": eps, "power": power}
  update_leaves = None
  if updates is not None:
    update_leaves = {alignment.path_name(p): u for p, u in jax.tree.leaves_with_path(updates)}
  out: dict[str, jax.Array] = {}
  for name, state, mu, h, v_hat in _v_hat_leaves("scaling_summary", opt_state, given):
    d = scale_denominator(v_hat, h["power"], h["eps"])
    mean, d_max, d_min = jnp.mean(d), jnp.max(d), jnp.min(d)
    out[f"{name}/denom_cv"] = jnp.where(mean > 0, jnp.std(d) / jnp.where(mean > 0, mean, 1), 0.0)
    out[f"{name}/denom_max_over_min"] = jnp.where(d_max > 0, d_max / d_min, 1.0)
    if update_leaves is not None:
      u = update_leaves.get(name)
      # The parameter's shape is mu's; without mu (scale_by_activation_rms) at least its rank.
      fits = u is not None and (u.shape == mu.shape if mu is not None else u.ndim == v_hat.ndim)
      if not fits:
        got = "no leaf" if u is None else f"a leaf of shape {u.shape}"
        want = f"shape {mu.shape}" if mu is not None else f"statistics of shape {v_hat.shape}"
        raise ValueError(
            f"scaling_summary: updates has {got} at '{name}', an AdaAct parameter of {want}; "
            "pass the updates tree tx.update returned with this state, keyed like the params")
    elif mu is not None:
      count = jnp.asarray(_raw(state.count))
      bc1 = 1 - jnp.asarray(h["b1"], jnp.float32) ** count.astype(jnp.float32)
      bc1 = jnp.where(count > 0, bc1, 1.0)
      # Before step 1 there is no step (and with eps 0 the scale would be 1/0).
      scale = jnp.where(count > 0, step_scale(v_hat, h["power"], h["eps"], bc1), 0.0)
      mu = mu if jnp.iscomplexobj(mu) else mu.astype(jnp.float32)
      u = alignment.apply_scale(mu, scale, name)
    else:
      continue
    assert u is not None
    out[f"{name}/update_rms"] = jnp.sqrt(jnp.mean(jnp.abs(u).astype(jnp.float32) ** 2))
  return out
