"""Argument order: is the differentiated first argument data?

``data_as_weight`` walks the traced loss once more, following which inputs
each value derives from, for ``report.ArgumentOrderWarning``.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

from adaact_optax._src.capture import jax_internals as jc
from adaact_optax._src.capture import rules


class Origin(NamedTuple):
  """What a jaxpr value derives from.

  ``raw``: ``("param", i)`` or ``("data", i)`` for an input moved by layout
  ops only, else None; ``deps``: which of ``"param"``, ``"data"`` it depends on.
  """

  raw: tuple | None
  deps: frozenset


NO_ORIGIN = Origin(None, frozenset())


def _is(origin: Origin, what: str) -> bool:
  return origin.raw is not None and origin.raw[0] == what


def data_as_weight(jaxpr, n_params: int, data_names: Sequence[str]) -> str | None:
  """Evidence that ``fun``'s other arguments hold its weights (see ``ArgumentOrderWarning``).

  ``jaxpr`` (``invars``, ``eqns``, ``outvars``): ``fun`` traced on
  ``n_params`` parameter leaves, then the array arguments named by
  ``data_names``. Follows, through inlined calls, which inputs each value
  derives from. Returns a description of the first contraction where a raw
  data input is the weight on a value computed from parameters and data,
  when no parameter is the weight on a computed value; else None.
  """
  found, real = [], []
  computed: dict[frozenset, Origin] = {}  # deps -> Origin(None, deps): one shared object per dependency set (at most 4)

  def contraction(eqn, origins):
    if eqn.primitive.name == rules.CONV:
      lhs, rhs = origins
      if _is(rhs, "param"):
        real.append(True)
      elif _is(rhs, "data") and "param" in lhs.deps:
        found.append((rhs.raw[1], eqn.invars[1].aval.shape, "as the kernel of a convolution",
                      eqn.invars[0].aval.shape))
      return
    lc, rc, lb, _ = jc.dot_dimensions(eqn)
    if lb:  # batched: a parameter there is a stacked weight (per-expert kernels), else no weight
      if any(_is(o, "param") for o in origins[:2]):
        real.append(True)
      return
    for (w, wc), a in (((1, rc), 0), ((0, lc), 1)):
      wo, ao = origins[w], origins[a]
      if _is(wo, "param") and not _is(ao, "data"):
        real.append(True)
      shape = eqn.invars[w].aval.shape
      own_axis = any(n > 1 for i, n in enumerate(shape) if i not in wc)
      if _is(wo, "data") and own_axis and ao.raw is None and {"param", "data"} <= ao.deps:
        found.append((wo.raw[1], shape, "in a `dot_general`", eqn.invars[a].aval.shape))

  def walk(inner, origins_in):
    env = dict(zip(inner.invars, origins_in))

    def read(v):
      return NO_ORIGIN if jc.is_literal(v) else env.get(v, NO_ORIGIN)

    for eqn in inner.eqns:
      origins = [read(v) for v in eqn.invars]
      deps = frozenset().union(*(o.deps for o in origins))
      name = eqn.primitive.name
      rule = rules.rule_for(name)
      if name in (rules.DOT, rules.CONV):
        contraction(eqn, origins)
      if rule.inlined_body is not None:
        outs = walk(rule.inlined_body(eqn).jaxpr, origins)
      elif rule.moves and origins and not any(o.deps for o in origins[1:]):
        outs = [origins[0]] * len(eqn.outvars)
      else:
        outs = [computed.setdefault(deps, Origin(None, deps))] * len(eqn.outvars)
      env.update(zip(eqn.outvars, outs))
    return [read(v) for v in inner.outvars]

  walk(jaxpr, [Origin(("param", i), frozenset({"param"})) for i in range(n_params)]
       + [Origin(("data", i), frozenset({"data"})) for i in range(len(data_names))])
  if not found or real:
    return None
  index, shape, where, other = found[0]
  return (f"the array {data_names[index]} (shape {tuple(shape)}) of fun's other arguments "
          f"multiplies, {where}, a value of shape {tuple(other)} computed from fun's first "
          "argument and the data, as a weight multiplies an activation, while no array of "
          "the first argument is the weight on a computed value")
