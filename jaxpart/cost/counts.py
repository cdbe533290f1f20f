"""What the engine executes for a Plan, counted: FLOPs, collective bytes, attention tiles.

Pure arithmetic on the Plan and the model config, the one home of each formula: the cost model
turns these counts into time, and measurement (jaxpart.measure.compiled, the tests) compares compiled HLO
against them, never re-deriving them.
"""

from __future__ import annotations

import functools

import numpy as np

from jaxpart.placement import memory
from jaxpart.placement import shards
from jaxpart.config import ModelConfig
from jaxpart.placement.plan import Plan


def matmul_flops(cfg: ModelConfig, tokens: int, tp: int) -> int:
  """Q, K, V, O and the MLP projections (two for dense, gate, up and down for SwiGLU) of
  `tokens` row-tokens on one tensor shard; K and V for the shard's own K/V heads."""
  return 2 * tokens * shards.projection_params_local(cfg, tp, held=False)


def step_gemms(cfg: ModelConfig, tokens: int, tp: int) -> list[tuple[int, int, int]]:
  """The (m, k, n) of each GEMM one layer step runs on one tensor shard: Q, K, V (the shard's
  own K/V heads), O, the MLP in-projection(s) and out-projection. 2 m k n summed over them is
  matmul_flops."""
  D, A, F = cfg.d_model, cfg.attn_dim // tp, cfg.d_ff // tp
  K = shards.kv_dim_local(cfg, tp)
  return ([(tokens, D, A), (tokens, D, K), (tokens, D, K), (tokens, A, D)]
          + [(tokens, D, F)] * shards.mlp_in_projections(cfg) + [(tokens, F, D)])


def step_gemm_arrays(cfg: ModelConfig, tokens: int, tp: int) -> list[int]:
  """Element counts of the arrays one layer step's GEMMs read and write: each input once (Q,
  K and V read the same normed input, and so do the MLP's in-projections), every weight shard
  and every result."""
  gemms = step_gemms(cfg, tokens, tp)
  inputs = {(m, k, tag): m * k for (m, k, _), tag in zip(gemms, _GEMM_INPUTS[len(gemms)])}
  return list(inputs.values()) + [k * n for _, k, n in gemms] + [m * n for m, _, n in gemms]


# Which input each GEMM of step_gemms reads (dense: 6 GEMMs; SwiGLU: 7).
_GEMM_INPUTS = {6: ("h1", "h1", "h1", "o", "h2", "u"), 7: ("h1", "h1", "h1", "o", "h2", "h2", "u")}


def score_elements(cfg: ModelConfig, rows: int, tokens: int, positions: float, tp: int) -> float:
  """Attention scores one step computes (and masks, exponentiates, sums): rows x tokens queries
  x `positions` keys (kv_positions: padded tiles included) x the shard's query heads."""
  return rows * tokens * positions * (cfg.n_heads // tp)


def head_flops(cfg: ModelConfig, tokens: int, tp: int) -> int:
  """The LM head on the last stage: `tokens` x D @ D x V/tp (the local vocab shard); the
  embedding is a lookup (no FLOPs). 0 for dense."""
  if not cfg.family.token_edges:
    return 0
  return 2 * tokens * cfg.d_model * shards.vocab_local(cfg, tp)


def attention_flops(cfg: ModelConfig, rows: int, tokens: int, positions: float, tp: int) -> float:
  """QK^T and PV of rows x tokens queries against `positions` keys, the local query heads
  (n_heads x head_dim / tp: a GQA K/V head serves every query head of its group)."""
  return 2 * 2 * rows * tokens * positions * (cfg.attn_dim // tp)


def q_block(plan: Plan) -> int:
  """Queries per attention tile: attention.blocked_causal's default, kv_block (or the chunk)."""
  return min(plan.kv_block, plan.chunk_tokens)


def n_tiles(plan: Plan) -> int:
  """Query tiles per chunk."""
  return -(-plan.chunk_tokens // q_block(plan))


def tile_visits(plan: Plan, chunk_index: int) -> np.ndarray:
  """KV blocks each query tile of a chunk visits: those starting at or before the tile's last
  real query (attention.blocked_causal's skip rule). An array: a whole 10^9-token sequence has
  millions of tiles."""
  qb, c = q_block(plan), plan.chunk_tokens
  q_start = chunk_index * c
  last_q = np.minimum(q_start + (np.arange(n_tiles(plan), dtype=np.int64) + 1) * qb - 1,
                      q_start + c - 1)
  return np.minimum(last_q // plan.kv_block + 1, plan.cache_len // plan.kv_block)


@functools.lru_cache(maxsize=4096)
def visit_sum(plan: Plan, chunk_index: int) -> int:
  """(tile, block) pairs a chunk visits, the sum of tile_visits in closed form (a whole-sequence
  chunk of 10^9 tokens has millions of tiles). Tiles are q_block = kv_block queries (or the
  whole chunk when it is shorter): tile i < n-1 ends at q0 + (i+1)*kv_block - 1, so it visits
  (q0-1)//kv_block + i + 2 blocks; the last tile ends at the chunk's last query L."""
  c, kb = plan.chunk_tokens, plan.kv_block
  q0 = chunk_index * c
  last = q0 + c - 1
  n = n_tiles(plan)
  if n == 1:
    return last // kb + 1
  return (n - 1) * ((q0 - 1) // kb) + (n - 1) * n // 2 + (n - 1) + last // kb + 1


def attention_visits(plan: Plan, positions: float) -> float:
  """(query tile, KV block) pairs a step visits, from its kv_positions (their inverse)."""
  return positions * plan.chunk_tokens / (plan.kv_block * q_block(plan))


def kv_positions(plan: Plan, chunk_index: int) -> float:
  """Keys per query a chunk's step computes against: every visited (tile, block) pair in full,
  padded queries of a ragged last tile included, spread over the chunk's queries."""
  return (float(visit_sum(plan, chunk_index)) * plan.kv_block * q_block(plan)
          / plan.chunk_tokens)


def allreduce_payload_bytes(cfg: ModelConfig, plan: Plan, element_bytes: int | None = None) -> int:
  """One psum's buffer: the unit's activations, rows x chunk x d_model in the model dtype."""
  return plan.rows * plan.chunk_tokens * cfg.d_model * (element_bytes or cfg.dtype_bytes)


def unit_bytes(cfg: ModelConfig, plan: Plan, element_bytes: int | None = None) -> int:
  """What the ppermute carries each tick: one unit of activations."""
  return plan.rows * plan.chunk_tokens * cfg.d_model * (element_bytes or cfg.dtype_bytes)


# Unit-sized buffers every device writes each tick outside its stage step, bubble or not: the
# all-gathered input unit, its copy into row-major layout, and the pipeline send's buffer
# (tests/test_costmodel_host.py counts them in the compiled tick loop).
TICK_UNIT_WRITES = 3


def tick_move_bytes(cfg: ModelConfig, plan: Plan) -> int:
  """Bytes each device reads and writes per tick moving units (TICK_UNIT_WRITES of them)."""
  return 2 * TICK_UNIT_WRITES * unit_bytes(cfg, plan)


def stream_slices(cfg: ModelConfig, plan: Plan, element_bytes: int | None = None) -> dict[str, int]:
  """Bytes of one input and one output slice a stream ppermute carries, and the all-gather
  over the tensor group that rebuilds a unit at stage 0. Dense: 1/N of a unit each way, then
  the gather. Llama: the ids are on every device (no input traffic); out go rows x chunk x V/N
  float32 logits."""
  unit = unit_bytes(cfg, plan, element_bytes)
  if cfg.family.token_edges:
    out = plan.rows * plan.chunk_tokens * shards.vocab_local(cfg, plan.devices) * (
        element_bytes or memory.LOGIT_BYTES)
    return {"in": 0, "out": out, "gather": 0}
  return {"in": unit // plan.devices, "out": unit // plan.devices,
          "gather": unit // plan.tp if plan.tp > 1 else 0}


def stream_collective_bytes(cfg: ModelConfig, plan: Plan,
                            element_bytes: int | None = None) -> dict[str, int]:
  """Collective buffer bytes per device per tick for the sharded input and output streams.

  The engine (engine._gather_unit, engine._scatter_unit) issues, on every tick and every
  device, S - 1 one-pair ppermutes of an input slice towards stage 0 and S - 1 of an output
  slice from the last stage, and one all-gather over the tensor group (stream_slices)."""
  sl = stream_slices(cfg, plan, element_bytes)
  return {"collective-permute": (plan.stages - 1) * (sl["in"] + sl["out"]),
          "all-gather": sl["gather"]}


def ring_allreduce_link_bytes(payload: float, tp: int) -> float:
  """Bytes each device sends in a ring all-reduce: reduce-scatter then all-gather."""
  return 2 * (tp - 1) / tp * payload if tp > 1 else 0.0


def plan_flops(cfg: ModelConfig, plan: Plan) -> dict[str, float]:
  """Matmul FLOPs per device (every device of a stage does the same) for the whole run.

  executed: what the engine runs: each of the U units once per layer of the stage, attention
  over the visited KV blocks only; bubble ticks take the cond's skip branch and cost nothing.
  static: every tick counted as a step and every KV block as visited: what a static count of
  the compiled program (each dot times its loop trip counts, cond branches as taken) sees.
  useful: the causal minimum on real (unpadded) tokens: matmuls on B*T tokens and attention over
  (T+1)/2 keys on average; executed/useful is the engine's overhead from padding the last chunk
  and from computing whole KV blocks.
  head: the LM head of the last stage (every unit once), counted in executed, static and
  useful: the figures are the last stage's devices', the busiest.
  Elementwise work (LayerNorm, softmax, GELU) is not counted: it is under 1% at paper width.
  """
  n = plan.rows * plan.chunk_tokens
  lps = plan.layers_per_stage
  mm_step = lps * matmul_flops(cfg, n, plan.tp)
  att = [lps * attention_flops(cfg, plan.rows, plan.chunk_tokens, kv_positions(plan, k), plan.tp)
         for k in range(plan.n_chunks)]
  tiles = n_tiles(plan)
  att_all_blocks = lps * attention_flops(cfg, plan.rows, tiles * q_block(plan), plan.cache_len,
                                         plan.tp)
  head = head_flops(cfg, n, plan.tp)
  executed = plan.units * (mm_step + head) + plan.microbatches * sum(att)
  static = plan.ticks * (mm_step + att_all_blocks + head)
  tokens = plan.batch * plan.seq
  useful = tokens * (lps * (2 * cfg.projection_params_per_layer
                            + 2 * (plan.seq + 1) * cfg.attn_dim) / plan.tp
                     + head_flops(cfg, 1, plan.tp))
  return {"executed": float(executed), "static": float(static), "useful": float(useful),
          "matmul": float(plan.units * mm_step),
          "attention": float(plan.microbatches * sum(att)), "head": float(plan.units * head)}


def hlo_cond_weights(plan: Plan) -> tuple[float, float]:
  """Branch weights that turn a static count of the engine's HLO into the executed count.

  Outer cond (the tick's run/skip): a stage runs on units of its ticks. Inner cond (attention's
  per-KV-block skip, inside each query tile): the share of (tile, block) pairs visited; every
  microbatch repeats the same chunks, so the mean over chunks is exact.
  """
  blocks = plan.cache_len // plan.kv_block
  visited = sum(visit_sum(plan, k) for k in range(plan.n_chunks))
  return plan.units / plan.ticks, visited / (plan.n_chunks * n_tiles(plan) * blocks)


def collective_bytes(cfg: ModelConfig, plan: Plan,
                     element_bytes: int | None = None) -> dict[str, dict[str, float]]:
  """Collective buffer bytes per device for the whole run, per HLO collective kind.

  `executed` and `static` count each collective op's buffer once, as HLO shapes do (an
  all-reduce of X bytes counts X): `executed` the psums of valid steps only (they sit in the
  cond's run branch), `static` the psums on every tick, which is what a static count of the
  compiled program (op bytes x loop trip counts) sees. The ppermute runs on every tick, bubble
  ticks included, in both. `link` is what a device sends: a ring all-reduce 2(t-1)/t X, a
  ppermute X (every stage but the last). The gather of the output outside the engine's loop,
  which XLA's partitioner lays out, is not modelled.

  element_bytes overrides the model dtype's size: XLA on CPU promotes bf16 collectives to
  float32, so a bf16 program compiled there moves 4-byte elements.
  """
  ar = allreduce_payload_bytes(cfg, plan, element_bytes) if plan.tp > 1 else 0
  # A token-in family's stage 0 adds one psum per unit: the vocab-parallel embedding lookup.
  per_step = (cfg.family.allreduces_per_layer * plan.layers_per_stage
              + cfg.family.token_edges) * ar
  pp = unit_bytes(cfg, plan, element_bytes) if plan.stages > 1 else 0
  st = stream_collective_bytes(cfg, plan, element_bytes)
  permute = plan.ticks * (pp + st["collective-permute"])
  gather = plan.ticks * st["all-gather"]
  payload_exec = {"all-reduce": plan.units * per_step, "collective-permute": permute,
                  "all-gather": gather}
  payload_static = dict(payload_exec, **{"all-reduce": plan.ticks * per_step})
  # A middle stage sends its unit on and its input slice to stage 0; the last stage sends
  # S - 1 output slices; every device sends (tp - 1)/tp of the gathered unit in the ring.
  sl = stream_slices(cfg, plan, element_bytes)
  link = {"all-reduce": plan.units * (per_step // ar if ar else 0)
                        * ring_allreduce_link_bytes(ar, plan.tp),
          "collective-permute": plan.ticks * max(pp + sl["in"] * (plan.stages > 1),
                                                 (plan.stages - 1) * sl["out"]),
          "all-gather": plan.ticks * (plan.tp - 1) * st["all-gather"]}
  return {"executed": _floats(payload_exec), "static": _floats(payload_static),
          "link": _floats(link)}


def _floats(d):
  return {k: float(v) for k, v in d.items()}
