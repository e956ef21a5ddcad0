"""The JAX internals the capture engine reads, in one place.

The engine (``adaact_optax._src.capture``) walks a jaxpr. It relies on primitive
names (those live in ``rules.py``, the engine's one table), on the parameters of
a few primitives and on how an equation is re-bound. Those are not public API
and have moved between JAX releases (``pjit`` became ``jit``;
``custom_vjp_call_jaxpr`` became ``custom_vjp_call``;
``Primitive.get_bind_params`` once returned ``(subfuns, params)``). Each such
fact lives here, and ``tests/capture/test_jax_compat.py`` checks every one of them
against the installed JAX, so a release that moves one fails loudly there
rather than silently dropping statistics.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
from jax import lax
from jax.extend import core as jex_core

# The JAX versions the engine was tested on (pyproject pins the same range).
TESTED_JAX = ((0, 10), (0, 10))

Literal = jex_core.Literal
Var = jex_core.Var
ClosedJaxpr = jex_core.ClosedJaxpr
Jaxpr = jex_core.Jaxpr


def version() -> tuple[int, int]:
  major, minor = jax.__version_info__[:2]
  return major, minor


def is_tested_version() -> bool:
  lo, hi = TESTED_JAX
  return lo <= version() <= hi


def bind(eqn, invals: Sequence[Any]) -> list[Any]:
  """Evaluates one equation on new inputs (tracers or arrays), as ``eval_jaxpr`` does.

  ``Primitive.get_bind_params`` returns the params to bind with; before JAX
  0.7 it returned ``(subfuns, params)`` and the subfunctions went first.
  """
  out = eqn.primitive.get_bind_params(eqn.params)
  subfuns, params = out if isinstance(out, tuple) else ((), out)
  with eqn.ctx.manager:
    ans = eqn.primitive.bind(*subfuns, *invals, **params)
  return list(ans) if eqn.primitive.multiple_results else [ans]


def with_outputs(jaxpr: Jaxpr, extra: Sequence[Any]) -> Jaxpr:
  """``jaxpr`` with its constvars made leading invars and ``extra`` vars added as outputs.

  ``DebugInfo`` must name one argument per input and one path per output.
  """
  info = jaxpr.debug_info
  if info is not None and info.result_paths is not None:
    info = info._replace(result_paths=tuple(info.result_paths)  # type: ignore[arg-type]
                         + tuple(f"activation[{i}]" for i in range(len(extra))))
  if info is not None and info.arg_names is not None:
    info = info._replace(arg_names=tuple(f"const[{i}]" for i in range(len(jaxpr.constvars)))
                         + tuple(info.arg_names))
  return Jaxpr((), list(jaxpr.constvars) + list(jaxpr.invars),
               list(jaxpr.outvars) + list(extra), jaxpr.eqns, jaxpr.effects, info)


def call_inline(jaxpr: Jaxpr, args: Sequence[Any], name: str) -> list[Any]:
  """Evaluates ``jaxpr`` (no constvars) on ``args`` as one inlined ``jit`` equation.

  Under a trace this copies the equations into it, far cheaper than
  re-binding them one by one; called on arrays it compiles ``jaxpr`` once.
  The ``jit`` equation's params are those of a traced identity ``jit``,
  resized to ``jaxpr``'s inputs and outputs.
  """
  template = jax.make_jaxpr(jax.jit(lambda x: x))(0.0).eqns[0]
  params = dict(template.params)
  n_in, n_out = len(jaxpr.invars), len(jaxpr.outvars)
  for key in ("in_shardings", "in_layouts", "donated_invars"):
    params[key] = tuple(params[key][:1]) * n_in
  for key in ("out_shardings", "out_layouts"):
    params[key] = tuple(params[key][:1]) * n_out
  params.update(jaxpr=ClosedJaxpr(jaxpr, ()), name=name, inline=True)
  return list(template.primitive.bind(*args, **params))


def literal_value(atom) -> Any:
  return atom.val


def is_literal(atom) -> bool:
  return isinstance(atom, Literal)


def is_dropvar(atom) -> bool:
  return isinstance(atom, jex_core.DropVar)


def closed(jaxpr) -> ClosedJaxpr:
  """A ``ClosedJaxpr`` for a param that may hold an open ``Jaxpr`` (``remat``)."""
  return jaxpr if isinstance(jaxpr, ClosedJaxpr) else ClosedJaxpr(jaxpr, ())


def has_subjaxpr(eqn) -> bool:
  """Whether a primitive carries a jaxpr of its own (a higher-order primitive)."""
  def is_jaxpr(v):
    return isinstance(v, (Jaxpr, ClosedJaxpr)) or (
        isinstance(v, (tuple, list)) and any(isinstance(x, (Jaxpr, ClosedJaxpr)) for x in v))
  return any(is_jaxpr(v) for v in eqn.params.values())


def sub_jaxprs(eqn) -> list:
  """The jaxprs a higher-order primitive carries (as open ``Jaxpr``s)."""
  out = []
  for v in eqn.params.values():
    for x in (v if isinstance(v, (tuple, list)) else (v,)):
      if isinstance(x, ClosedJaxpr):
        out.append(x.jaxpr)
      elif isinstance(x, Jaxpr):
        out.append(x)
  return out


# Parameters of the primitives the engine rebuilds through public APIs.
def scan_params(eqn) -> dict:
  p = eqn.params
  return dict(jaxpr=p["jaxpr"], length=p["length"], reverse=p["reverse"], unroll=p["unroll"],
              num_consts=p["num_consts"], num_carry=p["num_carry"])


def while_params(eqn) -> dict:
  p = eqn.params
  return dict(cond_jaxpr=p["cond_jaxpr"], body_jaxpr=p["body_jaxpr"],
              cond_nconsts=p["cond_nconsts"], body_nconsts=p["body_nconsts"])


def cond_branches(eqn) -> tuple:
  return tuple(eqn.params["branches"])


def remat_params(eqn) -> dict:
  p = eqn.params
  return dict(jaxpr=p["jaxpr"], prevent_cse=p["prevent_cse"], policy=p["policy"])


def call_jaxpr(eqn) -> ClosedJaxpr:
  """The body of a call-like primitive (``jit``, ``closed_call``, custom_jvp/vjp)."""
  p = eqn.params
  return closed(p["jaxpr"] if "jaxpr" in p else p["call_jaxpr"])


def call_shardings(eqn) -> tuple[tuple, tuple]:
  """A nested ``jit``'s concrete in/out shardings (``None`` where unspecified)."""
  def concrete(shardings):
    return tuple(s if isinstance(s, jax.sharding.Sharding) else None for s in shardings)
  p = eqn.params
  return concrete(p.get("in_shardings", ())), concrete(p.get("out_shardings", ()))


def conv_params(eqn) -> dict:
  p = eqn.params
  dn = p["dimension_numbers"]
  return dict(strides=tuple(p["window_strides"]), padding=tuple(tuple(x) for x in p["padding"]),
              lhs_dilation=tuple(p["lhs_dilation"]), rhs_dilation=tuple(p["rhs_dilation"]),
              lhs_spec=tuple(dn.lhs_spec), rhs_spec=tuple(dn.rhs_spec),
              groups=p["feature_group_count"], batch_groups=p["batch_group_count"])


def dot_dimensions(eqn) -> tuple:
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  return tuple(lc), tuple(rc), tuple(lb), tuple(rb)


def gather_params(eqn) -> dict:
  """A ``gather``'s dimension numbers and slice sizes; ``clips``: whether an
  out-of-range index is clamped (``clip``, ``promise_in_bounds``) rather than
  its slice filled (``fill``)."""
  p = eqn.params
  dn = p["dimension_numbers"]
  return dict(offset_dims=tuple(dn.offset_dims), collapsed=tuple(dn.collapsed_slice_dims),
              start_index_map=tuple(dn.start_index_map),
              batching=tuple(getattr(dn, "operand_batching_dims", ())),
              slice_sizes=tuple(p["slice_sizes"]),
              clips=p["mode"] != lax.GatherScatterMode.FILL_OR_DROP)


def stop_gradient(x):
  return lax.stop_gradient(x)
