"""The cost model's constants beyond the Hardware spec (efficiency fractions, GEMM tiles,
energy per operation), each with where it comes from, and the default set."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from jaxpart.config import ConfigError


@dataclass(frozen=True)
class ModelParams:
  """Every constant the model uses beyond the Hardware spec, each with where it comes from."""

  # Fraction of peak a large bf16 GEMM sustains. Published cuBLAS measurements on H100 SXM
  # reach roughly 600-750 of the 989 dense TFLOP/s on large GEMMs: 0.75 is an assumption of
  # that order (the sensitivity table in experiments/results/VERDICT.md varies it).
  gemm_fraction: float = 0.75
  # Fraction of HBM bandwidth a streaming kernel reaches: ~90% in STREAM-like copies on H100
  # (Chips and Cheese, "Nvidia's H100", 2023). Assumption.
  hbm_fraction: float = 0.90
  # NCCL ring all-reduce bus bandwidth on 8 x H100 NVLink4 is of order 360 GB/s of the
  # 450 GB/s per direction (nccl-tests results as published by cloud vendors): 0.8. Assumption.
  link_fraction: float = 0.80
  # GEMM tile (M x N) of the CUTLASS/cuBLAS Hopper bf16 kernels (CUTLASS 3 default
  # 128 x 256 x 64 warp-specialised tile): how often each operand is re-read from L2.
  tile_m: int = 128
  tile_n: int = 256
  # Energy. The board bound: 700 W TDP / 989e12 FLOP/s = 0.71 pJ/FLOP for everything at once,
  # so the FLOP itself costs less; 0.4 pJ per bf16 FLOP is an assumption below that bound.
  pj_per_flop: float = 0.4
  # HBM access energy: 3.9 pJ/bit for HBM2 (O'Connor et al., "Fine-Grained DRAM", MICRO 2017)
  # = 31.2 pJ/byte; HBM3 is of the same order. Assumption.
  pj_per_hbm_byte: float = 31.2
  # An L2 access: SRAM read plus the on-chip wires to a far slice, which Keckler et al. ("GPUs
  # and the future of parallel computing", IEEE Micro 2011) put at picojoules per bit over
  # millimetres: ~0.6 pJ/bit = 5 pJ/byte is an order-of-magnitude assumption.
  pj_per_l2_byte: float = 5.0
  # Off-package SerDes links are of order 1-2 pJ/bit: ~10 pJ/byte, an order-of-magnitude
  # assumption (links are under 1% of the modelled energy either way).
  pj_per_link_byte: float = 10.0
  # Power drawn whatever the work (idle H100 SXM draws ~70-100 W per nvidia-smi): 90 W.
  static_watts: float = 90.0
  # The engine sends the unit after the step; set True to model a fully hidden transfer.
  overlap_pipeline: bool = False
  # Bandwidth of the slowest stage boundary, bytes/s; 0 means the hardware's link_bw (the seed
  # puts all 16 GPUs on NVLink). 16 H100s are two 8-GPU nodes in practice, where a pipeline
  # boundary between nodes runs on one 400 Gb/s InfiniBand NDR port per GPU (DGX H100:
  # 8 x ConnectX-7) = 50e9 B/s; the lock-step ticks then wait for that transfer.
  pipeline_link_bw: float = 0.0

  def __post_init__(self):
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if f.name == "overlap_pipeline":
        continue
      fraction = f.name.endswith("_fraction")
      zero_ok = f.name in ("static_watts", "pipeline_link_bw") or f.name.startswith("pj_")
      number = isinstance(v, (int, float)) and not isinstance(v, bool)
      if not number or v < 0 or (v == 0 and not zero_ok) or (fraction and v > 1):
        valid = "in (0, 1]" if fraction else "non-negative" if zero_ok else "positive"
        raise ConfigError(f"ModelParams.{f.name} = {v!r}: must be {valid}")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


DEFAULT = ModelParams()
