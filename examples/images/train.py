"""Train an image classifier with AdaAct or another optimizer: ``python -m examples.images.train --help``.

Example (from the repository root)::

  python -m examples.images.train --dataset digits --model cnn --optimizer adaact --epochs 20

Writes one JSON line per epoch to ``--metrics`` and a PNG of the train loss and
test accuracy to ``--plot``, and prints a final summary line. AdaAct runs
through ``adaact_optax.adaact`` + ``adaact_optax.linen.apply`` +
``adaact_optax.TrainState``; the other optimizers run the same loop with plain
``model.apply`` (no statistics are captured for them).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import pathlib
import sys
import textwrap
import time
from typing import Any, Callable

if __package__ in (None, ""):  # `python examples/images/train.py`: make `examples` importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import adaact_optax
from adaact_optax import linen as aa_linen
from examples import optimizers
from examples.images import input_pipeline
from examples.images import models

OPTIMIZERS = optimizers.OPTIMIZERS
DEFAULTS = optimizers.DEFAULTS   # each optimizer's published defaults


@dataclasses.dataclass
class Config:
  """One training run. ``None`` hyperparameters take ``DEFAULTS[optimizer]``."""

  dataset: str = "digits"
  model: str = "mlp"
  optimizer: str = "adaact"
  epochs: int = 10
  batch_size: int = 128
  seed: int = 0
  lr: float | None = None
  weight_decay: float | None = None
  b1: float | None = None
  b2: float | None = None
  eps: float | None = None
  momentum: float | None = None
  power: float = 0.5
  schedule: str = "cosine"          # "cosine" or "constant"
  warmup_epochs: float = 0.0
  augment: bool | None = None       # None: on for cifar10 only
  steps_per_epoch: int | None = None  # cap, for quick runs
  data_dir: str | None = None
  metrics: str | None = None        # JSON-lines path; None: no file
  plot: str | None = None           # PNG path; None: no plot
  progress: bool = True
  model_kwargs: dict = dataclasses.field(default_factory=dict)

  def hyper(self, name):
    value = getattr(self, name, None)   # fields Config lacks (b3, ...) take the default
    return DEFAULTS[self.optimizer].get(name) if value is None else value


def make_optimizer(cfg: Config, total_steps: int, steps_per_epoch: int, stats_shapes=None):
  """``(tx, unit_schedule)`` for ``cfg``: the optimizer with a peak-1 schedule,
  then ``optax.scale`` by the peak learning rate, an injected hyperparameter
  (``step_size``, set by ``optimizers.set_learning_rate``).

  Keeping the learning rate in the state lets a learning-rate grid and the
  seeds reuse one compiled step. ``opt_state[0]`` is the optimizer's own
  state; for AdaAct, ``opt_state[0][0]`` is the ``ScaleByAdaActState``.
  ``stats_shapes`` (``adaact_optax.linen.stats_shapes``) goes to AdaAct.
  """
  if cfg.optimizer not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose from {OPTIMIZERS}")
  unit = optimizers.make_unit_schedule(cfg.schedule, total_steps,
                            int(round(cfg.warmup_epochs * steps_per_epoch)))
  peak = optax.inject_hyperparams(optax.scale)(step_size=1.0)
  tx = optimizers.build(cfg.optimizer, unit, cfg.hyper, power=cfg.power,
                        stats_shapes=stats_shapes, peak=peak)
  # with_extra_args_support: every optimizer accepts (the others ignore) `activation_stats`.
  return optax.with_extra_args_support(tx), unit


class TrainState(adaact_optax.TrainState):
  """``adaact_optax.TrainState`` plus BatchNorm's running statistics."""

  batch_stats: Any = None


def make_steps(model, use_adaact: bool, augment: bool):
  """Jitted ``train_step(state, x, y, key) -> (state, loss)`` and
  ``eval_step(state, x, y) -> (summed loss, correct count)``."""

  def train_step(state, x, y, key):
    if augment:
      x = input_pipeline.augment_crop_flip(key, x)

    def loss_fn(params):
      variables = {"params": params, "batch_stats": state.batch_stats}
      if use_adaact:
        logits, mutated = aa_linen.apply(model, variables, x, train=True,
                                         mutable=["batch_stats"])
      else:  # no capture: the other optimizers do not pay for statistics
        logits, mutated = model.apply(variables, x, train=True, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, mutated

    (loss, mutated), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    stats = mutated[aa_linen.COLLECTION] if use_adaact else None
    state = state.apply_gradients(grads=grads, activation_stats=stats,
                                  batch_stats=mutated.get("batch_stats", state.batch_stats))
    return state, loss

  def eval_step(state, x, y):
    logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, x,
                         train=False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()
    return loss, jnp.sum(jnp.argmax(logits, -1) == y)

  return jax.jit(train_step), jax.jit(eval_step)


def evaluate(eval_step, state, x, y, batch_size: int) -> tuple[float, float]:
  """(mean loss, accuracy) over ``x, y``."""
  loss, correct = 0.0, 0
  for xb, yb in input_pipeline.batches(x, y, batch_size):
    l, c = eval_step(state, xb, yb)
    loss, correct = loss + float(l), correct + int(c)
  return loss / len(y), correct / len(y)


@functools.lru_cache(maxsize=16)
def _build(spec: str):
  """Model, optimizer and jitted init/train/eval for a JSON ``spec``.

  Cached: runs that differ only in seed or learning rate (a grid, the seeds)
  share one compilation.
  """
  d = json.loads(spec)
  cfg = Config(**d["config"])
  model = models.get_model(cfg.model, d["num_classes"], d["input_shape"], **cfg.model_kwargs)
  use_adaact = cfg.optimizer in optimizers.ADAACT_VARIANTS
  stats_shapes = None
  if use_adaact:
    x = jnp.zeros([1] + d["input_shape"], jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    stats_shapes = optimizers.abstract_stats_shapes(model, variables, x, train=True,
                                         mutable=["batch_stats"])
  tx, unit = make_optimizer(cfg, d["total_steps"], d["steps_per_epoch"], stats_shapes)
  train_step, eval_step = make_steps(model, use_adaact, d["augment"])
  init = jax.jit(lambda key, x: model.init(key, x, train=False))
  return model, tx, unit, init, train_step, eval_step


def run(cfg: Config, dataset: input_pipeline.Dataset | None = None,
        on_epoch: Callable[[int, TrainState], dict] | None = None) -> dict:
  """Trains per ``cfg``; returns ``{"config", "history", "summary", "state"}``.

  ``dataset`` overrides loading ``cfg.dataset`` (e.g. a validation split);
  ``on_epoch(epoch, state)`` may return extra fields for that epoch's record.
  """
  ds = input_pipeline.load(cfg.dataset, cfg.data_dir) if dataset is None else dataset
  batch_size = min(cfg.batch_size, len(ds.y_train))
  steps_per_epoch = len(ds.y_train) // batch_size
  if cfg.steps_per_epoch:
    steps_per_epoch = min(steps_per_epoch, cfg.steps_per_epoch)
  augment = cfg.augment if cfg.augment is not None else ds.name == "cifar10"
  if augment and len(ds.input_shape) != 3:
    raise ValueError(f"--augment crops and flips images (H, W, C); {ds.name} inputs have "
                     f"shape {ds.input_shape}")
  shape_only = dataclasses.replace(cfg, seed=0, lr=None, data_dir=None, metrics=None, plot=None,
                                   progress=False, steps_per_epoch=None, augment=None)
  spec = dict(config=dataclasses.asdict(shape_only), num_classes=ds.num_classes,
              input_shape=list(ds.input_shape), total_steps=cfg.epochs * steps_per_epoch,
              steps_per_epoch=steps_per_epoch, augment=augment)
  model, tx, unit, init, train_step, eval_step = _build(json.dumps(spec, sort_keys=True))

  key = jax.random.key(cfg.seed)
  init_key, key = jax.random.split(key)
  variables = init(init_key, jnp.asarray(ds.x_train[:1]))
  state = TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                            batch_stats=variables.get("batch_stats", {}))
  lr = cfg.hyper("lr")
  state = state.replace(opt_state=optimizers.set_learning_rate(state.opt_state, lr))
  rng = np.random.default_rng(cfg.seed)
  metrics_file = None
  if cfg.metrics:
    pathlib.Path(cfg.metrics).parent.mkdir(parents=True, exist_ok=True)
    metrics_file = open(cfg.metrics, "a")
  base = dict(dataset=ds.name, model=cfg.model, optimizer=cfg.optimizer, seed=cfg.seed,
              lr=lr, power=cfg.power if cfg.optimizer in optimizers.ADAACT_VARIANTS else None)
  history, initial_loss = [], None
  try:
    for epoch in range(1, cfg.epochs + 1):
      start = time.perf_counter()
      losses = []
      bar = tqdm(input_pipeline.batches(ds.x_train, ds.y_train, batch_size, rng),
                 total=steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}",
                 disable=not cfg.progress, leave=False)
      for i, (xb, yb) in enumerate(bar):
        if i == steps_per_epoch:
          break
        key, step_key = jax.random.split(key)
        state, loss = train_step(state, xb, yb, step_key)
        losses.append(loss)
        if initial_loss is None:
          initial_loss = loss
        if cfg.progress and i % 20 == 0:
          bar.set_postfix(loss=f"{float(loss):.4f}")
      bar.close()
      train_loss = float(jnp.mean(jnp.stack(losses)))  # waits for the epoch's steps
      epoch_time = time.perf_counter() - start
      test_loss, test_acc = evaluate(eval_step, state, ds.x_test, ds.y_test, 1024)
      record = dict(base, epoch=epoch, step=int(state.step), train_loss=train_loss,
                    test_loss=test_loss, test_acc=test_acc, epoch_time=epoch_time,
                    lr_now=lr * float(unit(int(state.step))))
      if on_epoch is not None:
        record.update(on_epoch(epoch, state) or {})
      history.append(record)
      if metrics_file:
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
      if not math.isfinite(train_loss):
        break
  finally:
    if metrics_file:
      metrics_file.close()
  times = [r["epoch_time"] for r in history]
  summary = dict(base, epochs=len(history), initial_loss=float(initial_loss),
                 train_loss=history[-1]["train_loss"],
                 test_loss=history[-1]["test_loss"], test_acc=history[-1]["test_acc"],
                 # epoch 1 includes compilation; later epochs are the steady state.
                 epoch_time=float(np.mean(times[1:] if len(times) > 1 else times)))
  # Diverged: a non-finite loss, a run cut short by one, or a final train
  # loss above the first step's.
  summary["diverged"] = bool(not (math.isfinite(summary["train_loss"])
                                  and math.isfinite(summary["test_loss"]))
                             or len(history) < cfg.epochs
                             or summary["train_loss"] > summary["initial_loss"])
  if cfg.plot:
    plot_curves({cfg.optimizer: [history]}, cfg.plot, f"{ds.name} / {cfg.model}")
  return dict(config=dataclasses.asdict(cfg), history=history, summary=summary, state=state)


def plot_curves(runs: dict[str, list[list[dict]]], path: str, title: str = "") -> None:
  """PNG of train loss and test accuracy per epoch; ``runs[label]`` is a list of
  histories (seeds), drawn as their mean with a min-max band."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for label, histories in runs.items():
    n = min(len(h) for h in histories)
    epochs = np.arange(1, n + 1)
    for ax, field in zip(axes, ("train_loss", "test_acc")):
      values = np.array([[r[field] for r in h[:n]] for h in histories])
      # Markers: a one-epoch run is a single point, which a line alone does not draw.
      line, = ax.plot(epochs, values.mean(0), label=label, marker="o", markersize=3)
      if len(histories) > 1:
        ax.fill_between(epochs, values.min(0), values.max(0), alpha=0.2, color=line.get_color())
  axes[0].set(xlabel="epoch", ylabel="train loss", yscale="log", title="train loss")
  axes[1].set(xlabel="epoch", ylabel="test accuracy", title="test accuracy")
  axes[1].legend()
  fig.suptitle(title)
  fig.tight_layout()
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _model_kwarg(text: str):
  key, _, value = text.partition("=")
  if not _:
    raise argparse.ArgumentTypeError(f"--model-arg takes key=value, got {text!r}")
  return key, json.loads(value)


class HelpFormatter(argparse.HelpFormatter):
  """Appends ``(default: X)`` to each flag's help, except where there is no value to show
  (``None``, switches): those flags say their default in their help text."""

  def _get_help_string(self, action):
    default = action.default
    if default is None or default is argparse.SUPPRESS or action.nargs == 0 or default == []:
      return action.help
    return f"{action.help} (default: %(default)s)"

  def _split_lines(self, text, width):
    # Optimizer names (adaact-momentum) stay whole.
    return textwrap.wrap(text, width, break_on_hyphens=False)


def optimizer_defaults(name: str) -> str:
  """``"default: the optimizer's (adaact, sgd: 0.1; ...)"``: ``DEFAULTS[*][name]`` for
  the optimizers that have it, those with equal values grouped."""
  groups: dict[float, list[str]] = {}
  for optimizer, hyper in DEFAULTS.items():
    if name in hyper:
      groups.setdefault(hyper[name], []).append(optimizer)
  return "default: the optimizer's (" + "; ".join(
      f"{', '.join(names)}: {value:g}" for value, names in groups.items()) + ")"


def parse_args(argv=None) -> Config:
  p = argparse.ArgumentParser(prog="python -m examples.images.train",
                              description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
  p.add_argument("--dataset", default="digits", choices=input_pipeline.DATASETS,
                 help="digits and mnist1d are generated locally; cifar10 needs --data-dir")
  p.add_argument("--data-dir", help="the folder holding cifar-10-batches-bin/; default: none, "
                 "which cifar10 refuses (digits and mnist1d need no files)")
  p.add_argument("--model", default="mlp", choices=models.MODELS, help="examples/images/models.py")
  p.add_argument("--model-arg", action="append", type=_model_kwarg, default=[],
                 metavar="KEY=JSON", help="override a model field, e.g. depth=2 (repeatable); "
                 "default: the model's own fields (examples/images/models.py)")
  p.add_argument("--optimizer", default="adaact", choices=OPTIMIZERS,
                 help="each with its published defaults, see examples/optimizers.py")
  p.add_argument("--lr", type=float, help="peak learning rate; " + optimizer_defaults("lr"))
  p.add_argument("--weight-decay", type=float, help=optimizer_defaults("weight_decay"))
  p.add_argument("--b1", type=float, help="beta1; " + optimizer_defaults("b1"))
  p.add_argument("--b2", type=float, help="beta2; " + optimizer_defaults("b2"))
  p.add_argument("--eps", type=float, help="epsilon; " + optimizer_defaults("eps"))
  p.add_argument("--momentum", type=float, help="momentum of sgd and muon; "
                 + optimizer_defaults("momentum"))
  p.add_argument("--power", type=float, default=0.5, help="AdaAct's exponent p in V^p")
  p.add_argument("--schedule", default="cosine", choices=("cosine", "constant"),
                 help="learning-rate schedule after the warmup")
  p.add_argument("--warmup-epochs", type=float, default=0.0, help="linear warmup")
  p.add_argument("--epochs", type=int, default=10, help="passes over the training set")
  p.add_argument("--batch-size", type=int, default=128,
                 help="examples per step, at most the training set")
  p.add_argument("--steps-per-epoch", type=int,
                 help="cap on steps per epoch, for quick runs; default: no cap (one pass)")
  p.add_argument("--seed", type=int, default=0,
                 help="initialization, batch order and augmentation")
  p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                 help="random crop (pad 4) + horizontal flip; default: on for cifar10 only")
  p.add_argument("--out-dir", default="runs", help="where the default metrics/plot paths go")
  p.add_argument("--metrics", help="JSON-lines file; default: OUT_DIR/NAME.jsonl, NAME = "
                 "DATASET_MODEL_OPTIMIZER_seedSEED")
  p.add_argument("--plot", help="PNG of the curves; default: OUT_DIR/NAME.png")
  p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
  a = p.parse_args(argv)
  name = f"{a.dataset}_{a.model}_{a.optimizer}_seed{a.seed}"
  out = pathlib.Path(a.out_dir)
  return Config(
      dataset=a.dataset, model=a.model, optimizer=a.optimizer, epochs=a.epochs,
      batch_size=a.batch_size, seed=a.seed, lr=a.lr, weight_decay=a.weight_decay, b1=a.b1,
      b2=a.b2, eps=a.eps, momentum=a.momentum, power=a.power, schedule=a.schedule,
      warmup_epochs=a.warmup_epochs, augment=a.augment, steps_per_epoch=a.steps_per_epoch,
      data_dir=a.data_dir, metrics=a.metrics or str(out / f"{name}.jsonl"),
      plot=a.plot or str(out / f"{name}.png"), progress=not a.no_progress,
      model_kwargs=dict(a.model_arg))


def main(argv=None) -> dict:
  cfg = parse_args(argv)
  result = run(cfg)
  s = result["summary"]
  print(f"final: dataset={s['dataset']} model={s['model']} optimizer={s['optimizer']} "
        f"lr={s['lr']:g} seed={s['seed']} epochs={s['epochs']} train_loss={s['train_loss']:.4f} "
        f"test_loss={s['test_loss']:.4f} test_acc={s['test_acc']:.4f} "
        f"s/epoch={s['epoch_time']:.2f} device={jax.devices()[0].platform} "
        f"metrics={cfg.metrics} plot={cfg.plot}")
  return result


if __name__ == "__main__":
  main()
