"""What a new user hits first (issue 23): compile-only memory at paper scale, planning one's own
Hugging Face config, and legal flags that used to crash. Called in-process through cli.main."""

import dataclasses
import json
import time

import jax
import numpy as np
import pytest

from conftest import one_error, require_devices
from jaxpart import cli, config
from jaxpart.checkpoint import hf
from jaxpart.models import llama
from jaxpart.runtime import runs


def _json(capsys, argv):
  rc = cli.main(argv)
  cap = capsys.readouterr()
  assert rc == 0, cap.err[-2000:]
  return json.loads(cap.out), cap.err




# --- 1. compile-only memory is not refused by the host-memory guard --------------------------

def test_bench_memory_only_paper_layerwise(capsys):
  """Compiling on abstract shapes allocates nothing: the 48 GB host copy the guard counts is
  never built, so the paper preset compiles here and reads 8.39 GB per device."""
  require_devices(16)
  t0 = time.perf_counter()
  out, _ = _json(capsys, ["bench", "--preset", "paper", "--devices", "16", "--strategy",
                          "layerwise", "--memory-seqs", "10000", "--memory-only", "--json"])
  assert time.perf_counter() - t0 < 60
  (row,) = out["memory_by_seq"]
  assert f"{row['forward_total_bytes'] / 1e9:.2f}" == "8.39"
  assert abs(row["forward_total_bytes"] / row["predicted_hbm_bytes"] - 1) < 0.05


@pytest.mark.parametrize("argv", [
    ["--preset", "paper", "--strategy", "baseline", "--tp", "8", "--pp", "2",
     "--set", "run.seq=256"],
    ["--preset", "paper-30b", "--strategy", "layerwise"],
], ids=["paper baseline 8x2", "paper-30b layerwise"])
def test_bench_memory_only_other_placements(capsys, argv):
  require_devices(16)
  out, _ = _json(capsys, ["bench", *argv, "--devices", "16", "--memory-seqs", "256",
                          "--memory-only", "--json"])
  (row,) = out["memory_by_seq"]
  assert row["seq"] == 256 and row["forward_total_bytes"] > 0
  # Exceeds this host's memory as a host copy; compiled, not built.
  cfg = config.MODEL_PRESETS[argv[1]]
  assert cfg.total_params * cfg.dtype_bytes > row["forward_total_bytes"]


def test_bench_timed_paper_still_refused(capsys):
  """Timing runs the program: the guard still applies without --memory-only."""
  one_error(capsys, ["bench", "--preset", "paper", "--devices", "16", "--repeats", "1"],
             "model too large")


@pytest.mark.parametrize("cmd", ["plan", "predict", "memory"])
def test_analytic_commands_not_guarded(capsys, cmd):
  out, _ = _json(capsys, [cmd, "--preset", "paper-30b", "--devices", "16", "--json"])
  assert out["plan"]["devices"] == 16


# --- 5. planning one's own Hugging Face model from config.json alone -------------------------

def _hf_dir(tmp_path, cfg, **changes):
  d = tmp_path / "My-Model"
  d.mkdir()
  (d / "config.json").write_text(json.dumps({**hf.config_to_hf(cfg), **changes}))
  return d


@pytest.mark.parametrize("preset", ["llama3-8b", "qwen2.5-7b"])
def test_plan_model_dir_equals_preset(capsys, tmp_path, preset):
  """config.json only (no weights): the same model, so the same auto plan as the preset."""
  d = _hf_dir(tmp_path, config.MODEL_PRESETS[preset])
  run = ["--set", "run.batch=8", "--set", "run.seq=4096"]
  mine, _ = _json(capsys, ["plan", "--model-dir", str(d), "--devices", "8", "--strategy",
                           "auto", *run, "--json"])
  ref, _ = _json(capsys, ["plan", "--preset", preset, "--devices", "8", "--strategy", "auto",
                          *run, "--json"])
  assert mine["plan"] == ref["plan"]
  info, _ = _json(capsys, ["info", "--model-dir", str(d), "--json"])
  assert info["model"] == config.to_dict(config.MODEL_PRESETS[preset])
  assert info["preset"] == "My-Model"


@pytest.mark.parametrize("cmd", [["predict"], ["predict", "--decode"], ["memory"]])
def test_predict_memory_model_dir(capsys, tmp_path, cmd):
  cfg = config.MODEL_PRESETS["mistral-7b"]
  d = _hf_dir(tmp_path, cfg)
  out, _ = _json(capsys, [*cmd, "--model-dir", str(d), "--devices", "8", "--json"])
  ref, _ = _json(capsys, [*cmd, "--preset", "mistral-7b", "--devices", "8", "--json"])
  out.pop("preset"), ref.pop("preset")
  assert out == ref


def test_model_dir_default_run_capped_at_max_positions(capsys, tmp_path):
  cfg = dataclasses.replace(config.MODEL_PRESETS["llama-tiny"], max_positions=1000)
  d = _hf_dir(tmp_path, cfg)
  out, _ = _json(capsys, ["info", "--model-dir", str(d), "--json"])
  assert out["run"]["seq"] == 1000 and out["model"]["max_positions"] == 1000


@pytest.mark.parametrize("changes, needle", [
    ({"model_type": "gpt2"}, "config.json model_type = 'gpt2'"),
    ({"hidden_act": "gelu"}, "config.json hidden_act = 'gelu'"),
    ({"num_local_experts": 8}, "config.json num_local_experts = 8"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type = 'yarn'"),
    ({"hidden_size": "4096"}, "hidden_size"),
])
def test_model_dir_unsupported_config_refused_by_field(capsys, tmp_path, changes, needle):
  d = _hf_dir(tmp_path, config.MODEL_PRESETS["llama-tiny"], **changes)
  for cmd in ("plan", "predict", "memory", "info"):
    one_error(capsys, [cmd, "--model-dir", str(d)], needle)


@pytest.mark.parametrize("extra, needle", [
    (["--preset", "small"], "--preset does not apply with --model-dir"),
    (["--set", "model.layers=2"], "--set model.layers: does not apply with --model-dir"),
])
def test_model_dir_with_model_flags_refused(capsys, tmp_path, extra, needle):
  d = _hf_dir(tmp_path, config.MODEL_PRESETS["llama-tiny"])
  one_error(capsys, ["plan", "--model-dir", str(d), *extra], needle)


def test_model_dir_not_a_model(capsys, tmp_path):
  one_error(capsys, ["plan", "--model-dir", str(tmp_path)], "neither config.json")
  one_error(capsys, ["plan", "--model-dir", str(tmp_path / "absent")], "not a directory")


# --- 7. legal flags that used to crash ---------------------------------------------------------

def test_plan_measure_llama_family(capsys):
  """Autotuning builds the family's parameters and reference, so the Llama family times too;
  each candidate's logits are checked against the single-device reference."""
  require_devices(16)
  out, _ = _json(capsys, ["plan", "--strategy", "auto", "--measure", "--preset", "llama-tiny",
                          "--top", "2", "--repeats", "1", "--warmup", "0", "--json"])
  cands = out["candidates"]
  assert len(cands) == 2 and out["plan"] == cands[out["best"]]["plan"]
  # The same parameters and ids as autotune.measure at --seed 0; the bf16 reference's own
  # distance from float32, twice, is the yardstick (as `run --check` uses).
  setup = config.load_setup("llama-tiny")
  kp, kx = jax.random.split(jax.random.key(0))
  params = llama.init_params(setup.model, kp)
  ids = llama.random_ids(setup.model, setup.run.batch, setup.run.seq, kx)
  tol = runs.bf16_tolerance(setup, params, ids)
  for c in cands:
    assert c["measured_s"] > 0
    assert c["max_abs_err_vs_reference"] <= tol, (c["max_abs_err_vs_reference"], tol)


def test_calibrate_sizes_too_small_refused(capsys, tmp_path, monkeypatch):
  """GEMM times that do not grow with FLOPs (what --sizes 16 measures on a busy host) fit no
  FLOP rate: one line naming --sizes, nothing written."""
  from jaxpart.measure import calibrate

  def flat(sizes, *a, **k):
    return [{"m": m, "k": kk, "n": n, "median_s": 1e-5 * (1 + 0.01 * i),
             "flops_per_s": 2.0 * m * kk * n / 1e-5}
            for i, (m, (kk, n)) in enumerate((m, kn) for m in sizes for kn in calibrate.GEMM_KN)]
  monkeypatch.setattr(calibrate, "gemm_times", flat)
  out = tmp_path / "hw.toml"
  one_error(capsys, ["calibrate", "--sizes", "16", "--repeats", "1", "--out", str(out)],
             "--sizes = 16: the GEMM times at these sizes do not grow with their FLOPs")
  assert not out.exists()


# --- 7. past max_position_embeddings -----------------------------------------------------------

@pytest.fixture
def short_model(tmp_path):
  """A Llama-family HF directory stating max_position_embeddings = 12, random weights."""
  cfg = dataclasses.replace(config.MODEL_PRESETS["llama-tiny"], layers=2, max_positions=12)
  tree = jax.tree.map(np.array, llama.init_params(cfg, jax.random.key(3)))
  hf.write_hf(tree, cfg, str(tmp_path / "hf"))
  return cfg, tmp_path / "hf"


def _ids(tmp_path, cfg, batch, seq):
  path = tmp_path / f"ids{seq}.npy"
  np.save(path, np.random.default_rng(seq).integers(0, cfg.vocab, (batch, seq), np.int32))
  return str(path)


def _warnings(err):
  return [line for line in err.splitlines() if line.startswith("warning:")]


def test_forward_past_max_positions_warns(capsys, tmp_path, short_model):
  require_devices(2)
  cfg, d = short_model
  base = ["forward", "--model-dir", str(d), "--devices", "2", "--json"]
  _, err = _json(capsys, [*base, "--input-ids", _ids(tmp_path, cfg, 2, 12)])
  assert _warnings(err) == []
  out, err = _json(capsys, [*base, "--input-ids", _ids(tmp_path, cfg, 2, 13)])
  (line,) = _warnings(err)
  assert "13 positions" in line and "max_position_embeddings = 12" in line
  assert out["logits_shape"] == [2, 13, cfg.vocab]


def test_predict_decode_past_max_positions_warns(capsys):
  cfg = config.MODEL_PRESETS["llama-tiny"]
  base = ["predict", "--preset", "llama-tiny", "--decode", "--devices", "4", "--json",
          "--set", f"run.seq={cfg.max_positions - 10}"]
  _, err = _json(capsys, [*base, "--new-tokens", "10"])
  assert _warnings(err) == []
  _, err = _json(capsys, [*base, "--new-tokens", "11"])
  (line,) = _warnings(err)
  assert f"{cfg.max_positions + 1:,} positions" in line
  assert f"max_position_embeddings = {cfg.max_positions:,}" in line


def test_generate_past_max_positions_refused(capsys, tmp_path, short_model):
  require_devices(2)
  cfg, d = short_model
  ids = np.random.default_rng(0).integers(0, cfg.vocab, (2, 8), np.int32)
  ids[1, 5:] = -1                       # the longest prompt (8) is what counts
  path = tmp_path / "prompts.npy"
  np.save(path, ids)
  base = ["generate", "--model-dir", str(d), "--input-ids", str(path), "--devices", "2"]
  one_error(capsys, [*base, "--new-tokens", "5"],
             "prompt 8 + 5 new tokens = 13 positions, past the model's "
             "max_position_embeddings = 12; at most 4 new tokens")
  out, err = _json(capsys, [*base, "--new-tokens", "4", "--json"])
  assert np.asarray(out["tokens"]).shape == (2, 4) and _warnings(err) == []
