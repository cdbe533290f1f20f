"""The step scheduler: which tokens of which requests the next compiled step runs.

S sequence slots share a persistent step. Each sequence holds its known tokens (prompt, then
generated) and how many of them have K/V in the pool (`computed`); a step runs the next tokens
of some sequences and asks for logits where the last known token is run. Two modes:

- chunked (Sarathi-Serve, vLLM's chunked prefill): every step runs one token for each decoding
  sequence plus up to C prompt tokens, chunks of one or more prompts, in one shape S + C.
- continuous (Orca / vLLM without chunking): whole prompts prefill in a step of their own,
  padded to the smallest length bucket that holds them; otherwise a decode step of S tokens.

Admission is first come first served, when the pool has the blocks for the whole prompt beside
the blocks promised to prompts still prefilling (vLLM's policy). Blocks for later tokens are
allocated as they are scheduled; when none is free the youngest running sequence (latest
arrival) is preempted: its blocks are freed and it goes back to the head of the queue, to be
recomputed from prompt + tokens generated so far. A cancelled request's blocks are freed when
the next step is scheduled. The step's arrays have fixed shapes (StepBatch), so a compiled step
never recompiles whatever the mix of requests.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from jaxpart.errors import UserError, check_positive_ints
from jaxpart.serving.kv_pages import BlockPool, check_pool_fits
from jaxpart.serving.requests import Request, RequestError, check_fits

MODES = ("chunked", "continuous")


class SchedulerError(UserError):
  """A scheduler setting is invalid; the message names the field and what is valid."""


@dataclass(frozen=True)
class SchedulerConfig:
  """slots S, prompt tokens per step C (chunked), the model's context, the mode, and the padded
  prefill lengths of continuous mode (default: a quarter, a half and all of the context)."""
  slots: int
  chunk_tokens: int
  context: int
  mode: str = "chunked"
  buckets: tuple[int, ...] = ()

  def __post_init__(self):
    check_positive_ints("SchedulerConfig", SchedulerError, slots=self.slots,
                        chunk_tokens=self.chunk_tokens, context=self.context)
    if self.mode not in MODES:
      raise SchedulerError(f"SchedulerConfig.mode = {self.mode!r}: valid modes are "
                           f"{', '.join(MODES)}")
    buckets = tuple(sorted(self.buckets or {max(1, self.context // 4),
                                            max(1, self.context // 2), self.context}))
    if buckets[-1] < self.context or buckets[0] <= 0:
      raise SchedulerError(f"SchedulerConfig.buckets = {self.buckets!r}: positive lengths, the "
                           f"largest at least the context {self.context} (a whole prompt)")
    object.__setattr__(self, "buckets", buckets)


@dataclass(frozen=True)
class StepBatch:
  """One step, padded to fixed shapes: T tokens, S slots, M = ceil(context / block) blocks.

  token_ids, positions (absolute, in the token's sequence), token_slot (its sequence slot; -1
  pads) and write_slots (flat pool slot its K/V goes to; -1 pads) have length T. block_tables
  is S x M (-1 past a sequence's blocks). logit_index[s] is the token whose logits slot s
  samples from (the last token of a completed prompt chunk, or a decode token), -1 for none:
  the step needs S rows of logits, never T.
  """
  number: int
  token_ids: np.ndarray
  positions: np.ndarray
  token_slot: np.ndarray
  write_slots: np.ndarray
  block_tables: np.ndarray
  logit_index: np.ndarray
  request_ids: tuple
  prompt_tokens: int
  decode_tokens: int

  @property
  def shape(self) -> tuple[int, int, int]:
    return (len(self.token_ids), *self.block_tables.shape)


@dataclass(frozen=True)
class Output:
  """A request's end: its generated tokens and why it ended (eos, stop, length, cancelled)."""
  id: object
  tokens: tuple[int, ...]
  reason: str
  preemptions: int


@dataclass
class _Seq:
  request: Request
  order: int
  tokens: list[int]
  computed: int = 0      # tokens whose K/V is in the pool
  target: int = 0        # tokens to prefill since the last (re)admission
  slot: int = -1
  cancelled: bool = False
  preemptions: int = 0

  @property
  def id(self):
    return self.request.id

  @property
  def age(self) -> tuple[float, int]:
    return (self.request.arrival_s, self.order)

  @property
  def generated(self) -> list[int]:
    return self.tokens[len(self.request.prompt):]


@dataclass
class Scheduler:
  cfg: SchedulerConfig
  pool: BlockPool
  waiting: deque = field(default_factory=deque)
  running: dict = field(default_factory=dict)      # slot -> _Seq
  outputs: dict = field(default_factory=dict)      # request id -> Output
  preemptions: int = 0
  steps: int = 0

  def __post_init__(self):
    check_pool_fits(self.pool.num_blocks, self.pool.block_tokens, self.cfg.context)
    self.max_blocks = self.pool.blocks_for(self.cfg.context)
    self._seqs: dict = {}
    self._inflight: tuple[int, list] | None = None

  def add(self, request: Request) -> None:
    """Queue a request (at its arrival); refused if it cannot fit the context."""
    check_fits(request, self.cfg.context)
    if request.id in self._seqs or request.id in self.outputs:
      raise RequestError(f"Request {request.id!r}: id already used; ids must be unique")
    seq = _Seq(request, len(self._seqs) + len(self.outputs), list(request.prompt))
    self._seqs[request.id] = seq
    self.waiting.append(seq)

  def cancel(self, request_id) -> None:
    """Stop a request; its blocks are freed when the next step is scheduled."""
    seq = self._seqs.get(request_id)
    if seq is not None:
      seq.cancelled = True

  def generated(self, request_id) -> int | None:
    """Tokens the request has generated so far; None once it has ended (see outputs)."""
    seq = self._seqs.get(request_id)
    return None if seq is None else len(seq.generated)

  def has_work(self) -> bool:
    return bool(self.waiting or self.running)

  def schedule(self) -> StepBatch | None:
    """The next step, or None when nothing waits or runs."""
    if self._inflight is not None:
      raise RuntimeError(f"step {self._inflight[0]} is still in flight: update() it first")
    self._reap()
    if self.cfg.mode == "chunked":
      plan, n_tokens = self._plan_chunked(), self.cfg.slots + self.cfg.chunk_tokens
    else:
      plan, n_tokens = self._plan_continuous()
    if not plan:
      return None
    self.steps += 1
    self._inflight = (self.steps, plan)
    return self._build(plan, n_tokens)

  def update(self, step: StepBatch, sampled_S) -> list[Output]:
    """Consume a step's sampled token per slot; returns the requests that ended."""
    number, plan = self._inflight or (None, [])
    if number != step.number:
      raise RuntimeError(f"update of step {step.number}, but step {number} is in flight")
    self._inflight = None
    ended = []
    for seq, n in plan:
      if seq.cancelled or seq.slot < 0:
        continue
      seq.computed += n
      self.pool.mark_used(seq.id, seq.computed)
      if seq.computed == len(seq.tokens):
        seq.tokens.append(int(sampled_S[seq.slot]))
        reason = seq.request.params.stops(seq.generated)
        if reason:
          ended.append(self._finish(seq, reason))
    return ended

  # -- planning ------------------------------------------------------------------------------

  def _plan_chunked(self) -> list:
    plan: list = []
    for seq in sorted(self.running.values(), key=lambda s: s.age):
      if seq.slot >= 0 and seq.computed >= seq.target and self._grow(seq, 1, plan):
        plan.append((seq, 1))
    budget = self.cfg.chunk_tokens
    for seq in sorted(self.running.values(), key=lambda s: s.age):
      if budget and seq.slot >= 0 and seq.computed < seq.target:
        n = min(seq.target - seq.computed, budget)
        if self._grow(seq, n, plan):
          plan.append((seq, n))
          budget -= n
    while budget and self._admissible():
      seq = self._admit()
      n = min(seq.target, budget)
      if not self.pool.allocate(seq.id, n):
        raise AssertionError("admission checked the blocks")
      plan.append((seq, n))
      budget -= n
    return plan

  def _plan_continuous(self) -> tuple[list, int]:
    plan, total = [], 0
    while (self.waiting and total + len(self.waiting[0].tokens) <= self.cfg.buckets[-1]
           and self._admissible()):
      seq = self._admit()
      if not self.pool.allocate(seq.id, seq.target):
        raise AssertionError("admission checked the blocks")
      plan.append((seq, seq.target))
      total += seq.target
    if plan:
      return plan, next(b for b in self.cfg.buckets if b >= total)
    for seq in sorted(self.running.values(), key=lambda s: s.age):
      if seq.slot >= 0 and self._grow(seq, 1, plan):
        plan.append((seq, 1))
    return plan, self.cfg.slots

  def _admissible(self) -> bool:
    """The queue's head may start: a slot is free and its whole prompt's blocks are free beside
    those promised to prompts still prefilling and one block of growth per running sequence."""
    if not self.waiting or len(self.running) >= self.cfg.slots:
      return False
    promised = sum(self.pool.blocks_needed(s.target, s.id) for s in self.running.values()
                   if s.computed < s.target)
    return self.pool.can_allocate(len(self.waiting[0].tokens),
                                  reserved_blocks=promised + len(self.running))

  def _admit(self) -> _Seq:
    seq = self.waiting.popleft()
    seq.slot = min(set(range(self.cfg.slots)) - set(self.running))
    seq.computed, seq.target = 0, len(seq.tokens)
    self.running[seq.slot] = seq
    return seq

  def _grow(self, seq: _Seq, n: int, plan: list) -> bool:
    """Blocks for seq's next n tokens, preempting the youngest running sequences until they
    fit; False when seq itself was the youngest and was preempted."""
    while not self.pool.allocate(seq.id, seq.computed + n):
      victim = max(self.running.values(), key=lambda s: s.age)
      plan[:] = [(s, k) for s, k in plan if s is not victim]
      self._preempt(victim)
      if victim is seq:
        return False
    return True

  def _preempt(self, seq: _Seq) -> None:
    self.pool.free(seq.id)
    del self.running[seq.slot]
    seq.slot, seq.computed, seq.target = -1, 0, 0
    seq.preemptions += 1
    self.preemptions += 1
    self.waiting.appendleft(seq)

  # -- ends ----------------------------------------------------------------------------------

  def _reap(self) -> None:
    """Free the blocks and slots of cancelled requests."""
    for seq in [s for s in self._seqs.values() if s.cancelled]:
      if seq.slot >= 0:
        del self.running[seq.slot]
      else:
        self.waiting.remove(seq)
      self._finish(seq, "cancelled")

  def _finish(self, seq: _Seq, reason: str) -> Output:
    self.pool.free(seq.id)
    if seq.slot >= 0 and self.running.get(seq.slot) is seq:
      del self.running[seq.slot]
    seq.slot = -1
    del self._seqs[seq.id]
    out = Output(seq.id, tuple(seq.generated), reason, seq.preemptions)
    self.outputs[seq.id] = out
    return out

  # -- the step's arrays ---------------------------------------------------------------------

  def _build(self, plan: list, n_tokens: int) -> StepBatch:
    s, m, bt = self.cfg.slots, self.max_blocks, self.pool.block_tokens
    tok_T, pos_T = np.zeros(n_tokens, np.int32), np.zeros(n_tokens, np.int32)
    slot_T, write_T = np.full(n_tokens, -1, np.int32), np.full(n_tokens, -1, np.int32)
    tables_SxM, logit_S = np.full((s, m), -1, np.int32), np.full(s, -1, np.int32)
    for slot, seq in self.running.items():
      table = self.pool.table(seq.id)
      tables_SxM[slot, :len(table)] = table
    i = prompt = 0
    for seq, n in plan:
      p = np.arange(seq.computed, seq.computed + n)
      tok_T[i:i + n] = seq.tokens[seq.computed:seq.computed + n]
      pos_T[i:i + n] = p
      slot_T[i:i + n] = seq.slot
      write_T[i:i + n] = tables_SxM[seq.slot, p // bt] * bt + p % bt
      if seq.computed + n == len(seq.tokens):
        logit_S[seq.slot] = i + n - 1
      prompt += n if seq.computed < seq.target else 0
      i += n
    ids = tuple(self.running[k].id if k in self.running else None for k in range(s))
    return StepBatch(self.steps, tok_T, pos_T, slot_T, write_T, tables_SxM, logit_S, ids,
                     prompt, i - prompt)
