"""Generation on a placed pipeline, modelled: prefill (TTFT) and decode per step (TPOT).

What the engine will run (design.md section 9). Prefill is the Plan's forward over the prompt
that keeps the whole batch's K/V where the Plan puts each layer: its time is
cost/forward.predict's total_s, the TTFT of the batch (the first new token comes from its logits).
Decode then feeds one token per sequence per step through every stage.

Schedule. The batch is split into M decode microbatches of B/M rows: M = S (the stage count)
when S divides the batch, else the largest divisor of the batch below S (batch 1 gives M = 1).
Microbatch m's step k enters stage 0 at tick k*S + m and leaves the last stage at tick
k*S + m + S - 1, whose sampled token goes back to stage 0 for step k + 1: one step cycle is
S ticks (M <= S), and each tick every busy stage works on one microbatch's one token. So
  TPOT = S x tick,  decode tokens/s = B / TPOT,
and over K steps the bubble is 1 - K*M / (K*S + M - 1): (S-1)/(K*S + S-1) at M = S (the GPipe
formula with K*M units), 1 - M/S per cycle in the steady state when M < S.

A tick on one device reads every weight of its stage once (the layers' shards; the last stage
also the LM-head shard) and its microbatch's K/V for the visited positions once, so

  HBM bound:  TPOT >= S x max over stages (weight bytes + KV bytes read per device) / HBM bw

at the datasheet bandwidth. The modelled TPOT adds what the bound leaves out: the achievable
HBM fraction, compute when it is larger, whole KV blocks visited, two tensor all-reduces per
layer of an R x D payload (latency bound), stage 0's embedding psum, the argmax reduction over
the vocab shards, and the sends of R x D activations to the next stage and R token ids back to
stage 0. A Plan with S stages pays S ticks per token: `ideal_bound_s` is the floor if all N
devices read 1/N of the model and cache each step (pure tensor parallelism), to show what the
pipeline costs in latency.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jaxpart.cost import forward as costmodel
from jaxpart.cost import params as costparams
from jaxpart.cost import units as unitcosts
from jaxpart.placement import memory
from jaxpart.placement import shards
from jaxpart.config import Setup
from jaxpart.cost.counts import attention_flops, head_flops, matmul_flops
from jaxpart.placement.plan import Plan, PlanError, decode_microbatches

# predict --decode walks every decode step; beyond this it refuses rather than run long.
MAX_NEW_TOKENS = 2**20
TOKEN_ID_BYTES = memory.TOKEN_ID_BYTES
ARGMAX_BYTES = 8   # per row: the local best logit (float32) and its index (int32)


@dataclass(frozen=True)
class DecodePrediction:
  """Modelled generation of `new_tokens` tokens after a `prompt`-token prefill, per batch."""

  hardware: str
  strategy: str
  devices: int
  stages: int
  tp: int
  batch: int
  prompt: int
  new_tokens: int
  microbatches: int                # M decode microbatches in flight
  rows: int                        # B / M
  cycle_ticks: int                 # ticks per decode step of one microbatch (S)
  bubble_fraction: float           # over the K steps: 1 - K*M / (K*S + M - 1)
  ttft_s: float                    # prefill of the whole batch (cost.forward.predict total_s)
  prefill_tokens_per_s: float
  tpot_s: float                    # mean over the decode steps
  tpot_first_s: float
  tpot_last_s: float
  decode_tokens_per_s: float       # batch / tpot_s
  hbm_bound_s: float               # mean over steps: S x max stage bytes read / HBM bandwidth
  bound_ratio: float               # tpot_s / hbm_bound_s
  ideal_bound_s: float             # (all weights + whole-batch KV) / (N x HBM bandwidth)
  generation_s: float              # ttft + (K - 1) x tpot (the first token comes from prefill)
  tick_parts_s: dict = field(default_factory=dict)    # mean tick, by what it spends
  bytes_read_per_tick: dict = field(default_factory=dict)   # slowest stage, mean step
  memory_per_device: dict = field(default_factory=dict)
  fits_device_memory: bool = True

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _stage_reads(setup: Setup, plan: Plan, rows: int, positions: np.ndarray,
                 blocked: bool) -> dict[str, np.ndarray]:
  """Bytes one device of the slowest (last) stage reads in one decode tick, per step."""
  cfg = setup.model
  lps = plan.layers_per_stage
  pos = (np.ceil(positions / plan.kv_block) * plan.kv_block) if blocked else positions
  edges = shards.edge_weight_bytes(cfg, plan.tp)
  head_w = (edges["lm_head"] or edges["embedding"]) + edges["final_norm"]
  weights = shards.weight_shard_bytes(cfg, plan.tp, lps, held=False) + head_w
  kv = shards.kv_cache_bytes(cfg, rows, 1, plan.tp, lps) * pos
  return {"weights": np.full_like(pos, float(weights)), "kv_cache": kv.astype(float)}


def predict_decode(setup: Setup, plan: Plan, new_tokens: int,
                   params: costparams.ModelParams = costparams.DEFAULT) -> DecodePrediction:
  """TTFT (the prefill of the batch) and TPOT (per decode step) of `plan` on setup.hardware,
  for prompts of plan.seq tokens and `new_tokens` generated tokens; see the module docstring
  for the schedule and the bound."""
  if not isinstance(new_tokens, int) or isinstance(new_tokens, bool) or not (
      1 <= new_tokens <= MAX_NEW_TOKENS):
    raise PlanError(f"new_tokens = {new_tokens!r}: must be an integer in 1..{MAX_NEW_TOKENS:,}")
  cfg, hw = setup.model, setup.hardware
  S, tp, lps, B = plan.stages, plan.tp, plan.layers_per_stage, plan.batch
  M = decode_microbatches(B, S)
  r = B // M
  b = cfg.dtype_bytes
  prefill = costmodel.predict(setup, plan, params)
  # Decode step k (1..K-1) attends to the prompt and the k tokens after it.
  positions = plan.seq + np.arange(1, max(new_tokens, 2), dtype=np.float64)
  reads = _stage_reads(setup, plan, r, positions, blocked=True)
  exact = _stage_reads(setup, plan, r, positions, blocked=False)
  write = shards.kv_cache_bytes(cfg, r, 1, tp, lps) + 2 * r * cfg.d_model * b
  flops = (lps * (matmul_flops(cfg, r, tp) + attention_flops(
      cfg, r, 1, np.ceil(positions / plan.kv_block) * plan.kv_block, tp))
      + head_flops(cfg, r, tp))
  hbm_s = (reads["weights"] + reads["kv_cache"] + write) / (hw.hbm_bw * params.hbm_fraction)
  compute_s = flops / (hw.peak_flops * params.gemm_fraction)
  payload = r * cfg.d_model * b
  allreduce_s = (cfg.family.allreduces_per_layer * lps
                 * unitcosts.allreduce_seconds(payload, tp, hw, params))
  edge_s = 0.0
  if cfg.family.token_edges:   # stage 0's embedding psum; the last stage's argmax over tp shards
    edge_s = max(unitcosts.allreduce_seconds(payload, tp, hw, params),
                 unitcosts.allreduce_seconds(r * ARGMAX_BYTES, tp, hw, params))
  pipe_s = 0.0
  if S > 1:   # activations to the next stage; sampled ids back to stage 0
    pipe_s = (unitcosts.transfer_seconds(payload, hw, params)
              + unitcosts.transfer_seconds(r * TOKEN_ID_BYTES, hw, params))
  tick = np.maximum(hbm_s, compute_s) + allreduce_s + edge_s + pipe_s
  tpot = S * tick
  bound = S * (exact["weights"] + exact["kv_cache"]) / hw.hbm_bw
  steps = new_tokens - 1
  tpot_mean = float(tpot.mean()) if steps else float(tpot[0])
  bound_mean = float(bound.mean()) if steps else float(bound[0])
  last = plan.decode_cache_len(new_tokens)
  ideal_kv = shards.kv_cache_bytes(cfg, B, plan.seq + new_tokens // 2, 1, cfg.layers)
  ideal = (cfg.total_params * b + ideal_kv) / (plan.devices * hw.hbm_bw)
  gen = memory.generation_bytes(cfg, setup.run, plan, new_tokens)
  mem = {**memory.program_bytes(cfg, setup.run, plan), **gen, "decode_cache_len": last}
  return DecodePrediction(
      hardware=hw.name, strategy=plan.strategy, devices=plan.devices, stages=S, tp=tp,
      batch=B, prompt=plan.seq, new_tokens=new_tokens, microbatches=M, rows=r, cycle_ticks=S,
      bubble_fraction=1 - new_tokens * M / (new_tokens * S + M - 1),
      ttft_s=prefill.total_s, prefill_tokens_per_s=prefill.tokens_per_s,
      tpot_s=tpot_mean, tpot_first_s=float(tpot[0]), tpot_last_s=float(tpot[-1]),
      decode_tokens_per_s=B / tpot_mean, hbm_bound_s=bound_mean,
      bound_ratio=tpot_mean / bound_mean, ideal_bound_s=ideal,
      generation_s=prefill.total_s + steps * tpot_mean,
      tick_parts_s={"hbm": float(hbm_s.mean()), "compute": float(compute_s.mean()),
                    "tensor_all_reduces": allreduce_s, "edges": edge_s, "pipeline_sends": pipe_s},
      bytes_read_per_tick={"weights": float(reads["weights"].mean()),
                           "kv_cache": float(reads["kv_cache"].mean())},
      memory_per_device=mem, fits_device_memory=gen["generation_hbm_bytes"] <= hw.hbm_bytes)
