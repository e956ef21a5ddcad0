"""AdaAct against Optax's optimizers: step time, update time, state and compiled memory.

Run by hand, not in CI (numbers depend on the machine)::

  python benchmarks/bench.py                      # full run, CPU
  python benchmarks/bench.py --quick              # ~1 minute smoke run
  python benchmarks/bench.py --device gpu --out benchmarks/results_gpu.json

Every optimizer runs in this one process, interleaved (sgd adam adamw adaact
sgd adam ...) after compilation, so drifts in machine load hit all alike.
Prints a markdown table and writes every figure (and every raw sample) as JSON.
See benchmarks/README.md for how to read it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import sys
import time
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's adaact_optax and examples/, uninstalled
OPTIMIZERS = ("sgd", "adam", "adamw", "adaact")
MODELS = ("resnet20", "vit_tiny", "mlp")
# (batch, input shape without batch, classes); the settings.
SHAPES = {
    "resnet20": (128, (32, 32, 3), 10),
    "vit_tiny": (128, (32, 32, 3), 10),
    "mlp": (256, (32, 32, 3), 10),
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                 help="JAX platform to run on (sets JAX_PLATFORMS before jax is imported)")
  p.add_argument("--quick", action="store_true",
                 help="smoke run (~1 minute): ResNet-8 and a 2-block ViT, batch 8, 3 reps")
  p.add_argument("--reps", type=int, default=None, help="timed rounds per figure (default 15)")
  p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {MODELS}")
  p.add_argument("--batch", type=int, default=None, help="override every model's batch size")
  p.add_argument("--min-time", type=float, default=None,
                 help="seconds each timed sample lasts at least (calls are repeated; default 0.05)")
  p.add_argument("--out", default=None, help="JSON path (default benchmarks/results_<device>.json)")
  args = p.parse_args(argv)
  args.models = [m for m in args.models.split(",") if m]
  unknown = set(args.models) - set(MODELS)
  if unknown:
    p.error(f"unknown models {sorted(unknown)}; choose from {MODELS}")
  if args.reps is None:
    args.reps = 3 if args.quick else 15
  if args.min_time is None:
    args.min_time = 0.005 if args.quick else 0.05
  if args.out is None:
    args.out = str(ROOT / "benchmarks" / f"results_{args.device}{'_quick' if args.quick else ''}.json")
  return args


# --------------------------------------------------------------------------------------
# Everything below imports jax lazily, after JAX_PLATFORMS is set by main().


def _get_model(name, quick=False):
  """The Flax Linen model from examples/models.py at this benchmark's settings.

  ``quick`` shrinks the two deep models (ResNet-8, a 2-block ViT) so the smoke
  run compiles in seconds; its figures are not the issue's.
  """
  from examples import models  # pylint: disable=import-outside-toplevel
  _, shape, classes = SHAPES[name]
  if name == "mlp":  # the MLP: 4 hidden layers, 2048 wide, on the flattened input
    return models.get_model(name, classes, shape, hidden=(2048,) * 4)
  if quick and name == "resnet20":
    return models.ResNet(num_classes=classes, blocks=1)
  if quick and name == "vit_tiny":
    return models.get_model(name, classes, shape, depth=2)
  return models.get_model(name, classes, shape)


def make_optimizers():
  """The four optimizers, each with its usual (paper / optax) settings."""
  import optax  # pylint: disable=import-outside-toplevel
  import adaact_optax  # pylint: disable=import-outside-toplevel
  return {
      "sgd": optax.sgd(0.1, momentum=0.9),
      "adam": optax.adam(1e-3),
      "adamw": optax.adamw(1e-3, weight_decay=5e-4),
      "adaact": adaact_optax.adaact(0.1),
  }


def tree_bytes(tree) -> int:
  import jax  # pylint: disable=import-outside-toplevel
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


class Workload:
  """One model at one batch: jitted train steps, updates and forwards per optimizer."""

  def __init__(self, name, batch, quick=False):
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    import optax  # pylint: disable=import-outside-toplevel
    from adaact_optax import linen as aa_linen  # pylint: disable=import-outside-toplevel

    self.name = name
    _, shape, classes = SHAPES[name]
    self.batch = batch
    self.model = model = _get_model(name, quick)
    rng = np.random.default_rng(0)
    # Synthetic data: timings do not depend on the values, and nothing downloads.
    self.x = jnp.asarray(rng.standard_normal((batch,) + shape, dtype=np.float32))
    self.y = jnp.asarray(rng.integers(0, classes, (batch,)), jnp.int32)
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(self.x)
    self.params = variables["params"]
    self.batch_stats = variables.get("batch_stats", {})
    self.num_params = int(sum(p.size for p in jax.tree.leaves(self.params)))
    self.txs = make_optimizers()

    def forward(params, batch_stats, x, capture):
      v = {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}
      if capture:
        return aa_linen.apply(model, v, x, train=True, mutable=["batch_stats"])
      out, mutated = model.apply(v, x, train=True, mutable=["batch_stats"])
      return out, dict(mutated)

    def make_step(tx, capture):
      def step(params, batch_stats, opt_state, x, y):
        def loss_fn(p):
          logits, mutated = forward(p, batch_stats, x, capture)
          loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
          return loss, mutated
        (loss, mutated), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        extra = {"activation_stats": mutated[aa_linen.COLLECTION]} if capture else {}
        updates, opt_state = tx.update(grads, opt_state, params, **extra)
        params = optax.apply_updates(params, updates)
        return params, mutated.get("batch_stats", {}), opt_state, loss
      # Every optimizer alike: params, batch statistics and optimizer state are donated.
      return jax.jit(step, donate_argnums=(0, 1, 2))

    def make_update(tx, capture):
      def update(params, opt_state, grads, stats):
        extra = {"activation_stats": stats} if capture else {}
        updates, opt_state = tx.update(grads, opt_state, params, **extra)
        return optax.apply_updates(params, updates), opt_state
      return jax.jit(update, donate_argnums=(0, 1))

    self.forwards = {
        "forward": jax.jit(lambda p, b, x: forward(p, b, x, False)),
        "forward+capture": jax.jit(lambda p, b, x: forward(p, b, x, True)),
    }
    # Fixed inputs for the update-only timing: gradient-sized noise and real statistics.
    self.grads = jax.tree.map(
        lambda p: jnp.asarray(1e-3 * rng.standard_normal(p.shape, dtype=np.float32), p.dtype),
        self.params)
    self.stats = self.forwards["forward+capture"](self.params, self.batch_stats,
                                                  self.x)[1][aa_linen.COLLECTION]
    # Compiled once, ahead of time: the executables timed are the ones measured.
    self.steps, self.updates = {}, {}
    for k, tx in self.txs.items():
      params, batch_stats, opt_state = self.fresh(k)
      self.steps[k] = make_step(tx, k == "adaact").lower(
          params, batch_stats, opt_state, self.x, self.y).compile()
      self.updates[k] = make_update(tx, k == "adaact").lower(
          params, opt_state, self.grads, self.stats).compile()

  def fresh(self, opt):
    """Private copies of (params, batch_stats, opt_state): the steps donate them."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    copy = lambda t: jax.tree.map(jnp.copy, t)
    params = copy(self.params)
    return params, copy(self.batch_stats), jax.jit(self.txs[opt].init)(params)

  def compiled_memory(self, opt):
    """``memory_analysis()`` of the compiled train step, in bytes."""
    m = self.steps[opt].memory_analysis()
    if m is None:
      return {}
    return {k: int(getattr(m, k + "_in_bytes")) for k in
            ("temp_size", "argument_size", "output_size", "alias_size", "generated_code_size")
            if hasattr(m, k + "_in_bytes")}


def _timer(fn, state, calls):
  """Times ``calls`` chained calls of ``state = fn(state)``; returns (seconds per call, state)."""
  import jax  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  for _ in range(calls):
    state = fn(state)
  jax.block_until_ready(state)
  dt = time.perf_counter() - t0
  return dt / calls, state


def _calls_for(fn, state, min_time):
  """How many chained calls make one sample last ``min_time`` (at least one)."""
  _, state = _timer(fn, state, 1)  # warm-up (and compiles the jitted forwards)
  per_call, state = _timer(fn, state, 1)
  return max(1, math.ceil(min_time / max(per_call, 1e-7))), state


def interleaved(fns, states, reps, min_time):
  """Times every ``fns[k]`` round-robin, ``reps`` rounds; returns samples (s/call) per key.

  Each fn maps its state to its next state (donated buffers are chained).
  Calls per sample are set once and are the same for every key: enough for
  the slowest fn's sample to last ``min_time`` (faster ones last less).
  """
  calls = {}
  for k in fns:  # compile and warm up
    calls[k], states[k] = _calls_for(fns[k], states[k], min_time)
  n = min(calls.values())
  samples = {k: [] for k in fns}
  for _ in range(reps):
    for k in fns:
      dt, states[k] = _timer(fns[k], states[k], n)
      samples[k].append(dt)
  return samples, n


def summary(samples):
  import numpy as np  # pylint: disable=import-outside-toplevel
  a = np.asarray(samples) * 1e3
  p25, med, p75 = np.percentile(a, [25, 50, 75])
  return {"median_ms": float(med), "p25_ms": float(p25), "p75_ms": float(p75),
          "min_ms": float(a.min()), "max_ms": float(a.max()), "samples_ms": a.tolist()}


def _paired(a, b):
  import numpy as np  # pylint: disable=import-outside-toplevel
  return float(np.median(np.asarray(a["samples_ms"]) / np.asarray(b["samples_ms"])))


def run_model(name, args):
  batch = args.batch or (8 if args.quick else SHAPES[name][0])
  print(f"[{name}] batch {batch}: building and compiling ...", file=sys.stderr, flush=True)
  w = Workload(name, batch, args.quick)
  res = {"model": repr(w.model).split("\n")[0].rstrip("( "), "quick_variant": args.quick,
         "batch": batch, "input_shape": list(SHAPES[name][1]), "num_params": w.num_params,
         "optimizers": {k: {} for k in OPTIMIZERS}}

  # Memory: optimizer state bytes, compiled step's buffers.
  for k in OPTIMIZERS:
    r = res["optimizers"][k]
    r["state_bytes"] = tree_bytes(w.fresh(k)[2])
    r["compiled_memory"] = w.compiled_memory(k)

  # Full train step (forward, backward, statistics, update), interleaved. Each
  # timed function maps its state to the next one, chaining the donated buffers.
  def step_fn(k):
    return lambda s: w.steps[k](*s, w.x, w.y)[:3]
  print(f"[{name}] timing train steps ...", file=sys.stderr, flush=True)
  samples, calls = interleaved({k: step_fn(k) for k in OPTIMIZERS},
                               {k: w.fresh(k) for k in OPTIMIZERS}, args.reps, args.min_time)
  for k in OPTIMIZERS:
    res["optimizers"][k]["step"] = summary(samples[k])
  res["step_calls_per_sample"] = calls

  # Optimizer update alone: jitted tx.update + apply_updates on fixed gradients/statistics.
  def update_fn(k):
    return lambda s: w.updates[k](*s, w.grads, w.stats)
  print(f"[{name}] timing updates ...", file=sys.stderr, flush=True)
  samples, calls = interleaved({k: update_fn(k) for k in OPTIMIZERS},
                               {k: w.fresh(k)[::2] for k in OPTIMIZERS}, args.reps, args.min_time)
  for k in OPTIMIZERS:
    res["optimizers"][k]["update"] = summary(samples[k])
  res["update_calls_per_sample"] = calls

  # Statistics capture alone: the train-mode forward with and without capture.
  def forward_fn(k):
    return lambda s: w.forwards[k](w.params, w.batch_stats, w.x)
  print(f"[{name}] timing capture ...", file=sys.stderr, flush=True)
  samples, calls = interleaved({k: forward_fn(k) for k in w.forwards},
                               {k: None for k in w.forwards}, args.reps, args.min_time)
  res["capture"] = {k: summary(v) for k, v in samples.items()}
  res["capture_calls_per_sample"] = calls

  o = res["optimizers"]
  med = lambda k, f: o[k][f]["median_ms"]
  temp = lambda k: o[k]["compiled_memory"].get("temp_size", float("nan"))
  res["ratios"] = {
      "step_vs_adam": {k: med(k, "step") / med("adam", "step") for k in OPTIMIZERS},
      "update_vs_adamw": {k: med(k, "update") / med("adamw", "update") for k in OPTIMIZERS},
      "state_vs_adam": {k: o[k]["state_bytes"] / o["adam"]["state_bytes"] for k in OPTIMIZERS},
      "temp_vs_adam": {k: temp(k) / temp("adam") for k in OPTIMIZERS},
      "capture_vs_forward": (res["capture"]["forward+capture"]["median_ms"]
                             / res["capture"]["forward"]["median_ms"]),
      # Paired: the median over rounds of this round's ratio. Samples of one round
      # are adjacent in time, so load that drifts slower than a round cancels.
      "step_vs_adam_paired": {k: _paired(o[k]["step"], o["adam"]["step"]) for k in OPTIMIZERS},
      "update_vs_adamw_paired": {k: _paired(o[k]["update"], o["adamw"]["update"])
                                 for k in OPTIMIZERS},
  }
  return res


# AdaAct's targets on a CPU, from the issue: ratio name -> upper bound.
TARGETS = {"step_vs_adam": 1.02, "update_vs_adamw": 0.80, "state_vs_adam": 0.51,
           "temp_vs_adam": 1.05}


def _ms(r):
  return f"{r['median_ms']:.2f} ({r['p25_ms']:.2f}–{r['p75_ms']:.2f})"


def _mb(n):
  return f"{n / 2**20:.2f}"


def markdown(results) -> str:
  """The tables printed to stdout (and kept in the JSON)."""
  lines = []
  for name, res in results["models"].items():
    o, r = res["optimizers"], res["ratios"]
    variant = " (quick variant: " + res["model"] + ")" if res["quick_variant"] else ""
    lines += [f"### {name}{variant}: batch {res['batch']}, input {tuple(res['input_shape'])}, "
              f"{res['num_params']:,} parameters", "",
              "| optimizer | train step ms, median (p25–p75) | ÷ adam | update ms, median "
              "(p25–p75) | ÷ adamw | state MiB | ÷ adam | step temp MiB | ÷ adam |",
              "|---|---|---|---|---|---|---|---|---|"]
    for k in OPTIMIZERS:
      temp = o[k]["compiled_memory"].get("temp_size", float("nan"))
      lines.append(f"| {k} | {_ms(o[k]['step'])} | {r['step_vs_adam'][k]:.3f} | "
                   f"{_ms(o[k]['update'])} | {r['update_vs_adamw'][k]:.3f} | "
                   f"{_mb(o[k]['state_bytes'])} | {r['state_vs_adam'][k]:.3f} | "
                   f"{_mb(temp)} | {r['temp_vs_adam'][k]:.3f} |")
    c = res["capture"]
    lines += ["", f"Statistics capture: train-mode forward {_ms(c['forward'])} ms, with "
              f"capture {_ms(c['forward+capture'])} ms (x{r['capture_vs_forward']:.3f}). "
              f"Samples of {res['step_calls_per_sample']} step / "
              f"{res['update_calls_per_sample']} update / {res['capture_calls_per_sample']} "
              f"forward calls, {results['meta']['reps']} rounds.", ""]
  lines += ["### AdaAct against its targets (ratio of medians; in brackets, median of per-round "
            "ratios)",
            "", "| model | " + " | ".join(f"{k} <= {v}" for k, v in TARGETS.items()) + " |",
            "|---|" + "---|" * len(TARGETS)]
  for name, res in results["models"].items():
    cells = []
    for k, bound in TARGETS.items():
      v = res["ratios"][k]["adaact"]
      paired = res["ratios"].get(k + "_paired", {}).get("adaact")
      cells.append(f"{v:.3f}{f' [{paired:.3f}]' if paired is not None else ''} "
                   f"{'ok' if v <= bound else 'MISSED'}")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None):
  args = parse_args(argv)
  os.environ["JAX_PLATFORMS"] = {"cpu": "cpu", "gpu": "cuda"}[args.device]
  import jax  # pylint: disable=import-outside-toplevel
  import flax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  # CPU backends may decline a donation; that is the same for every optimizer.
  warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
  try:
    device = jax.devices()[0]
  except Exception as e:  # pylint: disable=broad-except  # e.g. --device gpu, CPU-only jaxlib
    raise SystemExit(f"--device {args.device}: JAX found no such device ({e})") from e
  results = {"meta": {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
      "device": str(device), "device_kind": device.device_kind, "platform": device.platform,
      "cpu_count": os.cpu_count(), "machine": platform.platform(),
      "python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
      "optax": optax.__version__, "reps": args.reps, "min_time_s": args.min_time,
      "quick": args.quick}, "models": {}}
  for name in args.models:
    results["models"][name] = run_model(name, args)
  results["markdown"] = markdown(results)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(results, indent=1))
  print(results["markdown"])
  print(f"\n(JSON: {out})", file=sys.stderr)


if __name__ == "__main__":
  main()
