"""The few JAX APIs that moved between 0.10 (PyPI here) and 0.11 (the GPU machine)."""

from __future__ import annotations

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
