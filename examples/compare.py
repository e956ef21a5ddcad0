"""A fair optimizer comparison you can rerun: ``python -m examples.compare --help``.

For each optimizer (or each AdaAct power with ``--ablate-power``):

1. choose the learning rate from a small grid (the optimizer's default times
   ``--grid-factors``) by the final accuracy on a validation split held out
   from the *training* set (seed 0); the test set is never looked at;
2. train with that learning rate on the full training set for every seed and
   evaluate on the test set.

Prints (and writes to ``OUT_DIR/results.md``) a markdown table: test accuracy
mean +- std over seeds, train loss at epochs 1, 5 and final, seconds per
epoch (epochs 2.., i.e. without compilation); and draws ``OUT_DIR/curves.png``.
``--track-variance`` also records, for the AdaAct runs, each layer's mean and
max of ``V_hat`` (the bias-corrected EMA of squared layer inputs) per epoch
and draws ``OUT_DIR/variance.png``. Every epoch of every run is a line of
``OUT_DIR/metrics.jsonl``.

Example::

  python -m examples.compare --dataset digits --model cnn --seeds 3 --epochs 20
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time
from typing import Any

if __package__ in (None, ""):  # `python examples/compare.py`
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import numpy as np

import adaact_optax
from examples import data as data_lib
from examples import models
from examples import train

POWERS = {"1/6": 1 / 6, "1/4": 1 / 4, "1/3": 1 / 3, "1/2": 1 / 2, "1": 1.0}


@dataclasses.dataclass
class Variant:
  """One row of the table: a label, ``Config`` overrides and its learning-rate grid."""

  label: str
  overrides: dict
  grid: list[float]


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


def make_variants(args) -> list[Variant]:
  factors = [float(f) for f in args.grid_factors.split(",")]
  explicit = dict(args.lr_grid)

  def grid(opt):
    return explicit.get(opt) or [train.DEFAULTS[opt]["lr"] * f for f in factors]

  if args.ablate_power:
    return [Variant(f"adaact p={k}", {"optimizer": "adaact", "power": p}, grid("adaact"))
            for k, p in POWERS.items()]
  return [Variant(o, {"optimizer": o}, grid(o)) for o in args.optimizers.split(",")]


def compare(args) -> dict[str, Any]:
  """Runs the selection and the seeds; returns the per-variant results."""
  out = pathlib.Path(args.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  metrics = out / "metrics.jsonl"
  metrics.unlink(missing_ok=True)
  ds = data_lib.load(args.dataset, args.data_dir)
  val_ds = data_lib.validation_split(ds, args.val_fraction, seed=0)
  base = train.Config(dataset=args.dataset, model=args.model, epochs=args.epochs,
                      batch_size=args.batch_size, steps_per_epoch=args.steps_per_epoch,
                      warmup_epochs=args.warmup_epochs, augment=args.augment,
                      data_dir=args.data_dir, metrics=str(metrics), progress=args.progress,
                      model_kwargs=dict(args.model_arg))
  results = {}
  for v in make_variants(args):
    track = args.track_variance and v.overrides["optimizer"] == "adaact"
    b2 = dataclasses.replace(base, **v.overrides).hyper("b2")

    def tag(phase, lr, seed):
      def on_epoch(epoch, state):
        extra = {"variant": v.label, "phase": phase}
        if track and phase == "test" and seed == 0:
          extra["variance"] = variance_summary(state.opt_state, b2)
        return extra
      return on_epoch

    selection = []
    for lr in v.grid:
      cfg = dataclasses.replace(base, seed=0, lr=lr, **v.overrides)
      r = train.run(cfg, val_ds, tag("select", lr, 0))["summary"]
      selection.append((lr, r["test_acc"], r["test_loss"]))
      print(f"[{v.label}] lr={lr:g}: val acc {r['test_acc']:.4f} val loss {r['test_loss']:.4f}",
            flush=True)
    # Best validation accuracy; ties go to the lower validation loss.
    lr = max(selection, key=lambda s: (s[1], -s[2]))[0]
    runs = []
    for seed in range(args.seeds):
      cfg = dataclasses.replace(base, seed=seed, lr=lr, **v.overrides)
      runs.append(train.run(cfg, ds, tag("test", lr, seed)))
      s = runs[-1]["summary"]
      print(f"[{v.label}] lr={lr:g} seed={seed}: test acc {s['test_acc']:.4f} "
            f"train loss {s['train_loss']:.4f} {s['epoch_time']:.2f} s/epoch", flush=True)
    results[v.label] = dict(lr=lr, selection=selection,
                            histories=[r["history"] for r in runs],
                            summaries=[r["summary"] for r in runs])
  return results


def _mean_std(values) -> str:
  values = np.asarray(values, float)
  std = values.std(ddof=1) if len(values) > 1 else 0.0
  return f"{values.mean():.4f} ± {std:.4f}"


def _loss_at(histories, epoch=None) -> str:
  """Mean over seeds of the train loss at ``epoch`` (1-based; None: each run's last)."""
  if epoch is not None and any(len(h) < epoch for h in histories):
    return "—"
  return f"{np.mean([h[-1 if epoch is None else epoch - 1]['train_loss'] for h in histories]):.4f}"


def table(results: dict, seeds: int) -> str:
  """The markdown table of ``compare``'s results."""
  head = ("| run | lr grid: val acc | chosen lr | test acc (mean ± std, "
          f"{seeds} seeds) | train loss ep 1 | ep 5 | final | s/epoch |")
  rows = [head, "|" + "---|" * 8]
  for label, r in results.items():
    grid = ", ".join(f"{lr:g}: {acc:.3f}" for lr, acc, _ in r["selection"])
    lrs = [s[0] for s in r["selection"]]
    # A choice at the end of the grid means the best learning rate may lie beyond it.
    edge = " (grid edge)" if len(lrs) > 1 and r["lr"] in (min(lrs), max(lrs)) else ""
    hs = r["histories"]
    rows.append(
        f"| {label} | {grid} | {r['lr']:g}{edge} | {_mean_std([s['test_acc'] for s in r['summaries']])} "
        f"| {_loss_at(hs, 1)} | {_loss_at(hs, 5)} | {_loss_at(hs)} "
        f"| {np.mean([s['epoch_time'] for s in r['summaries']]):.3f} |")
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
  opt, _, values = text.partition("=")
  if opt not in train.OPTIMIZERS or not values:
    raise argparse.ArgumentTypeError(f"--lr-grid takes OPT=lr1,lr2,..., got {text!r}")
  return opt, [float(x) for x in values.split(",")]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--dataset", default="digits", choices=data_lib.DATASETS)
  p.add_argument("--data-dir")
  p.add_argument("--model", default="cnn", choices=models.MODELS)
  p.add_argument("--model-arg", action="append", type=train._model_kwarg, default=[],
                 metavar="KEY=JSON")
  p.add_argument("--optimizers", default=",".join(train.OPTIMIZERS))
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--epochs", type=int, default=20)
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--steps-per-epoch", type=int)
  p.add_argument("--warmup-epochs", type=float, default=0.0)
  p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None)
  p.add_argument("--val-fraction", type=float, default=0.1,
                 help="share of the training set held out to choose the learning rate")
  p.add_argument("--grid-factors", default="0.3,1,3",
                 help="learning-rate grid: the optimizer's default lr times these")
  p.add_argument("--lr-grid", action="append", type=_lr_grid, default=[],
                 metavar="OPT=LR,LR", help="explicit grid for one optimizer (repeatable)")
  p.add_argument("--ablate-power", action="store_true",
                 help="AdaAct with p in {1/6, 1/4, 1/3, 1/2, 1} instead of the optimizers")
  p.add_argument("--track-variance", action="store_true",
                 help="per-layer V_hat of the AdaAct runs over training (seed 0)")
  p.add_argument("--out-dir", default="runs/compare")
  p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=False)
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  start = time.perf_counter()
  results = compare(args)
  out = pathlib.Path(args.out_dir)
  title = f"{args.dataset} / {args.model}" + (" / AdaAct power" if args.ablate_power else "")
  train.plot_curves({k: r["histories"] for k, r in results.items()}, str(out / "curves.png"),
                    title)
  text = [f"## {title}: {args.seeds} seeds, {args.epochs} epochs, batch {args.batch_size}",
          "", table(results, args.seeds)]
  if args.track_variance:
    text += ["", variance_table_and_plot(results, out / "variance.png")]
  wall = time.perf_counter() - start
  text += ["", f"total wall time {wall:.0f} s on {jax.devices()[0].device_kind} "
           f"(jax {jax.__version__})"]
  report = "\n".join(text)
  (out / "results.md").write_text(report + "\n")
  (out / "results.json").write_text(json.dumps(
      {k: {"lr": r["lr"], "selection": r["selection"], "summaries": r["summaries"]}
       for k, r in results.items()}, indent=1))
  print(report)
  return results


if __name__ == "__main__":
  main()
