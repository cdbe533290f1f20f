"""The serving step on the placed pipeline: tokens equal generate's, whatever runs beside them.

llama-tiny in float32 with random parameters (norm scales too), 16 simulated devices, both
placements (baseline tp 8 x pp 2; layer-wise 4 stages x tp 4, whose tp replicates the K/V
heads). Requests arrive at random times on the loop's virtual clock, so prompt chunks and
decode tokens of different requests share steps; each request's greedy tokens must equal what
runtime.generate gives for its prompt (its rows are independent: test_generate checks them
against transformers' generate of each prompt alone). Forcing a small pool preempts and
recomputes, which must not change a token; one compiled step serves the whole stream.
"""

import dataclasses
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import require_devices
from jaxpart import config
from jaxpart.models import llama
from jaxpart.placement import planner
from jaxpart.placement.shards import padded_vocab
from jaxpart.runtime import compat, generate, runs
from jaxpart.serving.engine_loop import LoopError, LoopOptions, serve
from jaxpart.serving.requests import Request, SamplingParams
from jaxpart.serving.kv_pages import BlockPool
from jaxpart.serving.sampling import TOP_LOGPROBS, row_settings
from jaxpart.serving.scheduler import Scheduler, SchedulerConfig
from jaxpart.serving.step import StepError, Stepper

PLACEMENTS = {"baseline": dict(tp=8, pp=2), "layerwise": dict(chunk_tokens=4, kv_block=8)}
N_REQ, CONTEXT, BT, POOL = 6, 48, 8, 40
SLOTS, CHUNK = 3, 8


def _requests(rng, n, arrive_by=0.3, short_first=0, **params):
  """n requests of 3..20 prompt and 14..20 output tokens, the first short_first prompts of at
  most 8 tokens (one block): three of those at once outgrow a 6-block pool."""
  lens, outs = rng.integers(3, 21, n), rng.integers(14, 21, n)
  lens[:short_first] = rng.integers(3, 9, short_first)
  return [Request(i, tuple(int(t) for t in rng.integers(0, 256, lens[i])),
                  float(rng.uniform(0, arrive_by)),
                  SamplingParams(max_tokens=int(outs[i]), **params)) for i in range(n)]


def _opts(**kw):
  return LoopOptions(**{**dict(slots=SLOTS, chunk_tokens=CHUNK, context=CONTEXT, kv_blocks=POOL,
                               block_tokens=BT, clock="virtual"), **kw})


@pytest.fixture(scope="module")
def placements():
  """Placement name -> (stepper, requests, generate's tokens per request, (setup, host
  parameters)), made on first use with fresh parameters, so a test that needs one placement
  does not build the other."""
  require_devices(16)
  made = {}

  def get(name):
    if name not in made:
      made[name] = _place(name)
    return made[name]
  return get


def _place(name):
  seed = int(np.random.SeedSequence().entropy % 2**31)
  print(f"placement {name}: seed {seed}")
  rng = np.random.default_rng(seed)
  setup = config.load_setup("llama-tiny", overrides={"model.dtype": "float32"})
  reqs = _requests(rng, N_REQ, short_first=SLOTS)
  ids = np.full((N_REQ, max(len(r.prompt) for r in reqs)), generate.PAD)
  for i, r in enumerate(reqs):
    ids[i, :len(r.prompt)] = r.prompt
  setup = dataclasses.replace(setup, run=config.RunShape(*ids.shape))
  plan = planner.make_plan(setup, 16, name, **PLACEMENTS[name])
  params = runs.host_params(setup, seed)
  ids0, lens = generate.split_prompts(ids, setup.model.vocab)
  new = max(r.params.max_tokens for r in reqs)
  want = generate.generate(setup, plan, params, ids0, lens, new).tokens
  stepper = Stepper(setup, plan, params, POOL, BT)
  want = {r.id: tuple(want[i, :r.params.max_tokens]) for i, r in enumerate(reqs)}
  return stepper, reqs, want, (setup, params)


@pytest.fixture(params=sorted(PLACEMENTS))
def placed(request, placements):
  return placements(request.param)


def _check_record(res, reqs):
  assert res.blocks_leaked == 0
  for r in reqs:
    c = res.completions[r.id]
    assert len(c.token_times_s) == len(c.tokens)
    assert c.ttft_s >= 0 and all(d >= 0 for d in c.itl_s)


def test_greedy_tokens_equal_generate_with_random_arrivals(placed):
  stepper, reqs, want, _ = placed
  before = stepper.traces
  res = serve(stepper, reqs, _opts())
  got = {rid: c.tokens for rid, c in res.completions.items()}
  assert got == want
  assert all(c.reason == "length" for c in res.completions.values())
  assert res.steps < sum(len(r.prompt) + r.params.max_tokens for r in reqs)  # steps shared
  assert len(res.step_shapes) == 1 and stepper.traces - before <= 1
  _check_record(res, reqs)


def test_preemption_recompute_and_cancel_keep_tokens(placed):
  """All arriving at once into a pool of 6 blocks (one 48-token context): the first three
  prompts fit a block each and grow to 3 blocks, so a sequence is preempted and recomputed. A
  cancelled request stops with a prefix of its tokens. The device pool still holds earlier
  runs' K/V in other slots: stale blocks must never be read."""
  stepper, reqs, want, _ = placed
  reqs = [dataclasses.replace(r, arrival_s=0.0) for r in reqs]
  victim = reqs[-1]
  res = serve(stepper, reqs, _opts(kv_blocks=6), cancel_after={victim.id: 2})
  assert res.preemptions > 0
  for r in reqs:
    c = res.completions[r.id]
    if r.id == victim.id:
      assert c.reason == "cancelled" and 2 <= len(c.tokens) < len(want[r.id])
      assert c.tokens == want[r.id][:len(c.tokens)]
    else:
      assert c.tokens == want[r.id], r.id
  _check_record(res, reqs)
  assert stepper.traced.count(SLOTS + CHUNK) == 1    # the first run's shape: no recompile


def test_continuous_mode_equals_generate_and_compiles_once_per_bucket(placements):
  """Whole prompts padded to a bucket, then decode steps of S tokens: generate's tokens, and
  over a longer stream in both modes no shape is compiled twice, chunked mode compiles one
  shape and continuous at most 1 + buckets."""
  stepper, reqs, want, _ = placements("baseline")
  before, buckets = stepper.traces, (24, CONTEXT)
  res = serve(stepper, reqs, _opts(mode="continuous", buckets=buckets, kv_blocks=12))
  assert {rid: c.tokens for rid, c in res.completions.items()} == want
  assert {s[0] for s in res.step_shapes} >= {SLOTS, 24}   # decode steps and a prefill bucket
  stream = _requests(np.random.default_rng(len(reqs)), 20, arrive_by=1.0, temperature=0.7,
                     top_k=5)
  for mode in ("chunked", "continuous"):
    res = serve(stepper, stream, _opts(mode=mode, buckets=buckets))
    assert len(res.completions) == 20 and res.blocks_leaked == 0
  new = stepper.traced[before:]
  assert len(new) == len(set(stepper.traced)) - len(set(stepper.traced[:before])), new
  assert stepper.traced.count(SLOTS + CHUNK) <= 1
  continuous = [t for t in stepper.traced if t != SLOTS + CHUNK]
  assert set(continuous) <= {SLOTS, *buckets} and len(continuous) <= 1 + len(buckets)


def test_mixed_sampling_settings_in_one_batch(placements):
  """Greedy rows beside sampled ones keep generate's tokens; a seeded sampled request draws the
  same tokens alone as beside others; top_k 1 is greedy; another seed draws differently."""
  stepper, reqs, want, _ = placements("layerwise")
  hot = [dataclasses.replace(r, id=("hot", r.id), params=dataclasses.replace(
      r.params, temperature=1.3, top_p=0.9, seed=int(r.id) + 11)) for r in reqs[:3]]
  one = dataclasses.replace(reqs[3], id="top1", params=dataclasses.replace(
      reqs[3].params, temperature=2.0, top_k=1, seed=5))
  mixed = serve(stepper, reqs + hot + [one], _opts(kv_blocks=POOL))
  for r in reqs:
    assert mixed.completions[r.id].tokens == want[r.id], r.id
  assert mixed.completions["top1"].tokens == want[reqs[3].id]
  alone = {h.id: serve(stepper, [h], _opts()).completions[h.id].tokens for h in hot[:2]}
  for h in hot[:2]:
    assert mixed.completions[h.id].tokens == alone[h.id], h.id
  reseeded = [dataclasses.replace(h, params=dataclasses.replace(h.params, seed=h.params.seed + 1))
              for h in hot]
  other = serve(stepper, reseeded, _opts())
  assert any(other.completions[h.id].tokens != mixed.completions[h.id].tokens for h in hot)
  assert stepper.traced.count(SLOTS + CHUNK) == 1


def test_bf16_tokens_do_not_depend_on_what_runs_beside(placements):
  """bfloat16 (the pool holds bit patterns): each request's greedy tokens in a stream with
  random arrivals equal the scheduler's own run of that request alone (generate chunks a
  prompt differently, so in bf16 it is not the reference)."""
  f32, reqs, _, (setup, params) = placements("layerwise")
  stepper = Stepper(setup, f32.plan, params, POOL, BT, dtype=jnp.bfloat16)
  assert stepper.kpool.dtype == jnp.uint16
  res = serve(stepper, reqs, _opts())
  for r in reqs[:4]:
    assert serve(stepper, [r], _opts()).completions[r.id].tokens == res.completions[r.id].tokens
  assert stepper.traces == 1


def test_bad_pool_or_model_is_refused(placements):
  with pytest.raises(StepError, match="arch 'dense': serving needs a token model"):
    Stepper(config.load_setup("tiny"), None, None, POOL, BT)
  stepper, reqs, _, _ = placements("layerwise")
  with pytest.raises(LoopError, match="kv_blocks = 41: the step's pool holds 40"):
    serve(stepper, reqs, _opts(kv_blocks=POOL + 1))
  with pytest.raises(LoopError, match="block_tokens = 16"):
    serve(stepper, reqs, _opts(block_tokens=16))


def test_logits_only_at_the_logit_rows(placements):
  """The compiled step holds S x V logits (S x V/tp per shard), never T x V."""
  stepper, reqs, _, _ = placements("baseline")
  t, vocab, tp = SLOTS + CHUNK, stepper.cfg.vocab, stepper.plan.tp
  m = -(-CONTEXT // BT)
  args = (np.zeros(t, np.int32), np.zeros(t, np.int32), np.full(t, -1, np.int32),
          np.full(t, -1, np.int32), np.full((SLOTS, m), -1, np.int32),
          np.full(SLOTS, -1, np.int32)) + row_settings([None] * SLOTS, [0] * SLOTS).arrays()
  text = stepper._fn.lower(stepper.params, stepper.kpool, stepper.vpool, *args).as_text()
  shapes = {tuple(int(d) for d in s.split("x")) for s in
            re.findall(r"tensor<((?:\d+x)+)f32>", text) for s in [s.rstrip("x")]}
  logits = {s for s in shapes if s[-1] in (vocab, vocab // tp)}
  assert (SLOTS, vocab) in logits and (SLOTS, vocab // tp) in logits, sorted(logits)
  assert not [s for s in logits if t in s], sorted(logits)


def test_wall_clock_waits_for_arrivals_and_stamps_tokens():
  """The wall clock admits a request no earlier than its arrival (sleeping while idle) and
  stamps each token when its step returns; a bad clock is one error line. No device: the step
  is a stand-in that answers token 7 for every slot."""
  def stand_in(batch, settings):
    assert len(settings.temperature_S) == SLOTS
    return np.full(SLOTS, 7)
  reqs = [Request(0, (1, 2, 3), 0.0, SamplingParams(max_tokens=2)),
          Request(1, (4,), 0.05, SamplingParams(max_tokens=3))]
  t0 = time.perf_counter()
  res = serve(stand_in, reqs, _opts(clock="wall"))
  assert time.perf_counter() - t0 >= 0.05
  assert res.completions[1].tokens == (7, 7, 7) and res.completions[0].tokens == (7, 7)
  assert res.completions[1].token_times_s[0] >= 0.05 and res.completions[1].ttft_s >= 0
  with pytest.raises(LoopError, match="clock = 'sundial': valid clocks are wall, virtual"):
    _opts(clock="sundial")


def _step_memory(stepper, blocks):
  """(per-device memory of the step compiled for a pool of `blocks` blocks, one device's pool
  bytes), on abstract pools: nothing is allocated."""
  shape = (stepper.plan.layers, blocks) + stepper.kpool.shape[2:]
  pool = jax.ShapeDtypeStruct(shape, stepper.kpool.dtype, sharding=stepper.kpool.sharding)
  t, m = SLOTS + CHUNK, -(-CONTEXT // BT)
  args = (np.zeros(t, np.int32), np.zeros(t, np.int32), np.full(t, -1, np.int32),
          np.full(t, -1, np.int32), np.full((SLOTS, m), -1, np.int32),
          np.full(SLOTS, -1, np.int32)) + row_settings([None] * SLOTS, [0] * SLOTS).arrays()
  mem = compat.compiled_memory(stepper._fn.lower(stepper.params, pool, pool, *args).compile())
  return mem, int(np.prod(pool.sharding.shard_shape(shape))) * pool.dtype.itemsize


@pytest.mark.parametrize("name", sorted(PLACEMENTS))
def test_step_updates_the_pool_in_place(placements, name):
  """The step's temp bytes do not grow with the pool: compiled for a small and a large pool
  (abstract), the temp grows by far less than one device's pool does and stays well below the
  large pool, so the pool is updated in place, not copied (a row scatter or gather on the 4-D
  pool copied it: temp ~1x pool)."""
  stepper = placements(name)[0]
  big = 2048 + int(np.random.default_rng().integers(0, 1024))
  (small_mem, small_pool), (big_mem, big_pool) = (_step_memory(stepper, b) for b in (64, big))
  assert big_mem.alias_bytes >= 2 * big_pool            # both pools donated
  assert big_mem.temp_bytes - small_mem.temp_bytes < (big_pool - small_pool) / 16, (
      small_mem.temp_bytes, big_mem.temp_bytes, big_pool)
  assert big_mem.temp_bytes < big_pool / 8, (big_mem.temp_bytes, big_pool)


def test_logprobs_raw_over_the_true_vocabulary_only():
  """A vocabulary of 997 on 16 devices (tp 8 x pp 2) is padded to 1008: the step's top-5 ids
  and log-probabilities must come from log_softmax over the 997 true columns only (padding
  inside the softmax would shift every value), equal the unplaced reference forward's, and not
  change with a row's temperature (raw logprobs)."""
  require_devices(16)
  seed = int(np.random.SeedSequence().entropy % 2**31)
  print(f"seed {seed}")
  rng = np.random.default_rng(seed)
  setup = config.load_setup("llama-tiny", overrides={"model.dtype": "float32",
                                                     "model.vocab": 997})
  prompt = tuple(int(t) for t in rng.integers(0, 997, int(rng.integers(3, 8))))
  setup = dataclasses.replace(setup, run=config.RunShape(2, len(prompt)))
  plan = planner.make_plan(setup, 16, "baseline", **PLACEMENTS["baseline"])
  params = runs.host_params(setup, seed)
  stepper = Stepper(setup, plan, params, POOL, BT)
  assert padded_vocab(997, 16) > 997 and stepper.params["embed"]["table"].shape[0] > 997
  reqs = [Request(i, prompt, 0.0, SamplingParams(max_tokens=2, temperature=t, seed=3))
          for i, t in enumerate((0.0, 2.5))]
  sched = Scheduler(SchedulerConfig(2, 2 * 8, CONTEXT), BlockPool(POOL, BT))   # both prompts
  for r in reqs:
    sched.add(r)
  batch = sched.schedule()
  assert sorted(batch.request_ids) == [0, 1] and (batch.logit_index >= 0).all()
  out = stepper.step(batch, row_settings([reqs[r].params for r in batch.request_ids], [0, 0]))
  want = jax.nn.log_softmax(llama.forward(params, jnp.asarray([prompt]), setup.model)[0, -1])
  want = np.asarray(want, np.float64)
  order = np.argsort(-want)[:TOP_LOGPROBS]
  for s in range(2):
    assert (out.top_ids_SxK[s] < 997).all()
    np.testing.assert_allclose(out.top_logprobs_SxK[s], want[order], atol=1e-4)
    assert list(out.top_ids_SxK[s]) == list(order)
    assert np.isclose(out.logprob_S[s], want[out.ids_S[s]], atol=1e-4)
  greedy = list(batch.request_ids).index(0)
  assert out.ids_S[greedy] == order[0] and out.logprob_S[greedy] == out.top_logprobs_SxK[greedy, 0]
