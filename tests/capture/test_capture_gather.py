"""Weights picked by run-time indices before their matmul: mixture-of-experts routing,
sampled softmax, a loop's dynamic index into stacked layers.

Each reference is a numpy loop over the uses: an expert's statistic is the mean
over the rows routed to it (a slice no index picked has none: 0, the ``-0.0``
no-rows marker); the sampled rows of a table share one statistic along its
input axis; layer ``l`` of a stacked weight gets the rows of the iterations
that picked it. Every reference is first proved by rebuilding the model's
output from the same rows.
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import adaact_optax
from adaact_optax._src.capture import api as capture_api
from _bruteforce import (Case, assert_proofs, check_engine, check_stats_shapes, dense_full,
                         engine_result, mean_sq, normal, uncaptured_warnings)

B, I, O, E = 8, 4, 3, 4


def _np(x):
  return np.asarray(x, np.float64)


def _bias_per_slice(rows_by_slice, shape):
  """Full statistic of stacked biases ``shape = (S, out)`` (each a weight on the constant
  input 1): 1 for a slice that met rows, 0 (the no-rows marker) for one that met none."""
  return np.stack([np.full(shape[1:], 1.0 if rows else 0.0) for rows in rows_by_slice])


def _per_slice(rows_by_slice, shape):
  """Full statistic of a stacked weight ``shape = (S, in, out)``: slice s gets the mean
  square of its rows (a list of ``(in,)`` vectors), 0 when it has none."""
  full = np.zeros(shape)
  for s, rows in enumerate(rows_by_slice):
    if rows:
      full[s] = mean_sq(np.stack(rows), 0)[:, None]
  return full


# --------------------------------------------------------------------------
# Cases


def moe_top1(take=False):
  """Hash routing (the ids are data): ``experts[ids]`` then a batched contraction plus the
  experts' biases ``biases[ids]`` (or ``jnp.take(biases, ids, axis=0)``: ``take``); the
  last expert is routed no rows. Gate values scale the output, not the weights."""
  x, ids = normal(1, B, I), jnp.array([0, 2, 2, 1, 0, 2, 1, 0])
  p = {"experts": normal(2, E, I, O), "biases": normal(30, E, O), "gate": normal(3, I, E),
       "head": normal(4, O, 2)}

  def fwd(p, x, ids):
    gate = jax.nn.softmax(x @ p["gate"])[jnp.arange(B), ids]
    biases = jnp.take(p["biases"], ids, axis=0) if take else p["biases"][ids]
    y = (jnp.einsum("bi,bio->bo", x, p["experts"][ids]) + biases) * gate[:, None]
    return jnp.tanh(y) @ p["head"]
  xn, q = _np(x), {k: _np(v) for k, v in p.items()}
  logits = xn @ q["gate"]
  soft = np.exp(logits - logits.max(1, keepdims=True))
  soft /= soft.sum(1, keepdims=True)
  y = np.stack([(xn[b] @ q["experts"][int(ids[b])] + q["biases"][int(ids[b])])
                * soft[b, int(ids[b])] for b in range(B)])
  rows = [[xn[b] for b in range(B) if int(ids[b]) == e] for e in range(E)]
  assert not rows[E - 1]
  return Case(fwd, p, (x, ids),
              {"experts": _per_slice(rows, (E, I, O)), "biases": _bias_per_slice(rows, (E, O)),
               "gate": dense_full([x], (I, E)), "head": dense_full([np.tanh(y)], (O, 2))},
              [("top-1", fwd(p, x, ids), np.tanh(y) @ q["head"])],
              {"experts": (E, I, 1), "biases": (E, 1)})


def moe_top2():
  """Learned top-2 routing (``lax.top_k``) with combine weights: each token's row goes to
  both of its experts, and to both experts' biases."""
  x = normal(5, B, I)
  p = {"experts": normal(6, E, I, O), "biases": normal(31, E, O), "router": normal(7, I, E),
       "head": normal(8, O, 2)}

  def fwd(p, x):
    top, idx = lax.top_k(x @ p["router"], 2)
    y = jnp.einsum("bi,bkio->bko", x, p["experts"][idx]) + p["biases"][idx]
    return jnp.tanh(jnp.einsum("bk,bko->bo", jax.nn.softmax(top), y)) @ p["head"]
  idx = np.asarray(jax.jit(lambda p, x: lax.top_k(x @ p["router"], 2))(p, x)[1])
  xn, q = _np(x), {k: _np(v) for k, v in p.items()}
  top = np.take_along_axis(xn @ q["router"], idx, 1)
  w = np.exp(top - top.max(1, keepdims=True))
  w /= w.sum(1, keepdims=True)
  out = np.tanh(np.stack([sum(w[b, k] * (xn[b] @ q["experts"][idx[b, k]]
                                        + q["biases"][idx[b, k]]) for k in range(2))
                          for b in range(B)]))
  rows = [[xn[b] for b in range(B) for k in range(2) if idx[b, k] == e] for e in range(E)]
  return Case(fwd, p, (x,),
              {"experts": _per_slice(rows, (E, I, O)), "biases": _bias_per_slice(rows, (E, O)),
               "router": dense_full([x], (I, E)), "head": dense_full([out], (O, 2))},
              [("top-2", fwd(p, x), out @ q["head"])], {"experts": (E, I, 1), "biases": (E, 1)})


def moe_dense_dispatch():
  """Capacity dispatch as one-hot contractions (no gather): the expert axis is a batch
  axis of the expert contraction, so each expert's rows are its C capacity slots
  (empty slots are rows of zeros, as the computation multiplies them)."""
  cap, ids = 3, [0, 2, 2, 1, 0, 2, 1, 0]
  dispatch = np.zeros((E, cap, B), np.float32)
  filled = [0] * E
  for b, e in enumerate(ids):
    if filled[e] < cap:
      dispatch[e, filled[e], b] = 1.0
      filled[e] += 1
  x = normal(9, B, I)
  p = {"experts": normal(10, E, I, O)}

  def fwd(p, x, dispatch):
    x_e = jnp.einsum("ecb,bi->eci", dispatch, x)
    return jnp.einsum("ecb,eco->bo", dispatch, jnp.einsum("eci,eio->eco", x_e, p["experts"]))
  x_e = np.einsum("ecb,bi->eci", dispatch, _np(x))
  full = np.stack([np.broadcast_to(mean_sq(x_e[e], 0)[:, None], (I, O)) for e in range(E)])
  out = np.einsum("ecb,eco->bo", dispatch, np.einsum("eci,eio->eco", x_e, _np(p["experts"])))
  return Case(fwd, p, (x, jnp.asarray(dispatch)), {"experts": full},
              [("dense dispatch", fwd(p, x, jnp.asarray(dispatch)), out)], {"experts": (E, I, 1)})


def sampled_softmax():
  """``h @ table[sampled].T``: every sampled row meets the same hidden states, so the
  table's statistic is one value per input feature, pooled: keep-rank ``(1, d)``."""
  vocab, d = 11, 5
  x, sampled = normal(11, B, I), jnp.array([3, 7, 3, 10])
  p = {"proj": normal(12, I, d), "table": normal(13, vocab, d)}

  def fwd(p, x, sampled):
    return jnp.tanh(x @ p["proj"]) @ p["table"][sampled].T
  h = np.tanh(_np(x) @ _np(p["proj"]))
  logits = h @ _np(p["table"])[np.asarray(sampled)].T
  return Case(fwd, p, (x, sampled),
              {"proj": dense_full([x], (I, d)),
               "table": np.broadcast_to(mean_sq(h, 0)[None, :], (vocab, d)).copy()},
              [("sampled softmax", fwd(p, x, sampled), logits)], {"table": (1, d)})


def _layers_reference(x, stack, order, biases=None):
  """Apply ``stack[l]`` (plus ``biases[l]``) for l in ``order`` (tanh after each); the rows
  each layer met."""
  h, rows = _np(x), [[] for _ in range(stack.shape[0])]
  for l in order:
    rows[l].extend(h)
    h = np.tanh(h @ _np(stack[l]) + (0.0 if biases is None else _np(biases[l])))
  return h, rows


def fori_layers():
  """``fori_loop`` over layers with ``lax.dynamic_index_in_dim`` on a stacked weight (the
  loop counter indexes it; a static trip count: a ``scan``)."""
  x, p = normal(14, B, I), {"stack": 0.6 * normal(15, 3, I, I)}

  def fwd(p, x):
    return lax.fori_loop(0, 3, lambda i, h: jnp.tanh(
        h @ lax.dynamic_index_in_dim(p["stack"], i, keepdims=False)), x)
  h, rows = _layers_reference(x, p["stack"], [0, 1, 2])
  return Case(fwd, p, (x,), {"stack": _per_slice(rows, (3, I, I))},
              [("fori_loop", fwd(p, x), h)], {"stack": (3, I, 1)})


@jax.custom_vjp
def _first_layers(stack, x, n):
  """``n`` (traced: a ``while`` loop) layers of ``stack`` applied to ``x``."""
  return lax.fori_loop(0, n, lambda i, h: jnp.tanh(h @ stack[i]), x)


_first_layers.defvjp(lambda stack, x, n: (_first_layers(stack, x, n), (stack, x)),
                     lambda res, g: (jnp.zeros_like(res[0]), jnp.zeros_like(res[1]), None))


def while_layers():
  """A traced trip count (a ``while`` loop, under a custom_vjp since JAX does not
  differentiate it) that stops before the last layer: that layer has no rows."""
  x, p, n = normal(16, B, I), {"stack": 0.6 * normal(17, 3, I, I)}, jnp.int32(2)

  def fwd(p, x, n):
    return _first_layers(p["stack"], x, n)
  h, rows = _layers_reference(x, p["stack"], [0, 1])
  return Case(fwd, p, (x, n), {"stack": _per_slice(rows, (3, I, I))},
              [("while", fwd(p, x, n), h)], {"stack": (3, I, 1)})


def data_indexed_layers():
  """The index is not the loop counter but read from data (layer 2 twice, layer 1 never):
  each use still adds its rows to the slice its index picked, and marks its bias used."""
  x, order = normal(18, B, I), jnp.array([2, 0, 2])
  p = {"stack": 0.6 * normal(19, 3, I, I), "biases": normal(32, 3, I)}

  def layer(p, h, l):
    pick = functools.partial(lax.dynamic_index_in_dim, index=l, keepdims=False)
    return jnp.tanh(h @ pick(p["stack"]) + pick(p["biases"]))

  def fwd(p, x, order):
    return lax.fori_loop(0, 3, lambda i, h: layer(p, h, order[i]), x)
  h, rows = _layers_reference(x, p["stack"], [2, 0, 2], p["biases"])
  return Case(fwd, p, (x, order),
              {"stack": _per_slice(rows, (3, I, I)), "biases": _bias_per_slice(rows, (3, I))},
              [("indexed by data", fwd(p, x, order), h)], {"stack": (3, I, 1), "biases": (3, 1)})


def scanned_moe_layers():
  """``scan`` over layers whose experts are stacked ``(L, E, in, out)``, routing per layer:
  per-layer, per-expert statistics ``(L, E, in, 1)``."""
  layers = 2
  x = normal(20, B, I)
  ids = jnp.array([[0, 1, 1, 3, 0, 1, 3, 3], [2, 2, 2, 0, 0, 2, 2, 0]])
  p = {"experts": 0.6 * normal(21, layers, E, I, I)}

  def fwd(p, x, ids):
    body = lambda h, xs: (jnp.tanh(jnp.einsum("bi,bio->bo", h, xs[0][xs[1]])), None)
    return lax.scan(body, x, (p["experts"], ids))[0]
  h, full = _np(x), np.zeros((layers, E, I, I))
  for l in range(layers):
    rows = [[h[b] for b in range(B) if int(ids[l, b]) == e] for e in range(E)]
    full[l] = _per_slice(rows, (E, I, I))
    h = np.tanh(np.stack([h[b] @ _np(p["experts"])[l, int(ids[l, b])] for b in range(B)]))
  return Case(fwd, p, (x, ids), {"experts": full}, [("scanned experts", fwd(p, x, ids), h)],
              {"experts": (layers, E, I, 1)})


CASES = {
    "moe_top1": moe_top1,
    "moe_top1_take": functools.partial(moe_top1, take=True),
    "moe_top2": moe_top2,
    "moe_dense_dispatch": moe_dense_dispatch,
    "sampled_softmax": sampled_softmax,
    "fori_layers": fori_layers,
    "while_layers": while_layers,
    "data_indexed_layers": data_indexed_layers,
    "scanned_moe_layers": scanned_moe_layers,
}


@functools.cache
def case(name) -> Case:
  return CASES[name]()


@pytest.mark.parametrize("name", list(CASES))
def test_reference_rebuilds_model_output(name):
  assert_proofs(case(name))


@pytest.mark.parametrize("name", list(CASES))
def test_engine_matches_bruteforce(name):
  check_engine(case(name))


@pytest.mark.parametrize("name", ["moe_top1", "fori_layers"])
def test_engine_eager(name):
  check_engine(case(name), jit=False)


@pytest.mark.parametrize("name", list(CASES))
def test_stats_shapes_and_coverage_match_engine(name):
  c = case(name)
  check_stats_shapes(c)
  report = adaact_optax.coverage(c.fun, c.params, *c.args)
  stats = engine_result(c)[2]
  assert not report.unmatched and not report.other, report
  assert report.matched == {k: tuple(v.shape) for k, v in stats.items()}


@pytest.mark.parametrize("path", ["experts", "biases"])
def test_expert_without_rows_gets_the_no_rows_marker(path):
  c = case("moe_top1")
  stats = engine_result(c)[2]
  last = np.asarray(stats[path][E - 1])
  assert (last == 0).all() and np.signbit(last).all(), last
  assert not np.signbit(np.asarray(stats[path][:E - 1])).any()


def test_both_routes_agree_on_gathered_weights():
  """At the top level the differentiated route takes the gathered weights (the
  statistic needs the indices too); the evaluating route must agree."""
  from adaact_optax import capture
  for name in ("moe_top1", "moe_top2", "sampled_softmax"):
    c = case(name)
    assert capture_api.capture_differentiated(c.fun, False, c.params, c.args, {}, None,
                                              None) is not None, name

    def inner(p):
      out, stats, _ = capture.capture_call(c.fun, p, c.args)
      return out, stats
    (_, stats), _ = jax.value_and_grad(inner, has_aux=True)(c.params)
    fast = engine_result(c)[2]
    for got, want in zip(stats, jax.tree.leaves(fast)):
      np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=name)


# --------------------------------------------------------------------------
# What the engine cannot follow: reported, never silent.


def _uncaptured(fun, params, *args):
  with warnings.catch_warnings(record=True) as records:
    warnings.simplefilter("always")
    _, _, stats = jax.jit(adaact_optax.value_grad_and_stats(fun))(params, *args)
  report = adaact_optax.coverage(fun, params, *args)
  return stats, uncaptured_warnings(records), report


def test_a_dynamic_window_into_a_stacked_weight_is_reported():
  p = {"stack": normal(1, 5, I, O)}

  def fun(p, x, i):
    window = lax.dynamic_slice(p["stack"], (i, 0, 0), (2, I, O))     # 2 layers at a time
    return jnp.sum(jnp.sin(jnp.einsum("bi,kio->bko", x, window)))
  stats, warned, report = _uncaptured(fun, p, normal(2, B, I), jnp.int32(1))
  assert stats["stack"].shape == (0,)
  assert len(warned) == 1 and "a dynamic index into a stacked weight" in str(warned[0].message)
  assert "'stack'" in str(warned[0].message) and "dynamic_slice" in str(warned[0].message)
  assert "a dynamic index into a stacked weight" in report.unmatched["stack"]


def test_part_of_gathered_slices_is_reported():
  p = {"experts": normal(1, E, I, O)}

  def fun(p, x, ids):
    return jnp.sum(jnp.sin(jnp.einsum("bi,bio->bo", x[:, :2], p["experts"][ids, :2])))
  stats, warned, report = _uncaptured(fun, p, normal(2, B, I), jnp.zeros(B, jnp.int32))
  assert stats["experts"].shape == (0,)
  assert len(warned) == 1, [str(w.message) for w in warned]
  message = str(warned[0].message)
  assert "'experts'" in message and "picked by indices computed at run time" in message
  assert "experts" in report.unmatched


def test_part_of_gathered_biases_is_reported():
  p = {"experts": normal(1, E, I, O), "biases": normal(2, E, 2 * O)}

  def fun(p, x, ids):
    y = jnp.einsum("bi,bio->bo", x, p["experts"][ids]) + p["biases"][ids][:, :O]
    return jnp.sum(jnp.sin(y))
  stats, warned, report = _uncaptured(fun, p, normal(3, B, I), jnp.array([0, 1, 1, 3] * 2))
  assert stats["biases"].shape == (0,) and stats["experts"].shape == (E, I, 1)
  assert len(warned) == 1 and "'biases'" in str(warned[0].message), warned
  assert "a bias picked by indices computed at run time" in str(warned[0].message)
  assert "biases" in report.unmatched and "experts" in report.matched


def test_lookup_only_table_stays_without_statistics_and_silent():
  """An embedding lookup's rows are an activation: the table multiplies no activation."""
  p = {"table": normal(1, 10, I), "w": normal(2, I, O)}

  def fun(p, ids):
    return jnp.sum(jnp.sin(p["table"][ids] @ p["w"]))
  stats, warned, report = _uncaptured(fun, p, jnp.array([1, 2, 2, 9]))
  assert not warned and stats["table"] is None and report.other == ("table",)
  np.testing.assert_allclose(stats["w"][:, 0], mean_sq(_np(p["table"])[[1, 2, 2, 9]], 0),
                             rtol=1e-6)


def test_gathered_slices_cross_a_checkpoint():
  """Gathered outside a checkpoint, applied inside, or gathered inside and applied
  outside: both routes follow the slices (JAX inlines a checkpoint's forward when it
  differentiates, so the fast route sees through it; the evaluating route threads the
  indices through), and stats_shapes agrees."""
  x, ids = case("moe_top1").args
  p = {"experts": case("moe_top1").params["experts"]}
  inside = lambda p, x, ids: jax.checkpoint(lambda x, w: jnp.einsum("bi,bio->bo", x, w))(
      x, p["experts"][ids])
  outside = lambda p, x, ids: jnp.einsum("bi,bio->bo", x, jax.checkpoint(
      lambda e, i: e[i])(p["experts"], ids))
  expected = case("moe_top1").expected["experts"]
  for forward in (inside, outside):
    fun = lambda p, x, ids: jnp.sum(jnp.sin(forward(p, x, ids)))
    stats, warned, report = _uncaptured(fun, p, x, ids)
    assert not warned and report.matched == {"experts": (E, I, 1)}, report
    np.testing.assert_allclose(np.repeat(stats["experts"], O, -1), expected, rtol=1e-5,
                               atol=1e-6)
    from adaact_optax import capture
    out, leaves, _ = capture.capture_call(fun, p, (x, ids))
    np.testing.assert_allclose(leaves[0], stats["experts"], rtol=1e-6)


def test_gathered_slices_passed_into_a_loop_body_are_reported():
  """The indices live outside the ``scan``: its body cannot tell the slices apart."""
  p = {"experts": normal(1, E, I, O)}

  def fun(p, x, ids):
    w = p["experts"][ids]
    step = lambda c, _: (c + 1.0, jnp.einsum("bi,bio->bo", c * x, w))
    return jnp.sum(jnp.sin(lax.scan(step, 1.0, None, length=2)[1]))
  stats, warned, report = _uncaptured(fun, p, normal(2, B, I), jnp.zeros(B, jnp.int32))
  assert stats["experts"].shape == (0,) and len(warned) == 1
  assert "passed into a loop or `cond` body" in report.unmatched["experts"]


def test_out_of_range_indices_in_fill_mode_meet_no_weight():
  """``mode="fill"``: a token whose index is out of range gets fill values, not an
  expert: its row counts for no expert (``mode="clip"`` would count it for the last)."""
  p = {"experts": normal(1, E, I, O)}
  x, ids = normal(2, B, I), jnp.array([0, 1, 9, 1, 0, 9, 1, 0])

  def fun(p, x, ids):
    return jnp.sum(jnp.sin(jnp.einsum("bi,bio->bo", x, p["experts"].at[ids].get(mode="fill"))))
  _, _, stats = jax.jit(adaact_optax.value_grad_and_stats(fun))(p, x, ids)
  rows = [[_np(x)[b] for b in range(B) if int(ids[b]) == e] for e in range(E)]
  np.testing.assert_allclose(np.repeat(stats["experts"], O, -1), _per_slice(rows, (E, I, O)),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("combine", ["attention", "bag"])
def test_rows_combined_over_their_index_axes_are_an_activation(combine):
  """Attention or a weighted bag over looked-up rows contracts the index axes only: the
  rows are combined, not applied to features. The table stays without statistics (as an
  embedding lookup's) and nothing warns; the weight after it is captured."""
  p = {"table": normal(1, 10, I), "w": normal(2, I, O)}
  ids, probs = jnp.array([[1, 2, 2], [9, 0, 1]]), jax.nn.softmax(normal(3, 2, 3, 3))

  def fun(p, ids, probs):
    rows = p["table"][ids]                                        # (2, 3, I)
    mixed = (jnp.einsum("bqk,bkd->bqd", probs, rows) if combine == "attention"
             else jnp.einsum("bk,bkd->bd", probs[:, 0], rows))
    return jnp.sum(jnp.sin(mixed @ p["w"]))
  stats, warned, report = _uncaptured(fun, p, ids, probs)
  assert not warned and stats["table"] is None and report.other == ("table",)
  assert report.matched == {"w": (I, 1)}


def test_gathered_slices_scaled_before_their_matmul_are_reported():
  p = {"experts": normal(1, E, I, O)}

  def fun(p, x, ids, gate):
    return jnp.sum(jnp.sin(jnp.einsum("bi,bio->bo", x, p["experts"][ids] * gate[:, None, None])))
  stats, warned, report = _uncaptured(fun, p, normal(2, B, I), jnp.zeros(B, jnp.int32),
                                      normal(3, B))
  assert stats["experts"].shape == (0,) and len(warned) == 1
  assert "scaled by `mul`" in report.unmatched["experts"]


def test_looked_up_rows_through_activation_functions_keep_the_fast_route():
  """``relu`` (a custom_jvp) and ``clip`` (a nested jit) hold no contraction: looked-up
  rows pass through them as data, with no fallback to the evaluating route."""
  p = {"table": normal(1, 10, I), "w": normal(2, I, O)}

  def fun(p, ids):
    rows = jnp.clip(jax.nn.relu(p["table"][ids]), 0.0, 1.0)
    return jnp.sum(jnp.sin(rows @ p["w"]))
  ids = jnp.array([1, 2, 2, 9])
  done = capture_api.capture_differentiated(fun, False, p, (ids,), {}, None, None)
  assert done is not None
  rows = np.clip(np.maximum(_np(p["table"])[np.asarray(ids)], 0), 0, 1)
  np.testing.assert_allclose(done[2][1][:, 0], mean_sq(rows, 0), rtol=1e-6)
