"""Footprint and working-set arithmetic. Plain Python: no JAX, so the planner stays cheap.

Two accounts of one chunk step are kept apart on purpose. The seed's (weight tiles, activation
chunk, operator buffers, intermediate state) assumes the step's data sits in L2. The honest one
splits what a step of one layer touches on one device into

- the resident working set: activations the step writes and re-reads (the chunk, its Q/K/V, the
  scores of one KV block, the MLP hidden shard, the partial sums before each all-reduce, ...).
  These can stay in L2 if they fit, and the planner sizes the chunk so that they do;
- the streamed bytes: the stage's weight shard and the KV prefix. Each byte is read once per
  step and never reused within it, so keeping them in L2 would not help, and for the paper
  model the weight shard alone (~403 MB per layer at tp 4) is eight times a 50 MB L2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from jaxpart.config import Hardware, ModelConfig, RunShape
from jaxpart.placement.plan import PlanError
from jaxpart.placement.shards import (edge_weight_bytes, kv_cache_bytes, kv_dim_local,
                                     mlp_in_projections, vocab_local, weight_shard_bytes)

F32 = 4
MB = 10**6
GB = 10**9
MIB = 2**20
GIB = 2**30
# A seed figure "holds" when it is within this fraction of the true one: the seed states its
# figures with 2 to 4 significant digits.
CLAIM_RTOL = 0.02


@dataclass(frozen=True)
class StepShape:
  """One unit step of one layer on one device: rows x tokens, local heads and MLP columns."""

  rows: int
  tokens: int
  kv_block: int
  tp: int


# Every term of the resident working set: (phase, why it is live). Kl is the local K/V width
# (kv_dim_local: A/tp for dense, the shard's K/V heads x head_dim under GQA). The attention phase runs
# from the unit's arrival to the first residual add, the MLP phase from there to the output.
# Sizing rule: each tensor the step code names, at the dtype the code gives it. Matmuls emit
# float32 (model._matmul asks for it) and the code casts to the model dtype before the next
# matmul or the all-reduce, so those carry both copies; XLA may fuse a cast away, which makes
# this an upper bound by at most those copies.
STEP_TERMS: dict[str, tuple[str, str]] = {
    "input_chunk": ("attention", "the unit from the previous stage (R x C x D), read by LN1 and "
                                 "by the first residual add"),
    "ln1_out": ("attention", "LayerNorm 1 output (R x C x D), re-read by the Q, K and V "
                             "projections for every weight tile"),
    "qkv_shard": ("attention", "Q, K, V of the local heads (R x C x (A/tp + 2 x Kl)), float32 "
                               "accumulator and model-dtype copy; K and V go into the cache"),
    "kv_block": ("attention", "one block of cached K and V (2 x R x kv_block x Kl) read by the "
                              "score and value matmuls of one online-softmax step"),
    "scores_tile": ("attention", "Q.K^T for one KV block (R x H/tp x C x kv_block), float32"),
    "probs_tile": ("attention", "exp(scores - max) cast to the model dtype for P.V "
                                "(R x H/tp x C x kv_block)"),
    "softmax_state": ("attention", "running output (R x C x A/tp) and running max and sum "
                                   "(2 x R x H/tp x C), float32, carried across KV blocks"),
    "attn_out_shard": ("attention", "normalised attention output (R x C x A/tp), input to the "
                                    "row-parallel O projection"),
    "attn_partial_sum": ("attention", "O projection's partial product (R x C x D) in float32 and "
                                      "the model-dtype copy the tensor all-reduce sums"),
    "residual_mid": ("mlp", "x + attention (R x C x D), read by LN2 and the second residual"),
    "ln2_out": ("mlp", "LayerNorm 2 output (R x C x D), re-read for every w_in tile"),
    "mlp_intermediate_shard": ("mlp", "w_in output (R x C x F/tp; gate and up for SwiGLU) in "
                                      "float32 and the GELU (silu(gate) x up) output in the "
                                      "model dtype"),
    "mlp_partial_sum": ("mlp", "w_out's partial product (R x C x D) in float32 and the "
                               "model-dtype copy the tensor all-reduce sums"),
    "output_chunk": ("mlp", "the layer's output (R x C x D), sent to the next stage"),
}


def step_working_set(cfg: ModelConfig, s: StepShape) -> dict[str, int]:
  """Resident bytes one layer's chunk step touches per device (weights and KV prefix excluded).

  The sum over the step, an upper bound on its peak: if it fits in L2, no activation byte of
  the step has to go back to HBM. `step_peak_bytes` gives the larger phase alone. A compiler
  fuses LayerNorms and casts into the matmuls and reuses dead buffers, so compiled temp bytes
  come lower still: XLA on CPU, `small` at 4 rows x 32 tokens and tp 4, compiles the step to
  525,136 temp bytes against this sum of 1,705,984 and a larger phase of 884,736.
  """
  if cfg.n_heads % s.tp or cfg.d_ff % s.tp:
    raise PlanError(f"tp = {s.tp} must divide n_heads = {cfg.n_heads} and d_ff = {cfg.d_ff}")
  b = cfg.dtype_bytes
  rt = s.rows * s.tokens
  d = cfg.d_model
  heads = cfg.n_heads // s.tp
  a_local = heads * cfg.head_dim
  k_local = kv_dim_local(cfg, s.tp)
  f_local = cfg.d_ff // s.tp
  tile = s.rows * heads * s.tokens * s.kv_block
  return {
      "input_chunk": rt * d * b,
      "ln1_out": rt * d * b,
      "qkv_shard": rt * (a_local + 2 * k_local) * (F32 + b),
      "kv_block": 2 * s.rows * s.kv_block * k_local * b,
      "scores_tile": tile * F32,
      "probs_tile": tile * b,
      "softmax_state": rt * a_local * F32 + 2 * rt * heads * F32,
      "attn_out_shard": rt * a_local * b,
      "attn_partial_sum": rt * d * (F32 + b),
      "residual_mid": rt * d * b,
      "ln2_out": rt * d * b,
      "mlp_intermediate_shard": rt * f_local * (mlp_in_projections(cfg) * F32 + b),
      "mlp_partial_sum": rt * d * (F32 + b),
      "output_chunk": rt * d * b,
  }


def working_set_bytes(cfg: ModelConfig, s: StepShape) -> int:
  """The resident working set of one step, in total: what the planner sizes chunks by, the cost
  model prices L2 residency by and per_device reports (build `s` with step_shape for a Plan)."""
  return sum(step_working_set(cfg, s).values())


def step_phase_bytes(cfg: ModelConfig, s: StepShape) -> dict[str, int]:
  """Resident bytes per phase: what must sit in L2 together while that phase runs."""
  out = {"attention": 0, "mlp": 0}
  for name, size in step_working_set(cfg, s).items():
    out[STEP_TERMS[name][0]] += size
  return out


def step_peak_bytes(cfg: ModelConfig, s: StepShape) -> int:
  """The larger phase: closer to a compiler's peak live bytes than the whole-step sum."""
  return max(step_phase_bytes(cfg, s).values())


def run_streamed_bytes(cfg: ModelConfig, batch: int, seq: int, rows: int, tokens: int,
                       tp: int) -> dict[str, int]:
  """Bytes one layer streams per device over a whole run split in rows x tokens units.

  Every unit step re-reads the weight shard, so weights cost (batch/rows) x n_chunks passes.
  Chunk k of a microbatch attends to the k x tokens positions before its end, so the KV cache
  is re-read tokens x n(n-1)/2 + seq positions per row: fewer, longer chunks read less of it.
  """
  n = -(-seq // tokens)
  positions = tokens * n * (n - 1) // 2 + seq
  return {
      "weights": (batch // rows) * n * weight_shard_bytes(cfg, tp, 1, held=False),
      "kv_prefix": kv_cache_bytes(cfg, batch, positions, tp, 1),
  }


def seed_working_set(cfg: ModelConfig, rows: int, tokens: int) -> dict[str, int]:
  """The seed's section 2.2 components, with the activation chunk computed, not assumed."""
  return {
      "weight_tiles": 32 * MB,           # seed's figure; not derivable from the model
      "activation_chunk": rows * tokens * cfg.d_model * cfg.dtype_bytes,
      "operator_buffers": 4 * MB,        # seed's figure
      "intermediate_state": 2 * MB,      # seed's figure
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
      "edge_params": cfg.edge_params,
      "activation_bytes_full_layer": run.batch * run.seq * cfg.d_model * b,
      "kv_cache_bytes_per_layer": kv_cache_bytes(cfg, run.batch, run.seq),
      "kv_bytes_per_token_per_layer": 2 * cfg.kv_dim * b,
      "forward_flops_per_token": forward_flops_per_token(cfg, run.seq),
  }


def forward_flops_per_token(cfg: ModelConfig, seq: int) -> float:
  """2 FLOPs per weight, plus causal attention (QK^T and PV over on average seq/2 keys, every
  query head: n_heads x head_dim even under GQA), plus the LM head (D x V) for llama."""
  matmul = 2 * cfg.projection_params
  attn = cfg.layers * 2 * 2 * cfg.attn_dim * (seq + 1) / 2
  head = 2 * cfg.d_model * cfg.vocab
  return matmul + attn + head


def step_shape(plan) -> StepShape:
  """The StepShape of a Plan's unit step: the one way a Plan becomes a StepShape."""
  return StepShape(rows=plan.rows, tokens=plan.chunk_tokens, kv_block=plan.kv_block, tp=plan.tp)


# Unit-sized buffers live at the compiled step's peak, and bytes per MLP hidden element, as
# XLA:CPU's buffer assignment lays out the engine (calibrated once from memory_analysis() of
# the paper, paper-30b and small forwards on 4 to 64 devices, both placements). They cover the
# received, gathered and sent units and the step's residual stream, partial sums and their
# float32 forms (XLA:CPU runs bf16 matmul outputs and collectives in float32). A GPU keeps bf16
# buffers bf16, so there this over-counts: the planner errs on the safe side. 7.75 since the
# forward-only engine moves units as bit patterns: XLA:CPU's temp grew by exactly one unit (the
# paper baseline on 16 devices, 8-row units: 22.475 -> 25.096 GB, 2.621 GB a unit).
STEP_UNIT_BUFFERS = 7.75
STEP_HIDDEN_BUFFERS = 2.5


# The Llama family's streams: token ids in, on every device; float32 logits out, a slice at a time.
TOKEN_ID_BYTES = 4
LOGIT_BYTES = F32
LOGITS_CHUNK_TOKENS = 2048


def logits_chunk(run: RunShape) -> tuple[int, int]:
  """(rows, tokens) of the slices `forward` makes logits of, one at a time, from the final
  hidden vectors the pipeline leaves (runtime/heads.make_logits_chunk)."""
  return 1, min(run.seq, LOGITS_CHUNK_TOKENS)


def stream_bytes(cfg: ModelConfig, batch: int, seq: int, devices: int) -> dict[str, int]:
  """Input and output each device holds for batch x seq tokens: B x T x D/N hidden vectors
  (Llama: in, B x T int32 ids on every device; out, the vectors logits_chunk slices)."""
  share = batch * seq * cfg.d_model * cfg.dtype_bytes // devices
  return {"input": batch * seq * TOKEN_ID_BYTES if cfg.family.token_edges else share,
          "output": share}


def program_bytes(cfg: ModelConfig, run: RunShape, plan, last_only: bool = False) -> dict[str, int]:
  """Per-device memory of the whole compiled forward: what `predicted_hbm_bytes` sums.

  The input and output as stream_bytes holds them; the output is built in a loop buffer of
  (B + rows) x padded_seq rows of its width that is copied out at the end. The KV cache is the
  one the engine holds (one microbatch's rows, cache_len positions, the stage's layers, local
  K/V heads). Llama adds the edges (held by every stage) and one slice of logits (logits_chunk,
  x V/tp float32), or with last_only (generation's prefill, `forward --last-only`) B x V/N
  logits out and the head's one position per unit row; its SwiGLU has two hidden buffers.
  """
  b = cfg.dtype_bytes
  io = stream_bytes(cfg, run.batch, run.seq, plan.devices)
  unit = plan.rows * plan.chunk_tokens * cfg.d_model * b
  hidden = plan.rows * plan.chunk_tokens * (cfg.d_ff // plan.tp) * b * mlp_in_projections(cfg)
  parts = {
      "weights": weight_shard_bytes(cfg, plan.tp, plan.layers_per_stage),
      "input_share": io["input"],
      "output_share": io["output"],
      # one spare unit of rows (where bubbles write) and the padded sequence
      "output_loop_buffer": (run.batch + plan.rows) * plan.padded_seq * cfg.d_model * b
                            // plan.devices,
      "kv_cache": kv_cache_bytes(cfg, plan.rows, plan.cache_len, plan.tp, plan.layers_per_stage),
      "step_and_pipeline_buffers": int(STEP_UNIT_BUFFERS * unit + STEP_HIDDEN_BUFFERS * hidden),
  }
  if cfg.family.token_edges:
    parts["edge_weights"] = sum(edge_weight_bytes(cfg, plan.tp).values())
    v_dev, v_tp = (vocab_local(cfg, ways, plan.devices) * LOGIT_BYTES
                   for ways in (plan.devices, plan.tp))
    if last_only:
      parts |= {"output_share": run.batch * v_dev, "head_logits_unit": plan.rows * v_tp,
                "output_loop_buffer": (run.batch + plan.rows) * v_dev}
    else:
      parts["logits_chunk"] = math.prod(logits_chunk(run)) * v_tp
  parts["total"] = sum(parts.values())
  return parts


# Tokens generated after the prompt when a command does not say (plan's --new-tokens).
DECODE_NEW_TOKENS = 256


def generation_bytes(cfg: ModelConfig, run: RunShape, plan, new_tokens: int) -> dict[str, int]:
  """Per device for prefill then decode: the prefill program (logits at each row's last
  position only) with its one-microbatch KV cache replaced by the whole batch's (prompt + new
  tokens, preallocated), which both phases hold. Decode's own buffers (one token per row) are
  far smaller than the prefill's and not added."""
  prog = program_bytes(cfg, run, plan, last_only=True)
  kv = kv_cache_bytes(cfg, run.batch, plan.decode_cache_len(new_tokens), plan.tp,
                      plan.layers_per_stage)
  return {"decode_kv_cache_bytes": kv,
          "generation_hbm_bytes": prog["total"] - prog["kv_cache"] + kv}


def predicted_hbm_bytes(cfg: ModelConfig, run: RunShape, plan) -> int:
  return program_bytes(cfg, run, plan)["total"]


def per_device(cfg: ModelConfig, run: RunShape, plan, hbm_bytes: float = 0.0,
               new_tokens: int = DECODE_NEW_TOKENS) -> dict[str, float]:
  """Placement figures for a Plan (duck-typed so this module imports nothing of JAX's).

  Two KV figures on purpose: the engine keeps K/V for the rows of one microbatch only
  (kv_cache_engine_per_device), while keeping the whole batch's K/V for later decoding would
  take kv_cache_per_device; decode_kv_cache_bytes adds the new_tokens positions, and
  generation_hbm_bytes is prefill + decode's program with it. With hbm_bytes (the device's
  capacity) set, fits_prefill and fits_generation say whether each fits.
  """
  step = step_shape(plan)
  total = working_set_bytes(cfg, step)
  prog = program_bytes(cfg, run, plan)
  gen = generation_bytes(cfg, run, plan, new_tokens)
  fit = {} if not hbm_bytes else {"fits_prefill": prog["total"] <= hbm_bytes,
                                  "fits_generation": gen["generation_hbm_bytes"] <= hbm_bytes}
  return {
      "weights_per_device": prog["weights"] + prog.get("edge_weights", 0),
      "layer_weights_per_device": prog["weights"],
      "edge_weights_per_device": edge_weight_bytes(cfg, plan.tp),
      "weights_per_layer_shard": weight_shard_bytes(cfg, plan.tp, 1),
      "kv_cache_per_layer": kv_cache_bytes(cfg, run.batch, run.seq),
      "kv_cache_per_device": kv_cache_bytes(cfg, run.batch, run.seq, plan.tp, plan.layers_per_stage),
      "kv_cache_engine_per_device": prog["kv_cache"],
      "activation_unit": plan.rows * plan.chunk_tokens * cfg.d_model * cfg.dtype_bytes,
      "working_set_per_step": total,
      "working_set_peak_phase": step_peak_bytes(cfg, step),
      "streamed_per_step_weights": weight_shard_bytes(cfg, plan.tp, 1, held=False),
      "streamed_per_step_kv_prefix_max": kv_cache_bytes(cfg, plan.rows, plan.seq, plan.tp, 1),
      "engine_input_per_device": prog["input_share"],
      "engine_output_per_device": prog["output_share"],
      "program_bytes": {k: v for k, v in prog.items() if k != "total"},
      "predicted_hbm_bytes": prog["total"],
      "decode_new_tokens": new_tokens,
      "decode_cache_len": plan.decode_cache_len(new_tokens),
      **gen, **fit,
      "cache_utilisation": total / plan.cache_budget_bytes if plan.cache_budget_bytes else 0.0,
  }


# --- the seed's section 2 and 3.2, checked ----------------------------------------------------

def verdict(stated: float, true: float, unit: float, binary_unit: float | None = None) -> str:
  """'holds' within CLAIM_RTOL; 'holds in binary units' when the seed wrote GB for GiB."""
  def close(u: float) -> bool:
    return abs(true - stated * u) <= CLAIM_RTOL * abs(stated * u)
  if close(unit):
    return "holds"
  if binary_unit is not None and close(binary_unit):
    return "holds (binary units: the seed's GB is GiB)"
  return "does not hold"


def seed_claims(cfg: ModelConfig, run: RunShape, hw: Hardware, plan) -> list[dict]:
  """The seed's section 2 (and 3.2) claims beside the true figures for this setup and plan.

  The seed's chunk is 128 rows x 64 tokens (its formula 128 x 64 x 16384 x 2); here it takes
  the run's batch for 128, and the plan's tp for the buffers it implies.
  """
  b = cfg.dtype_bytes
  fp = footprint(cfg, run)
  seed_rows, seed_tokens = run.batch, min(64, run.seq)
  seed_step = StepShape(rows=seed_rows, tokens=seed_tokens,
                        kv_block=min(seed_tokens, 128), tp=plan.tp)
  ws = step_working_set(cfg, seed_step)
  operator = sum(ws[k] for k in ("kv_block", "scores_tile", "probs_tile", "softmax_state"))
  intermediate = sum(ws.values()) - operator - ws["input_chunk"]
  weights_step = weight_shard_bytes(cfg, plan.tp, 1)
  seed_total = sum(ws.values()) + weights_step
  l2 = hw.l2_bytes
  rows = [
      ("total parameters", "30B", 30e9, cfg.total_params, 1, None,
       f"{cfg.layers} layers x {cfg.params_per_layer:,} (projections "
       f"{cfg.projection_params_per_layer:,} + LayerNorm {cfg.layernorm_params_per_layer:,})"),
      ("total model size", "60 GB", 60, fp["weight_bytes_total"], GB, GIB,
       f"{cfg.total_params:,} x {b} B"),
      ("weights per layer", "15 GB", 15, fp["weight_bytes_per_layer"], GB, GIB,
       f"{cfg.params_per_layer:,} x {b} B"),
      ("full activation per layer", "39.06 GB", 39.06, fp["activation_bytes_full_layer"], GB, GIB,
       f"{run.batch} x {run.seq} x {cfg.d_model} x {b} B"),
      ("weight tiles per step", "32 MB", 32, weights_step, MB, MIB,
       f"a step multiplies by the whole layer shard at tp {plan.tp}: "
       f"{cfg.projection_params_per_layer:,} / {plan.tp} weights + LayerNorms, x {b} B; "
       f"tiling changes the order of reads, not how many bytes are read"),
      ("activation chunk", "12 MB", 12, ws["input_chunk"], MB, MIB,
       f"{seed_rows} x {seed_tokens} x {cfg.d_model} x {b} B (12 MB is "
       f"{12 * MB // (cfg.d_model * b):,} token-rows)"),
      ("operator buffers", "4 MB", 4, operator, MB, MIB,
       f"one KV block, its scores and probabilities and the softmax state for the seed's "
       f"{seed_rows} x {seed_tokens} chunk at tp {plan.tp}"),
      ("intermediate state", "2 MB", 2, intermediate, MB, MIB,
       f"LN outputs, Q/K/V, attention output, MLP hidden, partial sums, residual and output "
       f"for the seed's chunk at tp {plan.tp}"),
      ("total working set per layer", "~50 MB", 50, seed_total, MB, MIB,
       "weight shard + every resident activation term, for the seed's chunk"),
      ("cache utilisation", "45/50 MB = 90%", 0.90, seed_total / l2, 1, None,
       f"seed's-chunk working set / {l2 / MB:g} MB L2 (the seed's own components sum to "
       f"50 MB, not 45)"),
  ]
  out = []
  for claim, seed_text, stated, true, unit, bunit, how in rows:
    kind = "count" if claim == "total parameters" else "ratio" if unit == 1 else "bytes"
    out.append({"claim": claim, "seed": seed_text, "true": true, "kind": kind,
                "verdict": verdict(stated, true, unit, bunit), "how": how})
  return out
