import math
import os
import pathlib


def xla_flags(device_count: int) -> str:
  """``XLA_FLAGS`` of this process with ``device_count`` simulated CPU devices.

  The caller's other flags (``--xla_cpu_max_isa=SSE4_2``, ...) are kept, so
  the suite and the processes it starts run under the same XLA options.
  """
  kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
          if not f.startswith("--xla_force_host_platform_device_count")]
  return " ".join(kept + [f"--xla_force_host_platform_device_count={device_count}"])


# Multi-device tests run on 8 simulated CPU devices; XLA reads this flag once,
# before jax is first imported, so it is set here for the whole session.
os.environ["XLA_FLAGS"] = xla_flags(8)
# The suite compiles thousands of small programs, and XLA:CPU's LLVM backend
# optimisation takes most of its time, not running them. Tests compile with
# jax_disable_most_optimizations (LLVM at level 0; the HLO passes, fusion and
# buffer assignment that the HLO and memory tests read are unchanged), here and
# in the processes they start. JAX_DISABLE_MOST_OPTIMIZATIONS=0 runs the suite on
# fully optimised programs instead.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402  (after the environment above)
import numpy as np
import pytest

jax.config.update("jax_disable_most_optimizations",
                  os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"].lower() not in ("0", "false"))

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The authors' trajectories live in ../shared/fixtures beside the checkout; a
# copy is vendored in tests/fixtures so a bare clone can run the suite too.
_CANDIDATES = [
    pathlib.Path(os.environ["ADAACT_FIXTURES"]) if "ADAACT_FIXTURES" in os.environ else None,
    ROOT.parent / "shared" / "fixtures",
    ROOT / "tests" / "fixtures",
]


#: float32's machine epsilon, 2**-23: the relative spacing of float32 numbers.
F32_EPS = float(np.finfo(np.float32).eps)


def f32_rtol(steps: int = 1, ulps_per_step: int = 16) -> float:
  """Relative tolerance between two DIFFERENT float32 programs computing the same values.

  Programs that fuse, reorder or vectorise the same arithmetic differently (a
  chain of transforms against the fused one, jit against eager, a sharded
  step against one device, another CPU: ``XLA_FLAGS=--xla_cpu_max_isa=SSE4_2``)
  round at different places, so each may drift a few float32 ulps per step
  from the other, and ``steps`` dependent steps (optimizer steps; 1 for a single
  evaluation) add up. ``ulps_per_step`` bounds the drift of one step: the
  default, 16, covers an elementwise formula or one optimizer update; callers
  pass more for a step that also runs a model's forward and backward pass (long
  dot products and means over rows), and say so. The same program run twice
  is compared with ``np.testing.assert_array_equal`` instead.
  """
  return steps * ulps_per_step * F32_EPS


def bias_correction_ulps(b: float, t: int, ulps: int = 16) -> int:
  """``ulps`` for a value divided by a bias correction ``1 - b**t`` computed in float32.

  The subtraction keeps only the low bits of ``b**t``: its rounding error, and
  so the quotient's, grows by ``1 / (1 - b**t)`` (500x for ``b = 0.999, t = 2``).
  """
  return math.ceil(ulps / (1 - b ** t))


def assert_f32_close(actual, expected, *, steps: int = 1, ulps_per_step: int = 16,
                     scale: str = "leaf", err_msg: str = "") -> None:
  """Trees ``actual`` and ``expected`` agree to ``f32_rtol(steps, ulps_per_step)``.

  Per leaf, ``|a - e| <= rtol * max|e|``: relative to the leaf's largest
  magnitude, because an element that cancels to near zero still carries the
  rounding of the larger values it was computed from. ``scale="tree"`` takes
  the largest magnitude of the whole tree instead, for trees in which a whole
  leaf can be such a cancellation (an attention key bias, whose gradient is
  zero in exact arithmetic, holds only the rounding of the other gradients).
  """
  import jax

  rtol = f32_rtol(steps, ulps_per_step)
  expected_leaves = jax.tree_util.tree_leaves_with_path(expected)
  actual_leaves = jax.tree.leaves(actual)
  assert len(actual_leaves) == len(expected_leaves), (
      f"{err_msg}: {len(actual_leaves)} leaves, expected {len(expected_leaves)}")
  wide = lambda x: np.asarray(x).astype(np.complex128 if np.iscomplexobj(x) else np.float64)
  largest = lambda x: float(np.max(np.abs(wide(x)))) if np.size(x) else 0.0
  assert scale in ("leaf", "tree"), scale
  tree_scale = max([largest(e) for _, e in expected_leaves], default=0.0)
  for (path, e), a in zip(expected_leaves, actual_leaves):
    a, e = wide(a), wide(e)
    e = np.broadcast_to(e, a.shape) if e.ndim == 0 else e  # a scalar expected everywhere
    assert a.shape == e.shape, f"{err_msg}{jax.tree_util.keystr(path)}: {a.shape} != {e.shape}"
    magnitude = largest(e) if scale == "leaf" else tree_scale
    worst = float(np.max(np.abs(a - e))) if e.size else 0.0
    assert worst <= rtol * magnitude, (
        f"{err_msg}{jax.tree_util.keystr(path)}: differs by {worst:.3g} = "
        f"{worst / (magnitude or 1) / F32_EPS:.0f} float32 ulps of the {scale}'s largest "
        f"magnitude {magnitude:.3g}, more than {steps} step(s) x {ulps_per_step} ulps "
        f"(rtol {rtol:.3g})")


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


# The three calls that report a model's stats_shapes: every error about a layout
# that needs stats_shapes= names all of them.
STATS_SHAPES_CALLS = ("adaact_optax.stats_shapes(loss_fn, params, *batch)",
                      "adaact_optax.linen.stats_shapes(model, variables, *args)",
                      "adaact_optax.nnx.stats_shapes(model, *args)")


def assert_names_every_stats_shapes_call(message):
  for call in STATS_SHAPES_CALLS:
    assert f"stats_shapes={call}" in message, (call, message)
