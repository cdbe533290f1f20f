"""`jaxpart experiments`: regenerate the seed's tables and VERDICT.md in experiments/results.

The experiments live in the source tree next to the package (not in the wheel) and call only
the library; this command runs `python -m experiments` from that checkout as a child process,
so nothing here imports them or edits sys.path.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jaxpart
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


def checkout_root() -> Path:
  """The source checkout holding both jaxpart/ and experiments/."""
  root = Path(jaxpart.__file__).resolve().parents[1]
  if not (root / "experiments" / "__main__.py").exists():
    raise ConfigError(f"experiments/ not found next to the jaxpart package ({root}): run from "
                      f"a source checkout (pip install -e .)")
  return root


def run(args) -> int:
  argv = [f"--only={name}" for name in args.only]
  argv += ["--list"] * args.list + ["--no-measure"] * args.no_measure
  argv += ["--no-progress"] * args.no_progress + ["--json"] * bool(args.json)
  if args.results_dir:
    argv.append(f"--results-dir={Path(args.results_dir).resolve()}")   # the child runs in root
  return subprocess.run([sys.executable, "-m", "experiments", *argv],
                        cwd=checkout_root()).returncode
