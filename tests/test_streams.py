"""The engine's sharded input and output streams and its query-tiled attention, against the
single-device reference: ragged chunks, ragged query tiles, NaN in bubbles and in the output
buffer before it is written."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import require_devices
from jaxpart import config
from jaxpart.models import attention
from jaxpart.placement import planner
from jaxpart.placement.plan import PlanError
from jaxpart.runtime import runs
from jaxpart.runtime import sharding

NAN = float("nan")
TINY = config.load_setup("tiny")


def _check(plan, key, **engine_kw):
  seed = int(jax.random.randint(key, (), 0, 2**30))
  params_h, x_h = runs.host_params(TINY, seed), runs.host_input(TINY, seed)
  placed = runs.place(TINY, plan, params_h, x_h, dtype=jnp.float32, bubble_fill=NAN,
                      out_fill=NAN, **engine_kw)
  y = placed()
  assert y.sharding.is_equivalent_to(sharding.stream(placed.mesh), 3), y.sharding
  err = runs.errors(runs.fetch(y), runs.reference(TINY, params_h, x_h, jnp.float32))
  assert err["finite"], "output has NaN/inf"
  assert err["max_rel_err"] < 1e-5, err


@pytest.mark.parametrize("strategy, kw", [
    # whole sequences of 100 in query tiles of 16: six full tiles and one of 4
    ("baseline", dict(tp=8, pp=2, kv_block=16)),
    # chunks of 24 (the last of 4) in query tiles of 16 and 8
    ("layerwise", dict(chunk_tokens=24, kv_block=16)),
    # rows and chunks both split; chunks of 7 against blocks of 16
    ("layerwise", dict(chunk_tokens=7, chunk_rows=1, kv_block=16)),
])
def test_tiled_attention_in_the_engine(fresh_key, strategy, kw):
  require_devices(16)
  _check(planner.make_plan(TINY, 16, strategy, **kw), fresh_key)


def test_one_stage_and_one_device(fresh_key):
  """No stage axis to gather over (S = 1) and no tensor axis either (N = 1)."""
  require_devices(4)
  _check(planner.make_plan(TINY, 4, "baseline", tp=4, pp=1), fresh_key)
  _check(planner.make_plan(TINY, 1, "layerwise", chunk_tokens=30), fresh_key)


def test_stream_width_must_split_over_devices():
  setup = config.load_setup("tiny", overrides={"model.d_model": "120", "model.head_dim": "3",
                                                "model.d_ff": "120"})
  plan = planner.make_plan(setup, 16, "layerwise")
  with pytest.raises(PlanError, match="d_model = 120 is not divisible by devices = 16"):
    from jaxpart.runtime import engine
    engine.make_forward(plan, setup.model, sharding.mesh_for(plan))


@pytest.mark.parametrize("b, t, h, g, e, kv_block, q_block, chunk", [
    (2, 37, 4, 2, 8, 8, None, 37),    # GQA, one chunk in ragged tiles
    (1, 100, 4, 4, 8, 16, 16, 30),    # chunks of 30 in tiles of 16 and 14
    (2, 50, 6, 3, 4, 16, 8, 13),      # tiles smaller than blocks
])
def test_blocked_attention_matches_full(fresh_key, b, t, h, g, e, kv_block, q_block, chunk):
  """Chunk by chunk against a cache whose future slots hold NaN, forward and gradient."""
  kq, kk, kv = jax.random.split(fresh_key, 3)
  q = jax.random.normal(kq, (b, t, h, e))
  k, v = (jax.random.normal(key, (b, t, g, e)) for key in (kk, kv))
  rep = lambda a: jnp.repeat(a, h // g, axis=2)
  want = attention.full_causal(q, rep(k), rep(v))
  cache_len = -(-t // kv_block) * kv_block + kv_block
  pos = jnp.arange(cache_len)[None, :, None, None]
  outs = []
  for start in range(0, t, chunk):
    n = min(chunk, t - start)
    kc, vc = (jnp.where(pos < start + n, jnp.pad(a, ((0, 0), (0, cache_len - t), (0, 0), (0, 0))),
                        NAN) for a in (k, v))
    outs.append(attention.blocked_causal(q[:, start:start + n], kc, vc, start, kv_block,
                                         q_block=q_block))
  got = jnp.concatenate(outs, axis=1)
  assert bool(jnp.isfinite(got).all())
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
  kc, vc = (jnp.pad(a, ((0, 0), (0, cache_len - t), (0, 0), (0, 0))) for a in (k, v))
  g_got = jax.grad(lambda q: (attention.blocked_causal(q, kc, vc, 0, kv_block, q_block=q_block)
                              * want).sum())(q)
  g_want = jax.grad(lambda q: (attention.full_causal(q, rep(k), rep(v)) * want).sum())(q)
  np.testing.assert_allclose(g_got, g_want, atol=2e-5, rtol=1e-4)
