"""Per-layer summaries of AdaAct's activation statistics, cheap enough to log every step."""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp
from jax import tree_util

from adaact_optax import _alignment
from adaact_optax.transform import (ScaleByActivationRMSState, ScaleByAdaActState, adaact,
                                    _step_scale)

# States holding AdaAct's second moment `nu` and its `count`.
_STATES = (ScaleByAdaActState, ScaleByActivationRMSState)

# adaact()'s defaults, read from its signature so they cannot drift: used for
# hyperparameters neither passed nor injected.
_DEFAULTS = {name: inspect.signature(adaact).parameters[name].default
             for name in ("b2", "eps", "power")}


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
  found = list(_adaact_states(opt_state, {}))
  if not found:
    raise ValueError("activation_summary: no ScaleByAdaActState in the optimizer state "
                     f"of type {type(opt_state).__name__}")
  given = {"b2": b2, "eps": eps, "power": power}
  out: dict[str, jax.Array] = {}
  for state, injected in found:
    h = {k: given[k] if given[k] is not None else
         _raw(injected[k]) if k in injected else _DEFAULTS[k] for k in given}
    # As the transform computes it: float32 hyperparameters, t = count.
    count = jnp.asarray(_raw(state.count))
    bias_correction = 1 - jnp.asarray(h["b2"], jnp.float32) ** count.astype(jnp.float32)
    bias_correction = jnp.where(count > 0, bias_correction, 1.0)  # nu is 0 before step 1
    eps_ = jnp.asarray(h["eps"], jnp.float32)
    for path, nu in jax.tree.leaves_with_path(state.nu):
      if jnp.size(nu) <= 1:  # a bias, a norm scale, an uncaptured marker: nothing to summarise
        continue
      name = _alignment.path_name(path)
      if f"{name}/v_hat_mean" in out:
        raise ValueError(f"activation_summary: two AdaAct states have a parameter at '{name}'")
      v_hat = nu / bias_correction
      scale = _step_scale(v_hat, h["power"], eps_)
      out[f"{name}/v_hat_mean"] = jnp.mean(v_hat)
      out[f"{name}/v_hat_max"] = jnp.max(v_hat)
      out[f"{name}/scale_mean"] = jnp.mean(scale)
      out[f"{name}/scale_max"] = jnp.max(scale)
  return out
