"""The PartitionSpecs of the parameters, caches and streams, and the Mesh for a Plan.

The mesh axis names are defined once, in placement/plan.py (STAGE_AXIS, TENSOR_AXIS); the
collectives in runtime/engine.py and runtime/decode.py, decode's per-stage specs and
measure/bench.py's one-axis mesh name the axes through those constants, never by a string.

Parameters are stacked on a leading layer axis, which is split over `stage` (stage s holds its
contiguous layer group); Megatron's column-parallel weights (wq, wk, wv, w_in) split their
output columns over `tensor`, the row-parallel ones (wo, w_out) their input rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from jaxpart.runtime import compat
from jaxpart.models import families
from jaxpart.placement.plan import STAGE_AXIS as S, TENSOR_AXIS as T, Plan, PlanError
from jaxpart.placement.shards import padded_vocab

# The layout roles with a vocabulary axis, and which axis: padded to shards.padded_vocab rows
# (or columns) when placed for the engine, cut back to the true vocabulary when taken out.
VOCAB_ROLES = {"vocab_rows": 0, "vocab_cols": 1}


@dataclass(frozen=True)
class Specs:
  """Named by the axes of the array they describe: L layers, D model, A attention, F MLP."""

  LxDxA_col: P = P(S, None, T)      # wq, wk, wv
  LxAxD_row: P = P(S, T, None)      # wo
  LxDxF_col: P = P(S, None, T)      # w_in
  LxFxD_row: P = P(S, T, None)      # w_out
  LxD: P = P(S, None)               # LayerNorm scale and bias
  replicated: P = P()               # small arrays every device needs whole
  # The engine's input and output streams, B x T x W: width split over every device, block
  # t*stages + s on device (stage s, tensor t), so a stage's tensor group holds a contiguous
  # slice and no device holds more than 1/N of either stream.
  stream: P = P(None, None, (T, S))
  # K/V caches kept for generation, L x B x positions x G x E: a stage's layers, the local K/V
  # heads of each tensor shard (where tp does not divide the K/V heads, each shard's own pick).
  kv_cache: P = P(S, None, None, T, None)


SPECS = Specs()
# The PartitionSpec of each role a family's param_layout names (families.LAYOUT_ROLES).
ROLE_SPECS = {"col": SPECS.LxDxA_col, "row": SPECS.LxAxD_row, "layer_col": P(S, T),
              "layer": SPECS.LxD, "layer_whole": P(S, None, None), "whole": SPECS.replicated,
              "vocab_rows": P(T, None), "vocab_cols": P(None, T)}


def param_specs(cfg=None, tp: int = 1, padded: bool = True) -> dict:
  """PartitionSpecs in the shape of the family's parameter tree (dense when cfg is None), from
  the roles its param_layout names. padded=False: the true vocabulary as checkpoints store it,
  its leaves whole over `tensor` when tp does not divide it (the engine's padded copy splits
  them)."""
  fam = families.DENSE if cfg is None else families.of(cfg)
  whole = not padded and cfg is not None and cfg.vocab % tp

  def spec(role):
    return P() if whole and role in VOCAB_ROLES else ROLE_SPECS[role]
  return jax.tree.map(spec, fam.param_layout(cfg, tp))


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


def param_shardings(mesh, cfg=None, padded: bool = True) -> dict:
  return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(cfg, mesh.shape[T], padded),
                      is_leaf=lambda x: isinstance(x, P))


def input_spec(cfg=None) -> P:
  """The engine's input: hidden vectors as a stream split over every device (dense), or token
  ids, 4 bytes a token, replicated (Llama: stage 0 embeds them vocab-parallel)."""
  return SPECS.replicated if cfg is not None and families.of(cfg).tokens_in else SPECS.stream


def input_sharding(mesh, cfg=None) -> NamedSharding:
  return NamedSharding(mesh, input_spec(cfg))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, SPECS.replicated)


def stream(mesh) -> NamedSharding:
  """Where the engine's input and output live (Specs.stream)."""
  return NamedSharding(mesh, SPECS.stream)


def place_params(params, mesh, cfg=None):
  """Put a parameter tree on the mesh as the Plan says (a no-op for leaves already there),
  its vocabulary padded for the mesh's devices (pad_vocab)."""
  if cfg is not None:
    params = pad_vocab(params, cfg, mesh.size)
  return jax.device_put(params, param_shardings(mesh, cfg))


def _resize_leaf(leaf, axis: int, size: int):
  """leaf with `axis` cut or zero-padded to `size` (numpy, jax arrays or ShapeDtypeStructs)."""
  if leaf.shape[axis] == size:
    return leaf
  if isinstance(leaf, jax.ShapeDtypeStruct):
    shape = leaf.shape[:axis] + (size,) + leaf.shape[axis + 1:]
    return jax.ShapeDtypeStruct(shape, leaf.dtype, sharding=leaf.sharding)
  if leaf.shape[axis] > size:
    return leaf[(slice(None),) * axis + (slice(0, size),)]
  widths = [(0, 0)] * leaf.ndim
  widths[axis] = (0, size - leaf.shape[axis])
  return jnp.pad(leaf, widths) if isinstance(leaf, jax.Array) else np.pad(leaf, widths)


def _resize_vocab(params, cfg, size: int):
  """The leaves the family's layout gives a vocabulary role, resized along that axis."""
  layout = families.of(cfg).param_layout(cfg, 1)

  def one(role, leaf):
    return _resize_leaf(leaf, VOCAB_ROLES[role], size) if role in VOCAB_ROLES else leaf
  return jax.tree.map(one, layout, params)


def pad_vocab(params, cfg, devices: int):
  """The tree as the engine places it on `devices` devices: the vocabulary leaves (embedding
  rows, LM head columns) zero-padded to shards.padded_vocab (a no-op when the vocabulary
  divides evenly, and for families without a vocabulary)."""
  return _resize_vocab(params, cfg, padded_vocab(cfg.vocab, devices))


def unpad_vocab(params, cfg):
  """The inverse of pad_vocab: the true vocabulary, as checkpoints and exports keep it."""
  return _resize_vocab(params, cfg, cfg.vocab)


def local_shape(shape: tuple[int, ...], spec: P, plan: Plan) -> tuple[int, ...]:
  """Per-device shape of an array of `shape` under `spec` on the Plan's mesh (pure: no devices).

  An axis that does not split evenly is a PlanError naming it: jax would pad it silently.
  """
  sizes = dict(zip(plan.axis_names, plan.mesh_shape))
  out = []
  for i, dim in enumerate(shape):
    names = spec[i] if i < len(spec) else None
    names = () if names is None else (names,) if isinstance(names, str) else tuple(names)
    parts = 1
    for n in names:
      parts *= sizes[n]
    if dim % parts:
      raise PlanError(f"axis {i} of shape {tuple(shape)} has size {dim}, not divisible by "
                      f"{parts} ({' x '.join(names)} of mesh {plan.mesh_shape})")
    out.append(dim // parts)
  return tuple(out)


def param_local_shapes(params, plan: Plan, cfg=None, padded: bool = True) -> dict:
  """Per-device shape of every parameter leaf under the Plan (params or ShapeDtypeStructs).

  The leading layer axis of a per-layer leaf must hold plan.layers layers, so stage s gets
  stage_layers[s]; edge leaves (embedding, final norm, head) have none.
  """
  def one(path, leaf, spec):
    name = jax.tree_util.keystr(path)
    per_layer = len(spec) > 0 and spec[0] == S
    if per_layer and leaf.shape[0] != plan.layers:
      raise PlanError(f"parameter {name} has {leaf.shape[0]} layers on axis 0, the plan places "
                      f"{plan.layers}")
    try:
      return local_shape(leaf.shape, spec, plan)
    except PlanError as e:
      raise PlanError(f"parameter {name}: {e}") from None
  return jax.tree_util.tree_map_with_path(one, params, param_specs(cfg, plan.tp, padded))


def place_for_plan(params, plan: Plan, mesh, cfg=None):
  """place_params after checking every leaf splits evenly as the Plan says."""
  if tuple(mesh.shape.values()) != plan.mesh_shape or tuple(mesh.axis_names) != plan.axis_names:
    raise PlanError(f"mesh {dict(mesh.shape)} is not the plan's {dict(zip(plan.axis_names, plan.mesh_shape))}")
  param_local_shapes(params, plan, cfg)
  return place_params(params, mesh, cfg)


def gspmd_tp_specs() -> dict:
  """What a user writes without jaxpart: Megatron TP annotations over all devices (one flat
  `tensor` axis), layers unsplit, for plain jax.jit to propagate."""
  col, row = P(None, None, T), P(None, T, None)
  ln = {"scale": P(), "bias": P()}
  return {"ln1": ln, "attn": {"wq": col, "wk": col, "wv": col, "wo": row}, "ln2": dict(ln),
          "mlp": {"w_in": col, "w_out": row}}


def abstract_placed_params(cfg, plan: Plan | None, mesh=None, dtype=None,
                           padded: bool = True) -> dict:
  """ShapeDtypeStructs of the model's parameters carrying the Plan's shardings (plan None: this
  process's first device), nothing allocated: what jit lowers against and orbax restores into.

  mesh defaults to mesh_for(plan); dtype overrides the model's (float32 checks). padded: the
  vocabulary as the engine places it (pad_vocab); False keeps the true one (what a checkpoint
  holds). Every leaf is checked to split evenly under the Plan (a PlanError naming it), as
  place_for_plan does.
  """
  shapes = families.of(cfg).param_shapes(cfg)
  if plan is not None and padded:
    shapes = pad_vocab(shapes, cfg, plan.devices)
  if plan is None:
    one = SingleDeviceSharding(jax.local_devices()[0])
    shards = jax.tree.map(lambda _: one, shapes)
  else:
    param_local_shapes(shapes, plan, cfg, padded)
    shards = param_shardings(mesh_for(plan) if mesh is None else mesh, cfg, padded)
  return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype or s.dtype), sharding=sh),
      shapes, shards)
