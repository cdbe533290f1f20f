"""Calibration: microbenchmarks on the devices present, written as a hardware TOML that
`--config` loads, so the cost model predicts with this machine's measured rates instead of a
datasheet's.

Measured, each by a kernel unrelated to any one plan, inside a compiled loop (_looped):
- GEMMs of a grid of (m, k, n) shapes, fitted as t = call + elements x per-element (dearer for
  an array beyond the L2) + FLOPs / rate (calibfit.gemm_fit): the rate sets peak_flops, the
  rest gemm_call_s, gemm_element_s and gemm_spill_element_s: why small matmuls run far below
  the peak;
- flash attention over a KV cache (attention.blocked_causal) at query tiles of 128, 64 and 32:
  score_element_s (mask, running max, exp per score) and attention_visit_s (per tile and block);
- an elementwise pass over an array beyond the L2 (hbm_bw) and, on a host, one inside it (l2_bw);
- a ppermute among every device at two payloads: link_bw, link_latency;
- with simulated CPU devices, the cores they share (host_cores) and the L2 Linux reports.

On a CPU host a device's work is timed as process CPU time (the simulated devices share the
cores, so CPU time is what they compete for); on accelerators, wall time. The fitted rates are
sustained ones: the file divides them by the cost model's efficiency fractions, so the model's
sustained rates are the measured ones. Every other field comes from a base hardware preset.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxpart.models import attention
from jaxpart.measure import bench
from jaxpart.measure import calibfit
from jaxpart.runtime import compat
from jaxpart.measure import load
from jaxpart.config import HARDWARE_PRESETS, ConfigError
from jaxpart.cost.params import DEFAULT

DTYPES = ("bfloat16", "float32")
GEMM_KN = ((512, 16), (512, 128), (16, 512), (128, 512), (512, 512))   # (k, n) at each m
ATTENTION_SHAPES = ((1, 256, 1024, 2), (2, 128, 512, 1), (2, 64, 512, 2), (1, 32, 256, 1))
# (rows, queries, cache, heads): query tiles of 128, 64 and 32 separate the cost per visited
# (tile, block) pair from the cost per score element
HEAD_DIM, KV_BLOCK = 16, 128
PPERMUTE_BYTES = (1 << 16, 1 << 20)
IN_L2_BYTES = 1 << 17   # the elementwise pass that stays in the L2


def base_hardware(name: str | None) -> str:
  """The preset whose unmeasured fields (memory size, L2) the file keeps: `name`, or the one
  matching the first device (cpu, or an H100 / H200 by its device kind)."""
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


def host_cores() -> int:
  """Cores the simulated devices share: those this process may run on, when the devices are
  XLA:CPU's (several per host); 0 for accelerators, each its own chip."""
  if jax.devices()[0].platform != "cpu":
    return 0
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:   # not on Linux
    return os.cpu_count() or 1


def _mesh_1d(n: int):
  return compat.make_mesh(jax.devices()[:n], (n,), ("d",))


def _shard_1d(body, mesh):
  spec = PartitionSpec("d")
  return compat.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec)


def _put_1d(mesh, per_device: int, local_shape=None):
  """A float32 array of `per_device` elements on every device of the 1-D mesh (local shape
  `local_shape`, stacked along the first axis)."""
  shape = local_shape or (per_device,)
  x = np.ones((mesh.size * shape[0], *shape[1:]), np.float32)
  return jax.device_put(x, NamedSharding(mesh, PartitionSpec("d")))


def host_l2_bytes(default: float) -> float:
  """The L2 of CPU 0 as Linux reports it (cache level 2, unified or data), else `default`."""
  base = "/sys/devices/system/cpu/cpu0/cache"
  try:
    for entry in sorted(os.listdir(base)):
      d = os.path.join(base, entry)
      with open(os.path.join(d, "level")) as f:
        level = f.read().strip()
      with open(os.path.join(d, "type")) as f:
        kind = f.read().strip()
      if level == "2" and kind in ("Unified", "Data"):
        with open(os.path.join(d, "size")) as f:
          size = f.read().strip()
        mult = {"K": 1024, "M": 1024 ** 2}.get(size[-1:], 1)
        return float(int(size.rstrip("KM")) * mult)
  except (OSError, ValueError):
    pass
  return default


def _timed(fns, repeats: int, warmup: int, cpu: bool) -> dict[str, float]:
  times = bench.time_interleaved(fns, repeats, warmup)
  return {k: v["cpu_median_s" if cpu else "median_s"] for k, v in times.items()}


def _loop_count(flops: float) -> int:
  """Calls per timed loop: enough that a small kernel's time is not the loop's, few enough
  that a large one takes a fraction of a second."""
  return int(min(64, max(4, 2e8 // max(flops, 1.0))))


def _looped(fn, reps: int):
  """x, *rest -> fn(x', *rest) `reps` times inside one compiled loop, as the engine calls its
  kernels (no host dispatch per call, which would dominate a small kernel). x' = x scaled by
  the loop index, so XLA cannot hoist the call out of the loop; that pass and the sum into the
  carry stand for the elementwise work that produces and consumes a kernel's operands in the
  engine. The carry is updated in place: stacking bf16 results per call would time XLA:CPU's
  float32 widening of the whole stack instead."""
  def run(x, *rest):
    def body(i, acc):
      scaled = (x * (1 + i.astype(jnp.float32) * 1e-6)).astype(x.dtype)
      return acc + fn(scaled, *rest)
    init = jnp.zeros(jax.eval_shape(fn, x, *rest).shape, x.dtype)
    return jax.lax.fori_loop(0, reps, body, init)
  return jax.jit(run)


def gemm_times(sizes: Sequence[int], dtype: str, repeats: int, cpu: bool, warmup: int = 1
               ) -> list[dict[str, Any]]:
  """Seconds of one m x k @ k x n matmul on the first device for m in `sizes` and every
  (k, n) of GEMM_KN, timed interleaved, each inside a compiled loop (_looped)."""
  dev = jax.devices()[0]
  shapes = [(m, k, n) for m in sizes for k, n in GEMM_KN]
  fns, loops = {}, {}
  for i, (m, k, n) in enumerate(shapes):
    r = loops[m, k, n] = _loop_count(2.0 * m * k * n)
    a = jax.random.normal(jax.random.key(i), (m, k), jnp.dtype(dtype))
    b = jax.random.normal(jax.random.key(i + 1), (k, n), jnp.dtype(dtype))
    a, b = jax.device_put((a, b), dev)
    fns[f"{m}x{k}x{n}"] = (lambda f=_looped(jnp.matmul, r), a=a, b=b: f(a, b))
  t = _timed(fns, repeats, warmup, cpu)
  out = []
  for m, k, n in shapes:
    s = t[f"{m}x{k}x{n}"] / loops[m, k, n]
    out.append({"m": m, "k": k, "n": n, "median_s": s, "flops_per_s": 2.0 * m * k * n / s})
  return out


def attention_times(dtype: str, repeats: int, cpu: bool, warmup: int = 1
                    ) -> list[dict[str, Any]]:
  """Seconds of blocked_causal for the last `queries` positions of a cache (in a compiled
  loop), with the score elements and FLOPs that pass computes, counted as the cost model
  counts them."""
  dev = jax.devices()[0]
  fns, out, loops = {}, [], []
  for i, (rows, q, cache, heads) in enumerate(ATTENTION_SHAPES):
    qb, start = min(KV_BLOCK, q), cache - q
    tiles = -(-q // qb)
    visits = sum(min(start + (j + 1) * qb - 1, start + q - 1) // KV_BLOCK + 1
                 for j in range(tiles))
    scores = visits * rows * KV_BLOCK * qb * heads
    r = _loop_count(4.0 * scores * HEAD_DIM * 8)
    qq = jax.random.normal(jax.random.key(i), (rows, q, heads, HEAD_DIM), jnp.dtype(dtype))
    kv = jax.random.normal(jax.random.key(i + 7), (rows, cache, heads, HEAD_DIM),
                           jnp.dtype(dtype))
    qq, kv = jax.device_put((qq, kv), dev)
    f = _looped(lambda a, b, start=cache - q: attention.blocked_causal(a, b, b, start,
                                                                        KV_BLOCK), r)
    fns[str(i)] = (lambda f=f, a=qq, b=kv: f(a, b))
    loops.append(r)
    out.append({"rows": rows, "queries": q, "cache": cache, "heads": heads, "visits": visits,
                "score_elements": scores, "flops": 4.0 * scores * HEAD_DIM})
  t = _timed(fns, repeats, warmup, cpu)
  for i, o in enumerate(out):
    o["median_s"] = t[str(i)] / loops[i]
  return out


def stream_bandwidth(nbytes: int, dtype: str, repeats: int, cpu: bool, warmup: int = 1
                     ) -> dict[str, Any]:
  """Bytes/s of an elementwise pass x * a + b over an array of about `nbytes` on the first
  device, read and written once per pass, in a compiled loop (the carry is updated in place).
  In `dtype`: on XLA:CPU a bf16 pass also converts each element to float32 and back."""
  dt = jnp.dtype(dtype)
  n = max(1, nbytes // dt.itemsize)
  reps = _loop_count(200.0 * n)
  x = jax.device_put(jnp.ones((n,), dt), jax.devices()[0])
  f = jax.jit(lambda x: jax.lax.fori_loop(0, reps, lambda _, y: (y * 0.999 + 1e-3).astype(dt),
                                          x))
  t = _timed({"pass": lambda: f(x)}, repeats, warmup, cpu)["pass"] / reps
  return {"bytes": n * dt.itemsize, "median_s": t, "bytes_per_s": 2.0 * n * dt.itemsize / t}


def ppermute_times(repeats: int, cores: int, warmup: int = 1) -> dict[str, Any] | None:
  """link_bw and link_latency from a ppermute (each device sends its array to the next, all at
  once, as the engine's stages send units) at PPERMUTE_BYTES payloads; None with one device.
  The latency is the wall time's intercept (what a device waits); on a host, whose `cores`
  the devices share, a device's bytes cost it wall x cores / devices."""
  n = len(jax.devices())
  if n < 2:
    return None
  reps = 8
  mesh = _mesh_1d(n)
  ring = [(i, (i + 1) % n) for i in range(n)]

  def body(x):
    return jax.lax.fori_loop(0, reps, lambda _, c: jax.lax.ppermute(c, "d", ring), x)

  fn = jax.jit(_shard_1d(body, mesh))
  fns = {str(b): (lambda x=_put_1d(mesh, b // 4): fn(x)) for b in PPERMUTE_BYTES}
  t = bench.time_interleaved(fns, repeats, warmup)
  wall = [t[str(b)]["median_s"] / reps for b in PPERMUTE_BYTES]
  share = min(cores, n) / n if cores else 1.0
  return {"devices": n, "payload_bytes": list(PPERMUTE_BYTES), "wall_s": wall,
          **calibfit.link_fit(PPERMUTE_BYTES, wall, share, DEFAULT.link_fraction)}


def calibrate(sizes: Sequence[int], copy_bytes: int | None, dtype: str = "bfloat16",
              repeats: int = 5, base: str | None = None) -> dict[str, Any]:
  """The measurements, the hardware fields they set, and the load they were taken under.
  copy_bytes None: 8 times the L2 (beyond it, about the size of a large step's arrays)."""
  if dtype not in DTYPES:
    raise ConfigError(f"--dtype = {dtype!r}: valid: {', '.join(DTYPES)}")
  base = base_hardware(base)
  cores = host_cores()
  cpu = bool(cores)
  before = load.start("calibrate:")
  gemm = gemm_times(sizes, dtype, repeats, cpu)
  l2 = HARDWARE_PRESETS[base].l2_bytes
  if cpu:
    l2 = host_l2_bytes(l2)
  for g in gemm:
    g["features"] = calibfit.gemm_features(g["m"], g["k"], g["n"], jnp.dtype(dtype).itemsize, l2)
  try:
    fit = calibfit.gemm_fit([g["features"] for g in gemm], [g["median_s"] for g in gemm])
  except calibfit.NoRateError:
    raise ConfigError(
        f"--sizes = {','.join(map(str, sizes))}: the GEMM times at these sizes do not grow with "
        f"their FLOPs (call overhead dominates), so no FLOP rate can be fitted; include larger "
        f"sizes, for example 64,256,1024 (the default is 64,256,1024,4096)") from None
  att = attention_times(dtype, repeats, cpu)
  attn = calibfit.attention_fit([a["visits"] for a in att], [a["score_elements"] for a in att],
                                [a["flops"] for a in att], [a["median_s"] for a in att],
                                fit["flops_per_s"])
  near = stream_bandwidth(IN_L2_BYTES, dtype, repeats, cpu) if cpu else None
  far = stream_bandwidth(copy_bytes or int(8 * l2), dtype if cpu else "float32", repeats, cpu)
  link = ppermute_times(repeats, cores)
  hw = {"peak_flops": fit["flops_per_s"] / DEFAULT.gemm_fraction,
        "hbm_bw": far["bytes_per_s"] / DEFAULT.hbm_fraction,
        "gemm_call_s": fit["call_s"], "gemm_element_s": fit["element_s"],
        "gemm_spill_element_s": fit["spill_element_s"],
        "score_element_s": attn["score_element_s"], "attention_visit_s": attn["visit_s"],
        "host_cores": cores, "l2_bytes": l2}
  if near:
    hw["l2_bw"] = near["bytes_per_s"]
  if link:
    hw.update(link_bw=link["link_bw"], link_latency=link["link_latency"])
  return {"base": base, "dtype": dtype, "device": jax.devices()[0].device_kind,
          "devices": len(jax.devices()), "timed": "process CPU time" if cpu else "wall time",
          "gemm": gemm, "gemm_fit": fit, "attention": att, "stream_near": near, "stream": far,
          "ppermute": link,
          "load": load.finish(before), "hardware": hw}


def toml_text(result: dict[str, Any]) -> str:
  """A config file whose [hardware] table is the base preset with the measured fields."""
  hw, when = result["hardware"], datetime.datetime.now().isoformat(timespec="seconds")
  fit = result["gemm_fit"]
  lines = [f"# jaxpart calibrate, {when}, on {result['devices']} x {result['device']} "
           f"({result['dtype']}, {result['timed']}); load it with --config FILE",
           f"# GEMM fit over {len(result['gemm'])} shapes: t = {fit['call_s']:.3e} s + "
           f"elements x {fit['element_s']:.3e} s (or {fit['spill_element_s']:.3e} s beyond the "
           f"L2) + FLOPs / {fit['flops_per_s']:.3e}; "
           f"worst relative residual {fit['worst_rel_residual']:.2f}"]
  if result["load"]["under_load"]:
    lines.append(f"# {result['load']['note']}")
  lines += ["", "[hardware]",
            f'name = "{result["base"]}"  # base preset: every field not set below comes from it',
            f"peak_flops = {hw['peak_flops']:.6e}  # fitted GEMM rate / gemm_fraction "
            f"{DEFAULT.gemm_fraction}",
            f"hbm_bw = {hw['hbm_bw']:.6e}  # elementwise pass over {result['stream']['bytes']:,} "
            f"bytes, read + write, / hbm_fraction {DEFAULT.hbm_fraction}",
            f"gemm_call_s = {hw['gemm_call_s']:.6e}  # fitted: fixed cost of one GEMM",
            f"gemm_element_s = {hw['gemm_element_s']:.6e}  # fitted: per operand/result element",
            f"gemm_spill_element_s = {hw['gemm_spill_element_s']:.6e}  # fitted: the same, "
            f"for an array larger than the L2",
            f"score_element_s = {hw['score_element_s']:.6e}  # attention beyond its FLOPs",
            f"attention_visit_s = {hw['attention_visit_s']:.6e}  # per (query tile, KV block)",
            f"host_cores = {hw['host_cores']}  # cores the simulated devices share (0: chips)",
            f"l2_bytes = {hw['l2_bytes']:.6e}  # the L2 a GEMM's arrays are compared with"]
  if "l2_bw" in hw:
    lines.append(f"l2_bw = {hw['l2_bw']:.6e}  # elementwise pass over "
                 f"{result['stream_near']['bytes']:,} bytes (in the L2)")
  if "link_bw" in hw:
    lines += [f"link_bw = {hw['link_bw']:.6e}  # ppermute among {result['ppermute']['devices']} "
              f"devices, / link_fraction {DEFAULT.link_fraction}",
              f"link_latency = {hw['link_latency']:.6e}  # ppermute wall time's intercept"]
  return "\n".join(lines) + "\n"

