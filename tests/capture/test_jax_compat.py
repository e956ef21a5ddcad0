"""Every JAX internal the capture engine relies on, checked against the installed JAX.

If a JAX release renames a primitive or changes a parameter, a test here fails
with the name of what moved, instead of the engine silently missing statistics.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from adaact_optax._src.capture import jax_internals as jc
from adaact_optax._src.capture import rules
from conftest import assert_f32_close


def _eqns(fun, *args):
  return jax.make_jaxpr(fun)(*args).jaxpr.eqns


def _names(fun, *args):
  return [e.primitive.name for e in _eqns(fun, *args)]


W = jnp.ones((3, 4))
X = jnp.ones((2, 3))


def test_installed_jax_is_in_the_tested_range():
  assert jc.is_tested_version(), (
      f"jax {jax.__version__} is outside the range the capture engine was tested on "
      f"({jc.TESTED_JAX}); run this file, then widen TESTED_JAX and pyproject's pin")


@pytest.mark.parametrize("fun, expected", [
    (lambda w, x: jax.jit(lambda a, b: a @ b)(x, w), rules.CALLS),
    (lambda w, x: jax.checkpoint(lambda a: a @ w)(x), rules.REMAT),
    (lambda w, x: jax.nn.relu(x @ w), rules.CUSTOM_JVP),
])
def test_higher_order_primitive_names(fun, expected):
  names = set(_names(fun, W, X))
  assert names & expected, f"none of {sorted(expected)} in {sorted(names)}"


def test_custom_vjp_name_and_body():
  @jax.custom_vjp
  def f(x, w):
    return x @ w
  f.defvjp(lambda x, w: (x @ w, (x, w)), lambda r, g: (g @ r[1].T, r[0].T @ g))
  (eqn,) = [e for e in _eqns(f, X, W) if e.primitive.name in rules.CUSTOM_VJP]
  body = jc.call_jaxpr(eqn)
  assert isinstance(body, jc.ClosedJaxpr)
  assert [e.primitive.name for e in body.jaxpr.eqns] == [rules.DOT]


def test_control_flow_params():
  def f(w, x):
    y, _ = lax.scan(lambda c, wi: (c @ wi, None), x, jnp.stack([w[:, :3]] * 2))
    y = lax.cond(x.sum() > 0, lambda a: a @ w[:, :3], lambda a: a, y)
    return lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, c[1]), (0, y))[1]
  eqns = {e.primitive.name: e for e in _eqns(f, W, X)}
  scan = jc.scan_params(eqns[rules.SCAN])
  assert scan["num_consts"] == 0 and scan["num_carry"] == 1 and scan["length"] == 2
  assert isinstance(scan["jaxpr"], jc.ClosedJaxpr)
  assert len(jc.cond_branches(eqns[rules.COND])) == 2
  loop = jc.while_params(eqns[rules.WHILE])
  assert isinstance(loop["body_jaxpr"], jc.ClosedJaxpr)
  assert isinstance(loop["body_nconsts"], int) and isinstance(loop["cond_nconsts"], int)


def test_remat_params_rebuild_through_public_checkpoint():
  (eqn,) = [e for e in _eqns(lambda w, x: jax.checkpoint(lambda a: a @ w)(x), W, X)
            if e.primitive.name in rules.REMAT]
  p = jc.remat_params(eqn)
  assert isinstance(jc.closed(p["jaxpr"]), jc.ClosedJaxpr)
  assert isinstance(p["prevent_cse"], bool)
  jax.checkpoint(lambda a: a, prevent_cse=p["prevent_cse"], policy=p["policy"])(X)


def test_dot_conv_gather_params():
  (dot,) = [e for e in _eqns(lambda w, x: x @ w, W, X)]
  assert jc.dot_dimensions(dot) == ((1,), (0,), (), ())
  conv = [e for e in _eqns(lambda x, k: lax.conv_general_dilated(
      x, k, (2, 1), ((1, 1), (0, 0)), lhs_dilation=(1, 2), rhs_dilation=(2, 1),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2),
      jnp.ones((1, 5, 5, 4)), jnp.ones((3, 3, 2, 6))) if e.primitive.name == rules.CONV][0]
  cp = jc.conv_params(conv)
  assert cp == dict(strides=(2, 1), padding=((1, 1), (0, 0)), lhs_dilation=(1, 2),
                    rhs_dilation=(2, 1), lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                    groups=2, batch_groups=1)
  table = jnp.ones((5, 4))
  jaxpr = jax.make_jaxpr(lambda t, i: jnp.take(t, i, axis=0))(table, jnp.array([1, 2]))
  gathers = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == rules.GATHER]
  if not gathers:  # jnp.take wraps its gather in a nested jit
    (call,) = [e for e in jaxpr.jaxpr.eqns if e.primitive.name in rules.CALLS]
    gathers = [e for e in jc.call_jaxpr(call).jaxpr.eqns if e.primitive.name == rules.GATHER]
  gp = jc.gather_params(gathers[0])
  assert gp["collapsed"] == (0,) and gp["start_index_map"] == (0,)
  assert gp["slice_sizes"] == (1, 4) and gp["batching"] == ()
  assert not gp["clips"]   # jnp.take fills out-of-range rows; indexing clamps them
  (index,) = [e for e in _eqns(lambda t, i: t[i], table, jnp.array([1, 2]))
              if e.primitive.name == rules.GATHER]
  assert jc.gather_params(index)["clips"]
  (dyn,) = [e for e in _eqns(lambda t, i: lax.dynamic_slice(t, (i, 0), (1, 4)), table, 1)
            if e.primitive.name == rules.DYNAMIC_SLICE]
  assert dyn.params["slice_sizes"] == (1, 4) and len(dyn.invars) == 3


def test_layout_primitive_names_and_params():
  def f(w):
    a = jnp.transpose(w).reshape(2, 2, 3)[:, :1]
    b, c = jnp.split(w, 2, axis=1)
    d = jnp.concatenate([b, c], axis=0)
    e = lax.pad(lax.rev(w, (0,)), 0.0, ((1, 0, 0), (0, 0, 0)))
    return a.sum() + d.sum() + jnp.broadcast_to(w, (2, 3, 4)).sum() + e.sum() + jnp.squeeze(
        w[None]).sum() + w.astype(jnp.bfloat16).sum()
  eqns = {e.primitive.name: e.params for e in _eqns(f, W)}
  for name in ("transpose", "reshape", "slice", "split", "concatenate", "rev", "pad",
               "broadcast_in_dim", "squeeze", "convert_element_type"):
    assert name in eqns, f"layout primitive {name!r} not found: {sorted(eqns)}"
    assert name in rules.LAYOUT | rules.IDENTITY
  assert set(eqns["transpose"]) >= {"permutation"}
  assert set(eqns["reshape"]) >= {"new_sizes", "dimensions"}
  assert set(eqns["slice"]) >= {"start_indices", "limit_indices", "strides"}
  assert set(eqns["split"]) >= {"sizes", "axis"}
  assert set(eqns["concatenate"]) >= {"dimension"}
  assert set(eqns["rev"]) >= {"dimensions"}
  assert set(eqns["pad"]) >= {"padding_config"}
  assert set(eqns["broadcast_in_dim"]) >= {"shape", "broadcast_dimensions"}
  assert set(eqns["squeeze"]) >= {"dimensions"}


def test_bind_reproduces_every_equation():
  def f(w, x):
    y = jax.jit(lambda a: jax.nn.relu(a @ w))(x)
    return jax.checkpoint(lambda a: jnp.tanh(a @ w.T))(y).sum()
  closed = jax.make_jaxpr(f)(W, X)
  env = dict(zip(closed.jaxpr.invars, (W, X)))
  for eqn in closed.jaxpr.eqns:
    ins = [jc.literal_value(v) if jc.is_literal(v) else env[v] for v in eqn.invars]
    for var, val in zip(eqn.outvars, jc.bind(eqn, ins)):
      env[var] = val
  assert_f32_close(env[closed.jaxpr.outvars[0]], f(W, X))


def test_nested_jit_shardings_are_read():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("d",))
  s = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  eqns = _eqns(lambda x: jax.jit(lambda a: a * 2, in_shardings=s, out_shardings=s)(x), X)
  ins, outs = jc.call_shardings([e for e in eqns if e.primitive.name in rules.CALLS][0])
  assert ins == (s,) and outs == (s,)
  eqns = _eqns(lambda x: jax.jit(lambda a: a * 2)(x), X)
  ins, outs = jc.call_shardings([e for e in eqns if e.primitive.name in rules.CALLS][0])
  assert ins == (None,) and outs == (None,)


def test_unknown_higher_order_primitive_is_detected():
  from jax.sharding import PartitionSpec as P
  mesh = jax.make_mesh((1,), ("d",))
  f = jax.shard_map(lambda w: w * 2, mesh=mesh, in_specs=P(), out_specs=P())
  (eqn,) = _eqns(f, W)
  assert jc.has_subjaxpr(eqn)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert not jc.has_subjaxpr(_eqns(lambda w: w * 2, W)[0])


def test_sub_jaxprs_of_each_higher_order_primitive():
  def f(w, x):
    y = lax.cond(x.sum() > 0, lambda a: a @ w, lambda a: a * 2.0, x)
    y = jax.checkpoint(lambda a: a @ w)(y)
    y, _ = lax.scan(lambda c, _: (c @ w, None), y, None, length=2)
    return jax.jit(lambda a: a @ w)(y)
  counts = {("remat" if e.primitive.name in rules.REMAT else e.primitive.name): len(jc.sub_jaxprs(e))
            for e in _eqns(f, jnp.ones((3, 3)), X) if jc.has_subjaxpr(e)}
  assert counts == {rules.COND: 2, "remat": 1, rules.SCAN: 1, "jit": 1}, counts
  assert all(isinstance(j, jc.Jaxpr) for e in _eqns(f, jnp.ones((3, 3)), X)
             for j in jc.sub_jaxprs(e))


def test_a_jaxpr_with_extra_outputs_is_called_as_one_inlined_jit():
  c = jnp.arange(3.0)  # a constant captured by the jaxpr (a constvar)

  def f(w, x):
    h = jnp.tanh(x @ w + c[0])
    return jnp.sum(h ** 2)
  closed = jax.make_jaxpr(jax.value_and_grad(f))(W, X)
  hidden = closed.jaxpr.eqns[0].outvars[0]  # x @ w, an intermediate value
  jaxpr = jc.with_outputs(closed.jaxpr, [hidden])
  assert not jaxpr.constvars and len(jaxpr.invars) == len(closed.consts) + 2
  args = list(closed.consts) + [W, X]
  # On arrays: the original outputs, then the intermediate.
  value, grad, extra = jc.call_inline(jaxpr, args, "check")
  ref_value, ref_grad = jax.value_and_grad(f)(W, X)
  assert_f32_close(value, ref_value)
  assert_f32_close(grad, ref_grad)
  assert_f32_close(extra, X @ W)
  # Under a trace: the equations are copied in (no nested jit), none re-bound one by one.
  outer = jax.make_jaxpr(lambda *a: jc.call_inline(jaxpr, a, "check"))(*args)
  assert [e.primitive.name for e in outer.jaxpr.eqns] == [
      e.primitive.name for e in closed.jaxpr.eqns]
