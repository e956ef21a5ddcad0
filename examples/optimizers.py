"""The optimizers the examples compare, each with its published defaults.

``build(name, unit, hyper, ...)`` returns the optimizer ``name`` driven by
``unit`` (a peak-1 schedule, ``make_unit_schedule``); the examples chain it
with an injected ``optax.scale`` so the peak learning rate lives in the state
(``set_learning_rate``; ``examples.images.train.make_optimizer``): one
compiled step serves a whole learning-rate grid and every seed.
``abstract_stats_shapes`` sizes AdaAct's state without running the model.
Shared by ``examples.images`` and ``examples.lm`` (and ``tools.compare``).

AdaAct comes in the variants the language-model study compares:

* ``adaact``: the authors' rule, parameters without statistics (norm scales,
  position embeddings, untied embeddings) take the raw gradient
  (``unmatched="sgd"``), inside AdaAct's learning rate and weight decay;
* ``adaact-momentum``: those parameters take AdaAct's momentum ``M_hat``;
* ``adaact-adam``: those parameters get their own complete optimizer,
  ``optax.adamw(3e-3, weight_decay=0.1)`` under the same schedule; AdaAct's
  learning rate and weight decay then apply to the parameters with
  statistics only.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from optax import tree_utils as otu

import adaact_optax
from adaact_optax import linen as aa_linen

ADAACT_VARIANTS = ("adaact", "adaact-momentum", "adaact-adam")
OPTIMIZERS = ADAACT_VARIANTS + ("sgd", "adam", "adamw", "adan", "lamb", "adafactor", "muon")

# Published defaults, used as the centre of every learning-rate grid:
# AdaAct (arXiv 2506.08353); SGD momentum 0.9 with coupled decay 5e-4 (the
# paper's baseline); PyTorch's Adam / AdamW; Adan (Xie et al. 2022, its
# GPT-2 and ViT recipes: lr 1e-3 ... 1.5e-2, b = 0.98/0.92/0.99, decay 0.02);
# LAMB (You et al. 2019: b2 0.999, eps 1e-6, decay 0.01); Adafactor
# (Shazeer & Stern 2018: relative step 1e-2, decay 0.8, clipping 1.0);
# Muon (Jordan et al. 2024: lr 0.02, momentum 0.95, Nesterov, Adam at 3e-4
# on the parameters that are not matrices).
DEFAULTS = {
    "adaact": dict(lr=0.1, b1=0.9, b2=0.999, eps=1e-8, weight_decay=2e-3),
    "adaact-momentum": dict(lr=0.1, b1=0.9, b2=0.999, eps=1e-8, weight_decay=2e-3),
    "adaact-adam": dict(lr=0.1, b1=0.9, b2=0.999, eps=1e-8, weight_decay=2e-3,
                        unmatched_lr=3e-3, unmatched_weight_decay=0.1),
    "sgd": dict(lr=0.1, momentum=0.9, weight_decay=5e-4),
    "adam": dict(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0),
    "adamw": dict(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2),
    "adan": dict(lr=1e-3, b1=0.98, b2=0.92, b3=0.99, eps=1e-8, weight_decay=0.02),
    "lamb": dict(lr=1e-3, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.01),
    "adafactor": dict(lr=1e-2, decay_rate=0.8, clipping_threshold=1.0, weight_decay=0.0),
    "muon": dict(lr=0.02, momentum=0.95, weight_decay=0.0, adam_lr=3e-4),
}


def make_unit_schedule(schedule: str, total_steps: int, warmup_steps: int = 0) -> optax.Schedule:
  """The learning-rate schedule with peak 1: ``"cosine"`` (after a linear
  warmup of ``warmup_steps``) or ``"constant"``."""
  if schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0 if warmup_steps else 1.0, 1.0, warmup_steps,
                                              max(total_steps, warmup_steps + 1))
  if schedule == "constant":
    return optax.constant_schedule(1.0)
  raise ValueError(f"unknown schedule {schedule!r}; choose 'cosine' or 'constant'")


def set_learning_rate(opt_state, lr: float):
  """The state with its peak learning rate (``step_size``) set to ``lr``."""
  return otu.tree_set(opt_state, step_size=jnp.asarray(lr, jnp.float32))


def abstract_stats_shapes(model, variables, *args, **kwargs):
  """``adaact_optax.linen.stats_shapes`` for abstract ``variables`` (``jax.eval_shape``
  of ``model.init``): the statistics tree's shapes without running anything."""
  return jax.eval_shape(lambda v: aa_linen.stats_shapes(model, v, *args, **kwargs), variables)


def matched_labels(params, stats_shapes) -> Any:
  """``"adaact"`` for each parameter with statistics in ``stats_shapes``, else ``"unmatched"``.

  ``stats_shapes``: the tree ``adaact_optax.linen.stats_shapes`` reports,
  matched to ``params`` by path name; a missing leaf, ``None`` or the
  zero-size uncaptured marker ``(0,)`` means no statistics
  (``adaact_optax.layout.with_statistics``).
  """
  return jax.tree.map(lambda has: "adaact" if has else "unmatched",
                      adaact_optax.layout.with_statistics(params, stats_shapes))


def adaact_with_unmatched_optimizer(adaact_tx, unmatched_tx, stats_shapes):
  """AdaAct on the parameters with statistics, ``unmatched_tx`` on the rest.

  Composes ``optax.partition`` with ``adaact_optax.layout.with_statistics``
  (``matched_labels``): ``adaact_tx`` updates the parameters that have
  statistics in ``stats_shapes``, ``unmatched_tx`` the others, as given (its
  own learning rate, schedule and weight decay; its state covers the
  unmatched parameters only).

  It is the ``optax.partition`` that ``adaact(..., unmatched=<optax
  transformation>)`` builds: given ``adaact_tx = adaact(lr, ...)`` the two are
  bit-identical (tests/end_to_end/test_lm.py), except that on a step whose
  statistics are not finite that ``adaact`` skips ``unmatched_tx``'s step too
  and this partition skips AdaAct's branch only. That ``adaact`` already gives
  each branch its own learning rate; it is not used here because the
  examples' runtime peak learning rate (an injected ``optax.scale``,
  ``build``'s ``peak``) must scale AdaAct's branch alone: ``adaact_tx``
  arrives with the peak chained, so one compiled step serves a whole
  learning-rate grid while ``unmatched_tx`` keeps its own rate.
  """
  return optax.partition({"adaact": adaact_tx, "unmatched": unmatched_tx},
                         lambda params: matched_labels(params, stats_shapes))


def muon_dimension_numbers(params) -> Any:
  """Muon's view of each weight as a matrix, ``None`` (Adam) for the rest.

  Kernels (Dense ``(in, out)``, conv ``(*k, C, O)``, attention output
  ``(heads, head_dim, out)``) contract every axis but the last; attention
  query/key/value kernels ``(in, heads, head_dim)`` contract the first.
  Embedding tables, position embeddings, norm scales and biases use Adam.
  """
  def dims(path, p):
    names = jax.tree_util.keystr(path, simple=True, separator='/').split('/')
    if names[-1] != "kernel" or p.ndim < 2:
      return None
    if len(names) > 1 and names[-2] in ("query", "key", "value"):
      return optax.contrib.MuonDimensionNumbers(0, tuple(range(1, p.ndim)))
    return optax.contrib.MuonDimensionNumbers(tuple(range(p.ndim - 1)), p.ndim - 1)

  return jax.tree_util.tree_map_with_path(dims, params)


def build(name: str, unit: optax.Schedule, hyper: Callable[[str], Any], *,
          power: float = 0.5, stats_shapes: Any | None = None,
          peak: optax.GradientTransformation | None = None) -> optax.GradientTransformation:
  """The optimizer ``name`` on the schedule ``unit``, followed by ``peak``.

  Args:
    name: one of ``OPTIMIZERS``.
    unit: the learning-rate schedule with peak 1.
    peak: the transformation that multiplies the updates by the peak learning
      rate (the examples inject ``optax.scale(step_size)``); ``None``: none.
      For ``adaact-adam`` it scales AdaAct's branch only: the AdamW of the
      unmatched parameters keeps its own rate (``unmatched_lr``). Muon's
      Adam part moves with the peak, at the published ratio
      ``adam_lr / lr`` (3e-4 / 0.02).
    hyper: ``hyper(field)`` gives a hyperparameter (the run's override or
      ``DEFAULTS[name][field]``).
    power: AdaAct's exponent.
    stats_shapes: the statistics tree's shapes
      (``adaact_optax.linen.stats_shapes``); required by ``adaact-adam``.

  Raises:
    ValueError: unknown ``name``, or ``adaact-adam`` without ``stats_shapes``.
  """
  if name not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")
  with_peak = lambda tx: tx if peak is None else optax.chain(tx, peak)
  wd = hyper("weight_decay")
  if name in ADAACT_VARIANTS:
    unmatched = "momentum" if name == "adaact-momentum" else "sgd"
    tx = adaact_optax.adaact(unit, hyper("b1"), hyper("b2"), hyper("eps"), wd, power=power,
                             unmatched=unmatched, stats_shapes=stats_shapes)
    if name == "adaact-adam":
      if stats_shapes is None:
        raise ValueError("adaact-adam needs stats_shapes (adaact_optax.linen.stats_shapes) "
                         "to know which parameters have statistics")
      other = optax.adamw(lambda t: unit(t) * hyper("unmatched_lr"),
                          weight_decay=hyper("unmatched_weight_decay"))
      return adaact_with_unmatched_optimizer(with_peak(tx), other, stats_shapes)
    return with_peak(tx)
  return with_peak(_baseline(name, unit, hyper, wd))


def _baseline(name, unit, hyper, wd):
  if name == "sgd":   # PyTorch-style coupled L2: decay joins the gradient
    return optax.chain(optax.add_decayed_weights(wd), optax.sgd(unit, momentum=hyper("momentum")))
  if name == "adam":
    return optax.chain(optax.add_decayed_weights(wd),
                       optax.adam(unit, hyper("b1"), hyper("b2"), hyper("eps")))
  if name == "adamw":
    return optax.adamw(unit, hyper("b1"), hyper("b2"), hyper("eps"), weight_decay=wd)
  if name == "adan":
    return optax.adan(unit, hyper("b1"), hyper("b2"), hyper("b3"), hyper("eps"), weight_decay=wd)
  if name == "lamb":
    return optax.lamb(unit, hyper("b1"), hyper("b2"), hyper("eps"), weight_decay=wd)
  if name == "adafactor":
    return optax.adafactor(unit, decay_rate=hyper("decay_rate"),
                           clipping_threshold=hyper("clipping_threshold"),
                           weight_decay_rate=wd or None)
  # muon: the Adam part's rate moves with the peak at the published ratio.
  ratio = DEFAULTS["muon"]["adam_lr"] / DEFAULTS["muon"]["lr"]
  return optax.contrib.muon(unit, beta=hyper("momentum"), weight_decay=wd,
                            adam_learning_rate=lambda t: unit(t) * ratio,
                            muon_weight_dimension_numbers=muon_dimension_numbers)
