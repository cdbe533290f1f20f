"""Hugging Face in and out: tiny random models built by transformers itself, read with
jaxpart.checkpoint.hf, run with jaxpart.models.llama.forward and compared with transformers' own float32 forward;
bit-exact safetensors round trips (bf16 and float32, sharded with an index); and every
unsupported config refused by name."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpart import config
from jaxpart.checkpoint import hf
from jaxpart.models import llama_hf as hf_names
from jaxpart.models import llama
from jaxpart.config import RopeScaling

forward = jax.jit(llama.forward, static_argnums=2)
# float32 against float32: both sum the same terms in different orders, so the logits differ
# by float32 rounding, a few 1e-7 of their scale (measured 8e-7 to 1e-6 with 2 layers).
F32_REL = 1e-4

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=8, num_key_value_heads=2, initializer_range=0.1,
              rms_norm_eps=1e-5)
MODELS = {
    "llama-gqa-untied": ("LlamaConfig", dict(tie_word_embeddings=False, rope_theta=10000.0)),
    "llama-tied": ("LlamaConfig", dict(tie_word_embeddings=True, num_key_value_heads=8)),
    "qwen2-qkv-bias": ("Qwen2Config", dict(rope_theta=1e6, tie_word_embeddings=False)),
    # original_max_position_embeddings 16 puts the scaled wavelengths inside 37 tokens
    "llama3-rope-scaling": ("LlamaConfig", dict(rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
}


def _build(name, seed):
  """A random transformers model with random norm weights and biases (not 1 and 0)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(seed)
  cls_name, kw = MODELS[name]
  cfg = getattr(transformers, cls_name)(**(COMMON | kw))
  model_cls = {"LlamaConfig": transformers.LlamaForCausalLM,
               "Qwen2Config": transformers.Qwen2ForCausalLM}[cls_name]
  model = model_cls(cfg).float().eval()
  with torch.no_grad():
    for n, p in model.named_parameters():
      if n.endswith("norm.weight"):
        p.uniform_(0.5, 1.5)
      elif n.endswith(".bias"):
        p.normal_(0.0, 0.1)
  model.config._attn_implementation = "eager"
  return model


@pytest.fixture(scope="module")
def seed():
  import time  # noqa: PLC0415
  s = int(os.environ.get("JAXPART_TEST_SEED", time.time_ns() % 2**31))
  print(f"test_hf: JAXPART_TEST_SEED={s}")
  return s


@pytest.fixture(scope="module")
def saved(tmp_path_factory, seed):
  """name -> (directory saved by save_pretrained, the transformers model)."""
  out = {}
  for name in MODELS:
    model = _build(name, seed)
    d = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(d)
    out[name] = (d, model)
  return out


@pytest.mark.parametrize("name", sorted(MODELS))
def test_logits_equal_transformers(name, saved, seed):
  torch = pytest.importorskip("torch")
  d, model = saved[name]
  cfg, tree = hf.read_hf(d)
  assert cfg.dtype == "float32" and cfg.qkv_bias == name.startswith("qwen2")
  assert cfg.tie_embeddings == (name == "llama-tied")
  assert (cfg.rope_scaling is not None) == (name == "llama3-rope-scaling")
  ids = np.random.default_rng(seed).integers(0, cfg.vocab, (2, 37))  # 37: ragged
  with torch.no_grad():
    want = model(torch.tensor(ids)).logits.numpy()
  got = np.asarray(forward(jax.tree.map(jnp.asarray, tree), jnp.asarray(ids, jnp.int32), cfg))
  scale = np.abs(want).max()
  rel = np.abs(got - want).max() / scale
  print(f"{name}: max|logits| {scale:.3f}, max abs diff {rel * scale:.2e} = {rel:.2e} of it")
  assert rel <= F32_REL


def test_scaling_and_bias_matter(saved, seed):
  """The comparison can fail: dropping the rope scaling or the q/k/v biases moves the logits
  far beyond the bound."""
  torch = pytest.importorskip("torch")
  for name, change in (("llama3-rope-scaling", dict(rope_scaling=None)),
                       ("qwen2-qkv-bias", None)):
    d, model = saved[name]
    cfg, tree = hf.read_hf(d)
    if change is None:
      tree["attn"] = {k: v for k, v in tree["attn"].items() if not k.startswith("b")}
      cfg = dataclasses.replace(cfg, qkv_bias=False)
    else:
      cfg = dataclasses.replace(cfg, **change)
    ids = np.random.default_rng(seed).integers(0, cfg.vocab, (1, 37))
    with torch.no_grad():
      want = model(torch.tensor(ids)).logits.numpy()
    got = np.asarray(forward(jax.tree.map(jnp.asarray, tree), jnp.asarray(ids, jnp.int32), cfg))
    assert np.abs(got - want).max() > 100 * F32_REL * np.abs(want).max()


def test_reads_a_sharded_save_with_its_index(saved, tmp_path):
  d, model = saved["qwen2-qkv-bias"]
  model.save_pretrained(str(tmp_path), max_shard_size="40KB")
  assert os.path.exists(tmp_path / hf.INDEX)
  assert len(list(tmp_path.glob("*.safetensors"))) > 1
  cfg1, t1 = hf.read_hf(d)
  cfg2, t2 = hf.read_hf(str(tmp_path))
  assert cfg1 == cfg2
  jax.tree.map(np.testing.assert_array_equal, t1, t2)


def _bits(a):
  a = np.asarray(a)
  return a.view(np.dtype(f"i{a.dtype.itemsize}"))  # signed, as torch's view(int16/int32)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_round_trip_is_bit_exact_and_transformers_loads_it(dtype, tmp_path, seed):
  cfg = dataclasses.replace(config.MODEL_PRESETS["llama-tiny"], layers=2, dtype=dtype,
                            qkv_bias=True, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 16))
  tree = jax.tree.map(np.asarray, llama.init_params(cfg, jax.random.key(seed)))
  files = hf.write_hf(tree, cfg, str(tmp_path / "a"), max_shard_bytes=40_000)
  assert hf.INDEX in files and len(files) > 3
  cfg_a, tree_a = hf.read_hf(str(tmp_path / "a"))
  assert cfg_a == cfg
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(_bits(x), _bits(y)), tree, tree_a)
  hf.write_hf(tree_a, cfg_a, str(tmp_path / "b"))  # one file this time
  cfg_b, tree_b = hf.read_hf(str(tmp_path / "b"))
  assert cfg_b == cfg
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(_bits(x), _bits(y)), tree, tree_b)

  if dtype != "bfloat16":
    return  # one from_pretrained is enough (seconds each); bf16 is the case that can go wrong
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  model, info = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path / "a"), output_loading_info=True, dtype=getattr(torch, dtype))
  assert type(model).__name__ == "Qwen2ForCausalLM"
  assert not info["missing_keys"] and not info["unexpected_keys"]
  state = model.state_dict()
  for e in hf_names.entries(cfg):  # every tensor, bit for bit, in HF's [out, in] layout
    leaf = tree[e.path[0]][e.path[1]]
    ours = leaf if e.layer is None else leaf[e.layer]
    np.testing.assert_array_equal(state[e.hf_name].view(torch.int16).numpy(),
                                  _bits(ours.T if e.transpose else ours), err_msg=e.hf_name)

@pytest.mark.parametrize("name", ["llama3-70b", "llama3-8b", "mistral-7b", "qwen2.5-7b",
                                  "llama-tiny"])
def test_config_round_trip(name):
  cfg = config.MODEL_PRESETS[name]
  assert hf.config_from_hf(hf.config_to_hf(cfg)) == cfg
  if not cfg.qkv_bias:
    assert hf.config_from_hf(hf.config_to_hf(cfg, "mistral")) == cfg


def test_transformers_5_rope_parameters_layout():
  d = hf.config_to_hf(config.MODEL_PRESETS["llama3-8b"])
  rope = dict(d.pop("rope_scaling"), rope_theta=d.pop("rope_theta"))
  assert hf.config_from_hf(d | {"rope_parameters": rope}) == config.MODEL_PRESETS["llama3-8b"]


def _tiny_hf(**changes):
  d = hf.config_to_hf(config.MODEL_PRESETS["llama-tiny"])
  return {k: v for k, v in (d | changes).items() if v is not ...}


@pytest.mark.parametrize("changes, field", [
    (dict(model_type="gpt2"), "config.json model_type = 'gpt2'"),
    (dict(model_type="mixtral"), "model_type = 'mixtral'"),
    (dict(model_type="mistral", sliding_window=4096), "sliding_window = 4096"),
    (dict(model_type="qwen2", use_sliding_window=True), "use_sliding_window = True"),
    (dict(layer_types=["sliding_attention", "full_attention"]), "layer_types"),
    (dict(num_local_experts=8), "num_local_experts = 8"),
    (dict(num_experts=64), "num_experts = 64"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling.rope_type = 'yarn'"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling.rope_type = 'linear'"),
    (dict(attention_bias=True), "attention_bias = True"),
    (dict(mlp_bias=True), "mlp_bias = True"),
    (dict(hidden_act="gelu"), "hidden_act = 'gelu'"),
    (dict(torch_dtype="float16"), "dtype = 'float16'"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    (dict(hidden_size=None), "config.json: hidden_size missing"),
])
def test_unsupported_configs_are_refused_by_field(changes, field):
  with pytest.raises(hf.HFError) as e:
    hf.config_from_hf(_tiny_hf(**changes))
  assert field in str(e.value) and "config.json" in str(e.value)


def test_qwen2_sliding_window_size_alone_is_fine():
  """Real Qwen2.5 configs carry sliding_window with use_sliding_window false: not in effect."""
  d = hf.config_to_hf(dataclasses.replace(config.MODEL_PRESETS["llama-tiny"], qkv_bias=True))
  assert hf.config_from_hf(d | {"sliding_window": 131072, "use_sliding_window": False}).qkv_bias


def test_bad_directories_are_named(tmp_path):
  cfg = dataclasses.replace(config.MODEL_PRESETS["llama-tiny"], layers=1, dtype="float32")
  tree = jax.tree.map(np.asarray, llama.init_params(cfg, jax.random.key(0)))
  with pytest.raises(hf.HFError, match="no config.json"):
    hf.read_hf(str(tmp_path))
  hf.write_hf(tree, cfg, str(tmp_path / "m"))
  with pytest.raises(hf.HFError, match="exists and is not empty"):
    hf.write_hf(tree, cfg, str(tmp_path / "m"))
  more = dataclasses.replace(cfg, layers=2)
  with open(tmp_path / "m" / "config.json", "w") as f:
    json.dump(hf.config_to_hf(more), f)
  with pytest.raises(hf.HFError, match="tensors missing, e.g. .'model.layers.1."):
    hf.read_hf(str(tmp_path / "m"))
  with open(tmp_path / "m" / "config.json", "w") as f:
    json.dump(hf.config_to_hf(dataclasses.replace(cfg, layers=1, d_ff=64)), f)
  with pytest.raises(hf.HFError, match=r"mlp\.\w+_proj\.weight' has shape .*, the config"):
    hf.read_hf(str(tmp_path / "m"))
  with pytest.raises(hf.HFError, match="q/k/v biases are written as qwen2"):
    hf.config_to_hf(cfg, "qwen2")
