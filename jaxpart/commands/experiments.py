"""`jaxpart experiments`: regenerate the seed's tables and VERDICT.md in experiments/results."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from jaxpart.commands import _common
from jaxpart.config import ConfigError

NAME = "experiments"
HELP = "run the experiments that reproduce each table of the seed; write experiments/results"


def add_arguments(p):
  p.add_argument("--only", action="append", default=[], metavar="NAME",
                 help="run only this experiment (repeat or comma-separate); see --list")
  p.add_argument("--list", action="store_true", help="list the experiments and exit")
  p.add_argument("--results-dir", default=None, metavar="DIR",
                 help="where to write (default: experiments/results in the source tree)")
  p.add_argument("--no-measure", action="store_true",
                 help="model only: skip compiling and running on simulated devices")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  _common.add_json_arg(p)


def _import_experiments():
  """The experiments live in the source tree next to the package, not in the wheel."""
  try:
    import experiments  # noqa: PLC0415, F401
  except ImportError:
    root = Path(__file__).resolve().parents[2]
    if not (root / "experiments" / "__init__.py").exists():
      raise ConfigError(f"experiments/ not found next to the jaxpart package ({root}): "
                        f"run from a source checkout (pip install -e .)") from None
    sys.path.insert(0, str(root))
  from experiments import common, runner  # noqa: PLC0415
  return common, runner


def run(args) -> int:
  common, runner = _import_experiments()
  if args.list:
    for name in runner.SECTIONS:
      print(name)
    return 0
  only = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
  try:
    names = runner.select(only)
  except runner.UnknownExperiment as e:
    raise ConfigError(str(e)) from None
  ctx = common.Context(results_dir=Path(args.results_dir) if args.results_dir
                       else common.RESULTS_DIR,
                       measure=not args.no_measure, progress=not args.no_progress)
  t0 = time.perf_counter()
  done = runner.run(names, ctx)
  total = time.perf_counter() - t0
  if args.json:
    _common.emit_json({"results_dir": str(ctx.results_dir), "seconds": total,
                       "experiments": done, "notes": ctx.notes})
    return 0
  print(_common.table([[d["name"], f"{d['seconds']:.1f} s", len(d["files"])] for d in done],
                      ["experiment", "time", "files"]))
  print(f"wrote {ctx.results_dir} in {total:.1f} s")
  for note in ctx.notes:
    print(f"note: {note}")
  return 0
