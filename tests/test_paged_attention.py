"""Paged attention equals plain causal attention over each contiguous sequence.

The steps come from the serving scheduler (chunked mode: prompt chunks and decode tokens of
several sequences mixed in one padded step), over a pool whose free list was shuffled, so block
tables are random and lengths ragged. Each sequence has random Q/K/V per position; every
step's outputs are checked against attention.full_causal over the sequence's first positions.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpart.models.attention import full_causal
from jaxpart.models.paged_attention import paged_attention, paged_step, write_kv
from jaxpart.serving.kv_pages import BlockPool
from jaxpart.serving.requests import Request, SamplingParams
from jaxpart.serving.scheduler import Scheduler, SchedulerConfig


def _shuffled_pool(rng, n_blocks: int, block_tokens: int) -> BlockPool:
  """A pool whose free list is a random permutation: tables get scattered block ids."""
  pool = BlockPool(n_blocks, block_tokens)
  for b in range(n_blocks):
    assert pool.allocate(("junk", b), 1)
  for b in rng.permutation(n_blocks):
    pool.free(("junk", int(b)))
  return pool


@pytest.mark.parametrize("h, g", [(4, 2), (3, 3), (6, 1)])
def test_paged_steps_equal_contiguous_causal_attention(fresh_key, h, g):
  seed = int(jax.random.randint(fresh_key, (), 0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  e, bt, context = 8, int(rng.choice([4, 8, 16])), 80
  n_seq = 5
  lens = rng.integers(2, 40, n_seq)
  outs = rng.integers(1, 12, n_seq)
  # One padded batch for the reference: causal attention at a position never reads later ones.
  n_pos = int((lens + outs).max())
  q, k, v = (rng.standard_normal((n_seq, n_pos, heads, e)).astype(np.float32)
             for heads in (h, g, g))
  ref = np.asarray(full_causal(q, np.repeat(k, h // g, axis=2), np.repeat(v, h // g, axis=2)))
  qkv = list(zip(q, k, v))
  pool = _shuffled_pool(rng, 3 * context // bt, bt)
  sched = Scheduler(SchedulerConfig(slots=4, chunk_tokens=int(rng.integers(5, 20)),
                                    context=context), pool)
  for i in range(n_seq):
    sched.add(Request(i, tuple(int(t) for t in rng.integers(0, 50, lens[i])), float(i),
                      SamplingParams(max_tokens=int(outs[i]))))
  kcache = jnp.asarray(rng.standard_normal((pool.num_blocks, bt, g, e)) * 1e3, jnp.float32)
  vcache = jnp.full((pool.num_blocks, bt, g, e), jnp.nan)
  step_fn = jax.jit(paged_step)
  mixed = checked = 0
  while sched.has_work():
    step = sched.schedule()
    real = np.nonzero(step.token_slot >= 0)[0]
    rid = {s: r for s, r in enumerate(step.request_ids)}
    q_T, k_T, v_T = (np.zeros((len(step.token_ids), *a.shape[1:]), np.float32) for a in qkv[0])
    for i in real:
      for x, y in zip((q_T, k_T, v_T), qkv[rid[step.token_slot[i]]]):
        x[i] = y[step.positions[i]]
    out_T, kcache, vcache = step_fn(q_T, k_T, v_T, kcache, vcache, step.positions,
                                    step.token_slot, step.write_slots, step.block_tables)
    want = np.zeros(out_T.shape, np.float32)
    for i in real:
      want[i] = ref[rid[step.token_slot[i]]][step.positions[i]]
    np.testing.assert_allclose(np.asarray(out_T), want, rtol=1e-5, atol=1e-5)
    mixed += bool(step.prompt_tokens and step.decode_tokens)
    checked += len(real)
    sched.update(step, np.zeros(4, np.int64))
  assert mixed > 0 and checked == sum(lens + outs) - n_seq
  assert all(o.reason == "length" for o in sched.outputs.values())


def test_write_kv_drops_padding_and_keeps_bit_patterns(fresh_key):
  rng = np.random.default_rng(int(jax.random.randint(fresh_key, (), 0, 2**31 - 1)))
  n, p, g, e, t = 6, 4, 2, 8, 7
  k_T = jnp.asarray(rng.standard_normal((t, g, e)), jnp.bfloat16)
  write_T = rng.permutation(n * p)[:t].astype(np.int32)
  write_T[rng.integers(t)] = -1
  cache = rng.integers(0, 2**16, (n, p, g, e)).astype(np.uint16)
  kc, _ = jax.jit(write_kv)(cache, cache, k_T, k_T, write_T)
  flat, before = np.asarray(kc).reshape(n * p, g, e), cache.reshape(n * p, g, e)
  want = np.asarray(jax.lax.bitcast_convert_type(k_T, jnp.uint16))
  for i in np.nonzero(write_T >= 0)[0]:
    np.testing.assert_array_equal(flat[write_T[i]], want[i])
  untouched = np.setdiff1d(np.arange(n * p), write_T)
  np.testing.assert_array_equal(flat[untouched], before[untouched])
  out = jax.jit(paged_attention)(jnp.ones((t, 2, e), jnp.bfloat16), kc, kc,
                                 np.zeros(t, np.int32), np.full(t, -1, np.int32),
                                 np.zeros((2, 3), np.int32))
  assert not np.asarray(out, np.float32).any(), "padding tokens must give zeros"
