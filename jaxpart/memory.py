"""Footprint and working-set arithmetic. Plain Python: no JAX, so the planner stays cheap.

Two accounts of one chunk step are kept apart on purpose. The seed's (weight tiles, activation
chunk, operator buffers, intermediate state) assumes the step's data sits in L2. The honest one
lists what a step of one layer really touches on one device: the activation terms below, which
can stay in L2 if small enough, and the stage's whole weight shard, which is streamed from HBM
on every step because it is hundreds of MB for the paper model and never fits a 50 MB L2.
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxpart.config import ModelConfig, RunShape

F32 = 4


@dataclass(frozen=True)
class StepShape:
  """One unit step of one layer on one device: rows x tokens, local heads and MLP columns."""

  rows: int
  tokens: int
  kv_block: int
  tp: int


def step_working_set(cfg: ModelConfig, s: StepShape) -> dict[str, int]:
  """Bytes one layer's step touches per device, excluding the streamed weight shard.

  Terms are those live at the step's peak, each sized as the engine computes it: activations in
  the model dtype, matmul accumulators and softmax state in float32.
  """
  b = cfg.dtype_bytes
  rt = s.rows * s.tokens
  heads = cfg.n_heads // s.tp
  a_local = heads * cfg.head_dim
  f_local = cfg.d_ff // s.tp
  return {
      "input_chunk": rt * cfg.d_model * b,
      "qkv_shard": 3 * rt * a_local * b,
      "kv_block": 2 * s.rows * s.kv_block * a_local * b,
      "scores_tile": s.rows * heads * s.tokens * s.kv_block * F32,
      "softmax_state": rt * a_local * F32 + 2 * rt * heads * F32,
      "mlp_intermediate_shard": rt * f_local * (F32 + b),
      "partial_sum_before_allreduce": rt * cfg.d_model * F32,
      "output_chunk": rt * cfg.d_model * b,
  }


def weight_shard_bytes(cfg: ModelConfig, tp: int, layers: int = 1) -> int:
  """Weights one device holds for `layers` layers at tensor parallelism tp (streamed per step)."""
  return layers * (cfg.projection_params_per_layer // tp + cfg.layernorm_params_per_layer) * cfg.dtype_bytes


def kv_cache_bytes(cfg: ModelConfig, rows: int, positions: int, tp: int = 1, layers: int = 1) -> int:
  """K and V for `positions` tokens of `rows` sequences, `layers` layers, one tp shard."""
  return 2 * layers * rows * positions * (cfg.attn_dim // tp) * cfg.dtype_bytes


def seed_working_set(cfg: ModelConfig, rows: int, tokens: int) -> dict[str, int]:
  """The seed's section 2.2 components, with the activation chunk computed, not assumed."""
  mb = 10**6
  return {
      "weight_tiles": 32 * mb,           # seed's figure; not derivable from the model
      "activation_chunk": rows * tokens * cfg.d_model * cfg.dtype_bytes,
      "operator_buffers": 4 * mb,        # seed's figure
      "intermediate_state": 2 * mb,      # seed's figure
  }


def footprint(cfg: ModelConfig, run: RunShape) -> dict[str, int]:
  """Whole-model figures, independent of any placement."""
  b = cfg.dtype_bytes
  return {
      "projection_params_per_layer": cfg.projection_params_per_layer,
      "params_per_layer": cfg.params_per_layer,
      "params_total": cfg.total_params,
      "weight_bytes_per_layer": cfg.params_per_layer * b,
      "weight_bytes_total": cfg.total_params * b,
      "activation_bytes_full_layer": run.batch * run.seq * cfg.d_model * b,
      "kv_cache_bytes_per_layer": kv_cache_bytes(cfg, run.batch, run.seq),
      "kv_bytes_per_token_per_layer": 2 * cfg.attn_dim * b,
      "forward_flops_per_token": forward_flops_per_token(cfg, run.seq),
  }


def forward_flops_per_token(cfg: ModelConfig, seq: int) -> float:
  """2 FLOPs per weight, plus causal attention (QK^T and PV over on average seq/2 keys)."""
  matmul = 2 * cfg.projection_params
  attn = cfg.layers * 2 * 2 * cfg.attn_dim * (seq + 1) / 2
  return matmul + attn


def per_device(cfg: ModelConfig, run: RunShape, plan) -> dict[str, int]:
  """Placement figures for a Plan (duck-typed so this module imports nothing of JAX's)."""
  step = StepShape(rows=plan.rows, tokens=plan.chunk_tokens, kv_block=plan.kv_block, tp=plan.tp)
  ws = step_working_set(cfg, step)
  return {
      "weights_per_device": weight_shard_bytes(cfg, plan.tp, plan.layers_per_stage),
      "weights_per_layer_shard": weight_shard_bytes(cfg, plan.tp, 1),
      "kv_cache_per_device": kv_cache_bytes(cfg, run.batch, run.seq, plan.tp, plan.layers_per_stage),
      "activation_unit": plan.rows * plan.chunk_tokens * cfg.d_model * cfg.dtype_bytes,
      "working_set_per_step": sum(ws.values()),
      "cache_utilisation": sum(ws.values()) / plan.cache_budget_bytes if plan.cache_budget_bytes else 0.0,
  }
