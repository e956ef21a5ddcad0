"""Train a byte-level transformer language model: ``python -m examples.lm.train --help``.

The corpus is the running interpreter's standard library source
(``examples.lm.input_pipeline``; nothing is downloaded), split 80/10/10 into
contiguous train / validation / test text. The model is ``ByteGPT``
(``examples.lm.models``): byte embedding, learned positions, pre-LayerNorm
causal blocks, tied output. Reports bits per byte (the mean next-byte cross
entropy in nats / ln 2) on fixed validation and test windows.

Example (from the repository root)::

  python -m examples.lm.train                      # the recommended AdaAct configuration
  python -m examples.lm.train --optimizer adamw    # the reference

Writes one JSON line per evaluation (and a final summary line) to
``--metrics`` and a PNG of the train and validation bits per byte to
``--plot``; every line records the Python version and the corpus sha256.
AdaAct's statistics come from ``adaact_optax.linen.apply`` (with
``--embeddings``, also the embedding's token frequencies), and its state is
sized by ``adaact_optax.linen.stats_shapes``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import pathlib
import sys
import time
from typing import Any

if __package__ in (None, ""):  # `python examples/lm/train.py`: make `examples` importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import adaact_optax
from adaact_optax import linen as aa_linen
from examples import optimizers
from examples.lm import input_pipeline
from examples.lm import models

LN2 = math.log(2.0)

# The recommended AdaAct configuration for text (docs/lm.md, "Conclusion"): AdamW
# for the parameters without statistics, AdaAct's learning rate 0.9 (every
# AdaAct variant's choice at 1000 steps, tied with the best at 4000 steps for
# `adaact-adam`), 9x the paper's 0.1. The example's defaults; the other
# optimizers keep their published defaults (`optimizers.DEFAULTS`).
RECOMMENDED_OPTIMIZER = "adaact-adam"
RECOMMENDED_ADAACT_LR = 0.9


@dataclasses.dataclass
class Config:
  """One language-model run. ``None`` hyperparameters take ``optimizers.DEFAULTS``,
  except an AdaAct variant's learning rate: ``RECOMMENDED_ADAACT_LR`` on text."""

  optimizer: str = RECOMMENDED_OPTIMIZER
  steps: int = 1000
  batch_size: int = 32
  context: int = 64
  dim: int = 128
  depth: int = 2
  heads: int = 4
  mlp_dim: int = 512
  tied: bool = True
  seed: int = 0
  lr: float | None = None
  weight_decay: float | None = None
  b1: float | None = None
  b2: float | None = None
  eps: float | None = None
  momentum: float | None = None
  power: float = 0.5
  embeddings: bool = False          # AdaAct: statistics for the embedding lookups too
  schedule: str = "cosine"
  warmup_steps: int | None = None   # None: 5 % of the steps
  corpus_mb: float = input_pipeline.DEFAULT_MB
  corpus_dir: str | None = None     # None: the standard library
  eval_windows: int = 256           # validation/test windows scored (fixed, evenly spread)
  evals: int = 4                    # evaluations during the run (the last at the end)
  metrics: str | None = None
  plot: str | None = None
  progress: bool = True

  def hyper(self, name):
    value = getattr(self, name, None)
    if value is not None:
      return value
    if name == "lr" and self.uses_adaact:
      return RECOMMENDED_ADAACT_LR
    return optimizers.DEFAULTS[self.optimizer].get(name)

  @property
  def uses_adaact(self) -> bool:
    return self.optimizer in optimizers.ADAACT_VARIANTS


@functools.lru_cache(maxsize=4)
def corpus_and_splits(corpus_dir: str | None, corpus_mb: float):
  """The corpus and its train/validation/test splits (cached per process)."""
  corpus = input_pipeline.build_corpus(corpus_dir, int(corpus_mb * input_pipeline.MB))
  return corpus, input_pipeline.split(corpus.data)


def make_steps(model, use_adaact: bool, embeddings: bool):
  """Jitted ``train_step(state, x, y) -> (state, loss)`` and ``eval_step(params, x, y) ->
  summed loss`` (nats), for int32 ``x, y`` of shape ``(B, T)``."""

  def train_step(state, x, y):
    def loss_fn(params):
      if use_adaact:
        logits, mutated = aa_linen.apply(model, {"params": params}, x, embeddings=embeddings)
        stats = mutated[aa_linen.COLLECTION]
      else:  # no capture: the other optimizers do not pay for statistics
        logits, stats = model.apply({"params": params}, x), None
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), stats

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, activation_stats=stats), loss

  def eval_step(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()

  return jax.jit(train_step), jax.jit(eval_step)


@functools.lru_cache(maxsize=8)
def _model_functions(context: int, dim: int, depth: int, heads: int, mlp_dim: int, tied: bool):
  """Model, jitted ``init(key)`` and jitted ``eval_step`` for one architecture
  (cached: every optimizer on that model shares their compilation)."""
  model = models.ByteGPT(context=context, dim=dim, depth=depth, heads=heads, mlp_dim=mlp_dim,
                         tied=tied)
  x = jnp.zeros((1, context), jnp.int32)
  return model, jax.jit(lambda key: model.init(key, x)), make_steps(model, False, False)[1]


@functools.lru_cache(maxsize=16)
def _build(spec: str):
  """Model, optimizer, init and jitted steps for a JSON ``spec`` (cached: a
  learning-rate grid and the seeds share one compilation)."""
  cfg = Config(**json.loads(spec))
  model, init, eval_step = _model_functions(cfg.context, cfg.dim, cfg.depth, cfg.heads,
                                            cfg.mlp_dim, cfg.tied)
  x = jnp.zeros((1, cfg.context), jnp.int32)
  stats_shapes = None
  if cfg.uses_adaact:
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    stats_shapes = optimizers.abstract_stats_shapes(model, variables, x, embeddings=cfg.embeddings)
  warmup = cfg.steps // 20 if cfg.warmup_steps is None else cfg.warmup_steps
  unit = optimizers.make_unit_schedule(cfg.schedule, cfg.steps, warmup)
  peak = optax.inject_hyperparams(optax.scale)(step_size=1.0)
  tx = optax.with_extra_args_support(optimizers.build(
      cfg.optimizer, unit, cfg.hyper, power=cfg.power, stats_shapes=stats_shapes, peak=peak))
  train_step, _ = make_steps(model, cfg.uses_adaact, cfg.embeddings)
  return model, tx, unit, init, train_step, eval_step


def bits_per_byte(eval_step, params, x, y, batch_size: int = 128) -> float:
  """Mean next-byte cross entropy over the windows ``x, y``, in bits."""
  total = 0.0
  for i in range(0, len(x), batch_size):
    total += float(eval_step(params, x[i:i + batch_size], y[i:i + batch_size]))
  return total / y.size / LN2


def state_bytes(opt_state) -> int:
  """Bytes held by the optimizer state's arrays."""
  return int(sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(opt_state)))


def run(cfg: Config) -> dict[str, Any]:
  """Trains per ``cfg``; returns ``{"config", "history", "summary", "state"}``.

  The summary's ``diverged`` is True when the training loss became
  non-finite or its final value (mean of the last 10 % of the steps) is
  above the first step's loss.
  """
  corpus, parts = corpus_and_splits(cfg.corpus_dir, cfg.corpus_mb)
  shape_only = dataclasses.replace(cfg, seed=0, lr=None, metrics=None, plot=None, progress=False,
                                   eval_windows=0, evals=0, corpus_dir=None, corpus_mb=0.0)
  model, tx, unit, init, train_step, eval_step = _build(
      json.dumps(dataclasses.asdict(shape_only), sort_keys=True))
  val_x, val_y = input_pipeline.eval_windows(parts["validation"], cfg.context, cfg.eval_windows)
  test_x, test_y = input_pipeline.eval_windows(parts["test"], cfg.context, cfg.eval_windows)

  key = jax.random.key(cfg.seed)
  params = init(key)["params"]
  state = adaact_optax.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  lr = cfg.hyper("lr")
  state = state.replace(opt_state=optimizers.set_learning_rate(state.opt_state, lr))
  rng = np.random.default_rng(cfg.seed)
  base = dict(task="lm", optimizer=cfg.optimizer, seed=cfg.seed, lr=lr,
              embeddings=cfg.embeddings if cfg.uses_adaact else None, tied=cfg.tied,
              model=dict(dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, mlp_dim=cfg.mlp_dim,
                         context=cfg.context, batch_size=cfg.batch_size),
              python_version=corpus.python_version, corpus_sha256=corpus.sha256,
              corpus_bytes=len(corpus.data))
  eval_at = sorted({max(1, round(cfg.steps * (i + 1) / max(cfg.evals, 1)))
                    for i in range(max(cfg.evals, 1))})
  metrics_file = None
  if cfg.metrics:
    pathlib.Path(cfg.metrics).parent.mkdir(parents=True, exist_ok=True)
    metrics_file = open(cfg.metrics, "a")
  history, losses, train_time, timed_steps = [], [], 0.0, 0
  bar = tqdm(total=cfg.steps, desc=f"lm {cfg.optimizer}", disable=not cfg.progress, leave=False)
  try:
    step, segment_start = 0, None
    for target in eval_at:
      segment = []
      while step < target:
        x, y = input_pipeline.random_windows(rng, parts["train"], cfg.batch_size, cfg.context)
        state, loss = train_step(state, x, y)
        segment.append(loss)
        step += 1
        if step == 1:  # the first step compiles: time from the second one on
          loss.block_until_ready()
          segment_start = time.perf_counter()
        elif segment_start is None:
          segment_start = time.perf_counter()
      segment_losses = [float(l) for l in segment]   # waits for the segment's steps
      if segment_start is not None:
        train_time += time.perf_counter() - segment_start
        timed_steps += len(segment) - (1 if step == len(segment) else 0)
      segment_start = None
      losses += segment_losses
      bar.update(len(segment))
      train_loss = float(np.mean(segment_losses))
      record = dict(base, step=step, train_loss=train_loss, train_bpb=train_loss / LN2,
                    val_bpb=bits_per_byte(eval_step, state.params, val_x, val_y),
                    lr_now=lr * float(unit(step)))
      bar.set_postfix(val_bpb=f"{record['val_bpb']:.3f}")
      history.append(record)
      if metrics_file:
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
      if not (math.isfinite(train_loss) and math.isfinite(record["val_bpb"])):
        break
  finally:
    bar.close()
  tail = losses[-max(1, len(losses) // 10):]
  final = float(np.mean(tail))
  diverged = not (math.isfinite(final) and math.isfinite(history[-1]["val_bpb"])) \
      or final > losses[0] or len(losses) < cfg.steps
  summary = dict(base, step=len(losses), steps=len(losses), initial_loss=losses[0],
                 train_loss=final, train_bpb=final / LN2, val_bpb=history[-1]["val_bpb"],
                 test_bpb=bits_per_byte(eval_step, state.params, test_x, test_y),
                 diverged=diverged, step_time=train_time / max(timed_steps, 1),
                 state_bytes=state_bytes(state.opt_state),
                 params=int(sum(p.size for p in jax.tree.leaves(state.params))))
  if metrics_file:
    metrics_file.write(json.dumps(dict(summary, final=True)) + "\n")
    metrics_file.close()
  if cfg.plot:
    plot_curves({cfg.optimizer: [history]}, cfg.plot, "byte-level LM")
  return dict(config=dataclasses.asdict(cfg), history=history, summary=summary, state=state)


def time_steps(cfg: Config, steps: int = 50) -> float:
  """Seconds per training step of ``cfg``'s compiled step (after one warm-up
  step), on fresh random batches; for step-time ratios measured side by side."""
  corpus, parts = corpus_and_splits(cfg.corpus_dir, cfg.corpus_mb)
  shape_only = dataclasses.replace(cfg, seed=0, lr=None, metrics=None, plot=None, progress=False,
                                   eval_windows=0, evals=0, corpus_dir=None, corpus_mb=0.0)
  model, tx, _, init, train_step, _ = _build(
      json.dumps(dataclasses.asdict(shape_only), sort_keys=True))
  state = adaact_optax.TrainState.create(apply_fn=model.apply, params=init(jax.random.key(0))[
      "params"], tx=tx)
  state = state.replace(opt_state=optimizers.set_learning_rate(state.opt_state, cfg.hyper("lr")))
  rng = np.random.default_rng(0)
  batches = [input_pipeline.random_windows(rng, parts["train"], cfg.batch_size, cfg.context)
             for _ in range(steps + 1)]
  state, loss = train_step(state, *batches[0])
  loss.block_until_ready()
  start = time.perf_counter()
  for x, y in batches[1:]:
    state, loss = train_step(state, x, y)
  loss.block_until_ready()
  return (time.perf_counter() - start) / steps


def plot_curves(runs: dict[str, list[list[dict]]], path: str, title: str = "") -> None:
  """PNG of train and validation bits per byte over steps; ``runs[label]`` is a
  list of histories (seeds), drawn as their mean with a min-max band."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for label, histories in runs.items():
    n = min(len(h) for h in histories)
    steps = [r["step"] for r in histories[0][:n]]
    for ax, field in zip(axes, ("train_bpb", "val_bpb")):
      values = np.array([[r[field] for r in h[:n]] for h in histories])
      line, = ax.plot(steps, values.mean(0), label=label, marker=".")
      if len(histories) > 1:
        ax.fill_between(steps, values.min(0), values.max(0), alpha=0.2, color=line.get_color())
  axes[0].set(xlabel="step", ylabel="bits / byte", title="train")
  axes[1].set(xlabel="step", ylabel="bits / byte", title="validation")
  axes[1].legend(fontsize="small")
  fig.suptitle(title)
  fig.tight_layout()
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def add_model_args(p, batch_size: bool = True) -> None:
  """The corpus and model flags, shared with ``tools/compare.py --task lm``
  (which has its own ``--batch-size``)."""
  p.add_argument("--steps", type=int, default=1000)
  if batch_size:
    p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--context", type=int, default=64, help="bytes per training window")
  p.add_argument("--dim", type=int, default=128)
  p.add_argument("--depth", type=int, default=2)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--mlp-dim", type=int, default=512)
  p.add_argument("--tied", action=argparse.BooleanOptionalAction, default=True,
                 help="output logits via the byte embedding (Embed.attend)")
  p.add_argument("--schedule", default="cosine", choices=("cosine", "constant"),
                 help="learning rate after the warmup: cosine decay to 0, or constant")
  p.add_argument("--warmup-steps", type=int, help="linear warmup (default: 5%% of the steps)")
  p.add_argument("--corpus-mb", type=float, default=input_pipeline.DEFAULT_MB,
                 help="corpus size: the first N MiB of the standard library's .py files")
  p.add_argument("--corpus-dir", help="a folder of .py files instead of the standard library")
  p.add_argument("--eval-windows", type=int, default=256,
                 help="validation/test windows scored (fixed, evenly spread)")
  p.add_argument("--evals", type=int, default=4, help="evaluations during a run")


def model_kwargs(a) -> dict:
  return dict(steps=a.steps, batch_size=a.batch_size, context=a.context, dim=a.dim,
              depth=a.depth, heads=a.heads, mlp_dim=a.mlp_dim, tied=a.tied,
              schedule=a.schedule, warmup_steps=a.warmup_steps, corpus_mb=a.corpus_mb, corpus_dir=a.corpus_dir,
              eval_windows=a.eval_windows, evals=a.evals)


def parse_args(argv=None) -> Config:
  p = argparse.ArgumentParser(prog="python -m examples.lm.train",
                              description=__doc__.split("\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--optimizer", default=RECOMMENDED_OPTIMIZER, choices=optimizers.OPTIMIZERS,
                 help="default: the recommended AdaAct configuration for text (docs/lm.md)")
  p.add_argument("--lr", type=float,
                 help=f"peak learning rate (default: {RECOMMENDED_ADAACT_LR:g} for the AdaAct "
                 "variants, the recommended rate on text; else the optimizer's published one)")
  p.add_argument("--weight-decay", type=float, help="default: the optimizer's")
  p.add_argument("--b1", type=float)
  p.add_argument("--b2", type=float)
  p.add_argument("--eps", type=float)
  p.add_argument("--momentum", type=float, help="sgd/muon momentum")
  p.add_argument("--power", type=float, default=0.5, help="AdaAct's exponent p in V^p")
  p.add_argument("--embeddings", action="store_true",
                 help="AdaAct: statistics (token frequencies) for the embedding too")
  p.add_argument("--seed", type=int, default=0)
  add_model_args(p)
  p.add_argument("--out-dir", default="runs", help="where the default metrics/plot paths go")
  p.add_argument("--metrics", help="JSON-lines file (default: OUT_DIR/NAME.jsonl)")
  p.add_argument("--plot", help="PNG of the curves (default: OUT_DIR/NAME.png)")
  p.add_argument("--no-progress", action="store_true")
  a = p.parse_args(argv)
  name = f"lm_{a.optimizer}{'_emb' if a.embeddings else ''}_seed{a.seed}"
  out = pathlib.Path(a.out_dir)
  return Config(optimizer=a.optimizer, seed=a.seed, lr=a.lr, weight_decay=a.weight_decay,
                b1=a.b1, b2=a.b2, eps=a.eps, momentum=a.momentum, power=a.power,
                embeddings=a.embeddings,
                metrics=a.metrics or str(out / f"{name}.jsonl"),
                plot=a.plot or str(out / f"{name}.png"), progress=not a.no_progress,
                **model_kwargs(a))


def main(argv=None) -> dict:
  cfg = parse_args(argv)
  corpus, _ = corpus_and_splits(cfg.corpus_dir, cfg.corpus_mb)
  print(f"corpus: {corpus.describe()}", flush=True)
  result = run(cfg)
  s = result["summary"]
  print(f"final: task=lm optimizer={s['optimizer']} lr={s['lr']:g} seed={s['seed']} "
        f"steps={s['steps']} train_bpb={s['train_bpb']:.4f} val_bpb={s['val_bpb']:.4f} "
        f"test_bpb={s['test_bpb']:.4f} diverged={s['diverged']} "
        f"ms/step={1e3 * s['step_time']:.2f} python={s['python_version']} "
        f"corpus_sha256={s['corpus_sha256']} metrics={cfg.metrics} plot={cfg.plot}")
  return result


if __name__ == "__main__":
  main()
