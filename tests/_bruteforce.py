"""Brute-force references for the capture tests, written independently of the engine.

A weight element ``W[idx]`` multiplies, at every row (batch element, position,
time step, ...) of every use, one input element; its AdaAct statistic is the
mean of that element's square over all those rows. The references here build
those inputs explicitly (numpy loops over output positions and kernel taps,
numpy re-implementations of the recurrent cells and of the models) or read
them off a Jacobian (for an output linear in ``W``, ``d y[o] / d W[idx]`` is
the input ``W[idx]`` meets at output element ``o``). Every reference is first
proved by rebuilding the layer's output from the same inputs; only then is it
compared with the engine.

References are "full": one value per parameter element (float64, the
parameter's shape). An engine leaf is keep-rank (see the statistics-tree
contract in the notes): ``expand`` repeats it along each axis to the
parameter's shape before comparing, so the comparison does not depend on
which broadcast axes the engine chose to keep.
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import tree_util

from conftest import assert_f32_close

# Expected-statistics markers besides a full float64 array.
BIAS = "bias"              # ones of shape (1,) * rank: a weight on the constant input 1
UNCAPTURED = "uncaptured"  # the (0,)-shaped marker (with an UncapturedWeightWarning)
# None: no statistics (None or absent), and no warning.


def _key_name(key) -> str:
  if isinstance(key, tree_util.DictKey):
    return str(key.key)
  if isinstance(key, tree_util.GetAttrKey):
    return key.name
  if isinstance(key, tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def path_name(path) -> str:
  """Keys joined by '/'; an nnx Variable's ``value`` attribute is dropped."""
  return "/".join(_key_name(k) for k in path
                  if not (isinstance(k, tree_util.GetAttrKey) and k.name == "value"))


def by_path(tree) -> dict[str, Any]:
  """``{path name: leaf}``, None leaves kept."""
  leaves, _ = tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)
  return {path_name(p): leaf for p, leaf in leaves}


def param_paths(params) -> dict[str, tuple[int, ...]]:
  """``{path name: shape}`` of the array leaves of a parameter tree."""
  return {k: tuple(np.shape(v)) for k, v in by_path(params).items() if v is not None}


# --------------------------------------------------------------------------
# Comparing an engine leaf with a full reference


def expand(stat, shape: tuple[int, ...], name: str = "") -> np.ndarray:
  """A keep-rank statistics leaf repeated to the parameter's shape (checks the layout)."""
  assert stat is not None, f"{name}: no statistics, expected some"
  assert np.dtype(stat.dtype) == np.float32, f"{name}: dtype {stat.dtype}, expected float32"
  stat = np.asarray(stat, np.float64)
  assert stat.ndim == len(shape), f"{name}: stats {stat.shape} not keep-rank for param {shape}"
  for ax, (s, k) in enumerate(zip(stat.shape, shape)):
    assert s >= 1 and k % s == 0, f"{name}: stats {stat.shape} axis {ax} does not divide {shape}"
    stat = np.repeat(stat, k // s, axis=ax)
  return stat


def assert_stat(stat, expected, shape: tuple[int, ...], name: str,
                exact_shape: tuple[int, ...] | None = None):
  """One leaf against its expectation (full array, BIAS, UNCAPTURED or None)."""
  if expected is None:
    assert stat is None, f"{name}: expected no statistics, got {getattr(stat, 'shape', stat)}"
  elif isinstance(expected, str) and expected == UNCAPTURED:
    assert stat is not None and tuple(stat.shape) == (0,), (
        f"{name}: expected the (0,) uncaptured marker, got {getattr(stat, 'shape', stat)}")
    assert np.dtype(stat.dtype) == np.float32, name
  elif isinstance(expected, str) and expected == BIAS:
    assert stat is not None, f"{name}: bias without statistics"
    assert tuple(stat.shape) == (1,) * len(shape), f"{name}: bias stats {stat.shape}"
    assert np.dtype(stat.dtype) == np.float32, name
    np.testing.assert_array_equal(np.asarray(stat), 1.0, err_msg=name)
  else:
    if exact_shape is not None:
      assert stat is not None and tuple(stat.shape) == tuple(exact_shape), (
          f"{name}: stats shape {getattr(stat, 'shape', None)}, expected {exact_shape}")
    assert_f32_close(expand(stat, shape, name), expected, err_msg=name)


def assert_stats_tree(stats, params, expected: dict, exact_shapes: dict | None = None):
  """Every parameter path of ``params`` against ``expected`` (path -> expectation)."""
  shapes = param_paths(params)
  got = by_path(stats)
  extra = {k for k, v in got.items() if v is not None} - set(shapes)
  assert not extra, f"statistics at paths that are not parameters: {sorted(extra)}"
  missing = set(expected) - set(shapes)
  assert not missing, f"test bug: expectations for unknown paths {sorted(missing)}"
  for name, shape in shapes.items():
    assert_stat(got.get(name), expected.get(name), shape, name,
                (exact_shapes or {}).get(name))


def mean_sq(a, axes=None) -> np.ndarray:
  a = np.asarray(a, np.float64)
  return np.mean(a * a, axis=axes)


def rows_of(a) -> np.ndarray:
  """``(..., d)`` -> ``(rows, d)`` in float64."""
  a = np.asarray(a, np.float64)
  return a.reshape(-1, a.shape[-1])


def dense_full(inputs, kernel_shape) -> np.ndarray:
  """Full statistic of an ``(in, out)`` kernel whose uses met these inputs (pooled by rows).

  ``inputs``: one ``(..., in)`` array per use.
  """
  rows = np.concatenate([rows_of(a) for a in inputs])
  return np.broadcast_to(mean_sq(rows, 0)[:, None], kernel_shape).copy()


def out_in_full(inputs, weight_shape) -> np.ndarray:
  """Full statistic of an ``(out, in)`` weight applied as ``x @ W.T``."""
  return np.ascontiguousarray(dense_full(inputs, weight_shape[::-1]).T)


# --------------------------------------------------------------------------
# Convolutions: explicit patches


def _same_pads(size: int, k_dilated: int, stride: int) -> tuple[int, int]:
  out = -(-size // stride)
  total = max((out - 1) * stride + k_dilated - size, 0)
  return total // 2, total - total // 2


def conv_patches(x, kernel_size, strides=None, padding="VALID", input_dilation=None,
                 kernel_dilation=None) -> np.ndarray:
  """``x (B, *S, C)`` -> ``(B, *O, *K, C)``: the input element each kernel tap meets.

  ``patches[b, o, k, c]`` multiplies ``kernel[k, c, :]`` at output position
  ``o`` (0 where the tap meets padding or an input-dilation hole). Padding:
  'VALID', 'SAME', 'CIRCULAR' (wrap-around, Flax's convention) or explicit
  ``(lo, hi)`` pairs. Explicit loops, no lax.
  """
  x = np.asarray(x, np.float64)
  n = x.ndim - 2
  kernel_size = tuple(kernel_size)
  strides = tuple(strides or (1,) * n)
  ld = tuple(input_dilation or (1,) * n)
  rd = tuple(kernel_dilation or (1,) * n)
  batch, channels = x.shape[0], x.shape[-1]
  dilated = tuple((s - 1) * l + 1 for s, l in zip(x.shape[1:-1], ld))
  xd = np.zeros((batch,) + dilated + (channels,))
  xd[(slice(None),) + tuple(slice(None, None, l) for l in ld)] = x
  kd = tuple((k - 1) * r + 1 for k, r in zip(kernel_size, rd))
  if isinstance(padding, str) and padding == "CIRCULAR":
    pads = [((k - 1) // 2, k // 2) for k in kd]
    xp = np.pad(xd, [(0, 0)] + pads + [(0, 0)], mode="wrap")
  else:
    if isinstance(padding, str) and padding == "VALID":
      pads = [(0, 0)] * n
    elif isinstance(padding, str) and padding == "SAME":
      pads = [_same_pads(s, k, st) for s, k, st in zip(dilated, kd, strides)]
    else:
      pads = [tuple(p) for p in padding]
    xp = np.pad(xd, [(0, 0)] + pads + [(0, 0)])
  out_shape = tuple((xp.shape[1 + i] - kd[i]) // strides[i] + 1 for i in range(n))
  patches = np.zeros((batch,) + out_shape + kernel_size + (channels,))
  for o in itertools.product(*map(range, out_shape)):
    for k in itertools.product(*map(range, kernel_size)):
      at = tuple(oi * s + ki * r for oi, s, ki, r in zip(o, strides, k, rd))
      patches[(slice(None),) + o + k] = xp[(slice(None),) + at]
  return patches


def conv_from_patches(patches, kernel) -> np.ndarray:
  """Rebuild a (grouped) conv's output ``(B, *O, Out)`` from patches and a Flax
  ``(*K, C/G, Out)`` kernel: proves the patches."""
  kernel = np.asarray(kernel, np.float64)
  n = kernel.ndim - 2
  cg, out = kernel.shape[-2:]
  groups = patches.shape[-1] // cg
  y = np.zeros(patches.shape[:1 + n] + (out,))
  for o in range(out):
    g = o // (out // groups)
    y[..., o] = np.tensordot(patches[..., g * cg:(g + 1) * cg], kernel[..., o], axes=n + 1)
  return y


def conv_full(patches, kernel_shape) -> np.ndarray:
  """Full statistic of a Flax ``(*K, C/G, Out)`` kernel from its patches."""
  n = len(kernel_shape) - 2
  cg, out = kernel_shape[-2:]
  groups = patches.shape[-1] // cg
  sq = mean_sq(patches, tuple(range(1 + n)))        # (*K, C): mean over batch and positions
  full = np.zeros(kernel_shape)
  for o in range(out):
    g = o // (out // groups)
    full[..., o] = sq[..., g * cg:(g + 1) * cg]
  return full


# --------------------------------------------------------------------------
# Jacobian references


def jacobian_reference(layer, w, rows: int):
  """For ``layer(w)`` affine in ``w``: (full statistic, output, output rebuilt from J).

  ``J[o, idx] = d y[o] / d w[idx]`` is the input ``w[idx]`` meets at output
  element ``o``; each weight element feeds one output element per row, so the
  sum of ``J**2`` over outputs divided by ``rows`` is the mean square over rows.
  """
  w = jnp.asarray(w)
  jac = np.asarray(jax.jit(jax.jacrev(layer))(w), np.float64)
  layer = jax.jit(layer)
  y = np.asarray(layer(w), np.float64)
  offset = np.asarray(layer(jnp.zeros_like(w)), np.float64)   # the bias, if any
  rebuilt = np.tensordot(jac, np.asarray(w, np.float64), axes=w.ndim) + offset
  full = (jac ** 2).reshape((-1,) + w.shape).sum(0) / rows
  return full, y, rebuilt


# --------------------------------------------------------------------------
# Test cases and the engine calls


def loss_of(forward: Callable) -> Callable:
  """A scalar loss of a forward function's output (any smooth non-trivial one)."""
  def fun(params, *args, **kwargs):
    out = forward(params, *args, **kwargs)
    return sum(jnp.sum(jnp.sin(o)) for o in jax.tree.leaves(out))
  return fun


@dataclasses.dataclass
class Case:
  """A model, its inputs and its brute-force statistics.

  forward(params, *args) -> output; expected: path -> full float64 array,
  BIAS, UNCAPTURED or None; exact_shapes: path -> the stats shape the
  contract fixes; proofs: (name, actual output, output rebuilt from the
  reference inputs) triples.
  """
  forward: Callable
  params: Any
  args: tuple
  expected: dict
  proofs: list
  exact_shapes: dict = dataclasses.field(default_factory=dict)
  embeddings: bool = False
  linen: tuple | None = None   # (module, variables, args) for the Linen adapter
  nnx: tuple | None = None     # (module, args) for the NNX adapter
  runs: dict = dataclasses.field(default_factory=dict, repr=False)  # engine results by jit

  @property
  def fun(self):
    return loss_of(self.forward)


def assert_proofs(case: Case):
  assert case.proofs, "a reference without a proof"
  for name, actual, rebuilt in case.proofs:
    actual = np.asarray(actual, np.float64)
    rebuilt = np.asarray(rebuilt, np.float64)
    assert actual.shape == rebuilt.shape, (name, actual.shape, rebuilt.shape)
    assert_f32_close(rebuilt, actual, err_msg=name)


def uncaptured_warnings(records) -> list:
  import adaact_optax
  return [r for r in records if issubclass(r.category, adaact_optax.UncapturedWeightWarning)]


def run_engine(fun, params, args, *, embeddings=False, jit=False, has_aux=False,
               reference=False):
  """``value_grad_and_stats`` once, with the warnings it emitted.

  Returns ``(value, grads, stats, records)``, and with ``reference=True`` also
  plain ``jax.value_and_grad(fun)`` computed in the same call (one jit: one
  compilation for both).
  """
  import adaact_optax
  g = adaact_optax.value_grad_and_stats(fun, has_aux, embeddings=embeddings)
  both = lambda p, *a: (g(p, *a), jax.value_and_grad(fun, has_aux=has_aux)(p, *a) if reference
                        else None)
  if jit:
    both = jax.jit(both)
  with warnings.catch_warnings(record=True) as records:
    warnings.simplefilter("always")
    (value, grads, stats), ref = both(params, *args)
  return (value, grads, stats, records) + ((ref,) if reference else ())


def engine_result(case: Case, jit=True):
  """``run_engine`` on a case with the autodiff reference, once per (case, jit)."""
  if jit not in case.runs:
    case.runs[jit] = run_engine(case.fun, case.params, case.args, embeddings=case.embeddings,
                                jit=jit, reference=True)
  return case.runs[jit]


def check_engine(case: Case, *, jit=True):
  """Engine stats against the references; value and grads against plain autodiff;
  no UncapturedWeightWarning unless an UNCAPTURED marker is expected.

  Under ``jax.jit`` by default (one compilation instead of an op-by-op run:
  fast); ``jit=False`` runs the engine eagerly."""
  import adaact_optax
  value, grads, stats, records, (ref_value, ref_grads) = engine_result(case, jit)
  assert_f32_close(value, ref_value)
  ref_g = by_path(ref_grads)
  for name, grad in by_path(grads).items():
    if ref_g.get(name) is not None:
      assert_f32_close(grad, ref_g[name], err_msg=name)
  assert set(k for k, v in by_path(grads).items() if v is not None) == set(
      k for k, v in ref_g.items() if v is not None), "grads not in the params' structure"
  assert_stats_tree(stats, case.params, case.expected, case.exact_shapes)
  warned = uncaptured_warnings(records)
  expected_uncaptured = {k for k, v in case.expected.items()
                         if isinstance(v, str) and v == UNCAPTURED}
  if not expected_uncaptured:
    assert not warned, [str(r.message) for r in warned]
  # Every case passes its parameters first: the argument-order check must stay quiet.
  swapped = [r for r in records if issubclass(r.category, adaact_optax.ArgumentOrderWarning)]
  assert not swapped, [str(r.message) for r in swapped]
  return stats, records


def check_stats_shapes(case: Case):
  """``stats_shapes`` gives the engine's leaves' shapes, without running it."""
  import adaact_optax
  stats = engine_result(case)[2]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    shapes = by_path(adaact_optax.stats_shapes(case.fun, case.params, *case.args,
                                               embeddings=case.embeddings))
  for name, stat in by_path(stats).items():
    if stat is None:
      assert shapes.get(name) is None, name
    else:
      assert isinstance(shapes[name], jax.ShapeDtypeStruct), (name, shapes[name])
      assert tuple(shapes[name].shape) == tuple(stat.shape), name
      assert np.dtype(shapes[name].dtype) == np.float32, name


def random_params(params, seed: int = 1, scale=0.5):
  """Every leaf (array or ShapeDtypeStruct) replaced by float32 normal noise
  (so zero-initialised biases and LoRA's B take part). numpy, not jax.random:
  no compilation per shape."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda v: jnp.asarray(scale * rng.standard_normal(np.shape(v)), jnp.float32), params)


def normal(seed: int, *shape) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))
