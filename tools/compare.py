"""A fair optimizer comparison you can rerun: ``python -m tools.compare --help``.

For each optimizer (or each AdaAct power with ``--ablate-power``), the
learning rate is chosen the same way (``select_lr``):

1. every learning rate of a small grid (the optimizer's published default
   times ``--grid-factors``) is trained with ``--select-seeds`` seeds (>= 2)
   and scored on a validation split, never on the test set;
2. a learning rate with a diverging run (non-finite loss, or a final train
   loss above the first step's) is disqualified;
3. the best validation mean over the seeds wins; when it is at the grid's
   edge the grid is extended once in that direction (one more factor) and
   the choice is made again; a choice still at the edge is flagged.

``--task image`` (digits, MNIST-1D, CIFAR-10): the selection runs train on
the training set minus a held-out validation split and are scored by
validation accuracy; then every ``--seeds`` seed trains on the full training
set at the chosen rate and is evaluated on the test set.
``--task lm`` (``examples.lm.train``): the standard-library corpus has its own
validation and test text, so the selection runs are the results: the table
reports validation and test bits per byte of the chosen rate's seeds.

Prints (and writes to ``OUT_DIR/results.md``) a markdown table with, per
learning rate, the validation mean and the count of diverged seeds, and
draws ``OUT_DIR/curves.png``. ``--track-variance`` also records, for the
AdaAct runs, each layer's mean and max of ``V_hat`` per epoch and draws
``OUT_DIR/variance.png``. Every epoch (image) or evaluation (lm) of every
run is a line of ``OUT_DIR/metrics.jsonl``.

Examples::

  python -m tools.compare --dataset digits --model cnn --seeds 3 --epochs 20
  python -m tools.compare --task lm --optimizers adamw,adaact,adaact-adam --steps 400
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import time
from typing import Any, Callable

if __package__ in (None, ""):  # `python tools/compare.py`
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import numpy as np

import adaact_optax
from examples import optimizers
from examples.images import input_pipeline as image_data
from examples.images import models
from examples.images import train as image_train
from examples.lm import train as lm_train

POWERS = {"1/6": 1 / 6, "1/4": 1 / 4, "1/3": 1 / 3, "1/2": 1 / 2, "1": 1.0}




@dataclasses.dataclass
class Variant:
  """One row of the table: a label, ``Config`` overrides and its learning-rate grid."""

  label: str
  overrides: dict
  grid: list[float]


@dataclasses.dataclass
class Selection:
  """The learning-rate choice of one variant (``select_lr``).

  Attributes:
    lr: the chosen learning rate; ``None`` when every rate diverged.
    runs: every learning rate tried -> its runs (one summary per seed, each
      with ``score`` (lower is better), ``tiebreak`` and ``diverged``).
    edge: ``"low"``/``"high"`` when the choice is still at that end of the
      grid after the extension, else ``None``.
    extended: the learning rate the extension added, or ``None``.
  """

  lr: float | None
  runs: dict[float, list[dict]]
  edge: str | None = None
  extended: float | None = None


def lr_summary(runs: list[dict]) -> tuple[float | None, int]:
  """``(validation mean, diverged count)`` of one learning rate's seeds; the mean is
  ``None`` (disqualified) when any seed diverged."""
  diverged = sum(bool(r["diverged"]) for r in runs)
  if diverged:
    return None, diverged
  return float(np.mean([r["score"] for r in runs])), 0


def choose_lr(runs: dict[float, list[dict]]) -> tuple[float | None, str | None]:
  """The learning rate with the best (lowest) validation mean among those with no
  diverged seed, ties to the lower mean ``tiebreak``; and ``"low"``/``"high"`` if
  it is the smallest/largest rate tried. ``(None, "low")`` when all diverged:
  the rates below are the ones left to try."""
  lrs = sorted(runs)
  ok = [lr for lr in lrs if lr_summary(runs[lr])[0] is not None]
  if not ok:
    return None, "low"
  best = min(ok, key=lambda lr: (lr_summary(runs[lr])[0],
                                 float(np.mean([r["tiebreak"] for r in runs[lr]]))))
  if len(lrs) > 1 and best == lrs[0]:
    return best, "low"
  if len(lrs) > 1 and best == lrs[-1]:
    return best, "high"
  return best, None


def select_lr(run_fn: Callable[[float, int], dict], grid: list[float], seeds: int) -> Selection:
  """Chooses a learning rate by validation over ``seeds`` seeds per rate.

  ``run_fn(lr, seed)`` trains once and returns a summary with ``score``
  (validation, lower is better), ``tiebreak`` and ``diverged``. A rate with
  any diverged seed is disqualified. A choice at the grid's edge extends
  the grid once, by the grid's ratio at that end (3 for a one-point grid),
  and the choice is made again over all the rates tried.
  """
  if seeds < 1 or not grid:
    raise ValueError(f"select_lr needs a grid and seeds >= 1, got {grid}, {seeds}")
  runs = {lr: [run_fn(lr, seed) for seed in range(seeds)] for lr in sorted(grid)}
  lr, edge = choose_lr(runs)
  if edge is None:
    return Selection(lr, runs)
  lrs = sorted(runs)
  if edge == "high":
    new = lrs[-1] * (lrs[-1] / lrs[-2] if len(lrs) > 1 else 3.0)
  else:
    new = lrs[0] / (lrs[1] / lrs[0] if len(lrs) > 1 else 3.0)
  new = float(f"{new:.3g}")
  runs[new] = [run_fn(new, seed) for seed in range(seeds)]
  lr, edge = choose_lr(runs)
  return Selection(lr, dict(sorted(runs.items())), edge, new)


def variance_summary(opt_state, b2: float) -> dict[str, dict[str, float]]:
  """Per layer (kernel path without ``/kernel``): mean and max of ``V_hat``.

  From ``adaact_optax.activation_summary``: ``V_hat = nu / (1 - b2**count)``,
  the bias-corrected mean square of each input feature (input units squared).
  """
  out: dict[str, dict[str, float]] = {}
  for key, value in adaact_optax.activation_summary(opt_state, b2=b2).items():
    path, _, stat = key.rpartition("/")              # "Dense_0/kernel", "v_hat_mean"
    if path.endswith("/kernel") and stat.startswith("v_hat_"):
      out.setdefault(path[: -len("/kernel")], {})[stat[len("v_hat_"):]] = float(value)
  return out


def parse_variant(label: str) -> dict:
  """``Config`` overrides for a label ``NAME[+emb][+untied]``: an optimizer name;
  ``+emb``: AdaAct with the embedding lookups' statistics (lm); ``+untied``: the
  LM with a separate output layer instead of the tied ``Embed.attend``."""
  name, *extras = label.split("+")
  flags = {"emb": ("embeddings", True), "untied": ("tied", False)}
  if (name not in optimizers.OPTIMIZERS or len(set(extras)) < len(extras)
      or any(e not in flags for e in extras)
      or ("emb" in extras and name not in optimizers.ADAACT_VARIANTS)):
    raise ValueError(f"unknown variant {label!r}: an optimizer of {optimizers.OPTIMIZERS}, "
                     "then optionally '+emb' (AdaAct ones) and '+untied'")
  return {"optimizer": name, **dict(flags[e] for e in extras)}


def reusable_runs(path) -> dict[tuple, tuple[dict, list[dict]]]:
  """Finished LM runs of an earlier ``metrics.jsonl``: ``(label, lr, seed) ->
  (summary, history)``. Lets an interrupted comparison resume; the caller
  vouches that the model and corpus flags are the same (a recorded
  ``steps`` or ``corpus_sha256`` that differs is not reused)."""
  lines = [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]
  label = lambda r: r["optimizer"] + ("+emb" if r.get("embeddings") else "") + (
      "+untied" if r.get("tied") is False else "")
  histories: dict[tuple, list[dict]] = {}
  runs = {}
  for r in lines:
    key = (label(r), float(r["lr"]), int(r["seed"]))
    if r.get("final"):
      runs[key] = (r, histories.pop(key, []))
    else:
      histories.setdefault(key, []).append(r)
  return runs


def make_variants(args) -> list[Variant]:
  factors = [float(f) for f in args.grid_factors.split(",")]
  explicit = dict(args.lr_grid)

  def grid(label, opt):
    return explicit.get(label) or explicit.get(opt) or [
        float(f"{optimizers.DEFAULTS[opt]['lr'] * f:.3g}") for f in factors]

  if args.ablate_power:
    return [Variant(f"adaact p={k}", {"optimizer": "adaact", "power": p},
                    grid("adaact", "adaact")) for k, p in POWERS.items()]
  variants = []
  for label in args.optimizers.split(","):
    overrides = parse_variant(label)
    if args.task != "lm" and len(overrides) > 1:
      raise ValueError(f"{label}: '+emb'/'+untied' are for --task lm (the image models have "
                       "no embedding)")
    variants.append(Variant(label, overrides, grid(label, overrides["optimizer"])))
  return variants


def compare_image(args) -> dict[str, Any]:
  """Image task: select on a validation split, then the seeds on train -> test."""
  out = pathlib.Path(args.out_dir)
  metrics = out / "metrics.jsonl"
  ds = image_data.load(args.dataset, args.data_dir)
  val_ds = image_data.validation_split(ds, args.val_fraction, seed=0)
  base = image_train.Config(dataset=args.dataset, model=args.model, epochs=args.epochs,
                            batch_size=args.batch_size, steps_per_epoch=args.steps_per_epoch,
                            warmup_epochs=args.warmup_epochs, augment=args.augment,
                            data_dir=args.data_dir, metrics=str(metrics), progress=args.progress,
                            model_kwargs=dict(args.model_arg))
  results = {}
  for v in make_variants(args):
    track = args.track_variance and v.overrides["optimizer"] in optimizers.ADAACT_VARIANTS
    b2 = dataclasses.replace(base, **v.overrides).hyper("b2")

    def tag(phase, seed):
      def on_epoch(epoch, state):
        extra = {"variant": v.label, "phase": phase}
        if track and phase == "test" and seed == 0:
          extra["variance"] = variance_summary(state.opt_state, b2)
        return extra
      return on_epoch

    def select_run(lr, seed):
      cfg = dataclasses.replace(base, seed=seed, lr=lr, **v.overrides)
      r = image_train.run(cfg, val_ds, tag("select", seed))["summary"]
      print(f"[{v.label}] lr={lr:g} seed={seed}: val acc {r['test_acc']:.4f} "
            f"val loss {r['test_loss']:.4f}{' DIVERGED' if r['diverged'] else ''}", flush=True)
      # Higher accuracy is better; ties go to the lower validation loss.
      return dict(r, score=-r["test_acc"], tiebreak=r["test_loss"])

    sel = select_lr(select_run, v.grid, args.select_seeds)
    runs = []
    if sel.lr is not None:
      for seed in range(args.seeds):
        cfg = dataclasses.replace(base, seed=seed, lr=sel.lr, **v.overrides)
        runs.append(image_train.run(cfg, ds, tag("test", seed)))
        s = runs[-1]["summary"]
        print(f"[{v.label}] lr={sel.lr:g} seed={seed}: test acc {s['test_acc']:.4f} "
              f"train loss {s['train_loss']:.4f} {s['epoch_time']:.2f} s/epoch", flush=True)
    results[v.label] = dict(selection=sel, histories=[r["history"] for r in runs],
                            summaries=[r["summary"] for r in runs])
  return results


def compare_lm(args) -> dict[str, Any]:
  """LM task: the selection runs' seeds at the chosen rate are the results."""
  out = pathlib.Path(args.out_dir)
  base = lm_train.Config(metrics=str(out / "metrics.jsonl"), progress=args.progress,
                        **lm_train.model_kwargs(args))
  corpus, _ = lm_train.corpus_and_splits(base.corpus_dir, base.corpus_mb)
  print(f"corpus: {corpus.describe()}", flush=True)
  reuse = {k: v for path in args.reuse for k, v in reusable_runs(path).items()}
  results = {}
  for v in make_variants(args):
    histories: dict[tuple[float, int], list[dict]] = {}

    def select_run(lr, seed):
      old = reuse.get((v.label, float(lr), seed))
      if old and old[0]["steps"] == base.steps and old[0]["corpus_sha256"] == corpus.sha256:
        s, histories[lr, seed] = old
        print(f"[{v.label}] lr={lr:g} seed={seed}: reused", flush=True)
        return dict(s, variant=v.label, score=s["val_bpb"], tiebreak=s["val_bpb"])
      r = lm_train.run(dataclasses.replace(base, seed=seed, lr=lr, **v.overrides))
      s = r["summary"]
      histories[lr, seed] = r["history"]
      print(f"[{v.label}] lr={lr:g} seed={seed}: val {s['val_bpb']:.4f} test {s['test_bpb']:.4f}"
            f" train {s['train_bpb']:.4f} bits/byte, {1e3 * s['step_time']:.1f} ms/step"
            f"{' DIVERGED' if s['diverged'] else ''}", flush=True)
      return dict(s, variant=v.label, score=s["val_bpb"], tiebreak=s["val_bpb"])

    sel = select_lr(select_run, v.grid, args.select_seeds)
    chosen = [] if sel.lr is None else sel.runs[sel.lr]
    results[v.label] = dict(selection=sel, summaries=chosen,
                            histories=[histories[sel.lr, s] for s in range(len(chosen))],
                            config=dataclasses.replace(base, lr=sel.lr, metrics=None,
                                                       **v.overrides))
  # Step times side by side: each variant's compiled step at its chosen rate,
  # interleaved over rounds so load changes on the machine hit all alike.
  times: dict[str, list[float]] = {k: [] for k, r in results.items() if r["summaries"]}
  for _ in range(args.timing_rounds):
    for label in times:
      times[label].append(lm_train.time_steps(results[label]["config"], args.timing_steps))
  for label, t in times.items():
    if t:
      results[label]["step_time"] = float(np.median(t))
  return results


def _mean_std(values, digits=4) -> str:
  values = np.asarray(values, float)
  if not len(values):
    return "—"
  std = values.std(ddof=1) if len(values) > 1 else 0.0
  return f"{values.mean():.{digits}f} ± {std:.{digits}f}"


def _loss_at(histories, epoch=None) -> str:
  """Mean over seeds of the train loss at ``epoch`` (1-based; None: each run's last)."""
  if not histories or (epoch is not None and any(len(h) < epoch for h in histories)):
    return "—"
  return f"{np.mean([h[-1 if epoch is None else epoch - 1]['train_loss'] for h in histories]):.4f}"


def grid_cell(sel: Selection, fmt: Callable[[float], str]) -> str:
  """Per learning rate: the validation mean (``fmt``) or ``diverged k/n``;
  ``+`` marks the rate the extension added."""
  cells = []
  for lr, runs in sel.runs.items():
    mean, diverged = lr_summary(runs)
    value = f"diverged {diverged}/{len(runs)}" if mean is None else fmt(mean)
    cells.append(f"{lr:g}{'+' if lr == sel.extended else ''}: {value}")
  return ", ".join(cells)


def chosen_cell(sel: Selection) -> str:
  if sel.lr is None:
    return "none (all diverged)"
  return f"{sel.lr:g}" + (" (grid edge)" if sel.edge else "")


def table(results: dict, seeds: int) -> str:
  """The markdown table of ``compare_image``'s results."""
  head = ("| run | lr: val acc (select seeds mean) | chosen lr | test acc (mean ± std, "
          f"{seeds} seeds) | diverged | train loss ep 1 | ep 5 | final | s/epoch |")
  rows = [head, "|" + "---|" * 9]
  for label, r in results.items():
    sel, hs, ss = r["selection"], r["histories"], r["summaries"]
    rows.append(
        f"| {label} | {grid_cell(sel, lambda m: f'{-m:.3f}')} | {chosen_cell(sel)} "
        f"| {_mean_std([s['test_acc'] for s in ss])} "
        f"| {sum(s['diverged'] for s in ss)}/{len(ss)} "
        f"| {_loss_at(hs, 1)} | {_loss_at(hs, 5)} | {_loss_at(hs)} "
        f"| {np.mean([s['epoch_time'] for s in ss]) if ss else float('nan'):.3f} |")
  return "\n".join(rows)


def lm_table(results: dict, reference: str = "adamw") -> str:
  """The markdown table of ``compare_lm``'s results; ratios are to ``reference``
  (optimizer-state bytes; step time of the compiled steps timed side by side
  in the same process, ``compare_lm``)."""
  ref = results.get(reference, {}).get("summaries") or []
  ref_bytes = np.mean([s["state_bytes"] for s in ref]) if ref else math.nan
  ref_time = results.get(reference, {}).get("step_time", math.nan)
  rows = ["| run | lr: val bits/byte (seeds mean) | chosen lr | val bits/byte | test bits/byte "
          f"| train bits/byte | diverged | state ÷ {reference} | step time ÷ {reference} |",
          "|" + "---|" * 9]
  for label, r in results.items():
    sel, ss = r["selection"], r["summaries"]
    diverged = sum(lr_summary(runs)[1] for runs in sel.runs.values())
    total = sum(len(runs) for runs in sel.runs.values())
    ratio = lambda value, ref_value: (f"{value / ref_value:.2f}"
                                      if ss and ref_value == ref_value else "—")
    rows.append(
        f"| {label} | {grid_cell(sel, lambda m: f'{m:.3f}')} | {chosen_cell(sel)} "
        f"| {_mean_std([s['val_bpb'] for s in ss], 3)} | {_mean_std([s['test_bpb'] for s in ss], 3)} "
        f"| {_mean_std([s['train_bpb'] for s in ss], 3)} | {diverged}/{total} "
        f"| {ratio(np.mean([s['state_bytes'] for s in ss]) if ss else 0, ref_bytes)} "
        f"| {ratio(r.get('step_time', math.nan), ref_time)} |")
  return "\n".join(rows)


def variance_table_and_plot(results: dict, path: pathlib.Path) -> str:
  """Per-layer ``V_hat`` (seed 0) at the last epoch, and a PNG over epochs."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  tracked = {k: r["histories"][0] for k, r in results.items() if "variance" in r["histories"][0][0]}
  if not tracked:
    return ""
  cols = min(3, len(tracked))
  rows = -(-len(tracked) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
  for ax in axes.flat[len(tracked):]:
    ax.set_visible(False)
  lines = ["| run | layer | mean V_hat (final) | max V_hat (final) |", "|---|---|---|---|"]
  for ax, (label, history) in zip(axes.flat, tracked.items()):
    epochs = [r["epoch"] for r in history]
    for layer in history[0]["variance"]:
      ax.plot(epochs, [r["variance"][layer]["mean"] for r in history], label=layer)
      last = history[-1]["variance"][layer]
      lines.append(f"| {label} | {layer} | {last['mean']:.4g} | {last['max']:.4g} |")
    ax.set(xlabel="epoch", ylabel="mean V_hat (per layer)", yscale="log", title=label)
    ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return "\n".join(lines)


def _lr_grid(text: str):
  label, _, values = text.partition("=")
  try:
    parse_variant(label)
    return label, [float(x) for x in values.split(",")]
  except ValueError:
    raise argparse.ArgumentTypeError(f"--lr-grid takes OPT=lr1,lr2,..., got {text!r}") from None


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m tools.compare",
                              description=__doc__.split("\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--task", default="image", choices=("image", "lm"))
  p.add_argument("--dataset", default="digits", choices=image_data.DATASETS, help="image task")
  p.add_argument("--data-dir")
  p.add_argument("--model", default="cnn", choices=models.MODELS, help="image task")
  p.add_argument("--model-arg", action="append", type=image_train._model_kwarg, default=[],
                 metavar="KEY=JSON", help="image task: override a model field")
  p.add_argument("--optimizers", default="adaact,sgd,adam,adamw",
                 help=f"comma-separated: {', '.join(optimizers.OPTIMIZERS)}; "
                      "AdaAct ones take '+emb' (lm: embedding statistics)")
  p.add_argument("--seeds", type=int, default=3, help="image task: test seeds")
  p.add_argument("--select-seeds", type=int, default=2,
                 help="seeds per learning rate in the selection (lm: also the reported seeds)")
  p.add_argument("--epochs", type=int, default=20, help="image task")
  p.add_argument("--batch-size", type=int, default=None,
                 help="default: 128 (image), 32 (lm)")
  p.add_argument("--steps-per-epoch", type=int, help="image task")
  p.add_argument("--warmup-epochs", type=float, default=0.0, help="image task")
  p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None)
  p.add_argument("--val-fraction", type=float, default=0.1,
                 help="image task: share of the training set held out to choose the lr")
  p.add_argument("--grid-factors", default="0.3,1,3",
                 help="learning-rate grid: the optimizer's default lr times these")
  p.add_argument("--lr-grid", action="append", type=_lr_grid, default=[],
                 metavar="OPT=LR,LR", help="explicit grid for one optimizer (repeatable)")
  p.add_argument("--ablate-power", action="store_true",
                 help="AdaAct with p in {1/6, 1/4, 1/3, 1/2, 1} instead of the optimizers")
  p.add_argument("--track-variance", action="store_true",
                 help="image task: per-layer V_hat of the AdaAct runs over training (seed 0)")
  group = p.add_argument_group("lm task (examples.lm.train)")
  lm_train.add_model_args(group, batch_size=False)
  group.add_argument("--reuse", metavar="METRICS_JSONL", action="append", default=[],
                     help="take finished runs (same variant, lr, seed, steps, corpus) from an "
                          "earlier comparison's metrics.jsonl instead of training them again "
                          "(repeatable)")
  group.add_argument("--timing-steps", type=int, default=50,
                     help="steps per variant in the side-by-side step-time measurement")
  group.add_argument("--timing-rounds", type=int, default=3)
  p.add_argument("--out-dir", default="runs/compare")
  p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=False)
  args = p.parse_args(argv)
  if args.select_seeds < 2:
    p.error("--select-seeds must be >= 2: one seed cannot tell a lucky rate from a good one")
  if args.batch_size is None:
    args.batch_size = 32 if args.task == "lm" else 128
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  start = time.perf_counter()
  out = pathlib.Path(args.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "metrics.jsonl").unlink(missing_ok=True)
  if args.task == "lm":
    results = compare_lm(args)
    corpus, _ = lm_train.corpus_and_splits(args.corpus_dir, args.corpus_mb)
    title = "byte-level LM"
    lm_train.plot_curves({k: r["histories"] for k, r in results.items() if r["histories"]},
                        str(out / "curves.png"), title)
    text = [f"## {title}: dim {args.dim}, depth {args.depth}, heads {args.heads}, mlp "
            f"{args.mlp_dim}, context {args.context}, batch {args.batch_size}, {args.steps} "
            f"steps, {args.select_seeds} seeds per lr",
            "", f"corpus: {corpus.describe()}; full sha256 {corpus.sha256}", "",
            lm_table(results)]
  else:
    results = compare_image(args)
    title = f"{args.dataset} / {args.model}" + (" / AdaAct power" if args.ablate_power else "")
    image_train.plot_curves({k: r["histories"] for k, r in results.items() if r["histories"]},
                            str(out / "curves.png"), title)
    text = [f"## {title}: {args.seeds} seeds, {args.epochs} epochs, batch {args.batch_size}, "
            f"lr chosen over {args.select_seeds} seeds", "", table(results, args.seeds)]
    if args.track_variance:
      text += ["", variance_table_and_plot(results, out / "variance.png")]
  wall = time.perf_counter() - start
  text += ["", f"total wall time {wall:.0f} s on {jax.devices()[0].device_kind} "
           f"(jax {jax.__version__})"]
  report = "\n".join(text)
  (out / "results.md").write_text(report + "\n")
  (out / "results.json").write_text(json.dumps(
      {k: {"lr": r["selection"].lr, "edge": r["selection"].edge,
           "extended": r["selection"].extended,
           "selection": {str(lr): runs for lr, runs in r["selection"].runs.items()},
           "summaries": r["summaries"], "step_time": r.get("step_time")}
       for k, r in results.items()}, indent=1, default=str))
  print(report, flush=True)
  return results


if __name__ == "__main__":
  main()
