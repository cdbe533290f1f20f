"""The Llama family (Llama, Mistral, Qwen2): pure functions over a stacked parameter tree.

The engine sees four seams and never learns what a Llama is: `embed` (vocab-parallel token
lookup), `block_apply` (one layer, Megatron psums inside), `head` (final RMSNorm and the local
vocab shard of the logits) and `param_layout` (its sharding roles). `forward` is the
single-device reference built from the same three functions. The math follows Hugging Face's
`modeling_llama` (RMSNorm in float32, rotate_half RoPE, repeat_kv GQA, SwiGLU) so that its
float32 logits are the peer the tests compare against.

Tree (weights [in, out], layers stacked on axis 0):
  ln1.scale LxD, attn.{wq LxDxA, wk LxDxK, wv LxDxK, wo LxAxD, [bq LxA, bk LxK, bv LxK]},
  ln2.scale LxD, mlp.{w_gate LxDxF, w_up LxDxF, w_down LxFxD},
  embed.table VxD, final_norm.scale D, [lm_head.w DxV when untied]
with A = n_heads x head_dim and K = kv_heads x head_dim.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxpart.models import attention
from jaxpart.models.spec import kv_heads_split
from jaxpart.config import ModelConfig

Params = dict[str, Any]
# attend(q_BxTxHqlxE, k_BxTxHkvlxE, v_BxTxHkvlxE, state) -> (o_BxTxHqlxE, state); Hkvl divides Hql
Attend = Callable[[jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]

EDGE_KEYS = ("embed", "final_norm", "lm_head")  # everything else is per layer (stacked)


def _check_arch(cfg: ModelConfig) -> None:
  if cfg.arch != "llama":
    raise ValueError(f"ModelConfig.arch = {cfg.arch!r}: jaxpart.models.llama needs arch 'llama'")


def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
  """Random parameters in cfg.dtype: weights N(0, 1/fan_in), norm scales U(0.5, 1.5) and
  biases N(0, 0.1^2), so a dropped norm or bias changes the output in every test."""
  _check_arch(cfg)
  L, D, A, K, F, V = (cfg.layers, cfg.d_model, cfg.attn_dim, cfg.kv_dim, cfg.d_ff, cfg.vocab)
  dt = jnp.dtype(cfg.dtype)
  keys = iter(jax.random.split(key, 16))

  def w(*shape):
    return (jax.random.normal(next(keys), shape, jnp.float32) * shape[-2] ** -0.5).astype(dt)

  def scale(*shape):
    return jax.random.uniform(next(keys), shape, jnp.float32, 0.5, 1.5).astype(dt)

  def bias(*shape):
    return (0.1 * jax.random.normal(next(keys), shape, jnp.float32)).astype(dt)

  attn = {"wq": w(L, D, A), "wk": w(L, D, K), "wv": w(L, D, K), "wo": w(L, A, D)}
  if cfg.qkv_bias:
    attn |= {"bq": bias(L, A), "bk": bias(L, K), "bv": bias(L, K)}
  params = {
      "ln1": {"scale": scale(L, D)},
      "attn": attn,
      "ln2": {"scale": scale(L, D)},
      "mlp": {"w_gate": w(L, D, F), "w_up": w(L, D, F), "w_down": w(L, F, D)},
      "embed": {"table": jax.random.normal(next(keys), (V, D), jnp.float32).astype(dt)},
      "final_norm": {"scale": scale(D)},
  }
  if not cfg.tie_embeddings:
    params["lm_head"] = {"w": w(D, V)}
  return params


def param_shapes(cfg: ModelConfig) -> Params:
  """ShapeDtypeStructs of the tree without allocating (llama3-70b is 141 GB in bf16)."""
  return jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))


def split_edges(params: Params) -> tuple[Params, Params]:
  """(stacked layer tree, edge tree) of a full tree."""
  layers = {k: v for k, v in params.items() if k not in EDGE_KEYS}
  edges = {k: v for k, v in params.items() if k in EDGE_KEYS}
  return layers, edges


def param_layout(cfg: ModelConfig, tp: int) -> Params:
  """The tree's sharding roles (families.LAYOUT_ROLES) for tensor degree tp: Megatron splits as
  the dense block's (wq/wk/wv/w_gate/w_up and the q/k/v biases by output column, wo/w_down by
  input row); wk/wv/bk/bv whole on every tensor shard when tp does not divide the K/V heads
  (spec.kv_heads_split). The embedding split by vocab rows, the untied LM head by vocab
  columns; the final norm whole."""
  split = kv_heads_split(cfg, tp)
  kv, kv_bias = ("col", "layer_col") if split else ("layer_whole", "layer")
  attn = {"wq": "col", "wk": kv, "wv": kv, "wo": "row"}
  if cfg.qkv_bias:
    attn |= {"bq": "layer_col", "bk": kv_bias, "bv": kv_bias}
  layout = {"ln1": {"scale": "layer"}, "attn": attn, "ln2": {"scale": "layer"},
            "mlp": {"w_gate": "col", "w_up": "col", "w_down": "row"},
            "embed": {"table": "vocab_rows"}, "final_norm": {"scale": "whole"}}
  if not cfg.tie_embeddings:
    layout["lm_head"] = {"w": "vocab_cols"}
  return layout


# --- math --------------------------------------------------------------------------------------

def rms_norm(x_BxTxD, scale_D, eps: float):
  """Hugging Face's LlamaRMSNorm: normalise in float32 (wider for float64), round to the
  activation dtype, then multiply by the scale in that dtype."""
  dt = x_BxTxD.dtype
  xa = x_BxTxD.astype(attention.acc_dtype(dt))
  y = xa * jax.lax.rsqrt(jnp.mean(jnp.square(xa), axis=-1, keepdims=True) + eps)
  return scale_D.astype(dt) * y.astype(dt)


def inv_freq(cfg: ModelConfig) -> np.ndarray:
  """RoPE inverse frequencies (head_dim / 2), with Llama-3.1 scaling when configured
  (transformers' _compute_llama3_parameters), computed in float64 and rounded to float32."""
  e = cfg.head_dim
  freq = 1.0 / (cfg.rope_theta ** (np.arange(0, e, 2, dtype=np.float64) / e))
  rs = cfg.rope_scaling
  if rs is not None:
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / freq
    scaled = np.where(wavelen > low_wavelen, freq / rs.factor, freq)
    smooth = ((rs.original_max_position_embeddings / wavelen - rs.low_freq_factor)
              / (rs.high_freq_factor - rs.low_freq_factor))
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    freq = np.where(medium, smoothed, scaled)
  return freq.astype(np.float32)


def rope(x_BxTxHxE, pos_T, cfg: ModelConfig):
  """Rotate q or k by absolute positions pos_T, halves convention (rotate_half): a chunk that
  starts at token 4096 passes pos_T = 4096 + arange(T); B x T positions rotate each row at
  its own (decoding sequences of different lengths)."""
  dt = x_BxTxHxE.dtype
  # pos is T (every row) or B x T (rows at their own positions while decoding)
  freqs = pos_T.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq(cfg))
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  emb_BxTx1xE = emb[None, :, None, :] if emb.ndim == 2 else emb[:, :, None, :]
  cos = jnp.cos(emb_BxTx1xE).astype(dt)
  sin = jnp.sin(emb_BxTx1xE).astype(dt)
  x1, x2 = jnp.split(x_BxTxHxE, 2, axis=-1)
  return x_BxTxHxE * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def _proj(x, w, b=None):
  """x @ w (+ b): accumulate in float32 (float64 for float64), round once to x's dtype."""
  acc = attention.acc_dtype(x.dtype)
  y = jnp.einsum("...d,df->...f", x, w, preferred_element_type=acc)
  if b is not None:
    y = y + b.astype(acc)
  return y.astype(x.dtype)


def _local_kv_heads(cfg: ModelConfig, hq_local: int, tp_axis: str):
  """Indices of the K/V heads this tensor shard's query heads read, when K/V are replicated.

  Query head j reads K/V head j // g (g = n_heads / kv_heads). A shard holding hq query heads
  inside one group needs one K/V head; when its heads straddle groups unevenly (e.g. 6 heads
  over 3 K/V heads at tp 2) it takes one K/V head per query head, so Hkvl always divides Hql.
  """
  g = cfg.n_heads // cfg.kv_heads
  first = jax.lax.axis_index(tp_axis) * hq_local
  if g % hq_local == 0:
    return (first // g)[None]
  return (first + jnp.arange(hq_local)) // g


def block_apply(p: Params, x_BxTxD, pos_T, cfg: ModelConfig, attend: Attend, state=None,
                tp_axis: str | None = None):
  """One Llama block on one layer's parameters, possibly a Megatron shard.

  With tp_axis set, wq/wk/wv/bq/bk/bv/w_gate/w_up hold column shards and wo/w_down row shards
  (wk/wv/bk/bv whole when `kv_heads_split` is false); the partial products after wo and
  w_down are psum-ed over tp_axis in the activation dtype. Local head counts come from the
  shard shapes.
  """
  dt = x_BxTxD.dtype
  b, t, _ = x_BxTxD.shape
  e = cfg.head_dim
  a = p["attn"]

  def reduce(partial):
    return jax.lax.psum(partial, tp_axis) if tp_axis else partial

  h_BxTxD = rms_norm(x_BxTxD, p["ln1"]["scale"], cfg.ln_eps)
  hq = a["wq"].shape[-1] // e
  hkv = a["wk"].shape[-1] // e
  wk, wv, bk, bv = a["wk"], a["wv"], a.get("bk"), a.get("bv")
  if tp_axis is not None and hkv == cfg.kv_heads and hq != cfg.n_heads:
    # K/V replicated over the tensor axis: keep only the heads the local queries read.
    idx = _local_kv_heads(cfg, hq, tp_axis)
    d = wk.shape[0]
    wk, wv = (jnp.take(w.reshape(d, hkv, e), idx, axis=1).reshape(d, -1) for w in (wk, wv))
    if bk is not None:
      bk, bv = (jnp.take(v.reshape(hkv, e), idx, axis=0).reshape(-1) for v in (bk, bv))
    hkv = wk.shape[-1] // e
  q_BxTxHxE = rope(_proj(h_BxTxD, a["wq"], a.get("bq")).reshape(b, t, hq, e), pos_T, cfg)
  k_BxTxHxE = rope(_proj(h_BxTxD, wk, bk).reshape(b, t, hkv, e), pos_T, cfg)
  v_BxTxHxE = _proj(h_BxTxD, wv, bv).reshape(b, t, hkv, e)
  o_BxTxHxE, state = attend(q_BxTxHxE, k_BxTxHxE, v_BxTxHxE, state)
  x_BxTxD = x_BxTxD + reduce(_proj(o_BxTxHxE.reshape(b, t, hq * e), a["wo"]))

  h_BxTxD = rms_norm(x_BxTxD, p["ln2"]["scale"], cfg.ln_eps)
  m = p["mlp"]
  acc = attention.acc_dtype(dt)
  gate_BxTxF = jnp.einsum("btd,df->btf", h_BxTxD, m["w_gate"], preferred_element_type=acc)
  up_BxTxF = jnp.einsum("btd,df->btf", h_BxTxD, m["w_up"], preferred_element_type=acc)
  u_BxTxF = (jax.nn.silu(gate_BxTxF) * up_BxTxF).astype(dt)
  x_BxTxD = x_BxTxD + reduce(_proj(u_BxTxF, m["w_down"]))
  return x_BxTxD, state


def embed(table_VlxD, ids_BxT, tp_axis: str | None = None):
  """Token lookup. With tp_axis, the local table holds rows [i*Vl, (i+1)*Vl) for tensor index
  i: ids outside give zero rows and one psum assembles every row (exact: one term is
  non-zero)."""
  if tp_axis is None:
    return jnp.take(table_VlxD, ids_BxT, axis=0)
  vl = table_VlxD.shape[0]
  local_BxT = ids_BxT - jax.lax.axis_index(tp_axis) * vl
  inside_BxT = (local_BxT >= 0) & (local_BxT < vl)
  rows_BxTxD = jnp.take(table_VlxD, jnp.clip(local_BxT, 0, vl - 1), axis=0)
  return jax.lax.psum(jnp.where(inside_BxT[..., None], rows_BxTxD, 0), tp_axis)


def head(p_edges: Params, x_BxTxD, cfg: ModelConfig, tp_axis: str | None = None):
  """Final RMSNorm, then the float32 logits of the local vocab shard (B x T x Vl).

  The local shard is lm_head.w's columns, or the embedding table's local rows when tied; no
  collective here (tp_axis only names the axis), the caller reduces softmax or argmax.
  """
  del tp_axis
  h_BxTxD = rms_norm(x_BxTxD, p_edges["final_norm"]["scale"], cfg.ln_eps)
  acc = attention.acc_dtype(h_BxTxD.dtype)
  if cfg.tie_embeddings:
    return jnp.einsum("btd,vd->btv", h_BxTxD, p_edges["embed"]["table"],
                      preferred_element_type=acc)
  return jnp.einsum("btd,dv->btv", h_BxTxD, p_edges["lm_head"]["w"], preferred_element_type=acc)


def reference_attend(q_BxTxHqxE, k_BxTxHkvxE, v_BxTxHkvxE, state):
  """Full causal attention with each K/V head repeated for its query group (HF's repeat_kv)."""
  rep = q_BxTxHqxE.shape[2] // k_BxTxHkvxE.shape[2]
  k, v = (jnp.repeat(a, rep, axis=2) for a in (k_BxTxHkvxE, v_BxTxHkvxE))
  return attention.full_causal(q_BxTxHqxE, k, v), state


def forward(params: Params, ids_BxT, cfg: ModelConfig):
  """The single-device reference: token ids (B x T, int) -> float32 logits (B x T x V).

  Runs in the dtype of `params` (cast them to float32 for tight checks).
  """
  _check_arch(cfg)
  layers, edges = split_edges(params)
  pos_T = jnp.arange(ids_BxT.shape[1])
  x_BxTxD = embed(edges["embed"]["table"], ids_BxT)

  def one_layer(x, p):
    y, _ = block_apply(p, x, pos_T, cfg, reference_attend)
    return y, None

  x_BxTxD, _ = jax.lax.scan(one_layer, x_BxTxD, layers)
  return head(edges, x_BxTxD, cfg).astype(jnp.float32)


def random_ids(cfg: ModelConfig, batch: int, seq: int, key: jax.Array):
  return jax.random.randint(key, (batch, seq), 0, cfg.vocab, jnp.int32)
