"""Measured autotuning: the cost model's top candidates compiled and timed on the devices present.

The planner ranks placements by predicted time (planner.plan_auto); this times the top K of that
ranking, interleaved with each other and with the single-device reference (bench.time_interleaved,
so load changes hit every candidate alike), picks the measured best, and says how well the two
rankings agree (Spearman's rank correlation). Where they disagree the cost model needs fixing,
not the measurement.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax

from jaxpart import validate
from jaxpart.cost import forward as costmodel
from jaxpart.measure import bench
from jaxpart.measure import load
from jaxpart.models import families
from jaxpart.placement import planner
from jaxpart.runtime import sizeguard
from jaxpart.config import Setup
from jaxpart.placement.plan import PlanError

MIN_TOP = 2   # a rank correlation needs two candidates


# --- rank correlation ------------------------------------------------------------------------

def ranks(values: Sequence[float]) -> list[float]:
  """1-based ranks, smallest first; tied values share the average of the ranks they span."""
  order = sorted(range(len(values)), key=lambda i: values[i])
  out = [0.0] * len(values)
  i = 0
  while i < len(order):
    j = i
    while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
      j += 1
    for k in range(i, j + 1):
      out[order[k]] = (i + j) / 2 + 1
    i = j + 1
  return out


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
  """Spearman's rank correlation: Pearson's correlation of the (tie-averaged) ranks, in
  [-1, 1]; NaN when it is undefined (fewer than two values, or either side all ties)."""
  if len(a) != len(b):
    raise ValueError(f"spearman: {len(a)} values against {len(b)}; need equal lengths")
  if len(a) < 2:
    return math.nan
  ra, rb = ranks(a), ranks(b)
  ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
  cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
  va = sum((x - ma) ** 2 for x in ra)
  vb = sum((y - mb) ** 2 for y in rb)
  if va == 0 or vb == 0:
    return math.nan
  return max(-1.0, min(1.0, cov / math.sqrt(va * vb)))


def _finite_or_none(x: float) -> float | None:
  return x if math.isfinite(x) else None


# --- measuring the ranking ---------------------------------------------------------------------

def top_candidates(setup: Setup, devices: int, top: int, cache_bytes: float | None = None, *,
                   tp: int | None = None, pp: int | None = None
                   ) -> tuple[list[tuple[float, Any]], str]:
  """The cost model's top `top` (predicted seconds, Plan) and how they were ranked, checked to
  run here: enough devices present, and each plan's engine within this machine's memory."""
  if top < MIN_TOP:
    raise PlanError(f"--top = {top}: measuring needs at least {MIN_TOP} candidates to rank")
  present = len(jax.devices())
  if devices > present:
    raise PlanError(f"--devices = {devices}: only {present} devices are present to time the "
                    f"candidates on (on CPU set XLA_FLAGS=--xla_force_host_platform_device_count="
                    f"{devices})")
  _, ranked, how = planner.plan_auto(setup, devices, cache_bytes, top, tp=tp, pp=pp,
                                   scorer=costmodel.SCORER)
  sizeguard.check_fits(setup, [p for _, p in ranked], "plan --measure")
  return ranked, how


def measure(setup: Setup, ranked: Sequence[tuple[float, Any]], *, repeats: int = 5,
            warmup: int = 1, seed: int = 0, progress: Callable[[int], Any] | None = None
            ) -> dict[str, Any]:
  """Compile every candidate's engine and the reference, time them interleaved, and compare
  the predicted ranking with the measured one. Each candidate's output is checked finite and
  against the reference (max_abs_err): a fast wrong placement is a bug, not a winner."""
  kp, kx = jax.random.split(jax.random.key(seed))
  family = families.of(setup.model)
  params = family.init_params(setup.model, kp)
  x = family.random_input(setup.model, setup.run.batch, setup.run.seq, kx)
  variants, reference = [], True
  for i, (_, plan) in enumerate(ranked):
    built = bench.build_variants(setup, plan, params, x, reference=reference, gspmd=False)
    built[0].name = f"candidate {i + 1}"
    if reference is True:
      reference = built[1]
    variants.append(built[0])
  variants.append(reference)
  before = load.start(f"plan --measure ({len(ranked)} candidates on {ranked[0][1].devices} "
                      f"devices):")
  rows = bench.bench_variants(setup, variants, repeats, warmup, progress)
  machine_load = load.finish(before)
  for v in variants:
    validate.check_finite(f"output of {v.name}", v.out)
  by = {r["name"]: r for r in rows}
  ref = by["reference"]
  cands = []
  for i, (score, plan) in enumerate(ranked):
    r = by[f"candidate {i + 1}"]
    cands.append({"rank_predicted": i + 1, "predicted_s": _finite_or_none(score),
                  "measured_s": r["median_s"], "measured_cpu_s": r["cpu_median_s"],
                  "runs_s": r["runs_s"], "cpu_runs_s": r["cpu_runs_s"],
                  "compile_s": r["compile_s"],
                  "measured_over_reference": r["median_s"] / ref["median_s"],
                  "measured_cpu_over_reference": r["cpu_median_s"] / ref["cpu_median_s"],
                  "max_abs_err_vs_reference": r["max_abs_err_vs_reference"], "plan": plan})
  for key, rank_key in (("measured_s", "rank_measured"), ("measured_cpu_s", "rank_measured_cpu")):
    for c, rk in zip(cands, ranks([c[key] for c in cands])):
      c[rank_key] = rk
  predicted = [s for s, _ in ranked]
  best = min(range(len(cands)), key=lambda i: cands[i]["measured_s"])
  return {
      "candidates": cands,
      "spearman": _finite_or_none(spearman(predicted, [c["measured_s"] for c in cands])),
      "spearman_cpu": _finite_or_none(spearman(predicted, [c["measured_cpu_s"] for c in cands])),
      "reference_s": ref["median_s"], "reference_cpu_s": ref["cpu_median_s"],
      "best": best, "model_agreed": best == 0,
      "model_pick_over_best": cands[0]["measured_s"] / cands[best]["measured_s"],
      "repeats": repeats, "warmup": warmup, "load": machine_load,
  }
