"""Run the experiments in order and write their results; the verdict goes last."""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

from experiments import common

# Order matters only for the verdict, which reads the others' JSON.
SECTIONS = ("sec2_memory", "sec3_partitioning", "sec3_cache", "sec4_throughput",
            "sec5_communication", "sec6_cache_hit", "sec7_scaling", "sec8_correctness",
            "chunk_sweep", "causes", "plots", "verdict")


class UnknownExperiment(ValueError):
  pass


def select(only: list[str] | None) -> list[str]:
  if not only:
    return list(SECTIONS)
  unknown = [n for n in only if n not in SECTIONS]
  if unknown:
    raise UnknownExperiment(f"--only {', '.join(unknown)}: unknown experiment; valid names are "
                            f"{', '.join(SECTIONS)}")
  return [n for n in SECTIONS if n in only]


def run(only: list[str] | None = None, ctx: common.Context | None = None) -> list[dict]:
  """Run the chosen experiments; returns one record per experiment: name, files, seconds."""
  ctx = ctx or common.Context()
  names = select(only)
  from tqdm import tqdm  # noqa: PLC0415
  done = []
  bar = tqdm(names, desc="experiments", disable=not ctx.progress, file=sys.stderr)
  for name in bar:
    bar.set_postfix_str(name)
    t0 = time.perf_counter()
    mod = importlib.import_module(f"experiments.{name}")
    result = mod.run(ctx)
    files = common.write(result, Path(ctx.results_dir))
    done.append({"name": name, "title": result.title, "seconds": time.perf_counter() - t0,
                 "files": [str(f) for f in files] + [str(Path(ctx.results_dir) / p)
                                                     for p in result.plots]})
  return done
