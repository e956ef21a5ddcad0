"""Bytes all-reduced per data-parallel AdaAct step: statistics vs gradients.

Method: the same training step (ResNet-20 or ViT-tiny, batch sharded over a
``data`` mesh axis, replicated params, plain ``jax.jit``) is compiled twice:

* ``adaact``: forward under ``adaact_optax.linen.apply`` (statistics captured)
  and ``adaact(...).update(..., activation_stats=...)``;
* ``baseline``: the same forward with ``model.apply`` (no statistics) and
  ``optax.sgd(momentum=0.9)``: identical gradients, no statistics.

Every ``all-reduce`` in ``compiled.as_text()`` (tuple-typed combined ones
counted operand by operand) is summed as ``elements x dtype bytes``.

* statistics bytes = adaact total - baseline total (the only difference);
* gradient bytes = baseline all-reduce operands whose shape (or, for
  gradients XLA reshaped, element count) is a parameter's; it should come
  out close to the parameter bytes: every gradient is reduced once;
* other = the rest of the baseline (BatchNorm batch moments, the loss).

Run: ``XLA_FLAGS=--xla_force_host_platform_device_count=8 python
benchmarks/collective_bytes.py [--models resnet20 vit_tiny] [--batch 64]``
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import re
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import adaact_optax  # noqa: E402
from adaact_optax import linen as aa_linen  # noqa: E402
from examples.images.models import get_model  # noqa: E402

_DTYPE_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "f64": 8, "s32": 4, "u32": 4, "s8": 1, "u8": 1,
                "pred": 1, "s64": 8, "u64": 8}
_ALL_REDUCE = re.compile(r"=\s*(.+?)\s+all-reduce(?:-start)?\(")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")


def all_reduces(hlo_text: str) -> list[list[tuple[str, tuple[int, ...]]]]:
  """Each all-reduce op of an HLO module as its operands' (dtype, shape)."""
  ops = []
  for line in hlo_text.splitlines():
    m = _ALL_REDUCE.search(line)
    if m:
      ops.append([(d, tuple(int(s) for s in dims.split(",") if s))
                  for d, dims in _ARRAY.findall(m.group(1))])
  return ops


def nbytes(dtype: str, shape) -> int:
  return _DTYPE_BYTES[dtype] * math.prod(shape)


def compile_step(model, variables, x, y, mesh, with_stats: bool):
  """The lowered+compiled data-parallel step; returns its HLO text."""
  params = variables["params"]
  extra = {k: v for k, v in variables.items() if k != "params"}
  tx = adaact_optax.adaact(0.1) if with_stats else optax.sgd(0.1, momentum=0.9)

  def step(params, extra, opt_state, x, y):
    def loss_fn(p):
      if with_stats:
        logits, mutated = aa_linen.apply(model, {"params": p, **extra}, x, mutable=list(extra))
      else:
        logits, mutated = model.apply({"params": p, **extra}, x, mutable=list(extra))
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, mutated
    (loss, mutated), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    kwargs = {"activation_stats": mutated[aa_linen.COLLECTION]} if with_stats else {}
    updates, opt_state = tx.update(grads, opt_state, params, **kwargs)
    new_extra = {k: mutated[k] for k in extra}
    return optax.apply_updates(params, updates), new_extra, opt_state, loss

  rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  opt_state = jax.eval_shape(tx.init, params)
  jitted = jax.jit(step, in_shardings=(rep, rep, rep, data, data), out_shardings=rep)
  return jitted.lower(params, extra, opt_state, x, y).compile().as_text()


def report(name: str, batch: int, mesh, shape=(32, 32, 3), **model_kwargs) -> dict:
  """All-reduce bytes of ``get_model(name)``'s step on ``(batch, *shape)`` inputs."""
  shape = tuple(shape)
  model = get_model(name, 10, shape, **model_kwargs)
  x = jax.ShapeDtypeStruct((batch,) + shape, jnp.float32)
  y = jax.ShapeDtypeStruct((batch,), jnp.int32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2,) + shape)))
  param_shapes = collections.Counter(
      ("f32", tuple(p.shape)) for p in jax.tree.leaves(variables["params"]))
  param_bytes = sum(nbytes("f32", s) * n for (_, s), n in param_shapes.items())
  stats_tree = jax.eval_shape(
      lambda: aa_linen.apply(model, jax.tree.map(jnp.zeros_like, variables), jnp.zeros((2,) + shape),
                             mutable=[k for k in variables if k != "params"])[1][aa_linen.COLLECTION])
  stats_bytes_min = sum(nbytes("f32", s.shape) for s in jax.tree.leaves(stats_tree) if s.shape)

  ops = {}
  for with_stats in (False, True):
    ops[with_stats] = all_reduces(compile_step(model, variables, x, y, mesh, with_stats))
  total = {k: sum(nbytes(d, s) for op in v for d, s in op) for k, v in ops.items()}
  # Gradient operands: match baseline operands to parameter shapes (multiset).
  # XLA may reshape a gradient before reducing it (DenseGeneral kernels), so
  # operands left over are matched by element count.
  remaining = collections.Counter(param_shapes)
  operands = [o for op in ops[False] for o in op]
  grad_bytes, unmatched = 0, []
  for operand in operands:
    if remaining[operand] > 0:
      remaining[operand] -= 1
      grad_bytes += nbytes(*operand)
    else:
      unmatched.append(operand)
  sizes = collections.Counter(math.prod(s) for (_, s), n in remaining.items() for _ in range(n))
  for dtype, shape in unmatched:
    if sizes[math.prod(shape)] > 0:
      sizes[math.prod(shape)] -= 1
      grad_bytes += nbytes(dtype, shape)
  stats_bytes = total[True] - total[False]
  out = {
      "model": name, "global_batch": batch, "devices": mesh.size,
      "param_bytes": param_bytes, "gradient_allreduce_bytes": grad_bytes,
      "other_allreduce_bytes": total[False] - grad_bytes,
      "stats_allreduce_bytes": stats_bytes,
      "stats_tree_bytes": stats_bytes_min,
      "stats_over_gradients_pct": 100.0 * stats_bytes / grad_bytes,
      "allreduce_ops_baseline": len(ops[False]), "allreduce_ops_adaact": len(ops[True]),
  }
  # The statistic-only operands, by shape (what the difference is made of).
  diff = collections.Counter(o for op in ops[True] for o in op)
  diff.subtract(collections.Counter(o for op in ops[False] for o in op))
  out["largest_extra_operands"] = sorted(
      ((nbytes(*k), f"{k[0]}{list(k[1])}", n) for k, n in diff.items() if n > 0), reverse=True)[:5]
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+", default=["resnet20", "vit_tiny"])
  parser.add_argument("--batch", type=int, default=64, help="global batch")
  args = parser.parse_args(argv)
  mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
  for name in args.models:
    r = report(name, args.batch, mesh)
    print(f"{r['model']}: {r['devices']} devices, global batch {r['global_batch']}")
    print(f"  parameters           {r['param_bytes']:>12,d} B")
    print(f"  gradient all-reduce  {r['gradient_allreduce_bytes']:>12,d} B")
    print(f"  other all-reduce     {r['other_allreduce_bytes']:>12,d} B  (BatchNorm moments, loss)")
    print(f"  statistics all-reduce{r['stats_allreduce_bytes']:>12,d} B  "
          f"= {r['stats_over_gradients_pct']:.2f}% of gradient bytes "
          f"(statistics tree itself: {r['stats_tree_bytes']:,d} B)")
    print(f"  all-reduce ops: baseline {r['allreduce_ops_baseline']}, adaact {r['allreduce_ops_adaact']}")
    print(f"  largest statistic-only operands (bytes, shape, count): {r['largest_extra_operands']}")
    sys.stdout.flush()


if __name__ == "__main__":
  main()
