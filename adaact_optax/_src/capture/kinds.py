"""What the capture engine knows about each jaxpr value: its *kind*.

``DATA`` (depends on the function's non-parameter inputs), ``CONST`` (depends
on nothing), a ``View`` of parameters (reached from them by layout ops only:
``Piece``s of per-axis ``Factor`` maps), ``Opaque`` (derived from parameters
by a non-layout op), ``Mixed`` (an activation combined with parameters) or
``Gathered`` (slices of a parameter picked by run-time indices).
"""

from __future__ import annotations

import dataclasses


# ----------------------------------------------------------------------------
# What the engine knows about each jaxpr value.


class _Data:
  """Depends on the function's non-parameter inputs: an activation."""

  def __repr__(self):
    return "DATA"


class _Const:
  """Depends on neither parameters nor inputs (literals, constants)."""

  def __repr__(self):
    return "CONST"


DATA, CONST = _Data(), _Const()


@dataclasses.dataclass(frozen=True)
class Factor:
  """One row-major component of a value's axis: ``size`` steps of ``stride``
  along parameter axis ``axis`` (``axis == -1``: no parameter axis, a broadcast)."""

  axis: int
  size: int
  stride: int


@dataclasses.dataclass(frozen=True)
class Piece:
  """The part of a value that is a view of one parameter.

  ``bounds`` gives, per value axis, the half-open range this piece covers (the
  whole axis unless the value is a concatenation); ``axes`` the factors of
  each axis over that range; ``offset`` the parameter index at the bounds'
  origin; ``pinned`` the factors of leading parameter axes that enclosing
  ``scan``s iterate over (innermost last).
  """

  param: int
  bounds: tuple
  axes: tuple
  offset: tuple
  pinned: tuple = ()


@dataclasses.dataclass(frozen=True)
class View:
  pieces: tuple
  shape: tuple


@dataclasses.dataclass(frozen=True)
class Opaque:
  """Derived from parameters only, but not by layout ops: ``reason`` names the op."""

  sources: frozenset
  reason: str


@dataclasses.dataclass(frozen=True)
class Mixed:
  """An activation combined elementwise with parameters (a norm's scale, or a
  weight passed in as data and dequantised by a parameter): ``sources`` are
  those parameters, ``reason`` the first op that combined them."""

  sources: frozenset
  reason: str


@dataclasses.dataclass(frozen=True, eq=False)
class Gathered:
  """Whole slices of a parameter picked by indices known only at run time:
  ``experts[ids]`` (routing), ``table[sampled]``, ``lax.dynamic_index_in_dim(W, i)``.

  It is data (an embedding lookup's rows are an activation) everywhere but in a
  ``dot_general`` whose other operand is data and that contracts the slices'
  own (table) axes, as a matmul contracts a weight's input axis: there it is
  the weight, and each use's statistics go to the slice its index picked (see
  ``gathered.gathered_stats``). A contraction over the index axes only
  (attention or pooling over looked-up rows) combines rows: the slices are its
  activation.

  ``table``: the view the slices come from; ``picked``: the table axes the
  indices pick, in index-component order; ``index``: the index values (Vars on
  the fast route) and ``stacked``: whether they are one scalar per picked
  axis (``dynamic_slice``) or one ``(*batch_shape, len(picked))`` array
  (``gather``); ``clips``: out-of-range indices are clamped (else their slice
  is dropped); ``dims``: per axis of this value, ``("index", j)`` (the
  indices' batch axis j), ``("table", t)`` (table axis t) or ``None`` (size
  1), or None when a layout op lost track of them; ``op``: the primitive that
  picked them; ``broken``: why the slices can no longer be told apart (then,
  used as a weight, they are reported uncaptured), else None.
  """

  table: View
  picked: tuple
  index: tuple
  stacked: bool
  batch_shape: tuple
  clips: bool
  dims: tuple | None
  op: str
  broken: str | None = None

  def __repr__(self):
    return f"Gathered({self.op}, picked={self.picked}, broken={self.broken!r})"


class Unsupported(Exception):
  pass


class NeedsEvaluation(Exception):
  """The fast route's ``Reader`` met a parameter inside a higher-order primitive."""


def is_data(kind) -> bool:
  return kind is DATA or isinstance(kind, (Mixed, Gathered))


def is_param(kind) -> bool:
  return isinstance(kind, (View, Opaque))


def param_sources(kinds) -> frozenset:
  out: set = set()
  for k in kinds:
    if isinstance(k, View):
      out.update(p.param for p in k.pieces)
    elif isinstance(k, Opaque):
      out.update(k.sources)
  return frozenset(out)


def opaque(kinds, reason: str):
  """The kind of a non-layout op's result."""
  if any(is_data(k) for k in kinds):
    mixed = [k for k in kinds if isinstance(k, Mixed)]
    sources = param_sources(kinds).union(*(k.sources for k in mixed))
    if not sources:
      return DATA
    if not any(is_param(k) for k in kinds):
      reason = mixed[0].reason
    return Mixed(sources, reason)
  sources = param_sources(kinds)
  if not sources:
    return CONST
  if not any(isinstance(k, View) for k in kinds):
    reason = next(k.reason for k in kinds if isinstance(k, Opaque))
  return Opaque(sources, reason)


def identity_view(param: int, shape) -> View:
  axes = tuple((Factor(a, n, 1),) if n != 1 else () for a, n in enumerate(shape))
  return View((Piece(param, tuple((0, n) for n in shape), axes, (0,) * len(shape)),),
              tuple(shape))


def norm(factors) -> tuple:
  return tuple(f for f in factors if f.size != 1)


def broadcast_factors(n: int) -> tuple:
  return (Factor(-1, n, 0),) if n != 1 else ()


# The contraction-output marker of a contraction whose weight is gathered slices
# (``einsum('bi,bio->bo', x, experts[ids])``): only slices added to such an output are
# a gathered bias (``+ biases[ids]``); added to any other output (a residual stream
# of embedding rows, ``emb + dense(emb)``) they are data.
GATHERED_OUTPUT = "gathered contraction output"
