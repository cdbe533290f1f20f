"""The Llama family without transformers: config, parameter counts, presets, absolute RoPE
positions for chunks, and the single-device reference's own properties."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpart import config
from jaxpart.models import attention
from jaxpart.models import llama, spec
from jaxpart.config import ConfigError, ModelConfig, RopeScaling

TINY = dataclasses.replace(config.MODEL_PRESETS["llama-tiny"], dtype="float32",
                           rope_scaling=RopeScaling(8.0, 1.0, 4.0, 16))
LLAMA_PRESETS = sorted(n for n, m in config.MODEL_PRESETS.items() if m.arch == "llama")
init = jax.jit(llama.init_params, static_argnums=0)
forward = jax.jit(llama.forward, static_argnums=2)


@pytest.fixture(scope="module")
def tiny(request):
  """llama-tiny in float32 with llama3 rope scaling (original length 16, so it acts within
  37 tokens), random parameters and ids, shared by this module's tests (one compile)."""
  import os, time  # noqa: E401, PLC0415
  seed = int(os.environ.get("JAXPART_TEST_SEED", time.time_ns() % 2**31))
  print(f"test_llama: JAXPART_TEST_SEED={seed}")
  kp, ki = jax.random.split(jax.random.key(seed))
  params = init(TINY, kp)
  ids = llama.random_ids(TINY, 2, 37, ki)
  return params, ids, forward(params, ids, TINY)


@pytest.mark.parametrize("name, total", [
    ("llama3-8b", 8_030_261_248), ("llama3-70b", 70_553_706_496),
    ("mistral-7b", 7_248_023_552), ("qwen2.5-7b", 7_615_616_512)])
def test_real_shapes_have_the_published_parameter_counts(name, total):
  assert config.MODEL_PRESETS[name].total_params == total


@pytest.mark.parametrize("name", LLAMA_PRESETS)
def test_param_count_matches_the_tree(name):
  cfg = config.MODEL_PRESETS[name]
  shapes = llama.param_shapes(cfg)
  assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes)) == cfg.total_params
  layers, edges = llama.split_edges(shapes)
  assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(layers)) == (
      cfg.layers * cfg.params_per_layer)
  assert all(a.shape[0] == cfg.layers for a in jax.tree.leaves(layers))
  assert ("lm_head" in edges) == (not cfg.tie_embeddings)
  assert ("bq" in layers["attn"]) == cfg.qkv_bias


def test_llama_tiny_splits_kv_at_tp2_and_replicates_at_tp4():
  cfg = config.MODEL_PRESETS["llama-tiny"]
  assert spec.kv_heads_split(cfg, 2) and not spec.kv_heads_split(cfg, 4)
  assert cfg.vocab % 16 == 0 and config.RUN_PRESETS["llama-tiny"].seq % 64


def test_dense_presets_keep_family_defaults():
  for name, cfg in config.MODEL_PRESETS.items():
    if cfg.arch == "dense":
      assert (cfg.vocab, cfg.n_kv_heads, cfg.edge_params, cfg.bias_params_per_layer) == (0, 0, 0, 0)
      assert cfg.kv_dim == cfg.attn_dim


def _llama(**kw):
  base = dict(layers=2, d_model=64, n_heads=8, head_dim=8, d_ff=128, arch="llama",
              n_kv_heads=2, vocab=256)
  return ModelConfig(**(base | kw))


@pytest.mark.parametrize("kw, needle", [
    (dict(n_kv_heads=3), "ModelConfig.n_kv_heads = 3: must divide n_heads = 8"),
    (dict(vocab=0), "ModelConfig.vocab = 0: arch 'llama' needs a positive"),
    (dict(head_dim=7, n_heads=8), "ModelConfig.head_dim = 7: rotary embedding needs an even"),
    (dict(arch="gpt"), "ModelConfig.arch = 'gpt': valid archs are dense, llama"),
    (dict(qkv_bias=1), "ModelConfig.qkv_bias = 1: must be true or false"),
    (dict(rope_theta=0.0), "ModelConfig.rope_theta = 0.0: must be a positive finite number"),
    (dict(max_positions=-1), "ModelConfig.max_positions = -1: must be a non-negative"),
    (dict(rope_scaling={"factor": 8.0}), "ModelConfig.rope_scaling = {'factor': 8.0}"),
    (dict(arch="dense", vocab=10), "ModelConfig.vocab = 10: only arch 'llama' uses it"),
    (dict(arch="dense", vocab=0, n_kv_heads=2), "ModelConfig.n_kv_heads = 2: arch 'dense'"),
])
def test_bad_family_fields_are_named(kw, needle):
  with pytest.raises(ConfigError) as e:
    _llama(**kw)
  assert needle in str(e.value)


def test_rope_scaling_is_checked_and_read_from_toml(tmp_path):
  with pytest.raises(ConfigError, match="RopeScaling.high_freq_factor = 1.0: must exceed"):
    RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=1.0,
                original_max_position_embeddings=8192)
  with pytest.raises(ConfigError, match="RopeScaling.rope_type = 'yarn'"):
    RopeScaling(8.0, 1.0, 4.0, 8192, rope_type="yarn")
  f = tmp_path / "c.toml"
  f.write_text('preset = "llama-tiny"\n[model]\nrope_scaling = {factor = 8.0, '
               'low_freq_factor = 1.0, high_freq_factor = 4.0, '
               'original_max_position_embeddings = 16}\n')
  m = config.load_setup(preset=None, config_file=str(f)).model
  assert m.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 16)
  assert ModelConfig(**config.to_dict(m)) == m  # a manifest's dict comes back equal


def test_llama3_scaling_changes_only_low_frequencies():
  cfg = dataclasses.replace(TINY, head_dim=64, d_model=512, rope_theta=500000.0,
                            rope_scaling=None)
  scaled = dataclasses.replace(cfg, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192))
  f0, f1 = llama.inv_freq(cfg), llama.inv_freq(scaled)
  wavelen = 2 * np.pi / f0
  np.testing.assert_array_equal(f1[wavelen < 8192 / 4], f0[wavelen < 8192 / 4])
  np.testing.assert_allclose(f1[wavelen > 8192], f0[wavelen > 8192] / 8, rtol=1e-6)
  mid = (wavelen >= 2048) & (wavelen <= 8192)
  assert mid.any() and np.all((f1[mid] < f0[mid]) & (f1[mid] > f0[mid] / 8))


def test_forward_shapes_dtypes_and_bf16(tiny):
  params32, ids, y32 = tiny
  cfg = dataclasses.replace(TINY, dtype="bfloat16")
  params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params32)
  assert jax.eval_shape(lambda: llama.init_params(cfg, jax.random.key(0))) == jax.eval_shape(
      lambda: params)
  assert not np.allclose(np.asarray(params["ln1"]["scale"], np.float32), 1.0)
  y16 = forward(params, ids, cfg)
  assert y16.shape == (2, 37, cfg.vocab) and y16.dtype == y32.dtype == jnp.float32
  # bf16 keeps 8 significant bits; 4 layers of ~6 roundings each on the residual stream and the
  # logits' D=64 dot products stay within a few percent of the logits' scale.
  assert np.max(np.abs(np.asarray(y16) - np.asarray(y32))) < 2.0**-4 * np.max(np.abs(y32))


def _cached_attend(q_BxQxHqxE, k_BxQxHkvxE, v_BxQxHkvxE, state):
  """Attention for a chunk after a prefix: state holds the prefix's K/V (or None)."""
  if state is not None:
    k_BxQxHkvxE = jnp.concatenate([state[0], k_BxQxHkvxE], axis=1)
    v_BxQxHkvxE = jnp.concatenate([state[1], v_BxQxHkvxE], axis=1)
  rep = q_BxQxHqxE.shape[2] // k_BxQxHkvxE.shape[2]
  k, v = (jnp.repeat(a, rep, axis=2) for a in (k_BxQxHkvxE, v_BxQxHkvxE))
  n_q, n_k = q_BxQxHqxE.shape[1], k.shape[1]
  s = jnp.einsum("bqhe,bkhe->bhqk", q_BxQxHqxE, k) * q_BxQxHqxE.shape[-1] ** -0.5
  mask = (n_k - n_q + jnp.arange(n_q))[:, None] >= jnp.arange(n_k)[None, :]
  p = jax.nn.softmax(jnp.where(mask, s, -1e30), axis=-1)
  return jnp.einsum("bhqk,bkhe->bqhe", p, v), (k_BxQxHkvxE, v_BxQxHkvxE)


@jax.jit
def _prefix_then_chunk(params, ids, start):
  """Tokens [0, 13) as a prefix, then [13, T) as a chunk at positions start + arange: the
  chunk attends to the prefix's cached K/V of every layer."""
  layers, edges = llama.split_edges(params)
  x_pre = llama.embed(edges["embed"]["table"], ids[:, :13])
  x_chunk = llama.embed(edges["embed"]["table"], ids[:, 13:])
  pos_T = start + jnp.arange(ids.shape[1] - 13)
  for i in range(TINY.layers):
    p = jax.tree.map(lambda a: a[i], layers)
    x_pre, state = llama.block_apply(p, x_pre, jnp.arange(13), TINY, _cached_attend)
    x_chunk, _ = llama.block_apply(p, x_chunk, pos_T, TINY, _cached_attend, state)
  return llama.head(edges, x_chunk, TINY)


def test_a_chunk_at_position_13_continues_the_full_run(tiny):
  """block_apply with pos_T = 13.. on tokens 13..36, attending to the prefix's cached K/V,
  gives the full run's rows: positions are absolute, not relative to the chunk."""
  params, ids, full = tiny
  full = np.asarray(full)
  chunk = np.asarray(_prefix_then_chunk(params, ids, 13))
  np.testing.assert_allclose(chunk, full[:, 13:], atol=2e-5 * np.abs(full).max(), rtol=0)
  # The same chunk rotated as if it started at position 0 is a different computation.
  wrong = np.asarray(_prefix_then_chunk(params, ids, 0))
  assert np.abs(wrong - full[:, 13:]).max() > 1e-2 * np.abs(full).max()


def test_reference_attend_repeats_kv_heads_like_hf():
  rng = np.random.default_rng()
  q = jnp.asarray(rng.normal(size=(1, 5, 4, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(1, 5, 2, 8)), jnp.float32) for _ in range(2))
  o, _ = llama.reference_attend(q, k, v, None)
  # query heads 0, 1 read K/V head 0; heads 2, 3 read head 1
  np.testing.assert_allclose(o[:, :, 1], attention.full_causal(q[:, :, 1:2], k[:, :, :1],
                                                               v[:, :, :1])[:, :, 0], rtol=1e-6)
  np.testing.assert_allclose(o[:, :, 2], attention.full_causal(q[:, :, 2:3], k[:, :, 1:],
                                                               v[:, :, 1:])[:, :, 0], rtol=1e-6)


def test_llama_functions_refuse_a_dense_config():
  with pytest.raises(ValueError, match="ModelConfig.arch = 'dense'"):
    llama.init_params(config.MODEL_PRESETS["tiny"], jax.random.key(0))
