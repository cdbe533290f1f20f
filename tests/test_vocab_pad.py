"""Vocabularies that do not split evenly over the devices (issue 23 item 2): the engine pads the
embedding and the LM head to a multiple of the devices (placement.shards.padded_vocab) and
nobody sees the padding. Tiny random transformers Llamas with vocab 1000 and a prime 997 on 16
simulated devices, both placements: logits equal transformers', greedy tokens equal its
generate, and the HF -> placed checkpoint -> HF round trip keeps the true vocabulary bit for
bit."""

import dataclasses
import json

import numpy as np
import pytest

from conftest import require_devices, safetensors_dir
from jaxpart import cli, config
from jaxpart.checkpoint import hf
from jaxpart.placement import planner
from jaxpart.placement.shards import padded_vocab, vocab_local
from jaxpart.runtime import generate, runs
from test_hf import COMMON
from test_hf_engine import F32_REL

VOCABS = (1000, 997)
PLACEMENTS = {"layerwise": dict(chunk_tokens=4, kv_block=8), "baseline": dict(tp=8, pp=2)}
NEW = 6
LENS = [7, 4]


@pytest.fixture(scope="module", params=VOCABS)
def model(request, tmp_path_factory):
  """(directory, transformers model, prompt ids right-padded, their greedy continuations)."""
  torch = pytest.importorskip("torch")
  vocab = request.param
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(vocab)
  m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**(COMMON | dict(
      vocab_size=vocab, tie_word_embeddings=False)))).float().eval()
  with torch.no_grad():
    for n, p in m.named_parameters():
      if n.endswith("norm.weight"):
        p.uniform_(0.5, 1.5)
  m.config._attn_implementation = "eager"
  d = tmp_path_factory.mktemp(f"vocab{vocab}")
  m.save_pretrained(str(d))
  rng = np.random.default_rng(vocab)
  ids = np.full((len(LENS), max(LENS)), generate.PAD)
  want = []
  for r, n in enumerate(LENS):
    ids[r, :n] = rng.integers(0, vocab, n)
    with torch.no_grad():
      out = m.generate(torch.tensor(ids[r:r + 1, :n]),
                       attention_mask=torch.ones(1, n, dtype=torch.long), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    want.append(out[0, n:].numpy())
  return d, m, ids, np.stack(want)


def _setup(d, shape):
  cfg, tree = hf.read_hf(str(d))
  return config.Setup(model=cfg, run=config.RunShape(*shape),
                      hardware=config.HARDWARE_PRESETS["h100"]), tree


def test_padded_vocab_arithmetic():
  assert padded_vocab(1000, 16) == 1008 and padded_vocab(997, 16) == 1008
  assert padded_vocab(1024, 16) == 1024
  cfg = dataclasses.replace(config.MODEL_PRESETS["llama-tiny"], vocab=997)
  assert vocab_local(cfg, 8, devices=16) == 126 and vocab_local(cfg, 16) == 63


@pytest.mark.parametrize("strategy", sorted(PLACEMENTS))
def test_logits_equal_transformers(model, strategy):
  torch = pytest.importorskip("torch")
  require_devices(16)
  d, m, _, _ = model
  ids = np.random.default_rng(3).integers(0, m.config.vocab_size, (2, 19)).astype(np.int32)
  with torch.no_grad():
    want = m(torch.tensor(ids)).logits.numpy()
  setup, tree = _setup(d, ids.shape)
  plan = planner.make_plan(setup, 16, strategy, **PLACEMENTS[strategy])
  got = runs.fetch(runs.place(setup, plan, tree, ids, bubble_fill=float("nan"),
                              out_fill=float("nan"))())
  assert got.shape == want.shape == (2, 19, m.config.vocab_size)
  rel = np.abs(got - want).max() / np.abs(want).max()
  print(f"vocab {m.config.vocab_size} {strategy}: max rel {rel:.2e}")
  assert np.isfinite(got).all() and rel <= F32_REL, rel


@pytest.mark.parametrize("strategy", sorted(PLACEMENTS))
def test_greedy_generate_equals_transformers(model, strategy):
  require_devices(16)
  d, m, ids, want = model
  setup, tree = _setup(d, ids.shape)
  plan = planner.make_plan(setup, 16, strategy, **PLACEMENTS[strategy])
  ids0, lens = generate.split_prompts(ids, setup.model.vocab)
  g = generate.generate(setup, plan, tree, ids0, lens, NEW, keep_logits=True)
  np.testing.assert_array_equal(g.tokens, want)
  assert g.logits.shape == (len(LENS), NEW - 1, m.config.vocab_size)
  assert np.isfinite(g.logits).all()


def test_generate_command_and_hf_round_trip(model, tmp_path, capsys):
  pytest.importorskip("safetensors.numpy")
  require_devices(16)
  d, m, ids, want = model
  np.save(tmp_path / "ids.npy", ids)
  assert cli.main(["generate", "--model-dir", str(d), "--input-ids", str(tmp_path / "ids.npy"),
                   "--new-tokens", str(NEW), "--devices", "16", "--strategy", "baseline",
                   "--tp", "8", "--pp", "2", "--json"]) == 0
  assert json.loads(capsys.readouterr().out)["tokens"] == want.tolist()
  ck, back = tmp_path / "ck", tmp_path / "back"
  assert cli.main(["convert", str(d), str(ck), "--to-strategy", "baseline", "--devices", "16",
                   "--tp", "8", "--pp", "2", "--set", "run.batch=2", "--set", "run.seq=8"]) == 0
  assert cli.main(["convert", str(ck), str(back), "--to-format", "hf"]) == 0
  capsys.readouterr()
  original, written = safetensors_dir(d), safetensors_dir(back)
  assert set(original) == set(written)
  for name, a in original.items():
    assert a.shape == written[name].shape and a.tobytes() == written[name].tobytes(), name
  assert json.load(open(back / "config.json"))["vocab_size"] == m.config.vocab_size


def test_gradcheck_with_a_prime_vocab(capsys):
  """Gradients through the padded vocabulary equal the reference's on the true rows (the padded
  rows are cut off before the comparison; their shardings stay the padded params')."""
  require_devices(16)
  rc = cli.main(["gradcheck", "--preset", "llama-tiny", "--set", "model.vocab=997", "--devices",
                 "16", "--strategy", "baseline", "--tp", "8", "--pp", "2"])
  out = capsys.readouterr().out
  assert rc == 0 and "PASS" in out and "grad.embed.table" in out, out
