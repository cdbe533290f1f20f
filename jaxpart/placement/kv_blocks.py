"""The paged KV pool's arithmetic, owned by the planner: how many blocks the memory left holds.

A serving device holds its stage's weight shards, the edges and the persistent step's buffers;
whatever HBM is left becomes fixed-size K/V blocks (serving/kv_pages.py keeps their free list
and block tables). Jax-free, so `plan` and `memory` report the pool without building anything.
"""

from __future__ import annotations

import dataclasses

from jaxpart.config import ModelConfig
from jaxpart.placement import memory
from jaxpart.placement.shards import kv_cache_bytes

DEFAULT_BLOCK_TOKENS = 16     # vLLM's default block size (tokens per KV block)
# The serving step `plan` and `memory` size the step buffers for when no command says: S slots
# plus C prompt tokens a step. 64 slots is a modelling choice; 512 prompt tokens a step was
# vLLM's max_num_batched_tokens default with chunked prefill (vLLM 0.4-0.5 EngineArgs).
DEFAULT_SLOTS = 64
DEFAULT_CHUNK_TOKENS = 512


def blocks_for(n_tokens: int, block_tokens: int) -> int:
  """Blocks that hold n_tokens tokens."""
  return -(-n_tokens // block_tokens)


def kv_bytes_per_token(cfg: ModelConfig, tp: int = 1, layers: int = 1) -> int:
  """K and V of one token on one device: `layers` layers of a tp shard (placement.shards)."""
  return kv_cache_bytes(cfg, rows=1, positions=1, tp=tp, layers=layers)


def blocks_from_bytes(cfg: ModelConfig, bytes_left: float, tp: int = 1, layers: int = 1,
                      block_tokens: int = DEFAULT_BLOCK_TOKENS) -> int:
  """Blocks that fit in bytes_left, the memory one device has after weights and step buffers,
  for a stage of `layers` layers at tensor parallelism tp (every device of the pipeline holds
  the same blocks for its own layers, so the smallest device's figure sizes the pool)."""
  per_block = kv_bytes_per_token(cfg, tp, layers) * block_tokens
  return max(0, int(bytes_left // per_block))


def pool_capacity(num_blocks: int, block_tokens: int, context: int) -> dict[str, int]:
  """What `plan` and `memory` report of a pool: its blocks, the tokens they hold and how many
  sequences of the whole context fit at once (more fit when they are shorter)."""
  return {"blocks": num_blocks, "block_tokens": block_tokens,
          "tokens": num_blocks * block_tokens,
          "context_sequences": num_blocks // blocks_for(context, block_tokens)}


def serving_step_plan(plan, step_tokens: int, rows: int = 1):
  """The Plan of one serving step: `rows` x step_tokens tokens in one unit on plan's mesh (the
  shape memory.program_bytes and the cost model price), whatever the forward's chunking."""
  return dataclasses.replace(plan, batch=rows, seq=step_tokens, microbatches=1,
                             chunk_tokens=step_tokens)


def serving_pool(cfg: ModelConfig, run, plan, hbm_bytes: float, context: int,
                 step_tokens: int = DEFAULT_SLOTS + DEFAULT_CHUNK_TOKENS,
                 block_tokens: int = DEFAULT_BLOCK_TOKENS) -> dict:
  """The pool the planner gives a Plan: per device, HBM minus what the serving step holds
  (memory.program_bytes of one step of step_tokens tokens: its weight shards, edges, step and
  pipeline buffers and head logits; the forward's input, output and KV cache are not held),
  in blocks of block_tokens tokens of the stage's layers at the plan's tp."""
  prog = memory.program_bytes(cfg, run, serving_step_plan(plan, step_tokens))
  held = {k: prog[k] for k in ("weights", "edge_weights", "step_and_pipeline_buffers",
                               "head_logits_unit") if k in prog}
  left = max(0.0, hbm_bytes - sum(held.values()))
  blocks = blocks_from_bytes(cfg, left, plan.tp, plan.layers_per_stage, block_tokens)
  return {"held_bytes": held, "bytes_left": left, "step_tokens": step_tokens,
          "kv_bytes_per_token": kv_bytes_per_token(cfg, plan.tp, plan.layers_per_stage),
          "context": context, **pool_capacity(blocks, block_tokens, context)}
