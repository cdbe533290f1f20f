"""The seam between the one engine and the model families (design.md section 10).

What differs between the seed's dense block and the Llama family sits here, as one frozen
record per family: how parameters are made, which leaves are per layer (stacked, split over
the stage axis) and which sit at the pipeline's edges, what enters stage 0 and leaves the last
stage, and the block itself. The engine, the planner and the checks read a Family and never
ask which one it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxpart.models import llama
from jaxpart.models import dense as model
from jaxpart.config import ModelConfig

Params = dict[str, Any]


@dataclass(frozen=True)
class Family:
  """One model family as the engine sees it.

  block(p_layer, x_BxTxD, pos_T, cfg, attend, state, tp_axis) -> (x_BxTxD, state)
  embed(p_edges, unit, cfg, tp_axis) -> x_RxCxD: the stage-0 input of one unit (hidden
    vectors for dense, token ids for Llama, looked up vocab-parallel)
  head(p_edges, x_RxCxD, cfg, tp_axis) -> out_RxCxWl: this tensor shard's slice of the output
    (dense: its slice of the hidden vector; Llama: its vocab shard of the logits)
  reference(params, inp, cfg) -> out: the single-device forward every check compares with
  random_input(cfg, batch, seq, key) -> what enters stage 0 (hidden vectors or token ids)
  """

  name: str
  init_params: Callable[[ModelConfig, jax.Array], Params]
  param_shapes: Callable[[ModelConfig], Params]
  reference: Callable[[Params, jax.Array, ModelConfig], jax.Array]
  block: Callable[..., tuple[jax.Array, Any]]
  embed: Callable[..., jax.Array]
  head: Callable[..., jax.Array]
  random_input: Callable[..., jax.Array]
  edge_keys: tuple[str, ...]
  tokens_in: bool                  # input is B x T token ids (else B x T x d_model vectors)

  def split(self, params: Params) -> tuple[Params, Params]:
    """(stacked per-layer leaves, edge leaves) of a full tree."""
    return ({k: v for k, v in params.items() if k not in self.edge_keys},
            {k: v for k, v in params.items() if k in self.edge_keys})

  def out_width(self, cfg: ModelConfig) -> int:
    """Last axis of the output: the vocabulary's logits, or the hidden vector."""
    return cfg.vocab if self.tokens_in else cfg.d_model

  def out_dtype(self, cfg: ModelConfig):
    """Logits are float32 (as Hugging Face returns them); hidden vectors the model dtype."""
    return jnp.float32 if self.tokens_in else jnp.dtype(cfg.dtype)


def kv_heads_local(cfg: ModelConfig, tp: int) -> int:
  """K/V heads one tensor shard caches: split over tp when tp divides them; otherwise the
  shard's query heads read one replicated head (or one each when they straddle groups)."""
  if cfg.kv_heads % tp == 0:
    return cfg.kv_heads // tp
  hq, g = cfg.n_heads // tp, cfg.n_heads // cfg.kv_heads
  return 1 if g % hq == 0 else hq


def _dense_block(p, x_BxTxD, pos_T, cfg, attend, state=None, tp_axis=None):
  del pos_T  # no positional encoding in the seed's block
  return model.block_apply(p, x_BxTxD, cfg.head_dim, cfg.ln_eps, attend, state, tp_axis)


def _dense_head(p_edges, y_RxCxD, cfg, tp_axis):
  """The tensor shard's slice of the (replicated) hidden vector."""
  if tp_axis is None:
    return y_RxCxD
  tp = jax.lax.psum(1, tp_axis)
  w = cfg.d_model // tp
  return jax.lax.dynamic_slice_in_dim(y_RxCxD, jax.lax.axis_index(tp_axis) * w, w, axis=-1)


def _llama_embed(p_edges, ids_RxC, cfg, tp_axis):
  table = p_edges["embed"]["table"]
  return llama.embed(table, ids_RxC, tp_axis).astype(table.dtype)


DENSE = Family(
    name="dense", init_params=model.init_params, param_shapes=model.param_shapes,
    reference=model.forward, block=_dense_block,
    embed=lambda p_edges, x_RxCxD, cfg, tp_axis: x_RxCxD, head=_dense_head,
    random_input=lambda cfg, batch, seq, key: model.random_input(cfg, batch, seq, key),
    edge_keys=(),
    tokens_in=False)

LLAMA = Family(
    name="llama", init_params=llama.init_params, param_shapes=llama.param_shapes,
    reference=llama.forward, block=llama.block_apply, embed=_llama_embed, head=llama.head,
    random_input=llama.random_ids, edge_keys=llama.EDGE_KEYS, tokens_in=True)

FAMILIES = {"dense": DENSE, "llama": LLAMA}


def of(cfg: ModelConfig) -> Family:
  return FAMILIES[cfg.arch]


def param_shapes(cfg: ModelConfig) -> Params:
  """ShapeDtypeStructs of the config's family's parameter tree, nothing allocated."""
  return of(cfg).param_shapes(cfg)
