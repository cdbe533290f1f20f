"""Generation on the placed pipeline: greedy tokens equal transformers' own generate for
prompts of different lengths in one batch, both placements, 16 simulated devices, float32;
each decode step's logits equal a full-sequence forward's at the same position; sampling is
reproducible from its seed; the dense family decodes its own hidden vectors; and a decode
cycle's memory does not grow with the number of tokens."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import require_devices
from jaxpart import cli, config
from jaxpart.runtime import generate
from jaxpart.checkpoint import hf
from jaxpart.models import llama
from jaxpart.models import dense as model
from jaxpart.placement import planner
from jaxpart.runtime import runs
from jaxpart.runtime.decode import Sampling
from test_hf import _build

NEW = 16
LENS = [9, 5, 12, 7]      # 4 prompts, 2 stages: 2 decode microbatches in flight (M = S)
PLACEMENTS = {"layerwise": dict(chunk_tokens=4, kv_block=8), "baseline": dict(tp=8, pp=2)}
# Logits of a decode step against the full forward at that position: float32 rounding in
# different summation orders (blocked softmax over the cache, Megatron psums); measured near
# 1e-6 of max|logits|, bounded as the forward comparison is.
F32_REL = 1e-4


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
  torch = pytest.importorskip("torch")
  model = _build("qwen2-qkv-bias", 7)
  d = tmp_path_factory.mktemp("qwen")
  model.save_pretrained(str(d))
  rng = np.random.default_rng(7)
  ids = np.full((len(LENS), max(LENS)), generate.PAD)
  want = []
  for r, n in enumerate(LENS):
    ids[r, :n] = rng.integers(0, model.config.vocab_size, n)
    with torch.no_grad():   # each prompt alone: no padding, the attention mask explicit
      out = model.generate(torch.tensor(ids[r:r + 1, :n]), attention_mask=torch.ones(1, n, dtype=torch.long),
                           max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                           pad_token_id=0)
    want.append(out[0, n:].numpy())
  return d, ids, np.stack(want)


def _setup(d, ids):
  cfg, tree = hf.read_hf(str(d))
  return config.Setup(model=cfg, run=config.RunShape(*ids.shape),
                      hardware=config.HARDWARE_PRESETS["h100"]), tree


@pytest.mark.parametrize("strategy", sorted(PLACEMENTS))
def test_greedy_tokens_equal_transformers_generate(hf_model, strategy):
  require_devices(16)
  d, ids, want = hf_model
  setup, tree = _setup(d, ids)
  plan = planner.make_plan(setup, 16, strategy, **PLACEMENTS[strategy])
  ids0, lens = generate.split_prompts(ids, setup.model.vocab)
  g = generate.generate(setup, plan, tree, ids0, lens, NEW, keep_logits=True)
  assert g.schedule.microbatches == plan.stages == 2
  assert g.tokens.shape == (len(LENS), NEW)
  np.testing.assert_array_equal(g.tokens, want)
  # Each decode step's logits against the single-device forward of prompt + tokens so far.
  fwd = jax.jit(llama.forward, static_argnums=2)
  params = jax.tree.map(jnp.asarray, tree)
  worst = 0.0
  for r, n in enumerate(LENS):
    seq = np.concatenate([ids[r, :n], g.tokens[r]])[None].astype(np.int32)
    full = np.asarray(fwd(params, jnp.asarray(seq), setup.model))[0]
    step = g.logits[r]                                  # logits after feeding token k
    ref = full[n:n + NEW - 1]
    worst = max(worst, np.abs(step - ref).max() / np.abs(ref).max())
  print(f"{strategy}: decode logits vs full forward, max rel {worst:.2e}")
  assert worst <= F32_REL


def test_sampling_is_reproducible_and_top1_is_greedy(hf_model):
  require_devices(16)
  d, ids, want = hf_model
  setup, tree = _setup(d, ids)
  plan = planner.make_plan(setup, 16, "baseline", tp=8, pp=2)
  ids0, lens = generate.split_prompts(ids, setup.model.vocab)

  def draw(**kw):
    return generate.generate(setup, plan, tree, ids0, lens, 6, Sampling(**kw)).tokens
  a, b, c = draw(temperature=1.5, seed=1), draw(temperature=1.5, seed=1), draw(temperature=1.5,
                                                                                 seed=2)
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()
  np.testing.assert_array_equal(draw(temperature=1.0, top_k=1, seed=3), want[:, :6])


def test_dense_decode_feeds_its_own_output(fresh_key):
  """Dense: each step's input is the previous output vector; step k's output equals the
  reference forward of the prompt followed by every vector fed so far, at the last position."""
  require_devices(16)
  setup = config.load_setup("tiny", overrides={"model.dtype": "float32", "run.seq": "20"})
  plan = planner.make_plan(setup, 16, "layerwise", chunk_tokens=8)
  seed = int(jax.random.randint(fresh_key, (), 0, 2**30))
  params, x = runs.host_params(setup, seed), runs.host_input(setup, seed)
  lens = np.array([20, 13], np.int32)
  g = generate.generate(setup, plan, params, x, lens, 5)
  ref = jax.jit(model.forward, static_argnums=2)
  for r, n in enumerate(lens):
    seq = np.concatenate([x[r, :n], g.tokens[r, :-1]])[None]   # prompt, then the fed vectors
    want = np.asarray(ref(jax.tree.map(jnp.asarray, params), jnp.asarray(seq), setup.model))
    got = g.tokens[r]
    np.testing.assert_allclose(got, want[0, n - 1:], rtol=0, atol=2e-6 * np.abs(want).max())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_memory_does_not_grow_with_tokens(dtype):
  """A decode cycle's temporaries are the same whether the cache holds room for 4 or for 124
  new tokens: the cache and the token buffers are arguments, updated in place. In bf16 too:
  the caches and the record hold bit patterns, which XLA on CPU updates in place (a bf16
  buffer it would widen to float32 and copy whole for every update)."""
  require_devices(16)
  setup = config.load_setup("tiny", overrides={"model.dtype": dtype})
  plan = planner.make_plan(setup, 16, "baseline", tp=8, pp=2, kv_block=16)
  params, x = runs.host_params(setup, 0), runs.host_input(setup, 0)
  lens = np.full(setup.run.batch, setup.run.seq, np.int32)
  runs_ = {k: generate.generate(setup, plan, params, x, lens, k, memory=True) for k in (4, 124)}
  assert runs_[4].cache_len < runs_[124].cache_len           # the cache really grows
  temps = {k: g.memory["decode_cycle"]["temp_bytes"] for k, g in runs_.items()}
  assert temps[4] == temps[124], temps


def test_generate_command_json(hf_model, tmp_path, capsys):
  require_devices(16)
  d, ids, want = hf_model
  np.save(tmp_path / "ids.npy", ids)
  rc = cli.main(["generate", "--model-dir", str(d), "--input-ids", str(tmp_path / "ids.npy"),
                 "--new-tokens", "4", "--devices", "16", "--strategy", "layerwise",
                 "--out", str(tmp_path / "t.npy"), "--json"])
  out = json.loads(capsys.readouterr().out)
  assert rc == 0 and out["tokens"] == want[:, :4].tolist()
  assert out["ttft_s"] > 0 and out["tpot_s"] > 0 and out["decode_microbatches"] == 2
  np.testing.assert_array_equal(np.load(tmp_path / "t.npy"), want[:, :4])
