"""What the capture engine costs at trace time, on a large transformer with abstract parameters.

Times and measures the host memory of tracing (no compilation, no FLOPs)

  engine:     jax.make_jaxpr(adaact_optax.value_grad_and_stats(loss))(params, x)
  plain:      jax.make_jaxpr(jax.value_and_grad(loss))(params, x)
  evaluating: jax.make_jaxpr(jax.value_and_grad(capture_call(loss)))(params, x)

(``evaluating`` is the engine's fallback route, which ``linen.apply`` and
``nnx.apply`` also take: the forward jaxpr re-evaluated equation by equation
inside the caller's ``value_and_grad``; reported, not held to the target)

for a hand-written 24-layer pre-norm transformer (d_model 4096, 32 heads,
MLP 16384) whose attention keeps one fused (d, 3d) = 4096x12288 QKV kernel per
layer, split into q/k/v with ``jnp.split`` before the matmuls: the layout the
engine must follow symbolically (issue 10's target: <= 1.5x plain, time and
memory). Parameters are ``jax.ShapeDtypeStruct`` (4.8e9 float32 parameters
that are never allocated); the input is a small (batch, seq, d) activation.

Every measurement runs in a fresh Python process (so one trace's caches and
heap do not flatter the next), after a warm-up trace of a 1-layer, d=64
model of the same code in that process. Timing runs and memory runs are
separate processes: ``tracemalloc`` slows tracing down. Modes alternate
(plain, engine, plain, ...), so drifts in machine load hit both alike.

  python benchmarks/trace_cost.py                  # 5 timing runs per mode, ~2 minutes
  python benchmarks/trace_cost.py --quick          # 4 layers, d 1024, 2 runs
  python benchmarks/trace_cost.py --out /tmp/trace_cost.json

Prints a markdown table and writes every figure as JSON
(default benchmarks/trace_cost.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODES = ("plain", "engine", "evaluating")
TARGET = 1.5  # issue 10: engine <= 1.5x plain, in time and in memory


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layers", type=int, default=24)
  p.add_argument("--d-model", type=int, default=4096)
  p.add_argument("--heads", type=int, default=32)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--seq", type=int, default=16)
  p.add_argument("--runs", type=int, default=5, help="timing processes per mode (default 5)")
  p.add_argument("--quick", action="store_true", help="4 layers, d_model 1024, 2 runs")
  p.add_argument("--out", default=None, help="JSON path (default benchmarks/trace_cost.json)")
  p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
  p.add_argument("--measure", choices=("time", "memory"), help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.quick:
    args.layers, args.d_model, args.heads, args.runs = 4, 1024, 8, 2
  if args.out is None:
    args.out = str(ROOT / "benchmarks" / f"trace_cost{'_quick' if args.quick else ''}.json")
  return args


# --------------------------------------------------------------------------------------
# The model: plain JAX, parameters as a nested dict.


def param_shapes(layers: int, d: int):
  """``{name: shape}`` tree of the transformer's parameters (MLP width 4d)."""
  layer = {
      "ln1": {"scale": (d,)},
      "attn": {"qkv": {"kernel": (d, 3 * d), "bias": (3 * d,)},
               "out": {"kernel": (d, d), "bias": (d,)}},
      "ln2": {"scale": (d,)},
      "mlp": {"up": {"kernel": (d, 4 * d), "bias": (4 * d,)},
              "down": {"kernel": (4 * d, d), "bias": (d,)}},
  }
  return {"layers": [layer] * layers, "ln_f": {"scale": (d,)}}


def make_loss(heads: int):
  """A fresh loss function (a new object per call: no tracing cache can hit)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  def layer_norm(x, scale):
    mu = x.mean(-1, keepdims=True)
    var = jnp.square(x - mu).mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + 1e-6) * scale

  def attention(p, h):
    b, t, d = h.shape
    # One fused (d, 3d) kernel, split before the matmuls (the engine tracks the slices).
    wq, wk, wv = jnp.split(p["qkv"]["kernel"], 3, axis=1)
    bq, bk, bv = jnp.split(p["qkv"]["bias"], 3)
    split_heads = lambda z: z.reshape(b, t, heads, d // heads)
    q, k, v = (split_heads(h @ w + bias) for w, bias in ((wq, bq), (wk, bk), (wv, bv)))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d // heads).astype(h.dtype)
    causal = jnp.tril(jnp.ones((t, t), bool))
    weights = jax.nn.softmax(jnp.where(causal, logits, -1e9), axis=-1)
    z = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d)
    return z @ p["out"]["kernel"] + p["out"]["bias"]

  def loss(params, x):
    for p in params["layers"]:
      x = x + attention(p["attn"], layer_norm(x, p["ln1"]["scale"]))
      h = layer_norm(x, p["ln2"]["scale"])
      h = jax.nn.gelu(h @ p["mlp"]["up"]["kernel"] + p["mlp"]["up"]["bias"])
      x = x + h @ p["mlp"]["down"]["kernel"] + p["mlp"]["down"]["bias"]
    return jnp.mean(jnp.square(layer_norm(x, params["ln_f"]["scale"])))

  return loss


def abstract_inputs(layers, d, batch, seq):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), param_shapes(layers, d),
                        is_leaf=lambda s: isinstance(s, tuple))
  return params, jax.ShapeDtypeStruct((batch, seq, d), jnp.float32)


def traced(mode, heads):
  """The function ``make_jaxpr`` traces in ``mode``."""
  import jax  # pylint: disable=import-outside-toplevel
  import adaact_optax  # pylint: disable=import-outside-toplevel
  from adaact_optax._src.capture import api  # pylint: disable=import-outside-toplevel
  loss = make_loss(heads)
  if mode == "engine":
    return adaact_optax.value_grad_and_stats(loss)
  if mode == "evaluating":
    def evaluating(params, x):
      value, grads, stats, _, _ = api.evaluate_differentiated(loss, False, params, (x,), {},
                                                              False, None)
      return value, grads, jax.tree.structure(params).unflatten(stats)
    return evaluating
  return jax.value_and_grad(loss)


def count_eqns(jaxpr) -> int:
  """Equations of a jaxpr, sub-jaxprs (jit, custom_vjp, ...) included."""
  return sum(1 + sum(count_eqns(sub) for sub in _subjaxprs(eqn.params)) for eqn in jaxpr.eqns)


def _subjaxprs(params):
  from jax.extend import core as jex_core  # pylint: disable=import-outside-toplevel
  for v in params.values():
    for item in (v if isinstance(v, (list, tuple)) else (v,)):
      if isinstance(item, jex_core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jex_core.Jaxpr):
        yield item


# --------------------------------------------------------------------------------------
# Worker: one measurement in this (fresh) process; prints one JSON line.


def _rss_kib(field: str):
  """``VmRSS`` / ``VmHWM`` of this process from /proc, in KiB (None off Linux)."""
  try:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
      if line.startswith(field + ":"):
        return int(line.split()[1])
  except OSError:
    pass
  return None


def _reset_peak_rss() -> bool:
  """Resets VmHWM to the current RSS (Linux >= 4.0); False where unsupported."""
  try:
    pathlib.Path("/proc/self/clear_refs").write_text("5")
    return True
  except OSError:
    return False


def worker(args):
  import warnings  # pylint: disable=import-outside-toplevel
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # pylint: disable=import-outside-toplevel
  import adaact_optax  # pylint: disable=import-outside-toplevel,unused-import
  warnings.simplefilter("ignore")  # e.g. an untested-JAX-version notice: not what is timed
  mode = args.worker
  # Warm-up: the same code on a tiny model (imports, rule tables, Python caches).
  small = abstract_inputs(1, 64, args.batch, args.seq)
  jax.make_jaxpr(traced(mode, 2))(*small)
  params, x = abstract_inputs(args.layers, args.d_model, args.batch, args.seq)
  fn = traced(mode, args.heads)
  out = {"mode": mode, "measure": args.measure}
  if args.measure == "memory":
    import gc  # pylint: disable=import-outside-toplevel
    import tracemalloc  # pylint: disable=import-outside-toplevel
    gc.collect()
    tracemalloc.start()
    closed, shape = jax.make_jaxpr(fn, return_shape=True)(params, x)
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out.update(tracemalloc_peak_mib=peak / 2**20, tracemalloc_retained_mib=current / 2**20)
  else:
    import gc  # pylint: disable=import-outside-toplevel
    gc.collect()
    rss0 = _rss_kib("VmRSS")
    reset = _reset_peak_rss()
    t0, c0 = time.perf_counter(), time.process_time()
    closed, shape = jax.make_jaxpr(fn, return_shape=True)(params, x)
    out["seconds"] = time.perf_counter() - t0
    # CPU time of this process: what tracing costs, whatever else shares the cores.
    out["cpu_seconds"] = time.process_time() - c0
    hwm = _rss_kib("VmHWM")
    if reset and rss0 is not None and hwm is not None:
      out["peak_rss_growth_mib"] = (hwm - rss0) / 1024
  out["eqns_top"] = len(closed.jaxpr.eqns)
  out["eqns_total"] = count_eqns(closed.jaxpr)
  if mode in ("engine", "evaluating"):
    stats = shape[2]  # both return (value, grads, stats)
    qkv = stats["layers"][0]["attn"]["qkv"]
    out["qkv_stats_shapes"] = {k: list(v.shape) for k, v in qkv.items()}
    out["uncaptured"] = sum(1 for s in jax.tree.leaves(stats) if s.shape == (0,))
    out["with_stats"] = sum(1 for s in jax.tree.leaves(stats) if s.shape != (0,))
  print(json.dumps(out), flush=True)


# --------------------------------------------------------------------------------------
# Driver.


def run_worker(args, mode, measure):
  cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", mode,
         "--measure", measure, "--layers", str(args.layers), "--d-model", str(args.d_model),
         "--heads", str(args.heads), "--batch", str(args.batch), "--seq", str(args.seq)]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
  if proc.returncode != 0:
    raise SystemExit(f"worker {mode}/{measure} failed:\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _median(xs):
  xs = sorted(xs)
  n = len(xs)
  return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _loadavg():
  try:
    return list(os.getloadavg())
  except OSError:
    return None


def main(argv=None):
  args = parse_args(argv)
  if args.worker:
    worker(args)
    return
  import jax  # pylint: disable=import-outside-toplevel
  n_params = sum(math.prod(s) for s in jax.tree.leaves(
      param_shapes(args.layers, args.d_model), is_leaf=lambda s: isinstance(s, tuple)))
  runs = {m: [] for m in MODES}
  load = [_loadavg()]
  for i in range(args.runs):
    for mode in (MODES if i % 2 == 0 else MODES[::-1]):
      print(f"timing {mode} ({i + 1}/{args.runs}) ...", file=sys.stderr, flush=True)
      runs[mode].append(run_worker(args, mode, "time"))
  mem = {}
  for mode in MODES:
    print(f"memory {mode} ...", file=sys.stderr, flush=True)
    mem[mode] = run_worker(args, mode, "memory")
  load.append(_loadavg())

  summary = {}
  for mode in MODES:
    secs = [r["seconds"] for r in runs[mode]]
    cpu = [r["cpu_seconds"] for r in runs[mode]]
    rss = [r["peak_rss_growth_mib"] for r in runs[mode] if "peak_rss_growth_mib" in r]
    summary[mode] = {"seconds_median": _median(secs), "seconds_min": min(secs),
                     "seconds_max": max(secs), "seconds": secs,
                     "cpu_seconds_median": _median(cpu), "cpu_seconds": cpu,
                     "peak_rss_growth_mib_median": _median(rss) if rss else None,
                     "tracemalloc_peak_mib": mem[mode]["tracemalloc_peak_mib"],
                     "tracemalloc_retained_mib": mem[mode]["tracemalloc_retained_mib"],
                     "eqns_top": runs[mode][0]["eqns_top"],
                     "eqns_total": runs[mode][0]["eqns_total"]}
  e, p = summary["engine"], summary["plain"]
  ratios = {"time": e["seconds_median"] / p["seconds_median"],
            "time_min": e["seconds_min"] / p["seconds_min"],
            "cpu_time": e["cpu_seconds_median"] / p["cpu_seconds_median"],
            "tracemalloc_peak": e["tracemalloc_peak_mib"] / p["tracemalloc_peak_mib"],
            "eqns_total": e["eqns_total"] / p["eqns_total"]}
  v = summary["evaluating"]
  ratios["evaluating"] = {"cpu_time": v["cpu_seconds_median"] / p["cpu_seconds_median"],
                          "time": v["seconds_median"] / p["seconds_median"],
                          "tracemalloc_peak": v["tracemalloc_peak_mib"] / p["tracemalloc_peak_mib"],
                          "eqns_total": v["eqns_total"] / p["eqns_total"]}
  if e["peak_rss_growth_mib_median"] and p["peak_rss_growth_mib_median"]:
    ratios["peak_rss_growth"] = e["peak_rss_growth_mib_median"] / p["peak_rss_growth_mib_median"]
  results = {
      "meta": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
               "cpu_count": os.cpu_count(), "machine": platform.platform(),
               "python": platform.python_version(), "jax": jax.__version__,
               "loadavg_start_end": load},
      "model": {"layers": args.layers, "d_model": args.d_model, "heads": args.heads,
                "mlp": 4 * args.d_model, "qkv_kernel": [args.d_model, 3 * args.d_model],
                "batch": args.batch, "seq": args.seq, "parameters": n_params,
                "engine_qkv_stats_shapes": runs["engine"][0].get("qkv_stats_shapes"),
                "engine_weights_with_stats": runs["engine"][0].get("with_stats"),
                "engine_uncaptured": runs["engine"][0].get("uncaptured")},
      "summary": summary, "ratios": ratios, "runs": runs, "memory_runs": mem,
      "target": TARGET}
  results["markdown"] = markdown(results)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(results, indent=1))
  print(results["markdown"])
  print(f"\n(JSON: {out})", file=sys.stderr)


def markdown(results) -> str:
  m, s, r = results["model"], results["summary"], results["ratios"]
  ok = lambda v: "ok" if v <= results["target"] else "MISSED"
  rss = lambda mode: (f"{s[mode]['peak_rss_growth_mib_median']:.1f}"
                      if s[mode]["peak_rss_growth_mib_median"] is not None else "n/a")
  lines = [
      f"### Tracing a {m['layers']}-layer transformer, d_model {m['d_model']}, fused QKV "
      f"{m['qkv_kernel'][0]}x{m['qkv_kernel'][1]}, {m['parameters'] / 1e9:.2f}e9 abstract "
      f"parameters, input ({m['batch']}, {m['seq']}, {m['d_model']})", "",
      "| `jax.make_jaxpr` of | wall s, median (min–max) | CPU s, median | peak Python heap "
      "MiB (tracemalloc) | peak RSS growth MiB | jaxpr equations |",
      "|---|---|---|---|---|---|"]
  names = {"plain": "`jax.value_and_grad(loss)`",
           "engine": "`adaact_optax.value_grad_and_stats(loss)`",
           "evaluating": "`jax.value_and_grad` of `capture.capture_call(loss)` (fallback route)"}
  for mode in MODES:
    x = s[mode]
    lines.append(f"| {names[mode]} | {x['seconds_median']:.2f} ({x['seconds_min']:.2f}–"
                 f"{x['seconds_max']:.2f}) | {x['cpu_seconds_median']:.2f} | "
                 f"{x['tracemalloc_peak_mib']:.1f} | {rss(mode)} | {x['eqns_total']:,} |")
  rss_ratio = f"{r['peak_rss_growth']:.2f}" if "peak_rss_growth" in r else "n/a"
  lines.append(f"| engine ÷ plain (target <= {results['target']}) | {r['time']:.2f} "
               f"{ok(r['time'])} (min {r['time_min']:.2f}) | {r['cpu_time']:.2f} "
               f"{ok(r['cpu_time'])} | {r['tracemalloc_peak']:.2f} "
               f"{ok(r['tracemalloc_peak'])} | {rss_ratio} | {r['eqns_total']:.2f} |")
  v = r["evaluating"]
  lines.append(f"| fallback route ÷ plain (not held to the target) | {v['time']:.2f} | "
               f"{v['cpu_time']:.2f} | {v['tracemalloc_peak']:.2f} | | {v['eqns_total']:.2f} |")
  lines += ["", f"Engine statistics of the fused QKV (layer 0): {m['engine_qkv_stats_shapes']}; "
            f"{m['engine_weights_with_stats']} parameters with statistics, "
            f"{m['engine_uncaptured']} uncaptured. {len(s['plain']['seconds'])} timing "
            f"processes per mode; load average (1/5/15 min) at start / end: "
            + " / ".join("/".join(f"{v:.1f}" for v in la) if la else "n/a"
                         for la in results["meta"]["loadavg_start_end"])
            + f" on {results['meta']['cpu_count']} cores."]
  return "\n".join(lines)


if __name__ == "__main__":
  main()
