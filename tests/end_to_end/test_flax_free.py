"""``import adaact_optax`` needs no Flax: the core, the capture and the transform are pure JAX.

Each check runs in a fresh interpreter where importing any ``flax`` module raises
ImportError (as on a machine without Flax), and trains a pure-JAX and an Equinox model.
"""

import subprocess
import sys
import textwrap

from conftest import ROOT

_BLOCK_FLAX = textwrap.dedent("""
    import importlib.abc, sys

    class _NoFlax(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if name == "flax" or name.startswith("flax."):
          raise ImportError(f"flax is blocked in this test ({name})")
        return None

    sys.meta_path.insert(0, _NoFlax())
""")


def _run(body: str) -> str:
  code = _BLOCK_FLAX + textwrap.dedent(body)
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_import_loads_no_flax_module_and_lazy_adapters_say_why():
  out = _run("""
      import adaact_optax
      assert not [m for m in sys.modules if m.split(".")[0] == "flax"]
      try:
        adaact_optax.linen
      except ImportError as e:
        print("linen:", e)
      """)
  assert "linen: flax is blocked" in out


def test_pure_jax_model_trains_without_flax():
  out = _run("""
      import jax, jax.numpy as jnp, optax
      import adaact_optax

      def loss_fn(params, x, y):
        h = jnp.tanh(x @ params["w1"] + params["b1"])
        return jnp.mean((h @ params["w2"] - y) ** 2)

      k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
      params = {"w1": jax.random.normal(k1, (4, 16)) * 0.5, "b1": jnp.zeros(16),
                "w2": jax.random.normal(k2, (16, 1)) * 0.25}
      x = jax.random.normal(k3, (64, 4))
      y = jnp.sin(x.sum(1, keepdims=True))
      tx = adaact_optax.adaact(0.05)
      state = tx.init(params)

      @jax.jit
      def step(params, state):
        loss, grads, stats = adaact_optax.value_grad_and_stats(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params, activation_stats=stats)
        return optax.apply_updates(params, updates), state, loss, stats

      first = None
      for _ in range(60):
        params, state, loss, stats = step(params, state)
        first = loss if first is None else first
      assert sorted(stats) == ["b1", "w1", "w2"], stats
      assert loss < 0.5 * first, (first, loss)
      assert not [m for m in sys.modules if m.split(".")[0] == "flax"]
      print("ok", float(first), float(loss))
      """)
  assert out.startswith("ok")


def test_equinox_model_trains_without_flax():
  out = _run("""
      import equinox as eqx, jax, jax.numpy as jnp, optax
      import adaact_optax

      model = eqx.nn.MLP(4, 1, 16, 2, key=jax.random.key(0))
      params, static = eqx.partition(model, eqx.is_inexact_array)
      x = jax.random.normal(jax.random.key(1), (64, 4))
      y = jnp.sin(x.sum(1, keepdims=True))

      def loss_fn(params, x, y):
        return jnp.mean((jax.vmap(eqx.combine(params, static))(x) - y) ** 2)

      shapes = adaact_optax.stats_shapes(loss_fn, params, x, y)   # Equinox weights are (out, in)
      tx = adaact_optax.adaact(0.05, stats_shapes=shapes)
      state = tx.init(params)

      @jax.jit
      def step(params, state):
        loss, grads, stats = adaact_optax.value_grad_and_stats(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params, activation_stats=stats)
        return optax.apply_updates(params, updates), state, loss

      losses = []
      for _ in range(60):
        params, state, loss = step(params, state)
        losses.append(float(loss))
      assert losses[-1] < 0.7 * losses[0], losses
      assert not [m for m in sys.modules if m.split(".")[0] == "flax"]
      print("ok", losses[0], losses[-1])
      """)
  assert out.startswith("ok")
