"""Logits only where they are needed (issue 23 item 4): generation's prefill computes each row's
last position only, `forward` leaves the final hidden vectors and makes their logits a slice at
a time, and the planner sizes both that way (llama3-8b, batch 32 x 4096, fits one 80 GB
device)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import require_devices
from jaxpart import cli, config
from jaxpart.checkpoint import hf
from jaxpart.placement import memory, planner
from jaxpart.placement.shards import padded_vocab
from jaxpart.runtime import engine, generate, runs, sharding
from test_vocab_pad import COMMON

# A small Llama with a real-sized vocabulary, where B x T x V logits dominate everything else.
BIG_VOCAB = config.load_setup("llama-tiny", overrides={"model.vocab": "32000", "run.batch": "8",
                                                      "run.seq": "512"})


def _compiled(f, *args):
  m = jax.jit(f).lower(*args).compile().memory_analysis()
  return m.temp_size_in_bytes, m.output_size_in_bytes


@pytest.mark.parametrize("devices", [1, 4])
def test_prefill_compiles_without_a_batch_x_seq_x_vocab_tensor(devices):
  require_devices(devices)
  setup, cfg = BIG_VOCAB, BIG_VOCAB.model
  plan = planner.make_plan(setup, devices, "layerwise")
  mesh = sharding.mesh_for(plan)
  params = sharding.abstract_placed_params(cfg, plan, mesh)
  ids = jax.ShapeDtypeStruct((plan.batch, plan.seq), jnp.int32,
                             sharding=sharding.input_sharding(mesh, cfg))
  lens = jax.ShapeDtypeStruct((plan.batch,), jnp.int32, sharding=sharding.replicated(mesh))
  full = plan.batch * plan.seq * padded_vocab(cfg.vocab, devices) // devices * 4
  before = _compiled(engine.make_forward(plan, cfg, mesh, differentiable=False), params, ids)
  cache_len = plan.decode_cache_len(16)
  after = _compiled(engine.make_prefill(plan, cfg, mesh, cache_len), params, ids, lens)
  kv = memory.kv_cache_bytes(cfg, plan.batch, cache_len, plan.tp, plan.layers_per_stage)
  print(f"{devices} device(s), B x T x V/N logits {full / 2**20:.1f} MiB: full-logits forward "
        f"temp {before[0] / 2**20:.2f} MiB output {before[1] / 2**20:.2f} MiB; last-position "
        f"prefill temp {after[0] / 2**20:.2f} MiB output {after[1] / 2**20:.2f} MiB")
  assert before[1] >= full                          # the old contract: every position's logits
  # prefill's output: each row's last logits (B x V/N float32) and the whole batch's K and V
  # (XLA adds 8 bytes a tuple element for the output tuple)
  assert after[1] - (plan.batch * padded_vocab(cfg.vocab, devices) // devices * 4 + kv) == 24
  assert sum(after) < sum(before) / 5


def test_plan_llama3_8b_batch_32_fits_80gb(capsys):
  rc = cli.main(["plan", "--preset", "llama3-8b", "--devices", "1", "--set", "run.batch=32",
                 "--set", "run.seq=4096", "--json"])
  out = capsys.readouterr().out
  assert rc == 0, out
  pd = json.loads(out)["per_device"]
  assert pd["predicted_hbm_bytes"] <= 80e9 and pd["fits_prefill"] and pd["fits_generation"]
  prog = pd["program_bytes"]
  v = 128256
  assert prog["logits_chunk"] == 1 * 2048 * v * 4                    # one slice of logits
  assert prog["output_share"] == 32 * 4096 * 4096 * 2                # the hidden vectors, bf16
  assert max(prog.values()) == prog["weights"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(5)
  m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**(COMMON | dict(
      vocab_size=997, tie_word_embeddings=True)))).float().eval()
  with torch.no_grad():
    for n, p in m.named_parameters():
      if n.endswith("norm.weight"):
        p.uniform_(0.5, 1.5)
  d = tmp_path_factory.mktemp("chunked")
  m.save_pretrained(str(d))
  return d


@pytest.mark.parametrize("strategy", ["layerwise", "baseline"])
def test_chunked_and_last_only_logits_equal_the_whole(model_dir, strategy, monkeypatch):
  require_devices(16)
  cfg, tree = hf.read_hf(str(model_dir))
  ids = np.random.default_rng(1).integers(0, cfg.vocab, (4, 21)).astype(np.int32)
  setup = config.Setup(model=cfg, run=config.RunShape(*ids.shape),
                       hardware=config.HARDWARE_PRESETS["h100"])
  kw = dict(chunk_tokens=8, kv_block=8) if strategy == "layerwise" else dict(tp=8, pp=2)
  plan = planner.make_plan(setup, 16, strategy, **kw)
  whole = runs.fetch(runs.place(setup, plan, tree, ids)())
  hidden = runs.place(setup, plan, tree, ids, output="hidden", bubble_fill=float("nan"),
                      out_fill=float("nan"))
  got = np.full_like(whole, np.nan)
  for r0, t0, block in runs.logits_chunks(hidden, cfg, 2, 8):   # the last slice overlaps
    got[r0:r0 + 2, t0:t0 + 8] = block
  np.testing.assert_array_equal(got, whole)
  last = runs.fetch(runs.place(setup, plan, tree, ids, output="last")())
  # The head on one position per row is a matrix-vector product where the whole forward's is a
  # matrix product over the unit's tokens: XLA:CPU sums the D terms in another order, so the
  # two differ by float32 rounding (measured <= 1e-6 of max|logits|), not bit for bit.
  assert last.shape == whole[:, -1].shape
  assert np.abs(last - whole[:, -1]).max() <= 1e-5 * np.abs(whole).max()


def test_forward_command_out_and_last_only(model_dir, tmp_path, capsys):
  require_devices(16)
  cfg, tree = hf.read_hf(str(model_dir))
  ids = np.random.default_rng(2).integers(0, cfg.vocab, (2, 13)).astype(np.int32)
  np.save(tmp_path / "ids.npy", ids)
  base = ["forward", "--model-dir", str(model_dir), "--input-ids", str(tmp_path / "ids.npy"),
          "--devices", "16", "--strategy", "baseline", "--tp", "8", "--pp", "2", "--json"]
  (tmp_path / "all.npy").write_bytes(b"old")
  assert cli.main(base + ["--out", str(tmp_path / "all.npy")]) == 0
  assert json.loads(capsys.readouterr().out)["logits_shape"] == [2, 13, 997]
  assert cli.main(base + ["--out", str(tmp_path / "last.npy"), "--last-only"]) == 0
  assert json.loads(capsys.readouterr().out)["logits_shape"] == [2, 997]
  full, last = np.load(tmp_path / "all.npy"), np.load(tmp_path / "last.npy")
  assert full.shape == (2, 13, 997) and np.isfinite(full).all()
  assert np.abs(last - full[:, -1]).max() <= 1e-5 * np.abs(full).max()   # as above
  assert sorted(p.name for p in tmp_path.iterdir()) == ["all.npy", "ids.npy", "last.npy"]
