"""Time of one serving step: P prompt tokens (chunks of some prompts) + D decode tokens.

Built from cost/forward's own terms, never a new formula: forward.layer_step prices one layer
on one unit, so a mixed step of n = P + D tokens on one device is
  - the dense part: layer_step of one unit of n tokens attending to nothing (the weight shard
    read once for the whole step, the GEMMs on n rows, intermediates, the two all-reduces);
  - plus each attention part as the difference layer_step(keys) - layer_step(0 keys) of its
    own unit: the decodes as D times one token at their mean context, each prompt chunk as 1
    row of its tokens over its prefix (K/V read, score FLOPs, blocks visited).
Compute, HBM and L2 times are summed part by part and the layer step is their largest (as in
layer_step); on a host (hw.host_cores) the parts' kernel times add. A stage runs its layers,
stage 0 adds the embedding of the n tokens and the last stage the LM head on the step's logit
rows only; forward.tick_seconds then takes the step round the S stages as one unit (one step
in flight: the stages wait in turn, as serving/step.py runs it) with the n x D sends between.

Not modelled: several steps in flight round a pipeline, sampling beyond the head's argmax,
the host's scheduling time between steps (serve-bench measures it as host_gap_fraction).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from jaxpart.config import Setup
from jaxpart.cost.counts import unit_bytes
from jaxpart.cost.forward import edge_seconds, layer_step, tick_seconds
from jaxpart.cost.params import DEFAULT, ModelParams
from jaxpart.cost.units import transfer_seconds
from jaxpart.placement.kv_blocks import DEFAULT_BLOCK_TOKENS, serving_step_plan
from jaxpart.placement.plan import Plan

PARTS = ("compute_s", "hbm_s", "l2_s", "host_s")


class StepCost:
  """Prices serving steps of one Plan on setup.hardware; results are cached by shape, since a
  simulation asks for the same few shapes thousands of times."""

  def __init__(self, setup: Setup, plan: Plan, block_tokens: int = DEFAULT_BLOCK_TOKENS,
               params: ModelParams = DEFAULT):
    self.setup, self.params, self.block = setup, params, block_tokens
    self.plan = plan
    self.cfg, self.hw = setup.model, setup.hardware
    self._dense = functools.lru_cache(maxsize=None)(self._dense_part)
    self._attn = functools.lru_cache(maxsize=None)(self._attention_part)
    self._edges = functools.lru_cache(maxsize=None)(self._edge_part)

  def _unit(self, rows: int, tokens: int) -> Plan:
    # the unit's attention visits K/V in the pool's blocks, not the forward's kv_block
    return dataclasses.replace(serving_step_plan(self.plan, tokens, rows), kv_block=self.block)

  def _parts(self, step: dict) -> np.ndarray:
    host = step["step_s"] - step["allreduce_s"] if self.hw.host_cores else 0.0
    return np.array([step["compute_s"], step["hbm_s"], step["l2_s"], host])

  def _dense_part(self, tokens: int) -> tuple[np.ndarray, float, float]:
    st = layer_step(self.setup, self._unit(1, tokens), 0, self.params)
    return self._parts(st), st["allreduce_s"], st["work_s"] - (st["step_s"] - st["allreduce_s"])

  def _attention_part(self, rows: int, tokens: int, keys: int) -> np.ndarray:
    """What attending to `keys` keys (rounded up to whole blocks, as the paged kernel visits
    them) adds to a unit of rows x tokens."""
    unit = self._unit(rows, tokens)
    keys = -(-keys // self.block) * self.block
    return (self._parts(layer_step(self.setup, unit, keys, self.params))
            - self._parts(layer_step(self.setup, unit, 0, self.params)))

  def _edge_part(self, tokens: int, logit_rows: int) -> tuple[float, float]:
    embed = edge_seconds(self.cfg, self._unit(1, tokens), self.hw, self.params)["embed_s"]
    head = edge_seconds(self.cfg, self._unit(1, max(1, logit_rows)), self.hw,
                        self.params)["head_s"]
    return embed, head

  def seconds(self, chunks: tuple[tuple[int, int], ...], decode_keys: tuple[int, ...],
              logit_rows: int) -> float:
    """One step: prompt chunks as (tokens, keys attended after them), decode tokens by their
    keys (context including the token), and the rows whose logits the head computes."""
    n = sum(t for t, _ in chunks) + len(decode_keys)
    if n == 0:
      return 0.0
    parts, allreduce_s, allreduce_work = self._dense(n)
    parts = parts.copy()
    for tokens, keys in chunks:
      parts += self._attn(1, tokens, keys)
    if decode_keys:
      d = len(decode_keys)
      parts += d * self._attn(1, 1, int(round(sum(decode_keys) / d)))
    compute, hbm, l2, host = parts
    layer_s = (host if self.hw.host_cores else max(compute, hbm, l2)) + allreduce_s
    work_s = host + allreduce_work
    return self._round_trip(n, layer_s, work_s, logit_rows)

  def _round_trip(self, n: int, layer_s: float, work_s: float, logit_rows: int) -> float:
    """The step as one unit through every stage (forward.tick_seconds), stage s at tick s."""
    plan = self._unit(1, n)
    lps = plan.layers_per_stage
    embed, head = self._edges(n, logit_rows)
    pipe = 0.0 if plan.stages == 1 else transfer_seconds(unit_bytes(self.cfg, plan), self.hw,
                                                         self.params)
    pipe_work = 0.0 if plan.stages == 1 else transfer_seconds(unit_bytes(self.cfg, plan),
                                                              self.hw, self.params, False)
    ticks = tick_seconds(np.array([lps * layer_s]), plan, self.hw, pipe, self.params, embed,
                         head, np.array([lps * work_s]), pipe_work)
    return float(ticks.sum())


