"""What the capture tells the user: the coverage report and the warnings."""

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


class ArgumentOrderWarning(UserWarning):
  """The loss's first argument looks like data, and its other arguments hold the weights.

  ``value_grad_and_stats``, ``stats_shapes`` and ``coverage`` differentiate
  and capture ``fun``'s first argument as the parameters. Warned (at trace
  time) when an array of the other arguments multiplies, in a
  ``dot_general`` (not batched, leaving an axis of its own) or as a
  convolution's kernel, a value computed from both the first argument and
  the data, as a weight multiplies an activation, while no array of the first
  argument multiplies a computed value so: ``fun(x, params)`` where
  ``fun(params, x)`` was meant (the gradients returned are then with respect
  to ``x``). One matmul of the two arguments alone (``x @ w``) is symmetric
  and not flagged. A separate class from ``UncapturedWeightWarning``: the
  cause and the fix differ, and silencing one must not silence the other.

  Examples:
    >>> import warnings
    >>> import jax.numpy as jnp
    >>> import adaact_optax
    >>> def loss(x, params):   # arguments swapped
    ...   return jnp.mean(jnp.tanh(x @ params["w1"]) @ params["w2"])
    >>> params = {"w1": jnp.ones((3, 4)), "w2": jnp.ones((4, 2))}
    >>> with warnings.catch_warnings(record=True) as caught:
    ...   warnings.simplefilter("always")
    ...   _ = adaact_optax.value_grad_and_stats(loss)(jnp.ones((5, 3)), params)
    >>> caught[0].category.__name__
    'ArgumentOrderWarning'
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



def warn_argument_order(hint: str | None, entry: str):
  """An ``ArgumentOrderWarning`` from ``entry`` when ``hint`` (the evidence of
  ``argument_order.data_as_weight``) is not None."""
  if hint is not None:
    warnings.warn(ArgumentOrderWarning(
        f"adaact_optax.{entry}(fun) differentiates fun's first argument and captures it as "
        f"the parameters, but {hint}. If fun is written fun(x, params), pass "
        "lambda params, x: fun(x, params) (fun(params, *args) is the expected order; the "
        "gradients returned are with respect to the first argument). If the other arguments "
        "hold frozen weights on purpose, silence this with warnings.filterwarnings('ignore', "
        "category=adaact_optax.ArgumentOrderWarning)."), stacklevel=3)
