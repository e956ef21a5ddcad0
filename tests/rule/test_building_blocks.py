"""scale_by_activation_rms: AdaAct's preconditioner as an optax building block, and recipes."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaact_optax
from conftest import assert_f32_close, linen_loss_grads_and_stats
from _parity_models import MODELS, fixture_tree as _tree
from _mlp import mlp_batches as _batches, mlp_loss_and_stats, mlp_params, train_mlp


def adaact_chain(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=2e-3):
  """AdaAct (unmatched="momentum") from building blocks."""
  return optax.chain(optax.ema(b1, debias=True),
                     adaact_optax.scale_by_activation_rms(b2, eps),
                     optax.add_decayed_weights(weight_decay),
                     optax.scale_by_learning_rate(learning_rate))


# --- the chain equals the fused optimizer on the parity fixtures' models ----

@pytest.mark.parametrize("injected", [False, True], ids=["plain", "inject_hyperparams"])
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_chain_equals_fused_adaact_with_momentum(fixtures_dir, name, injected):
  data = np.load(fixtures_dir / f"adaact_parity_{name}.npz")
  meta = json.loads(str(data["meta"]))
  model = MODELS[name]()
  params = _tree(data, "init")
  batch_stats = model.init(jax.random.key(0), jnp.asarray(data["x/0"])).get("batch_stats", {})
  lrs = jnp.asarray([data[f"lr/{t}"] for t in range(meta["steps"])], jnp.float32)
  hyper = dict(learning_rate=lambda count: lrs[count], b1=meta["b1"], b2=meta["b2"],
               eps=meta["eps"], weight_decay=meta["weight_decay"])
  if injected:
    fused = optax.inject_hyperparams(adaact_optax.adaact, static_args=("unmatched",))(
        **hyper, unmatched="momentum")
    chain = optax.inject_hyperparams(adaact_chain)(**hyper)
  else:
    fused, chain = adaact_optax.adaact(**hyper, unmatched="momentum"), adaact_chain(**hyper)

  @jax.jit
  def step(pf, sf, bf, pc, sc, x, y):
    # Both optimizers get the same gradients and statistics (the fused run's), so the
    # optimizers are compared and not the model's sensitivity to rounding: a ReLU input
    # within an ulp of 0 flips after a few steps and moves a whole row's contribution.
    _, g, a, bf = linen_loss_grads_and_stats(model, pf, x, y, bf)
    u, sf = fused.update(g, sf, pf, activation_stats=a)
    v, sc = chain.update(g, sc, pc, activation_stats=a)
    return optax.apply_updates(pf, u), sf, bf, optax.apply_updates(pc, v), sc

  pf, sf, bf = params, fused.init(params), batch_stats
  pc, sc = params, chain.init(params)
  for t in range(meta["steps"]):
    pf, sf, bf, pc, sc = step(pf, sf, bf, pc, sc, jnp.asarray(data[f"x/{t}"]),
                              jnp.asarray(data[f"y/{t}"]))
    assert_f32_close(pc, pf, steps=t + 1, err_msg=f"after step {t + 1}: ")
  fused_nu = (sf.inner_state if injected else sf)[0].nu
  chain_nu = (sc.inner_state if injected else sc)[1].nu
  assert_f32_close(chain_nu, fused_nu, steps=meta["steps"])


# --- the block on its own ---------------------------------------------------

def test_preconditioner_divides_by_v_hat_and_passes_the_rest():
  params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros((2,)), "norm": jnp.zeros((2,)),
            "quant": jnp.zeros((2, 2))}
  updates = {"w": jnp.full((3, 2), 2.0), "b": jnp.array([1.0, -1.0]),
             "norm": jnp.array([3.0, 4.0]), "quant": jnp.full((2, 2), 5.0)}
  stats = {"w": jnp.array([[4.0], [1.0], [0.25]]), "b": jnp.ones((1,)),
           "quant": jnp.zeros(adaact_optax.layout.UNCAPTURED_SHAPE)}
  tx = adaact_optax.scale_by_activation_rms(b2=0.5, eps=0.01)
  state = tx.init(params)
  assert jax.tree.map(jnp.shape, state.nu) == jax.tree.map(
      jnp.shape, adaact_optax.scale_by_adaact().init(params).nu)
  out, state = jax.jit(lambda u, s, a: tx.update(u, s, activation_stats=a))(updates, state, stats)
  # One step: V_hat = A exactly (bias correction 1 - b2).
  assert_f32_close(out["w"], 2.0 / (np.sqrt([[4.0], [1.0], [0.25]]) + 0.01) * np.ones((3, 2)))
  assert_f32_close(out["b"], np.array([1.0, -1.0]) / 1.01)
  np.testing.assert_array_equal(out["norm"], updates["norm"])      # no statistics
  np.testing.assert_array_equal(out["quant"], updates["quant"])    # uncaptured marker
  assert int(state.count) == 1
  with pytest.raises(ValueError, match="activation_stats="):
    tx.update(updates, state)
  with pytest.raises(ValueError, match="b2"):
    adaact_optax.scale_by_activation_rms(b2=1.0)


def test_activation_summary_reads_the_chain_state():
  params = mlp_params(jax.random.key(0))
  tx = adaact_chain(0.1)
  state = tx.init(params)
  (_, stats), grads = jax.value_and_grad(mlp_loss_and_stats, has_aux=True)(params,
                                                                            *_batches(1)[0])
  _, state = jax.jit(lambda g, s, p, a: tx.update(g, s, p, activation_stats=a))(
      grads, state, params, stats)
  summary = jax.jit(adaact_optax.activation_summary)(state)
  assert_f32_close(summary["layer0/w/v_hat_max"], stats["layer0"]["w"].max())


# --- recipes (docs/building-blocks.md) against float64 numpy ----------------

def _numpy_run(params, batches, direction, lr, b2, eps, wd=0.0):
  """Brute force: ``direction(name, g, state, t)`` then AdaAct's scaling of ``direction``'s
  output (``pre=False``) or of the gradient before ``direction`` (``pre=True``)."""
  p = {k: {n: np.asarray(a, np.float64) for n, a in v.items()} for k, v in params.items()}
  v = {k: {"w": np.zeros(p[k]["w"].shape[0]), "b": 0.0} for k in p}
  state = {}
  for t in range(1, len(batches) + 1):
    (_, stats), g = jax.value_and_grad(mlp_loss_and_stats, has_aux=True)(
        jax.tree.map(jnp.asarray, p), *batches[t - 1])
    for k in p:
      for n in ("w", "b"):
        v[k][n] = b2 * v[k][n] + (1 - b2) * np.asarray(stats[k][n], np.float64)
        root = np.sqrt(v[k][n] / (1 - b2 ** t)) + eps
        root = root[:, None] if n == "w" else root
        u = direction.step(f"{k}/{n}", np.asarray(g[k][n], np.float64), root, t)
        p[k][n] = p[k][n] - lr * (u + wd * p[k][n])
  return p


class Nesterov:
  """optax.trace(b1, nesterov=True) then the preconditioner."""

  def __init__(self, b1):
    self.b1, self.trace = b1, {}

  def step(self, name, g, root, t):
    tr = g + self.b1 * self.trace.get(name, 0.0)
    self.trace[name] = tr
    return (g + self.b1 * tr) / root


class PreconditionedMomentum:
  """The preconditioner first, then SGD momentum (optax.trace) of the scaled gradient."""

  def __init__(self, b1):
    self.b1, self.trace = b1, {}

  def step(self, name, g, root, t):
    tr = g / root + self.b1 * self.trace.get(name, 0.0)
    self.trace[name] = tr
    return tr


class AdamDirection:
  """optax.scale_by_adam's direction, then the preconditioner."""

  def __init__(self, b1, b2, eps):
    self.b1, self.b2, self.eps, self.m, self.s = b1, b2, eps, {}, {}

  def step(self, name, g, root, t):
    m = self.b1 * self.m.get(name, 0.0) + (1 - self.b1) * g
    s = self.b2 * self.s.get(name, 0.0) + (1 - self.b2) * g * g
    self.m[name], self.s[name] = m, s
    d = (m / (1 - self.b1 ** t)) / (np.sqrt(s / (1 - self.b2 ** t)) + self.eps)
    return d / root


RMS = dict(b2=0.9, eps=1e-3)
RECIPES = {
    "nesterov": (lambda: optax.chain(optax.trace(0.8, nesterov=True),
                                     adaact_optax.scale_by_activation_rms(**RMS),
                                     optax.add_decayed_weights(0.01),
                                     optax.scale_by_learning_rate(0.05)),
                 lambda: Nesterov(0.8), 0.01),
    "momentum_after": (lambda: optax.chain(adaact_optax.scale_by_activation_rms(**RMS),
                                           optax.trace(0.8),
                                           optax.scale_by_learning_rate(0.05)),
                       lambda: PreconditionedMomentum(0.8), 0.0),
    "adam_direction": (lambda: optax.chain(optax.scale_by_adam(0.8, 0.95, 1e-6),
                                           adaact_optax.scale_by_activation_rms(**RMS),
                                           optax.scale_by_learning_rate(0.05)),
                       lambda: AdamDirection(0.8, 0.95, 1e-6), 0.0),
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_follows_its_rule(recipe):
  make_tx, make_direction, wd = RECIPES[recipe]
  params = mlp_params(jax.random.key(0))
  batches = _batches(4)
  ours, _ = train_mlp(make_tx(), params, batches)
  expected = _numpy_run(params, batches, make_direction(), 0.05, RMS["b2"], RMS["eps"], wd)
  # float32 against float64, each step with the MLP's forward and backward pass.
  assert_f32_close(ours, expected, steps=len(batches), ulps_per_step=64)


def _state_bytes(tx, params):
  shapes = jax.eval_shape(tx.init, params)
  return sum(l.size * l.dtype.itemsize for l in jax.tree.leaves(shapes))


def test_recipe_state_costs():
  params = mlp_params(jax.random.key(0), sizes=(64, 32, 10))
  n = sum(p.size for p in jax.tree.leaves(params))
  fused = _state_bytes(adaact_optax.adaact(0.1), params)
  # Momentum recipes: one parameter-sized buffer plus the per-input-feature V, like adaact.
  assert _state_bytes(RECIPES["nesterov"][0](), params) == fused
  assert _state_bytes(RECIPES["momentum_after"][0](), params) == fused
  # Adam's direction: Adam's two buffers plus V.
  adam = _state_bytes(optax.scale_by_adam(), params)
  assert _state_bytes(RECIPES["adam_direction"][0](), params) == adam + fused - 4 * n
