#!/usr/bin/env python3
"""One-GPU check of jaxpart's layer-wise step at the seed's width, for a machine where nothing
can be installed (it needs jax, flax and numpy only).

  PYTHONPATH=. python3 scripts/gpu_check.py          # one H200: under 5 minutes
  PYTHONPATH=. python3 scripts/gpu_check.py --tiny   # tiny sizes on CPU (tests/test_gpu_check.py)

1. ceilings: a bf16 n^3 matmul (TFLOP/s) and a large on-device copy (GB/s, read + written;
   with one GPU there is no peer to copy to; with two, a device-to-device put is timed too);
2. one layer-wise stage step of the `paper` preset at full width, the tp=4 shard a device holds
   (d_model 16384, 8 of 32 heads, 4096 of 16384 MLP columns), 1 row, a chunk arriving after
   4096 cached tokens, for chunk sizes 16 .. 8192: engine.stage_step jitted on local-shard
   shapes with the K/V caches donated, as the engine runs it inside a stage (without the tensor
   all-reduce). For each: ms, useful TFLOP/s and its share of the measured matmul peak, and HBM
   bytes/s counting the weight shard re-read every step plus activations and the KV read;
3. the same stage over a whole sequence at once: the engine's blocked attention with one chunk
   of the whole sequence, and the reference block with full causal attention;
4. a 1-layer paper-width forward in bf16 against the same in float32 (short sequence);
5. the whole `paper` forward (4 layers, seq 10000) on this one device through jaxpart's engine,
   as the planner places it on one device: layer-wise token chunks sized to the L2, and
   whole-sequence microbatches. Batch 32 of the seed's 128 to stay within the time budget (the
   work is 4x smaller; per-token figures are unchanged). tokens/s and model FLOPs / time / the
   measured matmul peak.

Writes $OUT/gpu_check.json (OUT defaults to ./out) after every section, and prints the tables
last. Exit status 1 if a section failed (the others still run and are written).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import statistics
import sys
import time
import traceback
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jaxpart import config
from jaxpart.models import attention
from jaxpart.runtime import engine
from jaxpart.measure import compiled as measure
from jaxpart.placement import memory
from jaxpart.models import dense as model
from jaxpart.placement import planner
from jaxpart.runtime import sharding
from jaxpart.placement.plan import Plan

FULL = dict(preset="paper", tp=4, rows=1, prefix=4096, matmul_n=8192, copy_bytes=2 << 30,
            chunks=[16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192], kv_blocks=["plan", 512],
            whole_seq=8192, bf16_seq=256, budget_s=150.0, target_s=0.25,
            fwd_preset="paper", fwd_hardware="h200", fwd_batch=32)
TINY = dict(preset="tiny", tp=4, rows=1, prefix=64, matmul_n=256, copy_bytes=4 << 20,
            chunks=[16, 64], kv_blocks=["plan", 32], whole_seq=128, bf16_seq=32,
            budget_s=120.0, target_s=0.02, fwd_preset="tiny", fwd_hardware="cpu", fwd_batch=2)
# bf16 keeps 8 significant bits (rounding error <= 2^-9 relative). One layer rounds its
# activations about ten times (LayerNorm outputs, Q/K/V, probabilities, attention output, the
# two partial sums, the residuals), so the output may differ from float32 by a few 2^-8 of its
# scale; 2^-4 of the largest output magnitude flags a real defect, not rounding.
BF16_TOL = 2.0 ** -4


def _timeit(fn, target_s: float, groups: int = 3) -> float:
  """Seconds per call: calls are issued back to back (async dispatch) and synchronised at the
  end of a group; the median over groups. The group size aims at target_s per group."""
  jax.block_until_ready(fn())
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  one = max(time.perf_counter() - t0, 1e-6)
  n = int(min(200, max(2, target_s / one)))
  per = []
  for _ in range(groups):
    t0 = time.perf_counter()
    out = None
    for _ in range(n):
      out = fn()
    jax.block_until_ready(out)
    per.append((time.perf_counter() - t0) / n)
  return statistics.median(per)


# --- 1. ceilings ---------------------------------------------------------------------------

def ceilings(sz) -> dict:
  n = sz["matmul_n"]
  ka, kb = jax.random.split(jax.random.key(1))
  a = jax.random.normal(ka, (n, n), jnp.bfloat16)
  b = jax.random.normal(kb, (n, n), jnp.bfloat16)
  mm = jax.jit(lambda a, b: a @ b)
  t_mm = _timeit(lambda: mm(a, b), sz["target_s"] * 2)
  elems = sz["copy_bytes"] // 2
  x = jnp.ones((elems,), jnp.bfloat16)
  cp = jax.jit(lambda x: x + 1)   # reads and writes every byte once
  t_cp = _timeit(lambda: cp(x), sz["target_s"] * 2)
  out = {"matmul_n": n, "matmul_s": t_mm, "matmul_tflops": 2 * n ** 3 / t_mm / 1e12,
         "copy_bytes": sz["copy_bytes"], "copy_s": t_cp,
         "copy_gbps": 2 * sz["copy_bytes"] / t_cp / 1e9, "copy_note": "read + written, on device"}
  devs = jax.devices()
  if len(devs) > 1:
    t_d2d = _timeit(lambda: jax.device_put(x, devs[1]), sz["target_s"] * 2)
    out.update(d2d_s=t_d2d, d2d_gbps=sz["copy_bytes"] / t_d2d / 1e9)
  else:
    out["d2d_note"] = "one device: no peer to copy to"
  del a, b, x
  return out


# --- 2. the layer-wise stage step across chunk sizes ---------------------------------------

def layer_cfg(sz) -> config.ModelConfig:
  return dataclasses.replace(config.MODEL_PRESETS[sz["preset"]], layers=1)


def step_plan(cfg, sz, chunk: int, kv, prefix: int) -> Plan:
  """A one-stage Plan whose shapes are one tp shard of one layer: stage_step reads rows,
  chunk_tokens, kv_block and cache_len (prefix + chunk, rounded up) from it."""
  kv_block = planner.default_kv_block(chunk) if kv == "plan" else min(int(kv), chunk + prefix)
  return Plan(strategy="layerwise", devices=sz["tp"], stages=1, tp=sz["tp"],
              stage_layers=((0,),), batch=sz["rows"], seq=prefix + chunk, microbatches=1,
              chunk_tokens=chunk, kv_block=kv_block)


def local_params(cfg, plan, key):
  """Random weights in the local shard shapes (LayerNorm scale 1, bias 0), on the device."""
  shapes = measure.stage_step_args(cfg, plan)[0]   # one device's shards
  leaves, tree = jax.tree.flatten_with_path(shapes)
  keys = jax.random.split(key, len(leaves))
  out = []
  for (path, s), k in zip(leaves, keys):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      out.append(jnp.ones(s.shape, s.dtype))
    elif "bias" in name:
      out.append(jnp.zeros(s.shape, s.dtype))
    else:
      out.append((jax.random.normal(k, s.shape, jnp.float32) * s.shape[-2] ** -0.5).astype(s.dtype))
  return jax.tree.unflatten(tree, out)


def step_figures(cfg, plan, q_start: int, seconds: float, peak_tflops: float,
                 copy_gbps: float) -> dict:
  """Useful FLOPs (causal attention counted once) and HBM bytes of one step."""
  r, c = plan.rows, plan.chunk_tokens
  heads = cfg.n_heads // plan.tp
  a_local = heads * cfg.head_dim
  b = cfg.dtype_bytes
  weight_bytes = (cfg.projection_params_per_layer // plan.tp + cfg.layernorm_params_per_layer) * b
  proj = 2 * r * c * (cfg.projection_params_per_layer // plan.tp)
  attn = 4 * r * a_local * (c * q_start + c * (c + 1) // 2)
  last_q = q_start + c - 1
  visited = min(plan.cache_len // plan.kv_block, last_q // plan.kv_block + 1) * plan.kv_block
  hbm = (weight_bytes + 2 * r * c * cfg.d_model * b             # weights, unit in and out
         + 2 * r * visited * a_local * b + 2 * r * c * a_local * b)  # K,V read; new K,V written
  flops = proj + attn
  return {"chunk": c, "rows": r, "kv_block": plan.kv_block, "q_start": q_start,
          "cache_len": plan.cache_len, "ms": seconds * 1e3, "tokens_per_s": r * c / seconds,
          "useful_flops": flops, "tflops": flops / seconds / 1e12,
          "frac_of_matmul_peak": flops / seconds / 1e12 / peak_tflops,
          "hbm_bytes": hbm, "weight_bytes": weight_bytes, "flop_per_byte": flops / hbm,
          "hbm_gbps": hbm / seconds / 1e9, "frac_of_copy_bw": hbm / seconds / 1e9 / copy_gbps}


def stage_sweep(sz, ceil, deadline: float, log) -> list[dict]:
  cfg = layer_cfg(sz)
  key = jax.random.key(2)
  params = None
  rows = []
  for kv in sz["kv_blocks"]:
    for chunk in sz["chunks"]:
      if time.perf_counter() > deadline:
        rows.append({"chunk": chunk, "kv_block": kv, "skipped": "time budget spent"})
        continue
      plan = step_plan(cfg, sz, chunk, kv, sz["prefix"])
      if params is None:
        params = local_params(cfg, plan, key)
      step = measure.jit_stage_step(cfg, plan)
      dt = jnp.dtype(cfg.dtype)
      cache_shape = (1, plan.rows, plan.cache_len, cfg.n_heads // plan.tp, cfg.head_dim)
      state = {"k": jnp.zeros(cache_shape, dt), "v": jnp.zeros(cache_shape, dt)}
      x = jax.random.normal(jax.random.key(chunk), (plan.rows, chunk, cfg.d_model), dt)
      q = jnp.int32(sz["prefix"])

      def call():
        y, state["k"], state["v"] = step(params, x, state["k"], state["v"], q)
        return y

      t0 = time.perf_counter()
      with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Dd]onat.*")
        seconds = _timeit(call, sz["target_s"])
      row = step_figures(cfg, plan, sz["prefix"], seconds, ceil["matmul_tflops"],
                         ceil["copy_gbps"])
      row["wall_s_incl_compile"] = time.perf_counter() - t0
      rows.append(row)
      log(f"  step chunk {chunk:5d} kv {plan.kv_block:4d}: {row['ms']:9.3f} ms "
          f"{row['tflops']:7.2f} TFLOP/s {row['hbm_gbps']:8.1f} GB/s")
      del state, x
  return rows


# --- 3. the whole sequence at once ---------------------------------------------------------

def unchunked(sz, ceil, log) -> list[dict]:
  cfg = layer_cfg(sz)
  s = sz["whole_seq"]
  dt = jnp.dtype(cfg.dtype)
  out = []
  x = jax.random.normal(jax.random.key(3), (sz["rows"], s, cfg.d_model), dt)
  outputs = {}
  for kv in sz["kv_blocks"]:
    plan = step_plan(cfg, sz, s, kv, 0)
    params = local_params(cfg, plan, jax.random.key(2))
    step = measure.jit_stage_step(cfg, plan, donate_caches=False)
    cache = jnp.zeros((1, plan.rows, plan.cache_len, cfg.n_heads // plan.tp, cfg.head_dim), dt)
    call = lambda: step(params, x, cache, cache, jnp.int32(0))[0]  # noqa: E731
    seconds = _timeit(call, sz["target_s"])
    row = step_figures(cfg, plan, 0, seconds, ceil["matmul_tflops"], ceil["copy_gbps"])
    row["program"] = "blocked (engine step)"
    outputs[f"blocked kv {plan.kv_block}"] = np.asarray(call(), np.float32)
    out.append(row)
    log(f"  whole seq {s} blocked kv {plan.kv_block}: {row['ms']:.3f} ms "
        f"{row['tflops']:.2f} TFLOP/s")

  p1 = model.layer_slice(params, 0)
  full = jax.jit(lambda p, x: model.block_apply(
      p, x, cfg.head_dim, cfg.ln_eps, lambda q, k, v, st: (attention.full_causal(q, k, v), st))[0])
  seconds = _timeit(lambda: full(p1, x), sz["target_s"])
  row = step_figures(cfg, plan, 0, seconds, ceil["matmul_tflops"], ceil["copy_gbps"])
  row.update(program="full causal (reference)",
             kv_block=None, scores_bytes=sz["rows"] * (cfg.n_heads // sz["tp"]) * s * s * 4)
  ref = np.asarray(full(p1, x), np.float32)
  for r in out:
    name = f"blocked kv {r['kv_block']}"
    r["max_abs_diff_vs_full"] = float(np.max(np.abs(outputs[name] - ref)))
  out.append(row)
  log(f"  whole seq {s} full attention: {row['ms']:.3f} ms {row['tflops']:.2f} TFLOP/s")
  return out


# --- 4. bf16 against float32 ---------------------------------------------------------------

def bf16_check(sz, log) -> dict:
  cfg = layer_cfg(sz)
  params = jax.jit(lambda k: model.init_params(cfg, k))(jax.random.key(4))
  x = model.random_input(cfg, 1, sz["bf16_seq"], jax.random.key(5))
  fwd = jax.jit(functools.partial(model.forward, cfg=cfg))
  y16 = np.asarray(fwd(params, x), np.float32)
  y32 = np.asarray(fwd(model.cast_params(params, jnp.float32), x.astype(jnp.float32)), np.float32)
  diff = np.abs(y16 - y32)
  scale = float(np.max(np.abs(y32)))
  rel = float(np.max(diff)) / scale
  out = {"d_model": cfg.d_model, "layers": 1, "seq": sz["bf16_seq"],
         "max_abs_err": float(diff.max()),
         "max_abs_y32": scale, "max_err_over_max_y": rel,
         "rms_err_over_rms_y": float(np.sqrt(np.mean(diff ** 2) / np.mean(y32 ** 2))),
         "finite": bool(np.isfinite(y16).all() and np.isfinite(y32).all()),
         "tolerance_max_err_over_max_y": BF16_TOL}
  out["ok"] = out["finite"] and rel <= BF16_TOL
  log(f"  bf16 vs f32: max |err| {out['max_abs_err']:.4g} ({rel:.3g} of max |y|), ok={out['ok']}")
  return out


# --- 5. the whole paper forward on one device ---------------------------------------------

def paper_forward(sz, ceil, log) -> list[dict]:
  """Both one-device plans of the planner, parameters and input made on the device (nothing
  the size of the model crosses from the host), one warm call then two timed ones."""
  base = config.load_setup(sz["fwd_preset"], hardware=sz["fwd_hardware"])
  setup = dataclasses.replace(base, run=config.RunShape(sz["fwd_batch"], base.run.seq))
  cfg, run = setup.model, setup.run
  out = []
  for strategy, kw in (("layerwise", {}), ("baseline", {"tp": 1, "pp": 1})):
    plan = planner.make_plan(setup, 1, strategy, **kw)
    mesh = sharding.mesh_for(plan)
    params = jax.jit(lambda k: model.init_params(cfg, k),
                     out_shardings=sharding.param_shardings(mesh))(jax.random.key(6))
    x = jax.jit(lambda k: model.random_input(cfg, run.batch, run.seq, k),
                out_shardings=sharding.stream(mesh))(jax.random.key(7))
    fwd = engine.jit_forward(plan, cfg, mesh, differentiable=False).lower(params, x).compile()
    jax.block_until_ready(fwd(params, x))
    times = []
    for _ in range(2):
      t0 = time.perf_counter()
      jax.block_until_ready(fwd(params, x))
      times.append(time.perf_counter() - t0)
    t = min(times)
    flops = memory.forward_flops_per_token(cfg, run.seq) * run.tokens
    row = {"strategy": strategy, "split": plan.split, "batch": run.batch, "seq": run.seq,
           "seconds": t, "tokens_per_s": run.tokens / t, "model_tflops": flops / t / 1e12,
           "frac_of_matmul_peak": flops / t / 1e12 / ceil["matmul_tflops"],
           "predicted_hbm_bytes": memory.predicted_hbm_bytes(cfg, run, plan)}
    out.append(row)
    log(f"  {strategy} ({plan.split}): {t:.2f} s, {row['tokens_per_s']:,.0f} tokens/s, "
        f"{100 * row['frac_of_matmul_peak']:.0f}% of the matmul peak")
    del params, x, fwd
  return out


# --- report --------------------------------------------------------------------------------

def _table(rows, header):
  cells = [header] + [[str(c) for c in r] for r in rows]
  w = [max(len(r[i]) for r in cells) for i in range(len(header))]
  lines = ["  ".join(c.rjust(w[i]) for i, c in enumerate(r)) for r in cells]
  lines.insert(1, "  ".join("-" * x for x in w))
  return "\n".join(lines)


def print_tables(report) -> None:
  c = report.get("ceilings") or {}
  print()
  print(f"== jaxpart gpu_check  {report['date']}  {report['device']}  jax {report['jax']}")
  if c:
    print(f"ceilings: bf16 {c['matmul_n']}^3 matmul {c['matmul_tflops']:.4g} TFLOP/s; on-device "
          f"copy {c['copy_gbps']:.4g} GB/s (read + written)"
          + (f"; device-to-device {c['d2d_gbps']:.0f} GB/s" if "d2d_gbps" in c else ""))
  steps = [r for r in report.get("stage_steps") or [] if "ms" in r]
  if steps:
    s0 = report["sizes"]
    print(f"stage step: {s0['preset']} width, tp {s0['tp']} shard of one layer, {s0['rows']} row, "
          f"chunk after {s0['prefix']} cached tokens")
    print(_table([[r["chunk"], r["kv_block"], f"{r['ms']:.3f}", f"{r['tokens_per_s']:,.0f}",
                   f"{r['tflops']:.3g}", f"{100 * r['frac_of_matmul_peak']:.0f}%",
                   f"{r['flop_per_byte']:.0f}", f"{r['hbm_gbps']:.4g}",
                   f"{100 * r['frac_of_copy_bw']:.0f}%"] for r in steps],
                 ["chunk", "kv", "ms", "tokens/s", "TFLOP/s", "of peak", "FLOP/B", "HBM GB/s",
                  "of copy"]))
  skipped = [r for r in report.get("stage_steps") or [] if "skipped" in r]
  if skipped:
    print(f"skipped {len(skipped)} step points: time budget spent")
  whole = report.get("unchunked") or []
  if whole:
    print(f"whole sequence of {report['sizes']['whole_seq']} tokens at once:")
    print(_table([[r["program"], r["kv_block"] or "-", f"{r['ms']:.3f}",
                   f"{r['tokens_per_s']:,.0f}",
                   f"{r['tflops']:.3g}", f"{100 * r['frac_of_matmul_peak']:.0f}%",
                   f"{r.get('max_abs_diff_vs_full', 0):.3g}"] for r in whole],
                 ["program", "kv", "ms", "tokens/s", "TFLOP/s", "of peak", "|diff| vs full"]))
  b = report.get("bf16_check")
  if b:
    print(f"bf16 vs float32, 1 layer d_model {b['d_model']}, {b['seq']} tokens: max |err| "
          f"{b['max_abs_err']:.4g} = {b['max_err_over_max_y']:.3g} of max |y| (tolerance "
          f"{b['tolerance_max_err_over_max_y']:.3g}); rms {b['rms_err_over_rms_y']:.3g}; "
          f"{'OK' if b['ok'] else 'FAILED'}")
  fwd = report.get("paper_forward") or []
  if fwd:
    f0 = fwd[0]
    print(f"whole {report['sizes']['fwd_preset']} forward on one device, batch {f0['batch']} x "
          f"seq {f0['seq']} (model FLOPs / time / measured matmul peak):")
    print(_table([[r["strategy"], r["split"], f"{r['seconds']:.3f}", f"{r['tokens_per_s']:,.0f}",
                   f"{r['model_tflops']:.3g}", f"{100 * r['frac_of_matmul_peak']:.0f}%"]
                  for r in fwd], ["placement", "split", "s", "tokens/s", "TFLOP/s", "of peak"]))
  for name, err in (report.get("errors") or {}).items():
    print(f"section {name} FAILED: {err.splitlines()[-1]}")
  print(f"total {report['total_s']:.1f} s")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--tiny", action="store_true", help="tiny sizes (CPU, seconds)")
  ap.add_argument("--budget-s", type=float, default=None,
                  help="stop starting stage-step points after this many seconds")
  args = ap.parse_args(argv)
  sz = dict(TINY if args.tiny else FULL)
  if args.budget_s is not None:
    sz["budget_s"] = args.budget_s
  out_dir = os.environ.get("OUT") or "./out"
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, "gpu_check.json")
  t_start = time.perf_counter()
  dev = jax.devices()[0]
  report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": f"{len(jax.devices())} x {dev.device_kind} ({dev.platform})",
            "jax": jax.__version__, "python": sys.version.split()[0], "sizes": sz, "errors": {}}
  log = lambda m: print(m, flush=True)  # noqa: E731

  def section(name, fn):
    log(f"[{time.perf_counter() - t_start:6.1f} s] {name}")
    try:
      report[name] = fn()
    except Exception:  # noqa: BLE001  (one broken section must not lose the others)
      report["errors"][name] = traceback.format_exc()
      log(report["errors"][name])
    report["total_s"] = time.perf_counter() - t_start
    with open(path, "w") as f:
      json.dump(report, f, indent=1, default=float)

  section("ceilings", lambda: ceilings(sz))
  ceil = report.get("ceilings") or {"matmul_tflops": math.nan, "copy_gbps": math.nan}
  deadline = t_start + sz["budget_s"]
  section("stage_steps", lambda: stage_sweep(sz, ceil, deadline, log))
  section("unchunked", lambda: unchunked(sz, ceil, log))
  section("bf16_check", lambda: bf16_check(sz, log))
  section("paper_forward", lambda: paper_forward(sz, ceil, log))
  print_tables(report)
  print(f"wrote {path}")
  return 1 if report["errors"] or not (report.get("bf16_check") or {}).get("ok") else 0


if __name__ == "__main__":
  raise SystemExit(main())
