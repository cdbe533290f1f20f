"""serve-bench: a seeded request stream served three ways on one placement, interleaved.

- static: today's generate with batches formed by arrival. Up to S requests that have arrived
  are padded to one shape (S x the stream's longest prompt, its longest output) compiled once,
  prefilled together and decoded in lock-step until the longest of them ends; a request that
  arrives meanwhile waits for the whole batch.
- continuous: the persistent paged step, whole prompts prefilled in a step of their own.
- chunked: the same with prompt chunks beside the decodes (Sarathi-Serve).

Per mode it reports throughput, TTFT and ITL percentiles, goodput at the SLO, kv_waste,
preemptions, host_gap_fraction (wall time when no device step runs and no request is waited
for, over wall time) and the ITL p50 of decode-only steps. Times are wall times unless the
virtual clock is asked for (tests): on a shared machine they say so through the load record.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np
from tqdm import tqdm

from jaxpart.config import RunShape, Setup
from jaxpart.errors import UserError
from jaxpart.measure import load
from jaxpart.runtime import generate, runs
from jaxpart.serving import workload
from jaxpart.serving.engine_loop import Completion, LoopOptions, serve
from jaxpart.serving.kv_pages import DEFAULT_BLOCK_TOKENS, check_pool_fits
from jaxpart.serving.requests import Request, SamplingParams
from jaxpart.serving.step import Stepper

MODES = ("static", "continuous", "chunked")
CONTEXT_CAP = workload.PROMPT_RANGE[1] + workload.OUTPUT_RANGE[1]   # the longest request
SLO_TTFT_X, SLO_ITL_X = 5.0, 2.0


class ServeBenchError(UserError):
  """A serve-bench option is invalid; the message names the flag and what is valid."""


@dataclass(frozen=True)
class ServeBenchOptions:
  """The stream, the scheduler, the pool and the SLO (None: measured unloaded at the start)."""
  scenarios: tuple[str, ...] = workload.SCENARIOS
  rates: tuple[float, ...] = (1.0,)
  requests: int = 100
  seed: int = 0
  slots: int = 8
  chunk_tokens: int = 256
  kv_blocks: int | None = None          # default: every slot can hold a whole context
  block_tokens: int = DEFAULT_BLOCK_TOKENS
  slo_ttft_s: float | None = None
  slo_itl_s: float | None = None
  clock: str = "wall"
  virtual_step_s: float = 0.01
  modes: tuple[str, ...] = MODES

  def __post_init__(self):
    bad = [s for s in self.scenarios if s not in workload.SCENARIOS]
    if bad or not self.scenarios:
      raise ServeBenchError(f"--scenario = {bad[0] if bad else ''!r}: valid scenarios are "
                            f"{', '.join(workload.SCENARIOS)}, all")
    if not self.rates or any(not (isinstance(r, (int, float)) and r > 0) for r in self.rates):
      raise ServeBenchError(f"--rates = {','.join(map(str, self.rates))}: rates are requests "
                            f"per second, each > 0, for example 0.5,1,2")
    for flag, v in (("--requests", self.requests), ("--slots", self.slots),
                    ("--chunk-tokens", self.chunk_tokens), ("--block-tokens", self.block_tokens)):
      if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ServeBenchError(f"{flag} = {v!r}: must be a positive integer")
    for flag, v in (("--slo-ttft-s", self.slo_ttft_s), ("--slo-itl-s", self.slo_itl_s)):
      if v is not None and not v > 0:
        raise ServeBenchError(f"{flag} = {v!r}: must be > 0 seconds (or omitted: measured)")
    bad = [m for m in self.modes if m not in MODES]
    if bad:
      raise ServeBenchError(f"modes holds {bad[0]!r}: valid modes are {', '.join(MODES)}")


def context_of(setup: Setup) -> int:
  """The stream's context: the model's, capped at the longest request the workload draws."""
  return min(setup.model.max_positions, CONTEXT_CAP)


def pool_blocks(opts: ServeBenchOptions, context: int) -> int:
  """--kv-blocks, or enough for every slot to hold a whole context; refused when too small."""
  per_seq = -(-context // opts.block_tokens)
  blocks = opts.kv_blocks if opts.kv_blocks is not None else opts.slots * per_seq
  if not isinstance(blocks, int) or blocks <= 0:
    raise ServeBenchError(f"--kv-blocks = {blocks!r}: must be a positive integer")
  check_pool_fits(blocks, opts.block_tokens, context)
  return blocks


def streams(setup: Setup, opts: ServeBenchOptions) -> dict:
  """(scenario, rate) -> the seeded request stream."""
  ctx, vocab = context_of(setup), setup.model.vocab
  return {(sc, r): workload.make(sc, opts.requests, r, ctx, vocab, opts.seed)
          for sc in opts.scenarios for r in opts.rates}


@dataclass
class Servers:
  """What serves every mode: one Stepper (continuous and chunked share its pool) and one
  static Generator, compiled for the shapes of every stream."""
  stepper: Stepper
  static: generate.Generator
  loop: LoopOptions
  prompt_max: int
  output_max: int


def build(setup: Setup, plan_for: Callable[[Setup], object], opts: ServeBenchOptions,
          all_streams: dict) -> Servers:
  """Plan (plan_for gets the setup with run shape slots x the longest prompt), place and
  compile. Parameters are random (seeded by opts.seed), so tokens are arbitrary but fixed."""
  reqs = [r for s in all_streams.values() for r in s]
  p_max = max(len(r.prompt) for r in reqs)
  o_max = max(r.params.max_tokens for r in reqs)
  context = context_of(setup)
  blocks = pool_blocks(opts, context)
  setup = dataclasses.replace(setup, run=RunShape(opts.slots, p_max))
  plan = plan_for(setup)
  params = runs.host_params(setup, opts.seed)
  stepper = Stepper(setup, plan, params, blocks, opts.block_tokens)
  static = generate.Generator(setup, plan, params, o_max)
  loop = LoopOptions(opts.slots, opts.chunk_tokens, context, blocks,
                     block_tokens=opts.block_tokens, clock=opts.clock,
                     virtual_step_s=opts.virtual_step_s)
  return Servers(stepper, static, loop, p_max, o_max)


def warm_up(sv: Servers, vocab: int) -> None:
  """Compile every shape a mode can use before anything is timed: chunked's one step,
  continuous's decode step and each prefill bucket, static's prefill and cycle."""
  ctx = sv.loop.context
  one = lambda i, n, m: Request(("warm", i), tuple(range(1, n + 1)) if n < vocab else  # noqa: E731
                                tuple(int(t) % vocab for t in range(n)), 0.0,
                                SamplingParams(max_tokens=m))
  serve(sv.stepper, [one(0, 4, 2)], dataclasses.replace(sv.loop, mode="chunked"))
  loop = dataclasses.replace(sv.loop, mode="continuous")
  for i, b in enumerate(loop.scheduler_config().buckets):
    serve(sv.stepper, [one(i, max(1, min(b, ctx - 2)), 2)], loop)
  ids = np.zeros((sv.static.plan.batch, sv.prompt_max), np.int32)
  sv.static.run(ids, np.ones(len(ids), np.int32), steps=1)


def unloaded_slo(sv: Servers, vocab: int, opts: ServeBenchOptions) -> dict:
  """One request alone (the median prompt, 16 tokens out) in chunked mode: its TTFT and median
  ITL, and the SLO as 5x and 2x those unless the flags gave it."""
  n = min(int(workload.PROMPT_MEDIAN), sv.loop.context - 16)
  req = Request("unloaded", tuple(int(t) for t in np.random.default_rng(opts.seed).integers(
      0, vocab, n)), 0.0, SamplingParams(max_tokens=16))
  c = serve(sv.stepper, [req], dataclasses.replace(sv.loop, mode="chunked")).completions[
      "unloaded"]
  ttft, step = c.ttft_s, statistics.median(c.itl_s)
  return {"unloaded_ttft_s": ttft, "unloaded_decode_step_s": step,
          "ttft_s": opts.slo_ttft_s or SLO_TTFT_X * ttft,
          "itl_s": opts.slo_itl_s or SLO_ITL_X * step,
          "measured": opts.slo_ttft_s is None or opts.slo_itl_s is None,
          "rule": f"defaults: {SLO_TTFT_X:g}x unloaded TTFT, {SLO_ITL_X:g}x unloaded decode "
                  f"step; a request meets it when TTFT <= ttft_s and its mean ITL <= itl_s"}


def _pct(xs) -> dict:
  if not len(xs):
    return {"p50": None, "p90": None, "p99": None}
  a = np.asarray(xs, float)
  return {k: float(np.percentile(a, q)) for k, q in (("p50", 50), ("p90", 90), ("p99", 99))}


def metrics(completions: dict, wall_s: float, device_s: float, idle_s: float, waste: float,
            preemptions: int, decode_only_itl: list, slo: dict) -> dict:
  """One mode's record (see the module docstring)."""
  cs = list(completions.values())
  out_tokens = sum(len(c.tokens) for c in cs)
  ttft = [c.ttft_s for c in cs if c.ttft_s is not None]
  itl = [d for c in cs for d in c.itl_s]
  good = sum(1 for c in cs if c.ttft_s is not None and c.ttft_s <= slo["ttft_s"]
             and (not c.itl_s or statistics.fmean(c.itl_s) <= slo["itl_s"]))
  return {"requests": len(cs), "output_tokens": out_tokens, "wall_s": wall_s,
          "throughput_tok_s": out_tokens / wall_s if wall_s > 0 else 0.0,
          "ttft_s": _pct(ttft), "itl_s": _pct(itl),
          "goodput_req_s": good / wall_s if wall_s > 0 else 0.0, "slo_met": good,
          "kv_waste": waste, "preemptions": preemptions,
          "host_gap_fraction": max(0.0, wall_s - device_s - idle_s) / wall_s if wall_s else 0.0,
          "itl_decode_only_p50_s": _pct(decode_only_itl)["p50"]}


def run_paged(sv: Servers, mode: str, reqs: list, slo: dict) -> tuple[dict, dict]:
  """continuous or chunked: (completions, record)."""
  res = serve(sv.stepper, reqs, dataclasses.replace(sv.loop, mode=mode))
  log = res.step_log
  prompt_at = {r.end_s: r.prompt_tokens for r in log}
  decode_only = [t[i] - t[i - 1] for c in res.completions.values()
                 for t in [c.token_times_s] for i in range(1, len(t)) if not prompt_at[t[i]]]
  mid = log[len(log) // 4: max(len(log) // 4 + 1, 3 * len(log) // 4)]
  alloc = sum(r.tokens_allocated for r in mid)
  waste = sum(r.tokens_allocated - r.tokens_used for r in mid) / alloc if alloc else 0.0
  wall = log[-1].end_s if log else 0.0
  rec = metrics(res.completions, wall, sum(r.device_s for r in log), res.idle_s, waste,
                res.preemptions, decode_only, slo)
  rec.update(steps=res.steps, blocks_leaked=res.blocks_leaked,
             step_shapes=sorted(s[0] for s in res.step_shapes))
  return res.completions, rec


def _stamps(gen: generate.Generation, start: float, rows: int, steps: int) -> list:
  """Per row, when each token reached the host: the first at prefill's end, decode token k at
  the end of the cycle whose last stage finishes that row's step k - 1 (row b is in
  microbatch b // rows_per_microbatch; cycle ends are cumulative cycle times after prefill)."""
  sched = gen.schedule
  first = start + gen.ttft_s
  ends = first + np.cumsum(gen.cycle_s) if gen.cycle_s else np.array([])
  out = []
  for b in range(rows):
    m = b // sched.rows
    ticks = np.arange(steps) * sched.period + m + sched.stages - 1
    out.append([first] + [float(ends[t // sched.period]) for t in ticks])
  return out


def run_static(sv: Servers, reqs: list, slo: dict, opts: ServeBenchOptions) -> tuple[dict, dict]:
  """Batches formed by arrival, one padded shape, lock-step decode: (completions, record).
  kv_waste is the contiguous cache's: S x cache positions reserved against the tokens the
  batch's real rows hold at their end."""
  virtual, t0 = opts.clock == "virtual", time.perf_counter()
  now_v = [0.0]
  now = (lambda: now_v[0]) if virtual else (lambda: time.perf_counter() - t0)
  pending = deque(sorted(reqs, key=lambda r: r.arrival_s))
  done, device = {}, 0.0
  idle = alloc = used = 0
  s, t = sv.static.plan.batch, sv.prompt_max
  while pending:
    if pending[0].arrival_s > now():
      wait = pending[0].arrival_s - now()
      idle += wait
      if virtual:
        now_v[0] += wait
      else:
        time.sleep(wait)
      continue
    batch = []
    while pending and pending[0].arrival_s <= now() and len(batch) < s:
      batch.append(pending.popleft())
    ids = np.zeros((s, t), np.int32)
    lens = np.ones(s, np.int32)
    for i, r in enumerate(batch):
      ids[i, :len(r.prompt)], lens[i] = r.prompt, len(r.prompt)
    steps = max(r.params.max_tokens for r in batch) - 1
    start = now()
    gen = sv.static.run(ids, lens, steps=steps)
    device += gen.ttft_s + sum(gen.cycle_s)
    if virtual:
      gen = dataclasses.replace(gen, ttft_s=opts.virtual_step_s,
                                cycle_s=[opts.virtual_step_s] * len(gen.cycle_s))
      now_v[0] += opts.virtual_step_s * (1 + len(gen.cycle_s))
    stamps = _stamps(gen, start, len(batch), steps)
    for i, r in enumerate(batch):
      n = r.params.max_tokens
      done[r.id] = Completion(r.id, tuple(int(x) for x in gen.tokens[i, :n]), "length", 0,
                              r.arrival_s, tuple(stamps[i][:n]))
    alloc += s * sv.static.cache_len
    used += sum(len(r.prompt) + r.params.max_tokens for r in batch)
  wall = max(c.token_times_s[-1] for c in done.values())
  if virtual:
    device = wall - idle
  itl = [d for c in done.values() for d in c.itl_s]
  rec = metrics(done, wall, device, idle, 1 - used / alloc, 0, itl, slo)
  return done, rec


def run(setup: Setup, plan_for: Callable[[Setup], object], opts: ServeBenchOptions,
        progress=sys.stderr) -> tuple[dict, dict]:
  """The whole benchmark: (the JSON record, {(scenario, rate, mode): completions})."""
  before = load.start("serve-bench", progress)
  all_streams = streams(setup, opts)
  sv = build(setup, plan_for, opts, all_streams)
  warm_up(sv, setup.model.vocab)
  slo = unloaded_slo(sv, setup.model.vocab, opts)
  print(f"SLO: TTFT <= {slo['ttft_s'] * 1e3:.1f} ms, ITL <= {slo['itl_s'] * 1e3:.1f} ms "
        f"(unloaded TTFT {slo['unloaded_ttft_s'] * 1e3:.1f} ms, decode step "
        f"{slo['unloaded_decode_step_s'] * 1e3:.1f} ms)", file=progress)
  scenarios, outs = {}, {}
  runs_ = [(k, m) for k in all_streams for m in opts.modes]
  for (sc, rate), mode in tqdm(runs_, desc="serve-bench", file=progress):
    reqs, snap = all_streams[(sc, rate)], load.snapshot()
    if mode == "static":
      done, rec = run_static(sv, reqs, slo, opts)
    else:
      done, rec = run_paged(sv, mode, reqs, slo)
    rec["load"] = {"before": snap, "after": load.snapshot()}
    scenarios.setdefault(sc, {"rates": {}})["rates"].setdefault(f"{rate:g}", {})[mode] = rec
    outs[(sc, rate, mode)] = done
  record = {"preset": setup.preset, "plan": sv.stepper.plan.to_dict(),
            "options": dataclasses.asdict(opts), "context": sv.loop.context,
            "kv_blocks": sv.loop.kv_blocks,
            "compiles": {"paged_step_tokens": list(sv.stepper.traced)},
            "load": load.finish(before), "slo": slo, "scenarios": scenarios}
  return record, outs


def plot(record: dict, path: str) -> None:
  """PNG: TTFT p50 / p99 and ITL p99 against rate, one line per mode, a row per scenario.
  matplotlib is the optional `plot` extra, so it is imported only here."""
  try:
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
  except ImportError as e:
    raise ServeBenchError(f"--png {path}: matplotlib is not installed (pip install "
                          f"'jaxpart[plot]')") from e
  scs = list(record["scenarios"])
  fig, axes = plt.subplots(len(scs), 3, figsize=(13, 3.6 * len(scs)), squeeze=False)
  for row, sc in zip(axes, scs):
    rates = record["scenarios"][sc]["rates"]
    xs = sorted(rates, key=float)
    for ax, (metric, q) in zip(row, (("ttft_s", "p50"), ("ttft_s", "p99"), ("itl_s", "p99"))):
      for mode in MODES:
        ys = [rates[x][mode][metric][q] for x in xs if mode in rates[x]]
        if ys:
          ax.plot([float(x) for x in xs if mode in rates[x]], [y * 1e3 for y in ys], "o-",
                  label=mode)
      ax.set(title=f"{sc}: {metric[:-2].upper()} {q}", xlabel="request rate (req/s)",
             ylabel="ms", yscale="log")
      ax.legend()
  fig.suptitle(f"{record['preset']}: {record['plan']['strategy']} on "
               f"{record['plan']['devices']} devices")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
