"""Continuous batching, modelled: the real scheduler run over a seeded stream on a modelled clock.

A discrete-event simulation. Requests join the scheduler (serving/scheduler.py, the one the
engine runs) at their arrival; each step the scheduler plans is priced by cost/serving_step
(mixed prompt chunks and decodes, one step round the stages at a time) and the clock advances
by that time; every logit row the step asks for is a token stamped at the step's end. So it
models queueing (FCFS admission, a full pool or full slots make requests wait), the mix of
prefill and decode in a step (chunked: up to C prompt tokens beside every decode; continuous:
whole prompts in steps of their own, padded to the length bucket, which stalls the decodes),
the batch the KV pool allows (admission by free blocks, preemption and recompute when it runs
out), and the pool's size from the planner (placement/kv_blocks.serving_pool).

Not modelled: the host's time between steps, several steps in flight round a pipeline,
cancellations, early stops on EOS (each request generates its max_tokens), and run-to-run
noise. The step is priced as jaxpart compiles it: T = S + C tokens (chunked), or the padded
bucket (continuous prefill) or S (continuous decode), whatever the mix, pads included; a GPU
engine with a graph per batch size would not pay for the pads.

Metrics follow vLLM's benchmark_serving: TTFT per request, ITL over every gap between a
request's tokens (pooled), output tokens/s over the span from the first arrival to the last
token, and goodput (requests/s meeting both SLOs: TTFT and mean ITL).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaxpart.cost.serving_step import StepCost
from jaxpart.errors import UserError
from jaxpart.placement.kv_blocks import blocks_for
from jaxpart.serving.kv_pages import BlockPool
from jaxpart.serving.requests import Request, SamplingParams
from jaxpart.serving.scheduler import Scheduler, SchedulerConfig, StepBatch

SLO_TTFT_FACTOR = 5.0   # issue 24's default SLOs (serve-bench): 5x the unloaded TTFT,
SLO_ITL_FACTOR = 2.0    # 2x the unloaded decode step
PERCENTILES = (50, 90, 99)


class SimulationError(UserError):
  """A simulation setting is invalid; the message names the flag and what is valid."""


@dataclass(frozen=True)
class SimOptions:
  """The scheduler's settings and the pool (blocks of block_tokens tokens)."""
  slots: int
  chunk_tokens: int
  context: int
  mode: str
  kv_blocks: int
  block_tokens: int


def fixed_requests(n: int, rate: float, prompt: int, output: int, seed: int = 0) -> list:
  """n requests of `prompt` tokens in and `output` out, Poisson arrivals at `rate` per second
  (the published online tables' workloads: fixed lengths, Poisson arrivals)."""
  if not rate > 0:
    raise SimulationError(f"--rate = {rate!r}: rates are positive requests per second")
  rng = np.random.default_rng(seed)
  arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
  return [Request(i, (1,) * prompt, float(a), SamplingParams(max_tokens=output))
          for i, a in enumerate(arrivals)]


def step_seconds(cost: StepCost, batch: StepBatch) -> float:
  """Price a StepBatch as the compiled step runs it: every one of its T tokens through the
  dense part (pads included: the shape is fixed), each slot's real tokens attending up to its
  last position, and the head on all S logit rows."""
  real = batch.token_slot >= 0
  slots, counts = np.unique(batch.token_slot[real], return_counts=True)
  chunks, decodes = [], []
  for s, c in zip(slots.tolist(), counts.tolist()):
    keys = int(batch.positions[real][batch.token_slot[real] == s].max()) + 1
    if c > 1:
      chunks.append((c, keys))
    else:      # a decode, or a one-token prompt chunk: the same work
      decodes.append(keys)
  pad = len(batch.token_ids) - int(real.sum())
  if pad:
    chunks.append((pad, 0))
  return cost.seconds(tuple(chunks), tuple(decodes), len(batch.logit_index))


def run(cost: StepCost, requests: list, opts: SimOptions) -> dict:
  """Simulate the stream; returns each request's arrival and token times and the step count."""
  # Beyond S sequences of the whole context a pool never limits a batch of S slots: simulate
  # no more blocks than that (the planner's pool on a large memory is millions of blocks).
  blocks = min(opts.kv_blocks, opts.slots * blocks_for(opts.context, opts.block_tokens))
  sched = Scheduler(SchedulerConfig(opts.slots, opts.chunk_tokens, opts.context, opts.mode),
                    BlockPool(blocks, opts.block_tokens))
  pending = sorted(requests, key=lambda r: r.arrival_s)
  times: dict = {r.id: [] for r in requests}
  zeros = np.zeros(opts.slots, np.int32)
  t, i, steps, busy = 0.0, 0, 0, 0.0
  while i < len(pending) or sched.has_work():
    while i < len(pending) and pending[i].arrival_s <= t:
      sched.add(pending[i])
      i += 1
    batch = sched.schedule() if sched.has_work() else None
    if batch is None:
      t = max(t, pending[i].arrival_s)
      continue
    dt = step_seconds(cost, batch)
    t += dt
    busy += dt
    steps += 1
    for slot in np.flatnonzero(batch.logit_index >= 0).tolist():
      times[batch.request_ids[slot]].append(t)
    sched.update(batch, zeros)
  return {"arrivals": {r.id: r.arrival_s for r in requests}, "token_times": times,
          "outputs": sched.outputs, "steps": steps, "busy_s": busy, "end_s": t,
          "preemptions": sched.preemptions}


def _pcts(x) -> dict:
  x = np.asarray(x, float)
  out = {f"p{p}": float(np.percentile(x, p)) if x.size else 0.0 for p in PERCENTILES}
  out["mean"] = float(x.mean()) if x.size else 0.0
  return out


def metrics(sim: dict, slo_ttft_s: float, slo_itl_s: float) -> dict:
  """TTFT and ITL percentiles, throughput, goodput at the SLOs, from a run()'s record."""
  ttft, itl, good, tokens = [], [], 0, 0
  for rid, ts in sim["token_times"].items():
    first = ts[0] - sim["arrivals"][rid]
    gaps = np.diff(ts)
    ttft.append(first)
    itl.extend(gaps.tolist())
    tokens += len(ts)
    good += first <= slo_ttft_s and (gaps.mean() if gaps.size else 0.0) <= slo_itl_s
  span = sim["end_s"] - min(sim["arrivals"].values())
  return {"requests": len(ttft), "finished": len(sim["outputs"]),
          "ttft_s": _pcts(ttft), "itl_s": _pcts(itl),
          "throughput_tok_s": tokens / span, "goodput_req_s": float(good) / span,
          "slo": {"ttft_s": slo_ttft_s, "itl_s": slo_itl_s},
          "steps": sim["steps"], "busy_fraction": sim["busy_s"] / span,
          "preemptions": sim["preemptions"], "span_s": span}


def unloaded(cost: StepCost, prompt: int, output: int, opts: SimOptions) -> dict:
  """One request of `prompt` tokens alone: its TTFT and its decode step (its ITL p50)."""
  sim = run(cost, [Request(0, (1,) * prompt, 0.0, SamplingParams(max_tokens=max(2, output)))],
            opts)
  ts = sim["token_times"][0]
  return {"ttft_s": ts[0], "decode_step_s": float(np.median(np.diff(ts)))}


def default_slos(unloaded_figures: dict) -> dict:
  """The issue's defaults: 5x the unloaded TTFT and 2x the unloaded decode step."""
  return {"ttft_s": SLO_TTFT_FACTOR * unloaded_figures["ttft_s"],
          "itl_s": SLO_ITL_FACTOR * unloaded_figures["decode_step_s"]}
