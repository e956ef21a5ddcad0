"""jax.lax.pmean on a statistics tree vs on its raveled copy (8 host CPU devices).

Prints, for a 12-leaf and a 72-leaf tree of (512, 1) / (2048, 1) / (1,)
statistics, the number of all-reduce ops in the compiled HLO (after XLA's
all-reduce combiner) and the time per ``pmap`` call. Run:
``python benchmarks/pmean_forms.py``.
"""
import os, time
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp
from jax.flatten_util import ravel_pytree

def raveled(tree, axis):
  flat, unravel = ravel_pytree(tree)
  return unravel(jax.lax.pmean(flat, axis))

def per_tree(tree, axis):
  return jax.lax.pmean(tree, axis)

# A statistics tree like a 12-layer MLP/transformer's: (in, 1) leaves of various sizes.
def stats_tree(layers):
  return {f"l{i}": {"a": jnp.ones((512, 1)), "b": jnp.ones((2048, 1)), "bias": jnp.ones((1,))}
          for i in range(layers)}

for layers in (4, 24):
  tree = jax.tree.map(lambda x: jnp.broadcast_to(x, (8,) + x.shape), stats_tree(layers))
  for name, fn in (("raveled", raveled), ("jax.lax.pmean(tree)", per_tree)):
    f = jax.pmap(lambda t: fn(t, "d"), axis_name="d")
    hlo = f.lower(tree).compile().as_text()
    n_ar = hlo.count(" all-reduce(") + hlo.count(" all-reduce-start(")
    out = f(tree); jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(200):
      out = f(tree)
    jax.block_until_ready(out)
    dt = (time.perf_counter() - t0) / 200 * 1e6
    print(f"leaves={3*layers:3d} {name:22s} all-reduce ops in compiled HLO: {n_ar:3d}  {dt:8.1f} us/call")
