"""`python -m experiments [--only NAME] [...]`: regenerate the seed's tables and VERDICT.md.

`jaxpart experiments` runs this module from the checkout; it calls only the library (never the
CLI). Simulated CPU devices must be requested before JAX starts, so the flag is set first.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

DEVICES = 16   # the seed's 16 GPUs, simulated on CPU; a GPU host ignores the flag

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} "
                             f"--xla_force_host_platform_device_count={DEVICES}").strip()

from experiments import common, runner  # noqa: E402  (after XLA_FLAGS, before JAX starts)
from jaxpart.jsonable import jsonable  # noqa: E402


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m experiments", description=__doc__.splitlines()[0])
  p.add_argument("--only", action="append", default=[], metavar="NAME",
                 help="run only this experiment (repeat or comma-separate); see --list")
  p.add_argument("--list", action="store_true", help="list the experiments and exit")
  p.add_argument("--results-dir", default=None, metavar="DIR",
                 help="where to write (default: experiments/results in the source tree)")
  p.add_argument("--no-measure", action="store_true",
                 help="model only: skip compiling and running on simulated devices")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  p.add_argument("--json", action="store_true", help="print JSON instead of a table")
  return p


def main(argv: list[str] | None = None) -> int:
  args = parser().parse_args(argv)
  if args.list:
    print("\n".join(runner.SECTIONS))
    return 0
  only = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
  try:
    names = runner.select(only)
  except runner.UnknownExperiment as e:
    print(f"experiments: error: {e}", file=sys.stderr)
    return 2
  ctx = common.Context(results_dir=Path(args.results_dir) if args.results_dir
                       else common.RESULTS_DIR,
                       measure=not args.no_measure, progress=not args.no_progress)
  t0 = time.perf_counter()
  done = runner.run(names, ctx)
  total = time.perf_counter() - t0
  if args.json:
    print(json.dumps({"results_dir": str(ctx.results_dir), "seconds": total,
                      "experiments": done, "notes": ctx.notes}, indent=2, default=jsonable))
    return 0
  width = max(len(d["name"]) for d in done)
  print(f"{'experiment':<{width}}  {'time':>8}  files")
  for d in done:
    print(f"{d['name']:<{width}}  {d['seconds']:>6.1f} s  {len(d['files']):>5}")
  print(f"wrote {ctx.results_dir} in {total:.1f} s")
  for note in ctx.notes:
    print(f"note: {note}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
