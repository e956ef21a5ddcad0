"""The walker: goes through a jaxpr equation by equation, applying ``rules.TABLE``.

One walker, two modes that differ in three methods only:

* ``Interpreter`` evaluates: it binds every equation on real inputs (arrays
  or tracers, so gradients flow as usual), computes each statistic on the
  spot and rebuilds higher-order primitives around child walkers.
* ``Reader`` (the fast route) binds nothing: it walks the forward part of a
  jaxpr that JAX has already differentiated, with the jaxpr's own vars as
  values; each statistic waits in ``pending`` until ``resolve`` is given
  the values. It refuses higher-order primitives (``NeedsEvaluation``):
  their statistics can only be computed inside their rebuilt bodies.

Everything per primitive (kinds, statistics, row-mask tags) lives in the
rules, shared by both.
"""

from __future__ import annotations

from typing import NamedTuple, TypeVar

import jax.numpy as jnp

from adaact_optax._src.capture import jax_internals as jc
from adaact_optax._src.capture import rules
from adaact_optax._src.capture.kinds import (CONST, DATA, Gathered, Mixed, NeedsEvaluation,
                                              Unsupported, View, is_data, is_param, opaque)
from adaact_optax._src.capture.row_mask import check_row_mask, propagate_tags
from adaact_optax._src.capture.sums import Contribution, restrict


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

  def __init__(self, trace: Trace, depth: int = 0, mask=None):
    self.trace = trace
    self.depth = depth
    self.contributions: list[Contribution] = []
    # Statistics computed once per (value, key): q, k and v projections of one input.
    self.memo: dict = {}
    # With a row mask: which mask axis each axis of an activation is (by Var).
    self.mask = mask
    self.tags: dict = {}

  # -- what the two modes do differently ---------------------------------------
  def bind(self, eqn, invals):
    """The equation's outputs on ``invals``."""
    return jc.bind(eqn, invals)

  def stat(self, view: View, fn, value, lookup=False, key=None):
    """Records ``fn(value) -> (sums, counts)`` for ``view``.

    ``key`` names what ``fn`` computes from ``value``: statistics with the
    same value and key are computed once.
    """
    sums, counts = self._computed(fn, value, key)
    self._record(view, sums, counts, lookup=lookup)

  def check_nested(self, name: str):
    """Called before a higher-order primitive's rule (the reader refuses)."""

  # ---------------------------------------------------------------------------
  def child(self, depth: int, mask) -> Interpreter:
    """A walker for a nested jaxpr (a ``scan``/``while``/``cond`` body...)."""
    return Interpreter(self.trace, depth, mask=mask)

  def _computed(self, fn, value, key):
    if key is None:
      return fn(value)
    # Arrays and tracers are not hashable: key by identity, keeping the value
    # alive so that its id is not reused.
    memo_key = (id(value), key)
    if memo_key not in self.memo:
      self.memo[memo_key] = (value, fn(value))
    return self.memo[memo_key][1]

  def _record(self, view: View, sums, counts, lookup=False):
    for piece in view.pieces:
      try:
        s, c = restrict(piece, view.shape, sums, counts)
      except Unsupported as e:
        self.trace.miss({piece.param}, str(e))
        continue
      self.contributions.append(Contribution(piece, s, c, lookup))

  def adopt(self, contributions, arrays):
    for c, (s, n) in zip(contributions, arrays):
      self.contributions.append(c._replace(sums=s, counts=n))

  def tag(self, atom):
    return None if jc.is_literal(atom) else self.tags.get(atom)

  def copy_tags(self, src_vars, dst_vars, source=None):
    source = self if source is None else source
    if self.mask is None:
      return
    for s_, d in zip(src_vars, dst_vars):
      t = source.tag(s_)
      if t is not None and not jc.is_dropvar(d):
        self.tags[d] = t

  def set_tags(self, outvars, tags):
    if self.mask is None:
      return
    for var, t in zip(outvars, tags):
      if t is not None and not jc.is_dropvar(var):
        self.tags[var] = t

  # -- entry point ------------------------------------------------------------
  def run(self, jaxpr, consts, args, kinds):
    # mm: the values that are captured contractions' outputs -> their marker (True,
    # or kinds.GATHERED_OUTPUT for a contraction whose weight is gathered slices).
    env, kenv, mm = {}, {}, {}

    def read(atom):
      if jc.is_literal(atom):
        return jc.literal_value(atom), CONST
      return env[atom], kenv[atom]

    def write(var, val, kind, is_mm=False):
      if jc.is_dropvar(var):
        return
      env[var], kenv[var] = val, kind
      if is_mm:
        mm[var] = is_mm

    for v, c in zip(jaxpr.constvars, consts):
      write(v, c, CONST)
    for v, a, k in zip(jaxpr.invars, args, kinds):
      write(v, a, k)
    for eqn in jaxpr.eqns:
      pairs = [read(v) for v in eqn.invars]
      invals = [p[0] for p in pairs]
      inkinds = [p[1] for p in pairs]
      in_mm = [False if jc.is_literal(v) else mm.get(v, False) for v in eqn.invars]
      rule = rules.rule_for(eqn.primitive.name)
      outvals, outkinds, out_mm = self.eqn(rule, eqn, invals, inkinds, in_mm)
      for var, val, kind, m in zip(eqn.outvars, outvals, outkinds, out_mm):
        write(var, val, kind, m)
      if self.mask is not None and not jc.has_subjaxpr(eqn):
        propagate_tags(eqn, self.tags, rule.tags)
    outs = [read(v) for v in jaxpr.outvars]
    out_mm = [False if jc.is_literal(v) else mm.get(v, False) for v in jaxpr.outvars]
    return [o[0] for o in outs], [o[1] for o in outs], out_mm

  # -- one equation -----------------------------------------------------------
  def eqn(self, rule: rules.Rule, eqn, invals, inkinds, in_mm):
    n_out = len(eqn.outvars)
    gathered = any(isinstance(k, Gathered) for k in inkinds)
    if gathered and rule.gathered is not None:
      done = rule.gathered(self, eqn, invals, inkinds, in_mm)
      if done is not None:
        return done
    if not any(is_param(k) for k in inkinds) and (
        not rule.sees_mixed or not any(isinstance(k, Mixed) for k in inkinds)) and (
        not gathered or not contracts_inside(eqn)):
      outs = self.bind(eqn, invals)
      if rule.data_out or jc.has_subjaxpr(eqn):
        kind = DATA if any(is_data(k) for k in inkinds) else CONST
      else:
        kind = opaque(inkinds, f"`{eqn.primitive.name}`")
      return outs, [kind] * n_out, [rule.is_contraction_output(in_mm)] * n_out
    if rule.nested:
      self.check_nested(eqn.primitive.name)
      return rule.apply(self, eqn, invals, inkinds, in_mm)
    outs = self.bind(eqn, invals)
    kinds, out_mm = rule.apply(self, eqn, invals, inkinds, in_mm)
    return outs, kinds, out_mm


class Reader(Interpreter):
  """Walks an already differentiated jaxpr without binding anything.

  Values are the jaxpr's own vars; each statistic waits in ``pending`` for
  the value it is computed from (see ``resolve``).
  """

  def __init__(self, trace: Trace, mask=None):
    super().__init__(trace, mask=mask)
    self.pending: list = []

  def bind(self, eqn, invals):
    return list(eqn.outvars)

  def stat(self, view: View, fn, value, lookup=False, key=None):
    self.pending.append((view, fn, value, lookup, key))

  def check_nested(self, name: str):
    raise NeedsEvaluation(name)

  def resolve(self, env: dict):
    """Computes the pending statistics; ``env`` maps the jaxpr's vars to values."""
    fetch = lambda v: env[v] if isinstance(v, jc.Var) else v
    for view, fn, value, lookup, key in self.pending:
      # A tuple value: several operands (a gathered weight's input and indices).
      value = tuple(map(fetch, value)) if isinstance(value, tuple) else fetch(value)
      sums, counts = self._computed(fn, value, key)
      self._record(view, sums, counts, lookup=lookup)
    self.pending = []


def contracts_inside(eqn) -> bool:
  """Whether a higher-order primitive's body has a contraction anywhere (gathered
  slices passed in may be a weight there; ``relu``'s or ``clip``'s body has none,
  and is bound as is)."""
  todo = jc.sub_jaxprs(eqn)
  while todo:
    for e in todo.pop().eqns:
      if e.primitive.name in (rules.DOT, rules.CONV):
        return True
      todo.extend(jc.sub_jaxprs(e))
  return False


Walker = TypeVar("Walker", bound=Interpreter)


def top_interpreter(trace: Trace, row_mask, data_vars, walker: type[Walker]) -> Walker:
  """The top-level ``walker`` (``Interpreter`` or ``Reader``); with a row mask,
  the data inputs' leading axes that match the mask's shape are its axes (a
  ValueError if none do)."""
  interp = walker(trace, mask=None if row_mask is None else jnp.asarray(row_mask))
  if row_mask is not None:
    m = tuple(jnp.shape(row_mask))
    check_row_mask(m, [var.aval.shape for var in data_vars])
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
