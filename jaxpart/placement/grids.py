"""The (stages, tp) grids a model can be split into on N devices, and why others cannot.

Pure arithmetic on the model's layer, head and MLP counts (the tp rules live in plan.py); the
planner picks from these grids, and every refusal lists the device counts or tp that would do.
"""

from __future__ import annotations

from typing import Iterable

from jaxpart.config import MAX_INDEX, ModelConfig
from jaxpart.placement.plan import PlanError, check_tp, contiguous_stage_layers, divisors, tp_problems


def positive_int(name: str, value) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise PlanError(f"{name} = {value!r}: must be a positive integer")
  if value > MAX_INDEX:
    raise PlanError(f"{name} = {value:,}: beyond what JAX indexes; at most {MAX_INDEX:,}")


def layerwise_grids(cfg: ModelConfig, devices: int) -> list[tuple[int, int, list[str]]]:
  """Every (stages, tp, problems) with stages | layers and stages x tp = devices, most stages
  first; problems is empty for a grid that works."""
  out = []
  for stages in sorted(divisors(cfg.layers), reverse=True):
    if devices % stages == 0:
      tp = devices // stages
      out.append((stages, tp, tp_problems(cfg, tp)))
  return out


def layerwise_grid(cfg: ModelConfig, devices: int, tp: int | None = None) -> tuple[int, int, str]:
  """(stages, tp, why): as many stages as layers and devices allow, the rest tensor-parallel.

  The most stages is gcd(layers, devices). Every other stage count divides it, so its tp is a
  multiple of this tp: if this tp cannot split the heads or MLP columns, none can.
  """
  positive_int("devices", devices)
  valid_here = fmt_list([t for s, t, p in layerwise_grids(cfg, devices) if not p])
  if tp is not None:
    positive_int("tp", tp)
    if devices % tp:
      raise PlanError(f"tp = {tp} does not divide devices = {devices}; stages = devices / tp "
                      f"must divide layers = {cfg.layers}. Valid tp here: {valid_here}")
    stages = devices // tp
    try:
      contiguous_stage_layers(cfg.layers, stages)
      check_tp(cfg, tp)
    except PlanError as e:
      raise PlanError(f"tp = {tp} on devices = {devices} gives {stages} stages: {e}. Valid tp "
                      f"here: {valid_here}") from None
    return stages, tp, f"{stages} stage{'s' * (stages > 1)} x tp {tp} as asked"
  stages, tp, problems = layerwise_grids(cfg, devices)[0]
  if problems:
    counts = valid_device_counts(cfg)
    below = [n for n in counts if n < devices]
    raise PlanError(
        f"devices = {devices} cannot place this model layer-wise: the most stages is "
        f"gcd(layers = {cfg.layers}, devices = {devices}) = {stages}, leaving tp = {tp}, and "
        f"{'; '.join(problems)} (fewer stages only multiply tp and fail the same way). Device "
        f"counts that plan this model layer-wise: {fmt_list(counts)}"
        + (f"; the largest below {devices} is {below[-1]} (--devices {below[-1]})" if below else ""))
  return stages, tp, (f"{stages} stage{'s' * (stages > 1)} x tp {tp}: the most stages that "
                      f"divide layers = {cfg.layers} and devices = {devices}")


def valid_device_counts(cfg: ModelConfig, limit: int = 128) -> list[int]:
  """Device counts up to `limit` that the layer-wise grid places."""
  return [n for n in range(1, limit + 1) if not layerwise_grids(cfg, n)[0][2]]


def baseline_grids(cfg: ModelConfig, devices: int) -> list[tuple[int, int]]:
  """Valid (tp, pp) pairs for the baseline on `devices` devices."""
  return [(devices // pp, pp) for pp in divisors(devices)
          if cfg.layers % pp == 0 and not tp_problems(cfg, devices // pp)]


def fmt_list(values: Iterable) -> str:
  values = list(values)
  return ", ".join(map(str, values)) if values else "none"
