"""Data- and model-parallel AdaAct training of a small transformer on a 2-D mesh.

The mesh is ``(data, model)``: the batch is split over ``data``; kernels are
split over both (FSDP over ``data``, tensor parallelism over ``model``); the
optimizer state is sharded like its parameters, so nothing is ever gathered.
Two ways to say it (``--sharding``):

* ``logical``: kernels carry logical axis names
  (``nn.with_logical_partitioning``), ``nn.logical_axis_rules`` maps them to
  the mesh, and params and optimizer state are both sharded by their own
  metadata (``nn.get_partition_spec`` of ``jax.eval_shape(tx.init, params)``);
* ``helper`` (default): kernels carry mesh axes (``nn.with_partitioning``) and
  the state's shardings come from ``adaact_optax.sharding.state_shardings``.

AdaAct's statistics are means over the *global* batch with no extra code:
``jax.jit`` reduces over the sharded batch like any other mean.

One process (simulated devices)::

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m examples.multihost.train --steps 20
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m examples.multihost.train --steps 20 \
      --sharding logical

Two processes on one machine (2 CPU devices each, real collectives over
loopback with gloo)::

  for i in 0 1; do
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m examples.multihost.train \\
        --coordinator 127.0.0.1:12345 --num-processes 2 --process-id $i --steps 20 &
  done; wait

The coordinator, process count and id may also come from the environment
(``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``); on
clusters JAX detects (SLURM, Open MPI, TPU pods) pass ``--auto-detect``
instead. Each process generates the same global batch from the step number
and feeds only its own rows with ``jax.make_array_from_process_local_data``.
Process 0 alone prints and writes metrics; checkpoints are written with
Orbax, which every process calls (each writes the shards it owns; process 0
writes the metadata), to a directory all processes can reach.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import sys
import time

if __package__ in (None, ""):  # `python examples/multihost/train.py`
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import adaact_optax
from adaact_optax import linen as aa_linen
from examples.multihost import input_pipeline
from examples.multihost import models



def parse_args(argv=None):
  env = os.environ.get
  p = argparse.ArgumentParser(prog="python -m examples.multihost.train",
                              description=__doc__.splitlines()[0])
  p.add_argument("--coordinator", default=env("JAX_COORDINATOR_ADDRESS"),
                 help="host:port of process 0 (env JAX_COORDINATOR_ADDRESS)")
  p.add_argument("--num-processes", type=int, default=int(env("JAX_NUM_PROCESSES", "1")))
  p.add_argument("--process-id", type=int, default=int(env("JAX_PROCESS_ID", "0")))
  p.add_argument("--auto-detect", action="store_true",
                 help="jax.distributed.initialize() with no arguments (SLURM, MPI, TPU pods)")
  p.add_argument("--heartbeat-timeout", type=int, default=100,
                 help="seconds before a silent process is declared dead")
  p.add_argument("--model-parallel", type=int, default=2, help="size of the 'model' mesh axis")
  p.add_argument("--sharding", choices=("helper", "logical"), default="helper",
                 help="helper: kernels partitioned by mesh axes, optimizer state by "
                      "adaact_optax.sharding.state_shardings; logical: logical axis names and "
                      "nn.logical_axis_rules, params and state sharded by their own metadata")
  p.add_argument("--depth", type=int, default=2, help="transformer blocks")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--global-batch", type=int, default=32)
  p.add_argument("--lr", type=float, default=0.1)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--checkpoint-dir", default=None)
  p.add_argument("--checkpoint-every", type=int, default=1)
  p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
  p.add_argument("--metrics", default=None, help="JSON lines, written by process 0")
  p.add_argument("--save-params", default=None,
                 help="npz of the final params per process; '{process}' is replaced by the id")
  p.add_argument("--crash-at-step", type=int, default=None,
                 help="fault injection: --crash-process exits abruptly before this step")
  p.add_argument("--crash-process", type=int, default=1)
  return p.parse_args(argv)


def initialize(args) -> None:
  """Joins the distributed runtime when several processes take part."""
  if args.auto_detect:
    jax.distributed.initialize()
  elif args.num_processes > 1:
    # CPU devices need a collectives backend across processes; GPUs/TPUs ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                               heartbeat_timeout_seconds=args.heartbeat_timeout)


def make_mesh(model_parallel: int) -> jax.sharding.Mesh:
  n = jax.device_count()
  if n % model_parallel:
    raise ValueError(f"--model-parallel {model_parallel} does not divide the {n} devices")
  return jax.make_mesh((n // model_parallel, model_parallel), ("data", "model"),
                       axis_types=(AxisType.Auto, AxisType.Auto))


def init_with_helper(init, tx, mesh):
  """Params sharded by their ``nn.with_partitioning`` mesh axes; the optimizer
  state by ``adaact_optax.sharding.state_shardings``.

  Returns ``(params, opt_state, param_shardings, state_shardings)``, unboxed.
  """
  abstract = jax.eval_shape(init)
  p_shard = jax.tree.map(lambda s: NamedSharding(mesh, s), nn.get_partition_spec(abstract)["params"],
                         is_leaf=lambda s: isinstance(s, P))
  params = jax.jit(lambda: nn.unbox(init())["params"], out_shardings=p_shard)()
  s_shard = adaact_optax.sharding.state_shardings(tx, p_shard, params)
  opt_state = jax.jit(tx.init, out_shardings=s_shard)(params)
  return params, opt_state, p_shard, s_shard


def init_from_metadata(init, tx, mesh):
  """Params and optimizer state both sharded by their own Flax metadata.

  The style of large-model codebases (Flax's lm1b example): logical names on
  the kernels, ``nn.logical_axis_rules`` to place them on the mesh, and the
  shardings of anything (params, optimizer state) from
  ``jax.eval_shape`` -> ``nn.get_partition_spec`` -> ``nn.logical_to_mesh_sharding``.
  AdaAct's ``nu`` carries the names of the axes it keeps.

  Returns ``(params, opt_state, param_shardings, state_shardings)``, unboxed.
  """
  with nn.logical_axis_rules(models.LOGICAL_RULES):
    shardings = lambda tree: nn.logical_to_mesh_sharding(nn.get_partition_spec(tree), mesh)
    p_shard = shardings(jax.eval_shape(init))["params"]
    boxed = jax.jit(lambda: init()["params"], out_shardings=p_shard)()
    s_shard = shardings(jax.eval_shape(tx.init, boxed))
    opt_state = jax.jit(tx.init, out_shardings=s_shard)(boxed)
  return nn.unbox(boxed), nn.unbox(opt_state), p_shard, s_shard


def train(args, gather: bool = True) -> dict | None:
  """Runs ``args.steps`` steps; returns the final params as host numpy arrays.

  ``gather=False`` skips collecting the params on every host (large models).
  """
  mesh = make_mesh(args.model_parallel)
  if args.global_batch % mesh.shape["data"]:
    # Equal shards keep every device's statistics a mean over the same number of rows.
    raise ValueError(f"--global-batch {args.global_batch} must be a multiple of the data "
                     f"axis size {mesh.shape['data']}")
  model = models.Transformer(depth=args.depth, logical=args.sharding == "logical")
  tx = adaact_optax.adaact(args.lr)
  x0 = jnp.zeros((2, input_pipeline.TOKENS, input_pipeline.FEATURES))
  init = functools.partial(model.init, jax.random.key(args.seed), x0)
  if args.sharding == "logical":
    params, opt_state, p_shard, s_shard = init_from_metadata(init, tx, mesh)
  else:
    params, opt_state, p_shard, s_shard = init_with_helper(init, tx, mesh)
  data = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())

  @functools.partial(jax.jit, in_shardings=(p_shard, s_shard, data, data),
                     out_shardings=(p_shard, s_shard, replicated), donate_argnums=(0, 1))
  def step(params, opt_state, x, y):
    def loss_fn(p):
      logits, mutated = aa_linen.apply(model, {"params": p}, x)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, mutated[aa_linen.COLLECTION]
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params, activation_stats=stats)
    return optax.apply_updates(params, updates), opt_state, loss

  manager, start = None, 0
  if args.checkpoint_dir:
    import orbax.checkpoint as ocp
    manager = ocp.CheckpointManager(
        os.path.abspath(args.checkpoint_dir),
        options=ocp.CheckpointManagerOptions(max_to_keep=3, save_interval_steps=args.checkpoint_every,
                                             enable_async_checkpointing=False))
    if args.resume and manager.latest_step() is not None:
      start = manager.latest_step()
      target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                            {"params": params, "opt_state": opt_state})
      restored = manager.restore(start, args=ocp.args.StandardRestore(target))
      params, opt_state = restored["params"], restored["opt_state"]

  lead = jax.process_index() == 0
  metrics = open(args.metrics, "a") if (lead and args.metrics) else None
  if lead:
    print(f"mesh {dict(mesh.shape)} over {jax.process_count()} process(es), "
          f"{jax.device_count()} devices; starting at step {start}", flush=True)
  t0 = time.time()
  for t in range(start, args.steps):
    if args.crash_at_step == t and jax.process_index() == args.crash_process:
      print(f"process {jax.process_index()}: simulated crash before step {t}", flush=True)
      os._exit(17)   # no cleanup, like a lost host
    x, y = input_pipeline.global_batch(args.seed, t, args.global_batch)
    params, opt_state, loss = step(params, opt_state, input_pipeline.to_global(x, data),
                                   input_pipeline.to_global(y, data))
    loss = float(loss)   # replicated: every process can read it
    if manager is not None:
      manager.save(t + 1, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state}))
    if lead:
      print(f"step {t + 1}/{args.steps}  loss {loss:.4f}", flush=True)
      if metrics:
        metrics.write(json.dumps({"step": t + 1, "loss": loss, "seconds": time.time() - t0}) + "\n")
        metrics.flush()
  if manager is not None:
    manager.wait_until_finished()
    manager.close()
  if metrics:
    metrics.close()

  if not (gather or args.save_params):
    return None
  # Gather the full params onto every process (a collective: all must call it).
  from jax.experimental import multihost_utils
  full = multihost_utils.process_allgather(params, tiled=True)
  flat = {jax.tree_util.keystr(path): np.asarray(a)
          for path, a in jax.tree_util.tree_flatten_with_path(full)[0]}
  if args.save_params:
    shards = {}
    for path, a in jax.tree_util.tree_flatten_with_path(params)[0]:
      for shard in a.addressable_shards:
        where = ",".join(f"{s.start or 0}:{dim if s.stop is None else s.stop}"
                         for s, dim in zip(shard.index, a.shape))
        shards[f"shard{jax.tree_util.keystr(path)}@{where}"] = np.asarray(shard.data)
    out = args.save_params.replace("{process}", str(jax.process_index()))
    np.savez(out, **{f"full{k}": v for k, v in flat.items()}, **shards)
  return flat


def main(argv=None):
  args = parse_args(argv)
  initialize(args)
  train(args, gather=False)
  if args.num_processes > 1 or args.auto_detect:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main()
