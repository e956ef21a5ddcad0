"""The walker: evaluates (or reads) a jaxpr equation by equation, collecting contributions."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from adaact_optax._src.capture import jax_internals as jc
from adaact_optax._src.capture.contractions import conv_sums, dot_sums
from adaact_optax._src.capture.kinds import (CONST, DATA, Mixed, NeedsEvaluation, Opaque,
                                              Unsupported, View, is_data, is_param, norm,
                                              opaque, param_sources)
from adaact_optax._src.capture.row_mask import propagate_tags
from adaact_optax._src.capture.sums import Contribution, filled, materialize, restrict
from adaact_optax._src.capture.views import VIEW_RULES, shift_piece, view_pad, view_slice


# ----------------------------------------------------------------------------
# The interpreter.


class Trace:
  """What one capture call shares across nested jaxprs."""

  def __init__(self, shapes, embeddings):
    self.shapes = shapes
    self.embeddings = embeddings
    self.uncaptured: dict[int, str] = {}

  def miss(self, sources, reason: str):
    for s in sorted(sources):
      self.uncaptured.setdefault(s, reason)


class Interpreter:
  """Evaluates jaxprs while collecting contributions; ``depth`` = enclosing scans."""

  def __init__(self, trace: Trace, depth: int = 0, mask=None, deferred: bool = False):
    self.trace = trace
    self.depth = depth
    self.contributions: list[Contribution] = []
    # Deferred: walk an already differentiated jaxpr without binding anything;
    # each statistic waits in `pending` for the value it is computed from
    # (see `resolve`).
    self.deferred = deferred
    self.pending: list = []
    # With a row mask: which mask axis each axis of an activation is (by Var).
    self.mask = mask
    self.tags: dict = {}

  def _bind(self, eqn, invals):
    return list(eqn.outvars) if self.deferred else jc.bind(eqn, invals)

  def _stat(self, view: View, fn, value, lookup=False, key=None):
    """Records ``fn(value) -> (sums, counts)`` for ``view``, now or once resolved.

    ``key`` names what ``fn`` computes from ``value``; deferred statistics
    with the same value and key are computed once (q, k and v projections
    of one input).
    """
    if self.deferred:
      self.pending.append((view, fn, value, lookup, key))
    else:
      self._record(view, *fn(value), lookup=lookup)

  def resolve(self, env: dict):
    """Computes the deferred statistics; ``env`` maps the jaxpr's vars to values."""
    done = {}
    for view, fn, value, lookup, key in self.pending:
      is_var = isinstance(value, jc.Var)
      memo = (value, key) if is_var and key is not None else None
      if memo not in done:
        result = fn(env[value] if is_var else value)
        if memo is None:
          self._record(view, *result, lookup=lookup)
          continue
        done[memo] = result
      self._record(view, *done[memo], lookup=lookup)
    self.pending = []

  def tag(self, atom):
    return None if jc.is_literal(atom) else self.tags.get(atom)

  def _copy_tags(self, src_vars, dst_vars, source=None):
    source = self if source is None else source
    if self.mask is None:
      return
    for s_, d in zip(src_vars, dst_vars):
      t = source.tag(s_)
      if t is not None and not jc.is_dropvar(d):
        self.tags[d] = t

  # -- entry point ------------------------------------------------------------
  def run(self, jaxpr, consts, args, kinds):
    env, kenv, mm = {}, {}, set()

    def read(atom):
      if jc.is_literal(atom):
        return jc.literal_value(atom), CONST
      return env[atom], kenv[atom]

    def write(var, val, kind, is_mm=False):
      if jc.is_dropvar(var):
        return
      env[var], kenv[var] = val, kind
      if is_mm:
        mm.add(var)

    for v, c in zip(jaxpr.constvars, consts):
      write(v, c, CONST)
    for v, a, k in zip(jaxpr.invars, args, kinds):
      write(v, a, k)
    for eqn in jaxpr.eqns:
      pairs = [read(v) for v in eqn.invars]
      invals = [p[0] for p in pairs]
      inkinds = [p[1] for p in pairs]
      in_mm = [(not jc.is_literal(v)) and v in mm for v in eqn.invars]
      outvals, outkinds, out_mm = self.eqn(eqn, invals, inkinds, in_mm)
      for var, val, kind, m in zip(eqn.outvars, outvals, outkinds, out_mm):
        write(var, val, kind, m)
      if self.mask is not None and not jc.has_subjaxpr(eqn):
        propagate_tags(eqn, self.tags)
    outs = [read(v) for v in jaxpr.outvars]
    out_mm = [(not jc.is_literal(v)) and v in mm for v in jaxpr.outvars]
    return [o[0] for o in outs], [o[1] for o in outs], out_mm

  # -- one equation -----------------------------------------------------------
  def eqn(self, eqn, invals, inkinds, in_mm):
    name = eqn.primitive.name
    n_out = len(eqn.outvars)
    if not any(is_param(k) for k in inkinds) and (
        not any(isinstance(k, Mixed) for k in inkinds) or name not in (jc.DOT, jc.CONV)):
      outs = self._bind(eqn, invals)
      if name in (jc.DOT, jc.CONV, jc.GATHER) or jc.has_subjaxpr(eqn):
        kind = DATA if any(is_data(k) for k in inkinds) else CONST
      else:
        kind = opaque(inkinds, f"`{name}`")
      passes_mm = bool(in_mm) and in_mm[0] and (name in jc.IDENTITY or name in (
          "reshape", "transpose", "broadcast_in_dim", "squeeze"))
      return outs, [kind] * n_out, [passes_mm] * n_out
    if self.deferred and (name in jc.CALLS or name in jc.REMAT or name in jc.CUSTOM_JVP
                          or name in jc.CUSTOM_VJP or name in (jc.SCAN, jc.WHILE, jc.COND)):
      raise NeedsEvaluation(name)
    if name in jc.CALLS:
      return self._call(eqn, invals, inkinds)
    if name in jc.REMAT:
      return self._remat(eqn, invals, inkinds)
    if name in jc.CUSTOM_JVP or name in jc.CUSTOM_VJP:
      return self._custom(eqn, invals, inkinds)
    if name == jc.SCAN:
      return self._scan(eqn, invals, inkinds)
    if name == jc.WHILE:
      return self._while(eqn, invals, inkinds)
    if name == jc.COND:
      return self._cond(eqn, invals, inkinds)
    outs = self._bind(eqn, invals)
    if name == jc.DOT:
      kind, recorded = self._dot(eqn, invals, inkinds)
      return outs, [kind], [recorded]
    if name == jc.CONV:
      kind, recorded = self._conv(eqn, invals, inkinds)
      return outs, [kind], [recorded]
    if name == jc.GATHER:
      return outs, [self._gather(eqn, invals, inkinds)], [False]
    if name in jc.ADD:
      return outs, [self._add(invals, inkinds, in_mm)], [False]
    if name in jc.IDENTITY:
      return outs, list(inkinds[:n_out]), list(in_mm[:n_out])
    if name in VIEW_RULES or name in ("concatenate", "split", "pad"):
      try:
        kinds = self._layout(eqn, name, inkinds)
      except Unsupported as e:
        kinds = [opaque(inkinds, f"`{name}` ({e})")] * n_out
      return outs, kinds, [False] * n_out
    if name == "dynamic_slice" and all(jc.is_literal(v) for v in eqn.invars[1:]):
      starts = [jc.literal_value(v) for v in eqn.invars[1:]]
      try:
        kind = self._layout_one(inkinds[0], "slice", eqn.outvars[0].aval.shape, dict(
            start_indices=starts,
            limit_indices=[s + n for s, n in zip(starts, eqn.params["slice_sizes"])]))
      except Unsupported as e:
        kind = opaque(inkinds, f"`dynamic_slice` ({e})")
      return outs, [kind], [False]
    if jc.has_subjaxpr(eqn):
      self.trace.miss(param_sources(inkinds), f"it is passed into `{name}`, which the capture "
                      "does not see into")
      return outs, [DATA] * n_out, [False] * n_out
    return outs, [opaque(inkinds, f"`{name}`")] * n_out, [False] * n_out

  # -- layout -----------------------------------------------------------------
  def _layout_one(self, kind, name, out_shape, params):
    if not isinstance(kind, View):
      return kind
    return VIEW_RULES[name](kind, tuple(out_shape), **params)

  def _layout(self, eqn, name, inkinds):
    out_shapes = [v.aval.shape for v in eqn.outvars]
    if name in VIEW_RULES:
      kind = inkinds[0]
      if not isinstance(kind, View):
        return [kind]
      return [self._layout_one(kind, name, out_shapes[0], dict(eqn.params))]
    if name == "pad":
      kind = inkinds[0]
      if not isinstance(kind, View):
        return [opaque(inkinds, "`pad`")]
      return [view_pad(kind, tuple(out_shapes[0]), eqn.params["padding_config"])]
    if name == "split":
      kind = inkinds[0]
      if not isinstance(kind, View):
        return [kind] * len(out_shapes)
      axis, start, out = eqn.params["axis"], 0, []
      for size, shape in zip(eqn.params["sizes"], out_shapes):
        starts = [0] * len(shape)
        limits = list(kind.shape)
        starts[axis], limits[axis] = start, start + size
        out.append(view_slice(kind, tuple(shape), starts, limits))
        start += size
      return out
    # concatenate: views (and constants) side by side along one axis.
    if any(is_data(k) or isinstance(k, Opaque) for k in inkinds):
      return [opaque(inkinds, "`concatenate`")]
    axis, start, pieces = eqn.params["dimension"], 0, []
    for var, kind in zip(eqn.invars, inkinds):
      if isinstance(kind, View):
        pieces.extend(shift_piece(p, axis, start) for p in kind.pieces)
      start += var.aval.shape[axis]
    return [View(tuple(pieces), tuple(out_shapes[0]))]

  # -- contractions -----------------------------------------------------------
  def _record(self, view: View, sums, counts, lookup=False):
    for piece in view.pieces:
      try:
        s, c = restrict(piece, view.shape, sums, counts)
      except Unsupported as e:
        self.trace.miss({piece.param}, str(e))
        continue
      self.contributions.append(Contribution(piece, s, c, lookup))

  def _weight_and_input(self, inkinds, eqn_name, batched=False):
    """Which operand is the weight: ``(weight index, kind of result)`` or None.

    ``batched``: the contraction has batch dimensions (attention scores), so
    neither operand can be a weight unless it is a view of a parameter.
    """
    lk, rk = inkinds
    if isinstance(lk, View) and isinstance(rk, View):
      return None, Opaque(param_sources(inkinds), f"`{eqn_name}` with another parameter")
    if isinstance(lk, Opaque) and isinstance(rk, Opaque):
      return None, opaque(inkinds, eqn_name)
    for w, (wk, ak) in ((1, (rk, lk)), (0, (lk, rk))):
      if isinstance(wk, View):
        if isinstance(ak, Opaque):
          self.trace.miss(ak.sources, f"it passes through {ak.reason}, which is not a layout "
                          "op, before it multiplies another weight")
        return w, DATA
    for k in (lk, rk):
      if isinstance(k, Opaque):
        self.trace.miss(k.sources, f"it passes through {k.reason}, which is not a layout "
                        f"op, before its `{eqn_name}`")
    # A parameter combined with data right before a contraction whose other side
    # is plain data: a weight given as data and scaled (dequantised) by it.
    mixed = [k for k in (lk, rk) if isinstance(k, Mixed)]
    if len(mixed) == 1 and not batched and not any(is_param(k) for k in (lk, rk)):
      self.trace.miss(mixed[0].sources, f"it is combined with data by {mixed[0].reason} "
                      f"before a `{eqn_name}` whose other operand is data (a weight passed in "
                      "as data and scaled by a parameter?)")
    return None, DATA

  def _dot(self, eqn, invals, inkinds):
    lc, rc, lb, rb = jc.dot_dimensions(eqn)
    w, kind = self._weight_and_input(inkinds, "dot_general", batched=bool(lb))
    if w is None:
      return kind, False
    a_c, w_c, a_b, w_b = (lc, rc, lb, rb) if w == 1 else (rc, lc, rb, lb)
    w_ndim, mask, tags = eqn.invars[w].aval.ndim, self.mask, self.tag(eqn.invars[1 - w])
    self._stat(inkinds[w], lambda a: dot_sums(a, a_c, a_b, w_c, w_b, w_ndim, mask, tags),
               invals[1 - w], key=(jc.DOT, a_c, a_b, w_c, w_b, w_ndim))
    return DATA, True

  def _conv(self, eqn, invals, inkinds):
    lk, rk = inkinds
    if is_param(lk):
      if is_data(rk):
        self.trace.miss(param_sources([lk]), "it is the input (not the kernel) of a convolution")
        return DATA, False
      return opaque(inkinds, "`conv_general_dilated`"), False
    if isinstance(rk, (Opaque, Mixed)):
      self.trace.miss(rk.sources, f"it passes through {rk.reason}, which is not a layout "
                      "op, before its `conv_general_dilated`")
      return DATA, False
    if not isinstance(rk, View):
      return (DATA if is_data(lk) or is_data(rk) else CONST), False
    cp = jc.conv_params(eqn)
    if cp["batch_groups"] != 1:
      self.trace.miss(param_sources([rk]), "a convolution with batch_group_count > 1")
      return DATA, False
    rhs_shape, mask, tags = eqn.invars[1].aval.shape, self.mask, self.tag(eqn.invars[0])
    self._stat(rk, lambda lhs: conv_sums(lhs, rhs_shape, cp, mask, tags), invals[0])
    return DATA, True

  def _gather(self, eqn, invals, inkinds):
    table, ids = inkinds
    if not isinstance(table, View):
      return opaque(inkinds, "`gather`")
    gp = jc.gather_params(eqn)
    shape = table.shape
    # An embedding lookup: whole rows along one axis, picked by integer ids.
    lookup = (len(gp["start_index_map"]) == 1 and gp["collapsed"] == gp["start_index_map"]
              and not gp["batching"]
              and all(s == (1 if a in gp["collapsed"] else n)
                      for a, (s, n) in enumerate(zip(gp["slice_sizes"], shape))))
    if not lookup:
      return opaque(inkinds, "`gather`")
    if self.trace.embeddings is not None:
      axis = gp["start_index_map"][0]

      def frequencies(ids):
        index = lax.stop_gradient(ids).reshape(-1)
        counts_row = jax.ops.segment_sum(jnp.ones(index.shape, jnp.float32), index,
                                         num_segments=shape[axis])
        sums = counts_row.reshape([n if a == axis else 1 for a, n in enumerate(shape)])
        return sums, filled(float(max(index.size, 1)), sums.shape)
      self._stat(table, frequencies, invals[1], lookup=True)
    return DATA

  def _add(self, invals, inkinds, in_mm):
    # A parameter added to a captured contraction's output is its bias: a
    # weight on the constant input 1.
    for b, o in ((0, 1), (1, 0)):
      if isinstance(inkinds[b], View) and in_mm[o]:
        view = inkinds[b]
        ones = np.ones((1,) * len(view.shape), np.float32)
        self._stat(view, lambda _: (ones, ones), None)
        return DATA
    return opaque(inkinds, "`add`")

  # -- higher-order primitives ------------------------------------------------
  def _call(self, eqn, invals, inkinds):
    inner = jc.call_jaxpr(eqn)
    ins, outs_s = jc.call_shardings(eqn)
    invals = [v if s is None else lax.with_sharding_constraint(v, s)
              for v, s in zip(invals, ins or [None] * len(invals))]
    self._copy_tags(eqn.invars, inner.jaxpr.invars)
    outs, kinds, mm = self.run(inner.jaxpr, inner.consts, invals, inkinds)
    self._copy_tags(inner.jaxpr.outvars, eqn.outvars)
    outs = [v if s is None else lax.with_sharding_constraint(v, s)
            for v, s in zip(outs, outs_s or [None] * len(outs))]
    return outs, kinds, mm

  def _custom(self, eqn, invals, inkinds):
    # The function keeps its own differentiation rule; the statistics come
    # from evaluating its body on stop-gradient inputs (XLA shares the work).
    outs = jc.bind(eqn, invals)
    inner = jc.call_jaxpr(eqn)
    self._copy_tags(eqn.invars, inner.jaxpr.invars)
    _, kinds, mm = self.run(inner.jaxpr, inner.consts,
                            [jc.stop_gradient(v) for v in invals], inkinds)
    self._copy_tags(inner.jaxpr.outvars, eqn.outvars)
    return outs, kinds, mm

  def _nested(self, jaxpr, consts, kinds, depth=None, in_vars=None, tags=None):
    """A function evaluating ``jaxpr`` that also returns its contributions' arrays.

    Its ``info`` dict is filled when the function is traced: the child
    interpreter's contributions (pieces), output kinds and mm flags. With a
    row mask, the child starts with the tags of ``in_vars`` (the outer
    values passed in), or with explicit ``tags`` for its inputs; ``fn``'s
    first argument is then the child's mask (``None`` to keep this one).
    """
    info = {}
    outer = [None if v is None else self.tag(v) for v in (in_vars or [])]
    in_tags = tags if tags is not None else outer

    def fn(*args, mask=None):
      child = Interpreter(self.trace, self.depth if depth is None else depth,
                           mask=self.mask if mask is None else mask)
      if child.mask is not None:
        for var, t in zip(jaxpr.invars, in_tags):
          if t is not None:
            child.tags[var] = t
      outs, okinds, omm = child.run(jaxpr, consts, args, kinds)
      info.update(contributions=child.contributions, kinds=okinds, mm=omm,
                  tags=[child.tag(v) for v in jaxpr.outvars])
      return outs, [(c.sums, materialize(c.counts, c.sums.shape))
                    for c in child.contributions]
    return fn, info

  def _remat(self, eqn, invals, inkinds):
    p = jc.remat_params(eqn)
    inner = jc.closed(p["jaxpr"])
    fn, info = self._nested(inner.jaxpr, inner.consts, inkinds, in_vars=eqn.invars)
    outs, arrays = jax.checkpoint(fn, prevent_cse=p["prevent_cse"], policy=p["policy"])(*invals)
    self._adopt(info["contributions"], arrays)
    self._set_tags(eqn.outvars, info["tags"])
    return list(outs), info["kinds"], info["mm"]

  def _set_tags(self, outvars, tags):
    if self.mask is None:
      return
    for var, t in zip(outvars, tags):
      if t is not None and not jc.is_dropvar(var):
        self.tags[var] = t

  def _adopt(self, contributions, arrays):
    for c, (s, n) in zip(contributions, arrays):
      self.contributions.append(c._replace(sums=s, counts=n))

  def _scan(self, eqn, invals, inkinds):
    p = jc.scan_params(eqn)
    body, nc, ncar = p["jaxpr"], p["num_consts"], p["num_carry"]
    consts, init, xs = invals[:nc], invals[nc:nc + ncar], invals[nc + ncar:]
    ck, ik, xk = inkinds[:nc], inkinds[nc:nc + ncar], inkinds[nc + ncar:]
    carry_in = body.jaxpr.invars[nc:nc + ncar]
    carry_out = body.jaxpr.outvars[:ncar]
    carry_kinds = [k if (not is_param(k) or v_out is v_in) else
                   Opaque(param_sources([k]), "a `scan` carry")
                   for k, v_in, v_out in zip(ik, carry_in, carry_out)]
    carry_kinds = [DATA if k is CONST or isinstance(k, Mixed) else k for k in carry_kinds]
    x_kinds = [self._pin(k) for k in xk]
    # A scan over a mask axis j (time): each iteration sees the mask sliced at j.
    in_tags = [self.tag(v) for v in eqn.invars]
    j = next((t[0] for t in in_tags[nc + ncar:] if t and t[0] is not None), None)
    renumber = lambda t: None if t is None or j is None else tuple(
        None if x is None or x == j else (x - 1 if x > j else x) for x in t)
    body_tags = ([renumber(t) if j is not None else t for t in in_tags[:nc + ncar]]
                 + [renumber(t[1:]) if j is not None else (t[1:] if t else None)
                    for t in in_tags[nc + ncar:]])
    fn, info = self._nested(body.jaxpr, body.consts, ck + carry_kinds + x_kinds,
                            depth=self.depth + 1, tags=body_tags)
    masks = [] if j is None else [jnp.moveaxis(self.mask, j, 0)]

    def step(carry, x):
      x, m = (x[:-1], x[-1]) if masks else (x, None)
      outs, arrays = fn(*consts, *carry, *x, mask=m)
      return outs[:ncar], (outs[ncar:], arrays)

    carry, (ys, arrays) = lax.scan(step, list(init), list(xs) + masks, length=p["length"],
                                   reverse=p["reverse"], unroll=p["unroll"])
    for c, (s, n) in zip(info["contributions"], arrays):
      if len(c.piece.pinned) == self.depth + 1:  # sliced per iteration: stack
        piece = c.piece
        lead = piece.pinned[-1]
        piece = dataclasses.replace(piece, pinned=piece.pinned[:-1],
                                    box=((0, p["length"]),) + piece.box,
                                    axes=(lead,) + piece.axes)
        self.contributions.append(c._replace(piece=piece, sums=s, counts=n))
      else:  # the same weight every iteration: pool
        self.contributions.append(c._replace(sums=s.sum(0), counts=n.sum(0)))
    okinds = info["kinds"]
    out_kinds = [carry_kinds[i] if is_param(carry_kinds[i]) and okinds[i] is not DATA
                 else (DATA if okinds[i] is CONST else okinds[i]) for i in range(ncar)]
    out_kinds += [opaque([k], "`scan` output") if is_param(k) else k
                  for k in okinds[ncar:]]
    return list(carry) + list(ys), out_kinds, [False] * len(out_kinds)

  def _pin(self, kind):
    if not isinstance(kind, View):
      return kind
    pieces = []
    for p in kind.pieces:
      if p.box[0] != (0, kind.shape[0]):
        return Opaque(param_sources([kind]), "a `scan` over a concatenated weight")
      pieces.append(dataclasses.replace(p, box=p.box[1:], axes=p.axes[1:],
                                        pinned=p.pinned + (norm(p.axes[0]),)))
    return View(tuple(pieces), kind.shape[1:])

  def _while(self, eqn, invals, inkinds):
    p = jc.while_params(eqn)
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts, init = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]
    bk, ik = inkinds[cn:cn + bn], inkinds[cn + bn:]
    body = p["body_jaxpr"]
    carry_in, carry_out = body.jaxpr.invars[bn:], body.jaxpr.outvars
    carry_kinds = [k if (not is_param(k) or v_out is v_in) else
                   Opaque(param_sources([k]), "a `while` carry")
                   for k, v_in, v_out in zip(ik, carry_in, carry_out)]
    carry_kinds = [DATA if k is CONST or isinstance(k, Mixed) else k for k in carry_kinds]
    fn, info = self._nested(body.jaxpr, body.consts, bk + carry_kinds,
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
    self._adopt(contributions, acc)
    okinds = info["kinds"]
    out_kinds = [carry_kinds[i] if is_param(carry_kinds[i]) else okinds[i]
                 for i in range(len(okinds))]
    return list(carry), out_kinds, [False] * len(out_kinds)

  def _cond(self, eqn, invals, inkinds):
    index, ops = invals[0], invals[1:]
    branches = jc.cond_branches(eqn)
    fns = [self._nested(b.jaxpr, b.consts, inkinds[1:], in_vars=eqn.invars[1:])
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
    self._adopt(contributions, arrays)
    kinds = []
    for i in range(len(outs)):
      ks = [fn[1]["kinds"][i] for fn in fns]
      same = all(k == ks[0] for k in ks)
      kinds.append(ks[0] if same else opaque(ks, "`cond` output"))
    return list(outs), kinds, [False] * len(outs)

def top_interpreter(trace: Trace, row_mask, data_vars, deferred=False) -> Interpreter:
  """The top-level interpreter; with a row mask, the data inputs' leading axes
  that match the mask's shape are its axes."""
  interp = Interpreter(trace, mask=None if row_mask is None else jnp.asarray(row_mask),
                        deferred=deferred)
  if row_mask is not None:
    m = tuple(jnp.shape(row_mask))
    for var in data_vars:
      if tuple(var.aval.shape[:len(m)]) == m:
        interp.tags[var] = tuple(range(len(m))) + (None,) * (len(var.aval.shape) - len(m))
  return interp


class ForwardPart(NamedTuple):
  """The equations of a differentiated jaxpr that compute its primal outputs."""

  constvars: list
  invars: list
  eqns: list
  outvars: list


def forward_part(jaxpr, n_primal: int) -> ForwardPart:
  """The equations the first ``n_primal`` outputs depend on, in order.

  In ``make_jaxpr(value_and_grad(f))`` these are ``f``'s forward pass; the
  backward pass only feeds the gradient outputs.
  """
  live = {v for v in jaxpr.outvars[:n_primal] if isinstance(v, jc.Var)}
  eqns = []
  for eqn in reversed(jaxpr.eqns):
    if any(v in live for v in eqn.outvars):
      eqns.append(eqn)
      live.update(v for v in eqn.invars if isinstance(v, jc.Var))
  return ForwardPart(jaxpr.constvars, jaxpr.invars, eqns[::-1], jaxpr.outvars[:n_primal])

