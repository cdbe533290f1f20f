"""Benchmarks: the engine against the single-device reference, plain GSPMD and its own stage
steps run back to back on one device, timed interleaved, with each program's compile statistics
beside its time."""

from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from jaxpart.runtime import compat
from jaxpart.cost import counts
from jaxpart.runtime import engine
from jaxpart.runtime import streams
from jaxpart.models import families
from jaxpart.models.spec import kv_heads_local
from jaxpart.measure import compiled as measure
from jaxpart.measure import load
from jaxpart.measure import tracing
from jaxpart.placement import memory
from jaxpart.models import dense as model
from jaxpart.runtime import runs
from jaxpart.runtime import sharding
from jaxpart.placement.plan import TENSOR_AXIS, PlanError


# --- timing --------------------------------------------------------------------------------

def time_interleaved(fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                     progress: Callable[[int], Any] | None = None) -> dict[str, dict[str, Any]]:
  """Median wall time of each zero-argument fn, run A, B, C, A, B, C, ... so that load changes
  on a shared machine hit every candidate alike; each run waits for its results on the device
  (block_until_ready). The order rotates every round so no fn always follows the same one.

  Also the process's CPU time per run (all threads): on a CPU host shared with other jobs it
  moves less with their load than wall time does, and for simulated devices it is the total
  work. `progress(n)` is called after each run (e.g. a tqdm bar's update)."""
  if repeats < 1 or warmup < 0:
    raise ValueError(f"repeats = {repeats}, warmup = {warmup}: need repeats >= 1, warmup >= 0")
  names = list(fns)
  for _ in range(warmup):
    for n in names:
      jax.block_until_ready(fns[n]())
      if progress:
        progress(1)
  runs: dict[str, list[float]] = {n: [] for n in names}
  cpu: dict[str, list[float]] = {n: [] for n in names}
  for r in range(repeats):
    order = names[r % len(names):] + names[:r % len(names)]
    for n in order:
      c0, t0 = time.process_time(), time.perf_counter()
      jax.block_until_ready(fns[n]())
      runs[n].append(time.perf_counter() - t0)
      cpu[n].append(time.process_time() - c0)
      if progress:
        progress(1)
  return {n: {"median_s": statistics.median(runs[n]), "runs": runs[n],
              "cpu_median_s": statistics.median(cpu[n]), "cpu_runs": cpu[n]} for n in names}


# --- the engine against the reference and plain GSPMD --------------------------------------

@dataclass
class Variant:
  """One program to time: a jitted fn, its (placed) arguments and how to read its HLO.

  call, when set, is what is timed instead of one call of the compiled fn: it calls the
  compiled fn (`v.stats["compiled"]`) `steps` times, and its result is not the model's output
  (compares False)."""

  name: str
  devices: int
  fn: Callable
  args: tuple
  cond_weight: float | Sequence[float] = 1.0
  stats: dict | None = None
  out: Any = None
  call: Callable[[], Any] | None = None
  steps: int = 1
  compares: bool = True


def model_flops(cfg, batch: int, seq: int) -> float:
  """Useful forward FLOPs of the whole batch: the same for every placement, so achieved
  FLOP/s compare like for like (causal attention counted once, not the masked half)."""
  return memory.forward_flops_per_token(cfg, seq) * batch * seq


def build_variants(setup, plan, params, x_BxTxD, *, reference: "bool | Variant" = True,
                   gspmd: bool = True, own_steps: bool = False) -> list[Variant]:
  """The engine for `plan`, the single-device reference, plain jax.jit with GSPMD tensor
  parallel annotations over the same devices (what a user writes without jaxpart), and with
  own_steps the engine's stage steps back to back on one device (own_steps_variant).

  reference may be a Variant built earlier (a sweep compiles the reference once)."""
  cfg = setup.model
  devices = jax.devices()
  if families.of(cfg).tokens_in and (gspmd or own_steps):
    raise PlanError(f"the GSPMD and own-steps comparisons are built for the dense family, not "
                    f"arch {cfg.arch!r}: pass --no-gspmd --no-own-steps")
  mesh = sharding.mesh_for(plan)
  placed = sharding.place_params(params, mesh, cfg)
  out = [Variant(f"engine:{plan.strategy}", plan.devices,
                 engine.jit_forward(plan, cfg, mesh, differentiable=False),
                 (placed, jax.device_put(x_BxTxD, sharding.input_sharding(mesh, cfg))),
                 counts.hlo_cond_weights(plan))]
  if own_steps:
    out.append(own_steps_variant(cfg, plan, placed, mesh, x_BxTxD))
  fwd = jax.jit(runs.reference_forward(cfg))
  if isinstance(reference, Variant):
    out.append(reference)
  elif reference:
    out.append(Variant("reference", 1, fwd, jax.device_put((params, x_BxTxD), jax.local_devices()[0])))
  if gspmd:
    n = plan.devices
    for what, size in (("n_heads x head_dim", cfg.attn_dim), ("d_ff", cfg.d_ff)):
      if size % n:
        raise PlanError(f"GSPMD baseline: {what} = {size} is not divisible by devices = {n}; "
                        f"pass --no-gspmd or a device count dividing {size}")
    mesh1 = compat.make_mesh(devices[:n], (n,), (TENSOR_AXIS,))
    shard = jax.tree.map(lambda s: NamedSharding(mesh1, s), sharding.gspmd_tp_specs(),
                         is_leaf=lambda s: isinstance(s, PartitionSpec))
    out.append(Variant("gspmd-tp", n, fwd,
                       (jax.device_put(params, shard),
                        jax.device_put(x_BxTxD, NamedSharding(mesh1, sharding.SPECS.replicated)))))
  return out


def bench_variants(setup, variants: Sequence[Variant], repeats: int, warmup: int,
                   progress=None) -> list[dict[str, Any]]:
  """Compile each variant once, then time them interleaved; figures per variant.

  time_per_token_s is the seed's "TPOT": 1 / (tokens/s of the aggregate), not a decode
  latency. latency_s is one call's wall time: every sequence of the batch is returned when
  the call returns, so it is also each sequence's latency.
  """
  cfg, run = setup.model, setup.run
  for v in variants:
    if v.stats is None:
      with warnings.catch_warnings():   # own-steps donates its caches; lowering only warns
        warnings.filterwarnings("ignore", message=".*[Dd]onat.*")
        v.stats = measure.compile_stats(v.fn, *v.args, cond_weight=v.cond_weight)
      if progress:
        progress(1)
  fns = {v.name: v.call or (lambda v=v: v.stats["compiled"](*v.args)) for v in variants}
  times = time_interleaved(fns, repeats, warmup, progress)
  ref_out = None
  for v in variants:
    v.out = np.asarray(runs.fetch(fns[v.name]()), np.float32) if v.compares else None
    if v.name == "reference":
      ref_out = v.out
  tokens = run.batch * run.seq
  useful = model_flops(cfg, run.batch, run.seq)
  rows = []
  for v in variants:
    t = times[v.name]["median_s"]
    err = None if ref_out is None or v.out is None else float(np.max(np.abs(v.out - ref_out)))
    rows.append({
        "name": v.name, "devices": v.devices, "median_s": t, "runs_s": times[v.name]["runs"],
        "cpu_median_s": times[v.name]["cpu_median_s"], "cpu_runs_s": times[v.name]["cpu_runs"],
        "tokens_per_s": tokens / t, "time_per_token_s": t / tokens, "latency_s": t,
        "argument_bytes": v.stats["argument_bytes"], "output_bytes": v.stats["output_bytes"],
        "temp_bytes": v.stats["temp_bytes"],
        "compiled_flops_per_device": v.stats["flops"] * v.steps,
        "xla_cost_flops": v.stats["xla_cost_flops"] * v.steps, "model_flops": useful,
        "achieved_flops_per_s": useful / t,
        "compiled_flops_per_s": v.stats["flops"] * v.steps * v.devices / t, "steps": v.steps,
        "collective_bytes": v.stats["collective_bytes"], "compile_s": v.stats["compile_s"],
        "max_abs_err_vs_reference": err,
    })
  return rows


def ratios(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """Ratios of the engine's median time to the others' (below 1: the engine is faster): wall
  time, and process CPU time (all threads) as "(cpu)"."""
  eng = next((r["name"] for r in rows if r["name"].startswith("engine:")), None)
  pairs = [("engine/reference", eng, "reference"), ("engine/own-steps", eng, OWN_STEPS),
           ("engine/gspmd", eng, "gspmd-tp"), ("gspmd/reference", "gspmd-tp", "reference"),
           ("own-steps/reference", OWN_STEPS, "reference")]
  out = {}
  for key in ("median_s", "cpu_median_s"):
    by = {r["name"]: r[key] for r in rows}
    for label, a, b in pairs:
      if a in by and b in by and by[b] > 0:
        out[label + (" (cpu)" if key == "cpu_median_s" else "")] = by[a] / by[b]
  return out


# --- one benchmark point: typed options in, a record and the timed programs out -----------

@dataclass(frozen=True)
class BenchOptions:
  """What bench_point times and how (`jaxpart bench` builds one from its flags)."""

  repeats: int = 5                 # timed runs per program (median)
  warmup: int = 1                  # untimed runs per program first
  seed: int = 0                    # parameter and input key
  reference: bool = True           # the single-device reference
  gspmd: bool = True               # plain jax.jit with GSPMD annotations (when devices > 1)
  own_steps: bool = True           # the engine's stage steps back to back on one device
  trace: str | None = None         # a jax.profiler trace directory


@dataclass(frozen=True)
class BenchPoint:
  """One timed point: `record` is what `jaxpart bench --json` writes; `variants` are the
  programs timed, outputs included (to check them, or to reuse the compiled reference)."""

  record: dict[str, Any]
  variants: list[Variant]

  @property
  def reference(self) -> Variant | None:
    return next((v for v in self.variants if v.name == "reference"), None)


def inputs(setup, seed: int):
  """Random parameters and a random B x T x D input for the setup, from one key."""
  kp, kx = jax.random.split(jax.random.key(seed))
  return (model.init_params(setup.model, kp),
          model.random_input(setup.model, setup.run.batch, setup.run.seq, kx))


def bench_point(setup, plan, options: BenchOptions, params_x=None,
                reference: Variant | None = None) -> BenchPoint:
  """Build, compile and time the programs for `plan`. reference: a Variant compiled by an
  earlier point, reused (sweeps compile the reference once)."""
  params, x = params_x or inputs(setup, options.seed)
  variants = build_variants(
      setup, plan, params, x, reference=reference or options.reference,
      gspmd=options.gspmd and plan.devices > 1,
      own_steps=options.own_steps and jax.process_count() == 1)
  total = (sum(v.stats is None for v in variants)
           + len(variants) * (options.warmup + options.repeats))
  before = load.start(f"bench {plan.strategy} on {plan.devices} devices:")
  with tqdm(total=total, desc=f"bench {plan.strategy} {plan.devices} dev", unit="step",
            file=sys.stderr, leave=False) as bar, tracing.maybe_trace(options.trace):
    rows = bench_variants(setup, variants, options.repeats, options.warmup, bar.update)
  record = {"preset": setup.preset, "model": dataclasses.asdict(setup.model),
            "run": dataclasses.asdict(setup.run), "plan": plan.to_dict(),
            "machine_note": machine_note(), "load": load.finish(before),
            "repeats": options.repeats, "warmup": options.warmup,
            "variants": rows, "ratios": ratios(rows),
            "megatron": measure.megatron_comparison(variants[0].stats["hlo"], plan, setup.model)}
  return BenchPoint(record, variants)


def machine_note() -> str:
  """What the times were measured on: on CPU, how many simulated devices share how many cores."""
  d = jax.devices()
  if d[0].platform == "cpu":
    averages = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return (f"CPU, {len(d)} simulated devices on {os.cpu_count()} cores (load average "
            f"{averages} at the end): wall times measure total work and overhead, not parallel "
            f"speed-up")
  return f"{len(d)} x {d[0].device_kind}"


# --- the engine's own stage steps, without the pipeline -------------------------------------

OWN_STEPS = "own-steps"


def _shards_on_one_device(tree, mesh) -> dict[tuple[int, int], Any]:
  """Each (stage, tensor) device's shard of every leaf, copied to the first local device."""
  coords = {d: idx for idx, d in np.ndenumerate(mesh.devices)}
  dev0 = jax.local_devices()[0]
  leaves, treedef = jax.tree.flatten(tree)
  per = {c: [None] * len(leaves) for c in coords.values()}
  for i, leaf in enumerate(leaves):
    for sh in leaf.addressable_shards:
      per[coords[sh.device]][i] = jax.device_put(sh.data, dev0)
  return {c: jax.tree.unflatten(treedef, ls) for c, ls in per.items()}


def own_steps_variant(cfg, plan, placed_params, mesh, x_BxTxD) -> Variant:
  """The engine's own work without the pipeline: engine.stage_step, jitted on one device at the
  engine's local shapes (rows x chunk tokens, the stage's layers, a 1/tp weight shard, the
  shard's K/V cache), called for every unit of every stage and every tensor shard in the
  order the engine runs them (units x stages x tp steps: every device's steps, so the same
  total work as the engine's busy ticks), back to back. Absent: the tensor-parallel psums, the
  pipeline's sends, the input gather and output scatter, the scan over ticks and its bubbles.

  So engine / own-steps is what the pipeline itself costs, and own-steps / reference what
  cutting the matmuls into small chunks and 1/tp shards costs. On the CPU simulation compare
  their CPU times ("(cpu)" ratios): the engine's devices are threads sharing the cores."""
  p_stage, _ = families.of(cfg).split(placed_params)
  shards = _shards_on_one_device(p_stage, mesh)
  dev0 = jax.local_devices()[0]
  dt = jax.tree.leaves(p_stage)[0].dtype
  x = np.asarray(x_BxTxD)
  x = np.pad(x, ((0, 0), (0, plan.padded_seq - plan.seq), (0, 0)), mode="edge")
  origins = [((u // plan.n_chunks) * plan.rows, (u % plan.n_chunks) * plan.chunk_tokens)
             for u in range(plan.units)]
  units = [jax.device_put(x[r:r + plan.rows, t:t + plan.chunk_tokens].astype(dt), dev0)
           for r, t in origins]
  q_starts = [jax.device_put(np.int32(t), dev0) for _, t in origins]
  cache_shape = (plan.layers_per_stage, plan.rows, plan.cache_len,
                 kv_heads_local(cfg, plan.tp), cfg.head_dim)

  def zeros():   # the caches as the forward-only engine keeps them (bit patterns for bf16)
    return streams.narrow_as_bits(jnp.zeros(cache_shape, dt, device=dev0))

  variant = Variant(OWN_STEPS, 1, measure.jit_stage_step(cfg, plan),
                    (shards[0, 0], units[0], zeros(), zeros(), q_starts[0]),
                    steps=plan.units * plan.stages * plan.tp, compares=False)

  def run():
    step = variant.stats["compiled"]
    caches = {c: [zeros(), zeros()] for c in shards}   # donated: two buffers each
    ys = []
    for u in range(plan.units):
      for t in range(plan.tp):
        y = units[u]
        for s in range(plan.stages):
          y, *caches[s, t] = step(shards[s, t], y, *caches[s, t], q_starts[u])
        ys.append(y)
    return ys

  variant.call = run
  return variant
