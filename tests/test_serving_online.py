"""The online engine alone, with a stand-in step: a cancel frees the request's blocks by the
next step, tokens reach the request's queue in order, and the waiting bound is kept."""

from __future__ import annotations

import queue
import random
import threading
import time

import numpy as np
import pytest

from jaxpart.serving.online import Busy, EngineOptions, OnlineEngine
from jaxpart.serving.requests import SamplingParams

BT = 4


class _Direct:
  """A loop stand-in: the engine's call_soon_threadsafe runs the call at once."""

  def call_soon_threadsafe(self, fn, *args):
    fn(*args)


class _FakeStep:
  """Returns a random id per slot; records (time, KV blocks held) when each step runs."""

  def __init__(self, seed):
    self.rng, self.calls, self.engine = np.random.default_rng(seed), [], None
    self.num_blocks, self.block_tokens = 64, BT

  def __call__(self, batch, settings):
    self.calls.append((time.perf_counter(), self.engine.sched.pool.used_blocks))
    time.sleep(0.002)
    return self.rng.integers(3, 50, len(batch.request_ids)).astype(np.int32)


def _engine(seed, max_waiting=8):
  step = _FakeStep(seed)
  eng = OnlineEngine(step, EngineOptions(2, 8, 64, 64, BT, max_waiting=max_waiting))
  step.engine = eng
  return eng.start(), step


def _events(q, limit_s=10.0):
  t0, out = time.monotonic(), []
  while time.monotonic() - t0 < limit_s:
    try:
      out.append(q.get(timeout=0.05))
    except queue.Empty:
      continue
    if out[-1][0] == "end":
      return out
  raise AssertionError(f"no end in {limit_s} s: {out}")


def test_cancel_frees_blocks_by_the_next_step():
  seed = random.randrange(2**31)
  eng, step = _engine(seed)
  try:
    assert eng.ready.wait(10)
    q = queue.Queue()
    rng = random.Random(seed)
    rid = eng.submit([rng.randrange(3, 50) for _ in range(rng.randint(5, 20))],
                     SamplingParams(max_tokens=40), _Direct(), q)
    got = [q.get(timeout=10) for _ in range(rng.randint(1, 5))]
    assert all(kind == "token" and lp is None for kind, _, _, lp in got)
    eng.cancel(rid)
    t_cancel = time.perf_counter()
    events = _events(q)
    assert events[-1][:2] == ("end", "cancelled")
    after = [blocks for t, blocks in step.calls if t > t_cancel]
    assert sum(b > 0 for b in after) <= 1, after     # the step already in flight, at most
    assert eng.state() == (0, 0, 0)
  finally:
    eng.stop()


def test_tokens_in_order_and_waiting_bound():
  seed = random.randrange(2**31)
  eng, step = _engine(seed, max_waiting=3)
  try:
    assert eng.ready.wait(10)
    n = random.Random(seed).randint(3, 9)
    qs = []
    with pytest.raises(Busy, match="max-waiting 3"):
      for _ in range(20):           # 2 slots + 3 waiting: a submit is refused soon
        qs.append(queue.Queue())
        eng.submit([5, 6, 7], SamplingParams(max_tokens=n), _Direct(), qs[-1])
    assert 3 <= len(qs) - 1 <= 5
    for q in qs[:-1]:
      events = _events(q)
      assert [e[0] for e in events] == ["token"] * n + ["end"] and events[-1][1] == "length"
      times = [e[2] for e in events[:-1]]
      assert times == sorted(times)
  finally:
    eng.stop()
