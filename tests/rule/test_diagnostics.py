"""activation_summary and scaling_summary against hand-computed values and brute-force numpy
references, under jit and through every state wrapper."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import adaact_optax
from adaact_optax import nnx as aa_nnx
from adaact_optax import activation_summary, scaling_summary



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


def _check(summary, expected, rtol=1e-6):
  assert summary.keys() == expected.keys()
  for k, v in expected.items():
    assert summary[k].shape == () and summary[k].dtype == jnp.float32
    np.testing.assert_allclose(summary[k], v, rtol=rtol, err_msg=k)


def test_hand_computed_values_and_jit():
  state = _hand_state()
  _check(activation_summary(state, b2=0.5, eps=0.01), HAND)  # bias (one entry): left out
  jitted = jax.jit(lambda s: activation_summary(s, b2=0.5, eps=0.01))(state)
  _check(jitted, HAND)
  # power 1: scale = 1 / (V_hat + eps).
  summary = activation_summary(state, b2=0.5, eps=0.01, power=1.0)
  np.testing.assert_allclose(summary["Dense_0/kernel/scale_max"], 1 / 0.11, rtol=1e-6)
  # Before the first update: V_hat 0, scale 1/eps.
  fresh = state._replace(count=jnp.array(0, jnp.int32), nu=jax.tree.map(jnp.zeros_like, state.nu))
  summary = activation_summary(fresh, eps=0.01)
  assert float(summary["Conv_0/kernel/v_hat_max"]) == 0
  np.testing.assert_allclose(summary["Conv_0/kernel/scale_mean"], 100, rtol=1e-6)
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
  """float64 numpy; the summary's float32 ``1 - b2**t`` differs by ~1e-5 relative."""
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
  _check(activation_summary(chain_state), _expected(chain_state[0], 0.999, 1e-8, 0.5), rtol=1e-4)
  # inject_hyperparams: b2, eps and power come from the state...
  tx = optax.inject_hyperparams(adaact_optax.adaact)(learning_rate=0.05, b2=0.9, eps=1e-3,
                                                     power=0.25)
  injected = _trained(tx, PARAMS)
  scale_state = injected.inner_state[0]
  _check(activation_summary(injected), _expected(scale_state, 0.9, 1e-3, 0.25), rtol=1e-4)
  # ... unless passed explicitly.
  _check(activation_summary(injected, b2=0.99), _expected(scale_state, 0.99, 1e-3, 0.25), rtol=1e-4)
  # Through gradient accumulation around inject_hyperparams.
  accumulated = _trained(adaact_optax.MultiSteps(tx, every_k_schedule=2), PARAMS, steps=4)
  scale_state = accumulated.inner_opt_state.inner_state[0]
  assert int(scale_state.count) == 2
  _check(adaact_optax.activation_summary(accumulated), _expected(scale_state, 0.9, 1e-3, 0.25),
         rtol=1e-4)


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
  np.testing.assert_allclose(summary["layers/0/kernel/v_hat_max"], np.max(np.mean(x ** 2, 0)),
                             rtol=1e-5)
  assert set(summary) == {f"layers/{i}/kernel/{s}" for i in (0, 1)
                          for s in ("v_hat_mean", "v_hat_max", "scale_mean", "scale_max")}


def test_default_hyperparameters_agree_with_adaact_and_scale_by_adaact():
  # activation_summary() without arguments must use the hyperparameters an
  # adaact() / scale_by_adaact() built without them trains with.
  import inspect
  from adaact_optax._src import diagnostics
  for fn in (adaact_optax.adaact, adaact_optax.scale_by_adaact):
    params = inspect.signature(fn).parameters
    assert diagnostics._DEFAULTS == {k: params[k].default
                                     for k in ("b1", "b2", "eps", "power")}, fn


# scaling_summary: a Dense kernel (in 5, out 3), a conv kernel (3x3 window, 2 channels in,
# 4 out), an attention query kernel (in 6, 2 heads, head_dim 3) and a bias (one entry: left
# out). Statistics in the keep-rank layout, one value per input feature.
SCALING_PARAMS = {"dense": {"kernel": jnp.zeros((5, 3)), "bias": jnp.zeros(3)},
                  "conv": {"kernel": jnp.zeros((3, 3, 2, 4))},
                  "query": {"kernel": jnp.zeros((6, 2, 3))}}
STAT_SHAPES = {"dense/kernel": (5, 1), "dense/bias": (1,), "conv/kernel": (3, 3, 2, 1),
               "query/kernel": (6, 1, 1)}


def _random_history(steps, seed=0):
  """Per step: gradients (param-shaped) and mean-square statistics (keep-rank, > 0),
  float32, with input features of very different scales."""
  rng = np.random.default_rng(seed)
  history = []
  for _ in range(steps):
    grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), SCALING_PARAMS)
    stats = {"dense": {"kernel": None, "bias": np.ones((1,), np.float32)},
             "conv": {"kernel": None}, "query": {"kernel": None}}
    for name, shape in STAT_SHAPES.items():
      layer, leaf = name.split("/")
      if leaf == "kernel":
        stats[layer][leaf] = (rng.uniform(0.5, 2, size=shape) * 10.0 ** rng.integers(
            -2, 2, size=shape)).astype(np.float32)
    history.append((grads, stats))
  return history


def _train(tx, history):
  params, state = SCALING_PARAMS, tx.init(SCALING_PARAMS)
  for grads, stats in history:
    updates, state = tx.update(grads, state, params, activation_stats=stats)
    params = optax.apply_updates(params, updates)
  return params, updates, state


def _numpy_scaling(history, params_before, lr, b1, b2, eps, power, weight_decay):
  """float64 loops over the steps: ``d = V_hat**power + eps``, its CV and max/min over the
  input features, and the RMS of ``M_hat / d`` and of the last update
  ``-lr (M_hat / d + weight_decay * params_before)``."""
  out = {}
  t = len(history)
  for name in ("dense/kernel", "conv/kernel", "query/kernel"):
    layer, leaf = name.split("/")
    m = v = 0.0
    for grads, stats in history:
      m = b1 * m + (1 - b1) * np.asarray(grads[layer][leaf], np.float64)
      v = b2 * v + (1 - b2) * np.asarray(stats[layer][leaf], np.float64)
    d = (v / (1 - b2 ** t)) ** power + eps
    direction = (m / (1 - b1 ** t)) / d          # d broadcasts over the output axes
    update = -lr * (direction + weight_decay * np.asarray(params_before[layer][leaf]))
    out[name] = dict(denom_cv=d.std() / d.mean(), denom_max_over_min=d.max() / d.min(),
                     direction_rms=np.sqrt(np.mean(direction ** 2)),
                     update_rms=np.sqrt(np.mean(update ** 2)))
  return out


def _check_scaling(summary, reference, rms_key, rtol):
  assert set(summary) == {f"{n}/{s}" for n in reference
                          for s in ("denom_cv", "denom_max_over_min", "update_rms")}
  for name, ref in reference.items():
    for stat, ref_key in (("denom_cv", "denom_cv"), ("denom_max_over_min", "denom_max_over_min"),
                          ("update_rms", rms_key)):
      value = summary[f"{name}/{stat}"]
      assert value.shape == () and value.dtype == jnp.float32, (name, stat)
      np.testing.assert_allclose(value, ref[ref_key], rtol=rtol, err_msg=f"{name}/{stat}")


# float32 against float64 after a few EMA steps and a power: ~100 float32 eps.
SCALING_RTOL = 2e-5


@pytest.mark.parametrize("power", [0.5, 1.0])
def test_scaling_summary_against_numpy_under_jit(power):
  history = _random_history(4)
  lr, b1, b2, eps, wd = 0.3, 0.8, 0.9, 1e-3, 0.01
  tx = adaact_optax.adaact(lr, b1, b2, eps, wd, power=power)
  params, updates, state = _train(tx, history)
  params_before = jax.tree.map(lambda p, u: p - u, params, updates)
  reference = _numpy_scaling(history, params_before, lr, b1, b2, eps, power, wd)
  hyper = dict(b1=b1, b2=b2, eps=eps, power=power)
  # From the state: M_hat / d; from the updates: the step itself.
  _check_scaling(jax.jit(lambda s: scaling_summary(s, **hyper))(state), reference,
                 "direction_rms", SCALING_RTOL)
  jitted = jax.jit(lambda s, u: scaling_summary(s, u, **hyper))(state, updates)
  _check_scaling(jitted, reference, "update_rms", SCALING_RTOL)
  _check_scaling(scaling_summary(state, updates, **hyper), reference, "update_rms",
                 SCALING_RTOL)


def test_scaling_summary_inject_hyperparams_and_partition():
  history = _random_history(3, seed=1)
  # Hyperparameters read from inject_hyperparams' state, AdaAct inside an optax.partition
  # (its state holds MaskedNode where AdamW owns the parameters, and so do the updates
  # of the partition's branch).
  inner = optax.inject_hyperparams(adaact_optax.adaact)(learning_rate=0.5, b1=0.7, b2=0.95,
                                                       eps=1e-4, weight_decay=0.0, power=0.5)
  labels = {"dense": {"kernel": "adaact", "bias": "adam"}, "conv": {"kernel": "adaact"},
            "query": {"kernel": "adam"}}
  tx = optax.partition({"adaact": inner, "adam": optax.adam(1e-2)}, labels)
  _, updates, state = _train(tx, history)
  reference = _numpy_scaling(history, SCALING_PARAMS, 0.5, 0.7, 0.95, 1e-4, 0.5, 0.0)
  del reference["query/kernel"]
  _check_scaling(scaling_summary(state), reference, "direction_rms", SCALING_RTOL)
  _check_scaling(scaling_summary(state, updates), reference, "update_rms", SCALING_RTOL)


def test_scaling_summary_activation_rms_block_and_edge_cases():
  history = _random_history(2, seed=2)
  # scale_by_activation_rms has no mu: update_rms only from the updates.
  tx = adaact_optax.scale_by_activation_rms(b2=0.9)
  _, updates, state = _train(tx, history)
  without = scaling_summary(state, b2=0.9)
  assert set(without) == {f"{n}/{s}" for n in ("dense/kernel", "conv/kernel", "query/kernel")
                          for s in ("denom_cv", "denom_max_over_min")}
  with_updates = scaling_summary(state, updates, b2=0.9)
  grads, _ = history[-1]
  for name in ("dense/kernel", "conv/kernel", "query/kernel"):
    layer, leaf = name.split("/")
    v = sum((1 - 0.9) * 0.9 ** (1 - i) * np.asarray(s[layer][leaf], np.float64)
            for i, (_, s) in enumerate(history)) / (1 - 0.9 ** 2)
    expected = np.sqrt(np.mean((np.asarray(grads[layer][leaf]) / (np.sqrt(v) + 1e-8)) ** 2))
    np.testing.assert_allclose(with_updates[f"{name}/update_rms"], expected, rtol=SCALING_RTOL)
    np.testing.assert_allclose(with_updates[f"{name}/denom_cv"], without[f"{name}/denom_cv"])
  # Before the first update d = eps everywhere: uniform (CV 0 up to the float32 rounding of
  # a mean of equal values). With eps 0 it is 0 everywhere: still uniform, not nan.
  fresh = adaact_optax.adaact(0.1).init(SCALING_PARAMS)
  for eps in (1e-8, 0.0):
    summary = scaling_summary(fresh, eps=eps)
    for name in ("dense/kernel", "conv/kernel", "query/kernel"):
      assert 0 <= float(summary[f"{name}/denom_cv"]) < 1e-6
      assert float(summary[f"{name}/denom_max_over_min"]) == 1
      assert float(summary[f"{name}/update_rms"]) == 0
  # A grouped-conv-like block statistic (2 blocks of the 4 input channels): two entries.
  params = {"w": jnp.zeros((4, 3))}
  tx = adaact_optax.adaact(1.0, eps=0.0, weight_decay=0.0, stats_shapes={"w": (2, 1)})
  _, state = tx.update({"w": jnp.ones((4, 3))}, tx.init(params), params,
                       activation_stats={"w": jnp.array([[1.0], [9.0]])})
  summary = scaling_summary(state, eps=0.0)
  np.testing.assert_allclose(summary["w/denom_cv"], 0.5, rtol=1e-6)      # d = 1, 3
  np.testing.assert_allclose(summary["w/denom_max_over_min"], 3.0, rtol=1e-6)
  np.testing.assert_allclose(summary["w/update_rms"], np.sqrt((1 + 1 / 9) / 2), rtol=1e-6)


def test_scaling_summary_errors_name_the_path():
  history = _random_history(1)
  _, updates, state = _train(adaact_optax.adaact(0.1), history)
  missing = {k: v for k, v in updates.items() if k != "conv"}
  with pytest.raises(ValueError, match=r"no leaf at 'conv/kernel'.*\(3, 3, 2, 4\)"):
    scaling_summary(state, missing)
  wrong = dict(updates, conv={"kernel": jnp.zeros((3, 3, 2))})
  with pytest.raises(ValueError, match=r"shape \(3, 3, 2\) at 'conv/kernel'"):
    scaling_summary(state, wrong)
  with pytest.raises(ValueError, match="scaling_summary: no ScaleByAdaActState"):
    scaling_summary(optax.adam(1e-3).init({"w": jnp.ones(2)}))
