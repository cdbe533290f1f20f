"""The serving host loop: admit requests at their arrival, schedule -> step -> update, collect.

Everything the host decides lives here and in the scheduler; the device runs one compiled step
per iteration (serving/step.py). Each generated token is stamped with the clock when its step's
ids reach the host, so time to first token and inter-token latency come out of the record.

Two clocks: `wall` (perf_counter seconds since the start; idle time sleeps until the next
arrival) for measurements, and `virtual` (each step takes virtual_step_s; idle time jumps to
the next arrival) for tests and replays, where which requests share a step must not depend on
how busy the machine is.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from jaxpart.errors import UserError
from jaxpart.serving.kv_pages import DEFAULT_BLOCK_TOKENS, BlockPool
from jaxpart.serving.requests import Request
from jaxpart.serving.sampling import row_settings
from jaxpart.serving.scheduler import Scheduler, SchedulerConfig

CLOCKS = ("wall", "virtual")


class LoopError(UserError):
  """A loop option is invalid; the message names it and what is valid."""


@dataclass(frozen=True)
class LoopOptions:
  """The scheduler's settings, the pool's size and the clock (see the module docstring)."""
  slots: int
  chunk_tokens: int
  context: int
  kv_blocks: int
  mode: str = "chunked"
  buckets: tuple[int, ...] = ()
  block_tokens: int = DEFAULT_BLOCK_TOKENS
  clock: str = "wall"
  virtual_step_s: float = 0.01

  def __post_init__(self):
    if self.clock not in CLOCKS:
      raise LoopError(f"LoopOptions.clock = {self.clock!r}: valid clocks are {', '.join(CLOCKS)}")
    if not self.virtual_step_s > 0:
      raise LoopError(f"LoopOptions.virtual_step_s = {self.virtual_step_s!r}: must be > 0 s")

  def scheduler_config(self) -> SchedulerConfig:
    return SchedulerConfig(self.slots, self.chunk_tokens, self.context, self.mode, self.buckets)


@dataclass(frozen=True)
class Completion:
  """One request's record: tokens, why it ended, and when each token reached the host."""
  id: object
  tokens: tuple[int, ...]
  reason: str
  preemptions: int
  arrival_s: float
  token_times_s: tuple[float, ...]

  @property
  def ttft_s(self) -> float | None:
    return self.token_times_s[0] - self.arrival_s if self.token_times_s else None

  @property
  def itl_s(self) -> tuple[float, ...]:
    t = self.token_times_s
    return tuple(b - a for a, b in zip(t, t[1:]))


@dataclass(frozen=True)
class StepRecord:
  """One step as the benchmark needs it: when it ended, how long the device call took (ids
  back on the host), its token mix, and the pool's token slots allocated and used after it."""
  end_s: float
  device_s: float
  prompt_tokens: int
  decode_tokens: int
  tokens_allocated: int
  tokens_used: int


@dataclass
class ServeResult:
  completions: dict = field(default_factory=dict)     # request id -> Completion
  steps: int = 0
  prompt_tokens: int = 0
  decode_tokens: int = 0
  preemptions: int = 0
  blocks_leaked: int = 0                              # blocks still held once all ended
  step_shapes: set = field(default_factory=set)
  idle_s: float = 0.0                                 # waiting for arrivals with nothing to run
  step_log: list = field(default_factory=list)        # StepRecord per step


class _Clock:
  """Seconds since the start of the stream: wall time, or steps x virtual_step_s."""

  def __init__(self, opts: LoopOptions):
    self.virtual, self.dt = opts.clock == "virtual", opts.virtual_step_s
    self.t0, self.now_v, self.idle_s = time.perf_counter(), 0.0, 0.0

  def now(self) -> float:
    return self.now_v if self.virtual else time.perf_counter() - self.t0

  def stepped(self) -> None:
    self.now_v += self.dt

  def wait_until(self, t: float) -> None:
    self.idle_s += max(0.0, t - self.now())
    if self.virtual:
      self.now_v = max(self.now_v, t)
    else:
      time.sleep(max(0.0, t - self.now()))


def serve(stepper, requests: Sequence[Request], opts: LoopOptions,
          cancel_after: Mapping[object, int] | None = None) -> ServeResult:
  """Run the stream to the end on `stepper` (a Stepper, or anything called with (StepBatch,
  RowSettings) that returns a sampled id per slot). cancel_after[id] = k cancels request id once
  it has generated k tokens (mid-decode; its blocks are freed by the next step)."""
  _check_pool(stepper, opts)
  sched = Scheduler(opts.scheduler_config(), BlockPool(opts.kv_blocks, opts.block_tokens))
  pending = deque(sorted(requests, key=lambda r: r.arrival_s))
  by_id = {r.id: r for r in requests}
  cancels, times = dict(cancel_after or {}), {r.id: [] for r in requests}
  clock, res = _Clock(opts), ServeResult()
  while pending or sched.has_work():
    while pending and pending[0].arrival_s <= clock.now():
      sched.add(pending.popleft())
    batch = sched.schedule()
    if batch is None:          # idle (or only cancelled requests were left, now reaped)
      if pending:
        clock.wait_until(pending[0].arrival_s)
      elif sched.has_work():
        raise RuntimeError("the scheduler holds requests but scheduled nothing")
      continue
    settings = row_settings(
        [by_id[r].params if r is not None else None for r in batch.request_ids],
        [sched.generated(r) or 0 if r is not None else 0 for r in batch.request_ids])
    t_dev = time.perf_counter()
    ids_S = stepper(batch, settings)
    t_dev = time.perf_counter() - t_dev
    clock.stepped()
    now = clock.now()
    for s in (s for s in range(len(ids_S)) if batch.logit_index[s] >= 0):
      times[batch.request_ids[s]].append(now)
    sched.update(batch, ids_S)
    _cancel_due(sched, cancels)
    res.steps += 1
    res.prompt_tokens += batch.prompt_tokens
    res.decode_tokens += batch.decode_tokens
    res.step_shapes.add(batch.shape)
    use = sched.pool.usage()
    res.step_log.append(StepRecord(now, t_dev, batch.prompt_tokens, batch.decode_tokens,
                                   use.tokens_allocated, use.tokens_used))
  sched.pool.check()
  res.preemptions, res.blocks_leaked = sched.preemptions, sched.pool.used_blocks
  res.idle_s = clock.idle_s
  for rid, out in sched.outputs.items():
    res.completions[rid] = Completion(rid, out.tokens, out.reason, out.preemptions,
                                      by_id[rid].arrival_s, tuple(times[rid]))
  return res


def _check_pool(stepper, opts: LoopOptions) -> None:
  """The scheduler may use fewer blocks than the device pool holds, never more."""
  have = getattr(stepper, "num_blocks", None)
  if have is not None and opts.kv_blocks > have:
    raise LoopError(f"LoopOptions.kv_blocks = {opts.kv_blocks}: the step's pool holds {have} "
                    f"blocks; give at most {have}")
  bt = getattr(stepper, "block_tokens", opts.block_tokens)
  if bt != opts.block_tokens:
    raise LoopError(f"LoopOptions.block_tokens = {opts.block_tokens}: the step's pool has "
                    f"blocks of {bt} tokens; give {bt}")


def _cancel_due(sched: Scheduler, cancels: dict) -> None:
  for rid, k in list(cancels.items()):
    done = sched.generated(rid)
    if done is None:          # ended (or never added) before its cancel was due
      if rid in sched.outputs:
        del cancels[rid]
    elif done >= k:
      sched.cancel(rid)
      del cancels[rid]
