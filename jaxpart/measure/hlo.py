"""A reader of compiled HLO text: every collective and matmul, with how often it runs.

It imports nothing from jaxpart (nor JAX): it reads the text `compiled.as_text()` prints.

Two facts about compiled HLO shape the code:
- XLA's own `cost_analysis()` counts a while loop's body once, whatever its trip count (a
  10-step scan of a matmul reports the FLOPs of one matmul; tests/test_hlo.py shows it).
  Here every op is multiplied by the trip count of each loop around it.
- A `lax.cond` branch runs at most once per call of the conditional. By default both of a
  conditional's branches are counted as if taken on every call (`cond_weight=1.0`, an upper
  bound). The pipeline engine's collectives sit in the branch that runs only on a stage's valid
  ticks (units out of ticks); the cost model's `hlo_cond_weights(plan)` gives the weights that
  turn the upper bound into the count actually executed.

On CPU, XLA promotes bf16 all-reduces and collective-permutes to float32 before the collective
(its AllReducePromotion pass), so a bf16 program moves 4-byte elements there; these functions
report the bytes of the compiled program as built.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

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
  ticks skip its tensor-parallel all-reduces, pass `costmodel.hlo_cond_weights(plan)` for the
  executed count). A loop whose trip count cannot be read counts once, with a warning.
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


def element_bytes(element_type: str) -> float:
  """Bytes of one element of an HLO element type (`f32`: 4, `bf16`: 2, `s4`: 0.5)."""
  return _ELEMENT_BYTES[element_type]
