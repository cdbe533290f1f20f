"""Every PartitionSpec jaxpart uses, and the Mesh for a Plan. Nothing else names a mesh axis.

Parameters are stacked on a leading layer axis, which is split over `stage` (stage s holds its
contiguous layer group); Megatron's column-parallel weights (wq, wk, wv, w_in) split their
output columns over `tensor`, the row-parallel ones (wo, w_out) their input rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxpart import compat
from jaxpart.plan import STAGE_AXIS as S, TENSOR_AXIS as T, Plan, PlanError


@dataclass(frozen=True)
class Specs:
  """Named by the axes of the array they describe: L layers, D model, A attention, F MLP."""

  LxDxA_col: P = P(S, None, T)      # wq, wk, wv
  LxAxD_row: P = P(S, T, None)      # wo
  LxDxF_col: P = P(S, None, T)      # w_in
  LxFxD_row: P = P(S, T, None)      # w_out
  LxD: P = P(S, None)               # LayerNorm scale and bias
  replicated: P = P()               # inputs and outputs outside the engine
  per_stage: P = P(S)               # engine outputs: one slab per stage, the last one is kept


SPECS = Specs()


def param_specs() -> dict:
  """PartitionSpecs in the shape of model.init_params' tree."""
  ln = {"scale": SPECS.LxD, "bias": SPECS.LxD}
  return {
      "ln1": ln,
      "attn": {"wq": SPECS.LxDxA_col, "wk": SPECS.LxDxA_col, "wv": SPECS.LxDxA_col,
               "wo": SPECS.LxAxD_row},
      "ln2": dict(ln),
      "mlp": {"w_in": SPECS.LxDxF_col, "w_out": SPECS.LxFxD_row},
  }


def mesh_for(plan: Plan, devices=None) -> jax.sharding.Mesh:
  """(stage, tensor) mesh; consecutive devices form a stage, so across hosts a stage's tensor
  group stays inside one process (jax.devices() is ordered by process) while the pipeline
  crosses processes."""
  devices = list(jax.devices() if devices is None else devices)
  if len(devices) < plan.devices:
    raise PlanError(f"the plan needs {plan.devices} devices, {len(devices)} are present "
                    f"(on CPU set XLA_FLAGS=--xla_force_host_platform_device_count="
                    f"{plan.devices})")
  return compat.make_mesh(devices[:plan.devices], plan.mesh_shape, plan.axis_names)


def param_shardings(mesh) -> dict:
  return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(),
                      is_leaf=lambda x: isinstance(x, P))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, SPECS.replicated)


def place_params(params, mesh):
  """Put a parameter tree on the mesh as the Plan says (a no-op for leaves already there)."""
  return jax.device_put(params, param_shardings(mesh))


def gspmd_tp_specs() -> dict:
  """What a user writes without jaxpart: Megatron TP annotations over all devices (one flat
  `tensor` axis), layers unsplit, for plain jax.jit to propagate."""
  col, row = P(None, None, T), P(None, T, None)
  ln = {"scale": P(), "bias": P()}
  return {"ln1": ln, "attn": {"wq": col, "wk": col, "wv": col, "wo": row}, "ln2": dict(ln),
          "mlp": {"w_in": col, "w_out": row}}
