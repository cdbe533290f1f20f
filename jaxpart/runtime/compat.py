"""The few JAX APIs that moved between 0.10 (PyPI here) and 0.11 (the GPU machine), and the one
reader of a compiled executable's memory_analysis() (which some backends do not answer)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import numpy as np

try:  # jax >= 0.6: top-level shard_map with check_vma
  from jax import shard_map as _shard_map
  _CHECK_KW = "check_vma"
except ImportError:  # older: experimental module with check_rep
  from jax.experimental.shard_map import shard_map as _shard_map
  _CHECK_KW = "check_rep"


def shard_map(f, mesh, in_specs, out_specs):
  """shard_map without replication checking: the engine's psums make outputs replicated over
  the tensor axis by construction, and cond branches with collectives confuse the checker."""
  return _shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **{_CHECK_KW: False})


def make_mesh(devices, shape, axis_names) -> jax.sharding.Mesh:
  """A Mesh with Auto axes: jax.make_mesh defaults to Explicit axes on newer JAX, which would
  change how un-annotated jit code is sharded."""
  arr = np.asarray(devices, dtype=object).reshape(shape)
  axis_type = getattr(jax.sharding, "AxisType", None)
  if axis_type is None:
    return jax.sharding.Mesh(arr, axis_names)
  return jax.sharding.Mesh(arr, axis_names, axis_types=(axis_type.Auto,) * len(shape))


@dataclass(frozen=True)
class CompiledMemory:
  """Per-device bytes of a compiled executable: the record measure/, generate and train share."""

  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  alias_bytes: int
  generated_code_bytes: int

  @property
  def total_bytes(self) -> int:
    """What the program holds at once per device: donated or aliased bytes count once."""
    return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

  def to_dict(self) -> dict[str, int]:
    return {**dataclasses.asdict(self), "total_bytes": self.total_bytes}


def compiled_memory(compiled) -> CompiledMemory:
  """memory_analysis() of `compiled` (a jax.stages.Compiled); refuses where it is absent."""
  ma = compiled.memory_analysis()
  if ma is None:
    raise RuntimeError(f"{jax.devices()[0].platform}: the compiled program has no "
                       f"memory_analysis(); per-device memory cannot be read on this backend")
  return CompiledMemory(int(ma.argument_size_in_bytes), int(ma.output_size_in_bytes),
                        int(ma.temp_size_in_bytes), int(ma.alias_size_in_bytes),
                        int(ma.generated_code_size_in_bytes))
