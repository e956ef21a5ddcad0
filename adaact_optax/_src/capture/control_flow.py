"""Higher-order primitives: nested ``jit``/``closed_call``, ``checkpoint``,
``custom_jvp``/``custom_vjp``, ``scan``, ``while`` and ``cond``.

Each rule evaluates the primitive's body with a child walker and rebuilds
the primitive through JAX's public API around it, so that the body's
contributions come out as extra outputs (stacked per ``scan`` iteration,
summed over ``while`` iterations, zero for the ``cond`` branches not taken).
The reading walker (the fast route) refuses these rules: see ``walker.Reader``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from adaact_optax._src.capture import jax_internals as jc
from adaact_optax._src.capture.gathered import across_bodies
from adaact_optax._src.capture.kinds import (CONST, DATA, Gathered, Mixed, Opaque, View, is_param,
                                              norm, opaque, param_sources)
from adaact_optax._src.capture.sums import materialize


def call(interp, eqn, invals, inkinds, in_mm):
  inner = jc.call_jaxpr(eqn)
  ins, outs_s = jc.call_shardings(eqn)
  invals = [v if s is None else lax.with_sharding_constraint(v, s)
            for v, s in zip(invals, ins or [None] * len(invals))]
  interp.copy_tags(eqn.invars, inner.jaxpr.invars)
  outs, kinds, mm = interp.run(inner.jaxpr, inner.consts, invals, inkinds)
  interp.copy_tags(inner.jaxpr.outvars, eqn.outvars)
  outs = [v if s is None else lax.with_sharding_constraint(v, s)
          for v, s in zip(outs, outs_s or [None] * len(outs))]
  return outs, kinds, mm


def custom_call(interp, eqn, invals, inkinds, in_mm):
  # The function keeps its own differentiation rule; the statistics come
  # from evaluating its body on stop-gradient inputs (XLA shares the work).
  outs = jc.bind(eqn, invals)
  inner = jc.call_jaxpr(eqn)
  interp.copy_tags(eqn.invars, inner.jaxpr.invars)
  _, kinds, mm = interp.run(inner.jaxpr, inner.consts,
                            [jc.stop_gradient(v) for v in invals], inkinds)
  interp.copy_tags(inner.jaxpr.outvars, eqn.outvars)
  return outs, kinds, mm


def nested(interp, jaxpr, consts, kinds, depth=None, in_vars=None, tags=None, thread=False):
  """A function evaluating ``jaxpr`` that also returns its contributions' arrays.

  Its ``info`` dict is filled when the function is traced: the child
  interpreter's contributions (pieces), output kinds and mm flags. With a
  row mask, the child starts with the tags of ``in_vars`` (the outer
  values passed in), or with explicit ``tags`` for its inputs; ``fn``'s
  first argument is then the child's mask (``None`` to keep this one).

  Gathered slices among the inputs or outputs are reported (their indices
  live in the other trace), unless ``thread``: then ``fn`` takes the input
  slices' indices as extra trailing arguments (``info["extra"]``, known now)
  and returns the output slices' indices as a third result, which
  ``threaded_kinds`` puts back into ``info["kinds"]``.
  """
  info = {}
  outer = [None if v is None else interp.tag(v) for v in (in_vars or [])]
  in_tags = tags if tags is not None else outer
  slots = [i for i, k in enumerate(kinds) if thread and isinstance(k, Gathered)
           and k.broken is None]
  info["extra"] = [v for i in slots for v in kinds[i].index]
  kinds = across_bodies(kinds, "passed into", keep=slots)

  def fn(*args, mask=None):
    args, extra = args[:len(jaxpr.invars)], iter(args[len(jaxpr.invars):])
    in_kinds = list(kinds)
    for i in slots:
      in_kinds[i] = dataclasses.replace(kinds[i], index=tuple(next(extra)
                                                              for _ in kinds[i].index))
    child = interp.child(interp.depth if depth is None else depth,
                         interp.mask if mask is None else mask)
    if child.mask is not None:
      for var, t in zip(jaxpr.invars, in_tags):
        if t is not None:
          child.tags[var] = t
    outs, okinds, omm = child.run(jaxpr, consts, args, in_kinds)
    out_slots = [i for i, k in enumerate(okinds) if thread and isinstance(k, Gathered)
                 and k.broken is None]
    info.update(contributions=child.contributions, out_slots=out_slots,
                kinds=across_bodies(okinds, "returned from", keep=out_slots), mm=omm,
                tags=[child.tag(v) for v in jaxpr.outvars])
    arrays = [(c.sums, materialize(c.counts, c.sums.shape)) for c in child.contributions]
    if thread:
      return outs, arrays, [list(okinds[i].index) for i in out_slots]
    return outs, arrays
  return fn, info


def remat_body(eqn) -> jc.ClosedJaxpr:
  """A ``checkpoint``'s body."""
  return jc.closed(jc.remat_params(eqn)["jaxpr"])


def threaded_kinds(info, indices) -> list:
  """``info["kinds"]`` with the output slices' indices (from a threaded ``fn``) put back."""
  kinds = list(info["kinds"])
  for i, index in zip(info["out_slots"], indices):
    kinds[i] = dataclasses.replace(kinds[i], index=tuple(index))
  return kinds


def remat(interp, eqn, invals, inkinds, in_mm):
  p = jc.remat_params(eqn)
  inner = remat_body(eqn)
  # Threaded: JAX inlines a checkpoint's forward when it differentiates, so the
  # fast route sees gathered slices cross it; this route must too.
  fn, info = nested(interp, inner.jaxpr, inner.consts, inkinds, in_vars=eqn.invars,
                    thread=True)
  outs, arrays, indices = jax.checkpoint(fn, prevent_cse=p["prevent_cse"],
                                         policy=p["policy"])(*invals, *info["extra"])
  interp.adopt(info["contributions"], arrays)
  interp.set_tags(eqn.outvars, info["tags"])
  return list(outs), threaded_kinds(info, indices), info["mm"]


def scan(interp, eqn, invals, inkinds, in_mm):
  p = jc.scan_params(eqn)
  body, nc, ncar = p["jaxpr"], p["num_consts"], p["num_carry"]
  consts, init, xs = invals[:nc], invals[nc:nc + ncar], invals[nc + ncar:]
  ck, ik, xk = inkinds[:nc], inkinds[nc:nc + ncar], inkinds[nc + ncar:]
  carry_in = body.jaxpr.invars[nc:nc + ncar]
  carry_out = body.jaxpr.outvars[:ncar]
  carry_kinds = [k if (not is_param(k) or v_out is v_in) else
                 Opaque(param_sources([k]), f"a `{eqn.primitive.name}` carry")
                 for k, v_in, v_out in zip(ik, carry_in, carry_out)]
  carry_kinds = [DATA if k is CONST or isinstance(k, Mixed) else k for k in carry_kinds]
  x_kinds = [pin(k) for k in xk]
  # A scan over a mask axis j (time): each iteration sees the mask sliced at j.
  in_tags = [interp.tag(v) for v in eqn.invars]
  j = next((t[0] for t in in_tags[nc + ncar:] if t and t[0] is not None), None)
  renumber = lambda t: None if t is None or j is None else tuple(
      None if x is None or x == j else (x - 1 if x > j else x) for x in t)
  body_tags = ([renumber(t) if j is not None else t for t in in_tags[:nc + ncar]]
               + [renumber(t[1:]) if j is not None else (t[1:] if t else None)
                  for t in in_tags[nc + ncar:]])
  fn, info = nested(interp, body.jaxpr, body.consts, ck + carry_kinds + x_kinds,
                      depth=interp.depth + 1, tags=body_tags)
  masks = [] if j is None else [jnp.moveaxis(interp.mask, j, 0)]

  def step(carry, x):
    x, m = (x[:-1], x[-1]) if masks else (x, None)
    outs, arrays = fn(*consts, *carry, *x, mask=m)
    return outs[:ncar], (outs[ncar:], arrays)

  carry, (ys, arrays) = lax.scan(step, list(init), list(xs) + masks, length=p["length"],
                                 reverse=p["reverse"], unroll=p["unroll"])
  for c, (s, n) in zip(info["contributions"], arrays):
    if len(c.piece.pinned) == interp.depth + 1:  # sliced per iteration: stack
      piece = c.piece
      lead = piece.pinned[-1]
      piece = dataclasses.replace(piece, pinned=piece.pinned[:-1],
                                  bounds=((0, p["length"]),) + piece.bounds,
                                  axes=(lead,) + piece.axes)
      interp.contributions.append(c._replace(piece=piece, sums=s, counts=n))
    else:  # the same weight every iteration: pool
      interp.contributions.append(c._replace(sums=s.sum(0), counts=n.sum(0)))
  okinds = info["kinds"]
  out_kinds = [carry_kinds[i] if is_param(carry_kinds[i]) and okinds[i] is not DATA
               else (DATA if okinds[i] is CONST else okinds[i]) for i in range(ncar)]
  out_kinds += [opaque([k], f"`{eqn.primitive.name}` output") if is_param(k) else k
                for k in okinds[ncar:]]
  return list(carry) + list(ys), out_kinds, [False] * len(out_kinds)


def pin(kind):
  if not isinstance(kind, View):
    return kind
  pieces = []
  for p in kind.pieces:
    if p.bounds[0] != (0, kind.shape[0]):
      return Opaque(param_sources([kind]), "a `scan` over a concatenated weight")
    pieces.append(dataclasses.replace(p, bounds=p.bounds[1:], axes=p.axes[1:],
                                      pinned=p.pinned + (norm(p.axes[0]),)))
  return View(tuple(pieces), kind.shape[1:])


def while_loop(interp, eqn, invals, inkinds, in_mm):
  p = jc.while_params(eqn)
  cn, bn = p["cond_nconsts"], p["body_nconsts"]
  cconsts, bconsts, init = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]
  bk, ik = inkinds[cn:cn + bn], inkinds[cn + bn:]
  body = p["body_jaxpr"]
  carry_in, carry_out = body.jaxpr.invars[bn:], body.jaxpr.outvars
  carry_kinds = [k if (not is_param(k) or v_out is v_in) else
                 Opaque(param_sources([k]), f"a `{eqn.primitive.name}` carry")
                 for k, v_in, v_out in zip(ik, carry_in, carry_out)]
  carry_kinds = [DATA if k is CONST or isinstance(k, Mixed) else k for k in carry_kinds]
  fn, info = nested(interp, body.jaxpr, body.consts, bk + carry_kinds,
                      in_vars=eqn.invars[cn:])
  # Trace once for the accumulators' shapes, then loop with them in the carry.
  _, shapes = jax.eval_shape(lambda *c: fn(*bconsts, *c), *init)
  contributions = info["contributions"]
  cond_fun = jc.jex_core.jaxpr_as_fun(p["cond_jaxpr"])

  def loop_body(state):
    carry, acc = state
    outs, arrays = fn(*bconsts, *carry)
    return list(outs), [(a + s, b + n) for (a, b), (s, n) in zip(acc, arrays)]

  zeros = [(jnp.zeros(s.shape, s.dtype), jnp.zeros(n.shape, n.dtype)) for s, n in shapes]
  carry, acc = lax.while_loop(lambda st: cond_fun(*cconsts, *st[0])[0], loop_body,
                              (list(init), zeros))
  interp.adopt(contributions, acc)
  okinds = info["kinds"]
  out_kinds = [carry_kinds[i] if is_param(carry_kinds[i]) else okinds[i]
               for i in range(len(okinds))]
  return list(carry), out_kinds, [False] * len(out_kinds)


def cond(interp, eqn, invals, inkinds, in_mm):
  index, ops = invals[0], invals[1:]
  branches = jc.cond_branches(eqn)
  fns = [nested(interp, b.jaxpr, b.consts, inkinds[1:], in_vars=eqn.invars[1:])
         for b in branches]
  shapes = [jax.eval_shape(fn, *ops)[1] for fn, _ in fns]
  union = []  # (branch, position) for every contribution of every branch
  for b, s in enumerate(shapes):
    union += [(b, i) for i in range(len(s))]

  def branch(b):
    def run(*args):
      outs, arrays = fns[b][0](*args)
      full = []
      for bb, i in union:
        if bb == b:
          full.append(arrays[i])
        else:
          s, n = shapes[bb][i]
          full.append((jnp.zeros(s.shape, s.dtype), jnp.zeros(n.shape, n.dtype)))
      return outs, full
    return run

  outs, arrays = lax.switch(index, [branch(b) for b in range(len(branches))], *ops)
  contributions = [fns[b][1]["contributions"][i] for b, i in union]
  interp.adopt(contributions, arrays)
  kinds = []
  for i in range(len(outs)):
    ks = [fn[1]["kinds"][i] for fn in fns]
    same = all(k == ks[0] for k in ks)
    kinds.append(ks[0] if same else opaque(ks, f"`{eqn.primitive.name}` output"))
  return list(outs), kinds, [False] * len(outs)

