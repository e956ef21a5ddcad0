"""Per-layer report of AdaAct's scaling after training: ``python -m examples.scaling_report --help``.

Trains one run with ``examples.images.train`` (``image``) or ``examples.lm.train`` (``lm``),
taking that example's own flags, then prints, per weight with AdaAct
statistics, ``adaact_optax.activation_summary``'s mean ``V_hat`` and
``adaact_optax.scaling_summary``'s spread of ``sqrt(V_hat)`` across the input
features (coefficient of variation, max/min) and the RMS of ``M_hat / sqrt(V_hat)``
(AdaAct's step before the learning rate and weight decay), as a markdown table.

Examples::

  python -m examples.scaling_report image --dataset digits --model cnn --epochs 20
  python -m examples.scaling_report lm --steps 1000 --dim 64 --mlp-dim 256 --batch-size 16
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys

if __package__ in (None, ""):  # `python examples/scaling_report.py`
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import adaact_optax
from examples import optimizers
from examples.images import train as images_train
from examples.lm import train as lm_train

TASKS = {"image": images_train, "lm": lm_train}


def report(opt_state, hyper, power: float) -> str:
  """The markdown table of one AdaAct state; ``hyper(name)`` gives b1, b2 and eps."""
  h = {k: hyper(k) for k in ("b2", "eps")}
  summary = adaact_optax.scaling_summary(opt_state, b1=hyper("b1"), power=power, **h)
  v_hat = adaact_optax.activation_summary(opt_state, power=power, **h)
  lines = ["| weight | mean V̂ | CV of √V̂ | max/min | RMS of M̂/√V̂ |", "|---|---|---|---|---|"]
  for key in summary:
    if not key.endswith("/denom_cv"):
      continue
    path = key.removesuffix("/denom_cv")
    name = path.removesuffix("/kernel").replace("MultiHeadDotProductAttention_0", "attn")
    lines.append(f"| {name} | {float(v_hat[f'{path}/v_hat_mean']):.3g} "
                 f"| {float(summary[key]):.2f} "
                 f"| {float(summary[f'{path}/denom_max_over_min']):.3g} "
                 f"| {float(summary[f'{path}/update_rms']):.3g} |")
  return "\n".join(lines)


def main(argv=None) -> str:
  argv = sys.argv[1:] if argv is None else list(argv)
  if not argv or argv[0] not in TASKS:
    raise SystemExit(f"usage: python -m examples.scaling_report {{{','.join(TASKS)}}} "
                     "[that example's flags]; e.g. image --dataset digits --model cnn")
  example = TASKS[argv[0]]
  cfg = example.parse_args(argv[1:])
  if cfg.optimizer not in optimizers.ADAACT_VARIANTS:
    raise SystemExit(f"--optimizer {cfg.optimizer}: the report is of AdaAct's state; choose "
                     f"one of {optimizers.ADAACT_VARIANTS}")
  cfg = dataclasses.replace(cfg, metrics=None, plot=None)
  result = example.run(cfg)
  s = result["summary"]
  score = (f"val {s['val_bpb']:.3f} bits/byte" if argv[0] == "lm"
           else f"test accuracy {s['test_acc']:.3f}")
  print(f"{argv[0]}: {cfg.optimizer} lr {s['lr']:g}, {score}")
  text = report(result["state"].opt_state, cfg.hyper, cfg.power)
  print(text)
  return text


if __name__ == "__main__":
  main()
