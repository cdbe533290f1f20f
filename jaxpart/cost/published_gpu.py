"""Published H100 serving figures that `predict --serving` is printed beside (never fitted to).

Copied from shared/data/published_gpu_points.md, which cites each source; they measure other
engines (TensorRT-LLM), so they bound what a well-tuned engine reaches on the hardware. Times in
seconds. Only online rows (Poisson arrivals at a stated rate) can be expressed by the serving
model; the others are listed with why not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TRTLLM = ("NVIDIA/TensorRT-LLM docs/source/performance/perf-overview.md (v0.14.0 tables), "
          "online serving table, 500 requests")


@dataclass(frozen=True)
class PublishedRow:
  """One online serving row: the setup (preset, devices, tp), the workload and the figures."""
  id: str
  source: str
  what: str
  preset: str
  hardware: str
  devices: int
  tp: int
  rate: float
  requests: int
  prompt: int
  output: int
  figures: dict = field(default_factory=dict)   # metric -> published value (mean_ttft_s, ...)


ROWS = (
    PublishedRow("T3", TRTLLM, "Llama 3.1 70B, 4 x H100, TP4, BF16 (modelled as llama3-70b)",
                 "llama3-70b", "h100", 4, 4, 2.0, 500, 467, 256,
                 {"mean_ttft_s": 0.062, "mean_itl_s": 0.021}),
    PublishedRow("T4", TRTLLM, "as T3 at 16 req/s offered (about 12 achieved: overload)",
                 "llama3-70b", "h100", 4, 4, 16.0, 500, 467, 256,
                 {"mean_ttft_s": 0.175, "mean_itl_s": 0.066}),
    PublishedRow("T5", TRTLLM, "Llama 3.1 8B, 1 x H100, TP1, BF16 (modelled as llama3-8b)",
                 "llama3-8b", "h100", 1, 1, 2.0, 500, 467, 256,
                 {"mean_ttft_s": 0.023, "mean_itl_s": 0.008}),
)

NOT_EXPRESSED = {
    "T1": "offline max throughput (every request present at once, the engine's own batch): "
          "no arrival rate, so not a serving prediction; predict --decode covers offline",
    "T2": "offline max throughput, as T1",
    "V1": "offline batch of 32 prompts (vLLM total tokens/s), not an arrival rate",
    "M1": "FP8 and 4 data-parallel copies of TP2: the cost model prices bf16 on one Plan",
}
