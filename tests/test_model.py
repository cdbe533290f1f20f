"""The single-device reference: shapes, determinism, precision and causality."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpart import config
from jaxpart.models import attention
from jaxpart.models import dense as model
from jaxpart.runtime import runs

TINY = config.MODEL_PRESETS["tiny"]
# bf16 keeps 8 significant bits: each rounding of the residual stream costs up to 2^-9
# relative. 4 layers x (2 residual adds + matmul input roundings) make ~16 roundings, so the
# RMS error of a bf16 forward against float32 should stay near sqrt(16) x 2^-9 ~ 0.8% and the
# worst element within a linear 16 x 2^-9 ~ 3.1%. Measured here: RMS ~0.55%, max ~0.9%.
BF16_RMS_REL = 2.0**-6
BF16_MAX_REL = 2.0**-5


def _inputs(key, cfg=TINY, batch=2, seq=100):
  """Random weights, random LayerNorm scales and biases, random input."""
  kp, kx, kn = jax.random.split(key, 3)
  params = model.randomize_norms(model.init_params(cfg, kp), kn)
  return params, model.random_input(cfg, batch, seq, kx)


def test_shapes_and_dtypes(fresh_key):
  params, x = _inputs(fresh_key)
  for leaf in jax.tree.leaves(params):
    assert leaf.dtype == jnp.bfloat16 and leaf.shape[0] == TINY.layers
  assert params["attn"]["wq"].shape == (4, 128, 32)
  assert params["mlp"]["w_out"].shape == (4, 128, 128)
  y = model.forward(params, x, TINY)
  assert y.shape == x.shape and y.dtype == jnp.bfloat16
  y32 = runs.reference_forward(TINY, jnp.float32)(params, x)
  assert y32.dtype == jnp.float32


def test_flax_module_matches_functional_forward(fresh_key):
  params, x = _inputs(fresh_key)
  variables = model.DenseStack(TINY).init(jax.random.key(1), x)
  nested = model.nest_params(variables["params"])
  y_module = model.DenseStack(TINY).apply(variables, x)
  np.testing.assert_array_equal(np.asarray(y_module), np.asarray(model.forward(nested, x, TINY)))


def test_deterministic_under_fixed_key():
  p1, x1 = _inputs(jax.random.key(7))
  p2, x2 = _inputs(jax.random.key(7))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), p1, p2)
  np.testing.assert_array_equal(np.asarray(model.forward(p1, x1, TINY)),
                                np.asarray(model.forward(p2, x2, TINY)))
  p3, _ = _inputs(jax.random.key(8))
  assert not np.array_equal(np.asarray(p1["attn"]["wq"]), np.asarray(p3["attn"]["wq"]))


def test_bf16_close_to_float32(fresh_key):
  params, x = _inputs(fresh_key)
  y16 = np.asarray(model.forward(params, x, TINY), np.float64)
  y32 = np.asarray(runs.reference_forward(TINY, jnp.float32)(params, x), np.float64)
  scale_rms = np.sqrt(np.mean(y32**2))
  assert np.sqrt(np.mean((y16 - y32)**2)) / scale_rms < BF16_RMS_REL
  assert np.max(np.abs(y16 - y32)) / np.max(np.abs(y32)) < BF16_MAX_REL
  assert not np.array_equal(y16, y32)  # bf16 really ran in bf16


def test_randomize_norms_touches_only_the_norms(fresh_key):
  params = model.init_params(TINY, fresh_key)
  rand = model.randomize_norms(params, jax.random.fold_in(fresh_key, 1))
  for group in ("attn", "mlp"):
    for name in params[group]:
      assert rand[group][name] is params[group][name]
  for ln in ("ln1", "ln2"):
    s, b = (np.asarray(rand[ln][n], np.float64) for n in ("scale", "bias"))
    assert rand[ln]["scale"].dtype == params[ln]["scale"].dtype
    assert abs(s.mean() - 1) < 0.2 and 0.35 < s.std() < 0.65
    assert abs(b.mean()) < 0.2 and 0.35 < b.std() < 0.65
  assert not np.array_equal(np.asarray(rand["ln1"]["bias"]), np.asarray(rand["ln2"]["bias"]))


def test_causality_exact(fresh_key):
  params, x = _inputs(fresh_key)
  t = 57
  x2 = x.at[:, t:].set(jax.random.normal(jax.random.fold_in(fresh_key, 3), x[:, t:].shape,
                                         jnp.float32).astype(x.dtype))
  y1, y2 = model.forward(params, x, TINY), model.forward(params, x2, TINY)
  np.testing.assert_array_equal(np.asarray(y1[:, :t]), np.asarray(y2[:, :t]))
  assert not np.array_equal(np.asarray(y1[:, t:]), np.asarray(y2[:, t:]))


@pytest.mark.parametrize("kv_block, q_start, n_q", [(16, 0, 100), (16, 48, 16), (32, 90, 10),
                                                    (128, 0, 100)])
def test_blocked_attention_equals_full(fresh_key, kv_block, q_start, n_q):
  """Queries q_start.. against a cache with garbage after the last query: masked, never read."""
  b, h, e, total = 2, 4, 8, 100
  cache_len = -(-max(total, q_start + n_q) // kv_block) * kv_block
  kq, kk, kv, kg = jax.random.split(fresh_key, 4)
  q = jax.random.normal(kq, (b, total, h, e), jnp.float32)
  k = jax.random.normal(kk, (b, total, h, e), jnp.float32)
  v = jax.random.normal(kv, (b, total, h, e), jnp.float32)
  full = attention.full_causal(q, k, v)
  junk = jnp.full((b, cache_len - total, h, e), jnp.nan, jnp.float32)
  kc, vc = jnp.concatenate([k, junk], 1), jnp.concatenate([v, junk], 1)
  # positions after the queries hold NaN: they must be masked, not multiplied by zero
  last = q_start + n_q
  kc = kc.at[:, last:].set(jnp.nan)
  vc = vc.at[:, last:].set(jnp.nan)
  out = attention.blocked_causal(q[:, q_start:last], kc, vc, q_start, kv_block)
  np.testing.assert_allclose(np.asarray(out), np.asarray(full[:, q_start:last]), rtol=2e-5,
                             atol=2e-6)
