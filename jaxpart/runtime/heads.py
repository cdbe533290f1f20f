"""What leaves the pipeline's last stage, and what must split evenly for it to be placed.

The output stream's placed width (the vocabulary padded to a multiple of the devices,
placement.shards.padded_vocab), the padded logits masked to -inf and cut off before anyone
sees them, the head applied to a slice of the final hidden vectors at a time (so a forward's
logits never sit whole on a device), and the checks the engine makes before it traces.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxpart.config import ModelConfig
from jaxpart.models import families
from jaxpart.placement.plan import TENSOR_AXIS, Plan, PlanError
from jaxpart.placement.shards import padded_vocab
from jaxpart.runtime import compat
from jaxpart.runtime import sharding


def out_width(cfg: ModelConfig, plan: Plan) -> int:
  """Width of the output stream as placed: the family's, the vocabulary padded to a multiple
  of the devices (shards.padded_vocab) when the output is logits."""
  w = families.of(cfg).out_width(cfg)
  return padded_vocab(w, plan.devices) if families.of(cfg).tokens_in else w


def mask_padding(out_RxCxWl, cfg: ModelConfig, plan: Plan, tp_axis: str | None):
  """A tensor shard's slice of the head's output with the padded vocabulary's logits at -inf,
  so that no sampler can pick them (unchanged when nothing is padded)."""
  if out_width(cfg, plan) == families.of(cfg).out_width(cfg):
    return out_RxCxWl
  wl = out_RxCxWl.shape[-1]
  first = jax.lax.axis_index(tp_axis) * wl if tp_axis else 0
  return jnp.where(first + jnp.arange(wl) < cfg.vocab, out_RxCxWl, -jnp.inf)


def unpad_output(out_BxTxW, cfg: ModelConfig):
  """The output without the padded vocabulary's columns: what every caller sees."""
  w = families.of(cfg).out_width(cfg)
  return out_BxTxW if out_BxTxW.shape[-1] == w else out_BxTxW[..., :w]


def check_stream_width(width: int, plan: Plan, what: str = "d_model") -> None:
  """The input and output streams are split over all devices along their last axis."""
  if width % plan.devices:
    raise PlanError(f"{what} = {width} is not divisible by devices = {plan.devices}: the "
                    f"engine splits the input and output over every device along it; use a "
                    f"device count dividing {width}")


def check_placeable(plan: Plan, cfg: ModelConfig) -> None:
  """Every array the engine places for this Plan splits evenly over its mesh: the streams and
  every parameter leaf (the vocabulary as padded). A PlanError naming the first that does
  not, before anything is traced (JAX would raise from deep inside the trace)."""
  fam = families.of(cfg)
  if not fam.tokens_in:
    check_stream_width(cfg.d_model, plan)
  check_stream_width(out_width(cfg, plan), plan, "vocab" if fam.tokens_in else "d_model")
  sharding.param_local_shapes(sharding.pad_vocab(fam.param_shapes(cfg), cfg, plan.devices),
                              plan, cfg)


def tensor_slice(y_RxCxD, tp_axis: str | None):
  """This tensor shard's slice of a (replicated) hidden vector."""
  if tp_axis is None:
    return y_RxCxD
  w = y_RxCxD.shape[-1] // jax.lax.psum(1, tp_axis)
  return jax.lax.dynamic_slice_in_dim(y_RxCxD, jax.lax.axis_index(tp_axis) * w, w, axis=-1)


def make_logits_chunk(plan: Plan, cfg: ModelConfig, mesh, rows: int, tokens: int):
  """(params, hidden_BxTxD, row0, tok0) -> the float32 logits (rows x tokens x V) of
  that slice of engine.make_forward(output="hidden")'s output: the head applied a slice at a time,
  so a device never holds more than rows x tokens x V/tp logits (forward_logits)."""
  fam = families.of(cfg)
  specs = sharding.param_specs(cfg, plan.tp)
  edge_specs = {k: specs[k] for k in fam.edge_keys if k in specs}
  tp_axis = TENSOR_AXIS if plan.tp > 1 else None

  def local(p_edges, h_RxCxD):
    out = fam.head(p_edges, h_RxCxD, cfg, tp_axis)
    return mask_padding(out, cfg, plan, tp_axis).astype(fam.out_dtype(cfg))

  mapped = compat.shard_map(local, mesh, in_specs=(edge_specs, sharding.SPECS.replicated),
                            out_specs=P(None, None, TENSOR_AXIS))

  def chunk(params, hidden_BxTxD, row0, tok0):
    h = jax.lax.dynamic_slice(hidden_BxTxD, (row0, tok0, 0), (rows, tokens, cfg.d_model))
    return unpad_output(mapped({k: params[k] for k in edge_specs}, h), cfg)

  return chunk
