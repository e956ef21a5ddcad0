"""activation_summary against hand-computed values, through every state wrapper."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import adaact_optax
from adaact_optax import nnx as aa_nnx
from adaact_optax.diagnostics import activation_summary
from conftest import assert_f32_close, bias_correction_ulps


def _hand_state():
  # b2 = 0.5, count = 2: 1 - b2**2 = 0.75, so V_hat = nu / 0.75.
  # Keep-rank layout: a Dense kernel (2, out) has (2, 1), its bias (1,).
  nu = {"Dense_0": {"kernel": jnp.array([[0.075], [0.3]]), "bias": jnp.zeros((1,))},
        "Conv_0": {"kernel": jnp.array([[[[0.0], [0.75]]], [[[3.0], [0.75]]]])}}
  mu = jax.tree.map(jnp.zeros_like, nu)
  return adaact_optax.ScaleByAdaActState(count=jnp.array(2, jnp.int32), mu=mu, nu=nu,
                                         skipped=jnp.array(0, jnp.int32))


HAND = {  # V_hat and 1 / (sqrt(V_hat) + eps) with eps = 0.01
    "Dense_0/kernel/v_hat_mean": 0.25, "Dense_0/kernel/v_hat_max": 0.4,
    "Dense_0/kernel/scale_mean": (1 / (0.1 ** 0.5 + 0.01) + 1 / (0.4 ** 0.5 + 0.01)) / 2,
    "Dense_0/kernel/scale_max": 1 / (0.1 ** 0.5 + 0.01),
    "Conv_0/kernel/v_hat_mean": 1.5, "Conv_0/kernel/v_hat_max": 4.0,
    "Conv_0/kernel/scale_mean": (100 + 1 / 1.01 + 1 / 2.01 + 1 / 1.01) / 4,
    "Conv_0/kernel/scale_max": 100.0,
}


def _check(summary, expected, ulps=16):
  assert summary.keys() == expected.keys()
  for k, v in expected.items():
    assert summary[k].shape == () and summary[k].dtype == jnp.float32
    assert_f32_close(summary[k], np.float64(v), ulps_per_step=ulps, err_msg=k)


def test_hand_computed_values_and_jit():
  state = _hand_state()
  _check(activation_summary(state, b2=0.5, eps=0.01), HAND)  # bias (one entry): left out
  jitted = jax.jit(lambda s: activation_summary(s, b2=0.5, eps=0.01))(state)
  _check(jitted, HAND)
  # power 1: scale = 1 / (V_hat + eps).
  summary = activation_summary(state, b2=0.5, eps=0.01, power=1.0)
  assert_f32_close(summary["Dense_0/kernel/scale_max"], np.float64(1 / 0.11))
  # Before the first update: V_hat 0, scale 1/eps.
  fresh = state._replace(count=jnp.array(0, jnp.int32), nu=jax.tree.map(jnp.zeros_like, state.nu))
  summary = activation_summary(fresh, eps=0.01)
  assert float(summary["Conv_0/kernel/v_hat_max"]) == 0
  assert_f32_close(summary["Conv_0/kernel/scale_mean"], np.float64(100))
  with pytest.raises(ValueError, match="no ScaleByAdaActState"):
    activation_summary(optax.adam(1e-3).init({"w": jnp.ones(2)}))


def _trained(tx, params, steps=3):
  """Runs `steps` AdaAct updates of a 2-layer linear model on fixed data."""
  x = jnp.linspace(-2, 2, 12).reshape(4, 3)
  state = tx.init(params)
  for _ in range(steps):
    h = x @ params["a"]["kernel"]
    stats = {"a": {"kernel": jnp.mean(x ** 2, 0)}, "b": {"kernel": jnp.mean(h ** 2, 0)}}
    grads = jax.grad(lambda p: jnp.sum((x @ p["a"]["kernel"] @ p["b"]["kernel"]) ** 2))(params)
    updates, state = tx.update(grads, state, params, activation_stats=stats)
    params = optax.apply_updates(params, updates)
  return state


def _expected(scale_state, b2, eps, power):
  """float64 numpy; compare with ``bias_correction_ulps``: the summary computes ``1 - b2**t`` in float32."""
  t = int(scale_state.count)
  out = {}
  for name, nu in [("a/kernel", scale_state.nu["a"]["kernel"]),
                   ("b/kernel", scale_state.nu["b"]["kernel"])]:
    v_hat = np.asarray(nu, np.float64) / (1 - b2 ** t)
    scale = 1 / (v_hat ** power + eps)
    out.update({f"{name}/v_hat_mean": v_hat.mean(), f"{name}/v_hat_max": v_hat.max(),
                f"{name}/scale_mean": scale.mean(), f"{name}/scale_max": scale.max()})
  return out


PARAMS = {"a": {"kernel": jnp.full((3, 2), 0.5)}, "b": {"kernel": jnp.full((2, 1), 0.5)}}


def test_chain_and_inject_hyperparams_states():
  chain_state = _trained(adaact_optax.adaact(0.05), PARAMS)
  _check(activation_summary(chain_state), _expected(chain_state[0], 0.999, 1e-8, 0.5),
         bias_correction_ulps(0.999, 3))
  # inject_hyperparams: b2, eps and power come from the state...
  tx = optax.inject_hyperparams(adaact_optax.adaact)(learning_rate=0.05, b2=0.9, eps=1e-3,
                                                     power=0.25)
  injected = _trained(tx, PARAMS)
  scale_state = injected.inner_state[0]
  _check(activation_summary(injected), _expected(scale_state, 0.9, 1e-3, 0.25),
         bias_correction_ulps(0.9, 3))
  # ... unless passed explicitly.
  _check(activation_summary(injected, b2=0.99), _expected(scale_state, 0.99, 1e-3, 0.25),
         bias_correction_ulps(0.99, 3))
  # Through gradient accumulation around inject_hyperparams.
  accumulated = _trained(adaact_optax.MultiSteps(tx, every_k_schedule=2), PARAMS, steps=4)
  scale_state = accumulated.inner_opt_state.inner_state[0]
  assert int(scale_state.count) == 2
  _check(adaact_optax.activation_summary(accumulated), _expected(scale_state, 0.9, 1e-3, 0.25),
         bias_correction_ulps(0.9, 2))


def test_nnx_optimizer_state():
  model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
  optimizer = nnx.Optimizer(model, adaact_optax.adaact(0.1), wrt=nnx.Param)
  x = jnp.linspace(-1, 1, 15).reshape(5, 3)

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      out, stats = aa_nnx.apply(model, x)
      return jnp.mean(out ** 2), stats
    (_, stats), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads, activation_stats=stats)
    return activation_summary(optimizer.opt_state)

  step(model, optimizer)
  summary = step(model, optimizer)
  # Input x is fixed, so layer 0's V_hat is exactly this batch's mean square.
  assert_f32_close(summary["layers/0/kernel/v_hat_max"], np.max(np.mean(x ** 2, 0)), steps=2,
                   ulps_per_step=bias_correction_ulps(0.999, 2))
  assert set(summary) == {f"layers/{i}/kernel/{s}" for i in (0, 1)
                          for s in ("v_hat_mean", "v_hat_max", "scale_mean", "scale_max")}


def test_default_hyperparameters_agree_with_adaact_and_scale_by_adaact():
  # activation_summary() without arguments must use the hyperparameters an
  # adaact() / scale_by_adaact() built without them trains with.
  import inspect
  from adaact_optax import diagnostics
  for fn in (adaact_optax.adaact, adaact_optax.scale_by_adaact):
    params = inspect.signature(fn).parameters
    assert diagnostics._DEFAULTS == {k: params[k].default for k in ("b2", "eps", "power")}, fn
