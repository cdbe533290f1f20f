"""Calibration: a few microbenchmarks on the device present, written as a hardware TOML that
`--config` loads, so the cost model predicts with this machine's measured rates instead of a
datasheet's (the presets' CPU figures are nominal, order of magnitude only).

Measured: the GEMM rate of square matmuls at a few sizes (peak_flops is the best; the rate at
each size is kept, since small matmuls run well below it), and an on-device copy's bandwidth
(hbm_bw). Every other field comes from a base hardware preset, named in the file.
"""

from __future__ import annotations

import datetime
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jaxpart import bench, load
from jaxpart.config import HARDWARE_PRESETS, ConfigError

DTYPES = ("bfloat16", "float32")


def base_hardware(name: str | None) -> str:
  """The preset whose unmeasured fields (memory size, L2, links) the file keeps: `name`, or the
  one matching the first device (cpu, or an H100 / H200 by its device kind)."""
  if name is not None:
    if name not in HARDWARE_PRESETS:
      raise ConfigError(f"--hardware = {name!r}: unknown; valid: {', '.join(HARDWARE_PRESETS)}")
    return name
  dev = jax.devices()[0]
  if dev.platform == "cpu":
    return "cpu"
  kind = dev.device_kind.lower()
  for preset in HARDWARE_PRESETS:
    if preset in kind:
      return preset
  raise ConfigError(f"device kind {dev.device_kind!r} matches no hardware preset: pass "
                    f"--hardware with one of {', '.join(HARDWARE_PRESETS)} as the base")


def gemm_rates(sizes: Sequence[int], dtype: str, repeats: int, warmup: int = 1
               ) -> list[dict[str, Any]]:
  """FLOP/s of an n x n by n x n matmul at each size, timed interleaved on the first device."""
  dev = jax.devices()[0]
  mm = jax.jit(jnp.matmul)
  fns = {}
  for i, n in enumerate(sizes):
    a, b = jax.random.normal(jax.random.key(i), (2, n, n), jnp.dtype(dtype))
    a, b = jax.device_put(a, dev), jax.device_put(b, dev)
    fns[str(n)] = (lambda a=a, b=b: mm(a, b))
  times = bench.time_interleaved(fns, repeats, warmup)
  return [{"n": n, "median_s": times[str(n)]["median_s"],
           "flops_per_s": 2.0 * n ** 3 / times[str(n)]["median_s"]} for n in sizes]


def copy_bandwidth(nbytes: int, repeats: int, warmup: int = 1) -> dict[str, Any]:
  """Bytes/s of x + 1 over a float32 array of about `nbytes` on the first device: it reads
  and writes every byte once. x is donated, so the result lands in place: a fresh output
  buffer each call would time the allocator's page faults too."""
  held = [jax.device_put(jnp.zeros(max(1, nbytes // 4), jnp.float32), jax.devices()[0])]
  inc = jax.jit(lambda x: x + 1, donate_argnums=0)

  def step():
    held[0] = inc(held[0])
    return held[0]

  t = bench.time_interleaved({"copy": step}, repeats, warmup)["copy"]["median_s"]
  return {"bytes": held[0].nbytes, "median_s": t, "bytes_per_s": 2.0 * held[0].nbytes / t}


def calibrate(sizes: Sequence[int], copy_bytes: int, dtype: str = "bfloat16",
              repeats: int = 5, base: str | None = None) -> dict[str, Any]:
  """The measurements, the hardware fields they set, and the load they were taken under."""
  if dtype not in DTYPES:
    raise ConfigError(f"--dtype = {dtype!r}: valid: {', '.join(DTYPES)}")
  base = base_hardware(base)
  before = load.start("calibrate:")
  gemm = gemm_rates(sizes, dtype, repeats)
  copy = copy_bandwidth(copy_bytes, repeats)
  best = max(gemm, key=lambda g: g["flops_per_s"])
  return {"base": base, "dtype": dtype, "device": jax.devices()[0].device_kind,
          "gemm": gemm, "copy": copy, "load": load.finish(before),
          "hardware": {"peak_flops": best["flops_per_s"], "hbm_bw": copy["bytes_per_s"]}}


def toml_text(result: dict[str, Any]) -> str:
  """A config file whose [hardware] table is the base preset with the measured fields."""
  hw, when = result["hardware"], datetime.datetime.now().isoformat(timespec="seconds")
  best = max(result["gemm"], key=lambda g: g["flops_per_s"])
  lines = [f"# jaxpart calibrate, {when}, on {result['device']}; load it with --config FILE",
           "# GEMM rate by size (n x n x n, FLOP/s): "
           + ", ".join(f"{g['n']}: {g['flops_per_s']:.3e}" for g in result["gemm"])]
  if result["load"]["under_load"]:
    lines.append(f"# {result['load']['note']}")
  lines += [
      "",
      "[hardware]",
      f'name = "{result["base"]}"  # base preset: every field not set below comes from it',
      f"peak_flops = {hw['peak_flops']:.6e}  # measured: best {result['dtype']} GEMM rate "
      f"({best['n']}^3)",
      f"hbm_bw = {hw['hbm_bw']:.6e}  # measured: x + 1 over {result['copy']['bytes']:,} bytes, "
      f"read + write",
  ]
  return "\n".join(lines) + "\n"
