"""Capture engine, layer by layer, against brute force (tests/_bruteforce.py).

Each case builds its reference statistics from explicit inputs (numpy patch
loops, Jacobians, re-done matmuls). ``test_reference_*`` prove each reference
by rebuilding the layer's output from those inputs; ``test_engine_*`` compare
``adaact_optax.value_grad_and_stats`` (and the Flax adapters) with them.
"""

import functools
import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _bruteforce import (BIAS, UNCAPTURED, Case, assert_proofs, assert_stat, assert_stats_tree,
                         by_path, check_engine, check_stats_shapes, conv_from_patches, conv_full,
                         conv_patches, dense_full, jacobian_reference, mean_sq, normal,
                         param_paths, random_params, rows_of, run_engine,
                         uncaptured_warnings)
from conftest import assert_f32_close

KEY = jax.random.key(0)


def _linen(module, *args):
  """(params with random values, forward, y) for a Linen module."""
  params = random_params(jax.eval_shape(module.init, KEY, *args)["params"])
  forward = lambda p, *a: module.apply({"params": p}, *a)
  return params, forward, jax.jit(forward)(params, *args)


def _nnx(make, *args, **kwargs):
  """(module, graphdef, params) of an NNX module built abstractly (no initialiser
  runs), with random parameter values."""
  abstract = nnx.eval_shape(lambda: make(*args, rngs=nnx.Rngs(0), **kwargs))
  graphdef, params = nnx.split(abstract, nnx.Param)   # raises if there is other state
  params = random_params(params)
  return nnx.merge(graphdef, params), graphdef, params


def _np(x):
  return np.asarray(x, np.float64)


# --------------------------------------------------------------------------
# Dense, DenseGeneral, Einsum


def dense_linen():
  x = normal(1, 2, 3, 4)                                   # rank-3 input
  m = nn.Dense(5)
  p, fwd, y = _linen(m, x)
  rebuilt = _np(x) @ _np(p["kernel"]) + _np(p["bias"])
  return Case(fwd, p, (x,), {"kernel": dense_full([x], (4, 5)), "bias": BIAS},
              [("dense", y, rebuilt)], {"kernel": (4, 1)}, linen=(m, {"params": p}, (x,)))


def dense_nnx():
  x = normal(1, 2, 3, 4)
  m, graphdef, p = _nnx(nnx.Linear, 4, 5)
  fwd = lambda p, x: nnx.merge(graphdef, p)(x)
  rebuilt = _np(x) @ _np(p["kernel"][...]) + _np(p["bias"][...])
  return Case(fwd, p, (x,), {"kernel": dense_full([x], (4, 5)), "bias": BIAS},
              [("linear", jax.jit(fwd)(p, x), rebuilt)], {"kernel": (4, 1)}, nnx=(m, (x,)))


def dense_called_twice():
  """One layer, two calls with different row counts: pooled by rows."""
  class Twice(nn.Module):
    @nn.compact
    def __call__(self, a, b):
      d = nn.Dense(3)
      return d(a), d(b)
  a, b = normal(1, 2, 4), normal(2, 3, 2, 4)
  m = Twice()
  p, fwd, (ya, yb) = _linen(m, a, b)
  k, bias = _np(p["Dense_0"]["kernel"]), _np(p["Dense_0"]["bias"])
  return Case(fwd, p, (a, b),
              {"Dense_0/kernel": dense_full([a, b], (4, 3)), "Dense_0/bias": BIAS},
              [("first call", ya, _np(a) @ k + bias), ("second call", yb, _np(b) @ k + bias)],
              {"Dense_0/kernel": (4, 1)}, linen=(m, {"params": p}, (a, b)))


def dense_general_batch_dims():
  """Kernel (B, H, D, F1, F2): element [b, h, d, ...] meets x[b, t, h, d] for every t."""
  x = normal(1, 2, 3, 2, 3)                                # (B, T, H, D)
  m = nn.DenseGeneral(features=(2, 2), axis=(-2, -1), batch_dims=(0,))
  p, fwd, y = _linen(m, x)
  k = _np(p["kernel"])
  rebuilt = np.einsum("bthd,bhdfg->btfg", _np(x), k) + _np(p["bias"])[:, None]
  full = np.broadcast_to(mean_sq(x, 1)[..., None, None], k.shape).copy()
  return Case(fwd, p, (x,), {"kernel": full, "bias": BIAS}, [("dense_general", y, rebuilt)],
              {"kernel": (2, 2, 3, 1, 1)}, linen=(m, {"params": p}, (x,)))


def dense_general_middle_axes():
  """Contracts axes (1, 2) of a (B, H, D, T) input: kernel (H, D, F)."""
  x = normal(1, 2, 2, 3, 3)
  m = nn.DenseGeneral(features=4, axis=(1, 2))
  p, fwd, y = _linen(m, x)
  rebuilt = np.einsum("bhdt,hdf->btf", _np(x), _np(p["kernel"])) + _np(p["bias"])
  full = np.broadcast_to(mean_sq(x, (0, 3))[..., None], (2, 3, 4)).copy()
  return Case(fwd, p, (x,), {"kernel": full, "bias": BIAS}, [("dense_general", y, rebuilt)],
              {"kernel": (2, 3, 1)}, linen=(m, {"params": p}, (x,)))


def einsum_linen():
  """'...hd,hdk->...k': contracted on h and d."""
  x = normal(1, 2, 3, 2, 3)
  m = nn.Einsum(shape=(2, 3, 4), einsum_str="...hd,hdk->...k")
  p, fwd, y = _linen(m, x)
  rebuilt = np.einsum("bthd,hdk->btk", _np(x), _np(p["kernel"])) + _np(p["bias"])
  full = np.broadcast_to(mean_sq(x, (0, 1))[..., None], (2, 3, 4)).copy()
  return Case(fwd, p, (x,), {"kernel": full, "bias": BIAS}, [("einsum", y, rebuilt)],
              {"kernel": (2, 3, 1)}, linen=(m, {"params": p}, (x,)))


def einsum_nnx():
  """'bti,hid->bthd': the contracted axis is the kernel's middle one."""
  x = normal(1, 2, 5, 3)
  m, graphdef, p = _nnx(nnx.Einsum, "bti,hid->bthd", (2, 3, 4), (2, 4))
  fwd = lambda p, x: nnx.merge(graphdef, p)(x)
  rebuilt = np.einsum("bti,hid->bthd", _np(x), _np(p["kernel"][...])) + _np(p["bias"][...])
  full = np.broadcast_to(mean_sq(x, (0, 1))[None, :, None], (2, 3, 4)).copy()
  return Case(fwd, p, (x,), {"kernel": full, "bias": BIAS},
              [("einsum", jax.jit(fwd)(p, x), rebuilt)],
              nnx=(m, (x,)))


# --------------------------------------------------------------------------
# Convolutions


def _conv_case(x_shape, kernel_size, features=4, **kw):
  x = normal(3, *x_shape)
  m = nn.Conv(features, kernel_size, **kw)
  p, fwd, y = _linen(m, x)
  k = p["kernel"]
  patches = conv_patches(x, kernel_size, kw.get("strides"), kw.get("padding", "SAME"),
                         kw.get("input_dilation"), kw.get("kernel_dilation"))
  rebuilt = conv_from_patches(patches, k) + _np(p["bias"])
  groups = kw.get("feature_group_count", 1)
  exact = tuple(k.shape[:-1]) + (groups,)           # (*K, C/G, G); (*K, C, 1) ungrouped
  return Case(fwd, p, (x,), {"kernel": conv_full(patches, k.shape), "bias": BIAS},
              [("conv", y, rebuilt)], {"kernel": exact}, linen=(m, {"params": p}, (x,)))


CONVS = {
    "conv_same": dict(x_shape=(2, 6, 6, 3), kernel_size=(2, 3), padding="SAME", strides=(1, 2)),
    "conv_valid_strided": dict(x_shape=(2, 6, 5, 3), kernel_size=(2, 3), padding="VALID",
                               strides=(2, 1)),
    "conv_circular_dilated": dict(x_shape=(2, 6, 5, 3), kernel_size=(3, 2), padding="CIRCULAR",
                                  kernel_dilation=(2, 1)),
    "conv_explicit_pads_input_dilation": dict(x_shape=(2, 5, 4, 3), kernel_size=(3, 2),
                                              padding=((1, 0), (2, 1)), strides=(2, 2),
                                              input_dilation=(2, 1)),
    "conv_same_strided_dilated_1d": dict(x_shape=(2, 8, 3), kernel_size=(3,), padding="SAME",
                                         strides=(2,), kernel_dilation=(2,)),
    "conv_grouped": dict(x_shape=(2, 5, 5, 4), kernel_size=(3, 3), features=6,
                         feature_group_count=2),
    "conv_depthwise": dict(x_shape=(2, 5, 4, 3), kernel_size=(2, 2), features=6,
                           feature_group_count=3, padding="VALID"),
}


def conv_transpose_linen(transpose_kernel=False):
  x = normal(4, 2, 3, 4, 3)
  m = nn.ConvTranspose(features=2, kernel_size=(3, 2), strides=(2, 1),
                       padding="VALID" if transpose_kernel else "SAME",
                       kernel_dilation=(1, 2) if transpose_kernel else None,
                       transpose_kernel=transpose_kernel)
  p, fwd, y = _linen(m, x)
  out_rows = int(np.prod(y.shape[:-1]))             # rows: batch x output positions
  layer = lambda k: m.apply({"params": {"kernel": k, "bias": p["bias"]}}, x)
  full, y_jac, rebuilt = jacobian_reference(layer, p["kernel"], out_rows)
  # (kh, kw, C, O); with transpose_kernel the kernel is (kh, kw, O, C): inputs on the last axis.
  exact = (3, 2, 1, 3) if transpose_kernel else (3, 2, 3, 1)
  return Case(fwd, p, (x,), {"kernel": full, "bias": BIAS},
              [("conv_transpose", y, rebuilt), ("jacobian's layer", y, y_jac)],
              {"kernel": exact}, linen=(m, {"params": p}, (x,)))


def conv_transpose_nnx():
  x = normal(4, 2, 4, 3, 3)
  m, graphdef, p = _nnx(nnx.ConvTranspose, 3, 2, (2, 3), strides=(2, 2), padding="SAME")
  fwd = lambda p, x: nnx.merge(graphdef, p)(x)
  y = jax.jit(fwd)(p, x)
  def layer(k):
    q = jax.tree.map(lambda v: v, p)
    q["kernel"] = nnx.Param(k)
    return fwd(q, x)
  full, y_jac, rebuilt = jacobian_reference(layer, p["kernel"][...], int(np.prod(y.shape[:-1])))
  return Case(fwd, p, (x,), {"kernel": full, "bias": BIAS},
              [("conv_transpose", y, rebuilt), ("jacobian's layer", y, y_jac)],
              {"kernel": (2, 3, 3, 1)}, nnx=(m, (x,)))


def conv_local():
  """Unshared kernel (O1, O2, taps*C, F): each element meets one patch element per batch row."""
  x = normal(5, 2, 4, 4, 3)
  m = nn.ConvLocal(2, (3, 3), padding="SAME")
  p, fwd, y = _linen(m, x)
  layer = lambda k: m.apply({"params": {"kernel": k, "bias": p["bias"]}}, x)
  full, y_jac, rebuilt = jacobian_reference(layer, p["kernel"], x.shape[0])
  # The Jacobian's inputs are the layer's patches: their multiset per position
  # equals the explicit patch loop's (the feature order is Flax's business).
  patches = conv_patches(x, (3, 3), padding="SAME").reshape(2, 4, 4, -1)
  assert_f32_close(np.sort(full[..., 0], -1), np.sort(mean_sq(patches, 0), -1))
  return Case(fwd, p, (x,), {"kernel": full, "bias": BIAS},
              [("conv_local", y, rebuilt), ("jacobian's layer", y, y_jac)],
              {"kernel": (4, 4, 27, 1)}, linen=(m, {"params": p}, (x,)))


# --------------------------------------------------------------------------
# LoRA


def lora_linear():
  x = normal(6, 2, 3, 4)
  m, graphdef, p = _nnx(nnx.LoRALinear, 4, 5, lora_rank=2)
  fwd = lambda p, x: nnx.merge(graphdef, p)(x)
  a, b = _np(p["lora"]["lora_a"][...]), _np(p["lora"]["lora_b"][...])
  xa = _np(x) @ a                                           # lora_b's input
  rebuilt = _np(x) @ _np(p["kernel"][...]) + _np(p["bias"][...]) + xa @ b
  return Case(fwd, p, (x,),
              {"kernel": dense_full([x], (4, 5)), "bias": BIAS,
               "lora/lora_a": dense_full([x], (4, 2)), "lora/lora_b": dense_full([xa], (2, 5))},
              [("lora_linear", jax.jit(fwd)(p, x), rebuilt)],
              {"kernel": (4, 1), "lora/lora_a": (4, 1), "lora/lora_b": (2, 1)}, nnx=(m, (x,)))


def lora_alone():
  x = normal(6, 3, 4)
  m, graphdef, p = _nnx(nnx.LoRA, 4, 3, 2)
  fwd = lambda p, x: nnx.merge(graphdef, p)(x)
  xa = _np(x) @ _np(p["lora_a"][...])
  return Case(fwd, p, (x,),
              {"lora_a": dense_full([x], (4, 3)), "lora_b": dense_full([xa], (3, 2))},
              [("lora", jax.jit(fwd)(p, x), xa @ _np(p["lora_b"][...]))],
              {"lora_a": (4, 1), "lora_b": (3, 1)}, nnx=(m, (x,)))


# --------------------------------------------------------------------------
# Embeddings


IDS = jnp.array([[1, 2, 2, 6], [1, 1, 5, 2]])


class _TiedLM(nn.Module):
  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(7, 4)
    h = jnp.tanh(nn.Dense(4)(embed(ids)))
    return embed.attend(h)


def embed_attend(embeddings=False):
  """A table used by a lookup and by attend: attend's (matmul) statistics, (1, d)."""
  m = _TiedLM()
  p, fwd, y = _linen(m, IDS)
  table = _np(p["Embed_0"]["embedding"])
  k, b = _np(p["Dense_0"]["kernel"]), _np(p["Dense_0"]["bias"])
  looked_up = table[np.asarray(IDS)]
  h = np.tanh(looked_up @ k + b)
  full = np.broadcast_to(mean_sq(rows_of(h), 0)[None, :], table.shape).copy()
  return Case(fwd, p, (IDS,),
              {"Embed_0/embedding": full, "Dense_0/kernel": dense_full([looked_up], k.shape),
               "Dense_0/bias": BIAS},
              [("attend", y, h @ table.T)], {"Embed_0/embedding": (1, 4)},
              embeddings=embeddings, linen=(m, {"params": p}, (IDS,)))


class _LookupLM(nn.Module):
  @nn.compact
  def __call__(self, ids):
    return nn.Dense(3)(nn.Embed(7, 4)(ids))


def embed_lookup(embeddings):
  """Lookup-only table: token frequency + floor with embeddings=True, nothing otherwise."""
  from adaact_optax.moments import EMBEDDING_FLOOR
  m = _LookupLM()
  p, fwd, y = _linen(m, IDS)
  table = _np(p["Embed_0"]["embedding"])
  looked_up = table[np.asarray(IDS)]
  one_hot = np.eye(7)[np.asarray(IDS).reshape(-1)]      # the lookup as a matmul's input
  rebuilt = one_hot @ table @ _np(p["Dense_0"]["kernel"]) + _np(p["Dense_0"]["bias"])
  freq = np.broadcast_to(mean_sq(one_hot, 0)[:, None] + EMBEDDING_FLOOR, table.shape).copy()
  return Case(fwd, p, (IDS,),
              {"Embed_0/embedding": freq if embeddings else None,
               "Dense_0/kernel": dense_full([looked_up], (4, 3)), "Dense_0/bias": BIAS},
              [("lookup", y.reshape(-1, 3), rebuilt)],
              {"Embed_0/embedding": (7, 1)} if embeddings else {},
              embeddings=embeddings, linen=(m, {"params": p}, (IDS,)))


# --------------------------------------------------------------------------
# Fused projections (hand-written JAX)


def fused_qkv_same_input():
  x = normal(7, 2, 3, 4)
  p = {"qkv": normal(8, 4, 12)}
  def fwd(p, x):
    q, k, v = jnp.split(p["qkv"], 3, axis=1)
    return (x @ q) * (x @ k) + x @ v
  w = _np(p["qkv"])
  xx = _np(x)
  rebuilt = (xx @ w[:, :4]) * (xx @ w[:, 4:8]) + xx @ w[:, 8:]
  return Case(fwd, p, (x,), {"qkv": dense_full([x], (4, 12))}, [("qkv", fwd(p, x), rebuilt)])


def _blocks(inputs, sizes, d):
  """Full stats of a (d, sum(sizes)) kernel whose column blocks met different inputs."""
  return np.concatenate([dense_full([a], (d, s)) for a, s in zip(inputs, sizes)], axis=1)


def fused_qkv_different_inputs():
  xs = (normal(7, 2, 3, 4), normal(8, 6, 4), normal(9, 3, 4))
  p = {"qkv": normal(10, 4, 12)}
  def fwd(p, a, b, c):
    q, k, v = jnp.split(p["qkv"], 3, axis=1)
    return a @ q, b @ k, c @ v
  w = _np(p["qkv"])
  ys = fwd(p, *xs)
  proofs = [(f"slice {i}", ys[i], _np(xs[i]) @ w[:, 4 * i:4 * i + 4]) for i in range(3)]
  return Case(fwd, p, xs, {"qkv": _blocks(xs, (4, 4, 4), 4)}, proofs)


def fused_unequal_split():
  """Grouped-query style: q wider than k and v."""
  xs = (normal(7, 5, 4), normal(8, 6, 4), normal(9, 3, 4))
  p = {"qkv": normal(10, 4, 8)}
  def fwd(p, a, b, c):
    q, k, v = jnp.split(p["qkv"], [4, 6], axis=1)
    return a @ q, b @ k, c @ v
  w = _np(p["qkv"])
  ys = fwd(p, *xs)
  cols = [slice(0, 4), slice(4, 6), slice(6, 8)]
  proofs = [(f"slice {i}", ys[i], _np(xs[i]) @ w[:, cols[i]]) for i in range(3)]
  return Case(fwd, p, xs, {"qkv": _blocks(xs, (4, 2, 2), 4)}, proofs)


def fused_out_in_split():
  """An (3d, d) (out, in) kernel split along its output axis, applied as x @ W.T."""
  xs = (normal(7, 5, 4), normal(8, 6, 4), normal(9, 3, 4))
  p = {"qkv": normal(10, 12, 4)}
  def fwd(p, a, b, c):
    q, k, v = jnp.split(p["qkv"], 3, axis=0)
    return a @ q.T, b @ k.T, c @ v.T
  w = _np(p["qkv"])
  ys = fwd(p, *xs)
  proofs = [(f"slice {i}", ys[i], _np(xs[i]) @ w[4 * i:4 * i + 4].T) for i in range(3)]
  full = np.ascontiguousarray(_blocks(xs, (4, 4, 4), 4).T)
  return Case(fwd, p, xs, {"qkv": full}, proofs, {"qkv": (3, 4)})


def fused_input_axis_split():
  """A kernel split along its input axis: each part meets its own input."""
  a, b = normal(7, 5, 4), normal(8, 5, 2)
  p = {"w": normal(10, 6, 3)}
  def fwd(p, a, b):
    return a @ p["w"][:4] + b @ p["w"][4:]
  w = _np(p["w"])
  full = np.concatenate([dense_full([a], (4, 3)), dense_full([b], (2, 3))], axis=0)
  return Case(fwd, p, (a, b), {"w": full},
              [("split", fwd(p, a, b), _np(a) @ w[:4] + _np(b) @ w[4:])], {"w": (6, 1)})


CASES = {
    "dense_linen": dense_linen,
    "dense_nnx": dense_nnx,
    "dense_called_twice": dense_called_twice,
    "dense_general_batch_dims": dense_general_batch_dims,
    "dense_general_middle_axes": dense_general_middle_axes,
    "einsum_linen": einsum_linen,
    "einsum_nnx": einsum_nnx,
    **{name: functools.partial(_conv_case, **kw) for name, kw in CONVS.items()},
    "conv_transpose": conv_transpose_linen,
    "conv_transpose_kernel": functools.partial(conv_transpose_linen, transpose_kernel=True),
    "conv_transpose_nnx": conv_transpose_nnx,
    "conv_local": conv_local,
    "lora_linear": lora_linear,
    "lora": lora_alone,
    "embed_attend": embed_attend,
    "embed_attend_embeddings": functools.partial(embed_attend, embeddings=True),
    "embed_lookup": functools.partial(embed_lookup, embeddings=False),
    "embed_lookup_embeddings": functools.partial(embed_lookup, embeddings=True),
    "fused_qkv_same_input": fused_qkv_same_input,
    "fused_qkv_different_inputs": fused_qkv_different_inputs,
    "fused_unequal_split": fused_unequal_split,
    "fused_out_in_split": fused_out_in_split,
    "fused_input_axis_split": fused_input_axis_split,
}


@functools.cache
def case(name) -> Case:
  return CASES[name]()


# The Linen adapter on a representative subset (each call compiles: keep the suite quick).
LINEN = ["dense_called_twice", "dense_general_batch_dims", "einsum_linen",
         "conv_circular_dilated", "conv_explicit_pads_input_dilation", "conv_grouped",
         "conv_transpose_kernel", "conv_local", "embed_attend", "embed_lookup_embeddings"]
NNX = ["dense_nnx", "einsum_nnx", "conv_transpose_nnx", "lora_linear", "lora"]


# --------------------------------------------------------------------------
# References (pass without the engine)


@pytest.mark.parametrize("name", list(CASES))
def test_reference_rebuilds_layer_output(name):
  assert_proofs(case(name))


def test_reference_patches_agree_with_jacobian():
  """The explicit patch loop and the Jacobian give the same conv statistics."""
  for name in ("conv_valid_strided", "conv_explicit_pads_input_dilation", "conv_grouped"):
    c = case(name)
    module = c.linen[0]
    x = c.args[0]
    layer = lambda k: module.apply({"params": {"kernel": k, "bias": c.params["bias"]}}, x)
    rows = int(np.prod(layer(c.params["kernel"]).shape[:-1]))
    full, _, _ = jacobian_reference(layer, c.params["kernel"], rows)
    assert_f32_close(full, c.expected["kernel"], err_msg=name)


def test_reference_patches_hand_computed():
  """conv_patches on a tiny 1-D case, written out by hand."""
  x = np.arange(1.0, 5.0).reshape(1, 4, 1)            # 1 2 3 4
  p = conv_patches(x, (2,), strides=(2,), padding=((1, 1),))
  np.testing.assert_array_equal(p[0, :, :, 0], [[0, 1], [2, 3], [4, 0]])
  p = conv_patches(x, (2,), padding="VALID", input_dilation=(2,))   # 1 0 2 0 3 0 4
  np.testing.assert_array_equal(p[0, :, :, 0], [[1, 0], [0, 2], [2, 0], [0, 3], [3, 0], [0, 4]])
  p = conv_patches(x, (2,), padding="CIRCULAR", kernel_dilation=(2,))  # 4 1 2 3 4 1
  np.testing.assert_array_equal(p[0, :, :, 0], [[4, 2], [1, 3], [2, 4], [3, 1]])


def test_reference_expand_checks_the_layout():
  from _bruteforce import expand
  stat = np.array([[1.0], [2.0]], np.float32)
  np.testing.assert_array_equal(expand(stat, (2, 3)), [[1, 1, 1], [2, 2, 2]])
  np.testing.assert_array_equal(expand(np.array([[1.0, 2.0]], np.float32), (2, 4)),
                                [[1, 1, 2, 2], [1, 1, 2, 2]])             # blocks
  for bad in (np.ones((2,), np.float32), np.ones((2, 2), np.float32), np.ones((2, 1))):
    with pytest.raises(AssertionError):
      expand(bad, (2, 3))


# --------------------------------------------------------------------------
# The engine


@pytest.mark.parametrize("name", list(CASES))
def test_engine_matches_bruteforce(name):
  check_engine(case(name))


@pytest.mark.parametrize("name", ["dense_linen"])
def test_engine_eager(name):
  check_engine(case(name), jit=False)


@pytest.mark.parametrize("name", ["conv_depthwise", "lora_linear", "fused_out_in_split",
                                  "embed_lookup_embeddings", "dense_general_batch_dims"])
def test_stats_shapes_match_engine(name):
  check_stats_shapes(case(name))


def _assert_adapter_stats(stats, c: Case):
  got = by_path(stats)
  for name, shape in param_paths(c.params).items():
    expected = c.expected.get(name)
    if expected is None:
      assert got.get(name) is None, (name, getattr(got.get(name), "shape", None))
    else:
      assert_stat(got.get(name), expected, shape, name, c.exact_shapes.get(name))


@pytest.mark.parametrize("name", LINEN)
def test_linen_adapter_matches_bruteforce(name):
  import adaact_optax
  c = case(name)
  module, variables, args = c.linen
  apply = lambda v, *a: adaact_optax.linen.apply(module, v, *a, embeddings=c.embeddings)
  out, mutated = jax.jit(apply)(variables, *args)
  ref = module.apply(variables, *args)
  for o, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    assert_f32_close(o, r)
  _assert_adapter_stats(mutated[adaact_optax.linen.COLLECTION], c)


@pytest.mark.parametrize("name", NNX)
def test_nnx_adapter_matches_bruteforce(name):
  import adaact_optax
  c = case(name)
  module, args = c.nnx
  out, stats = adaact_optax.nnx.apply(module, *args)
  assert_f32_close(out, module(*args))
  _assert_adapter_stats(stats, c)


# --------------------------------------------------------------------------
# Never silent: weights seen multiplying an activation but not captured


def _warned_paths(records):
  return [(str(r.message)) for r in uncaptured_warnings(records)]


def _one_warning_naming(records, path, *ops):
  """Exactly one warning names ``path`` (quoted), and it names one of ``ops``."""
  named = re.compile(r"[`'\"]" + re.escape(path) + r"[`'\"]")
  msgs = [m for m in _warned_paths(records) if named.search(m)]
  assert len(msgs) == 1, (path, _warned_paths(records))
  assert any(op in msgs[0] for op in ops), (path, ops, msgs[0])
  return msgs[0]


def test_masked_weight_warns_once_and_gets_the_marker():
  x = normal(1, 5, 4)
  mask = jnp.array(np.tril(np.ones((4, 3))), jnp.float32)
  p = {"w": normal(2, 4, 3), "v": normal(3, 3, 2)}
  def fun(p, x):
    w = p["w"] * mask
    h = jnp.tanh(x @ w) + jnp.tanh(x[:2] @ w).sum(0)   # the masked weight used twice
    return jnp.sum(jnp.sin(h @ p["v"]))
  h = np.tanh(_np(x) @ (_np(p["w"]) * _np(mask)))
  h = h + np.tanh(_np(x[:2]) @ (_np(p["w"]) * _np(mask))).sum(0)
  _, _, stats, records = run_engine(fun, p, (x,), jit=True)
  assert_stats_tree(stats, p, {"w": UNCAPTURED, "v": dense_full([h], (3, 2))})
  _one_warning_naming(records, "w", "mul")
  assert len(uncaptured_warnings(records)) == 1


def test_warning_once_per_trace_under_jit():
  import adaact_optax
  p = {"w": normal(2, 4, 3)}
  fun = lambda p, x: jnp.sum(x @ (p["w"] * 0.5 * (x.shape[0] > 0)))
  g = jax.jit(adaact_optax.value_grad_and_stats(fun))
  with warnings.catch_warnings(record=True) as records:
    warnings.simplefilter("always")
    g(p, normal(1, 5, 4))
    g(p, normal(2, 5, 4))                 # cached: no new trace, no new warning
    assert len(uncaptured_warnings(records)) == 1
    g(p, normal(1, 3, 4))                 # new shape: traced again, warned again
  assert len(uncaptured_warnings(records)) == 2
  assert all(issubclass(r.category, UserWarning) for r in uncaptured_warnings(records))


def test_dequantised_weight_warns():
  """x @ (w_int8.astype(f32) * scale): the trainable scale reaches the matmul through a mul."""
  x = normal(1, 5, 4)
  w_int8 = jnp.array(np.random.default_rng(0).integers(-127, 128, (4, 3)), jnp.int8)
  p = {"scale": jnp.full((3,), 0.01, jnp.float32), "out": normal(2, 3, 2)}
  def fun(p, x, w_int8):
    h = jnp.tanh(x @ (w_int8.astype(jnp.float32) * p["scale"]))
    return jnp.sum(jnp.sin(h @ p["out"]))
  h = np.tanh(_np(x) @ (_np(w_int8) * 0.01))
  _, _, stats, records = run_engine(fun, p, (x, w_int8), jit=True)
  assert_stats_tree(stats, p, {"scale": UNCAPTURED, "out": dense_full([h], (3, 2))})
  _one_warning_naming(records, "scale", "mul")


def test_dequantised_float_weight_warns_for_each_parameter():
  """A float weight round-tripped through a cast and scaled: both parameters are named."""
  x = normal(1, 5, 4)
  p = {"w": normal(2, 4, 3), "scale": jnp.full((3,), 0.5, jnp.float32)}
  fun = lambda p, x: jnp.sum(jnp.sin(
      x @ (p["w"].astype(jnp.bfloat16).astype(jnp.float32) * p["scale"])))
  _, _, stats, records = run_engine(fun, p, (x,), jit=True)
  assert_stats_tree(stats, p, {"w": UNCAPTURED, "scale": UNCAPTURED})
  _one_warning_naming(records, "w", "mul")
  _one_warning_naming(records, "scale", "mul")


def test_shard_map_weight_is_captured_or_reported():
  """A weight used inside jax.shard_map: its statistics reduced over the mapped axis
  (equal to brute force over the whole batch), or the marker and a warning naming
  shard_map."""
  from jax.sharding import PartitionSpec as P
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("d",))
  x = normal(1, 6, 4)
  p = {"w": normal(2, 4, 3)}
  inner = jax.shard_map(lambda w, x: jnp.tanh(x @ w), mesh=mesh, in_specs=(P(), P("d")),
                        out_specs=P("d"))
  fun = lambda p, x: jnp.sum(inner(p["w"], x))
  _, _, stats, records = run_engine(fun, p, (x,), jit=True)
  stat = by_path(stats)["w"]
  if stat is not None and stat.shape == (0,):
    _one_warning_naming(records, "w", "shard_map")
  else:
    assert_stats_tree(stats, p, {"w": dense_full([x], (4, 3))})
    assert not uncaptured_warnings(records)


def test_merged_low_rank_weight_warns_for_each_part():
  """x @ (W0 + A @ B): none of W0, A, B meets x directly (A @ B is weight x weight)."""
  x = normal(1, 5, 4)
  p = {"w0": normal(2, 4, 3), "a": normal(3, 4, 2), "b": normal(4, 2, 3)}
  fun = lambda p, x: jnp.sum(jnp.sin(x @ (p["w0"] + p["a"] @ p["b"])))
  _, _, stats, records = run_engine(fun, p, (x,), jit=True)
  assert_stats_tree(stats, p, {"w0": UNCAPTURED, "a": UNCAPTURED, "b": UNCAPTURED})
  _one_warning_naming(records, "w0", "add")
  for name in ("a", "b"):
    _one_warning_naming(records, name, "add", "dot_general")


class _Quiet(nn.Module):
  @nn.compact
  def __call__(self, ids):
    h = nn.LayerNorm()(nn.Embed(7, 4)(ids))
    scale = self.param("rms_scale", nn.initializers.ones, (4,))
    h = h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-6) * scale
    return nn.Dense(3)(h)


def test_norm_scales_biases_and_lookup_embeddings_do_not_warn():
  m = _Quiet()
  p, fwd, _ = _linen(m, IDS)
  c = Case(fwd, p, (IDS,), {}, [])
  _, _, stats, records = run_engine(c.fun, p, (IDS,), jit=True)
  assert not uncaptured_warnings(records), _warned_paths(records)
  got = by_path(stats)
  for name in ("Embed_0/embedding", "LayerNorm_0/scale", "LayerNorm_0/bias", "rms_scale"):
    assert got.get(name) is None, name
  assert_stat(got["Dense_0/bias"], BIAS, (3,), "Dense_0/bias")
  assert got["Dense_0/kernel"].shape == (4, 1)


def test_coverage_reports_matched_and_unmatched_with_reasons():
  import adaact_optax
  x = normal(1, 5, 4)
  mask = jnp.array(np.tril(np.ones((4, 3))), jnp.float32)
  p = {"w": normal(2, 4, 3), "v": normal(3, 3, 2), "b": jnp.zeros((2,)),
       "norm": jnp.ones((3,))}
  fun = lambda p, x: jnp.sum(jnp.sin((jnp.tanh(x @ (p["w"] * mask)) * p["norm"]) @ p["v"]
                                     + p["b"]))
  _, _, stats, _ = run_engine(fun, p, (x,), jit=True)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    report = adaact_optax.coverage(fun, p, x)
  captured = {k: tuple(v.shape) for k, v in by_path(stats).items()
              if v is not None and v.shape != (0,)}
  assert {k: tuple(v) for k, v in report.matched.items()} == captured
  assert captured["v"] == (3, 1)
  assert "w" in report.unmatched and "mul" in report.unmatched["w"]
  assert "w" not in report.matched and "norm" not in report.matched


def test_uncaptured_marker_reaches_the_optimizer():
  """The (0,) marker makes adaact(unmatched='error') refuse, naming the weight; with
  the default 'sgd' the masked weight gets the plain gradient step."""
  import adaact_optax
  x = normal(1, 5, 4)
  mask = jnp.array(np.tril(np.ones((4, 3))), jnp.float32)
  p = {"w": normal(2, 4, 3), "v": normal(3, 3, 2)}
  fun = lambda p, x: jnp.sum(jnp.sin(jnp.tanh(x @ (p["w"] * mask)) @ p["v"]))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", adaact_optax.UncapturedWeightWarning)
    _, grads, stats = adaact_optax.value_grad_and_stats(fun)(p, x)
    shapes = adaact_optax.stats_shapes(fun, p, x)
  strict = adaact_optax.adaact(0.1, unmatched="error", stats_shapes=shapes)
  with pytest.raises(ValueError, match=r"\bw\b"):
    strict.update(grads, strict.init(p), p, activation_stats=stats)
  tx = adaact_optax.adaact(0.1, weight_decay=0.0, stats_shapes=shapes)
  updates, _ = tx.update(grads, tx.init(p), p, activation_stats=stats)
  assert_f32_close(updates["w"], -0.1 * grads["w"])
  assert not np.allclose(updates["v"], -0.1 * grads["v"])
