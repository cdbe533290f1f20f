"""The partitioning algorithm: turns (model, run shape, hardware, devices, strategy) into Plans.

Every refusal names the constraint that failed and lists what would be valid, because the
user's next step is to pick a valid device count, tp or chunk, not to read this code.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Iterable, NamedTuple

from jaxpart.placement import memory
from jaxpart.config import ModelConfig, Setup
from jaxpart.placement.grids import (baseline_grids, fmt_list, layerwise_grid, layerwise_grids,
                                    positive_int, valid_device_counts)
from jaxpart.placement.plan import (Plan, PlanError, check_tp, contiguous_stage_layers, divisors,
                                   valid_tps)

MAX_KV_BLOCK = 128
MIN_KV_BLOCK = 16
# Chunks auto also tries beyond the cache-fitted one: a chunk step re-reads the stage's whole
# weight shard, so bigger chunks trade L2 residency for fewer weight passes; the cost model
# decides which wins.
AUTO_EXTRA_TOKENS = (256, 512, 1024, 2048, 4096, 8192)


def default_kv_block(tokens: int) -> int:
  """Keys per online-softmax step: the chunk itself, kept within [16, 128]."""
  return max(MIN_KV_BLOCK, min(tokens, MAX_KV_BLOCK))


def working_set(cfg: ModelConfig, rows: int, tokens: int, tp: int, kv_block: int | None = None) -> int:
  kv = kv_block or default_kv_block(tokens)
  return memory.working_set_bytes(cfg, memory.StepShape(rows, tokens, kv, tp))


# --- device memory ---------------------------------------------------------------------------

# The baseline's default microbatches keep the forward within this share of device memory, so
# the whole batch's KV cache still fits beside it when decoding.
HBM_PLANNING_FRACTION = 0.5


def check_fits(setup: Setup, plan: Plan) -> None:
  """PlanError when the whole forward program (memory.program_bytes) exceeds the device."""
  cfg, run, hw = setup.model, setup.run, setup.hardware
  prog = memory.program_bytes(cfg, run, plan)
  if prog["total"] <= hw.hbm_bytes:
    return
  big = max((k for k in prog if k != "total"), key=prog.get)
  fixes = ["more devices (the input and output shares and the weights fall as 1/N)"]
  if plan.rows > 1:
    fixes.append("fewer rows per unit (--microbatches for the baseline, --chunk-rows for "
                 "layer-wise)")
  if plan.chunk_tokens > 1 and plan.strategy == "layerwise":
    fixes.append("shorter chunks (--chunk-tokens)")
  raise PlanError(f"{plan.strategy} {plan.stages} stages x tp {plan.tp}, {plan.split}: the "
                  f"forward needs {prog['total'] / 1e9:.2f} GB per device (largest part: "
                  f"{big.replace('_', ' ')}, {prog[big] / 1e9:.2f} GB), more than the "
                  f"{hw.name}'s {hw.hbm_bytes / 1e9:g} GB; try {'; or '.join(fixes)}")


def fits(setup: Setup, plan: Plan) -> bool:
  return memory.predicted_hbm_bytes(setup.model, setup.run, plan) <= setup.hardware.hbm_bytes


# --- layer-wise -----------------------------------------------------------------------------

def _budget(setup: Setup, cache_bytes: float | None) -> int:
  budget = setup.hardware.l2_bytes if cache_bytes is None else cache_bytes
  if not budget > 0:
    raise PlanError(f"cache budget = {budget!r} bytes: must be positive (--cache-mb > 0; the "
                    f"default is the hardware's L2, {setup.hardware.l2_bytes / 1e6:g} MB)")
  return int(budget)


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


def fit_chunk(cfg: ModelConfig, batch: int, seq: int, tp: int, budget: int,
              chunk_rows: int | None = None, chunk_tokens: int | None = None,
              kv_block: int | None = None) -> tuple[int, int]:
  """(rows, tokens) whose working set fits `budget`: for each row count (a divisor of batch)
  the most tokens that fit, and of those the one that streams the fewest bytes over the run
  (weights re-read every unit step, KV prefix re-read every chunk), ties to more tokens.
  Mostly this is the most token-rows; but for `paper` at tp 4 in 50 MB, 8 rows x 15 tokens
  (120 token-rows) beats 1 x 119 in token-rows yet re-reads the KV cache 8 times as often.
  Either of rows and tokens may be fixed. A budget too small for one token is an error, never
  a zero chunk."""
  row_options = [chunk_rows] if chunk_rows else divisors(batch)
  best, best_key = None, None
  for rows in row_options:
    if chunk_tokens is not None:
      tokens = chunk_tokens if working_set(cfg, rows, chunk_tokens, tp, kv_block) <= budget else 0
    else:
      tokens = _largest_fitting_tokens(cfg, rows, tp, seq, budget, kv_block)
    if not tokens:
      continue
    key = (sum(memory.run_streamed_bytes(cfg, batch, seq, rows, tokens, tp).values()), -tokens)
    if best_key is None or key < best_key:
      best, best_key = (rows, tokens), key
  if best is None:
    rows, tokens = (chunk_rows or 1), (chunk_tokens or 1)
    need = working_set(cfg, rows, tokens, tp, kv_block)
    fixes = f"raise --cache-mb to at least {need / 1e6:.3f}"
    if chunk_tokens is not None and chunk_tokens > 1:
      fixes += " or fix a smaller --chunk-tokens"
    if chunk_rows is not None and chunk_rows > 1:
      fixes += " or a smaller --chunk-rows"
    if tp < max(valid_tps(cfg)):
      fixes += " or use more tensor parallelism"
    raise PlanError(
        f"cache budget = {budget:,} bytes is too small: even {rows} row(s) x {tokens} token(s) "
        f"needs a working set of {need:,} bytes at tp {tp}; {fixes}")
  return best


def plan_layerwise(setup: Setup, devices: int, *, tp: int | None = None,
                   cache_bytes: float | None = None, chunk_tokens: int | None = None,
                   chunk_rows: int | None = None, kv_block: int | None = None) -> Plan:
  """Contiguous layers per stage, tp inside each stage, the input streamed in token chunks.

  Unless fixed, the chunk (rows x tokens) is the largest whose predicted working set fits the
  cache budget (see fit_chunk for how rows are traded against tokens). A chunk the user fixes
  in full is kept even over budget, and the reason says so.
  """
  stages, tp, grid_why = layerwise_grid(setup.model, devices, tp)
  return _layerwise(setup, devices, stages, tp, grid_why, cache_bytes=cache_bytes,
                    chunk_tokens=chunk_tokens, chunk_rows=chunk_rows, kv_block=kv_block)


def _layerwise(setup: Setup, devices: int, stages: int, tp: int, grid_why: str, *,
               cache_bytes: float | None, chunk_tokens: int | None, chunk_rows: int | None,
               kv_block: int | None, fixed_why: str = "chunk fixed by the user") -> Plan:
  cfg, run = setup.model, setup.run
  budget = _budget(setup, cache_bytes)
  if chunk_rows is not None:
    positive_int("chunk_rows", chunk_rows)
    if run.batch % chunk_rows:
      raise PlanError(f"chunk_rows = {chunk_rows}: must divide batch = {run.batch}; valid: "
                      f"{fmt_list(divisors(run.batch))}")
  if chunk_tokens is not None:
    positive_int("chunk_tokens", chunk_tokens)
    if chunk_tokens > run.seq:
      raise PlanError(f"chunk_tokens = {chunk_tokens}: must be in 1..seq = {run.seq}")
  if kv_block is not None:
    positive_int("kv_block", kv_block)

  if chunk_tokens is not None and chunk_rows is not None:
    rows, tokens = chunk_rows, chunk_tokens
    why = f"{fixed_why}: {rows} row(s) x {tokens} tokens"
  else:
    rows, tokens = fit_chunk(cfg, run.batch, run.seq, tp, budget, chunk_rows, chunk_tokens,
                             kv_block)
    fixed = (f" with {chunk_rows} rows fixed" if chunk_rows else
             f" with {chunk_tokens} tokens fixed" if chunk_tokens else "")
    why = (f"largest chunk{fixed} whose predicted working set fits the {budget / 1e6:g} MB "
           f"budget, rows chosen to stream the fewest weight and KV bytes: {rows} row(s) x "
           f"{tokens} tokens")
  kv = kv_block or default_kv_block(tokens)
  ws = working_set(cfg, rows, tokens, tp, kv)
  if ws > budget:
    why += (f"; NOTE: its predicted working set {ws:,} B exceeds the {budget:,} B budget "
            f"({ws / budget:.1f}x)")
  return Plan(strategy="layerwise", devices=devices, stages=stages, tp=tp,
              stage_layers=contiguous_stage_layers(cfg.layers, stages), batch=run.batch,
              seq=run.seq, microbatches=run.batch // rows, chunk_tokens=tokens, kv_block=kv,
              predicted_working_set_bytes=ws, cache_budget_bytes=budget,
              reason=f"{grid_why}; {why}")


# --- baseline -------------------------------------------------------------------------------

def plan_baseline(setup: Setup, devices: int, *, tp: int | None, pp: int | None,
                  microbatches: int | None = None, kv_block: int | None = None,
                  cache_bytes: float | None = None) -> Plan:
  """Megatron TP x PP: pp stages over contiguous layers, GPipe over microbatches of the batch.

  Each microbatch goes through whole (one chunk of the full sequence); given one of tp and pp
  the other is devices / it.
  """
  cfg, run = setup.model, setup.run
  positive_int("devices", devices)
  pairs = baseline_grids(cfg, devices)
  valid = f"valid (tp, pp) on {devices} devices for this model: {fmt_list(pairs)}"
  if tp is None and pp is None:
    raise PlanError(f"baseline needs --tp and/or --pp (the seed's baseline is --tp 8 --pp 2); "
                    f"{valid}")
  for name, v in (("tp", tp), ("pp", pp)):
    if v is not None:
      positive_int(name, v)
      if devices % v:
        raise PlanError(f"{name} = {v} does not divide devices = {devices}; {valid}")
  tp = devices // pp if tp is None else tp
  pp = devices // tp if pp is None else pp
  if tp * pp != devices:
    raise PlanError(f"tp x pp = {tp} x {pp} = {tp * pp} != devices = {devices}; {valid}")
  try:
    check_tp(cfg, tp)
    stage_layers = contiguous_stage_layers(cfg.layers, pp)
  except PlanError as e:
    raise PlanError(f"baseline tp {tp} x pp {pp}: {e}; {valid}") from None
  if microbatches is None:
    # GPipe wants M >> pp to shrink the (pp-1)/(M+pp-1) bubble; 4 x pp is the usual choice.
    # A whole-sequence microbatch is also what fills memory: more, smaller microbatches until
    # the forward takes at most half the device (the rest is for the whole batch's KV cache
    # when decoding), if any divisor of the batch gets there.
    gpipe = max(d for d in divisors(run.batch) if d <= 4 * pp)
    half = HBM_PLANNING_FRACTION * setup.hardware.hbm_bytes
    microbatches = next((d for d in divisors(run.batch) if d >= gpipe and memory.predicted_hbm_bytes(
        cfg, run, _baseline_plan(setup, devices, tp, pp, stage_layers, d, kv_block)) <= half), gpipe)
    m_why = f"GPipe over {microbatches} microbatches (largest divisor of batch <= 4 x pp"
    m_why += ")" if microbatches == gpipe else (
        f" is {gpipe}; {microbatches} keeps the forward within {HBM_PLANNING_FRACTION:.0%} of "
        f"the device's {setup.hardware.hbm_bytes / 1e9:g} GB)")
  else:
    positive_int("microbatches", microbatches)
    if run.batch % microbatches:
      raise PlanError(f"microbatches = {microbatches} must divide batch = {run.batch}; valid: "
                      f"{fmt_list(divisors(run.batch))}")
    m_why = f"GPipe over {microbatches} microbatches"
  if kv_block is not None:
    positive_int("kv_block", kv_block)
  budget = _budget(setup, cache_bytes)
  plan = _baseline_plan(setup, devices, tp, pp, stage_layers, microbatches, kv_block, budget)
  ws = plan.predicted_working_set_bytes
  return replace(plan, reason=f"Megatron TP{tp} x PP{pp}, {m_why}; whole sequence per "
                              f"microbatch, predicted working set {ws / budget:.1f}x the cache "
                              f"budget")


def _baseline_plan(setup: Setup, devices: int, tp: int, pp: int, stage_layers, microbatches: int,
                   kv_block: int | None, budget: int = 0) -> Plan:
  cfg, run = setup.model, setup.run
  kv = kv_block or default_kv_block(run.seq)
  return Plan(strategy="baseline", devices=devices, stages=pp, tp=tp, stage_layers=stage_layers,
              batch=run.batch, seq=run.seq, microbatches=microbatches, chunk_tokens=run.seq,
              kv_block=kv, predicted_working_set_bytes=working_set(
                  cfg, run.batch // microbatches, run.seq, tp, kv),
              cache_budget_bytes=budget)


# --- auto -----------------------------------------------------------------------------------

def candidates(setup: Setup, devices: int, cache_bytes: float | None = None, *,
               tp: int | None = None, pp: int | None = None) -> list[Plan]:
  """Every valid (stages, tp, split, chunk) choice: baseline grids over several microbatch
  counts; layer-wise with the cache-fitted chunk and with larger chunks that overflow it.
  tp and pp, when given, keep only grids with that tp or that many stages."""
  cfg, run = setup.model, setup.run
  positive_int("devices", devices)
  budget = _budget(setup, cache_bytes)
  out: list[Plan] = []
  grids = [(s, t) for s, t, p in layerwise_grids(cfg, devices) if not p
           and (tp is None or t == tp) and (pp is None or s == pp)]
  for stages, t in grids:
    for m in sorted({d for d in divisors(run.batch) if d <= 4 * stages} | {1}):
      out.append(plan_baseline(setup, devices, tp=t, pp=stages, microbatches=m,
                               cache_bytes=budget))
    grid = f"candidate grid {stages} stages x tp {t}"
    try:
      fitted = _layerwise(setup, devices, stages, t, grid, cache_bytes=budget,
                          chunk_tokens=None, chunk_rows=None, kv_block=None)
    except PlanError:
      continue  # budget below one token at this tp: only the baseline remains here
    out.append(fitted)
    for tokens in AUTO_EXTRA_TOKENS:
      if fitted.chunk_tokens < tokens < run.seq:
        out.append(_layerwise(setup, devices, stages, t, grid, cache_bytes=budget,
                              chunk_tokens=tokens, chunk_rows=fitted.rows, kv_block=None,
                              fixed_why="chunk larger than the cache budget, fewer weight "
                                        "passes"))
  if not out:
    asked = "".join(f", {n} = {v}" for n, v in (("tp", tp), ("pp", pp)) if v is not None)
    raise PlanError(f"devices = {devices}{asked}: no (stages, tp) split works for this model. "
                    f"Layer-wise device counts that do: {fmt_list(valid_device_counts(cfg))}; "
                    f"(stages, tp) grids on {devices} devices: "
                    f"{fmt_list((s, t) for s, t, p in layerwise_grids(cfg, devices) if not p)}")
  return out


def heuristic_score(setup: Setup, plan: Plan) -> float:
  """Lower is better: bubble share plus how far the working set overflows the cache."""
  overflow = max(0.0, plan.predicted_working_set_bytes / max(plan.cache_budget_bytes, 1) - 1.0)
  return plan.bubble_fraction + overflow


class Scorer(NamedTuple):
  """How plan_auto ranks candidates (lower is better) and what it says it ranked by. The
  caller chooses: placement/ never imports the cost model (cost.forward.SCORER is the usual)."""

  how: str
  score: Callable[[Setup, Plan], float]


HEURISTIC = Scorer("heuristic (bubble fraction + cache overflow; lower is better)", heuristic_score)


def plan_auto(setup: Setup, devices: int, cache_bytes: float | None = None, top: int = 5, *,
              tp: int | None = None, pp: int | None = None, scorer: Scorer
              ) -> tuple[Plan, list[tuple[float, Plan]], str]:
  """Rank every candidate by scorer; returns the winner, the top few (score, plan) and the
  ranking used.

  Equal scores go to the larger unit (rows x tokens): each unit step re-reads the weights.
  """
  how, scorer = scorer
  every = candidates(setup, devices, cache_bytes, tp=tp, pp=pp)
  pool = [p for p in every if fits(setup, p)]
  if not pool:
    least = min(every, key=lambda p: memory.predicted_hbm_bytes(setup.model, setup.run, p))
    check_fits(setup, least)  # raises, naming the smallest candidate's figure and the fixes
  ranked = sorted(((float(scorer(setup, p)), p) for p in pool),
                  key=lambda sp: (sp[0], -sp[1].rows * sp[1].chunk_tokens))
  score, best = ranked[0]
  why = f"auto: best of {len(pool)} candidates ranked by {how}, score {score:.6g}"
  if len(ranked) > 1:
    s2, p2 = ranked[1]
    why += f" (next: {p2.strategy} {p2.stages}x{p2.tp} {p2.split}, score {s2:.6g})"
  best = replace(best, reason=f"{why}; {best.reason}")
  return best, [(score, best)] + ranked[1:top], how


# Options each strategy does not use, and what to do instead: passing one is an error, never
# silently dropped.
_UNUSED = {
    "baseline": ({"chunk_tokens", "chunk_rows"},
                 "the baseline runs each microbatch's whole sequence; split the batch with "
                 "--microbatches, or chunk tokens with --strategy layerwise"),
    "layerwise": ({"pp", "microbatches"},
                  "layer-wise derives stages from devices and tp (stages = devices / tp) and "
                  "splits the batch with --chunk-rows"),
    "auto": ({"microbatches", "chunk_tokens", "chunk_rows", "kv_block"},
             "auto searches these itself; fix them with --strategy baseline or layerwise "
             "(auto does take --tp, --pp and --cache-mb)"),
}


def check_options(strategy: str, **options) -> None:
  """PlanError for an unknown strategy or an option (not None) the strategy would not use."""
  if strategy not in _UNUSED:
    raise PlanError(f"strategy = {strategy!r}: valid strategies are {', '.join(_UNUSED)}")
  unused, hint = _UNUSED[strategy]
  given = [f"--{n.replace('_', '-')}" for n, v in options.items() if v is not None and n in unused]
  if given:
    verb = "does" if len(given) == 1 else "do"
    raise PlanError(f"{', '.join(given)} {verb} not apply to strategy {strategy!r}: {hint}")


def make_plan(setup: Setup, devices: int, strategy: str, *, tp: int | None = None,
              pp: int | None = None, microbatches: int | None = None,
              cache_bytes: float | None = None, chunk_tokens: int | None = None,
              chunk_rows: int | None = None, kv_block: int | None = None,
              fit_memory: bool = True, scorer: Scorer | None = None) -> Plan:
  """One entry for every command: the strategy name picks the algorithm. A plan whose forward
  does not fit the device is refused (check_fits) unless fit_memory is False, which models use
  to show what a placement would cost, fitting or not. Strategy "auto" ranks by `scorer`."""
  check_options(strategy, pp=pp, microbatches=microbatches, chunk_tokens=chunk_tokens,
                chunk_rows=chunk_rows, kv_block=kv_block)
  if strategy == "baseline":
    plan = plan_baseline(setup, devices, tp=tp, pp=pp, microbatches=microbatches,
                         kv_block=kv_block, cache_bytes=cache_bytes)
  elif strategy == "layerwise":
    plan = plan_layerwise(setup, devices, tp=tp, cache_bytes=cache_bytes,
                          chunk_tokens=chunk_tokens, chunk_rows=chunk_rows, kv_block=kv_block)
  else:
    if scorer is None:
      raise TypeError("make_plan(strategy='auto') needs a scorer (cost.forward.SCORER)")
    plan = plan_auto(setup, devices, cache_bytes, tp=tp, pp=pp, scorer=scorer)[0]
  if fit_memory:
    check_fits(setup, plan)
  return plan


def describe(plans: Iterable[Plan]) -> list[str]:
  return [f"{p.strategy:9s} {p.stages}x{p.tp} {p.split}" for p in plans]
