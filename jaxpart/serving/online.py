"""The online engine: one thread owns the Stepper and the Scheduler; requests come and go.

engine_loop.serve runs a list known in advance; a server learns of requests while it steps.
So the engine thread takes new requests and cancellations from thread-safe inboxes at the top
of every step, runs the step, and hands each new token to its request's asyncio queue with
loop.call_soon_threadsafe (the HTTP side never touches the scheduler). A cancel is applied
before the next step is scheduled, and the scheduler frees the request's blocks there: a
client that goes away holds its blocks for at most one step.

Events put on a request's queue: ("token", id, t_s, logprobs) for each generated token
(logprobs: (the token's log-probability, the top ids, their log-probabilities) from the step,
or None when the step reports none), then exactly one ("end", reason, engine_s) (reason: eos,
stop, length, cancelled, or "error: ..." if a step failed; engine_s: seconds from submit to
this end, the engine's part of the request's time).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass

from jaxpart.errors import UserError
from jaxpart.serving.kv_pages import DEFAULT_BLOCK_TOKENS, BlockPool
from jaxpart.serving.requests import Request, SamplingParams, check_fits
from jaxpart.serving.sampling import StepOut, row_settings
from jaxpart.serving.scheduler import Scheduler, SchedulerConfig


class Busy(UserError):
  """More requests wait than the engine's bound (--max-waiting): try again later."""


@dataclass(frozen=True)
class EngineOptions:
  """The scheduler's settings, the pool's size and the bound on waiting requests."""
  slots: int
  chunk_tokens: int
  context: int
  kv_blocks: int
  block_tokens: int = DEFAULT_BLOCK_TOKENS
  max_waiting: int = 64
  mode: str = "chunked"
  idle_wait_s: float = 0.05

  def __post_init__(self):
    if not isinstance(self.max_waiting, int) or self.max_waiting <= 0:
      raise UserError(f"EngineOptions.max_waiting = {self.max_waiting!r}: must be a positive "
                      f"integer")

  def scheduler_config(self) -> SchedulerConfig:
    return SchedulerConfig(self.slots, self.chunk_tokens, self.context, self.mode)


@dataclass
class _Live:
  """A request the engine holds: where its events go and what it has been sent."""
  loop: object
  events: object            # asyncio.Queue, filled from the engine thread
  arrival_s: float
  params: SamplingParams
  submitted: float = 0.0
  sent: int = 0
  last: float = 0.0


class OnlineEngine:
  """Owns stepper + scheduler on its own thread; submit/cancel are safe from any thread.

  `observer`, if given, is called on the engine thread as observer(kind, value) with kind
  "ttft", "itl", "e2e" (seconds), "preempt" (count) and "state" ((waiting, running,
  blocks_used)): the server's metrics.
  """

  def __init__(self, stepper, opts: EngineOptions, observer=None):
    self.stepper, self.opts, self.observer = stepper, opts, observer or (lambda k, v: None)
    self.sched = Scheduler(opts.scheduler_config(), BlockPool(opts.kv_blocks, opts.block_tokens))
    self._new: queue.SimpleQueue = queue.SimpleQueue()
    self._cancels: queue.SimpleQueue = queue.SimpleQueue()
    self._wake = threading.Event()
    self._lock = threading.Lock()
    self._queued = 0          # submitted, not yet running (inbox + scheduler's waiting)
    self._live: dict = {}
    self._ids = itertools.count()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="jaxpart-engine", daemon=True)
    self.steps = 0
    self.error: str | None = None
    self.ready = threading.Event()     # set once the step is compiled

  def start(self) -> "OnlineEngine":
    self._thread.start()
    return self

  def submit(self, prompt: list[int], params: SamplingParams, loop, events,
             arrival_s: float | None = None) -> int:
    """Queue a request; returns its id. arrival_s (perf_counter; default now) is when the
    server received it, the start of its TTFT and e2e. Raises Busy when max_waiting requests
    already wait, RequestError when it cannot fit the context."""
    rid = next(self._ids)
    request = Request(rid, tuple(prompt), 0.0, params)
    check_fits(request, self.opts.context)
    with self._lock:
      if self._stop.is_set():
        raise Busy("the server is shutting down")
      if self._queued >= self.opts.max_waiting:
        raise Busy(f"{self._queued} requests are waiting (--max-waiting "
                   f"{self.opts.max_waiting}); retry later")
      self._queued += 1
    now = time.perf_counter()
    self._live[rid] = _Live(loop, events, arrival_s or now, params, now)
    self._new.put(request)
    self._wake.set()
    return rid

  def cancel(self, rid: int) -> None:
    self._cancels.put(rid)
    self._wake.set()

  def stop(self, timeout_s: float = 5.0) -> None:
    """End the thread; requests still held end with reason 'cancelled'."""
    self._stop.set()
    self._wake.set()
    self._thread.join(timeout_s)

  def alive(self) -> bool:
    return self._thread.is_alive() and self.error is None

  def state(self) -> tuple[int, int, int]:
    """(waiting, running, KV blocks used), as of the last step."""
    s = self.sched
    return self._queued, len(s.running), s.pool.used_blocks

  # -- the engine thread ---------------------------------------------------------------------

  def _warm(self) -> None:
    """Compile the step before the first client waits for it: one request of one token."""
    self.sched.add(Request("warmup", (0,), 0.0, SamplingParams(max_tokens=2)))
    while self.sched.has_work():
      batch = self.sched.schedule()
      self.sched.update(batch, self.stepper(batch, row_settings([None] * len(
          batch.request_ids), [0] * len(batch.request_ids))))
    self.sched.outputs.pop("warmup")
    self.ready.set()

  def _run(self) -> None:
    try:
      self._warm()
      while not self._stop.is_set():
        self._take_inboxes()
        batch = self.sched.schedule()
        self._collect_cancelled()
        self._observe_state()
        if batch is None:
          self._wake.wait(self.opts.idle_wait_s)
          self._wake.clear()
          continue
        self._step(batch)
    except Exception as e:  # a failed step must not leave clients waiting forever
      self.error = f"{type(e).__name__}: {e}"
      raise
    finally:
      for rid in list(self._live):
        self._end(rid, "cancelled" if self.error is None else f"error: {self.error}")

  def _take_inboxes(self) -> None:
    while True:
      try:
        request = self._new.get_nowait()
      except queue.Empty:
        break
      self.sched.add(request)   # checked by submit (context, ids): cannot raise here
    while True:
      try:
        self.sched.cancel(self._cancels.get_nowait())
      except queue.Empty:
        break

  def _collect_cancelled(self) -> None:
    """Ends of cancelled requests: schedule() has just reaped them and freed their blocks."""
    for rid in list(self.sched.outputs):
      self._end(rid, self.sched.outputs[rid].reason)

  def _step(self, batch) -> None:
    sched = self.sched
    ids = batch.request_ids
    live = [self._live.get(r) if r is not None else None for r in ids]
    settings = row_settings(
        [x.params if x is not None else None for x in live],
        [sched.generated(r) or 0 if r is not None else 0 for r in ids])
    before = sched.preemptions
    out = self._run_step(batch, settings)
    ids_S = out.ids_S
    now = time.perf_counter()
    ended = {o.id: o for o in sched.update(batch, ids_S)}
    self.steps += 1
    for s in (s for s in range(len(ids_S)) if batch.logit_index[s] >= 0):
      rid = ids[s]
      n = len(ended[rid].tokens) if rid in ended else sched.generated(rid)
      if rid in self._live and n is not None and n > self._live[rid].sent:
        lp = None if out.logprob_S is None else (
            float(out.logprob_S[s]), out.top_ids_SxK[s].tolist(),
            out.top_logprobs_SxK[s].tolist())
        self._token(rid, int(ids_S[s]), now, lp)
    for rid, done in ended.items():
      self._end(rid, done.reason)
    if sched.preemptions > before:
      self.observer("preempt", sched.preemptions - before)
    self._observe_state()

  def _run_step(self, batch, settings) -> StepOut:
    """The Stepper's step with log-probabilities; a stepper that only returns ids (a stand-in)
    gives StepOut with None for them."""
    step = getattr(self.stepper, "step", None)
    if step is not None:
      return step(batch, settings)
    return StepOut(self.stepper(batch, settings), None, None, None)

  def _observe_state(self) -> None:
    with self._lock:
      self._queued = len(self.sched.waiting) + self._new.qsize()
    self.observer("state", self.state())

  def _token(self, rid: int, token: int, now: float, logprobs) -> None:
    live = self._live[rid]
    self.observer("ttft" if live.sent == 0 else "itl", now - live.last if live.sent else
                  now - live.arrival_s)
    live.sent += 1
    live.last = now
    live.loop.call_soon_threadsafe(live.events.put_nowait, ("token", token, now, logprobs))

  def _end(self, rid: int, reason: str) -> None:
    live = self._live.pop(rid, None)
    self.sched.outputs.pop(rid, None)   # a long-running server keeps no record of ended ones
    if live is None:
      return
    now = time.perf_counter()
    self.observer("e2e", now - live.arrival_s)
    try:
      live.loop.call_soon_threadsafe(live.events.put_nowait,
                                     ("end", reason, now - live.submitted))
    except RuntimeError:   # the event loop has closed (shutdown): nobody is listening
      pass
