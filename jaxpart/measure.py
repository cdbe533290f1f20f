"""Measurements read from compiled programs: memory, FLOPs and collective bytes, and timing.

Everything here reads what XLA actually built (the compiled HLO text and its memory analysis),
so the figures hold on any backend; only `time_interleaved` depends on the machine.

Two facts about compiled HLO shape the code:
- XLA's own `cost_analysis()` counts a while loop's body once, whatever its trip count (a
  10-step scan of a matmul reports the FLOPs of one matmul; tests/test_measure.py shows it).
  Here every op is multiplied by the trip count of each loop around it.
- A `lax.cond` branch runs at most once per call of the conditional. By default both of a
  conditional's branches are counted as if taken on every call (`cond_weight=1.0`, an upper
  bound). The pipeline engine's collectives sit in the branch that runs only on a stage's valid
  ticks (units out of ticks); `engine_cond_weights(plan)` gives the weights that turn the upper
  bound into the count actually executed.

On CPU, XLA promotes bf16 all-reduces and collective-permutes to float32 before the collective
(its AllReducePromotion pass), so a bf16 program moves 4-byte elements there; these functions
report the bytes of the compiled program as built, and the formulas take the element size.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import jax

from jaxpart import costmodel

COLLECTIVE_KINDS = ("all-reduce", "collective-permute", "all-gather", "reduce-scatter",
                    "all-to-all")
# Opcode as printed -> kind. The -start halves of async pairs carry the operands; -done do not.
_COLLECTIVE_OPCODES = {
    "all-reduce": "all-reduce", "all-reduce-start": "all-reduce",
    "collective-permute": "collective-permute", "collective-permute-start": "collective-permute",
    "all-gather": "all-gather", "all-gather-start": "all-gather",
    "reduce-scatter": "reduce-scatter", "all-to-all": "all-to-all",
    "ragged-all-to-all": "all-to-all",
}
_ELEMENT_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4,
    "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16,
    "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "f8e4m3b11fnuz": 1,
    "f8e3m4": 1, "f8e8m0fnu": 1, "f4e2m1fn": 0.5, "token": 0, "tuple": 0,
}
_ARRAY_RE = re.compile(r"\b([a-z][a-z0-9]*)\[([^\]]*)\]")
_HEADER_RE = re.compile(r"^\s*(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTR_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")


# --- HLO text parsing ----------------------------------------------------------------------

def _arrays(type_str: str) -> list[tuple[str, tuple[int, ...]]]:
  """(element type, dims) of every array in a shape string, tuples flattened."""
  out = []
  for etype, dims in _ARRAY_RE.findall(type_str):
    if etype not in _ELEMENT_BYTES:
      continue
    shape = tuple(int(d.strip().lstrip("<=")) for d in dims.split(",") if d.strip())
    out.append((etype, shape))
  return out


def shape_bytes(type_str: str) -> float:
  """Bytes of an HLO shape string such as `f32[2,100,128]{2,1,0}` or a tuple of them."""
  return float(sum(_ELEMENT_BYTES[e] * math.prod(s) for e, s in _arrays(type_str)))


def _balanced(text: str, start: int) -> int:
  """Index just past the bracket group opening at text[start]."""
  pairs = {"(": ")", "{": "}", "[": "]"}
  stack = []
  for i in range(start, len(text)):
    c = text[i]
    if c in pairs:
      stack.append(pairs[c])
    elif stack and c == stack[-1]:
      stack.pop()
      if not stack:
        return i + 1
  return len(text)


def _split_top(text: str) -> list[str]:
  parts, depth, cur = [], 0, []
  for c in text:
    if c in "([{":
      depth += 1
    elif c in ")]}":
      depth -= 1
    if c == "," and depth == 0:
      parts.append("".join(cur).strip())
      cur = []
    else:
      cur.append(c)
  if "".join(cur).strip():
    parts.append("".join(cur).strip())
  return parts


@dataclass(frozen=True)
class Instr:
  name: str
  type_str: str
  opcode: str
  operands: tuple[str, ...]     # operand texts: `%name`, or `type %name` in some printers
  attrs: str


def _parse_instr(line: str) -> Instr | None:
  m = _INSTR_RE.match(line)
  if not m:
    return None
  name, rest = m.group(1), m.group(2)
  rest = re.sub(r"/\*.*?\*/", "", rest)
  if rest.startswith("("):
    end = _balanced(rest, 0)
  else:
    end = rest.find(" ")
    if end < 0:
      return None
  type_str, rest = rest[:end], rest[end:].lstrip()
  om = re.match(r"([\w\-]+)\(", rest)
  if not om:
    return None
  opcode = om.group(1)
  close = _balanced(rest, om.end() - 1)
  operands = tuple(_split_top(rest[om.end():close - 1]))
  return Instr(name, type_str, opcode, operands, rest[close:])


def parse_hlo(hlo_text: str) -> tuple[dict[str, list[Instr]], str]:
  """Computations by name (instructions in order) and the name of the ENTRY computation."""
  comps: dict[str, list[Instr]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    if current is None:
      h = _HEADER_RE.match(line)
      if h and "=" not in line.split("(")[0]:
        current = h.group(2)
        comps[current] = []
        if h.group(1):
          entry = current
      continue
    if line.strip() == "}":
      current = None
      continue
    ins = _parse_instr(line)
    if ins is not None:
      comps[current].append(ins)
  if entry is None:
    raise ValueError("HLO text has no ENTRY computation: pass compiled.as_text()")
  return comps, entry


def _attr_names(attrs: str, key: str) -> list[str]:
  """Computation names in `key=%c` or `key={%a, %b}`."""
  m = re.search(rf"\b{key}=(\{{[^}}]*\}}|%?[\w.\-]+)", attrs)
  if not m:
    return []
  return [n.strip().lstrip("%") for n in m.group(1).strip("{}").split(",") if n.strip()]


def _operand_type(op: str, symbols: Mapping[str, str]) -> str:
  op = op.strip()
  if " " in op and "[" in op.split(" ")[0]:   # printed as `f32[2,3]{1,0} %x`
    return op.rsplit(" ", 1)[0]
  return symbols.get(op.lstrip("%"), "")


def trip_count(instr: Instr, comps: Mapping[str, list[Instr]]) -> int | None:
  """A while loop's trip count: XLA's known_trip_count annotation, else the loop condition's
  `i < N` (or `i <= N`) against a constant, assuming the induction variable starts at 0 and
  steps by 1 as lax.scan/fori_loop lower. None when neither is readable."""
  m = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"', instr.attrs)
  if m:
    return int(m.group(1))
  cond = _attr_names(instr.attrs, "condition")
  if not cond:
    return None
  consts, directions = [], []

  def scan(name, depth=0):
    for ins in comps.get(name, []):
      if ins.opcode == "constant" and re.match(r"^[su](8|16|32|64)\[\]", ins.type_str):
        consts.append(int(ins.operands[0]))
      if ins.opcode == "compare":
        d = re.search(r"direction=(\w+)", ins.attrs)
        directions.append(d.group(1) if d else "")
      if depth < 3:
        for callee in _attr_names(ins.attrs, "calls"):
          scan(callee, depth + 1)

  scan(cond[0])
  if len(consts) != 1 or len(directions) != 1:
    return None
  return {"LT": consts[0], "LE": consts[0] + 1, "GT": consts[0], "GE": consts[0] + 1}.get(
      directions[0])


@dataclass(frozen=True)
class CountedOp:
  """One op of the compiled program with how often it runs per call of the program."""

  kind: str                 # collective kind, or "dot"
  computation: str
  name: str
  bytes: float              # operand bytes per execution (collectives)
  flops: float              # per execution (dots)
  count: float              # executions per program call: loop trips x cond weights
  loop_depth: int           # enclosing while loops
  cond_depth: int           # enclosing conditional branches
  trips_known: bool         # False when a surrounding loop's trip count could not be read
  op_name: str              # JAX's metadata op_name, for humans
  element_type: str = ""    # of the (first) operand, as compiled: f32 where CPU promoted bf16


def _dot_flops(ins: Instr, symbols: Mapping[str, str]) -> float:
  out = _arrays(ins.type_str)
  if not out:
    return 0.0
  out_elems = math.prod(out[0][1])
  if ins.opcode == "dot":
    lhs = _arrays(_operand_type(ins.operands[0], symbols))
    m = re.search(r"lhs_contracting_dims=\{([^}]*)\}", ins.attrs)
    if not lhs or not m:
      return 0.0
    contract = [int(i) for i in m.group(1).split(",") if i.strip()]
  else:  # custom-call GEMMs on GPU carry dot_dimension_numbers in backend_config
    m = re.search(r'"lhs_contracting_dimensions"\s*:\s*\[([^\]]*)\]', ins.attrs)
    lhs = _arrays(_operand_type(ins.operands[0], symbols)) if ins.operands else []
    if not lhs or not m:
      return 0.0
    contract = [int(i.strip().strip('"')) for i in m.group(1).split(",") if i.strip()]
  k = math.prod(lhs[0][1][i] for i in contract)
  return 2.0 * out_elems * k


def counted_ops(hlo_text: str, cond_weight: float | Sequence[float] = 1.0) -> list[CountedOp]:
  """Every collective and dot of a compiled HLO module, with executions per program call.

  cond_weight: the fraction of a conditional's calls that take each branch, applied once per
  level of conditional nesting: a float for every level, or a sequence (outermost first; levels
  past its end get 1.0). The default 1.0 counts every branch on every call: an upper bound.
  """
  comps, entry = parse_hlo(hlo_text)
  weights = [cond_weight] if isinstance(cond_weight, (int, float)) else list(cond_weight)
  level_weight = (lambda d: float(weights[0])) if isinstance(cond_weight, (int, float)) else (
      lambda d: float(weights[d - 1]) if d - 1 < len(weights) else 1.0)
  out: list[CountedOp] = []

  def visit(name, mult, loops, conds, known, stack):
    if name in stack:
      raise ValueError(f"HLO computation {name} calls itself")
    symbols = {i.name: i.type_str for i in comps.get(name, [])}
    for ins in comps.get(name, []):
      kind = _COLLECTIVE_OPCODES.get(ins.opcode)
      meta = re.search(r'op_name="([^"]*)"', ins.attrs)
      op_name = meta.group(1) if meta else ""
      if kind:
        ops = ins.operands[:1] if kind == "collective-permute" else ins.operands
        types = [_operand_type(o, symbols) for o in ops]
        nbytes = sum(shape_bytes(t) for t in types)
        arrays = _arrays(types[0]) if types else []
        out.append(CountedOp(kind, name, ins.name, nbytes, 0.0, mult, loops, conds, known,
                             op_name, arrays[0][0] if arrays else ""))
      elif ins.opcode == "dot" or (ins.opcode == "custom-call" and re.search(
          r'custom_call_target="[^"]*(gemm|matmul)', ins.attrs, re.I)):
        out.append(CountedOp("dot", name, ins.name, 0.0, _dot_flops(ins, symbols), mult, loops,
                             conds, known, op_name))
      if ins.opcode == "while":
        trips = trip_count(ins, comps)
        t = 1 if trips is None else trips
        for body in _attr_names(ins.attrs, "body"):
          visit(body, mult * t, loops + 1, conds, known and trips is not None, stack | {name})
        for cond in _attr_names(ins.attrs, "condition"):
          visit(cond, mult * (t + 1), loops + 1, conds, known and trips is not None,
                stack | {name})
      elif ins.opcode == "conditional":
        branches = (_attr_names(ins.attrs, "branch_computations") or
                    _attr_names(ins.attrs, "true_computation") +
                    _attr_names(ins.attrs, "false_computation"))
        w = level_weight(conds + 1)
        for b in branches:
          visit(b, mult * w, loops, conds + 1, known, stack | {name})
      else:
        for key in ("calls", "to_apply", "called_computations"):
          for callee in _attr_names(ins.attrs, key):
            visit(callee, mult, loops, conds, known, stack | {name})

  visit(entry, 1.0, 0, 0, True, frozenset())
  return out


def collective_ops(hlo_text: str, cond_weight: float | Sequence[float] = 1.0) -> list[CountedOp]:
  return [o for o in counted_ops(hlo_text, cond_weight) if o.kind != "dot"]


def collective_bytes(hlo_text: str,
                     cond_weight: float | Sequence[float] = 1.0) -> dict[str, float]:
  """Bytes per device per call of the program, per collective kind.

  Each collective contributes its operand bytes (what one device puts in: the local shard for
  an all-gather, the full buffer for an all-reduce or a permute) times the trip count of every
  while loop around it. Ops inside a conditional branch count once per call of the conditional
  times cond_weight (default 1.0: as if taken every time, an upper bound: the engine's bubble
  ticks skip its tensor-parallel all-reduces, pass `engine_cond_weights(plan)` for the executed
  count). A loop whose trip count cannot be read counts once, with a warning.
  """
  ops = collective_ops(hlo_text, cond_weight)
  if any(not o.trips_known for o in ops):
    warnings.warn("collective_bytes: a loop's trip count is unknown; its collectives counted once")
  out = {k: 0.0 for k in COLLECTIVE_KINDS}
  for o in ops:
    out[o.kind] += o.bytes * o.count
  return out


def hlo_flops(hlo_text: str, cond_weight: float | Sequence[float] = 1.0) -> float:
  """Matmul FLOPs (2 x MACs of every dot) per device per call, times loop trips."""
  return sum(o.flops * o.count for o in counted_ops(hlo_text, cond_weight) if o.kind == "dot")


# --- compiled programs ---------------------------------------------------------------------

def _cost_dict(compiled) -> dict[str, float]:
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):   # older JAX: one dict per device program
    ca = ca[0] if ca else {}
  return dict(ca or {})


def compile_stats(jitted_fn, *args, cond_weight: float | Sequence[float] = 1.0) -> dict[str, Any]:
  """Lower and compile `jitted_fn(*args)` (arrays or ShapeDtypeStructs; nothing runs).

  Memory is per device, from the compiled executable. `flops` are the HLO's matmul FLOPs per
  device with loop trips applied (see hlo_flops); `xla_cost_flops` is what cost_analysis()
  says, which counts each loop body once.
  """
  t0 = time.perf_counter()
  compiled = jitted_fn.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  ma = compiled.memory_analysis()
  if ma is None:
    raise RuntimeError(f"{jax.devices()[0].platform}: the compiled program has no "
                       f"memory_analysis(); per-device memory cannot be read on this backend")
  hlo = compiled.as_text()
  cost = _cost_dict(compiled)
  return {
      "argument_bytes": int(ma.argument_size_in_bytes),
      "output_bytes": int(ma.output_size_in_bytes),
      "temp_bytes": int(ma.temp_size_in_bytes),
      "alias_bytes": int(ma.alias_size_in_bytes),
      # What the program holds at once per device: donated or aliased bytes count once.
      "total_bytes": int(ma.argument_size_in_bytes + ma.output_size_in_bytes
                         + ma.temp_size_in_bytes - ma.alias_size_in_bytes),
      "generated_code_bytes": int(ma.generated_code_size_in_bytes),
      "flops": hlo_flops(hlo, cond_weight),
      "xla_cost_flops": float(cost.get("flops", 0.0)),
      "xla_cost_bytes_accessed": float(cost.get("bytes accessed", 0.0)),
      "collective_bytes": collective_bytes(hlo, cond_weight),
      "compile_s": compile_s,
      "hlo": hlo,
      "compiled": compiled,
  }


def public(stats: Mapping[str, Any]) -> dict[str, Any]:
  """compile_stats without the HLO text and the executable, for printing and JSON."""
  return {k: v for k, v in stats.items() if k not in ("hlo", "compiled")}


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


# --- what the engine should move: Megatron's formulas for a Plan ---------------------------

def engine_cond_weights(plan) -> tuple[float, float]:
  """Branch weights that make counts of the engine's HLO equal what it executes: the cost
  model's (costmodel.hlo_cond_weights). Neither skip branch holds a collective or a matmul."""
  return costmodel.hlo_cond_weights(plan)


def megatron_collective_bytes(plan, cfg, element_bytes: int) -> dict[str, float]:
  """Per-device bytes of the engine's pipeline loop for `plan`, from Megatron's accounting.

  TP: two all-reduces of the unit's activations (rows x chunk_tokens x d_model) per layer per
  unit, on every device of a stage (tp > 1 only); a stage runs `units` units. Pipeline: one
  activation transfer of a unit per stage boundary per unit, which the engine issues as one
  collective-permute per tick on every device (stage s sends on ticks s .. s+units-1 with data
  and on the other stages-1 ticks with the zeros of a bubble, because the permute sits outside
  the tick's cond): ticks x unit bytes per device. The output's final gather to all devices,
  outside the loop, is not part of this (see `engine_loop_bytes`).
  """
  unit = plan.rows * plan.chunk_tokens * cfg.d_model * element_bytes
  out = {k: 0.0 for k in COLLECTIVE_KINDS}
  if plan.tp > 1:
    out["all-reduce"] = 2.0 * plan.layers_per_stage * plan.units * unit
  if plan.stages > 1:
    out["collective-permute"] = float(plan.ticks * unit)
  for kind, per_tick in costmodel.stream_collective_bytes(cfg, plan, element_bytes).items():
    out[kind] += float(plan.ticks * per_tick)
  return out


def engine_loop_bytes(hlo_text: str, plan) -> dict[str, Any]:
  """Measured per-device collective bytes of a compiled engine forward, split into the
  pipeline loop (ops inside the tick loop, weighted by engine_cond_weights) and the rest
  (outside every loop: GSPMD's gather of the last stage's output to all devices), with the
  element size the loop's collectives were compiled with."""
  ops = collective_ops(hlo_text, engine_cond_weights(plan))
  loop = {k: 0.0 for k in COLLECTIVE_KINDS}
  rest = {k: 0.0 for k in COLLECTIVE_KINDS}
  sizes = set()
  for o in ops:
    (loop if o.loop_depth else rest)[o.kind] += o.bytes * o.count
    if o.loop_depth and o.element_type:
      sizes.add(_ELEMENT_BYTES[o.element_type])
  return {"loop": loop, "outside_loops": rest,
          "element_bytes": sizes.pop() if len(sizes) == 1 else None}


def megatron_comparison(hlo_text: str, plan, cfg) -> dict[str, Any]:
  """engine_loop_bytes beside megatron_collective_bytes at the compiled element size."""
  m = engine_loop_bytes(hlo_text, plan)
  eb = m["element_bytes"] or cfg.dtype_bytes
  want = megatron_collective_bytes(plan, cfg, eb)
  return {"element_bytes": eb, "measured_loop": m["loop"], "formula": want,
          "outside_loops": m["outside_loops"],
          "ratio": {k: (m["loop"][k] / want[k]) if want[k] else None for k in want}}


# --- local-shard shapes and one stage step -------------------------------------------------

def local_param_shapes(cfg, plan) -> dict:
  """ShapeDtypeStructs of one device's parameters under `plan` (stage's layers, tp shard)."""
  from jaxpart import model, sharding  # noqa: PLC0415
  sizes = {plan.axis_names[0]: plan.stages, plan.axis_names[1]: plan.tp}

  def local(shape_dtype, spec):
    dims = list(shape_dtype.shape)
    for i, axis in enumerate(spec):
      if axis is not None:
        dims[i] //= sizes[axis]
    return jax.ShapeDtypeStruct(tuple(dims), shape_dtype.dtype)

  from jax.sharding import PartitionSpec  # noqa: PLC0415
  return jax.tree.map(local, model.param_shapes(cfg), sharding.param_specs(),
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def stage_step_args(cfg, plan, dtype=None) -> tuple:
  """ShapeDtypeStructs for engine.stage_step on one device: params, unit, K and V caches,
  q_start. dtype overrides the model's (float32 checks)."""
  import jax.numpy as jnp  # noqa: PLC0415
  dt = jnp.dtype(dtype or cfg.dtype)
  params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dt),
                        local_param_shapes(cfg, plan))
  x = jax.ShapeDtypeStruct((plan.rows, plan.chunk_tokens, cfg.d_model), dt)
  cache = jax.ShapeDtypeStruct((plan.layers_per_stage, plan.rows, plan.cache_len,
                                cfg.n_heads // plan.tp, cfg.head_dim), dt)
  return params, x, cache, cache, jax.ShapeDtypeStruct((), jnp.int32)


def jit_stage_step(cfg, plan, donate_caches: bool = True):
  """One engine stage step as the engine runs it inside a stage, without the tensor-axis psum
  (same local shapes); caches donated so their update is in place, as in the engine's scan."""
  import functools  # noqa: PLC0415
  from jaxpart import engine  # noqa: PLC0415
  step = functools.partial(engine.stage_step, cfg=cfg, plan=plan, tp_axis=None)
  return jax.jit(step, donate_argnums=(2, 3) if donate_caches else ())


def stage_step_stats(cfg, plan) -> dict[str, Any]:
  """Compiled per-device memory of one layer-wise chunk step, nothing allocated."""
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*[Dd]onat.*")
    return compile_stats(jit_stage_step(cfg, plan), *stage_step_args(cfg, plan))


def to_json_line(obj: Any) -> str:
  def default(o):
    if dataclasses.is_dataclass(o):
      return dataclasses.asdict(o)
    if hasattr(o, "item"):
      return o.item()
    raise TypeError(type(o).__name__)
  return json.dumps(obj, default=default)


# --- benchmarks: the engine against the reference and plain GSPMD --------------------------

@dataclass
class Variant:
  """One program to time: a jitted fn, its (placed) arguments and how to read its HLO."""

  name: str
  devices: int
  fn: Callable
  args: tuple
  cond_weight: float | Sequence[float] = 1.0
  stats: dict | None = None
  out: Any = None


def model_flops(cfg, batch: int, seq: int) -> float:
  """Useful forward FLOPs of the whole batch: the same for every placement, so achieved
  FLOP/s compare like for like (causal attention counted once, not the masked half)."""
  from jaxpart import memory  # noqa: PLC0415
  return memory.forward_flops_per_token(cfg, seq) * batch * seq


def build_variants(setup, plan, params, x_BxTxD, *, reference: "bool | Variant" = True,
                   gspmd: bool = True) -> list[Variant]:
  """The engine for `plan`, the single-device reference, and plain jax.jit with GSPMD tensor
  parallel annotations over the same devices (what a user writes without jaxpart).

  reference may be a Variant built earlier (a sweep compiles the reference once)."""
  import functools  # noqa: PLC0415
  from jax.sharding import NamedSharding, PartitionSpec  # noqa: PLC0415
  from jaxpart import compat, engine, model, sharding  # noqa: PLC0415
  from jaxpart.plan import PlanError, TENSOR_AXIS  # noqa: PLC0415
  cfg = setup.model
  devices = jax.devices()
  mesh = sharding.mesh_for(plan)
  out = [Variant(f"engine:{plan.strategy}", plan.devices,
                 engine.jit_forward(plan, cfg, mesh, differentiable=False),
                 (sharding.place_params(params, mesh),
                  jax.device_put(x_BxTxD, sharding.stream(mesh))),
                 engine_cond_weights(plan))]
  fwd = jax.jit(functools.partial(model.forward, cfg=cfg))
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
  import numpy as np  # noqa: PLC0415
  from jaxpart import runs  # noqa: PLC0415
  cfg, run = setup.model, setup.run
  for v in variants:
    if v.stats is None:
      v.stats = compile_stats(v.fn, *v.args, cond_weight=v.cond_weight)
      if progress:
        progress(1)
  fns = {v.name: (lambda v=v: v.stats["compiled"](*v.args)) for v in variants}
  times = time_interleaved(fns, repeats, warmup, progress)
  ref_out = None
  for v in variants:
    v.out = np.asarray(runs.fetch(fns[v.name]()), np.float32)
    if v.name == "reference":
      ref_out = v.out
  tokens = run.batch * run.seq
  useful = model_flops(cfg, run.batch, run.seq)
  rows = []
  for v in variants:
    t = times[v.name]["median_s"]
    err = None if ref_out is None else float(np.max(np.abs(v.out - ref_out)))
    rows.append({
        "name": v.name, "devices": v.devices, "median_s": t, "runs_s": times[v.name]["runs"],
        "cpu_median_s": times[v.name]["cpu_median_s"], "cpu_runs_s": times[v.name]["cpu_runs"],
        "tokens_per_s": tokens / t, "time_per_token_s": t / tokens, "latency_s": t,
        "argument_bytes": v.stats["argument_bytes"], "output_bytes": v.stats["output_bytes"],
        "temp_bytes": v.stats["temp_bytes"], "compiled_flops_per_device": v.stats["flops"],
        "xla_cost_flops": v.stats["xla_cost_flops"], "model_flops": useful,
        "achieved_flops_per_s": useful / t,
        "compiled_flops_per_s": v.stats["flops"] * v.devices / t,
        "collective_bytes": v.stats["collective_bytes"], "compile_s": v.stats["compile_s"],
        "max_abs_err_vs_reference": err,
    })
  return rows


def ratios(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """Ratios of the engine's median time to the others' (below 1: the engine is faster): wall
  time, and process CPU time (all threads) as "(cpu)"."""
  eng = next((r["name"] for r in rows if r["name"].startswith("engine:")), None)
  pairs = [("engine/reference", eng, "reference"), ("engine/gspmd", eng, "gspmd-tp"),
           ("gspmd/reference", "gspmd-tp", "reference")]
  out = {}
  for key in ("median_s", "cpu_median_s"):
    by = {r["name"]: r[key] for r in rows}
    for label, a, b in pairs:
      if a in by and b in by and by[b] > 0:
        out[label + (" (cpu)" if key == "cpu_median_s" else "")] = by[a] / by[b]
  return out


def forward_memory(setup, plan) -> dict[str, Any]:
  """Compiled per-device memory of the engine's forward for `plan`, without allocating."""
  from jax.sharding import NamedSharding  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from jaxpart import engine, model, sharding  # noqa: PLC0415
  cfg, run = setup.model, setup.run
  mesh = sharding.mesh_for(plan)
  shard = sharding.param_shardings(mesh)
  params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        model.param_shapes(cfg), shard)
  x = jax.ShapeDtypeStruct((run.batch, run.seq, cfg.d_model), jnp.dtype(cfg.dtype),
                           sharding=sharding.stream(mesh))
  return compile_stats(engine.jit_forward(plan, cfg, mesh, differentiable=False), params, x,
                       cond_weight=engine_cond_weights(plan))
