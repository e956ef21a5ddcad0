"""Why AdaAct trails AdamW on the byte-level LM: ``python -m examples.lm.diagnosis --help``.

Trains the docs' byte-level LM (``examples.lm.train``: ``ByteGPT`` dim 64, depth 2,
4 heads, MLP 256, context 64, batch 16, tied; 1000 steps, 5 % warmup then
cosine) with a few optimizer variants and measures, per weight matrix with
AdaAct statistics:

- how non-uniform AdaAct's scaling is: the coefficient of variation and
  max/min of ``sqrt(V_hat)`` across the matrix's input features, at the end
  of the ``adaact-adam`` run (``adaact_optax.scaling_summary``);
- where AdamW's second moment varies: the share of the variance of
  ``log(nu)`` that lies along the output features (the variance of its means
  over the input features) and along the input features, at the end of the
  AdamW run (the rest is interaction);
- the update RMS of AdaAct relative to AdamW's: the mean over the steps of
  each run's per-matrix update RMS (learning rate and weight decay included).

and the final validation bits/byte of each variant:

- ``adaact-adam``: the recommended configuration (docs/lm.md), lr 0.9;
- ``+clip``: ``optax.clip_by_global_norm(1.0)`` before the optimizer;
- ``power 1``: ``V_hat**1`` instead of ``sqrt(V_hat)`` (same lr);
- ``wd 0``: AdaAct's weight decay 0 (the AdamW of the parameters without
  statistics keeps its 0.1);
- ``adamw`` at 3e-3 (its 1000-step choice in docs/lm.md), ``adamw +clip``;
- ``act+rownorm`` and its control ``rownorm``: momentum over a row-normalised
  gradient on the matrices (per output feature, the gradient is divided by the
  square root of an EMA of its mean square over the input features, an Adam
  second moment shared along each output feature), with (``act+``) and without
  AdaAct's activation scaling ``scale_by_activation_rms`` before it; at AdamW's
  lr 3e-3 and weight decay 0.01; the parameters without statistics get the
  same AdamW as ``adaact-adam``. Not tuned: a probe of where the gap comes
  from, not a proposal.

Writes ``OUT_DIR/diagnosis.md`` (the tables) and ``OUT_DIR/diagnosis.json``.
The batches, initialisation and evaluation windows are ``examples.lm.train``'s for
the same seed.

Example::

  python -m examples.lm.diagnosis --out-dir runs/lm_diagnosis
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import sys
import time
from typing import Any, NamedTuple

if __package__ in (None, ""):  # `python examples/lm/diagnosis.py`
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adaact_optax
from adaact_optax import linen as aa_linen
from examples import optimizers
from examples.lm import input_pipeline
from examples.lm import models
from examples.lm import train

ADAACT_LR = 0.9       # adaact-adam's 1000-step choice (docs/lm.md)
ADAMW_LR = 3e-3       # AdamW's 1000-step choice
ROWNORM_WD = 0.01     # AdamW's published weight decay, for the row-normalised variants


@dataclasses.dataclass(frozen=True)
class Variant:
  """One ablation row: ``optimizer`` is an ``examples.optimizers`` name or ``rownorm``."""

  label: str
  optimizer: str
  lr: float
  clip: float | None = None
  power: float = 0.5
  weight_decay: float | None = None   # None: the optimizer's default
  activation_scaling: bool = False    # rownorm only


VARIANTS = (
    Variant("adaact-adam", "adaact-adam", ADAACT_LR),
    Variant("adaact-adam +clip", "adaact-adam", ADAACT_LR, clip=1.0),
    Variant("adaact-adam power 1", "adaact-adam", ADAACT_LR, power=1.0),
    Variant("adaact-adam wd 0", "adaact-adam", ADAACT_LR, weight_decay=0.0),
    Variant("adamw", "adamw", ADAMW_LR),
    Variant("adamw +clip", "adamw", ADAMW_LR, clip=1.0),
    Variant("act+rownorm", "rownorm", ADAMW_LR, weight_decay=ROWNORM_WD, activation_scaling=True),
    Variant("rownorm", "rownorm", ADAMW_LR, weight_decay=ROWNORM_WD),
)


def _name(path) -> str:
  """A key path as ``'CausalBlock_0/Dense_1/kernel'``."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


# --- the row (output-side) normaliser -------------------------------------------------------


class ScaleByRowRMSState(NamedTuple):
  count: jax.Array
  nu: optax.Updates   # per parameter: its shape with the input axes reduced to 1


def scale_by_row_rms(input_axes: dict[str, tuple[int, ...]], b2: float = 0.999,
                     eps: float = 1e-8) -> optax.GradientTransformation:
  """Divides each update by ``sqrt(R_hat) + eps``, ``R`` an EMA of its mean square over
  ``input_axes[path]`` (one value per output feature; no axes: per element, as Adam)."""

  def axes(path):
    return input_axes.get(_name(path), ())

  def init_fn(params):
    nu = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.zeros([1 if i in axes(p) else n for i, n in enumerate(x.shape)],
                               jnp.float32), params)
    return ScaleByRowRMSState(jnp.zeros([], jnp.int32), nu)

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    bc = 1 - b2 ** count.astype(jnp.float32)

    def leaf(path, u, v):
      v = b2 * v + (1 - b2) * jnp.mean(jnp.square(u), axis=axes(path), keepdims=True)
      return u / (jnp.sqrt(v / bc) + eps), v

    results = jax.tree_util.tree_map_with_path(leaf, updates, state.nu)
    is_pair = lambda x: isinstance(x, tuple) and len(x) == 2 and not hasattr(x, "_fields")
    new_updates = jax.tree.map(lambda r: r[0], results, is_leaf=is_pair)
    nu = jax.tree.map(lambda r: r[1], results, is_leaf=is_pair)
    return new_updates, ScaleByRowRMSState(count, nu)

  return optax.GradientTransformation(init_fn, update_fn)


# --- per-matrix axes and names --------------------------------------------------------------


def input_axes_of(params, stats_shapes) -> dict[str, tuple[int, ...]]:
  """``{path: input axes}`` of every parameter with AdaAct statistics: the axes along which
  its keep-rank statistic has the parameter's size (the rest are output axes)."""
  stats = {_name(p): s
           for p, s in jax.tree.leaves_with_path(stats_shapes)}
  out = {}
  for path, p in jax.tree.leaves_with_path(params):
    name = _name(path)
    if name in stats and not adaact_optax.layout.is_uncaptured(stats[name]):
      shape = adaact_optax.layout.keep_rank_shape(tuple(stats[name].shape), p.shape, name)
      out[name] = tuple(i for i, (s, n) in enumerate(zip(shape, p.shape)) if s == n and n > 1)
  return out


_SHORT = {"MultiHeadDotProductAttention_0/query": "query",
          "MultiHeadDotProductAttention_0/key": "key",
          "MultiHeadDotProductAttention_0/value": "value",
          "MultiHeadDotProductAttention_0/out": "attn out", "Dense_1": "mlp in",
          "Dense_0": "mlp out"}
_FED_BY = {"query": "LayerNorm", "key": "LayerNorm", "value": "LayerNorm",
           "attn out": "attention", "mlp in": "LayerNorm", "mlp out": "GELU",
           "embed (tied)": "LayerNorm"}


def short_name(path: str) -> str:
  """``CausalBlock_0/Dense_1/kernel`` -> ``0 mlp in``; ``embed/embedding`` -> ``embed (tied)``."""
  if path == "embed/embedding":
    return "embed (tied)"
  block, rest = path.split("/", 1)
  return f"{block.removeprefix('CausalBlock_')} {_SHORT[rest.removesuffix('/kernel')]}"


def log_variance_shares(nu: np.ndarray, input_axes: tuple[int, ...]) -> tuple[float, float]:
  """Shares of ``var(log nu)`` along the output and the input features.

  ``nu`` viewed as a matrix (input features x output features): the output
  share is the variance of its column means (means over the input features)
  over the total, the input share that of its row means; 1 minus both is the
  interaction.
  """
  out_axes = [i for i in range(nu.ndim) if i not in input_axes]
  log = np.log(np.maximum(np.asarray(nu, np.float64), np.finfo(np.float32).tiny))
  matrix = np.transpose(log, list(input_axes) + out_axes).reshape(
      int(np.prod([nu.shape[i] for i in input_axes])), -1)
  total = matrix.var()
  return float(matrix.mean(0).var() / total), float(matrix.mean(1).var() / total)


# --- training -------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _model(context, dim, depth, heads, mlp_dim):
  model = models.ByteGPT(context=context, dim=dim, depth=depth, heads=heads, mlp_dim=mlp_dim)
  x = jnp.zeros((1, context), jnp.int32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  stats_shapes = optimizers.abstract_stats_shapes(model, variables, x)
  return model, stats_shapes


def build_tx(v: Variant, unit, params, stats_shapes) -> optax.GradientTransformationExtraArgs:
  """The optimizer of ``v`` with ``unit`` (the peak-1 schedule) times ``v.lr``."""
  if v.optimizer == "rownorm":
    chain = [adaact_optax.scale_by_activation_rms(stats_shapes=stats_shapes)] \
        if v.activation_scaling else []
    chain += [scale_by_row_rms(input_axes_of(params, stats_shapes)),
              optax.ema(optimizers.DEFAULTS["adamw"]["b1"], debias=True),
              optax.add_decayed_weights(v.weight_decay),
              optax.scale_by_learning_rate(lambda t: v.lr * unit(t))]
    defaults = optimizers.DEFAULTS["adaact-adam"]
    other = optax.adamw(lambda t: unit(t) * defaults["unmatched_lr"],
                        weight_decay=defaults["unmatched_weight_decay"])
    tx = optimizers.adaact_with_unmatched_optimizer(optax.chain(*chain), other, stats_shapes)
  else:
    overrides = {"weight_decay": v.weight_decay}
    hyper = lambda name: (overrides[name] if overrides.get(name) is not None
                          else optimizers.DEFAULTS[v.optimizer].get(name))
    tx = optimizers.build(v.optimizer, unit, hyper, power=v.power, stats_shapes=stats_shapes,
                          peak=optax.scale(v.lr))
  if v.clip is not None:
    tx = optax.chain(optax.clip_by_global_norm(v.clip), tx)
  return optax.with_extra_args_support(tx)


def run_variant(v: Variant, a, seed: int) -> dict[str, Any]:
  """Trains ``v`` for ``a.steps`` steps; returns the final bits/byte, the mean update RMS of
  each parameter, and (AdaAct) the final ``scaling_summary`` or (AdamW) the log-variance
  shares of its second moment."""
  corpus, parts = train.corpus_and_splits(None, a.corpus_mb)
  model, stats_shapes = _model(a.context, a.dim, a.depth, a.heads, a.mlp_dim)
  x0 = jnp.zeros((1, a.context), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(seed), x0)["params"]
  unit = optimizers.make_unit_schedule("cosine", a.steps, a.steps // 20)
  tx = build_tx(v, unit, params, stats_shapes)
  opt_state = tx.init(params)
  captures = v.optimizer in optimizers.ADAACT_VARIANTS or v.activation_scaling
  reports_scaling = v.optimizer in optimizers.ADAACT_VARIANTS
  power = v.power

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      if captures:
        logits, mutated = aa_linen.apply(model, {"params": p}, x)
        stats = mutated[aa_linen.COLLECTION]
      else:
        logits, stats = model.apply({"params": p}, x), None
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), stats

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params, activation_stats=stats)
    rms = {_name(p): jnp.sqrt(jnp.mean(jnp.square(u)))
           for p, u in jax.tree.leaves_with_path(updates)}
    return optax.apply_updates(params, updates), opt_state, loss, rms

  _, eval_step = train.make_steps(model, False, False)
  rng = np.random.default_rng(seed)      # examples.lm.train's batches for this seed
  history, losses = [], []
  for i in range(a.steps):
    x, y = input_pipeline.random_windows(rng, parts["train"], a.batch_size, a.context)
    params, opt_state, loss, rms = step(params, opt_state, x, y)
    losses.append(loss)
    history.append(rms)
    if i == 0:   # the first step compiles
      loss.block_until_ready()
      start = time.perf_counter()
  history = jax.device_get(history)
  step_ms = 1e3 * (time.perf_counter() - start) / max(a.steps - 1, 1)
  val_x, val_y = input_pipeline.eval_windows(parts["validation"], a.context, a.eval_windows)
  out = dict(label=v.label, seed=seed, step_ms=step_ms,
             val_bpb=train.bits_per_byte(eval_step, params, val_x, val_y),
             train_bpb=float(np.mean(jax.device_get(losses[-max(1, a.steps // 10):]))) / train.LN2,
             update_rms={k: float(np.mean([h[k] for h in history])) for k in history[0]})
  if reports_scaling:
    summary = adaact_optax.scaling_summary(opt_state, power=power)
    out["scaling"] = {k: float(s) for k, s in summary.items()}
  if v.optimizer == "adamw" and v.clip is None:
    adam = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(
        s, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)][0]
    nus = {_name(p): n
           for p, n in jax.tree.leaves_with_path(adam.nu)}
    out["adam_log_variance"] = {
        name: dict(zip(("output", "input"), log_variance_shares(np.asarray(nus[name]), ax)))
        for name, ax in input_axes_of(params, stats_shapes).items() if ax}
  out["corpus_sha256"] = corpus.sha256
  return out


# --- tables ---------------------------------------------------------------------------------


def layer_table(results: dict[str, list[dict]]) -> str:
  """Per matrix: CV and max/min of sqrt(V_hat) (adaact-adam, seeds' mean), AdamW's
  log-variance shares, and the update RMS ratio adaact-adam / AdamW."""
  ada, adamw = results["adaact-adam"], results["adamw"]
  mean = lambda runs, f: float(np.mean([f(r) for r in runs]))
  names = [k.removesuffix("/denom_cv") for k in ada[0]["scaling"] if k.endswith("/denom_cv")]
  kinds = list(_SHORT.values())
  order = lambda n: ((1, 0, 0) if n.startswith("embed") else
                     (0, n.split("/")[0], kinds.index(short_name(n).split(" ", 1)[1])))
  lines = ["| matrix | input from | CV of √V̂ | max/min | AdamW log-var out / in "
           "| update RMS ÷ AdamW |", "|---|---|---|---|---|---|"]
  for name in sorted(names, key=order):
    short = short_name(name)
    cv = mean(ada, lambda r: r["scaling"][f"{name}/denom_cv"])
    ratio = mean(ada, lambda r: r["scaling"][f"{name}/denom_max_over_min"])
    out_share = mean(adamw, lambda r: r["adam_log_variance"][name]["output"])
    in_share = mean(adamw, lambda r: r["adam_log_variance"][name]["input"])
    rms = mean(ada, lambda r: r["update_rms"][name]) / mean(adamw, lambda r: r["update_rms"][name])
    fed_by = _FED_BY[short.split(" ", 1)[1] if short[0].isdigit() else short]
    lines.append(f"| {short} | {fed_by} "
                 f"| {cv:.2f} | {ratio:.1f} | {100 * out_share:.0f} % / {100 * in_share:.0f} % "
                 f"| {rms:.2f} |")
  return "\n".join(lines)


def ablation_table(results: dict[str, list[dict]]) -> str:
  lines = ["| variant | lr | val bits/byte | train bits/byte |", "|---|---|---|---|"]
  for label, runs in results.items():
    val = [r["val_bpb"] for r in runs]
    tr = [r["train_bpb"] for r in runs]
    spread = f" ± {np.std(val, ddof=1):.3f}" if len(val) > 1 else ""
    lr = next(v.lr for v in VARIANTS if v.label == label)
    lines.append(f"| {label} | {lr:g} | {np.mean(val):.3f}{spread} | {np.mean(tr):.3f} |")
  return "\n".join(lines)


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m examples.lm.diagnosis",
                              description=__doc__.split("\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--variants", default=",".join(v.label for v in VARIANTS),
                 help="comma-separated labels (adaact-adam and adamw are needed for the "
                 "per-matrix table)")
  p.add_argument("--seeds", type=int, default=1)
  p.add_argument("--steps", type=int, default=1000)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--context", type=int, default=64)
  p.add_argument("--dim", type=int, default=64)
  p.add_argument("--depth", type=int, default=2)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--mlp-dim", type=int, default=256)
  p.add_argument("--corpus-mb", type=float, default=input_pipeline.DEFAULT_MB)
  p.add_argument("--eval-windows", type=int, default=256)
  p.add_argument("--out-dir", default="runs/lm_diagnosis")
  a = p.parse_args(argv)
  known = {v.label for v in VARIANTS}
  a.variants = [s.strip() for s in a.variants.split(",") if s.strip()]
  unknown = [s for s in a.variants if s not in known]
  if unknown:
    p.error(f"unknown variants {unknown}; choose from {sorted(known)}")
  return a


def main(argv=None) -> dict:
  a = parse_args(argv)
  out = pathlib.Path(a.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  corpus, _ = train.corpus_and_splits(None, a.corpus_mb)
  print(f"corpus: {corpus.describe()}", flush=True)
  results: dict[str, list[dict]] = {}
  for label in a.variants:
    v = next(v for v in VARIANTS if v.label == label)
    for seed in range(a.seeds):
      r = run_variant(v, a, seed)
      results.setdefault(label, []).append(r)
      print(f"[{label}] seed {seed}: val {r['val_bpb']:.4f} bits/byte, train "
            f"{r['train_bpb']:.4f} ({r['step_ms']:.0f} ms/step)", flush=True)
      (out / "diagnosis.json").write_text(json.dumps(results, indent=1))
  text = [f"byte LM: dim {a.dim}, depth {a.depth}, heads {a.heads}, mlp {a.mlp_dim}, context "
          f"{a.context}, batch {a.batch_size}, {a.steps} steps, {a.seeds} seed(s); "
          f"corpus sha256 {corpus.sha256[:16]}...", ""]
  if "adaact-adam" in results and "adamw" in results:
    text += [layer_table(results), ""]
  text.append(ablation_table(results))
  (out / "diagnosis.md").write_text("\n".join(text) + "\n")
  print("\n".join(text))
  return results


if __name__ == "__main__":
  main()
