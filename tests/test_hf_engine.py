"""Real models through the placed pipeline: tiny random models built by transformers itself,
imported from their save_pretrained directories, run by the one engine on 16 simulated devices
in both placements and compared with transformers' own forward; the jaxpart forward command;
and a Hugging Face -> layer-wise -> baseline -> Hugging Face round trip, bit for bit."""

import json

import numpy as np
import pytest

from conftest import require_devices, safetensors_dir
from jaxpart import cli, config
from jaxpart.checkpoint import hf
from jaxpart.placement import planner
from jaxpart.runtime import runs
from test_hf import MODELS, _build

# float32 engine against transformers' float32: the same terms summed in other orders (psums
# of Megatron partial products, blocked online softmax), so the logits differ by float32
# rounding: measured below 2e-6 of max|logits| here; 1e-4 leaves ample margin and still fails
# any dropped or swapped term (test_hf.test_scaling_and_bias_matter: > 100x this bound).
F32_REL = 1e-4
PLACEMENTS = {
    # chunks of 16 over 37 tokens: chunks start mid-sequence (16, 32) and the last is ragged
    "layerwise": dict(chunk_tokens=16, kv_block=16),
    # whole sequences in query tiles of 16, the last one ragged
    "baseline": dict(tp=8, pp=2, kv_block=16),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """name -> (save_pretrained directory, transformers model, ids)."""
  torch = pytest.importorskip("torch")
  out = {}
  for i, name in enumerate(sorted(MODELS)):
    model = _build(name, 1000 + i)
    d = tmp_path_factory.mktemp(name)
    model.save_pretrained(str(d))
    ids = np.random.default_rng(i).integers(0, model.config.vocab_size, (2, 37))
    with torch.no_grad():
      want = model(torch.tensor(ids)).logits.numpy()
    out[name] = (d, model, ids.astype(np.int32), want)
  return out


def _engine_logits(d, ids, strategy, dtype=None):
  cfg, tree = hf.read_hf(str(d))
  setup = config.Setup(model=cfg, run=config.RunShape(*ids.shape),
                       hardware=config.HARDWARE_PRESETS["h100"])
  plan = planner.make_plan(setup, 16, strategy, **PLACEMENTS[strategy])
  placed = runs.place(setup, plan, tree, ids, dtype=dtype, bubble_fill=float("nan"),
                      out_fill=float("nan"))
  return plan, runs.fetch(placed())


@pytest.mark.parametrize("strategy", sorted(PLACEMENTS))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_engine_logits_equal_transformers(models, name, strategy):
  require_devices(16)
  d, _, ids, want = models[name]
  plan, got = _engine_logits(d, ids, strategy)
  assert plan.mesh_shape == (2, 8)   # 2 layers: 2 stages x tp 8 in both placements
  rel = np.abs(got - want).max() / np.abs(want).max()
  print(f"{name} {strategy} {plan.split}: max|diff| / max|logits| = {rel:.2e}")
  assert np.isfinite(got).all() and rel <= F32_REL, rel


def test_bf16_engine_within_transformers_own_bf16_error(models, tmp_path):
  """bf16 has no fixed bound: the yardstick is how far transformers' own bf16 forward lands from
  its float32 one on the same ids; the placed bf16 engine rounds differently (partial sums,
  blocked softmax) and may land that far on the other side, so twice it is the bound."""
  torch = pytest.importorskip("torch")
  require_devices(16)
  _, model, ids, want = models["llama-gqa-untied"]
  bf = model.to(torch.bfloat16)
  try:
    bf.save_pretrained(str(tmp_path))
    with torch.no_grad():
      own = bf(torch.tensor(ids)).logits.float().numpy()
  finally:
    model.float()
  bound = 2 * np.abs(own - want).max()
  for strategy in sorted(PLACEMENTS):
    _, got = _engine_logits(tmp_path, ids, strategy)
    err = np.abs(got - want).max()
    print(f"bf16 {strategy}: engine {err:.3e}, transformers' own bf16 {bound / 2:.3e}")
    assert np.isfinite(got).all() and 0 < err <= bound


def test_forward_command_writes_the_logits(models, tmp_path, capsys):
  require_devices(16)
  d, _, ids, want = models["qwen2-qkv-bias"]
  np.save(tmp_path / "ids.npy", ids)
  rc = cli.main(["forward", "--model-dir", str(d), "--input-ids", str(tmp_path / "ids.npy"),
                 "--devices", "16", "--strategy", "layerwise", "--chunk-tokens", "16",
                 "--out", str(tmp_path / "logits.npy"), "--json"])
  assert rc == 0
  report = json.loads(capsys.readouterr().out)
  got = np.load(tmp_path / "logits.npy")
  assert report["logits_shape"] == list(got.shape) == list(want.shape)
  assert got.dtype == np.float32
  assert np.abs(got - want).max() <= F32_REL * np.abs(want).max()


def test_forward_command_refuses_bad_ids(models, tmp_path, capsys):
  d, _, ids, _ = models["llama-tied"]
  np.save(tmp_path / "ids.npy", ids + 1000)
  rc = cli.main(["forward", "--model-dir", str(d), "--input-ids", str(tmp_path / "ids.npy")])
  assert rc == 2 and "the model's vocabulary is 0 .. 255" in capsys.readouterr().err


def test_round_trip_hf_layerwise_baseline_hf_is_bit_exact(models, tmp_path, capsys):
  pytest.importorskip("safetensors.numpy")
  require_devices(16)
  d = models["llama3-rope-scaling"][0]
  lw, bl, back = tmp_path / "lw", tmp_path / "bl", tmp_path / "back"
  run = ["--set", "run.batch=2", "--set", "run.seq=37"]
  assert cli.main(["convert", str(d), str(lw), "--to-strategy", "layerwise", "--devices", "16",
                   *run]) == 0
  assert cli.main(["convert", str(lw), str(bl), "--to-strategy", "baseline", "--devices", "16",
                   "--tp", "8", "--pp", "2"]) == 0
  assert cli.main(["convert", str(bl), str(back), "--to-format", "hf", "--json"]) == 0
  capsys.readouterr()
  original, written = safetensors_dir(d), safetensors_dir(back)
  assert set(original) == set(written)
  for name, a in original.items():
    assert a.dtype == written[name].dtype and a.shape == written[name].shape, name
    assert a.tobytes() == written[name].tobytes(), name
  assert json.load(open(back / "config.json"))["rope_scaling"]["rope_type"] == "llama3"
