"""A third family joins from this file alone: a parallel attention + MLP block (GPT-J,
GPT-NeoX: x + attn(ln(x)) + mlp(ln(x)), one shared LayerNorm, one psum a layer), token ids in,
vocab-parallel logits out, registered with families.register and nothing in jaxpart/ edited.
It runs through the engine in both placements (baseline tp x pp, layer-wise with token chunks;
16 devices) against its own single-device reference, written here independently: the
forward, every parameter's gradient, and greedy decoding."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import require_devices
from jaxpart import config
from jaxpart.cost import forward as costmodel
from jaxpart.models import families
from jaxpart.models.spec import FamilySpec
from jaxpart.placement import memory, planner
from jaxpart.runtime import engine, generate, runs, sharding

NAME = "parallel-toy"
EDGES = ("embed", "final_norm", "lm_head")
PLACEMENTS = {"layerwise": dict(tp=8, chunk_tokens=4, kv_block=8),
              "baseline": dict(tp=8, pp=2)}
LENS = [9, 5, 12, 7]      # prompts of different lengths in one batch
NEW = 6


# --- the family: its math, written for the engine's seam --------------------------------------

def _ln(x_BxTxD, p, eps):
  x = x_BxTxD.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  y = (x - mean) * jax.lax.rsqrt(jnp.square(x - mean).mean(-1, keepdims=True) + eps)
  return (y * p["scale"] + p["bias"]).astype(x_BxTxD.dtype)


def _rope(x_BxTxHxE, pos):
  """Rotary positions, pos T (every row) or B x T (decoding rows at their own positions)."""
  e = x_BxTxHxE.shape[-1]
  inv = 1.0 / (10000.0 ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e))
  ang = pos.astype(jnp.float32)[..., None] * inv
  ang = ang[None, :, None, :] if ang.ndim == 2 else ang[:, :, None, :]
  x1, x2 = jnp.split(x_BxTxHxE, 2, axis=-1)
  cos, sin = jnp.cos(ang), jnp.sin(ang)
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).astype(x_BxTxHxE.dtype)


def _block(p, x_BxTxD, pos, cfg, attend, state=None, tp_axis=None):
  """One parallel block on a Megatron shard: attention and MLP read the same LayerNorm output
  and their partial products are summed before one psum."""
  b, t, _ = x_BxTxD.shape
  e, a = cfg.head_dim, p["attn"]
  h = _ln(x_BxTxD, p["ln"], cfg.ln_eps)
  heads = a["wq"].shape[-1] // e
  q, k, v = ((h @ a[n]).reshape(b, t, heads, e) for n in ("wq", "wk", "wv"))
  o, state = attend(_rope(q, pos), _rope(k, pos), v, state)
  mlp = jax.nn.gelu(h @ p["mlp"]["w_in"]) @ p["mlp"]["w_out"]
  partial = o.reshape(b, t, heads * e) @ a["wo"] + mlp
  return x_BxTxD + (jax.lax.psum(partial, tp_axis) if tp_axis else partial), state


def _embed(p_edges, ids_RxC, cfg, tp_axis):
  """Vocab-parallel lookup: each tensor shard holds V/tp rows; one psum assembles them."""
  table = p_edges["embed"]["table"]
  if tp_axis is None:
    return table[ids_RxC]
  vl = table.shape[0]
  local = ids_RxC - jax.lax.axis_index(tp_axis) * vl
  inside = (local >= 0) & (local < vl)
  return jax.lax.psum(jnp.where(inside[..., None], table[jnp.clip(local, 0, vl - 1)], 0), tp_axis)


def _head(p_edges, x_RxCxD, cfg, tp_axis):
  """Final LayerNorm, then this shard's vocabulary columns of the logits, float32."""
  return (_ln(x_RxCxD, p_edges["final_norm"], cfg.ln_eps) @ p_edges["lm_head"]["w"]).astype(
      jnp.float32)


def _init(cfg, key):
  L, D, A, F, V = cfg.layers, cfg.d_model, cfg.attn_dim, cfg.d_ff, cfg.vocab
  ks = iter(jax.random.split(key, 16))

  def w(*shape):
    return jax.random.normal(next(ks), shape, jnp.float32) * shape[-2] ** -0.5

  def norm(*shape):   # random scale and bias, so a dropped or misplaced one shows
    return {"scale": jax.random.uniform(next(ks), shape, jnp.float32, 0.5, 1.5),
            "bias": 0.3 * jax.random.normal(next(ks), shape, jnp.float32)}

  return {"ln": norm(L, D),
          "attn": {"wq": w(L, D, A), "wk": w(L, D, A), "wv": w(L, D, A), "wo": w(L, A, D)},
          "mlp": {"w_in": w(L, D, F), "w_out": w(L, F, D)},
          "embed": {"table": jax.random.normal(next(ks), (V, D), jnp.float32)},
          "final_norm": norm(D), "lm_head": {"w": w(D, V)}}


def _layout(cfg, tp):
  del cfg, tp
  return {"ln": {"scale": "layer", "bias": "layer"},
          "attn": {"wq": "col", "wk": "col", "wv": "col", "wo": "row"},
          "mlp": {"w_in": "col", "w_out": "row"},
          "embed": {"table": "vocab_rows"}, "final_norm": {"scale": "whole", "bias": "whole"},
          "lm_head": {"w": "vocab_cols"}}


# --- its reference: one device, whole sequence, no cache, no shards ----------------------------

def _reference(params, ids_BxT, cfg):
  x = params["embed"]["table"][ids_BxT]
  b, t = ids_BxT.shape
  h_, e = cfg.n_heads, cfg.head_dim
  causal = np.tril(np.ones((t, t), bool))
  for l in range(cfg.layers):
    p = jax.tree.map(lambda a: a[l], {k: params[k] for k in ("ln", "attn", "mlp")})
    h = _ln(x, p["ln"], cfg.ln_eps)
    q, k, v = ((h @ p["attn"][n]).reshape(b, t, h_, e) for n in ("wq", "wk", "wv"))
    q, k = _rope(q, jnp.arange(t)), _rope(k, jnp.arange(t))
    s = jnp.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(e)
    pr = jax.nn.softmax(jnp.where(causal, s, -jnp.inf), axis=-1)
    o = jnp.einsum("bhqk,bkhe->bqhe", pr, v).reshape(b, t, h_ * e)
    x = x + o @ p["attn"]["wo"] + jax.nn.gelu(h @ p["mlp"]["w_in"]) @ p["mlp"]["w_out"]
  return _ln(x, params["final_norm"], cfg.ln_eps) @ params["lm_head"]["w"]


SPEC = FamilySpec(name=NAME, display="Parallel block (GPT-J)", token_edges=True, gated_mlp=False,
                  norm_bias=True, norms_per_layer=1, allreduces_per_layer=1, uses=("vocab",))
TOY = families.Family(
    init_params=_init,
    param_shapes=lambda cfg: jax.eval_shape(lambda k: _init(cfg, k), jax.random.key(0)),
    reference=_reference, block=_block, embed=_embed, head=_head,
    random_input=lambda cfg, b, t, key: jax.random.randint(key, (b, t), 0, cfg.vocab, jnp.int32),
    edge_keys=EDGES, spec=SPEC, param_layout=_layout)


@pytest.fixture(scope="module")
def toy():
  families.register(TOY)
  cfg = config.ModelConfig(layers=2, d_model=32, n_heads=8, head_dim=4, d_ff=64, arch=NAME,
                           vocab=64, dtype="float32")
  yield config.Setup(model=cfg, run=config.RunShape(len(LENS), max(LENS)),
                     hardware=config.HARDWARE_PRESETS["h100"])
  families.unregister(NAME)


def _rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


def test_the_config_and_the_planner_take_the_family(toy):
  cfg = toy.model
  assert cfg.family is SPEC
  # one shared LayerNorm with bias a layer, no gate; the edges: embedding, final LN, head
  assert cfg.params_per_layer == 4 * 32 * 32 + 2 * 32 * 64 + 2 * 32
  assert cfg.edge_params == 64 * 32 + 2 * 32 + 32 * 64
  shapes = TOY.param_shapes(cfg)
  assert cfg.total_params == sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
  with pytest.raises(config.ConfigError, match="rope_theta = 5.0: only arch 'llama' uses it"):
    config.ModelConfig(layers=2, d_model=32, n_heads=8, head_dim=4, d_ff=64, arch=NAME,
                       vocab=64, rope_theta=5.0)
  plan = planner.make_plan(toy, 16, "baseline", tp=8, pp=2)
  edges = memory.edge_weight_bytes(cfg, 8)
  assert edges == {"embedding": 8 * 32 * 4, "final_norm": 2 * 32 * 4, "lm_head": 32 * 8 * 4}
  assert costmodel.predict(toy, plan).total_s > 0


@pytest.mark.parametrize("strategy", sorted(PLACEMENTS))
def test_forward_and_grads_through_the_engine(toy, strategy, fresh_key):
  require_devices(16)
  cfg = toy.model
  kp, kx, kw = jax.random.split(fresh_key, 3)
  params, ids = _init(cfg, kp), TOY.random_input(cfg, toy.run.batch, toy.run.seq, kx)
  weight = jax.random.normal(kw, (*ids.shape, cfg.vocab), jnp.float32)
  plan = planner.make_plan(toy, 16, strategy, **PLACEMENTS[strategy])
  mesh = sharding.mesh_for(plan)
  placed = jax.tree.map(runs.global_array, params, sharding.param_shardings(mesh, cfg))
  x = runs.global_array(np.asarray(ids), sharding.input_sharding(mesh, cfg))
  fwd = engine.make_forward(plan, cfg, mesh, bubble_fill=jnp.nan, out_fill=jnp.nan)

  def loss(f):   # (loss, logits): the forward rides along with its gradient
    return lambda p, i: (jnp.sum((y := f(p, i)) * weight), y)

  (got, y), g = jax.jit(jax.value_and_grad(loss(fwd), has_aux=True))(placed, x)
  (want, y_ref), g_ref = jax.jit(jax.value_and_grad(
      loss(lambda p, i: _reference(p, i, cfg)), has_aux=True))(params, ids)
  assert y.shape == (*ids.shape, cfg.vocab)
  assert _rel(y, y_ref) < runs.F32_REL_TOL
  assert abs(float(got) - float(want)) <= 1e-4 * abs(float(want))
  rel = {jax.tree_util.keystr(k): _rel(a, b) for (k, a), b in
         zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g_ref))}
  assert len(rel) == 12 and all(r < 1e-4 for r in rel.values()), rel


@pytest.mark.parametrize("strategy", sorted(PLACEMENTS))
def test_greedy_decode_equals_the_reference(toy, strategy, fresh_key):
  require_devices(16)
  cfg = toy.model
  kp, kx = jax.random.split(fresh_key)
  params = jax.tree.map(np.asarray, _init(cfg, kp))
  ids = np.full((len(LENS), max(LENS)), generate.PAD)
  rows = np.asarray(TOY.random_input(cfg, len(LENS), max(LENS), kx))
  for r, n in enumerate(LENS):
    ids[r, :n] = rows[r, :n]
  plan = planner.make_plan(toy, 16, strategy, **PLACEMENTS[strategy])
  ids0, lens = generate.split_prompts(ids, cfg.vocab)
  g = generate.generate(toy, plan, params, ids0, lens, NEW)
  ref = jax.jit(_reference, static_argnums=2)
  for r, n in enumerate(LENS):   # each prompt alone, one token at a time (causal: the zeros
    seq = np.zeros((1, max(LENS) + NEW), np.int32)   # after position n change nothing before)
    seq[0, :n] = ids[r, :n]
    for i in range(n, n + NEW):
      seq[0, i] = int(np.argmax(ref(params, jnp.asarray(seq), cfg)[0, i - 1]))
    np.testing.assert_array_equal(g.tokens[r], seq[0, n:n + NEW], err_msg=f"row {r} ({strategy})")
