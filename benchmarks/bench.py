"""AdaAct against Optax's optimizers: step time, update time, state and compiled memory.

Also AdaAct's two statistics captures against each other (the jaxpr capture
engine behind ``adaact_optax.linen.apply`` and the older interception
``adaact_optax.linen.capture()``), and AdaAct written as an optax chain of
building blocks (``scale_by_activation_rms``) against the fused ``adaact``.

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
OPTIMIZERS = ("sgd", "adam", "adamw", "adaact", "adaact_legacy", "adaact_momentum",
              "adaact_chain")
# Where each optimizer's statistics come from: None (it needs none), "engine"
# (adaact_optax.linen.apply, the jaxpr capture) or "legacy" (model.apply under
# the interception context manager adaact_optax.linen.capture(), 0.1.0 layout).
CAPTURE = {"sgd": None, "adam": None, "adamw": None, "adaact": "engine",
           "adaact_legacy": "legacy", "adaact_momentum": "engine", "adaact_chain": "engine"}
# The timed train-mode forwards: plain model.apply, and with each capture.
FORWARDS = {"forward": None, "forward+engine": "engine", "forward+legacy": "legacy"}
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
  p.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                 help=f"comma list of {OPTIMIZERS}; adam, adamw and adaact are always run "
                 "(the ratios are taken against them)")
  p.add_argument("--batch", default=None,
                 help="override the batch size: N for every model, or per model "
                 "(e.g. resnet20=128,vit_tiny=32)")
  p.add_argument("--min-time", type=float, default=None,
                 help="seconds each timed sample lasts at least (calls are repeated; default 0.05)")
  p.add_argument("--out", default=None, help="JSON path (default benchmarks/results_<device>.json)")
  args = p.parse_args(argv)
  args.models = [m for m in args.models.split(",") if m]
  args.batch = _batches(p, args.batch)
  unknown = set(args.models) - set(MODELS)
  if unknown:
    p.error(f"unknown models {sorted(unknown)}; choose from {MODELS}")
  chosen = set(args.optimizers.split(",")) - {""}
  if chosen - set(OPTIMIZERS):
    p.error(f"unknown optimizers {sorted(chosen - set(OPTIMIZERS))}; choose from {OPTIMIZERS}")
  args.optimizers = [k for k in OPTIMIZERS if k in chosen | {"adam", "adamw", "adaact"}]
  if args.reps is None:
    args.reps = 3 if args.quick else 15
  if args.min_time is None:
    args.min_time = 0.005 if args.quick else 0.05
  if args.out is None:
    args.out = str(ROOT / "benchmarks" / f"results_{args.device}{'_quick' if args.quick else ''}.json")
  return args


def _batches(parser, text) -> dict:
  """``--batch``: {} (the defaults), {model: N} per model, or N for every model."""
  if not text:
    return {}
  if "=" not in text:
    return {m: int(text) for m in MODELS}
  out = {}
  for item in text.split(","):
    model, _, n = item.partition("=")
    if model not in MODELS or not n.isdigit():
      parser.error(f"--batch: expected N or model=N,... with models from {MODELS}, got {item!r}")
    out[model] = int(n)
  return out


# --------------------------------------------------------------------------------------
# Everything below imports jax lazily, after JAX_PLATFORMS is set by main().


def _get_model(name, quick=False):
  """The Flax Linen model from examples/images/models.py at this benchmark's settings.

  ``quick`` shrinks the two deep models (ResNet-8, a 2-block ViT) so the smoke
  run compiles in seconds; its figures are not the issue's.
  """
  from examples.images import models  # pylint: disable=import-outside-toplevel
  _, shape, classes = SHAPES[name]
  if name == "mlp":  # the MLP: 4 hidden layers, 2048 wide, on the flattened input
    return models.get_model(name, classes, shape, hidden=(2048,) * 4)
  if quick and name == "resnet20":
    return models.ResNet(num_classes=classes, blocks=1)
  if quick and name == "vit_tiny":
    return models.get_model(name, classes, shape, depth=2)
  return models.get_model(name, classes, shape)


def make_optimizers(stats_shapes):
  """The optimizers, each with its usual (paper / optax) settings.

  ``stats_shapes`` (from ``adaact_optax.linen.stats_shapes``) sizes the state of
  the optimizers fed by the capture engine, as the docs recommend; the legacy
  capture's optimizer is built without it (it takes 0.1.0-layout leaves).
  ``adaact_momentum`` is the fused optimizer the chain equals step for step
  (parameters without statistics get momentum, as ``optax.ema`` gives them).
  """
  import optax  # pylint: disable=import-outside-toplevel
  import adaact_optax  # pylint: disable=import-outside-toplevel
  lr, b1, b2, eps, wd = 0.1, 0.9, 0.999, 1e-8, 2e-3  # adaact's defaults
  return {
      "sgd": optax.sgd(0.1, momentum=0.9),
      "adam": optax.adam(1e-3),
      "adamw": optax.adamw(1e-3, weight_decay=5e-4),
      "adaact": adaact_optax.adaact(lr, b1, b2, eps, wd, stats_shapes=stats_shapes),
      "adaact_legacy": adaact_optax.adaact(lr, b1, b2, eps, wd),
      "adaact_momentum": adaact_optax.adaact(lr, b1, b2, eps, wd, unmatched="momentum",
                                             stats_shapes=stats_shapes),
      "adaact_chain": optax.chain(
          optax.ema(b1, debias=True),
          adaact_optax.scale_by_activation_rms(b2, eps, stats_shapes=stats_shapes),
          optax.add_decayed_weights(wd),
          optax.scale_by_learning_rate(lr)),
  }


def tree_bytes(tree) -> int:
  import jax  # pylint: disable=import-outside-toplevel
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


class Workload:
  """One model at one batch: jitted train steps, updates and forwards per optimizer."""

  def __init__(self, name, batch, quick=False, optimizers=OPTIMIZERS):
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
    txs = make_optimizers(aa_linen.stats_shapes(model, variables, self.x, train=True,
                                                mutable=["batch_stats"]))
    self.txs = {k: txs[k] for k in optimizers}

    def forward(params, batch_stats, x, capture):
      v = {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}
      if capture == "engine":
        return aa_linen.apply(model, v, x, train=True, mutable=["batch_stats"])
      if capture == "legacy":
        with aa_linen.capture():
          out, mutated = model.apply(v, x, train=True,
                                     mutable=[aa_linen.COLLECTION, "batch_stats"])
        return out, dict(mutated)
      out, mutated = model.apply(v, x, train=True, mutable=["batch_stats"])
      return out, dict(mutated)

    def make_step(tx, capture):
      def step(params, batch_stats, opt_state, x, y):
        def loss_fn(p):
          logits, mutated = forward(p, batch_stats, x, capture)
          loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
          return loss, mutated
        (loss, mutated), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        extra = {"activation_stats": mutated.pop(aa_linen.COLLECTION)} if capture else {}
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

    # Compiled ahead of time too (a jitted forward would compile on its first timed call).
    self.forwards = {
        k: jax.jit(lambda p, b, x, c=c: forward(p, b, x, c)).lower(
            self.params, self.batch_stats, self.x).compile()
        for k, c in FORWARDS.items()}
    # Fixed inputs for the update-only timing: gradient-sized noise and real statistics.
    self.grads = jax.tree.map(
        lambda p: jnp.asarray(1e-3 * rng.standard_normal(p.shape, dtype=np.float32), p.dtype),
        self.params)
    self.stats = {c: self.forwards[k](self.params, self.batch_stats, self.x)[1][aa_linen.COLLECTION]
                  for k, c in FORWARDS.items() if c}
    self.stats[None] = self.stats["engine"]  # unused by optimizers without statistics
    # Compiled once, ahead of time: the executables timed are the ones measured.
    self.steps, self.updates = {}, {}
    for k, tx in self.txs.items():
      params, batch_stats, opt_state = self.fresh(k)
      self.steps[k] = make_step(tx, CAPTURE[k]).lower(
          params, batch_stats, opt_state, self.x, self.y).compile()
      self.updates[k] = make_update(tx, CAPTURE[k]).lower(
          params, opt_state, self.grads, self.stats[CAPTURE[k]]).compile()

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


def compiled_cost(compiled):
  """XLA's own count of a compiled program's work: flops, bytes accessed, fusions."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jaxlibs: one dict per computation
    cost = cost[0] if cost else {}
  cost = cost or {}
  text = compiled.as_text() or ""
  return {"flops": float(cost.get("flops", float("nan"))),
          "bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
          "hlo_fusions": sum(1 for line in text.splitlines() if " fusion(" in line),
          "hlo_instructions": sum(1 for line in text.splitlines() if " = " in line)}


def _timer(fn, state, calls):
  """Times ``calls`` chained calls of ``state = fn(state)``.

  Returns (wall seconds per call, process CPU seconds per call, state). The CPU time
  is this process's, all threads: on a shared machine it is what the calls cost,
  less disturbed than the wall time by other processes' load.
  """
  import jax  # pylint: disable=import-outside-toplevel
  t0, c0 = time.perf_counter(), time.process_time()
  for _ in range(calls):
    state = fn(state)
  jax.block_until_ready(state)
  return (time.perf_counter() - t0) / calls, (time.process_time() - c0) / calls, state


def _calls_for(fn, state, min_time):
  """How many chained calls make one sample last ``min_time`` (at least one)."""
  _, _, state = _timer(fn, state, 1)  # warm-up (and compiles the jitted forwards)
  per_call, _, state = _timer(fn, state, 1)
  return max(1, math.ceil(min_time / max(per_call, 1e-7))), state


def interleaved(fns, states, reps, min_time, cpu_samples=None):
  """Times every ``fns[k]`` round-robin, ``reps`` rounds; returns samples (s/call) per key.

  Each fn maps its state to its next state (donated buffers are chained).
  Calls per sample are set once and are the same for every key: enough for
  the slowest fn's sample to last ``min_time`` (faster ones last less).
  ``cpu_samples``, a dict, receives the same samples in process CPU seconds.
  """
  calls = {}
  for k in fns:  # compile and warm up
    calls[k], states[k] = _calls_for(fns[k], states[k], min_time)
  n = min(calls.values())
  samples = {k: [] for k in fns}
  cpu = {k: [] for k in fns}
  for _ in range(reps):
    for k in fns:
      dt, cpu_dt, states[k] = _timer(fns[k], states[k], n)
      samples[k].append(dt)
      cpu[k].append(cpu_dt)
  if cpu_samples is not None:
    cpu_samples.update(cpu)
  return samples, n


def summary(samples):
  import numpy as np  # pylint: disable=import-outside-toplevel
  a = np.asarray(samples) * 1e3
  p25, med, p75 = np.percentile(a, [25, 50, 75])
  return {"median_ms": float(med), "p25_ms": float(p25), "p75_ms": float(p75),
          "min_ms": float(a.min()), "max_ms": float(a.max()), "samples_ms": a.tolist()}


def _paired(a, b):
  """Median over rounds of the per-round ratio of two summaries' samples."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  return float(np.median(np.asarray(a["samples_ms"]) / np.asarray(b["samples_ms"])))


def run_model(name, args):
  batch = args.batch.get(name) or (8 if args.quick else SHAPES[name][0])
  print(f"[{name}] batch {batch}: building and compiling ...", file=sys.stderr, flush=True)
  ks = args.optimizers
  w = Workload(name, batch, args.quick, ks)
  res = {"model": repr(w.model).split("\n")[0].rstrip("( "), "quick_variant": args.quick,
         "batch": batch, "input_shape": list(SHAPES[name][1]), "num_params": w.num_params,
         "optimizers": {k: {} for k in ks}}

  # Memory: optimizer state bytes, compiled step's buffers.
  for k in ks:
    r = res["optimizers"][k]
    r["state_bytes"] = tree_bytes(w.fresh(k)[2])
    r["compiled_memory"] = w.compiled_memory(k)
    r["compiled_cost"] = compiled_cost(w.steps[k])

  # Full train step (forward, backward, statistics, update), interleaved. Each
  # timed function maps its state to the next one, chaining the donated buffers.
  def step_fn(k):
    return lambda s: w.steps[k](*s, w.x, w.y)[:3]
  print(f"[{name}] timing train steps ...", file=sys.stderr, flush=True)
  samples, calls = interleaved({k: step_fn(k) for k in ks},
                               {k: w.fresh(k) for k in ks}, args.reps, args.min_time)
  for k in ks:
    res["optimizers"][k]["step"] = summary(samples[k])
  res["step_calls_per_sample"] = calls

  # Optimizer update alone: jitted tx.update + apply_updates on fixed gradients/statistics.
  def update_fn(k):
    return lambda s: w.updates[k](*s, w.grads, w.stats[CAPTURE[k]])
  print(f"[{name}] timing updates ...", file=sys.stderr, flush=True)
  samples, calls = interleaved({k: update_fn(k) for k in ks},
                               {k: w.fresh(k)[::2] for k in ks}, args.reps, args.min_time)
  for k in ks:
    res["optimizers"][k]["update"] = summary(samples[k])
  res["update_calls_per_sample"] = calls

  # Statistics capture alone: the train-mode forward without capture and with each.
  def forward_fn(k):
    return lambda s: w.forwards[k](w.params, w.batch_stats, w.x)
  print(f"[{name}] timing capture ...", file=sys.stderr, flush=True)
  samples, calls = interleaved({k: forward_fn(k) for k in w.forwards},
                               {k: None for k in w.forwards}, args.reps, args.min_time)
  res["capture"] = {k: summary(v) for k, v in samples.items()}
  res["capture_calls_per_sample"] = calls
  res["capture_cost"] = {k: compiled_cost(f) for k, f in w.forwards.items()}

  o = res["optimizers"]
  med = lambda k, f: o[k][f]["median_ms"]
  temp = lambda k: o[k]["compiled_memory"].get("temp_size", float("nan"))
  res["ratios"] = {
      "step_vs_adam": {k: med(k, "step") / med("adam", "step") for k in ks},
      "update_vs_adamw": {k: med(k, "update") / med("adamw", "update") for k in ks},
      "state_vs_adam": {k: o[k]["state_bytes"] / o["adam"]["state_bytes"] for k in ks},
      "temp_vs_adam": {k: temp(k) / temp("adam") for k in ks},
      "capture_vs_forward": {k: res["capture"][k]["median_ms"]
                                 / res["capture"]["forward"]["median_ms"] for k in FORWARDS},
      # Paired: the median over rounds of this round's ratio. Samples of one round
      # are adjacent in time, so load that drifts slower than a round cancels.
      "step_vs_adam_paired": {k: _paired(o[k]["step"], o["adam"]["step"]) for k in ks},
      "update_vs_adamw_paired": {k: _paired(o[k]["update"], o["adamw"]["update"])
                                 for k in ks},
  }
  # The capture engine against the legacy interception capture (same optimizer).
  c = res["capture"]
  res["ratios"]["engine_vs_legacy"] = {
      "forward": c["forward+engine"]["median_ms"] / c["forward+legacy"]["median_ms"],
      "forward_paired": _paired(c["forward+engine"], c["forward+legacy"]),
  }
  if "adaact_legacy" in ks:
    res["ratios"]["engine_vs_legacy"].update(
        step=med("adaact", "step") / med("adaact_legacy", "step"),
        step_paired=_paired(o["adaact"]["step"], o["adaact_legacy"]["step"]))
  # AdaAct as an optax chain against the fused optimizer it equals (unmatched="momentum").
  if {"adaact_chain", "adaact_momentum"} <= set(ks):
    res["ratios"]["chain_vs_fused"] = {
        "step": med("adaact_chain", "step") / med("adaact_momentum", "step"),
        "step_paired": _paired(o["adaact_chain"]["step"], o["adaact_momentum"]["step"]),
        "update": med("adaact_chain", "update") / med("adaact_momentum", "update"),
        "update_paired": _paired(o["adaact_chain"]["update"], o["adaact_momentum"]["update"]),
        "state": o["adaact_chain"]["state_bytes"] / o["adaact_momentum"]["state_bytes"],
    }
  return res


# AdaAct's targets on a CPU, from the issue: ratio name -> upper bound.
TARGETS = {"step_vs_adam": 1.02, "update_vs_adamw": 0.80, "state_vs_adam": 0.51,
           "temp_vs_adam": 1.05}
# The capture engine's train step against the legacy capture's (issue 10).
ENGINE_STEP_TARGET = 1.02


def _ms(r):
  return f"{r['median_ms']:.2f} ({r['p25_ms']:.2f}–{r['p75_ms']:.2f})"


def _mb(n):
  return f"{n / 2**20:.2f}"


def _verdict(v, bound):
  return "ok" if v <= bound else "MISSED"


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
    for k in o:
      temp = o[k]["compiled_memory"].get("temp_size", float("nan"))
      lines.append(f"| {k} | {_ms(o[k]['step'])} | {r['step_vs_adam'][k]:.3f} | "
                   f"{_ms(o[k]['update'])} | {r['update_vs_adamw'][k]:.3f} | "
                   f"{_mb(o[k]['state_bytes'])} | {r['state_vs_adam'][k]:.3f} | "
                   f"{_mb(temp)} | {r['temp_vs_adam'][k]:.3f} |")
    c, cc, ev = res["capture"], res["capture_cost"], r["engine_vs_legacy"]
    cost = lambda x: f"{x['flops'] / 1e9:.3f}"
    lines += [
        "", "Capture engine (`linen.apply`) against the legacy capture (`linen.capture()`):",
        "", "| train mode | plain ms | legacy capture ms | engine ms | engine ÷ legacy "
        "[paired] | GFLOP legacy / engine | HLO fusions legacy / engine |",
        "|---|---|---|---|---|---|---|",
        f"| forward + capture | {_ms(c['forward'])} | {_ms(c['forward+legacy'])} | "
        f"{_ms(c['forward+engine'])} | {ev['forward']:.3f} [{ev['forward_paired']:.3f}] | "
        f"{cost(cc['forward+legacy'])} / {cost(cc['forward+engine'])} | "
        f"{cc['forward+legacy']['hlo_fusions']} / {cc['forward+engine']['hlo_fusions']} |"]
    if "step" in ev:
      sl, se = o["adaact_legacy"]["compiled_cost"], o["adaact"]["compiled_cost"]
      lines.append(
          f"| adaact train step | {_ms(o['adam']['step'])} (adam) | "
          f"{_ms(o['adaact_legacy']['step'])} | {_ms(o['adaact']['step'])} | {ev['step']:.3f} "
          f"[{ev['step_paired']:.3f}] {_verdict(ev['step'], ENGINE_STEP_TARGET)} "
          f"(<= {ENGINE_STEP_TARGET}) | {cost(sl)} / {cost(se)} | "
          f"{sl['hlo_fusions']} / {se['hlo_fusions']} |")
    ch = r.get("chain_vs_fused")
    if ch:
      lines += ["", "AdaAct as an optax chain (`ema` → `scale_by_activation_rms` → "
                "`add_decayed_weights` → `scale_by_learning_rate`) against the fused "
                "`adaact(unmatched=\"momentum\")` it equals: train step ÷ fused "
                f"{ch['step']:.3f} [{ch['step_paired']:.3f}], update ÷ fused "
                f"{ch['update']:.3f} [{ch['update_paired']:.3f}], state ÷ fused "
                f"{ch['state']:.3f}."]
    lines += ["", "Load average (1/5/15 min) after this model: "
              f"{'/'.join(f'{x:.1f}' for x in res.get('loadavg_after') or [])} on "
              f"{results['meta']['cpu_count']} cores. Samples of "
              f"{res['step_calls_per_sample']} step / {res['update_calls_per_sample']} update / "
              f"{res['capture_calls_per_sample']} forward calls, {results['meta']['reps']} "
              "rounds.", ""]
  lines += ["### AdaAct against its targets (ratio of medians; in brackets, median of per-round "
            "ratios)",
            "", "| model | " + " | ".join(f"{k} <= {v}" for k, v in TARGETS.items())
            + f" | engine step ÷ legacy <= {ENGINE_STEP_TARGET} |",
            "|---|" + "---|" * (len(TARGETS) + 1)]
  for name, res in results["models"].items():
    cells = []
    for k, bound in TARGETS.items():
      v = res["ratios"][k]["adaact"]
      paired = res["ratios"].get(k + "_paired", {}).get("adaact")
      cells.append(f"{v:.3f}{f' [{paired:.3f}]' if paired is not None else ''} "
                   f"{_verdict(v, bound)}")
    ev = res["ratios"]["engine_vs_legacy"]
    cells.append(f"{ev['step']:.3f} [{ev['step_paired']:.3f}] "
                 f"{_verdict(ev['step'], ENGINE_STEP_TARGET)}" if "step" in ev else "not run")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _loadavg():
  try:
    return list(os.getloadavg())
  except OSError:  # not on every platform
    return None


def run_meta(device, args) -> dict:
  """What a results JSON records about the run: date, command, machine, library
  versions, timing settings and the load average at the start."""
  import jax  # pylint: disable=import-outside-toplevel
  import flax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
      "device": str(device), "device_kind": device.device_kind, "platform": device.platform,
      "cpu_count": os.cpu_count(), "machine": platform.platform(),
      "python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
      "optax": optax.__version__, "reps": args.reps, "min_time_s": args.min_time,
      "quick": args.quick, "loadavg_start": _loadavg()}


def main(argv=None):
  args = parse_args(argv)
  os.environ["JAX_PLATFORMS"] = {"cpu": "cpu", "gpu": "cuda"}[args.device]
  import jax  # pylint: disable=import-outside-toplevel
  # CPU backends may decline a donation; that is the same for every optimizer.
  warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
  try:
    device = jax.devices()[0]
  except Exception as e:  # pylint: disable=broad-except  # e.g. --device gpu, CPU-only jaxlib
    raise SystemExit(f"--device {args.device}: JAX found no such device ({e})") from e
  results = {"meta": run_meta(device, args), "models": {}}
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  for name in args.models:
    results["models"][name] = run_model(name, args)
    # Other processes' load (1, 5, 15-minute averages): a load above the core count
    # means the timed programs shared the cores.
    results["models"][name]["loadavg_after"] = _loadavg()
    results["meta"]["loadavg_end"] = _loadavg()
    results["markdown"] = markdown(results)
    out.write_text(json.dumps(results, indent=1))  # after every model: a partial run keeps its figures
  print(results["markdown"])
  print(f"\n(JSON: {out})", file=sys.stderr)


if __name__ == "__main__":
  main()
