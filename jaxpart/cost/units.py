"""The time of one counted thing on a Hardware: a ppermute, a ring all-reduce, a tick's stream
transfers and unit copies, a GEMM's cost beyond its FLOPs, and the L2 a device can count on.
The cost model (jaxpart.cost.forward) adds these up tick by tick; `jaxpart calibrate` measures
the constants they read on a host of simulated devices.
"""

from __future__ import annotations

from jaxpart.config import ModelConfig
from jaxpart.cost.params import DEFAULT, ModelParams
from jaxpart.cost.counts import ring_allreduce_link_bytes, stream_slices, tick_move_bytes, unit_bytes
from jaxpart.placement.plan import Plan


def transfer_seconds(payload: float, hw, params: ModelParams = DEFAULT,
                     latency: bool = True) -> float:
  """One ppermute of `payload` bytes across the slowest stage boundary (latency=False: the
  bytes' time alone, what a host's cores spend on it)."""
  bw = params.pipeline_link_bw or hw.link_bw
  return payload / (bw * params.link_fraction) + (hw.link_latency if latency else 0.0)



def allreduce_seconds(payload: float, tp: int, hw, params: ModelParams = DEFAULT,
                      latency: bool = True) -> float:
  if tp <= 1:
    return 0.0
  return (ring_allreduce_link_bytes(payload, tp) / (hw.link_bw * params.link_fraction)
          + (hw.link_latency if latency else 0.0))



def stream_seconds(cfg: ModelConfig, plan: Plan, hw, params: "ModelParams",
                   latency: bool = True) -> float:
  """One tick's stream traffic: S - 1 input slices into stage 0 and S - 1 output slices out of
  the last stage, one after another over the stage boundary, then the all-gather inside stage
  0's group (counts.stream_slices: Llama has no input traffic and float32 logit slices out)."""
  sl = stream_slices(cfg, plan)
  s = 0.0
  if plan.stages > 1:
    s += (plan.stages - 1) * sum(transfer_seconds(sl[k], hw, params, latency)
                                 for k in ("in", "out") if sl[k])
  if sl["gather"]:
    s += ((plan.tp - 1) * sl["gather"] / (hw.link_bw * params.link_fraction)
          + (hw.link_latency if latency else 0.0))
  return s


def cache_bytes(hw, devices: int) -> float:
  """The L2 one device can count on: all of it on a chip; on a host whose cores `devices`
  simulated devices share, its share (they take turns on a core and evict each other)."""
  if not hw.host_cores:
    return hw.l2_bytes
  return hw.l2_bytes * min(1.0, hw.host_cores / devices)


def move_seconds(cfg: ModelConfig, plan: Plan, hw, params: "ModelParams") -> float:
  """One tick's local unit copies (counts.tick_move_bytes), from the L2 when a unit fits it."""
  fits = unit_bytes(cfg, plan) <= cache_bytes(hw, plan.devices)
  return tick_move_bytes(cfg, plan) / (hw.l2_bw if fits else hw.hbm_bw * params.hbm_fraction)


def gemm_overhead_seconds(calls: int, arrays, element_bytes: int, hw, cache: float) -> float:
  """What GEMMs cost beyond their FLOPs: a fixed cost per call, and per element of the arrays
  they read and write (dtype converts, packing), dearer for an array larger than `cache`
  (cache_bytes).
  All 0 for the GPU presets, whose kernels are large; `jaxpart calibrate` measures them, and
  on a CPU host they decide whether many small GEMMs beat a few large ones."""
  return calls * hw.gemm_call_s + sum(
      n * (hw.gemm_element_s if n * element_bytes <= cache else hw.gemm_spill_element_s)
      for n in arrays)
