"""What the capture tells the user: the coverage report and the uncaptured-weight warning."""

from __future__ import annotations

import warnings
from typing import NamedTuple


class UncapturedWeightWarning(UserWarning):
  """A weight multiplies an activation, but AdaAct could not record its statistics.

  Raised (as a warning) at trace time, once per weight and trace, naming the
  parameter's path and the reason. The weight then gets the optimizer's
  ``unmatched`` update; ``adaact(..., unmatched="error")`` turns it into an
  error.

  Examples:
    >>> import warnings
    >>> import jax.numpy as jnp
    >>> import adaact_optax
    >>> def loss(params, x):   # the weight is masked before its matmul: not a layout op
    ...   return jnp.mean(x @ (params["w"] * jnp.tril(jnp.ones((3, 3)))))
    >>> with warnings.catch_warnings(record=True) as caught:
    ...   warnings.simplefilter("always")
    ...   _, _, stats = adaact_optax.value_grad_and_stats(loss)(
    ...       {"w": jnp.ones((3, 3))}, jnp.ones((2, 3)))
    >>> caught[0].category.__name__, stats["w"].shape    # the uncaptured marker
    ('UncapturedWeightWarning', (0,))
  """


class CoverageReport(NamedTuple):
  """Which parameters get AdaAct statistics, from one trace of the model.

  Attributes:
    matched: ``{path: statistics shape}`` for every parameter with statistics.
    unmatched: ``{path: reason}`` for every weight that multiplies an
      activation but whose statistics could not be captured.
    other: paths of parameters that multiply no activation (norm scales,
      lookup-only embedding tables without ``embeddings=True``, ...): they
      get the ``unmatched`` update, silently, as the authors' rule says.

  Examples:
    >>> import jax.numpy as jnp
    >>> from adaact_optax import coverage
    >>> masked = lambda p, x: jnp.sum(x @ (p["w"] * 0.5)) + jnp.sum(x @ p["v"] * p["g"])
    >>> p = {"w": jnp.ones((3, 2)), "v": jnp.ones((3, 2)), "g": jnp.ones(2)}
    >>> coverage(masked, p, jnp.ones((4, 3)))._asdict()
    {'matched': {'v': (3, 1)}, 'unmatched': {'w': 'it passes through `mul`, which is not a layout op, before its `dot_general`'}, 'other': ('g',)}
  """

  matched: dict
  unmatched: dict
  other: tuple

  def __str__(self):
    lines = [f"AdaAct coverage: {len(self.matched)} with statistics, "
             f"{len(self.unmatched)} uncaptured, {len(self.other)} without"]
    lines += [f"  ok    {p}  {s}" for p, s in self.matched.items()]
    lines += [f"  MISS  {p}  {r}" for p, r in self.unmatched.items()]
    lines += [f"  --    {p}" for p in self.other]
    return "\n".join(lines)


def warn_uncaptured(report: CoverageReport, shapes: dict | None = None, skip=()):
  """Emits one ``UncapturedWeightWarning`` per uncaptured weight in ``report``."""
  for path, reason in report.unmatched.items():
    if path in skip:
      continue
    shape = "" if shapes is None or path not in shapes else f" (shape {shapes[path]})"
    warnings.warn(UncapturedWeightWarning(
        f"AdaAct: the weight '{path}'{shape} multiplies an activation, but its "
        f"statistics could not be captured: {reason}. It gets the optimizer's `unmatched` "
        "update (plain SGD by default). Fix: record its input with a sow hatch "
        "(adaact_optax.linen.sow_input / adaact_optax.nnx.sow_input) in a custom layer, "
        "or silence this on purpose with warnings.filterwarnings('ignore', "
        "category=adaact_optax.UncapturedWeightWarning); adaact(..., unmatched='error') "
        "makes it an error."), stacklevel=3)

