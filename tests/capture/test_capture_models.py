"""Capture engine on whole models against brute force (tests/_bruteforce.py).

Recurrent cells (weights shared across time steps: pooled over batch x time),
``nn.scan`` stacks (per-layer statistics), hand-written JAX with nested
``jit`` / ``checkpoint`` / ``custom_vjp`` / ``cond`` / ``while_loop`` /
``scan``, Equinox and Haiku models and a HuggingFace-GPT-2-style block. Each
reference re-runs the model in numpy (float64) collecting every weight's
inputs; ``test_reference_*`` prove it by matching the model's output.
"""

import functools
import math

import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from _bruteforce import (BIAS, Case, assert_proofs, assert_stat, by_path, check_engine,
                         check_stats_shapes, conv_from_patches, conv_full, conv_patches,
                         dense_full, engine_result, normal, out_in_full, param_paths,
                         random_params, sigmoid)
from conftest import assert_f32_close

KEY = jax.random.key(0)


def _np(x):
  return np.asarray(x, np.float64)


def _np_tree(tree):
  return jax.tree.map(_np, tree)


def _linen(module, *args):
  params = random_params(jax.eval_shape(module.init, KEY, *args)["params"])
  forward = lambda p, *a: module.apply({"params": p}, *a)
  return params, forward, jax.jit(forward)(params, *args)


# --------------------------------------------------------------------------
# Recurrent cells under nn.RNN


class _RNN(nn.Module):
  cell: type

  @nn.compact
  def __call__(self, x):
    return nn.RNN(self.cell(4, name="cell"))(x)


def _lstm_numpy(p, x):
  """LSTMCell / OptimizedLSTMCell in numpy: (outputs, x_t rows, h_{t-1} rows)."""
  batch, steps, _ = x.shape
  c = h = np.zeros((batch, 4))
  xs, hs, ys = [], [], []
  for t in range(steps):
    xt = x[:, t]
    xs.append(xt)
    hs.append(h)
    gate = lambda n: xt @ p["i" + n]["kernel"] + h @ p["h" + n]["kernel"] + p["h" + n]["bias"]
    i, f, g, o = sigmoid(gate("i")), sigmoid(gate("f")), np.tanh(gate("g")), sigmoid(gate("o"))
    c = f * c + i * g
    h = o * np.tanh(c)
    ys.append(h)
  return np.stack(ys, 1), xs, hs


def _gru_numpy(p, x):
  batch, steps, _ = x.shape
  h = np.zeros((batch, 4))
  xs, hs, ys = [], [], []
  for t in range(steps):
    xt = x[:, t]
    xs.append(xt)
    hs.append(h)
    r = sigmoid(xt @ p["ir"]["kernel"] + p["ir"]["bias"] + h @ p["hr"]["kernel"])
    z = sigmoid(xt @ p["iz"]["kernel"] + p["iz"]["bias"] + h @ p["hz"]["kernel"])
    n = np.tanh(xt @ p["in"]["kernel"] + p["in"]["bias"]
                + r * (h @ p["hn"]["kernel"] + p["hn"]["bias"]))
    h = (1 - z) * n + z * h
    ys.append(h)
  return np.stack(ys, 1), xs, hs


def rnn_case(cell):
  """Input kernels: mean over batch x time of x_t**2; hidden kernels: of h_{t-1}**2
  (h_0 = 0 included: those rows are multiplied too)."""
  x = normal(1, 2, 3, 3)                                     # (batch, time, features)
  m = _RNN(cell)
  p, fwd, y = _linen(m, x)
  cp = _np_tree(p["cell"])
  ys, xs, hs = (_gru_numpy if cell is nn.GRUCell else _lstm_numpy)(cp, _np(x))
  expected = {}
  for gate, sub in cp.items():
    inputs = xs if gate.startswith("i") else hs
    expected[f"cell/{gate}/kernel"] = dense_full(inputs, sub["kernel"].shape)
    if "bias" in sub:
      expected[f"cell/{gate}/bias"] = BIAS
  exact = {k: (v.shape[0], 1) for k, v in expected.items() if not isinstance(v, str)}
  return Case(fwd, p, (x,), expected, [("rnn", y, ys)], exact, linen=(m, {"params": p}, (x,)))


# --------------------------------------------------------------------------
# nn.scan stack: per-layer statistics


class _Block(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    return jnp.tanh(nn.Dense(4)(h)), None


class _ScanStack(nn.Module):
  @nn.compact
  def __call__(self, x):
    stack = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    h, _ = stack(name="stack")(x, None)
    return h


def scan_stack():
  x = normal(1, 2, 3, 4)
  m = _ScanStack()
  p, fwd, y = _linen(m, x)
  k, b = _np(p["stack"]["Dense_0"]["kernel"]), _np(p["stack"]["Dense_0"]["bias"])
  h, full = _np(x), []
  for layer in range(3):
    full.append(dense_full([h], (4, 4)))
    h = np.tanh(h @ k[layer] + b[layer])
  # The stacked bias: ones, (1, 1) or per layer (3, 1).
  return Case(fwd, p, (x,), {"stack/Dense_0/kernel": np.stack(full),
                             "stack/Dense_0/bias": np.ones((3, 4))},
              [("scan stack", y, h)], {"stack/Dense_0/kernel": (3, 4, 1)},
              linen=(m, {"params": p}, (x,)))


class _NNXScanMLP(nnx.Module):
  """Layers built with nnx.vmap, run with nnx.scan; a head under nnx.remat."""

  def __init__(self, rngs):
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return nnx.Linear(4, 4, rngs=rngs)
    self.layers = make(rngs)
    self.head = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def step(h, layer):
      return jnp.tanh(layer(h))
    return nnx.remat(lambda m, h: m(h))(self.head, step(x, self.layers))


def nnx_scan_remat():
  x = normal(1, 2, 3, 4)
  graphdef, p = nnx.split(nnx.eval_shape(lambda: _NNXScanMLP(nnx.Rngs(0))), nnx.Param)
  p = random_params(p)
  m = nnx.merge(graphdef, p)
  fwd = lambda p, x: nnx.merge(graphdef, p)(x)
  k, b = _np(p["layers"]["kernel"][...]), _np(p["layers"]["bias"][...])
  h, full = _np(x), []
  for layer in range(3):
    full.append(dense_full([h], (4, 4)))
    h = np.tanh(h @ k[layer] + b[layer])
  y = h @ _np(p["head"]["kernel"][...]) + _np(p["head"]["bias"][...])
  return Case(fwd, p, (x,), {"layers/kernel": np.stack(full), "layers/bias": np.ones((3, 4)),
                             "head/kernel": dense_full([h], (4, 2)), "head/bias": BIAS},
              [("nnx scan", jax.jit(fwd)(p, x), y)], {"layers/kernel": (3, 4, 1)},
              nnx=(m, (x,)))


class _LinenRemat(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.remat(nn.Dense)(5, name="inner")(x))
    return nn.jit(nn.Dense)(2, name="outer")(h)


def linen_remat_jit():
  x = normal(1, 3, 4)
  m = _LinenRemat()
  p, fwd, y = _linen(m, x)
  q = _np_tree(p)
  h = np.tanh(_np(x) @ q["inner"]["kernel"] + q["inner"]["bias"])
  return Case(fwd, p, (x,), {"inner/kernel": dense_full([x], (4, 5)), "inner/bias": BIAS,
                             "outer/kernel": dense_full([h], (5, 2)), "outer/bias": BIAS},
              [("lifted", y, h @ q["outer"]["kernel"] + q["outer"]["bias"])],
              {"inner/kernel": (4, 1), "outer/kernel": (5, 1)}, linen=(m, {"params": p}, (x,)))


# --------------------------------------------------------------------------
# Hand-written JAX: nested jit, checkpoint, custom_vjp, cond, while, scan


@jax.jit
def _block(w, b, h):
  return jnp.tanh(h @ w + b)


def nested_jit_checkpoint():
  x = normal(1, 2, 3, 4)
  p = {"w1": normal(2, 4, 5), "b1": normal(3, 5), "w2": normal(4, 5, 2), "b2": normal(5, 2)}
  def fwd(p, x):
    h = jax.checkpoint(_block)(p["w1"], p["b1"], x)
    inner = lambda p, h: jax.checkpoint(lambda h: _block(p["w2"], p["b2"], h))(h)
    return jax.jit(inner)(p, h)
  q = _np_tree(p)
  h1 = np.tanh(_np(x) @ q["w1"] + q["b1"])
  y = np.tanh(h1 @ q["w2"] + q["b2"])
  return Case(fwd, p, (x,), {"w1": dense_full([x], (4, 5)), "b1": BIAS,
                             "w2": dense_full([h1], (5, 2)), "b2": BIAS},
              [("nested", jax.jit(fwd)(p, x), y)], {"w1": (4, 1), "w2": (5, 1)})


@jax.custom_vjp
def _halved_grad_matmul(x, w):
  return x @ w


def _hgm_fwd(x, w):
  return x @ w, (x, w)


def _hgm_bwd(res, g):
  x, w = res
  return g @ w.T, 0.5 * (x.T @ g)          # a deliberately halved weight gradient


_halved_grad_matmul.defvjp(_hgm_fwd, _hgm_bwd)


def custom_vjp_matmul():
  """Statistics from the primal computation; the custom rule's gradient is kept
  (check_engine compares grads with jax.grad, which applies the 0.5)."""
  x = normal(1, 5, 4)
  p = {"w": normal(2, 4, 3), "v": normal(3, 3, 2)}
  fwd = lambda p, x: jnp.tanh(_halved_grad_matmul(x, p["w"])) @ p["v"]
  h = np.tanh(_np(x) @ _np(p["w"]))
  return Case(fwd, p, (x,), {"w": dense_full([x], (4, 3)), "v": dense_full([h], (3, 2))},
              [("custom_vjp", fwd(p, x), h @ _np(p["v"]))], {"w": (4, 1), "v": (3, 1)})


def cond_case(flag: bool):
  """Both branches use w, on different inputs and row counts: the taken branch's rows only."""
  x = normal(1, 5, 4)
  p = {"w": normal(2, 4, 3)}
  def fwd(p, x, flag):
    return lax.cond(flag, lambda x: jnp.tanh(x @ p["w"]),
                    lambda x: jnp.broadcast_to(jnp.tanh((2.0 * x[:2]) @ p["w"]).sum(0), (5, 3)),
                    x)
  taken = _np(x) if flag else 2.0 * _np(x[:2])
  y = np.tanh(taken @ _np(p["w"]))
  if not flag:
    y = np.broadcast_to(y.sum(0), (5, 3))
  return Case(fwd, p, (x, jnp.asarray(flag)), {"w": dense_full([taken], (4, 3))},
              [("cond", fwd(p, x, jnp.asarray(flag)), y)], {"w": (4, 1)})


@jax.custom_vjp
def _fixed_point(w, x, n):
  """h <- tanh(h @ w + x), n times (n traced: a while loop)."""
  body = lambda c: (c[0] + 1, jnp.tanh(c[1] @ w + x))
  return lax.while_loop(lambda c: c[0] < n, body, (jnp.int32(0), jnp.zeros_like(x)))[1]


def _fp_fwd(w, x, n):
  h = _fixed_point(w, x, n)
  return h, (w, x, h)


def _fp_bwd(res, g):                        # one-step gradient at the end point
  w, x, h = res
  _, vjp = jax.vjp(lambda w, x: jnp.tanh(h @ w + x), w, x)
  gw, gx = vjp(g)
  return gw, gx, None


_fixed_point.defvjp(_fp_fwd, _fp_bwd)


def while_loop_case():
  """w used at every iteration of a while loop with a traced trip count: pooled."""
  x = normal(1, 2, 4)
  p = {"w": 0.5 * normal(2, 4, 4), "v": normal(3, 4, 2)}
  fwd = lambda p, x, n: _fixed_point(p["w"], x, n) @ p["v"]
  h, seen = np.zeros((2, 4)), []
  for _ in range(3):
    seen.append(h)
    h = np.tanh(h @ _np(p["w"]) + _np(x))
  n = jnp.int32(3)
  return Case(fwd, p, (x, n), {"w": dense_full(seen, (4, 4)), "v": dense_full([h], (4, 2))},
              [("while", jax.jit(fwd)(p, x, n), h @ _np(p["v"]))], {"w": (4, 1)})


def scan_shared():
  """Weights as scan consts: pooled over iterations; u also used once outside the scan."""
  xs = normal(1, 3, 2, 4)                                   # (time, batch, features)
  extra = normal(2, 5, 4)
  p = {"w": 0.5 * normal(3, 3, 3), "u": normal(4, 4, 3)}
  def fwd(p, xs, extra):
    step = lambda h, x_t: (jnp.tanh(h @ p["w"] + x_t @ p["u"]),) * 2
    _, hs = lax.scan(step, jnp.zeros((2, 3)), xs)
    return hs, extra @ p["u"]
  q = _np_tree(p)
  h, hprev, ys = np.zeros((2, 3)), [], []
  for t in range(3):
    hprev.append(h)
    h = np.tanh(h @ q["w"] + _np(xs[t]) @ q["u"])
    ys.append(h)
  hs, out = fwd(p, xs, extra)
  return Case(fwd, p, (xs, extra),
              {"w": dense_full(hprev, (3, 3)), "u": dense_full(list(_np(xs)) + [extra], (4, 3))},
              [("scan", hs, np.stack(ys)), ("outside", out, _np(extra) @ q["u"])],
              {"w": (3, 1), "u": (4, 1)})


def scan_stacked():
  """Weights as scanned xs (one slice per iteration): per-slice statistics."""
  x = normal(1, 2, 4)
  p = {"ws": 0.7 * normal(2, 3, 4, 4), "out": normal(3, 4, 2)}
  def fwd(p, x):
    h, _ = lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["ws"])
    return h @ p["out"]
  h, full = _np(x), []
  for w in _np(p["ws"]):
    full.append(dense_full([h], (4, 4)))
    h = np.tanh(h @ w)
  return Case(fwd, p, (x,), {"ws": np.stack(full), "out": dense_full([h], (4, 2))},
              [("stacked scan", fwd(p, x), h @ _np(p["out"]))], {"ws": (3, 4, 1)})


# --------------------------------------------------------------------------
# Equinox and Haiku


def _eqx(make, *args, **kwargs):
  """An Equinox model built abstractly (no initialiser runs), random weights."""
  model = eqx.filter_eval_shape(make, *args, **kwargs)
  params, static = eqx.partition(model, lambda v: isinstance(v, jax.ShapeDtypeStruct))
  params = random_params(params)
  forward = lambda p, x: jax.vmap(eqx.combine(p, static))(x)
  return params, forward


def eqx_mlp():
  """eqx.nn.Linear weights are (out, in), applied per sample under vmap: stats (1, in)."""
  x = normal(1, 5, 3)
  p, fwd = _eqx(eqx.nn.MLP, 3, 2, 4, 2, key=KEY)
  h, inputs = _np(x), []
  for i, layer in enumerate(p.layers):
    inputs.append(h)
    h = h @ _np(layer.weight).T + _np(layer.bias)
    if i < 2:
      h = np.maximum(h, 0)
  expected, exact = {}, {}
  for i, (layer, a) in enumerate(zip(p.layers, inputs)):
    expected[f"layers/{i}/weight"] = out_in_full([a], layer.weight.shape)
    expected[f"layers/{i}/bias"] = BIAS
    exact[f"layers/{i}/weight"] = (1, layer.weight.shape[1])
  return Case(fwd, p, (x,), expected, [("eqx mlp", jax.jit(fwd)(p, x), h)], exact)


class _CNN(eqx.Module):
  c1: eqx.nn.Conv2d
  c2: eqx.nn.Conv2d
  fc: eqx.nn.Linear

  def __init__(self, key):
    k1, k2, k3 = jax.random.split(key, 3)
    self.c1 = eqx.nn.Conv2d(3, 4, 3, padding=1, key=k1)
    self.c2 = eqx.nn.Conv2d(4, 2, 2, stride=2, key=k2)
    self.fc = eqx.nn.Linear(18, 3, key=k3)

  def __call__(self, x):                                    # (C, H, W), one sample
    h = jax.nn.relu(self.c1(x))
    h = jax.nn.relu(self.c2(h))
    return self.fc(h.reshape(-1))


def _eqx_conv(h_nchw, conv, padding, strides):
  """(output NCHW, full stats in the (O, C, kh, kw) layout) from explicit patches."""
  w = _np(conv.weight)                                      # (O, C, kh, kw)
  kernel = w.transpose(2, 3, 1, 0)                          # Flax layout (kh, kw, C, O)
  patches = conv_patches(h_nchw.transpose(0, 2, 3, 1), kernel.shape[:2], strides, padding)
  y = conv_from_patches(patches, kernel) + _np(conv.bias).reshape(-1)
  return y.transpose(0, 3, 1, 2), conv_full(patches, kernel.shape).transpose(3, 2, 0, 1)


def eqx_cnn():
  x = normal(1, 2, 3, 6, 6)
  p, fwd = _eqx(_CNN, KEY)
  h1, s1 = _eqx_conv(_np(x), p.c1, ((1, 1), (1, 1)), (1, 1))
  h1 = np.maximum(h1, 0)
  h2, s2 = _eqx_conv(h1, p.c2, "VALID", (2, 2))
  flat = np.maximum(h2, 0).reshape(2, -1)
  y = flat @ _np(p.fc.weight).T + _np(p.fc.bias)
  return Case(fwd, p, (x,),
              {"c1/weight": s1, "c1/bias": BIAS, "c2/weight": s2, "c2/bias": BIAS,
               "fc/weight": out_in_full([flat], (3, 18)), "fc/bias": BIAS},
              [("eqx cnn", jax.jit(fwd)(p, x), y)],
              {"c1/weight": (1, 3, 3, 3), "c2/weight": (1, 4, 2, 2), "fc/weight": (1, 18)})


def haiku_mlp():
  x = normal(1, 5, 3)
  f = hk.transform(lambda x: hk.nets.MLP([4, 2])(x))
  p = random_params(jax.eval_shape(f.init, KEY, x))
  fwd = lambda p, x: f.apply(p, None, x)
  q = _np_tree(p)
  h1 = np.maximum(_np(x) @ q["mlp/~/linear_0"]["w"] + q["mlp/~/linear_0"]["b"], 0)
  y = h1 @ q["mlp/~/linear_1"]["w"] + q["mlp/~/linear_1"]["b"]
  return Case(fwd, p, (x,),
              {"mlp/~/linear_0/w": dense_full([x], (3, 4)), "mlp/~/linear_0/b": BIAS,
               "mlp/~/linear_1/w": dense_full([h1], (4, 2)), "mlp/~/linear_1/b": BIAS},
              [("haiku", jax.jit(fwd)(p, x), y)],
              {"mlp/~/linear_0/w": (3, 1), "mlp/~/linear_1/w": (4, 1)})


# --------------------------------------------------------------------------
# Recurrent cells whose bias is added to a sum of contractions
# (W_i x + W_h h + b): the bias still gets the constant-input statistic 1.


def _eqx_cell_scan(cell_type):
  """An Equinox cell unrolled by lax.scan over time, vmapped over the batch."""
  model = eqx.filter_eval_shape(cell_type, 3, 4, key=KEY)
  params, static = eqx.partition(model, lambda v: isinstance(v, jax.ShapeDtypeStruct))
  params = random_params(params)
  lstm = cell_type is eqx.nn.LSTMCell

  def forward(p, xs):                                        # xs (batch, time, features)
    cell = eqx.combine(p, static)
    h0 = (jnp.zeros(4), jnp.zeros(4)) if lstm else jnp.zeros(4)
    def sequence(x):
      return lax.scan(lambda h, x_t: (cell(x_t, h),) * 2, h0, x)[1]
    return jax.vmap(sequence)(xs)
  return params, forward


def eqx_lstm_scan():
  """eqx.nn.LSTMCell: lin = W_ih x + W_hh h + bias, one bias for both contractions."""
  x = normal(1, 2, 3, 3)
  p, fwd = _eqx_cell_scan(eqx.nn.LSTMCell)
  w_ih, w_hh, b = _np(p.weight_ih), _np(p.weight_hh), _np(p.bias)
  h = c = np.zeros((2, 4))
  xs, hs, ys = [], [], []
  for t in range(3):
    xs.append(_np(x[:, t]))
    hs.append(h)
    i, f, g, o = np.split(xs[-1] @ w_ih.T + h @ w_hh.T + b, 4, axis=-1)
    c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
    h = sigmoid(o) * np.tanh(c)
    ys.append(h)
  hs_out, _ = jax.jit(fwd)(p, x)
  return Case(fwd, p, (x,), {"weight_ih": out_in_full(xs, (16, 3)),
                             "weight_hh": out_in_full(hs, (16, 4)), "bias": BIAS},
              [("eqx lstm", hs_out, np.stack(ys, 1))],
              {"weight_ih": (1, 3), "weight_hh": (1, 4)})


def eqx_gru_scan():
  """eqx.nn.GRUCell: bias on W_ih x, bias_n on a split part of W_hh h."""
  x = normal(1, 2, 3, 3)
  p, fwd = _eqx_cell_scan(eqx.nn.GRUCell)
  w_ih, w_hh = _np(p.weight_ih), _np(p.weight_hh)
  h, xs, hs, ys = np.zeros((2, 4)), [], [], []
  for t in range(3):
    xs.append(_np(x[:, t]))
    hs.append(h)
    i_r, i_z, i_n = np.split(xs[-1] @ w_ih.T + _np(p.bias), 3, axis=-1)
    h_r, h_z, h_n = np.split(h @ w_hh.T, 3, axis=-1)
    r, z = sigmoid(i_r + h_r), sigmoid(i_z + h_z)
    n = np.tanh(i_n + r * (h_n + _np(p.bias_n)))
    h = n + z * (h - n)
    ys.append(h)
  return Case(fwd, p, (x,), {"weight_ih": out_in_full(xs, (12, 3)),
                             "weight_hh": out_in_full(hs, (12, 4)),
                             "bias": BIAS, "bias_n": BIAS},
              [("eqx gru", jax.jit(fwd)(p, x), np.stack(ys, 1))],
              {"weight_ih": (1, 3), "weight_hh": (1, 4)})


def _hand_cell_numpy(p, xs):
  h, hs, ys = np.zeros((xs.shape[1], 4)), [], []
  for x_t in xs:
    hs.append(h)
    h = np.tanh(x_t @ p["w_x"] + h @ p["w_h"] + p["b"])
    ys.append(h)
  return np.stack(ys), hs


def hand_cell(unrolled: bool):
  """tanh(x_t @ W_x + h @ W_h + b), under lax.scan (evaluating route) or a
  Python loop (the differentiated route)."""
  xs = normal(1, 3, 2, 3)                                    # (time, batch, features)
  p = {"w_x": normal(2, 3, 4), "w_h": 0.5 * normal(3, 4, 4), "b": normal(4, 4)}
  step = lambda p, h, x_t: jnp.tanh(x_t @ p["w_x"] + h @ p["w_h"] + p["b"])
  if unrolled:
    def fwd(p, xs):
      h, ys = jnp.zeros((xs.shape[1], 4)), []
      for x_t in xs:
        h = step(p, h, x_t)
        ys.append(h)
      return jnp.stack(ys)
  else:
    fwd = lambda p, xs: lax.scan(lambda h, x_t: (step(p, h, x_t),) * 2,
                                 jnp.zeros((xs.shape[1], 4)), xs)[1]
  ys, hs = _hand_cell_numpy(_np_tree(p), _np(xs))
  return Case(fwd, p, (xs,), {"w_x": dense_full(list(_np(xs)), (3, 4)),
                              "w_h": dense_full(hs, (4, 4)), "b": BIAS},
              [("hand cell", jax.jit(fwd)(p, xs), ys)], {"w_x": (3, 1), "w_h": (4, 1)})


def _haiku_rnn(core, xs):
  f = hk.transform(lambda xs: hk.dynamic_unroll(core(), xs, core().initial_state(xs.shape[1]))[0])
  p = random_params(jax.eval_shape(f.init, KEY, xs))
  return p, lambda p, xs: f.apply(p, None, xs)


def haiku_lstm():
  """hk.LSTM: one Linear on concat([x, h]) (its bias is a plain Dense bias)."""
  xs = normal(1, 3, 2, 3)
  p, fwd = _haiku_rnn(lambda: hk.LSTM(4), xs)
  w, b = _np(p["lstm/linear"]["w"]), _np(p["lstm/linear"]["b"])
  h = c = np.zeros((2, 4))
  rows, ys = [], []
  for x_t in _np(xs):
    rows.append(np.concatenate([x_t, h], -1))
    i, g, f, o = np.split(rows[-1] @ w + b, 4, axis=-1)
    c = sigmoid(f + 1) * c + sigmoid(i) * np.tanh(g)
    h = sigmoid(o) * np.tanh(c)
    ys.append(h)
  return Case(fwd, p, (xs,), {"lstm/linear/w": dense_full(rows, (7, 16)), "lstm/linear/b": BIAS},
              [("haiku lstm", jax.jit(fwd)(p, xs), np.stack(ys))], {"lstm/linear/w": (7, 1)})


def haiku_gru():
  """hk.GRU: zr_x + zr_h + b_z with zr_x a split part of x @ w_i, and b split in
  two; w_h's two column blocks meet h and r * h."""
  xs = normal(1, 3, 2, 3)
  p, fwd = _haiku_rnn(lambda: hk.GRU(4), xs)
  q = _np_tree(p["gru"])
  h, x_rows, h_rows, rh_rows, ys = np.zeros((2, 4)), [], [], [], []
  for x_t in _np(xs):
    x_rows.append(x_t)
    h_rows.append(h)
    gates_x = x_t @ q["w_i"]
    zr = sigmoid(gates_x[:, :8] + h @ q["w_h"][:, :8] + q["b"][:8])
    z, r = zr[:, :4], zr[:, 4:]
    rh_rows.append(r * h)
    a = np.tanh(gates_x[:, 8:] + rh_rows[-1] @ q["w_h"][:, 8:] + q["b"][8:])
    h = (1 - z) * h + z * a
    ys.append(h)
  w_h = np.concatenate([dense_full(h_rows, (4, 8)), dense_full(rh_rows, (4, 4))], 1)
  # b's two pieces are two biases: ones, in blocks of 4 (the pieces' common divisor).
  return Case(fwd, p, (xs,), {"gru/w_i": dense_full(x_rows, (3, 12)), "gru/w_h": w_h,
                              "gru/b": np.ones(12)},
              [("haiku gru", jax.jit(fwd)(p, xs), np.stack(ys))], {"gru/w_i": (3, 1)})


# --------------------------------------------------------------------------
# A HuggingFace-GPT-2-style model written here


D, HEADS, VOCAB, POSITIONS, LAYERS = 4, 2, 7, 5, 1


def _gpt2_shapes():
  ln = {"scale": (D,), "bias": (D,)}
  conv1d = lambda out, inp: {"kernel": (out, inp), "bias": (out,)}   # FlaxConv1D: (out, in)
  block = {"ln_1": ln, "attn": {"c_attn": conv1d(3 * D, D), "c_proj": conv1d(D, D)},
           "ln_2": ln, "mlp": {"c_fc": conv1d(4 * D, D), "c_proj": conv1d(D, 4 * D)}}
  return {"wte": {"embedding": (VOCAB, D)}, "wpe": {"embedding": (POSITIONS, D)},
          "h": {str(i): block for i in range(LAYERS)}, "ln_f": ln}


def _gpt2_params():
  shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), _gpt2_shapes(),
                        is_leaf=lambda s: isinstance(s, tuple))
  return random_params(shapes)


def gpt2(params, ids, xp=jnp):
  """The forward pass, in jnp (xp=jnp) or numpy float64 (xp=np, also recording inputs)."""
  seen = {}
  def conv1d(p, x, name):
    seen[name] = x
    return x @ p["kernel"].T + p["bias"]
  def layer_norm(p, x):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / xp.sqrt(var + 1e-5) * p["scale"] + p["bias"]
  def gelu(x):
    return 0.5 * x * (1 + xp.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
  batch, steps = ids.shape
  dh = D // HEADS
  causal = np.tril(np.ones((steps, steps), bool))
  h = params["wte"]["embedding"][ids] + params["wpe"]["embedding"][xp.arange(steps)]
  for i in range(LAYERS):
    blk = params["h"][str(i)]
    pre = f"h/{i}/"
    qkv = conv1d(blk["attn"]["c_attn"], layer_norm(blk["ln_1"], h), pre + "attn/c_attn")
    q, k, v = (t.reshape(batch, steps, HEADS, dh).transpose(0, 2, 1, 3)
               for t in xp.split(qkv, 3, axis=-1))
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(dh)
    s = xp.where(causal, s, -1e9)
    s = xp.exp(s - s.max(-1, keepdims=True))
    a = (s / s.sum(-1, keepdims=True)) @ v
    a = a.transpose(0, 2, 1, 3).reshape(batch, steps, D)
    h = h + conv1d(blk["attn"]["c_proj"], a, pre + "attn/c_proj")
    m = conv1d(blk["mlp"]["c_fc"], layer_norm(blk["ln_2"], h), pre + "mlp/c_fc")
    h = h + conv1d(blk["mlp"]["c_proj"], gelu(m), pre + "mlp/c_proj")
  hf = layer_norm(params["ln_f"], h)
  seen["wte"] = hf
  logits = hf @ params["wte"]["embedding"].T                # tied output: attend
  return (logits, seen) if xp is np else logits


GPT2_IDS = jnp.array([[1, 4, 4, 6], [0, 2, 5, 2]])


def gpt2_case():
  p = _gpt2_params()
  logits, seen = gpt2(_np_tree(p), np.asarray(GPT2_IDS), xp=np)
  shapes = param_paths(p)
  expected, exact = {}, {}
  for name, shape in shapes.items():
    if name.endswith("/kernel"):
      layer = name[:-len("/kernel")]
      expected[name] = out_in_full([seen[layer]], shape)
      exact[name] = (1, shape[1])
    elif name.endswith("/bias") and "ln_" not in name:
      expected[name] = BIAS
    else:
      expected[name] = None                                 # layer norms, wpe (lookup only)
  expected["wte/embedding"] = np.broadcast_to(
      (seen["wte"].reshape(-1, D) ** 2).mean(0), (VOCAB, D)).copy()
  exact["wte/embedding"] = (1, D)
  return Case(gpt2, p, (GPT2_IDS,), expected,
              [("gpt2 logits", jax.jit(gpt2)(p, GPT2_IDS), logits)], exact)


CASES = {
    "rnn_lstm": functools.partial(rnn_case, nn.LSTMCell),
    "rnn_gru": functools.partial(rnn_case, nn.GRUCell),
    "rnn_optimized_lstm": functools.partial(rnn_case, nn.OptimizedLSTMCell),
    "linen_scan_stack": scan_stack,
    "nnx_scan_vmap_remat": nnx_scan_remat,
    "linen_remat_jit": linen_remat_jit,
    "nested_jit_checkpoint": nested_jit_checkpoint,
    "custom_vjp": custom_vjp_matmul,
    "cond_true": functools.partial(cond_case, True),
    "cond_false": functools.partial(cond_case, False),
    "while_loop_in_custom_vjp": while_loop_case,
    "scan_shared": scan_shared,
    "scan_stacked": scan_stacked,
    "equinox_mlp": eqx_mlp,
    "equinox_cnn": eqx_cnn,
    "haiku_mlp": haiku_mlp,
    "equinox_lstm_scan": eqx_lstm_scan,
    "equinox_gru_scan": eqx_gru_scan,
    "hand_cell_scan": functools.partial(hand_cell, False),
    "hand_cell_unrolled": functools.partial(hand_cell, True),
    "haiku_lstm": haiku_lstm,
    "haiku_gru": haiku_gru,
    "gpt2": gpt2_case,
}


@functools.cache
def case(name) -> Case:
  return CASES[name]()


LINEN = ["rnn_lstm", "rnn_gru", "rnn_optimized_lstm", "linen_scan_stack", "linen_remat_jit"]


# --------------------------------------------------------------------------
# References (pass without the engine)


@pytest.mark.parametrize("name", list(CASES))
def test_reference_rebuilds_model_output(name):
  assert_proofs(case(name))


def test_reference_gpt2_records_every_kernel():
  """The GPT-2 reference names every weight the JAX model multiplies (no kernel
  without recorded inputs, no recorded layer without a kernel)."""
  _, seen = gpt2(_np_tree(_gpt2_params()), np.asarray(GPT2_IDS), xp=np)
  kernels = {n[:-len("/kernel")] for n in param_paths(_gpt2_params()) if n.endswith("/kernel")}
  assert set(seen) == kernels | {"wte"}


# --------------------------------------------------------------------------
# The engine


@pytest.mark.parametrize("name", list(CASES))
def test_engine_matches_bruteforce(name):
  check_engine(case(name))


@pytest.mark.parametrize("name", ["cond_false"])
def test_engine_eager(name):
  check_engine(case(name), jit=False)


def test_cond_branch_is_chosen_at_run_time():
  """One compiled function, both flag values: each call gets its taken branch's rows."""
  import adaact_optax
  t, f = case("cond_true"), case("cond_false")
  g = jax.jit(adaact_optax.value_grad_and_stats(t.fun))
  for c in (t, f, t):
    stats = g(c.params, *c.args)[2]
    assert_stat(stats["w"], c.expected["w"], (4, 3), "w")


@pytest.mark.parametrize("name", ["gpt2", "equinox_cnn", "scan_stacked", "rnn_optimized_lstm"])
def test_stats_shapes_match_engine(name):
  check_stats_shapes(case(name))


def test_coverage_of_gpt2_lists_every_captured_weight():
  import adaact_optax
  c = case("gpt2")
  stats = engine_result(c)[2]
  report = adaact_optax.coverage(c.fun, c.params, *c.args)
  captured = {k: tuple(v.shape) for k, v in by_path(stats).items()
              if v is not None and v.shape != (0,)}
  assert {k: tuple(v) for k, v in report.matched.items()} == captured
  kernels = {k for k in param_paths(c.params) if k.endswith("kernel")} | {"wte/embedding"}
  assert kernels <= set(report.matched)
  assert not set(report.matched) & {"wpe/embedding", "ln_f/scale", "h/0/ln_1/scale"}


def test_has_aux_returns_the_aux_and_the_same_stats():
  import adaact_optax
  c = case("haiku_mlp")
  def with_aux(p, x):
    y = c.forward(p, x)
    return jnp.sum(jnp.sin(y)), {"y": y}
  (loss, aux), grads, stats = jax.jit(adaact_optax.value_grad_and_stats(with_aux, has_aux=True))(
      c.params, *c.args)
  assert_f32_close(loss, c.fun(c.params, *c.args))
  assert_f32_close(aux["y"], c.forward(c.params, *c.args))
  for name, shape in param_paths(c.params).items():
    assert_stat(by_path(stats)[name], c.expected[name], shape, name, c.exact_shapes.get(name))


@pytest.mark.parametrize("name", LINEN)
def test_linen_adapter_matches_bruteforce(name):
  import adaact_optax
  c = case(name)
  module, variables, args = c.linen
  out, mutated = jax.jit(lambda v, *a: adaact_optax.linen.apply(module, v, *a))(variables, *args)
  assert_f32_close(out, module.apply(variables, *args))
  got = by_path(mutated[adaact_optax.linen.COLLECTION])
  for name, shape in param_paths(c.params).items():
    assert_stat(got.get(name), c.expected[name], shape, name, c.exact_shapes.get(name))



def test_nnx_adapter_on_scan_vmap_remat():
  import adaact_optax
  c = case("nnx_scan_vmap_remat")
  module, args = c.nnx
  out, stats = adaact_optax.nnx.apply(module, *args)
  assert_f32_close(out, module(*args))
  got = by_path(stats)
  for name, shape in param_paths(c.params).items():
    assert_stat(got.get(name), c.expected[name], shape, name, c.exact_shapes.get(name))
