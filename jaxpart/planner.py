"""The partitioning algorithm: turns (model, run shape, hardware, devices, strategy) into Plans.

Every refusal names the constraint that failed and lists what would be valid, because the
user's next step is to pick a valid device count, tp or chunk, not to read this code.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Iterable

from jaxpart import memory
from jaxpart.config import ModelConfig, Setup
from jaxpart.plan import Plan, PlanError, contiguous_stage_layers, divisors

MAX_KV_BLOCK = 128
MIN_KV_BLOCK = 16


def check_tp(cfg: ModelConfig, tp: int) -> None:
  problems = []
  if cfg.n_heads % tp:
    problems.append(f"n_heads = {cfg.n_heads} is not divisible by tp = {tp}")
  if cfg.d_ff % tp:
    problems.append(f"d_ff = {cfg.d_ff} is not divisible by tp = {tp}")
  if problems:
    valid = [t for t in divisors(cfg.n_heads) if cfg.d_ff % t == 0]
    raise PlanError(f"tp = {tp}: {'; '.join(problems)}. Valid tp degrees for this model: "
                    f"{', '.join(map(str, valid))}")


def default_kv_block(tokens: int) -> int:
  """Keys per online-softmax step: the chunk itself, kept within [16, 128]."""
  return max(MIN_KV_BLOCK, min(tokens, MAX_KV_BLOCK))


def working_set(cfg: ModelConfig, rows: int, tokens: int, tp: int, kv_block: int | None = None) -> int:
  kv = kv_block or default_kv_block(tokens)
  return sum(memory.step_working_set(cfg, memory.StepShape(rows, tokens, kv, tp)).values())


def _layerwise_grid(cfg: ModelConfig, devices: int, tp: int | None = None) -> tuple[int, int]:
  """(stages, tp): one layer group per stage, as many stages as layers and devices allow."""
  if devices <= 0:
    raise PlanError(f"devices = {devices}: must be a positive integer")
  if tp is not None:
    if devices % tp:
      raise PlanError(f"tp = {tp} does not divide devices = {devices}; valid tp: "
                      f"{', '.join(map(str, divisors(devices)))}")
    stages = devices // tp
    contiguous_stage_layers(cfg.layers, stages)
  else:
    common = [s for s in divisors(cfg.layers) if devices % s == 0]
    stages = max(common)
    tp = devices // stages
  try:
    check_tp(cfg, tp)
  except PlanError as e:
    raise PlanError(
        f"devices = {devices} gives {stages} stages x tp {tp} (stages must divide both "
        f"layers = {cfg.layers} and devices): {e}. Device counts that plan this model "
        f"layer-wise: {', '.join(map(str, valid_device_counts(cfg)))}") from None
  return stages, tp


def valid_device_counts(cfg: ModelConfig, limit: int = 128) -> list[int]:
  out = []
  for n in range(1, limit + 1):
    stages = max(s for s in divisors(cfg.layers) if n % s == 0)
    t = n // stages
    if cfg.n_heads % t == 0 and cfg.d_ff % t == 0:
      out.append(n)
  return out


def _largest_fitting_tokens(cfg, rows, tp, seq, budget, kv_block) -> int:
  """Largest token count whose working set fits; 0 if not even one token does."""
  lo, hi = 0, seq
  while lo < hi:  # working set grows monotonically with tokens
    mid = (lo + hi + 1) // 2
    if working_set(cfg, rows, mid, tp, kv_block) <= budget:
      lo = mid
    else:
      hi = mid - 1
  return lo


def plan_layerwise(setup: Setup, devices: int, *, tp: int | None = None,
                   cache_bytes: float | None = None, chunk_tokens: int | None = None,
                   chunk_rows: int | None = None, kv_block: int | None = None) -> Plan:
  """Contiguous layers per stage, tp inside each stage, the input streamed in token chunks.

  Unless fixed, the chunk (rows x tokens) is the one with the most tokens-rows whose predicted
  working set fits the cache budget; ties go to more rows (fewer passes over the KV cache).
  """
  cfg, run = setup.model, setup.run
  stages, tp = _layerwise_grid(cfg, devices, tp)
  budget = int(cache_bytes if cache_bytes is not None else setup.hardware.l2_bytes)
  if budget <= 0:
    raise PlanError(f"cache budget = {budget} bytes: must be positive")
  if chunk_rows is not None and (chunk_rows <= 0 or run.batch % chunk_rows):
    raise PlanError(f"chunk_rows = {chunk_rows}: must divide batch = {run.batch}; valid: "
                    f"{', '.join(map(str, divisors(run.batch)))}")
  if chunk_tokens is not None and not 0 < chunk_tokens <= run.seq:
    raise PlanError(f"chunk_tokens = {chunk_tokens}: must be in 1..seq = {run.seq}")

  if chunk_tokens is not None and chunk_rows is not None:
    rows, tokens, why = chunk_rows, chunk_tokens, "chunk fixed by the user"
  else:
    row_options = [chunk_rows] if chunk_rows else sorted(divisors(run.batch), reverse=True)
    best = None
    for rows in row_options:
      if chunk_tokens is not None:
        tokens = chunk_tokens if working_set(cfg, rows, chunk_tokens, tp, kv_block) <= budget else 0
      else:
        tokens = _largest_fitting_tokens(cfg, rows, tp, run.seq, budget, kv_block)
      if tokens and (best is None or rows * tokens > best[0] * best[1]):
        best = (rows, tokens)
    if best is None:
      one = working_set(cfg, 1, chunk_tokens or 1, tp, kv_block)
      raise PlanError(
          f"cache budget = {budget:,} bytes is too small: even 1 row x {chunk_tokens or 1} "
          f"token(s) needs {one:,} bytes at tp {tp}. Raise --cache-mb to at least "
          f"{one / 1e6:.3f} or use more tensor parallelism")
    rows, tokens = best
    why = (f"largest chunk whose predicted working set fits the {budget / 1e6:g} MB budget "
           f"({rows} rows x {tokens} tokens)")
  kv = kv_block or default_kv_block(tokens)
  ws = working_set(cfg, rows, tokens, tp, kv)
  if ws > budget:
    why += f"; NOTE: its working set {ws:,} B exceeds the {budget:,} B budget"
  return Plan(strategy="layerwise", devices=devices, stages=stages, tp=tp,
              stage_layers=contiguous_stage_layers(cfg.layers, stages), batch=run.batch,
              seq=run.seq, microbatches=run.batch // rows, chunk_tokens=tokens, kv_block=kv,
              predicted_working_set_bytes=ws, cache_budget_bytes=budget, reason=why)


def plan_baseline(setup: Setup, devices: int, *, tp: int, pp: int,
                  microbatches: int | None = None, kv_block: int | None = None,
                  cache_bytes: float | None = None) -> Plan:
  """Megatron TP x PP: pp stages over contiguous layers, GPipe over microbatches of the batch."""
  cfg, run = setup.model, setup.run
  if tp is None or pp is None:
    raise PlanError("baseline needs both --tp and --pp (the seed's baseline is --tp 8 --pp 2)")
  if tp * pp != devices:
    raise PlanError(f"tp x pp = {tp} x {pp} = {tp * pp} != devices = {devices}; valid (tp, pp) "
                    f"pairs: {', '.join(f'({devices // p}, {p})' for p in divisors(devices))}")
  check_tp(cfg, tp)
  stage_layers = contiguous_stage_layers(cfg.layers, pp)
  if microbatches is None:
    # GPipe wants M >> pp to shrink the (pp-1)/(M+pp-1) bubble; 4 x pp is the usual choice.
    microbatches = max(d for d in divisors(run.batch) if d <= 4 * pp)
  elif microbatches <= 0 or run.batch % microbatches:
    raise PlanError(f"microbatches = {microbatches} must divide batch = {run.batch}; valid: "
                    f"{', '.join(map(str, divisors(run.batch)))}")
  rows = run.batch // microbatches
  kv = kv_block or default_kv_block(run.seq)
  budget = int(cache_bytes if cache_bytes is not None else setup.hardware.l2_bytes)
  return Plan(strategy="baseline", devices=devices, stages=pp, tp=tp, stage_layers=stage_layers,
              batch=run.batch, seq=run.seq, microbatches=microbatches, chunk_tokens=run.seq,
              kv_block=kv, predicted_working_set_bytes=working_set(cfg, rows, run.seq, tp, kv),
              cache_budget_bytes=budget,
              reason=f"Megatron TP{tp} x PP{pp}, GPipe over {microbatches} microbatches")


def candidates(setup: Setup, devices: int, cache_bytes: float | None = None) -> list[Plan]:
  """Every valid (stages, tp, split) choice: baseline grids and cache-fitted layer-wise chunks."""
  cfg = setup.model
  out: list[Plan] = []
  for stages in divisors(cfg.layers):
    if devices % stages:
      continue
    tp = devices // stages
    try:
      check_tp(cfg, tp)
    except PlanError:
      continue
    for m in sorted({d for d in divisors(setup.run.batch) if d <= 4 * stages} | {1}):
      out.append(plan_baseline(setup, devices, tp=tp, pp=stages, microbatches=m,
                               cache_bytes=cache_bytes))
    try:
      out.append(plan_layerwise(setup, devices, tp=tp, cache_bytes=cache_bytes))
    except PlanError:
      pass
  if not out:
    raise PlanError(f"devices = {devices}: no (stages, tp) split works for this model. Device "
                    f"counts that do: {', '.join(map(str, valid_device_counts(cfg)))}")
  return out


def heuristic_score(setup: Setup, plan: Plan) -> float:
  """Lower is better: bubble share plus how far the working set overflows the cache."""
  overflow = max(0.0, plan.predicted_working_set_bytes / max(plan.cache_budget_bytes, 1) - 1.0)
  return plan.bubble_fraction + overflow


def _default_scorer() -> tuple[str, Callable[[Setup, Plan], float]]:
  try:
    from jaxpart import costmodel  # noqa: PLC0415  (optional: planner must not need it)
  except ImportError:
    return "heuristic (bubble + cache overflow)", heuristic_score
  return "cost model (predicted seconds per run)", costmodel.score


def plan_auto(setup: Setup, devices: int, cache_bytes: float | None = None,
              top: int = 5) -> tuple[Plan, list[tuple[float, Plan]], str]:
  """Rank every candidate; returns the winner, the top few (score, plan) and the ranking used."""
  how, scorer = _default_scorer()
  ranked = sorted(((scorer(setup, p), p) for p in candidates(setup, devices, cache_bytes)),
                  key=lambda sp: sp[0])
  best = ranked[0][1]
  best = replace(best, reason=f"auto, ranked by {how}: {best.reason}")
  return best, ranked[:top], how


def make_plan(setup: Setup, devices: int, strategy: str, *, tp: int | None = None,
              pp: int | None = None, microbatches: int | None = None,
              cache_bytes: float | None = None, chunk_tokens: int | None = None,
              chunk_rows: int | None = None, kv_block: int | None = None) -> Plan:
  """One entry for every command: the strategy name picks the algorithm."""
  if strategy == "baseline":
    return plan_baseline(setup, devices, tp=tp, pp=pp, microbatches=microbatches,
                         kv_block=kv_block, cache_bytes=cache_bytes)
  if strategy == "layerwise":
    if pp is not None:
      raise PlanError("--pp applies to the baseline; layer-wise derives stages from devices and "
                      "tp (stages = devices / tp)")
    return plan_layerwise(setup, devices, tp=tp, cache_bytes=cache_bytes,
                          chunk_tokens=chunk_tokens, chunk_rows=chunk_rows, kv_block=kv_block)
  if strategy == "auto":
    return plan_auto(setup, devices, cache_bytes)[0]
  raise PlanError(f"strategy = {strategy!r}: valid strategies are baseline, layerwise, auto")


def describe(plans: Iterable[Plan]) -> list[str]:
  return [f"{p.strategy:9s} {p.stages}x{p.tp} {p.split}" for p in plans]
