"""Are two of bench.py's rows the same compiled program? Load-independent check.

Timings on a shared machine cannot resolve a 2% difference; the compiled
programs can. For each model this compiles bench.py's train steps, updates
and train-mode forwards (at a small batch: the program's structure does not
depend on it) and compares two rows' optimized HLO: the multiset of
(opcode, shape) over all instructions, XLA's flop count and bytes accessed.
It prints the differing (opcode, shape) pairs.

  python benchmarks/compare_programs.py                          # engine vs legacy capture
  python benchmarks/compare_programs.py --rows adaact_chain,adaact_momentum
  python benchmarks/compare_programs.py --models vit_tiny --batch 8
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import re
import sys
import warnings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench  # pylint: disable=wrong-import-position

_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%?[\w.\-]+ = (\S+) ([\w\-]+)\(")


def instructions(compiled) -> collections.Counter:
  """Multiset of (opcode, shape with layout) of a compiled program's HLO."""
  out = collections.Counter()
  for line in compiled.as_text().splitlines():
    m = _INSTRUCTION.match(line)
    if m:
      out[(m.group(2), m.group(1))] += 1
  return out


def compare(label, a, b, names, top):
  ia, ib = instructions(a), instructions(b)
  ca, cb = bench.compiled_cost(a), bench.compiled_cost(b)
  same = "identical" if ia == ib else "different"
  print(f"[{label}] HLO instructions {names[0]} {sum(ia.values())}, {names[1]} "
        f"{sum(ib.values())}: {same} (opcode, shape) multisets; flops {ca['flops']:.6g} / "
        f"{cb['flops']:.6g}; bytes accessed {ca['bytes_accessed']:.6g} / "
        f"{cb['bytes_accessed']:.6g}")
  diff = (ia - ib) + (ib - ia)
  for (op, shape), _ in sorted(diff.items(), key=lambda t: -t[1])[:top]:
    print(f"    {op:18s} {shape:40s} {names[0]} {ia[(op, shape)]:5d}  {names[1]} "
          f"{ib[(op, shape)]:5d}")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models", default="resnet20,vit_tiny")
  p.add_argument("--rows", default="adaact,adaact_legacy",
                 help=f"two of {bench.OPTIMIZERS}")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--top", type=int, default=12, help="differing (opcode, shape) pairs shown")
  args = p.parse_args(argv)
  rows = args.rows.split(",")
  if len(rows) != 2 or not set(rows) <= set(bench.OPTIMIZERS):
    p.error(f"--rows: two of {bench.OPTIMIZERS}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  warnings.simplefilter("ignore")  # e.g. the legacy capture's note on ViT's pos_embed
  forwards = {row: "forward+" + bench.CAPTURE[row] for row in rows if bench.CAPTURE[row]}
  for name in args.models.split(","):
    chosen = tuple(dict.fromkeys(("adam", "adamw", *rows)))
    w = bench.Workload(name, args.batch, False, chosen)
    compare(f"{name} train step", w.steps[rows[0]], w.steps[rows[1]], rows, args.top)
    compare(f"{name} update", w.updates[rows[0]], w.updates[rows[1]], rows, args.top)
    if len(set(forwards.values())) == 2:
      compare(f"{name} forward+capture", w.forwards[forwards[rows[0]]],
              w.forwards[forwards[rows[1]]], rows, args.top)


if __name__ == "__main__":
  main()
