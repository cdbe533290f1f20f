"""Analytic cost of a Plan on a Hardware: a roofline per layer step, collectives, bubble, energy.

The model follows what jaxpart's engine executes, tick by tick, so that the parts that can be
measured on simulated devices (collective bytes, FLOPs) can be checked against compiled HLO:

- a lax.scan runs `plan.ticks` ticks; at every tick each stage either runs its layers on one
  unit (rows x chunk_tokens, the last chunk padded to chunk_tokens) or skips (lax.cond);
- every tick ends with a ppermute of one unit between stages, bubble ticks included;
- each layer of a valid step runs two psums over `tensor` of the unit's activations (after the
  attention output projection and after the MLP), in the model dtype;
- attention visits, for a chunk starting at q_start, the KV blocks j with j*kv_block <= last
  query position, each in full (masked), so FLOPs grow with the prefix, not with cache_len.

Time is the sum over ticks of the slowest active stage's step plus the tick's ppermute: the
scan is lock-step, so a bubble tick costs as long as a busy one. A layer step costs the largest
of its compute, HBM and L2 times (kernels are assumed to overlap their own loads), then its two
all-reduces, which Megatron's forward cannot overlap (the next op reads the reduced sum).

Simulated devices sharing a host's cores (hw.host_cores > 0, XLA:CPU) are modelled too: a step
is its kernels one after another, priced by `jaxpart calibrate`, and a tick takes at least the
work of every busy device and every device's transfers spread over the cores (tick_seconds).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jaxpart.placement import memory
from jaxpart.placement import shards
from jaxpart.config import ModelConfig, Setup
from jaxpart.cost.params import DEFAULT, ModelParams
from jaxpart.cost.units import (allreduce_seconds, cache_bytes, gemm_overhead_seconds,
                                move_seconds, stream_seconds, transfer_seconds)
from jaxpart.placement.plan import Plan, PlanError
from jaxpart.placement.planner import Scorer
from jaxpart.cost.counts import (
    allreduce_payload_bytes, attention_flops, attention_visits, collective_bytes, head_flops,
    kv_positions, matmul_flops, plan_flops, score_elements, step_gemm_arrays, step_gemms,
    unit_bytes)

# predict models one layer step per token chunk (about 30 us each) and every tick of the
# pipeline as an array element: beyond these it would run for minutes, so it refuses and says
# how to make the units bigger.
MAX_MODELLED_CHUNKS = 2**16
MAX_MODELLED_UNITS = 2**20


def _too_big(plan: Plan) -> bool:
  return plan.n_chunks > MAX_MODELLED_CHUNKS or plan.units > MAX_MODELLED_UNITS


# --- the edges -----------------------------------------------------------------------------

def edge_seconds(cfg: ModelConfig, plan: Plan, hw, params: "ModelParams") -> dict[str, float]:
  """Per unit: stage 0's vocab-parallel embedding (a row gather, then one psum of the unit over
  tensor) and the last stage's head (final norm, the D x V/tp LM-head matmul reading its shard
  from HBM, float32 logits written). Both 0 for dense."""
  if not cfg.family.token_edges:
    return {"embed_s": 0.0, "head_s": 0.0, "head_flops": 0.0, "head_hbm": 0.0}
  n = plan.rows * plan.chunk_tokens
  edges = shards.edge_weight_bytes(cfg, plan.tp)
  payload = allreduce_payload_bytes(cfg, plan)
  embed_s = (2 * payload / (hw.hbm_bw * params.hbm_fraction)
             + allreduce_seconds(payload, plan.tp, hw, params))
  flops = head_flops(cfg, n, plan.tp)
  v_local = shards.vocab_local(cfg, plan.tp)
  hbm = ((edges["lm_head"] or edges["embedding"]) + n * v_local * memory.LOGIT_BYTES
         + n * cfg.d_model * cfg.dtype_bytes)
  head_s = max(flops / (hw.peak_flops * params.gemm_fraction)
               + gemm_overhead_seconds(1, (n * cfg.d_model, cfg.d_model * v_local, n * v_local),
                                       cfg.dtype_bytes, hw, cache_bytes(hw, plan.devices)),
               hbm / (hw.hbm_bw * params.hbm_fraction))
  return {"embed_s": embed_s, "head_s": head_s, "head_flops": float(flops),
          "head_hbm": float(hbm)}


# --- traffic: HBM and L2 of one layer step -------------------------------------------------

def layer_step_traffic(cfg: ModelConfig, plan: Plan, positions: int, l2_bytes: float,
                       params: ModelParams = DEFAULT) -> dict[str, float]:
  """Bytes one device moves for one layer on one unit: HBM reads/writes and L2 read requests.

  HBM: the layer's weight shard is read every step unless the stage's weights and the step's
  working set fit the L2 together (then once per run: see `predict`); the unit's input and
  output cross HBM once (the ppermute lands there); the visited K/V are read once and the
  chunk's K/V written once; every other intermediate (LN outputs, q/k/v/o, MLP hidden, partial
  sums) stays in L2 when the step's working set fits the L2 and otherwise is written to and
  read back from HBM once. L2 requests count what the kernels read, a GEMM reading its
  activation operand once per N-tile and its weight once per M-tile (params.tile_*).
  """
  b = cfg.dtype_bytes
  t = plan.tp
  n = plan.rows * plan.chunk_tokens
  D, A, F = cfg.d_model, cfg.attn_dim // t, cfg.d_ff // t
  K = shards.kv_dim_local(cfg, t)
  g = shards.mlp_in_projections(cfg)
  ws = memory.working_set_bytes(cfg, memory.step_shape(plan))
  fits = ws <= l2_bytes
  w_layer = shards.weight_shard_bytes(cfg, t, 1, held=False)
  weights_resident = plan.layers_per_stage * w_layer + ws <= l2_bytes
  act_io = 2 * n * D * b                                       # input read, output write
  kv_read = 2 * plan.rows * positions * K * b
  kv_write = 2 * n * K * b
  # Intermediates: h1, attention partial, x1, h2, MLP partial (D each); q, k, v, o; the MLP
  # hidden (F: u for dense; gate and up for SwiGLU, their product fused).
  inter = n * b * (5 * D + 2 * A + 2 * K + g * F)
  spill = 0 if fits else 2 * inter
  hbm_read = (0 if weights_resident else w_layer) + act_io / 2 + kv_read + spill / 2
  hbm_write = act_io / 2 + kv_write + spill / 2

  def gemm(m, k, nn):  # L2 reads of one GEMM m x k @ k x nn
    return b * (m * k * math.ceil(nn / params.tile_n) + k * nn * math.ceil(m / params.tile_m))

  q_tiles = math.ceil(plan.chunk_tokens / params.tile_m)
  l2_read = (gemm(n, D, A) + 2 * gemm(n, D, K) + gemm(n, A, D) + g * gemm(n, D, F)
             + gemm(n, F, D)
             + n * A * b + kv_read * q_tiles                    # attention: q once, K/V per q tile
             + n * b * (4 * D + g * F))                        # LN, residual, GELU inputs
  return {"hbm_read": float(hbm_read), "hbm_write": float(hbm_write), "l2_read": float(l2_read),
          "weights_resident": weights_resident, "working_set_fits": fits,
          "weight_bytes": float(0 if weights_resident else w_layer),
          "intermediate_bytes": float(inter)}


# --- the prediction ------------------------------------------------------------------------

@dataclass(frozen=True)
class Prediction:
  """Modelled figures for one Plan on one Hardware. Times in seconds, per device unless noted."""

  strategy: str
  hardware: str
  devices: int
  stages: int
  tp: int
  rows: int
  chunk_tokens: int
  units: int
  ticks: int
  bubble_fraction: float
  total_s: float                     # the whole batch through the pipeline
  tokens_per_s: float                # real (unpadded) tokens / total_s
  seed_time_per_token_ms: float      # 1000 / tokens_per_s: the seed's "TPOT" (aggregate)
  sequence_latency_s: float          # first unit of a sequence in -> its last unit out (mean)
  step_s: float                      # mean busy tick: layers + all-reduces + ppermute
  compute_s: float                   # summed over the run, per device, as if nothing overlapped
  hbm_s: float
  l2_s: float
  tp_comm_s: float
  pipe_comm_s: float
  edge_s: float                      # embedding (stage 0) + LM head (last stage), whole run
  bubble_s: float                    # time a device waits: bubble ticks, slower stages
  bound: str                         # what dominates the busy layer steps: compute, hbm or l2
  flops_per_device: float            # executed
  flops_total: float
  useful_flops_total: float
  mfu: float                         # useful FLOPs / (devices x peak x total_s)
  arithmetic_intensity: float        # executed FLOPs / HBM bytes over the run
  hbm_read_bytes_per_device: float
  hbm_write_bytes_per_device: float
  l2_read_bytes_per_device: float
  link_bytes_per_device: float       # sent by a device that is not the last stage
  collective_payload_bytes: dict = field(default_factory=dict)
  l2_hit_rate: float = 0.0           # 1 - HBM reads / L2 read requests (modelled)
  working_set_bytes: int = 0
  working_set_fits_l2: bool = False
  weights_per_device_bytes: int = 0
  weights_resident_in_l2: bool = False
  device_memory_bytes: dict = field(default_factory=dict)   # what the engine holds per device
  fits_device_memory: bool = True
  energy_j: float = 0.0
  energy_per_token_j: float = 0.0
  energy_breakdown_j: dict = field(default_factory=dict)
  params: dict = field(default_factory=dict)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def layer_step(setup: Setup, plan: Plan, positions: int,
               params: ModelParams = DEFAULT) -> dict[str, Any]:
  """One layer on one unit on one device, attending to `positions` keys: time and bytes.

  step_s = max(compute, HBM, L2) + the layer's two all-reduces (not overlapped: the next op
  reads the reduced sum); on a host (hw.host_cores) the kernels' times added (host_s).
  """
  cfg, hw = setup.model, setup.hardware
  n = plan.rows * plan.chunk_tokens
  cache = cache_bytes(hw, plan.devices)
  tr = layer_step_traffic(cfg, plan, positions, cache, params)
  flops = matmul_flops(cfg, n, plan.tp) + attention_flops(cfg, plan.rows, plan.chunk_tokens,
                                                          positions, plan.tp)
  hbm = tr["hbm_read"] + tr["hbm_write"]
  compute_s = (flops / (hw.peak_flops * params.gemm_fraction)
               + gemm_overhead_seconds(len(step_gemms(cfg, n, plan.tp)),
                                       step_gemm_arrays(cfg, n, plan.tp), cfg.dtype_bytes, hw,
                                       cache)
               + score_elements(cfg, plan.rows, plan.chunk_tokens, positions, plan.tp)
               * hw.score_element_s
               + attention_visits(plan, positions) * hw.attention_visit_s)
  hbm_s = hbm / (hw.hbm_bw * params.hbm_fraction)
  l2_s = tr["l2_read"] / hw.l2_bw
  # On a host one core runs the step's kernels one after another: the GEMMs and attention
  # (compute_s, whose calibrated costs include their operands' bytes), then the elementwise
  # passes (norms, residuals, activation) that read and write each intermediate once, from
  # the L2 when the step's working set fits it.
  host_s = compute_s + 2 * tr["intermediate_bytes"] / (
      hw.l2_bw if tr["working_set_fits"] else hw.hbm_bw * params.hbm_fraction)
  payload = allreduce_payload_bytes(cfg, plan)
  allreduce_s = cfg.family.allreduces_per_layer * allreduce_seconds(payload, plan.tp, hw, params)
  bound = max((("compute", compute_s), ("hbm", hbm_s), ("l2", l2_s)), key=lambda kv: kv[1])[0]
  return {**tr, "flops": float(flops), "hbm_bytes": float(hbm), "compute_s": compute_s,
          "hbm_s": hbm_s, "l2_s": l2_s, "allreduce_s": allreduce_s,
          "step_s": (host_s if hw.host_cores else max(compute_s, hbm_s, l2_s)) + allreduce_s,
          # What a host's cores spend on the step: a collective's latency is waiting, which
          # other devices' work fills.
          "work_s": host_s + cfg.family.allreduces_per_layer * allreduce_seconds(
              payload, plan.tp, hw, params, False),
          "bound": bound,
          "intensity": flops / hbm if hbm else math.inf}


def tick_seconds(unit_s: np.ndarray, plan: Plan, hw, pipe_s: float, params: ModelParams,
                 embed_s: float = 0.0, head_s: float = 0.0, unit_work_s: np.ndarray | None = None,
                 pipe_work_s: float = 0.0) -> np.ndarray:
  """Each tick's time, from each unit's stage step (per device) and the tick's transfers.

  Lock-step: tick t costs the slowest active stage's step (stage s holds unit t-s; stage 0
  adds the embedding, the last stage the head), then the ppermute and stream transfers, which
  every device makes every tick, bubble or not (hidden behind the step with
  params.overlap_pipeline). Where the simulated devices share a host's cores
  (hw.host_cores > 0) a tick also takes at least what the cores spend on it: every busy
  device's work (unit_work_s) and every device's transfers without their latencies
  (pipe_work_s), spread over the cores. There a bubble tick is cheap, a collective's latency
  hides behind other devices' work, and tensor parallelism buys no speed.
  """
  S, tp = plan.stages, plan.tp

  def windows(per_unit):
    padded = np.concatenate([np.full(S - 1, -np.inf), per_unit, np.full(S - 1, -np.inf)])
    window = np.lib.stride_tricks.sliding_window_view(padded, S)    # ticks x S (stage S-1-j)
    ticks = window.shape[0]
    return window, padded[S - 1:S - 1 + ticks], padded[:ticks]      # all, stage 0, last stage

  window, first, last = windows(unit_s)
  busy = window.max(axis=1)
  if embed_s or head_s:
    if S == 1:
      busy = first + embed_s + head_s
    else:
      busy = np.maximum(busy, np.maximum(first + embed_s, last + head_s))
  tick = np.maximum(busy, pipe_s) if params.overlap_pipeline else busy + pipe_s
  if not hw.host_cores:
    return tick
  window, first, last = windows(unit_s if unit_work_s is None else unit_work_s)
  work = tp * (np.where(np.isfinite(window), window, 0.0).sum(axis=1)
               + embed_s * np.isfinite(first) + head_s * np.isfinite(last))
  return np.maximum(tick, (work + plan.devices * pipe_work_s) / hw.host_cores)


def predict(setup: Setup, plan: Plan, params: ModelParams = DEFAULT) -> Prediction:
  """Modelled cost of running `plan`'s forward on setup.hardware."""
  cfg, hw = setup.model, setup.hardware
  if plan.n_chunks > MAX_MODELLED_CHUNKS:
    raise PlanError(f"chunks per sequence = {plan.n_chunks:,} (seq {plan.seq:,} / chunk "
                    f"{plan.chunk_tokens:,} tokens): the cost model takes at most "
                    f"{MAX_MODELLED_CHUNKS:,}; use --chunk-tokens of at least "
                    f"{-(-plan.seq // MAX_MODELLED_CHUNKS):,}")
  if plan.units > MAX_MODELLED_UNITS:
    raise PlanError(f"units = {plan.units:,} ({plan.microbatches:,} row groups x "
                    f"{plan.n_chunks:,} chunks): the cost model takes at most "
                    f"{MAX_MODELLED_UNITS:,}; use more rows per unit (--chunk-rows) or longer "
                    f"chunks (--chunk-tokens)")
  lps, S, U, nc, m = (plan.layers_per_stage, plan.stages, plan.units, plan.n_chunks,
                      plan.microbatches)
  # One layer step per chunk index (the attention prefix differs); every microbatch repeats them.
  steps = [layer_step(setup, plan, kv_positions(plan, k), params) for k in range(nc)]
  stage_s = lps * np.array([st["step_s"] for st in steps])           # per chunk index

  def pipe(latency):
    return ((0.0 if S == 1 else transfer_seconds(unit_bytes(cfg, plan), hw, params, latency))
            + stream_seconds(cfg, plan, hw, params, latency) + move_seconds(cfg, plan, hw, params))

  pipe_s = pipe(True)

  unit_s = np.tile(stage_s, m)                                       # U
  edge = edge_seconds(cfg, plan, hw, params)
  unit_work_s = np.tile(lps * np.array([st["work_s"] for st in steps]), m)
  tick_s = tick_seconds(unit_s, plan, hw, pipe_s, params, edge["embed_s"], edge["head_s"],
                        unit_work_s, pipe(False))
  total_s = float(tick_s.sum())
  csum = np.concatenate([[0.0], np.cumsum(tick_s)])
  first = np.arange(m) * nc                                          # a microbatch's first tick
  seq_latency = float(np.mean(csum[first + nc + S - 1] - csum[first]))

  def run_sum(key):  # per device over the run: every stage runs each unit once per layer
    return float(lps * m * sum(st[key] for st in steps))

  w_dev = shards.device_weight_bytes(cfg, plan.tp, lps)
  hbm_read, hbm_write, l2_read = run_sum("hbm_read"), run_sum("hbm_write"), run_sum("l2_read")
  hbm_read += U * edge["head_hbm"]                                   # the last stage's head
  if steps[0]["weights_resident"]:
    hbm_read += w_dev                                                # loaded once, then in L2
  fl = plan_flops(cfg, plan)
  coll = collective_bytes(cfg, plan)
  link = sum(coll["link"].values())
  pipe_total = plan.ticks * pipe_s
  mem = memory.per_device(cfg, setup.run, plan)
  engine_bytes = {**mem["program_bytes"], "total": mem["predicted_hbm_bytes"]}

  tokens = plan.batch * plan.seq
  energy = {
      "flops": fl["executed"] * plan.devices * params.pj_per_flop * 1e-12,
      "hbm": (hbm_read + hbm_write) * plan.devices * params.pj_per_hbm_byte * 1e-12,
      "l2": l2_read * plan.devices * params.pj_per_l2_byte * 1e-12,
      "links": link * plan.devices * params.pj_per_link_byte * 1e-12,
      "static": params.static_watts * plan.devices * total_s,
  }
  e_total = sum(energy.values())
  tps = tokens / total_s
  return Prediction(
      strategy=plan.strategy, hardware=hw.name, devices=plan.devices, stages=S, tp=plan.tp,
      rows=plan.rows, chunk_tokens=plan.chunk_tokens, units=U, ticks=plan.ticks,
      bubble_fraction=plan.bubble_fraction, total_s=total_s, tokens_per_s=tps,
      seed_time_per_token_ms=1e3 / tps, sequence_latency_s=seq_latency,
      step_s=float(unit_s.mean()) + pipe_s,
      compute_s=run_sum("compute_s") + U * edge["head_flops"] / (hw.peak_flops
                                                                 * params.gemm_fraction),
      hbm_s=run_sum("hbm_s"), l2_s=run_sum("l2_s"), tp_comm_s=run_sum("allreduce_s"),
      pipe_comm_s=pipe_total, edge_s=U * (edge["embed_s"] + edge["head_s"]),
      bubble_s=max(0.0, total_s - float(unit_s.sum()) - pipe_total),
      bound=steps[nc // 2]["bound"],
      flops_per_device=fl["executed"], flops_total=fl["executed"] * plan.devices,
      useful_flops_total=fl["useful"] * plan.devices,
      mfu=fl["useful"] / (hw.peak_flops * total_s),
      arithmetic_intensity=fl["executed"] / (hbm_read + hbm_write),
      hbm_read_bytes_per_device=hbm_read, hbm_write_bytes_per_device=hbm_write,
      l2_read_bytes_per_device=l2_read, link_bytes_per_device=link,
      collective_payload_bytes=coll["executed"],
      l2_hit_rate=max(0.0, 1.0 - hbm_read / l2_read) if l2_read else 0.0,
      working_set_bytes=memory.working_set_bytes(cfg, memory.step_shape(plan)),
      working_set_fits_l2=bool(steps[0]["working_set_fits"]),
      weights_per_device_bytes=w_dev, weights_resident_in_l2=bool(steps[0]["weights_resident"]),
      device_memory_bytes=engine_bytes,
      fits_device_memory=engine_bytes["total"] <= hw.hbm_bytes,
      energy_j=e_total, energy_per_token_j=e_total / tokens, energy_breakdown_j=energy,
      params=params.to_dict())


def score(setup: Setup, plan: Plan) -> float:
  """The planner's ranking: predicted seconds for the whole run (lower is better); a plan with
  more chunks than the cost model takes ranks last."""
  if _too_big(plan):
    return math.inf
  return predict(setup, plan).total_s


# What plan_auto ranks by when a command plans with --strategy auto.
SCORER = Scorer("cost model (predicted seconds per run; lower is better)", score)
