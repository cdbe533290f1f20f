"""The Llama family's name map between its tree and Hugging Face's tensor names.

It lives with the family (as levanter keeps each family's conversion with it); the generic
safetensors reader and writer in checkpoint/hf.py ask the family for it (Family.hf_names).

Hugging Face stores linear weights as [out, in]; jaxpart's are [in, out], so every projection
and the LM head are transposed on the way in and out. The embedding table is [V, D] in both.
"""

from __future__ import annotations

from jaxpart.config import ModelConfig
from jaxpart.models.spec import HfEntry as Entry

# (tree path inside one layer, HF name after "model.layers.N.", transposed)
_LAYER = (
    (("ln1", "scale"), "input_layernorm.weight", False),
    (("attn", "wq"), "self_attn.q_proj.weight", True),
    (("attn", "wk"), "self_attn.k_proj.weight", True),
    (("attn", "wv"), "self_attn.v_proj.weight", True),
    (("attn", "wo"), "self_attn.o_proj.weight", True),
    (("ln2", "scale"), "post_attention_layernorm.weight", False),
    (("mlp", "w_gate"), "mlp.gate_proj.weight", True),
    (("mlp", "w_up"), "mlp.up_proj.weight", True),
    (("mlp", "w_down"), "mlp.down_proj.weight", True),
)
_BIAS = (
    (("attn", "bq"), "self_attn.q_proj.bias", False),
    (("attn", "bk"), "self_attn.k_proj.bias", False),
    (("attn", "bv"), "self_attn.v_proj.bias", False),
)
EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"
# Buffers some older checkpoints carry; they are recomputed, never read.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def entries(cfg: ModelConfig) -> list[Entry]:
  """Every tensor of the model in Hugging Face's order: embedding, layers, norm, head.

  A tied model has no lm_head.weight (save_pretrained drops the duplicate)."""
  out = [Entry(EMBED, ("embed", "table"), None, False)]
  per_layer = _LAYER + (_BIAS if cfg.qkv_bias else ())
  for i in range(cfg.layers):
    out += [Entry(f"model.layers.{i}.{name}", path, i, t) for path, name, t in per_layer]
  out.append(Entry(FINAL_NORM, ("final_norm", "scale"), None, False))
  if not cfg.tie_embeddings:
    out.append(Entry(LM_HEAD, ("lm_head", "w"), None, True))
  return out


def is_ignored(hf_name: str, cfg: ModelConfig) -> bool:
  """Tensors a file may hold that jaxpart does not read: rotary buffers, and a tied model's
  duplicate lm_head.weight."""
  return hf_name.endswith(IGNORED_SUFFIXES) or (cfg.tie_embeddings and hf_name == LM_HEAD)
