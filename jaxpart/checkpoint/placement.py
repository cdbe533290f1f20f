"""Where restored arrays go: the target Plan's shardings, checked against the model first."""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import PartitionSpec as P, SingleDeviceSharding

from jaxpart.runtime import sharding
from jaxpart.checkpoint.manifest import CheckpointError, flatten, unflatten
from jaxpart.config import ModelConfig
from jaxpart.models.families import param_shapes
from jaxpart.placement.plan import Plan, PlanError, check_tp

def check_plan(cfg: ModelConfig, plan: Plan | None) -> None:
  """A Plan this model can be split into, on devices that are present."""
  if plan is None:
    return
  if plan.layers != cfg.layers:
    raise PlanError(f"plan holds {plan.layers} layers ({plan.stage_layers}), the model has "
                    f"{cfg.layers}")
  check_tp(cfg, plan.tp)
  sharding.mesh_for(plan)


def param_shardings(plan: Plan | None, cfg: ModelConfig | None = None) -> dict:
  """The Plan's shardings in the params tree's shape; unsharded: this process's first device."""
  if plan is None:
    one = SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda _: one, sharding.param_specs(cfg),
                        is_leaf=lambda x: isinstance(x, P))
  return sharding.param_shardings(sharding.mesh_for(plan), cfg, padded=False)  # true vocab


def param_targets(cfg: ModelConfig, plan: Plan | None) -> dict:
  """ShapeDtypeStructs carrying the target shardings: each device reads only its shard."""
  return sharding.abstract_placed_params(cfg, plan, padded=False)   # the stored vocabulary


def place(params, plan: Plan | None, cfg: ModelConfig | None = None):
  return jax.device_put(params, param_shardings(plan, cfg))


def opt_targets(cfg: ModelConfig, entries: dict[str, dict], stored_tree,
                 plan: Plan | None) -> Any:
  """Targets for stored optimizer state: a leaf whose path ends in a parameter path and has
  that parameter's shape (Adam's mu and nu) takes the parameter's sharding; others replicate."""
  shard_by_path = flatten(param_shardings(plan, cfg))
  shape_by_path = {p: tuple(s.shape) for p, s in flatten(param_shapes(cfg)).items()}
  rep = (SingleDeviceSharding(jax.local_devices()[0]) if plan is None
         else sharding.replicated(sharding.mesh_for(plan)))
  out = {}
  for path, meta in flatten(stored_tree).items():
    shape = tuple(meta.shape)
    if path not in entries or tuple(entries[path]["shape"]) != shape:
      raise CheckpointError(f"opt_state/{path}: stored as {shape}, the manifest says "
                            f"{entries.get(path, {}).get('shape')}")
    match = [p for p in shard_by_path
             if (path == p or path.endswith("/" + p)) and shape_by_path[p] == shape]
    out[path] = jax.ShapeDtypeStruct(shape, meta.dtype,
                                     sharding=shard_by_path[match[0]] if match else rep)
  return unflatten(stored_tree, out)
