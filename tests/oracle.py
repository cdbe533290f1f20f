"""An independent float64 NumPy oracle of the dense pre-LN stack, written from the math.

It shares no code with jaxpart: the reference (`model.forward`) and the engine both run
`model.block_apply`, so a bug there is invisible when they are compared with each other. This
file is what they are both compared with. Parameters are the nested tree jaxpart uses
({ln1, attn, ln2, mlp}, layers stacked on axis 0); everything is converted to float64 first.
"""

import math

import numpy as np


def _f64(a):
  return np.asarray(a, np.float64)


def layernorm(x_BxTxD, scale_D, bias_D, eps):
  """(x - mean) / sqrt(var + eps) * scale + bias over the last axis; var is the biased one."""
  mean = x_BxTxD.mean(-1, keepdims=True)
  var = ((x_BxTxD - mean) ** 2).mean(-1, keepdims=True)
  return (x_BxTxD - mean) / np.sqrt(var + eps) * scale_D + bias_D


def gelu_tanh(x):
  """GELU, tanh approximation (jax.nn.gelu's default approximate=True)."""
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def causal_attention(q_BxTxHxE, k_BxTxHxE, v_BxTxHxE):
  """softmax(q k^T / sqrt(E)) v, token i attending to tokens 0..i, every head separately."""
  t, e = q_BxTxHxE.shape[1], q_BxTxHxE.shape[-1]
  s_BxHxTxT = np.einsum("bqhe,bkhe->bhqk", q_BxTxHxE, k_BxTxHxE) / math.sqrt(e)
  future_TxT = np.triu(np.ones((t, t), bool), k=1)
  s_BxHxTxT = np.where(future_TxT, -np.inf, s_BxHxTxT)
  s_BxHxTxT = s_BxHxTxT - s_BxHxTxT.max(-1, keepdims=True)
  p_BxHxTxT = np.exp(s_BxHxTxT)
  p_BxHxTxT /= p_BxHxTxT.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhe->bqhe", p_BxHxTxT, v_BxTxHxE)


def block(p, x_BxTxD, head_dim, eps):
  """x + Attn(LN1(x)), then + MLP(LN2(.)): one layer's parameters (no layer axis)."""
  b, t, _ = x_BxTxD.shape
  a = p["attn"]
  h_BxTxD = layernorm(x_BxTxD, p["ln1"]["scale"], p["ln1"]["bias"], eps)
  heads = a["wq"].shape[-1] // head_dim
  q, k, v = ((h_BxTxD @ a[n]).reshape(b, t, heads, head_dim) for n in ("wq", "wk", "wv"))
  o_BxTxA = causal_attention(q, k, v).reshape(b, t, heads * head_dim)
  x_BxTxD = x_BxTxD + o_BxTxA @ a["wo"]
  h_BxTxD = layernorm(x_BxTxD, p["ln2"]["scale"], p["ln2"]["bias"], eps)
  return x_BxTxD + gelu_tanh(h_BxTxD @ p["mlp"]["w_in"]) @ p["mlp"]["w_out"]


def _layer(params, i):
  return {g: {n: _f64(a)[i] for n, a in sub.items()} for g, sub in params.items()}


def forward(params, x_BxTxD, head_dim, eps):
  """The L-layer stack in float64; params as jaxpart's nested tree (any array type)."""
  y = _f64(x_BxTxD)
  for i in range(_f64(params["ln1"]["scale"]).shape[0]):
    y = block(_layer(params, i), y, head_dim, eps)
  return y


def rel_err(got, want):
  """max|got - want| / max|want|, in float64."""
  got, want = _f64(got), _f64(want)
  return float(np.abs(got - want).max() / np.abs(want).max())
