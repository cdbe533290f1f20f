"""The Plan: every placement decision, as data. Built by the planner, read by everything else."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from jaxpart.errors import UserError, check_positive_ints

STAGE_AXIS = "stage"
TENSOR_AXIS = "tensor"
STRATEGIES = ("baseline", "layerwise")


class PlanError(UserError):
  """A placement that cannot be built; the message says why and what would be valid."""


@dataclass(frozen=True)
class Plan:
  """How one model and run shape sit on `devices` devices.

  The input stream is split into units of `rows` batch rows x `chunk_tokens` tokens, ordered
  microbatch-major, chunk-minor; a unit enters stage 0 at tick u and leaves the last stage at
  tick u + stages - 1. The baseline is one chunk of the whole sequence per microbatch; the
  layer-wise placement is many token chunks, usually of the whole batch.
  """

  strategy: str
  devices: int
  stages: int
  tp: int
  stage_layers: tuple[tuple[int, ...], ...]   # layer indices held by each stage, contiguous
  batch: int
  seq: int
  microbatches: int                           # splits of the batch axis
  chunk_tokens: int                           # tokens per unit along the sequence
  kv_block: int                               # keys visited per online-softmax step
  predicted_working_set_bytes: int = 0        # per device, one layer of one unit step
  cache_budget_bytes: int = 0
  reason: str = ""
  axis_names: tuple[str, str] = (STAGE_AXIS, TENSOR_AXIS)

  def __post_init__(self):
    check_positive_ints("Plan", PlanError, **{
        name: getattr(self, name) for name in ("devices", "stages", "tp", "batch", "seq",
                                               "microbatches", "chunk_tokens", "kv_block")})
    if self.strategy not in STRATEGIES:
      raise PlanError(f"Plan.strategy = {self.strategy!r}: valid strategies are "
                      f"{', '.join(STRATEGIES)}")
    if self.stages * self.tp != self.devices:
      raise PlanError(f"Plan: stages x tp = {self.stages} x {self.tp} != devices = {self.devices}")
    if len(self.stage_layers) != self.stages:
      raise PlanError(f"Plan.stage_layers has {len(self.stage_layers)} entries, expected "
                      f"stages = {self.stages}")
    sizes = {len(s) for s in self.stage_layers}
    if len(sizes) != 1 or 0 in sizes:
      raise PlanError(f"Plan.stage_layers = {self.stage_layers}: every stage must hold the "
                      f"same, non-zero number of layers")
    flat = [i for s in self.stage_layers for i in s]
    if flat != list(range(len(flat))):
      raise PlanError(f"Plan.stage_layers = {self.stage_layers}: layers must be 0..L-1, "
                      f"contiguous and in order across stages")
    if self.batch % self.microbatches:
      raise PlanError(f"Plan.microbatches = {self.microbatches} does not divide batch = "
                      f"{self.batch}")
    if self.chunk_tokens > self.seq:
      raise PlanError(f"Plan.chunk_tokens = {self.chunk_tokens} exceeds seq = {self.seq}")
    for name in ("predicted_working_set_bytes", "cache_budget_bytes"):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise PlanError(f"Plan.{name} = {v!r}: must be a non-negative integer (bytes)")
    if (len(self.axis_names) != 2 or len(set(self.axis_names)) != 2
        or not all(isinstance(a, str) and a for a in self.axis_names)):
      raise PlanError(f"Plan.axis_names = {self.axis_names!r}: must be two distinct names, "
                      f"(stage axis, tensor axis)")

  # --- derived figures ---------------------------------------------------------------------
  @property
  def layers(self) -> int:
    return sum(len(s) for s in self.stage_layers)

  @property
  def layers_per_stage(self) -> int:
    return len(self.stage_layers[0])

  @property
  def mesh_shape(self) -> tuple[int, int]:
    return (self.stages, self.tp)

  @property
  def layer_to_stage(self) -> tuple[int, ...]:
    """Stage index of every layer, in layer order."""
    return tuple(s for s, group in enumerate(self.stage_layers) for _ in group)

  @property
  def rows(self) -> int:
    """Batch rows in one unit."""
    return self.batch // self.microbatches

  @property
  def n_chunks(self) -> int:
    return math.ceil(self.seq / self.chunk_tokens)

  @property
  def last_chunk_tokens(self) -> int:
    """Tokens in the last chunk: less than chunk_tokens when the split is ragged."""
    return self.seq - (self.n_chunks - 1) * self.chunk_tokens

  @property
  def padded_seq(self) -> int:
    return self.n_chunks * self.chunk_tokens

  @property
  def cache_len(self) -> int:
    """KV cache positions per layer: the padded sequence rounded up to whole KV blocks."""
    return math.ceil(self.padded_seq / self.kv_block) * self.kv_block

  def decode_cache_len(self, new_tokens: int) -> int:
    """Positions of the whole batch's cache when generating: prefill writes the padded prompt
    (cache_len), decode appends from position seq up to seq + new_tokens, in whole KV blocks.
    The one rule both the runtime (what runs) and memory.py (what is predicted) use."""
    need = math.ceil((self.seq + new_tokens) / self.kv_block) * self.kv_block
    return max(self.cache_len, need)

  @property
  def units(self) -> int:
    return self.microbatches * self.n_chunks

  @property
  def ticks(self) -> int:
    return self.units + self.stages - 1

  @property
  def bubble_fraction(self) -> float:
    """(S-1)/(M+S-1): the share of stage-ticks with no valid input."""
    return (self.stages - 1) / self.ticks

  @property
  def ragged(self) -> bool:
    return self.last_chunk_tokens != self.chunk_tokens

  @property
  def cache_utilisation(self) -> float:
    """Predicted working set / cache budget; 0 when no budget was set."""
    if not self.cache_budget_bytes:
      return 0.0
    return self.predicted_working_set_bytes / self.cache_budget_bytes

  @property
  def split(self) -> str:
    parts = []
    if self.microbatches > 1:
      parts.append(f"{self.microbatches} microbatches of {self.rows} row{'s' * (self.rows > 1)}")
    if self.n_chunks > 1:
      ragged = f", last {self.last_chunk_tokens}" if self.last_chunk_tokens != self.chunk_tokens else ""
      parts.append(f"{self.n_chunks} token chunks of {self.chunk_tokens}{ragged}")
    return " x ".join(parts) or "whole input in one unit"

  # --- serialisation -------------------------------------------------------------------------
  def derived(self) -> dict[str, Any]:
    """Figures computed from the fields, written to JSON for readers; checked on reading."""
    return {
        "mesh_shape": list(self.mesh_shape), "layer_to_stage": list(self.layer_to_stage),
        "rows": self.rows, "n_chunks": self.n_chunks,
        "last_chunk_tokens": self.last_chunk_tokens, "ragged": self.ragged,
        "units": self.units, "ticks": self.ticks, "bubble_fraction": self.bubble_fraction,
        "split": self.split, "layers_per_stage": self.layers_per_stage,
        "cache_len": self.cache_len, "cache_utilisation": self.cache_utilisation,
    }

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["stage_layers"] = [list(s) for s in self.stage_layers]
    d["axis_names"] = list(self.axis_names)
    d["derived"] = self.derived()
    return d

  def to_json(self, **kw) -> str:
    return json.dumps(self.to_dict(), **kw)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "Plan":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names - {"derived"}
    if unknown:
      raise PlanError(f"Plan JSON: unknown keys {sorted(unknown)}; valid keys are {sorted(names)}")
    kw = {k: v for k, v in d.items() if k in names}
    if "stage_layers" in kw:
      kw["stage_layers"] = tuple(tuple(s) for s in kw["stage_layers"])
    if "axis_names" in kw:
      kw["axis_names"] = tuple(kw["axis_names"])
    try:
      plan = cls(**kw)
    except TypeError as e:  # a required field is missing
      raise PlanError(f"Plan JSON: {e}; required keys are "
                      f"{sorted(f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING)}") from None
    # Derived figures are for readers; a file whose figures disagree with its fields was edited
    # by hand or written by other code, and silently recomputing them would hide that.
    stated = d.get("derived")
    if stated is not None:
      true = json.loads(json.dumps(plan.derived()))
      for key, value in stated.items():
        if key not in true:
          raise PlanError(f"Plan JSON: unknown derived key {key!r}; valid: {sorted(true)}")
        if not _same(value, true[key]):
          raise PlanError(f"Plan JSON: derived.{key} = {value!r} but the fields give "
                          f"{true[key]!r}")
    return plan

  @classmethod
  def from_json(cls, text: str) -> "Plan":
    return cls.from_dict(json.loads(text))


def _same(a: Any, b: Any) -> bool:
  if isinstance(a, float) or isinstance(b, float):
    return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(
        a, b, rel_tol=1e-12, abs_tol=1e-15)
  return a == b


def contiguous_stage_layers(layers: int, stages: int) -> tuple[tuple[int, ...], ...]:
  if stages > layers:
    raise PlanError(f"stages = {stages} exceeds layers = {layers}: each stage needs at least "
                    f"one layer; valid stage counts divide {layers}: "
                    f"{', '.join(map(str, divisors(layers)))}")
  if layers % stages:
    raise PlanError(f"stages = {stages} does not divide layers = {layers}: stages hold equal "
                    f"contiguous layer groups; valid stage counts are "
                    f"{', '.join(map(str, divisors(layers)))}")
  per = layers // stages
  return tuple(tuple(range(s * per, (s + 1) * per)) for s in range(stages))


def decode_microbatches(batch: int, stages: int) -> int:
  """Decode microbatches in flight: M = stages when it divides the batch, else the largest
  divisor of the batch below it. Here, not in cost/, because the runtime's decode schedule and
  the decode cost model both follow it."""
  return max(d for d in divisors(batch) if d <= stages)


def divisors(n: int) -> list[int]:
  """Every divisor of n, ascending, from its prime factors: trial division only up to sqrt(n),
  so a count of 2^31 answers in milliseconds, not by trying every number up to n."""
  if n < 1:
    return []
  out = [1]
  rest, p = n, 2
  while p * p <= rest:
    k = 0
    while rest % p == 0:
      rest //= p
      k += 1
    if k:
      out = [d * p**e for d in out for e in range(k + 1)]
    p += 1 if p == 2 else 2
  if rest > 1:
    out += [d * rest for d in out]
  return sorted(out)


# --- what a tp degree must divide --------------------------------------------------------------
# The rules every consumer of a Plan applies (the planner choosing tp, a checkpoint restoring
# into one); they read only the model's head and MLP sizes.

def tp_problems(cfg, tp: int) -> list[str]:
  """Why tp cannot split this model's heads and MLP columns; empty when it can."""
  problems = []
  if cfg.n_heads % tp:
    problems.append(f"n_heads = {cfg.n_heads} is not divisible by tp = {tp}")
  if cfg.d_ff % tp:
    problems.append(f"d_ff = {cfg.d_ff} is not divisible by tp = {tp}")
  return problems


def valid_tps(cfg) -> list[int]:
  return [t for t in divisors(cfg.n_heads) if cfg.d_ff % t == 0]


def check_tp(cfg, tp: int) -> None:
  if not isinstance(tp, int) or isinstance(tp, bool) or tp <= 0:
    raise PlanError(f"tp = {tp!r}: must be a positive integer")
  problems = tp_problems(cfg, tp)
  if problems:
    raise PlanError(f"tp = {tp}: {'; '.join(problems)}. Valid tp degrees for this model: "
                    f"{', '.join(map(str, valid_tps(cfg)))}")
