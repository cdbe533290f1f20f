"""The seam between the one engine and the model families (design.md section 10).

What differs between the seed's dense block and the Llama family sits here, as one frozen
record per family: how parameters are made, which leaves are per layer (stacked, split over
the stage axis) and which sit at the pipeline's edges, what enters stage 0 and leaves the last
stage, and the block itself. The engine, the planner and the checks read a Family and never
ask which one it is.

Adding a family: one module in models/ (its math, its FamilySpec, its Hugging Face name map),
then `register(Family(...))`, which joins both this registry and the jax-free one in spec.py
(tests/test_family_seam.py registers a family from a test file alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxpart.models import llama, llama_hf, spec as specs
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
  param_layout(cfg, tp) -> the tree's shape with a role per leaf (LAYOUT_ROLES), which
    runtime/sharding.py turns into PartitionSpecs
  randomize_norms(params, key) -> params with random norm scales and biases, where init_params
    leaves them at 1 and 0 (None: init_params already draws them)
  hf_names: the Hugging Face name map (entries(cfg), is_ignored(name, cfg)); None: no export
  """

  init_params: Callable[[ModelConfig, jax.Array], Params]
  param_shapes: Callable[[ModelConfig], Params]
  reference: Callable[[Params, jax.Array, ModelConfig], jax.Array]
  block: Callable[..., tuple[jax.Array, Any]]
  embed: Callable[..., jax.Array]
  head: Callable[..., jax.Array]
  random_input: Callable[..., jax.Array]
  edge_keys: tuple[str, ...]
  spec: specs.FamilySpec           # the jax-free shapes placement/ and cost/ read
  param_layout: Callable[[ModelConfig, int], Params]
  randomize_norms: Callable[[Params, jax.Array], Params] | None = None
  hf_names: Any = None

  @property
  def name(self) -> str:
    return self.spec.name

  @property
  def tokens_in(self) -> bool:
    """Input is B x T token ids (else B x T x d_model vectors), output float32 logits."""
    return self.spec.token_edges

  def random_params(self, cfg: ModelConfig, key: jax.Array) -> Params:
    """Parameters every numerical check runs with: no norm left at scale 1 and bias 0."""
    params = self.init_params(cfg, key)
    return params if self.randomize_norms is None else self.randomize_norms(
        params, jax.random.fold_in(key, 2))

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


# Roles a param_layout names per leaf (runtime/sharding.py maps each to a PartitionSpec; L is
# the stacked layer axis, split over stages): weights split over tensor by output column or by
# input row, a layer's vector split over tensor or whole, a layer leaf whole on every tensor
# shard, an edge leaf whole, the embedding split by vocab rows, the LM head by vocab columns.
LAYOUT_ROLES = ("col", "row", "layer_col", "layer", "layer_whole", "whole", "vocab_rows",
                "vocab_cols")


def _dense_layout(cfg: ModelConfig, tp: int) -> Params:
  del cfg, tp
  ln = {"scale": "layer", "bias": "layer"}
  return {"ln1": ln, "attn": {"wq": "col", "wk": "col", "wv": "col", "wo": "row"},
          "ln2": dict(ln), "mlp": {"w_in": "col", "w_out": "row"}}


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
    init_params=model.init_params, param_shapes=model.param_shapes,
    reference=model.forward, block=_dense_block,
    embed=lambda p_edges, x_RxCxD, cfg, tp_axis: x_RxCxD, head=_dense_head,
    random_input=lambda cfg, batch, seq, key: model.random_input(cfg, batch, seq, key),
    edge_keys=(), spec=specs.DENSE, param_layout=_dense_layout,
    randomize_norms=model.randomize_norms)

LLAMA = Family(
    init_params=llama.init_params, param_shapes=llama.param_shapes,
    reference=llama.forward, block=llama.block_apply, embed=_llama_embed, head=llama.head,
    random_input=llama.random_ids, edge_keys=llama.EDGE_KEYS, spec=specs.LLAMA,
    param_layout=llama.param_layout, hf_names=llama_hf)

FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
  """Join the engine's registry and the jax-free one (ModelConfig accepts its arch)."""
  specs.register(family.spec)
  FAMILIES[family.name] = family
  return family


def unregister(name: str) -> None:
  """Leave both registries (a test's family, when the test is done)."""
  FAMILIES.pop(name, None)
  specs.unregister(name)


register(DENSE)
register(LLAMA)


def of(cfg: ModelConfig) -> Family:
  return FAMILIES[cfg.arch]


def param_shapes(cfg: ModelConfig) -> Params:
  """ShapeDtypeStructs of the config's family's parameter tree, nothing allocated."""
  return of(cfg).param_shapes(cfg)
