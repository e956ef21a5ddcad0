import os
import pathlib

# Multi-device tests run on 8 simulated CPU devices; XLA reads this flag once,
# before jax is first imported, so it is set here for the whole session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The authors' trajectories live in ../shared/fixtures beside the checkout; a
# copy is vendored in tests/fixtures so a bare clone can run the suite too.
_CANDIDATES = [
    pathlib.Path(os.environ["ADAACT_FIXTURES"]) if "ADAACT_FIXTURES" in os.environ else None,
    ROOT.parent / "shared" / "fixtures",
    ROOT / "tests" / "fixtures",
]


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
  for c in _CANDIDATES:
    if c is not None and (c / "adaact_parity_mlp.npz").exists():
      return c
  raise FileNotFoundError(f"AdaAct parity fixtures not found in {_CANDIDATES}")


def warning_messages(category, fn, *args, **kwargs):
  """``(fn(*args, **kwargs), [messages of the warnings of category it emitted])``."""
  import warnings
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = fn(*args, **kwargs)
  return out, [str(w.message) for w in caught if issubclass(w.category, category)]


def linen_loss_grads_and_stats(model, params, x, y, batch_stats=None):
  """Softmax cross-entropy (on float32 logits) of a Linen classifier, its
  gradients and AdaAct's statistics, through ``adaact_optax.linen.apply``.

  Returns ``(loss, grads, stats, batch_stats)``; ``batch_stats`` is updated
  when given (BatchNorm models, run with ``mutable=["batch_stats"]``).
  """
  import jax
  import jax.numpy as jnp
  import optax
  from adaact_optax import linen as aa_linen

  def loss_fn(p):
    variables = {"params": p} if batch_stats is None else {"params": p, "batch_stats": batch_stats}
    logits, mutated = aa_linen.apply(model, variables, x,
                                     mutable=[] if batch_stats is None else ["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
    return loss.mean(), mutated

  (loss, mutated), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return loss, grads, mutated[aa_linen.COLLECTION], mutated.get("batch_stats", batch_stats)


def linen_train_step(model, tx, grad_axis=None, jit=True):
  """The shared training step: ``step(params, opt_state, x, y) -> (params, opt_state)``.

  Gradients and statistics from ``linen_loss_grads_and_stats``, then
  ``tx.update(..., activation_stats=stats)`` and ``optax.apply_updates``.
  ``grad_axis`` averages the gradients over a ``pmap``/``shard_map`` axis
  (the statistics are averaged by the optimizer's own ``axis_name``).
  ``jit=False`` returns the plain function, for callers that wrap it in
  ``pmap``, ``shard_map`` or a ``jit`` with shardings.
  """
  import jax
  import optax

  def step(params, opt_state, x, y):
    _, grads, stats, _ = linen_loss_grads_and_stats(model, params, x, y)
    if grad_axis is not None:
      grads = jax.lax.pmean(grads, grad_axis)
    updates, opt_state = tx.update(grads, opt_state, params, activation_stats=stats)
    return optax.apply_updates(params, updates), opt_state

  return jax.jit(step) if jit else step
