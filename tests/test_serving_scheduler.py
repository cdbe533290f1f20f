"""The serving scheduler, block pool, requests and workloads, driven by a fake model (no JAX).

The fake model keeps the token id written to every pool slot and samples a seeded hash of the
tokens it reads back through the step's block table up to the logit token's position. So the
tokens a request gets depend on the write slots, block tables and positions being right, and a
preempted request gets the same tokens as an unpreempted one only if its recompute is.
"""

import os
import subprocess
import sys
import zlib
from collections import deque
from pathlib import Path

import numpy as np
import pytest

from jaxpart.errors import UserError
from jaxpart.serving import workload
from jaxpart.placement.kv_blocks import blocks_from_bytes, kv_bytes_per_token, pool_capacity
from jaxpart.serving.kv_pages import BlockPool
from jaxpart.serving.requests import Request, RequestError, SamplingParams, check_fits
from jaxpart.serving.scheduler import Scheduler, SchedulerConfig

VOCAB = 1000
SEED = int(os.environ.get("JAXPART_TEST_SEED", np.random.SeedSequence().entropy % 2**31))


class FakeModel:
  def __init__(self, pool: BlockPool, salt: int):
    self.bt, self.salt = pool.block_tokens, salt
    self.cache = np.full(pool.num_blocks * pool.block_tokens, -1, np.int64)

  def __call__(self, step):
    real = step.write_slots >= 0
    assert (step.token_slot[real] >= 0).all() and (step.token_slot[~real] == -1).all()
    self.cache[step.write_slots[real]] = step.token_ids[real]
    out = np.zeros(len(step.logit_index), np.int64)
    for s in np.nonzero(step.logit_index >= 0)[0]:
      i = step.logit_index[s]
      assert step.token_slot[i] == s
      p = np.arange(step.positions[i] + 1)
      blocks = step.block_tables[s, p // self.bt]
      assert (blocks >= 0).all(), "a position before the logit token has no block"
      seen = self.cache[blocks * self.bt + p % self.bt]
      assert (seen >= 0).all(), "a position was read before it was ever written"
      out[s] = zlib.crc32(seen.tobytes(), self.salt) % VOCAB
    return out


def drive(requests, cfg, num_blocks, cancel_after=None, on_step=None):
  """Run a stream on a simulated clock (10 ms a step); returns the scheduler."""
  pool = BlockPool(num_blocks)
  sched, model = Scheduler(cfg, pool), FakeModel(pool, SEED)
  pending, clock = deque(sorted(requests, key=lambda r: r.arrival_s)), 0.0
  cancel_after = dict(cancel_after or {})
  while pending or sched.has_work():
    while pending and pending[0].arrival_s <= clock:
      sched.add(pending.popleft())
    step = sched.schedule()
    if step is None:
      clock = pending[0].arrival_s
      continue
    sched.update(step, model(step))
    if on_step:
      on_step(sched, step)
    for rid, k in list(cancel_after.items()):
      done = sched.generated(rid)
      if done is None and rid in sched.outputs:
        del cancel_after[rid]
      elif done is not None and done >= k:
        sched.cancel(rid)
        del cancel_after[rid]
    clock += 0.01
  return sched


@pytest.mark.parametrize("mode", ["chunked", "continuous"])
def test_1000_requests_with_cancels_and_preemptions_lose_nothing(mode):
  rng = np.random.default_rng(SEED)
  reqs = workload.poisson(1000, rate=60.0, context=256, vocab=VOCAB, seed=SEED)
  cfg = SchedulerConfig(slots=16, chunk_tokens=64, context=256, mode=mode)
  cancelled = rng.choice(1000, 100, replace=False)
  cancel_after = {int(i): int(rng.integers(1, max(2, reqs[i].params.max_tokens)))
                  for i in cancelled}
  checks = []
  small = drive(reqs, cfg, num_blocks=40, cancel_after=cancel_after,
                on_step=lambda s, _: checks.append(s.pool.check()))
  assert small.preemptions > 0
  assert sorted(small.outputs) == list(range(1000)), "a request was lost"
  assert small.pool.used_blocks == 0 and small.pool.free_blocks == 40, "blocks leaked"
  small.pool.check()
  reasons = [o.reason for o in small.outputs.values()]
  assert 80 <= reasons.count("cancelled") <= 100
  assert set(reasons) <= {"cancelled", "length"}
  big = drive(reqs, cfg, num_blocks=16 * 16)
  assert big.preemptions == 0
  preempted = [o for o in small.outputs.values() if o.preemptions]
  assert preempted and any(o.reason == "length" for o in preempted)
  for rid, o in small.outputs.items():
    ref = big.outputs[rid]
    assert ref.reason == "length" and len(ref.tokens) == reqs[rid].params.max_tokens
    if o.reason == "cancelled":
      assert ref.tokens[:len(o.tokens)] == o.tokens
    else:
      assert o.tokens == ref.tokens, f"request {rid} ({o.preemptions} preemptions) differs"


@pytest.mark.parametrize("mode", ["chunked", "continuous"])
def test_step_shapes_are_fixed_over_a_200_request_stream(mode):
  reqs = workload.poisson(200, rate=40.0, context=512, vocab=VOCAB, seed=SEED)
  cfg = SchedulerConfig(slots=8, chunk_tokens=96, context=512, mode=mode)
  shapes = set()
  sched = drive(reqs, cfg, num_blocks=100, on_step=lambda s, step: shapes.add(step.shape))
  assert len(sched.outputs) == 200
  assert {shape[1:] for shape in shapes} == {(8, 512 // 16)}
  tokens = {shape[0] for shape in shapes}
  if mode == "chunked":
    assert tokens == {8 + 96}
  else:
    assert len(cfg.buckets) <= 3 and tokens <= {8, *cfg.buckets} and 8 in tokens
    assert len(tokens) >= 2


def test_kv_waste_under_4_percent_at_steady_state():
  reqs = workload.poisson(300, rate=200.0, context=2048, vocab=VOCAB, seed=SEED)
  cfg = SchedulerConfig(slots=32, chunk_tokens=256, context=2048)
  alloc, used = [], []

  def sample(sched, step):
    if len(sched.running) == cfg.slots:   # every slot busy: steady state
      u = sched.pool.usage()
      alloc.append(u.tokens_allocated)
      used.append(u.tokens_used)
      assert u.blocks_used * 16 == u.tokens_allocated
      assert u.tokens_allocated - u.tokens_used < 16 * cfg.slots

  drive(reqs, cfg, num_blocks=2048, on_step=sample)
  assert len(alloc) > 100
  waste = 1 - sum(used) / sum(alloc)
  print(f"kv_waste at steady state: {waste:.4f} over {len(alloc)} steps")
  assert 0 < waste < 0.04


def test_cancel_frees_blocks_by_the_next_step():
  pool = BlockPool(64)
  sched = Scheduler(SchedulerConfig(slots=4, chunk_tokens=32, context=128), pool)
  model = FakeModel(pool, SEED)
  rng = np.random.default_rng(SEED)
  for i in range(3):
    sched.add(Request(i, tuple(int(t) for t in rng.integers(0, VOCAB, 20 + 7 * i)),
                      params=SamplingParams(max_tokens=40)))
  for _ in range(4):
    step = sched.schedule()
    sched.update(step, model(step))
  assert sched.generated(1) > 0 and pool.table(1)
  held = len(pool.table(1))
  free = pool.free_blocks
  sched.cancel(1)
  step = sched.schedule()
  assert pool.table(1) == [] and 1 not in step.request_ids
  assert pool.free_blocks >= free + held - 2    # two decodes may each have taken a block
  assert sched.outputs[1].reason == "cancelled" and not (step.token_slot == -1).all()
  sched.update(step, model(step))
  pool.check()


def test_eos_and_stop_sequences_end_a_request():
  rng = np.random.default_rng(SEED)
  prompt = tuple(int(t) for t in rng.integers(0, VOCAB, 30))
  cfg = SchedulerConfig(slots=2, chunk_tokens=16, context=128)
  alone = drive([Request(0, prompt, params=SamplingParams(max_tokens=20))], cfg, 16)
  ref = alone.outputs[0].tokens
  k = int(rng.integers(3, 15))
  first = min(i for i, t in enumerate(ref) if t == ref[k])   # EOS ends at its first occurrence
  eos = drive([Request(0, prompt, params=SamplingParams(max_tokens=20, eos_ids=(ref[k],)))],
              cfg, 16)
  assert eos.outputs[0].tokens == ref[:first + 1] and eos.outputs[0].reason == "eos"
  stop = drive([Request(0, prompt, params=SamplingParams(max_tokens=20,
                                                         stop=((ref[k - 1], ref[k]),)))], cfg, 16)
  assert stop.outputs[0].reason == "stop" and stop.outputs[0].tokens[-2:] == ref[k - 1:k + 1]
  got = stop.outputs[0].tokens
  assert len(got) <= k + 1 and got == ref[:len(got)]


@pytest.mark.parametrize("kwargs, words", [
    ({"max_tokens": 0}, ["max_tokens = 0", "positive"]),
    ({"max_tokens": -3}, ["max_tokens = -3", "positive"]),
    ({"temperature": -0.5}, ["temperature = -0.5", ">= 0"]),
    ({"top_p": 0.0}, ["top_p = 0.0", "(0, 1]"]),
    ({"top_p": 1.5}, ["top_p = 1.5", "(0, 1]"]),
    ({"top_k": -1}, ["top_k = -1", ">= 0"]),
    ({"stop": ((),)}, ["stop", "empty"]),
])
def test_bad_sampling_params_give_one_line_errors(kwargs, words):
  with pytest.raises(RequestError) as e:
    SamplingParams(**kwargs)
  msg = str(e.value)
  assert "\n" not in msg and all(w in msg for w in words), msg


def test_bad_requests_give_one_line_errors():
  with pytest.raises(RequestError, match=r"prompt is empty") as e:
    Request(5, ())
  assert "\n" not in str(e.value)
  with pytest.raises(RequestError, match=r"prompt of 300 tokens is longer than the context"):
    check_fits(Request(1, (1,) * 300), 256)
  with pytest.raises(RequestError, match=r"prompt of 200 tokens \+ max_tokens 100 = 300 exceeds "
                     r"the context of 256 tokens; max_tokens can be at most 56"):
    check_fits(Request(2, (1,) * 200, params=SamplingParams(max_tokens=100)), 256)
  sched = Scheduler(SchedulerConfig(slots=2, chunk_tokens=8, context=64), BlockPool(4))
  with pytest.raises(RequestError, match="exceeds the context of 64"):
    sched.add(Request(3, (1,) * 60, params=SamplingParams(max_tokens=10)))
  with pytest.raises(UserError, match=r"--kv-blocks = 3: .* give at least 4 blocks"):
    Scheduler(SchedulerConfig(slots=2, chunk_tokens=8, context=64), BlockPool(3))


def test_pool_invariants_and_sizing():
  from jaxpart.config import ModelConfig   # noqa: PLC0415
  from jaxpart.placement.shards import kv_cache_bytes   # noqa: PLC0415
  rng = np.random.default_rng(SEED)
  pool = BlockPool(int(rng.integers(20, 40)), block_tokens=int(rng.integers(4, 20)))
  for step in range(200):
    sid = int(rng.integers(0, 6))
    if rng.random() < 0.3:
      pool.free(sid)
    else:
      n = pool.capacity(sid) + int(rng.integers(0, 2 * pool.block_tokens))
      ok = pool.can_allocate(n, sid)
      assert pool.allocate(sid, n) == ok
      if ok:
        pool.mark_used(sid, n)
    pool.check()
    u = pool.usage()
    assert u.blocks_used + u.blocks_free == pool.num_blocks and 0 <= u.kv_waste < 1
  cfg = ModelConfig(layers=4, d_model=256, n_heads=8, head_dim=32, d_ff=512, arch="llama",
                    n_kv_heads=2, vocab=512, dtype="bfloat16")
  per_token = kv_cache_bytes(cfg, 1, 1, tp=2, layers=2)
  assert kv_bytes_per_token(cfg, tp=2, layers=2) == per_token
  left = int(rng.integers(10**6, 10**8))
  blocks = blocks_from_bytes(cfg, left, tp=2, layers=2)
  assert blocks * 16 * per_token <= left < (blocks + 1) * 16 * per_token
  cap = pool_capacity(blocks, 16, 1000)
  assert cap["tokens"] == blocks * 16 and cap["context_sequences"] == blocks // 63


def test_workloads_fit_the_context_and_follow_their_shape():
  for scenario in workload.SCENARIOS:
    reqs = workload.make(scenario, 400, 5.0, context=768, vocab=VOCAB, seed=SEED)
    assert len(reqs) == 400
    assert all(len(r.prompt) + r.params.max_tokens <= 768 for r in reqs)
    arrivals = np.array([r.arrival_s for r in reqs])
    assert (np.diff(arrivals) >= 0).all() and 400 / arrivals[-1] == pytest.approx(5.0, rel=0.25)
  again = workload.make("long-prompt", 400, 5.0, context=768, vocab=VOCAB, seed=SEED)
  assert again == reqs
  lens = np.array([len(r.prompt) for r in reqs])
  assert lens[300:].min() > 3 * np.median(lens[:300])
  with pytest.raises(RequestError, match="--scenario = 'burst'"):
    workload.make("burst", 10, 1.0, 256, VOCAB)


def test_serving_modules_import_no_jax():
  code = ("import sys; import jaxpart.serving.scheduler, jaxpart.serving.workload; "
          "assert not [m for m in sys.modules if m == 'jax' or m.startswith('jax.')]")
  env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
  subprocess.run([sys.executable, "-c", code], check=True, env=env)
