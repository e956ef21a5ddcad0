"""AdaAct's cost as a GPT-style model grows: step time, memory, state and compile time against Adam.

A sweep over the width (d = 128, 256, 512, 1024 at depth 2) and the depth (2, 4, 8
blocks at d = 256) of ``examples.lm.models.ByteGPT`` with fused QKV kernels and the tied
embedding, on random bytes (batch 8 x 64 tokens). Per size, five train steps are
compiled and then timed interleaved in this one process:

  adam          jax.value_and_grad + optax.adam(1e-3)
  adamw         jax.value_and_grad + optax.adamw(1e-3, weight_decay=5e-4)
  adaact        adaact_optax.value_grad_and_stats + adaact(0.1, stats_shapes=...)
  adaact_linen  jax.value_and_grad of adaact_optax.linen.apply (the Flax adapter) + adaact
  adaact_fixed  jax.value_and_grad + the same adaact update, on statistics computed once
                and passed in: the step without the statistics (their share of the step)

Run by hand, not in CI (timings depend on the machine)::

  python benchmarks/model_size.py               # CPU sweep (about 10-15 minutes on 2 loaded cores)
  python benchmarks/model_size.py --quick       # smoke run: d 64/128, depths 1/2, 2 rounds
  python benchmarks/model_size.py --device gpu  # float32 and bfloat16 on the first GPU
                                                # (says so and exits 0 where there is none)

Prints a markdown table, writes every figure and sample as JSON
(default benchmarks/model_size_<device>.json) and plots the ratios against the
parameter count (default docs/images/model_size_<device>.png). See
benchmarks/README.md for what each column measures.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's adaact_optax and examples/, uninstalled
# bench.py's interleaved timer and its summaries: the same method as the main benchmark.
from bench import (_loadavg, _paired, compiled_cost, interleaved, run_meta,  # noqa: E402
                   summary, tree_bytes)

ROWS = ("adam", "adamw", "adaact", "adaact_linen", "adaact_fixed")
# Rows whose step is also compiled without donation (the first measurement), in
# the width sweep.
UNDONATED = ("adam", "adaact")
# The targets on a CPU (benchmarks, not tests): ratio to Adam's, upper bound.
TARGETS = {"step": 1.02, "peak": 1.0}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                 help="JAX platform (sets JAX_PLATFORMS before jax is imported)")
  p.add_argument("--quick", action="store_true",
                 help="smoke run: widths 64,128 at depth 1, depths 1,2 at width 64, 2 rounds")
  p.add_argument("--widths", default="128,256,512,1024", help="model widths at --depth")
  p.add_argument("--depth", type=int, default=2, help="blocks in the width sweep")
  p.add_argument("--depths", default="2,4,8", help="block counts at --depth-width")
  p.add_argument("--depth-width", type=int, default=256, help="width in the depth sweep")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=64, help="tokens per sequence (the context)")
  p.add_argument("--dtypes", default=None,
                 help="comma list of float32,bfloat16 (the parameters' and so the "
                 "activations' dtype; default: float32 on CPU, both on GPU)")
  p.add_argument("--reps", type=int, default=None, help="interleaved timed rounds (default 7)")
  p.add_argument("--min-time", type=float, default=0.05,
                 help="seconds a timed sample lasts at least (calls are chained)")
  p.add_argument("--out", default=None,
                 help="JSON path (default benchmarks/model_size_<device>.json)")
  p.add_argument("--plot", default=None,
                 help="PNG path (default docs/images/model_size_<device>.png; 'none' for none)")
  args = p.parse_args(argv)
  if args.quick:
    args.widths, args.depth, args.depths, args.depth_width = "64,128", 1, "1,2", 64
  args.widths = [int(w) for w in args.widths.split(",") if w]
  args.depths = [int(d) for d in args.depths.split(",") if d]
  if args.dtypes is None:
    args.dtypes = "float32,bfloat16" if args.device == "gpu" else "float32"
  args.dtypes = [d for d in args.dtypes.split(",") if d]
  if set(args.dtypes) - {"float32", "bfloat16"}:
    p.error(f"--dtypes: float32 and/or bfloat16, got {args.dtypes}")
  if args.reps is None:
    args.reps = 2 if args.quick else 7
  suffix = "_quick" if args.quick else ""
  if args.out is None:
    args.out = str(ROOT / "benchmarks" / f"model_size_{args.device}{suffix}.json")
  if args.plot is None:  # a smoke run's plot stays out of the docs
    args.plot = str(ROOT / ("benchmarks" if args.quick else "docs/images")
                    / f"model_size_{args.device}{suffix}.png")
  return args


def sizes(args):
  """(width, depth) of every model of the sweep, width sweep first, no repeats."""
  out = [(w, args.depth) for w in args.widths]
  out += [(args.depth_width, d) for d in args.depths if (args.depth_width, d) not in out]
  return out


# --------------------------------------------------------------------------------------
# Everything below imports jax lazily, after JAX_PLATFORMS is set by main().


def _memory(compiled) -> dict:
  """``memory_analysis()`` in bytes, and the peak: arguments + temporaries + outputs,
  an output that reuses a donated argument's buffer counted once."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = {k: int(getattr(m, k + "_in_bytes")) for k in
         ("temp_size", "argument_size", "output_size", "alias_size")}
  out["peak"] = (out["argument_size"] + out["temp_size"] + out["output_size"]
                 - out["alias_size"])
  return out


class Model:
  """One ByteGPT size and dtype: its compiled train steps, their memory and compile times."""

  def __init__(self, width, depth, dtype, batch, seq, rows=ROWS, undonated=UNDONATED):
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    import optax  # pylint: disable=import-outside-toplevel
    import adaact_optax  # pylint: disable=import-outside-toplevel
    from adaact_optax import linen as aa_linen  # pylint: disable=import-outside-toplevel
    from examples.lm import models  # pylint: disable=import-outside-toplevel

    self.width, self.depth, self.dtype = width, depth, dtype
    model = models.ByteGPT(context=seq, dim=width, depth=depth, heads=max(1, width // 64),
                           mlp_dim=4 * width, tied=True, fused_qkv=True)
    self.tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, seq)),
                              jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), self.tokens)["params"]
    # bfloat16: parameters (so activations and Adam's moments) in bfloat16; AdaAct's
    # second moment stays float32 (its rule), its momentum takes the parameters' dtype.
    self.params = jax.tree.map(lambda x: x.astype(dtype), params)
    self.num_params = int(sum(x.size for x in jax.tree.leaves(params)))

    def xent(logits, tokens):
      return optax.softmax_cross_entropy_with_integer_labels(
          logits[:, :-1].astype(jnp.float32), tokens[:, 1:]).mean()

    def loss(p, tokens):
      return xent(model.apply({"params": p}, tokens), tokens)

    def linen_loss(p, tokens):
      logits, mutated = aa_linen.apply(model, {"params": p}, tokens)
      return xent(logits, tokens), mutated[aa_linen.COLLECTION]

    shapes = adaact_optax.stats_shapes(loss, self.params, self.tokens)
    stats_floats = sum(s.size for s in jax.tree.leaves(shapes))
    with_stats = sum(p.size for p, s in zip(jax.tree.leaves(self.params),
                                            jax.tree.leaves(shapes, is_leaf=lambda x: x is None))
                     if s is not None)
    adaact = adaact_optax.adaact(0.1, stats_shapes=shapes)
    self.txs = {
        "adam": optax.adam(1e-3), "adamw": optax.adamw(1e-3, weight_decay=5e-4),
        "adaact": adaact, "adaact_fixed": adaact,
        "adaact_linen": adaact_optax.adaact(
            0.1, stats_shapes=aa_linen.stats_shapes(model, {"params": self.params}, self.tokens))}
    # The rule's minimum state: a momentum for every weight with statistics, one float per
    # input feature, and the step and skip counters.
    itemsize = jnp.dtype(dtype).itemsize
    self.min_state_bytes = itemsize * with_stats + 4 * stats_floats + 8
    vgs = adaact_optax.value_grad_and_stats(loss)
    self.fixed_stats = jax.jit(vgs)(self.params, self.tokens)[2]

    def grads(row, p, tokens, stats):
      if row == "adaact":
        value, g, stats = vgs(p, tokens)
      elif row == "adaact_linen":
        (value, stats), g = jax.value_and_grad(linen_loss, has_aux=True)(p, tokens)
      else:  # plain value_and_grad; adaact_fixed takes its statistics as an argument
        value, g = jax.value_and_grad(loss)(p, tokens)
      return value, g, stats

    def make_step(row, donate):
      tx = self.txs[row]

      def step(p, opt_state, tokens, stats):
        value, g, stats = grads(row, p, tokens, stats)
        extra = {"activation_stats": stats} if row.startswith("adaact") else {}
        updates, opt_state = tx.update(g, opt_state, p, **extra)
        return optax.apply_updates(p, updates), opt_state, value
      return jax.jit(step, donate_argnums=(0, 1) if donate else ())

    # One trace of the model at these shapes before the timed compiles: the first trace
    # fills JAX's per-shape caches (jnp's inner jits, ...), which would otherwise be
    # billed to whichever row compiles first.
    jax.eval_shape(jax.value_and_grad(loss), self.params, self.tokens)
    self.steps, self.memory, self.memory_undonated, self.compile_s = {}, {}, {}, {}
    self.state_bytes, self.cost = {}, {}
    for row in rows:
      state = jax.eval_shape(self.txs[row].init, self.params)
      self.state_bytes[row] = tree_bytes(state)
      stats = self.fixed_stats if row == "adaact_fixed" else None
      wall, cpu = time.perf_counter(), time.process_time()
      self.steps[row] = make_step(row, True).lower(self.params, state, self.tokens,
                                                   stats).compile()
      self.compile_s[row] = {"wall": time.perf_counter() - wall,
                             "cpu": time.process_time() - cpu}
      self.memory[row] = _memory(self.steps[row])
      self.cost[row] = compiled_cost(self.steps[row])
      if row in undonated:
        self.memory_undonated[row] = _memory(
            make_step(row, False).lower(self.params, state, self.tokens, stats).compile())
    self.param_bytes = tree_bytes(self.params)

  def fresh(self, row):
    """Private params and optimizer state (the steps donate them)."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    params = jax.tree.map(jnp.copy, self.params)
    return params, jax.jit(self.txs[row].init)(params)

  def step_fn(self, row):
    stats = self.fixed_stats if row == "adaact_fixed" else None
    return lambda s: self.steps[row](*s, self.tokens, stats)[:2]


def run_size(width, depth, dtype, args):
  print(f"[d {width}, depth {depth}, {dtype}] compiling ...", file=sys.stderr, flush=True)
  m = Model(width, depth, dtype, args.batch, args.seq,
            undonated=UNDONATED if depth == args.depth else ())
  print(f"[d {width}, depth {depth}, {dtype}] {m.num_params:,} parameters; timing ...",
        file=sys.stderr, flush=True)
  cpu = {}
  wall, calls = interleaved({r: m.step_fn(r) for r in ROWS}, {r: m.fresh(r) for r in ROWS},
                            args.reps, args.min_time, cpu_samples=cpu)
  # Two clocks for the same calls: this process's CPU time (all threads), what the step
  # costs, and the wall time, which on a shared machine also holds other processes' turns.
  steps = {"cpu": {r: summary(cpu[r]) for r in ROWS},
           "wall": {r: summary(wall[r]) for r in ROWS}}
  ratio = lambda f: {r: f(r) / f("adam") for r in ROWS}
  fixed = lambda clock, r: steps[clock]["adaact_fixed"]["median_ms"] / steps[clock][r]["median_ms"]
  adaacts = ("adaact", "adaact_linen")
  res = {
      "width": width, "depth": depth, "dtype": dtype, "num_params": m.num_params,
      "param_bytes": m.param_bytes, "heads": max(1, width // 64), "calls_per_sample": calls,
      "step": steps, "memory": m.memory, "memory_undonated": m.memory_undonated,
      "state_bytes": m.state_bytes, "min_state_bytes": m.min_state_bytes,
      "compile_s": m.compile_s, "compiled_cost": m.cost, "loadavg_after": _loadavg(),
      "ratios": {
          **{f"step_{clock}": ratio(lambda r, c=clock: steps[c][r]["median_ms"])
             for clock in steps},
          **{f"step_{clock}_paired": {r: _paired(steps[clock][r], steps[clock]["adam"])
                                      for r in ROWS} for clock in steps},
          "peak": ratio(lambda r: m.memory[r]["peak"]),
          "temp": ratio(lambda r: m.memory[r]["temp_size"]),
          "temp_undonated": {r: m.memory_undonated[r]["temp_size"]
                             / m.memory_undonated["adam"]["temp_size"]
                             for r in m.memory_undonated},
          "peak_undonated": {r: m.memory_undonated[r]["peak"]
                             / m.memory_undonated["adam"]["peak"] for r in m.memory_undonated},
          "state": ratio(lambda r: m.state_bytes[r]),
          "compile_cpu": ratio(lambda r: m.compile_s[r]["cpu"]),
          "flops": ratio(lambda r: m.cost[r]["flops"]),
          "bytes_accessed": ratio(lambda r: m.cost[r]["bytes_accessed"]),
      },
      # The statistics' share of AdaAct's step: 1 - (step on fixed statistics) / (step),
      # in CPU time, wall time, and XLA's own counts of the compiled programs.
      "stats_share": {
          **{clock: {r: 1 - fixed(clock, r) for r in adaacts} for clock in steps},
          "cpu_paired": {r: 1 - _paired(steps["cpu"]["adaact_fixed"], steps["cpu"][r])
                         for r in adaacts},
          "flops": {r: 1 - m.cost["adaact_fixed"]["flops"] / m.cost[r]["flops"]
                    for r in adaacts},
          "bytes": {r: 1 - m.cost["adaact_fixed"]["bytes_accessed"]
                    / m.cost[r]["bytes_accessed"] for r in adaacts}},
  }
  res["ratios"]["min_state"] = m.min_state_bytes / m.state_bytes["adam"]
  return res


def _verdict(v, bound):
  return "ok" if v <= bound else "MISSED"


def markdown(results) -> str:
  """The tables printed to stdout (and kept in the JSON)."""
  lines = []
  for dtype in results["meta"]["dtypes"]:
    runs = [r for r in results["sizes"] if r["dtype"] == dtype]
    if not runs:
      continue
    lines += [f"#### {dtype}", "",
              "| width x depth | parameters | Adam step, CPU ms (wall ms) | step ÷ adam, CPU "
              "time: adamw / adaact / linen [paired adaact] | adaact step ÷ adam, wall | XLA "
              "flops / bytes ÷ adam, adaact | peak memory ÷ adam: adamw / adaact / linen | "
              "state ÷ adam, adaact (rule's minimum) | compile CPU ÷ adam: adaact / linen / "
              "fixed | statistics' share, CPU: adaact / linen [paired adaact] (XLA flops / "
              "bytes) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
      q, share = r["ratios"], r["stats_share"]
      a = r["step"]
      pct = lambda x: f"{100 * x:.1f}%"
      lines.append(
          f"| {r['width']} x {r['depth']} | {r['num_params']:,} | "
          f"{a['cpu']['adam']['median_ms']:.0f} ({a['wall']['adam']['median_ms']:.0f}) | "
          f"{q['step_cpu']['adamw']:.3f} / {q['step_cpu']['adaact']:.3f} / "
          f"{q['step_cpu']['adaact_linen']:.3f} [{q['step_cpu_paired']['adaact']:.3f}] | "
          f"{q['step_wall']['adaact']:.3f} [{q['step_wall_paired']['adaact']:.3f}] | "
          f"{q['flops']['adaact']:.4f} / {q['bytes_accessed']['adaact']:.3f} | "
          f"{q['peak']['adamw']:.3f} / {q['peak']['adaact']:.3f} / "
          f"{q['peak']['adaact_linen']:.3f} | {q['state']['adaact']:.4f} "
          f"({q['min_state']:.4f}) | {q['compile_cpu']['adaact']:.2f} / "
          f"{q['compile_cpu']['adaact_linen']:.2f} / {q['compile_cpu']['adaact_fixed']:.2f} | "
          f"{pct(share['cpu']['adaact'])} / {pct(share['cpu']['adaact_linen'])} "
          f"[{pct(share['cpu_paired']['adaact'])}] ({pct(share['flops']['adaact'])} / "
          f"{pct(share['bytes']['adaact'])}) |")
    lines += ["", "Compiled temporaries (`temp_size`) ÷ Adam's, and AdaAct's extra temporaries "
              "in parameter bytes; donated (as timed) and, in the width sweep, not donated:", "",
              "| width x depth | temp ÷ adam, donated | extra ÷ parameter bytes | temp ÷ adam, "
              "not donated | extra ÷ parameter bytes | peak ÷ adam, not donated |",
              "|---|---|---|---|---|---|"]
    for r in runs:
      q, mem, und = r["ratios"], r["memory"], r["memory_undonated"]
      extra = lambda d: (d["adaact"]["temp_size"] - d["adam"]["temp_size"]) / r["param_bytes"]
      undonated = (f"{q['temp_undonated']['adaact']:.3f} | {extra(und):+.3f} | "
                   f"{q['peak_undonated']['adaact']:.3f}" if und else "not compiled | | ")
      lines.append(f"| {r['width']} x {r['depth']} | {q['temp']['adaact']:.3f} | "
                   f"{extra(mem):+.3f} | {undonated} |")
    lines += ["", "Targets (adaact ÷ adam; step: ratio of CPU-time medians): "
              + "; ".join(f"{r['width']} x {r['depth']}: step "
                          f"{r['ratios']['step_cpu']['adaact']:.3f} "
                          f"{_verdict(r['ratios']['step_cpu']['adaact'], TARGETS['step'])}, peak "
                          f"{r['ratios']['peak']['adaact']:.3f} "
                          f"{_verdict(r['ratios']['peak']['adaact'], TARGETS['peak'])}"
                          for r in runs) + ".", ""]
  meta = results["meta"]
  lines.append(f"{meta['device_kind']}, jax {meta['jax']}; batch {meta['batch']} x "
               f"{meta['seq']} tokens; {meta['reps']} interleaved rounds; load average "
               f"(1/5/15 min) at start {_fmt_load(meta['loadavg_start'])}, at end "
               f"{_fmt_load(meta.get('loadavg_end'))} on {meta['cpu_count']} cores.")
  return "\n".join(lines)


def _fmt_load(load):
  return "/".join(f"{x:.1f}" for x in load) if load else "n/a"


def plot(results, path):
  """The ratios against the parameter count, one panel per figure (matplotlib, Agg)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  linens = ("adamw", "adaact", "adaact_linen")
  panels = [("train step CPU time ÷ Adam's", lambda r, k: r["ratios"]["step_cpu"][k], linens),
            ("peak memory ÷ Adam's (donated step)", lambda r, k: r["ratios"]["peak"][k], linens),
            ("optimizer state ÷ Adam's", lambda r, k: r["ratios"][k]["adaact"] if k == "state"
             else r["ratios"]["min_state"], ("state", "min_state")),
            ("compile CPU time ÷ Adam's", lambda r, k: r["ratios"]["compile_cpu"][k], linens),
            ("statistics' share of AdaAct's step", lambda r, k: r["stats_share"][k]["adaact"],
             ("cpu", "flops", "bytes")),
            ("compiled temporaries ÷ Adam's", lambda r, k: r["ratios"][k]["adaact"],
             ("temp", "temp_undonated"))]
  styles = {"adamw": ("tab:gray", "adamw"), "adaact": ("tab:blue", "adaact"),
            "adaact_linen": ("tab:orange", "adaact via linen.apply"),
            "state": ("tab:blue", "adaact"), "min_state": ("tab:green", "the rule's minimum"),
            "cpu": ("tab:blue", "step CPU time"), "flops": ("tab:green", "XLA flops"),
            "bytes": ("tab:purple", "XLA bytes accessed"),
            "temp": ("tab:blue", "donated"), "temp_undonated": ("tab:red", "not donated")}
  meta = results["meta"]
  fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
  for ax, (title, value, keys) in zip(axes.flat, panels):
    for dtype, line in zip(meta["dtypes"], ("-", ":")):
      runs = [r for r in results["sizes"] if r["dtype"] == dtype]
      for marker, sel in (("o", lambda r: r["depth"] == meta["depth"]),
                          ("s", lambda r: r["width"] == meta["depth_width"])):
        for k in keys:
          pts = sorted((r["num_params"], value(r, k)) for r in runs
                       if sel(r) and (k != "temp_undonated" or r["memory_undonated"]))
          color, label = styles[k]
          if pts:
            ax.plot(*zip(*pts), line, marker=marker, color=color, label=label + (
                f" ({dtype})" if len(meta["dtypes"]) > 1 else ""))
    ax.axhline(0 if "share" in title else 1, color="k", lw=0.6)
    ax.set_xscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("parameters", fontsize=8)
    ax.tick_params(labelsize=8)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))  # one entry per line, not per sweep
    ax.legend(unique.values(), unique.keys(), fontsize=7)
  fig.suptitle(f"AdaAct against Adam as a GPT-style model grows ({meta['device_kind']}, batch "
               f"{meta['batch']} x {meta['seq']} tokens). Circles: widths at depth "
               f"{meta['depth']}; squares: depths at width {meta['depth_width']}", fontsize=10)
  fig.tight_layout()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=72)
  plt.close(fig)


def main(argv=None):
  args = parse_args(argv)
  if args.device == "cpu":
    os.environ["JAX_PLATFORMS"] = "cpu"
  else:  # JAX's own choice: the GPU where jaxlib has one, else the CPU (checked below)
    os.environ.pop("JAX_PLATFORMS", None)
  import jax  # pylint: disable=import-outside-toplevel
  warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
  if args.device == "gpu" and jax.default_backend() != "gpu":
    print(f"model_size.py --device gpu: no GPU here (JAX's backend is "
          f"{jax.default_backend()!r}, devices {jax.devices()}); nothing measured, nothing "
          "written. Run it on a machine with a GPU and jax[cuda].")
    return 0
  device = jax.devices()[0]
  results = {"meta": {**run_meta(device, args), "batch": args.batch, "seq": args.seq,
                      "depth": args.depth, "depth_width": args.depth_width,
                      "dtypes": args.dtypes, "rows": list(ROWS)}, "sizes": []}
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  # Warm-up: a tiny model, so that no row's compile time pays for one-off work (XLA's
  # start-up, the first trace through Flax and the capture).
  Model(32, 1, args.dtypes[0], 2, 8, rows=("adam", "adaact"), undonated=())
  for dtype in args.dtypes:
    for width, depth in sizes(args):
      results["sizes"].append(run_size(width, depth, dtype, args))
      results["meta"]["loadavg_end"] = _loadavg()
      results["meta"]["wall_s"] = time.perf_counter() - t0
      results["markdown"] = markdown(results)
      out.write_text(json.dumps(results, indent=1))  # after every size: partial runs keep theirs
  print(results["markdown"])
  if args.plot != "none":
    plot(results, args.plot)
    print(f"(plot: {args.plot})", file=sys.stderr)
  print(f"(JSON: {out})", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
