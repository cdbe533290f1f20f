"""The dense pre-LN transformer stack in Flax (linen) and its single-device reference forward.

Linen, not NNX: its parameters are a plain pytree with the layers stacked on a leading axis,
which is exactly what shard_map, lax.scan over layers, optax and orbax all take without
split/merge glue. The block math lives in `block_apply`, a pure function over one layer's
parameters, so the reference and the pipeline engine run the very same code; the engine only
adds a `psum` over its tensor axis where Megatron puts one.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpart.models import attention
from jaxpart.config import ModelConfig

Params = dict[str, Any]
# attend(q_BxTxHxE, k_BxTxHxE, v_BxTxHxE, state) -> (o_BxTxHxE, state)
Attend = Callable[[jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


def _stacked_init(key, shape, dtype):
  """LeCun normal per layer: fan-in is the second-to-last axis, the layer axis is a batch."""
  return nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))(key, shape, dtype)


class DenseStack(nn.Module):
  """L pre-LN blocks (causal MHA + GELU MLP, residual each); parameters stacked on axis 0."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD):
    c = self.cfg
    dt = jnp.dtype(c.dtype)
    L, D, A, F = c.layers, c.d_model, c.attn_dim, c.d_ff

    def ln(name):
      return {"scale": self.param(f"{name}_scale", nn.initializers.ones, (L, D), dt),
              "bias": self.param(f"{name}_bias", nn.initializers.zeros, (L, D), dt)}

    params = {
        "ln1": ln("ln1"),
        "attn": {n: self.param(n, _stacked_init, (L, D, A), dt) for n in ("wq", "wk", "wv")}
                | {"wo": self.param("wo", _stacked_init, (L, A, D), dt)},
        "ln2": ln("ln2"),
        "mlp": {"w_in": self.param("w_in", _stacked_init, (L, D, F), dt),
                "w_out": self.param("w_out", _stacked_init, (L, F, D), dt)},
    }
    return forward(params, x_BxTxD, c)


def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
  """Parameters as the nested tree every other module uses: {ln1, attn, ln2, mlp}."""
  variables = DenseStack(cfg).init(key, jnp.zeros((1, 1, cfg.d_model), cfg.dtype))
  return nest_params(variables["params"])


def param_shapes(cfg: ModelConfig) -> Params:
  """ShapeDtypeStructs of the tree, without allocating (the paper preset is 6.4 GB)."""
  return jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))


def nest_params(flat: dict[str, Any]) -> Params:
  """Flax's flat names (ln1_scale, wq, w_in, ...) -> the nested tree."""
  return {
      "ln1": {"scale": flat["ln1_scale"], "bias": flat["ln1_bias"]},
      "attn": {n: flat[n] for n in ("wq", "wk", "wv", "wo")},
      "ln2": {"scale": flat["ln2_scale"], "bias": flat["ln2_bias"]},
      "mlp": {"w_in": flat["w_in"], "w_out": flat["w_out"]},
  }


def cast_params(params: Params, dtype) -> Params:
  return jax.tree.map(lambda a: a.astype(dtype), params)


def layer_slice(params: Params, i) -> Params:
  return jax.tree.map(lambda a: a[i], params)


def layernorm(x_BxTxD, p, eps: float):
  acc = attention.acc_dtype(x_BxTxD.dtype)
  xa = x_BxTxD.astype(acc)
  mean = xa.mean(-1, keepdims=True)
  var = jnp.square(xa - mean).mean(-1, keepdims=True)
  y = (xa - mean) * jax.lax.rsqrt(var + eps)
  return (y * p["scale"].astype(acc) + p["bias"].astype(acc)).astype(x_BxTxD.dtype)


def _matmul(x, w):
  """Activation dtype in, float32 (float64 for float64 inputs) accumulation out."""
  return jnp.einsum("...d,df->...f", x, w, preferred_element_type=attention.acc_dtype(x.dtype))


def block_apply(p: Params, x_BxTxD, head_dim: int, eps: float, attend: Attend, state=None,
                tp_axis: str | None = None):
  """One pre-LN block on one layer's parameters (possibly a tensor-parallel shard).

  With tp_axis set, wq/wk/wv/w_in hold a column shard and wo/w_out a row shard: the partial
  products after wo and w_out are summed with one psum each, in the activation dtype, as
  Megatron does.
  """
  dt = x_BxTxD.dtype
  b, t, _ = x_BxTxD.shape

  def reduce(partial_f32):
    partial = partial_f32.astype(dt)
    if not tp_axis:
      return partial
    with jax.named_scope("tensor_allreduce"):   # names the op in profiler traces
      return jax.lax.psum(partial, tp_axis)

  with jax.named_scope("attention"):
    h_BxTxD = layernorm(x_BxTxD, p["ln1"], eps)
    a = p["attn"]
    heads = a["wq"].shape[-1] // head_dim
    q, k, v = (_matmul(h_BxTxD, a[n]).astype(dt).reshape(b, t, heads, head_dim)
               for n in ("wq", "wk", "wv"))
    o_BxTxHxE, state = attend(q, k, v, state)
    x_BxTxD = x_BxTxD + reduce(_matmul(o_BxTxHxE.reshape(b, t, heads * head_dim), a["wo"]))

  with jax.named_scope("mlp"):
    h_BxTxD = layernorm(x_BxTxD, p["ln2"], eps)
    u_BxTxF = jax.nn.gelu(_matmul(h_BxTxD, p["mlp"]["w_in"])).astype(dt)
    x_BxTxD = x_BxTxD + reduce(_matmul(u_BxTxF, p["mlp"]["w_out"]))
  return x_BxTxD, state


def _full_attend(q, k, v, state):
  return attention.full_causal(q, k, v), state


def forward(params: Params, x_BxTxD, cfg: ModelConfig):
  """The single-device, unpartitioned reference every correctness check compares against.

  Runs in the dtype of `x`: each layer's parameters are cast to it inside the layer loop, so a
  float32 check of a bf16 model never holds a float32 copy of the whole model (12.9 GB for the
  paper preset), one layer's at most.
  """
  def one_layer(x, p):
    y, _ = block_apply(cast_params(p, x.dtype), x, cfg.head_dim, cfg.ln_eps, _full_attend)
    return y, None

  y_BxTxD, _ = jax.lax.scan(one_layer, x_BxTxD, params)
  return y_BxTxD


def param_count(params: Params) -> int:
  return sum(int(a.size) for a in jax.tree.leaves(params))


def random_input(cfg: ModelConfig, batch: int, seq: int, key: jax.Array, dtype=None):
  return jax.random.normal(key, (batch, seq, cfg.d_model), jnp.float32).astype(dtype or cfg.dtype)


def randomize_norms(params: Params, key: jax.Array) -> Params:
  """LayerNorm scales 1 + 0.5 N(0,1) and biases 0.5 N(0,1), each leaf in its own dtype.

  Flax initialises scale 1 and bias 0, under which a dropped bias, a missing scale or ln1's
  parameters used for ln2 change nothing; every numerical check runs with these instead.
  """
  out = dict(params)
  for i, name in enumerate(("ln1", "ln2")):
    ks, kb = jax.random.split(jax.random.fold_in(key, i))
    s, b = params[name]["scale"], params[name]["bias"]
    out[name] = {"scale": (1.0 + 0.5 * jax.random.normal(ks, s.shape, jnp.float32)).astype(s.dtype),
                 "bias": (0.5 * jax.random.normal(kb, b.shape, jnp.float32)).astype(b.dtype)}
  return out
