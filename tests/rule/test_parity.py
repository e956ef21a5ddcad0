"""Our optimizer against trajectories recorded from the authors' PyTorch AdaAct."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaact_optax
from _parity_models import MODELS, assert_parity_close as _close, fixture_tree as _tree
from conftest import linen_loss_grads_and_stats


@pytest.mark.parametrize("via", ["linen.apply", "value_grad_and_stats"])
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_matches_authors_trajectory(fixtures_dir, name, via):
  data = np.load(fixtures_dir / f"adaact_parity_{name}.npz")
  meta = json.loads(str(data["meta"]))
  steps = meta["steps"]
  model = MODELS[name]()
  params = _tree(data, "init")
  x0 = jnp.asarray(data["x/0"])
  variables = model.init(jax.random.key(0), x0)
  assert jax.tree.map(jnp.shape, variables["params"]) == jax.tree.map(jnp.shape, params)
  batch_stats = variables.get("batch_stats", {})

  lrs = jnp.asarray([data[f"lr/{t}"] for t in range(steps)], jnp.float32)
  tx = adaact_optax.adaact(lambda count: lrs[count], b1=meta["b1"], b2=meta["b2"],
                           eps=meta["eps"], weight_decay=meta["weight_decay"])
  opt_state = tx.init(params)

  def plain_loss(p, batch_stats, x, y):
    # A plain JAX function of the parameters: the engine reads the computation.
    logits, mutated = model.apply({"params": p, "batch_stats": batch_stats}, x,
                                  mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), mutated

  @jax.jit
  def step(params, batch_stats, opt_state, x, y):
    if via == "value_grad_and_stats":
      (loss, mutated), grads, stats = adaact_optax.value_grad_and_stats(
          plain_loss, has_aux=True)(params, batch_stats, x, y)
    else:
      loss, grads, stats, new_batch_stats = linen_loss_grads_and_stats(model, params, x, y,
                                                                       batch_stats)
      mutated = {"batch_stats": new_batch_stats}
    updates, opt_state = tx.update(grads, opt_state, params, activation_stats=stats)
    return (optax.apply_updates(params, updates), mutated.get("batch_stats", {}),
            opt_state, loss)

  for t in range(steps):
    # Each step starts from the authors' parameters, so one step of each program is compared
    # (the optimizer state carries on): two free-running trajectories would also part where
    # a ReLU input within rounding of 0 flips, moving a whole row's contribution.
    start = params if t == 0 else _tree(data, f"step{t}")
    params, batch_stats, opt_state, loss = step(start, batch_stats, opt_state,
                                                jnp.asarray(data[f"x/{t}"]),
                                                jnp.asarray(data[f"y/{t}"]))
    _close(loss, data["loss"][t], f"loss at step {t}")
    ref = _tree(data, f"step{t + 1}")
    for module, leaves in ref.items():
      for pname, value in leaves.items():
        _close(params[module][pname], value, f"{module}/{pname} after step {t + 1}", t + 1)
    scale_state = opt_state[0]
    # The optimizer's bias correction: b2 as float32 holds it (0.999 is 0.99900001...).
    v_hat_denominator = 1 - float(np.float32(meta["b2"])) ** (t + 1)
    for module, leaves in _tree(data, f"nu{t + 1}").items():
      # The state is keep-rank, (*input axes, 1); the fixtures store (*input axes,).
      nu = scale_state.nu[module]["kernel"]
      assert nu.shape == leaves["kernel"].shape + (1,)
      _close(nu[..., 0] / v_hat_denominator, leaves["kernel"],
             f"V_hat of {module} after step {t + 1}", t + 1)
