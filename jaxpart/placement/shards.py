"""What one device holds of each weight and of the KV cache, per model family (plain Python).

One home for the tensor-parallel split rules the engine applies (llama.block_apply,
runtime/sharding.py): Q, O and the MLP split tp ways; K/V heads split when tp divides them, else
replicated with each shard computing only the heads its queries read; the Llama edges
(embedding, final norm, LM head) held by every stage, split over tensor by vocabulary.
memory, counts and the cost model read these; none re-derives them.
"""

from __future__ import annotations

from jaxpart.config import ModelConfig
from jaxpart.models.spec import kv_heads_local


def mlp_in_projections(cfg: ModelConfig) -> int:
  """D x F matmuls before the MLP's nonlinearity: w_in for dense, gate and up for SwiGLU."""
  return cfg.family.mlp_in_projections


def kv_dim_local(cfg: ModelConfig, tp: int) -> int:
  """Width of K (and of V) on one tensor shard."""
  return kv_heads_local(cfg, tp) * cfg.head_dim


def projection_params_local(cfg: ModelConfig, tp: int, held: bool = True) -> int:
  """Projection weights of one layer on one tensor shard. Q, O and the MLP are split tp ways;
  K and V too when tp divides kv_heads. Otherwise wk/wv are replicated (held whole) and a step
  reads only the columns of its kv_heads_local heads (held=False counts those)."""
  split = cfg.projection_params_per_layer - 2 * cfg.d_model * cfg.kv_dim
  kv = 2 * cfg.d_model * cfg.kv_dim
  if cfg.kv_heads % tp == 0:
    return (split + kv) // tp
  return split // tp + (kv if held else 2 * cfg.d_model * kv_dim_local(cfg, tp))


def _bias_params_local(cfg: ModelConfig, tp: int) -> int:
  if not cfg.qkv_bias:
    return 0
  kv = 2 * cfg.kv_dim if cfg.kv_heads % tp else 2 * cfg.kv_dim // tp
  return cfg.attn_dim // tp + kv


def weight_shard_bytes(cfg: ModelConfig, tp: int, layers: int = 1, held: bool = True) -> int:
  """Weights one device holds (held=True) or one step reads (held=False) for `layers` layers
  at tensor parallelism tp. Norm scales (and LayerNorm biases) are replicated over the tensor
  group, projections (and Q/K/V biases) split tp ways as projection_params_local says."""
  per_layer = (projection_params_local(cfg, tp, held) + cfg.layernorm_params_per_layer
               + _bias_params_local(cfg, tp))
  return layers * per_layer * cfg.dtype_bytes


def padded_vocab(vocab: int, devices: int) -> int:
  """The vocabulary the engine places: `vocab` rounded up to a multiple of the devices its
  output stream splits the logits over (a multiple of tp too, which splits the embedding and
  the LM head). Not also to 128 as Megatron does: the padding stays under one row a device,
  and the tiny test models keep their shapes. The padded rows are zero, their logits -inf,
  and no output, checkpoint or export ever shows them."""
  return -(-vocab // devices) * devices


def vocab_local(cfg: ModelConfig, ways: int, devices: int | None = None) -> int:
  """Vocabulary rows (or logit columns) of one of `ways` shards of the vocabulary padded for
  `devices` (default `ways`) devices."""
  return padded_vocab(cfg.vocab, devices or ways) // ways


def edge_weight_bytes(cfg: ModelConfig, tp: int) -> dict[str, int]:
  """The edges every stage holds (replicated over the stage axis): the embedding table split
  over tensor by rows (V/tp x D), the final norm, the LM head split by columns (D x V/tp;
  none when tied to the embedding). All zero for dense."""
  if not cfg.family.token_edges:
    return {"embedding": 0, "final_norm": 0, "lm_head": 0}
  b, vl = cfg.dtype_bytes, vocab_local(cfg, tp)
  return {"embedding": vl * cfg.d_model * b, "final_norm": cfg.family.norm_params(cfg) * b,
          "lm_head": 0 if cfg.tie_embeddings else cfg.d_model * vl * b}


def device_weight_bytes(cfg: ModelConfig, tp: int, layers: int) -> int:
  """Every weight one device holds: its stage's layer shards and the edges."""
  return weight_shard_bytes(cfg, tp, layers) + sum(edge_weight_bytes(cfg, tp).values())


def kv_cache_bytes(cfg: ModelConfig, rows: int, positions: int, tp: int = 1, layers: int = 1) -> int:
  """K and V for `positions` tokens of `rows` sequences, `layers` layers, one tp shard
  (kv_heads_local heads: the kv_dim, not the query width, under GQA)."""
  return 2 * layers * rows * positions * kv_dim_local(cfg, tp) * cfg.dtype_bytes
