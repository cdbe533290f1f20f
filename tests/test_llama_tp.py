"""Megatron sharding of the Llama family: one layer's block_apply, the vocab-parallel embed and
head under shard_map on a (1, tp) mesh, with the tree placed by sharding.param_specs,
against the unsharded functions. Covers K/V heads split (tp 2), replicated with one K/V head
per shard (tp 4, with q/k/v biases and a tied head), and replicated with K/V heads straddling
shards unevenly (6 query heads over 3 K/V heads, tp 2)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import require_devices
from jaxpart import config
from jaxpart.runtime import compat
from jaxpart.models import llama, spec
from jaxpart.runtime import sharding
from jaxpart.placement.plan import STAGE_AXIS as S, TENSOR_AXIS as T

BASE = dataclasses.replace(config.MODEL_PRESETS["llama-tiny"], layers=1, dtype="float32")
CASES = {
    "gqa-tp2-split": (BASE, 2),
    "bias-tied-tp4-replicated": (dataclasses.replace(BASE, qkv_bias=True, tie_embeddings=True), 4),
    "uneven-tp2-replicated": (dataclasses.replace(BASE, n_heads=6, n_kv_heads=3, d_model=48,
                                                  qkv_bias=True), 2),
}


def _random_params(cfg, rng):
  """Random parameters in the tree's shapes, drawn by numpy (no compile per shape): weights
  N(0, 1/fan_in), embedding N(0, 1), norm scales U(0.5, 1.5), biases N(0, 0.1^2)."""
  def one(path, s):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      a = rng.uniform(0.5, 1.5, s.shape)
    elif "'b" in name:
      a = 0.1 * rng.normal(size=s.shape)
    elif "table" in name:
      a = rng.normal(size=s.shape)
    else:
      a = rng.normal(size=s.shape) * s.shape[-2] ** -0.5
    return jnp.asarray(a, s.dtype)
  return jax.tree_util.tree_map_with_path(one, llama.param_shapes(cfg))


def _one_layer(params, ids_BxT, cfg, tp_axis):
  layers, edges = llama.split_edges(params)
  layer = jax.tree.map(lambda a: a[0], layers)
  x_BxTxD = llama.embed(edges["embed"]["table"], ids_BxT, tp_axis)
  x_BxTxD, _ = llama.block_apply(layer, x_BxTxD, jnp.arange(ids_BxT.shape[1]), cfg,
                                 llama.reference_attend, tp_axis=tp_axis)
  return llama.head(edges, x_BxTxD, cfg, tp_axis)


@pytest.mark.parametrize("case", sorted(CASES))
def test_sharded_layer_embed_and_head_equal_the_unsharded(case):
  cfg, tp = CASES[case]
  require_devices(tp)
  assert spec.kv_heads_split(cfg, tp) == case.endswith("split")
  rng = np.random.default_rng()
  params = _random_params(cfg, rng)
  ids_BxT = jnp.asarray(rng.integers(0, cfg.vocab, (2, 37)), jnp.int32)
  want = np.asarray(jax.jit(_one_layer, static_argnums=(2, 3))(params, ids_BxT, cfg, None))

  mesh = compat.make_mesh(jax.devices()[:tp], (1, tp), (S, T))
  specs = sharding.param_specs(cfg, tp)
  is_spec = lambda x: isinstance(x, P)  # noqa: E731
  placed = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                                               is_leaf=is_spec))
  f = compat.shard_map(lambda p, i: _one_layer(p, i, cfg, T), mesh,
                       in_specs=(specs, P()), out_specs=P(None, None, T))
  got = np.asarray(jax.jit(f)(placed, ids_BxT))
  assert got.shape == want.shape == (2, 37, cfg.vocab)
  # float32 rounding: the psum adds tp partial sums in another order than one matmul.
  np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=0)


def test_specs_follow_the_kv_rule():
  cfg = dataclasses.replace(BASE, qkv_bias=True)
  split, repl = sharding.param_specs(cfg, 2), sharding.param_specs(cfg, 4)
  assert split["attn"]["wk"] == P(S, None, T) and split["attn"]["bv"] == P(S, T)
  assert repl["attn"]["wk"] == P(S, None, None) and repl["attn"]["bv"] == P(S, None)
  assert repl["attn"]["wq"] == P(S, None, T) and repl["mlp"]["w_down"] == P(S, T, None)
  assert (repl["embed"]["table"], repl["final_norm"]["scale"], repl["lm_head"]["w"]) == (
      P(T, None), P(), P(None, T))
  shapes = llama.param_shapes(cfg)
  assert jax.tree.structure(shapes) == jax.tree.structure(
      repl, is_leaf=lambda x: isinstance(x, P))
  tied = dataclasses.replace(cfg, tie_embeddings=True)
  assert "lm_head" not in sharding.param_specs(tied, 2)
