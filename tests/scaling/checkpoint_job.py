"""Subprocess for tests/scaling/test_checkpoint.py: train, checkpoint with Orbax, resume.

  python tests/scaling/checkpoint_job.py {linen,nnx} run    DIR  # steps 0..S-1, save at S, go on to S+N
  python tests/scaling/checkpoint_job.py {linen,nnx} resume DIR  # fresh process: restore, go on to S+N

``run`` writes DIR/run.npz (final params, and nu/count at the save);
``resume`` writes DIR/resume.npz (restored nu/count, final params),
DIR/dropped.npz (final params when only the params are restored and the
optimizer starts afresh) and DIR/no_nu.npz (final params when everything but
the activation averages nu is restored, as the authors' optimizer resumes).
Every batch is a fixed slice of sklearn's digits.
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import linen as nn
from flax import nnx
from sklearn.datasets import load_digits

import adaact_optax
from adaact_optax._src import alignment as matching
from adaact_optax import nnx as aa_nnx
from conftest import linen_loss_grads_and_stats

SAVE_AT, MORE, BATCH = 4, 4, 32


def batch(t):
  x, y = load_digits(return_X_y=True)
  sl = slice(t * BATCH, (t + 1) * BATCH)
  return jnp.asarray(x[sl] / 16.0, jnp.float32), jnp.asarray(y[sl], jnp.int32)


def tx():
  return adaact_optax.adaact(optax.cosine_decay_schedule(0.1, SAVE_AT + MORE))


def without_nu(tree):
  """``tree`` with AdaAct's activation averages (paths through ``nu``) zeroed."""
  zero = lambda p, v: jnp.zeros_like(v) if "/nu/" in f"/{matching.path_name(p)}/" else v
  return jax.tree_util.tree_map_with_path(zero, tree)


def flat(tree, prefix):
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {f"{prefix}/{matching.path_name(p)}": np.asarray(v) for p, v in leaves}


# --- Linen: adaact_optax.TrainState -----------------------------------------

class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(10)(nn.relu(nn.Dense(16)(x)))


def linen_state():
  model = LinenMLP()
  params = model.init(jax.random.key(0), batch(0)[0])["params"]
  return adaact_optax.TrainState.create(apply_fn=model.apply, params=params, tx=tx())


@jax.jit
def linen_step(state, x, y):
  _, grads, stats, _ = linen_loss_grads_and_stats(LinenMLP(), state.params, x, y)
  return state.apply_gradients(grads=grads, activation_stats=stats)


def linen_run(directory):
  state = linen_state()
  for t in range(SAVE_AT + MORE):
    if t == SAVE_AT:
      with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(directory / "ckpt", state)
      saved = state.opt_state[0]
    state = linen_step(state, *batch(t))
  return {**flat(state.params, "final"), **flat(saved.nu, "nu"), "count": saved.count}


def linen_resume(directory):
  fresh = linen_state()  # the structure (and tx, apply_fn) to restore into
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, fresh)
  with ocp.StandardCheckpointer() as ckpt:
    state = ckpt.restore(directory / "ckpt", abstract)
  restored = state.opt_state[0]
  dropped = fresh.replace(params=state.params, step=state.step)
  no_nu = state.replace(opt_state=without_nu(state.opt_state))
  for t in range(SAVE_AT, SAVE_AT + MORE):
    state, dropped, no_nu = (linen_step(s, *batch(t)) for s in (state, dropped, no_nu))
  return ({**flat(state.params, "final"), **flat(restored.nu, "nu"), "count": restored.count},
          flat(dropped.params, "final"), flat(no_nu.params, "final"))


# --- NNX: nnx.Optimizer ---------------------------------------------------------

class NNXMLP(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(64, 16, rngs=rngs)
    self.head = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.hidden(x)))


def nnx_build():
  model = NNXMLP(nnx.Rngs(0))
  return model, nnx.Optimizer(model, tx(), wrt=nnx.Param)


@nnx.jit
def nnx_step(model, optimizer, x, y):
  def loss_fn(model):
    logits, stats = aa_nnx.apply(model, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), stats
  grads, stats = nnx.grad(loss_fn, has_aux=True)(model)
  optimizer.update(model, grads, activation_stats=stats)


def nnx_scale_state(optimizer):
  return nnx.as_pure(optimizer.opt_state)[0]


def nnx_run(directory):
  model, optimizer = nnx_build()
  for t in range(SAVE_AT + MORE):
    if t == SAVE_AT:
      with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(directory / "model", nnx.state(model))
        ckpt.save(directory / "optimizer", nnx.state(optimizer))
      saved = jax.tree.map(np.asarray, nnx_scale_state(optimizer))
    nnx_step(model, optimizer, *batch(t))
  return {**flat(nnx.state(model, nnx.Param), "final"), **flat(saved.nu, "nu"),
          "count": saved.count}


def nnx_resume(directory):
  # Abstract model and optimizer give the structure; nothing is computed.
  abstract_model, abstract_opt = nnx.eval_shape(nnx_build)
  with ocp.StandardCheckpointer() as ckpt:
    model_state = ckpt.restore(directory / "model", nnx.state(abstract_model))
    opt_state = ckpt.restore(directory / "optimizer", nnx.state(abstract_opt))
  model, optimizer = nnx_build()
  nnx.update(model, model_state)
  nnx.update(optimizer, opt_state)
  restored = jax.tree.map(np.asarray, nnx_scale_state(optimizer))
  dropped_model, _ = nnx_build()
  nnx.update(dropped_model, model_state)
  dropped_opt = nnx.Optimizer(dropped_model, tx(), wrt=nnx.Param)
  no_nu_model, no_nu_opt = nnx_build()
  nnx.update(no_nu_model, model_state)
  nnx.update(no_nu_opt, without_nu(opt_state))
  runs = [(model, optimizer), (dropped_model, dropped_opt), (no_nu_model, no_nu_opt)]
  for t in range(SAVE_AT, SAVE_AT + MORE):
    for m, o in runs:
      nnx_step(m, o, *batch(t))
  final = [flat(nnx.state(m, nnx.Param), "final") for m, _ in runs]
  return ({**final[0], **flat(restored.nu, "nu"), "count": restored.count}, *final[1:])


def main(framework, mode, directory):
  directory = pathlib.Path(directory).resolve()
  run, resume = {"linen": (linen_run, linen_resume), "nnx": (nnx_run, nnx_resume)}[framework]
  if mode == "run":
    np.savez(directory / "run.npz", **run(directory))
  else:
    for name, arrays in zip(("resume", "dropped", "no_nu"), resume(directory)):
      np.savez(directory / f"{name}.npz", **arrays)


if __name__ == "__main__":
  main(*sys.argv[1:])
