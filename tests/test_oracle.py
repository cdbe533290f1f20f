"""The reference and the engine against the independent float64 NumPy oracle (tests/oracle.py).

The float32 engine is checked against the oracle in test_engine (every placement); here the
reference and the engine run in float64, where anything rounded to float32 inside (a matmul's
accumulation, LayerNorm's or softmax's statistics) shows as an error of 1e-7 or more.
"""

import jax
import jax.numpy as jnp
import numpy as np

import oracle
from conftest import require_devices
from jaxpart import config
from jaxpart.placement import planner
from jaxpart.runtime import runs

TINY = config.MODEL_PRESETS["tiny"]


def _x64():
  return jax.enable_x64(True)


def _host(setup, key):
  seed = int(jax.random.randint(key, (), 0, 2**30))
  return runs.host_params(setup, seed), runs.host_input(setup, seed)


def test_oracle_pieces_from_first_principles(fresh_key):
  """The oracle's parts checked on what they must do, not against jaxpart."""
  rng = np.random.default_rng(int(jax.random.randint(fresh_key, (), 0, 2**30)))
  x = rng.normal(3.0, 2.0, (2, 5, 64))
  y = oracle.layernorm(x, np.ones(64), np.zeros(64), 0.0)
  np.testing.assert_allclose(y.mean(-1), 0, atol=1e-12)
  np.testing.assert_allclose(y.std(-1), 1, rtol=1e-12)
  s, b = rng.normal(size=64), rng.normal(size=64)
  np.testing.assert_allclose(oracle.layernorm(x, s, b, 0.0), y * s + b, rtol=1e-12)
  # GELU: x * Phi(x) to within the tanh approximation's 1e-3; exact at 0, odd part x/2
  g = oracle.gelu_tanh(np.array([-3.0, -1.0, 0.0, 1.0, 3.0]))
  phi = 0.5 * (1 + np.array([-0.99730020, -0.68268949, 0.0, 0.68268949, 0.99730020]))
  np.testing.assert_allclose(g, np.array([-3.0, -1.0, 0.0, 1.0, 3.0]) * phi, atol=1e-3)
  np.testing.assert_allclose(g[3] - g[1], 1.0, rtol=1e-12)
  # attention: token 0 sees only itself; with q = 0 every token averages v over its prefix
  q, k, v = rng.normal(size=(3, 2, 6, 3, 4))
  out = oracle.causal_attention(q, k, v)
  np.testing.assert_allclose(out[:, 0], v[:, 0], rtol=1e-12)
  flat = oracle.causal_attention(np.zeros_like(q), k, v)
  np.testing.assert_allclose(flat, np.cumsum(v, 1) / np.arange(1, 7)[None, :, None, None],
                             rtol=1e-12)


def test_random_norms_make_norm_bugs_visible(fresh_key):
  """Under the random norms every check uses, the bugs scale 1 / bias 0 hide are large."""
  setup = config.load_setup("tiny", overrides={"run.seq": "20"})
  params, x = _host(setup, fresh_key)
  for leaf in (params["ln1"]["scale"], params["ln2"]["bias"]):
    assert np.std(np.asarray(leaf, np.float64)) > 0.3
  cfg = setup.model
  want = oracle.forward(params, x, cfg.head_dim, cfg.ln_eps)
  swapped = {**params, "ln1": params["ln2"], "ln2": params["ln1"]}
  no_bias = {**params, "ln1": {**params["ln1"], "bias": np.zeros_like(params["ln1"]["bias"])}}
  for bad in (swapped, no_bias):
    assert oracle.rel_err(oracle.forward(bad, x, cfg.head_dim, cfg.ln_eps), want) > 1e-2


def test_reference_float64_equals_oracle(fresh_key):
  """model.forward in float64 (x64 on for this test only) within 1e-12 of the oracle."""
  setup = config.load_setup("tiny")
  params, x = _host(setup, fresh_key)
  want = oracle.forward(params, x, TINY.head_dim, TINY.ln_eps)
  with _x64():
    y = runs.reference_forward(TINY, jnp.float64)(params, jnp.asarray(x))
    assert y.dtype == jnp.float64
    got = np.asarray(y)
  assert oracle.rel_err(got, want) < runs.F64_REL_TOL
  assert jnp.ones(1).dtype == jnp.float32, "x64 leaked out of the test"


def test_engine_float64_equals_oracle(fresh_key):
  """The layer-wise engine (4 stages x tp 4, ragged chunks, NaN bubbles) in float64."""
  require_devices(16)
  setup = config.load_setup("tiny", overrides={"run.seq": "40", "model.dtype": "float64"})
  with _x64():
    params, x = _host(setup, fresh_key)
    plan = planner.make_plan(setup, 16, "layerwise", chunk_tokens=12)   # 12, 12, 12, 4
    assert plan.last_chunk_tokens == 4 and plan.mesh_shape == (4, 4)
    placed = runs.place(setup, plan, params, x, bubble_fill=float("nan"), out_fill=float("nan"))
    y = placed()
    assert y.dtype == jnp.float64 and placed.params["mlp"]["w_in"].dtype == jnp.float64
    got = runs.fetch(y)
  want = oracle.forward(params, x, setup.model.head_dim, setup.model.ln_eps)
  assert oracle.rel_err(got, want) < runs.F64_REL_TOL
