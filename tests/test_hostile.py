"""Hostile but realistic inputs (issue 16): each ends in one `error:` line naming the field or
path, exit status 2, no traceback, nothing written; and sizes that used to hang answer at once.

Called in-process through cli.main, as users call the CLI; nothing here compiles a model.
"""

import dataclasses
import errno
import io
import json
import logging
import os
import shutil
import signal
import sys
import time
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import one_error, snapshot
from jaxpart import checkpoint as ck
from jaxpart import cli, config, paths, validate
from jaxpart.runtime import distributed, supervise
from jaxpart.checkpoint import hf
from jaxpart.models import llama
from jaxpart.models import dense as model
from jaxpart.runtime import runs
from jaxpart.checkpoint.manifest import np_dtype

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import launch_local  # noqa: E402

BIG = "1000000000000"           # 10^12: beyond int32 indexing
HUGE_FF = "2000000000"          # within int32, but 4 TB of tiny-model weights
TINY = ["--preset", "tiny", "--devices", "16"]






def _toml(tmp_path, text, name="c.toml"):
  f = tmp_path / name
  f.write_bytes(text if isinstance(text, bytes) else text.encode())
  return str(f)


# --- hangs: sizes answer at once or are refused with the limit ------------------------------

HANGS = [
    (["plan", *TINY, "--set", "model.layers=1000000000"], "ModelConfig.layers = 1,000,000,000"),
    (["plan", "--preset", "tiny", "--devices", BIG], "--devices = 1,000,000,000,000"),
    (["plan", *TINY, "--set", f"run.batch={BIG}"], "RunShape.batch = 1,000,000,000,000"),
    (["plan", *TINY, "--set", f"run.seq={BIG}"], "RunShape.seq = 1,000,000,000,000"),
    (["plan", *TINY, "--set", f"model.d_model={BIG}"], "ModelConfig.d_model"),
    (["plan", *TINY, "--set", f"model.n_heads={BIG}"], "ModelConfig.n_heads"),
    (["plan", *TINY, "--tp", BIG], "--tp = 1,000,000,000,000"),
    (["plan", *TINY, "--chunk-tokens", BIG], "--chunk-tokens"),
    (["memory", *TINY, "--set", "model.layers=70000"], "at most 65,536"),
    # (a device with room for it: the planner refuses what does not fit before the cost model)
    (["predict", *TINY, "--set", "run.seq=2147483647", "--chunk-tokens", "1",
      "--set", "hardware.hbm_bytes=1e15"], "chunks per sequence = 2,147,483,647"),
    (["predict", *TINY, "--set", "run.batch=2097152", "--chunk-rows", "1",
      "--chunk-tokens", "100", "--set", "hardware.hbm_bytes=1e15"], "units = 2,097,152"),
    (["predict", *TINY, "--set", "run.seq=2147483647", "--chunk-tokens", "1"],
     "the forward needs 412.32 GB per device"),
]


@pytest.mark.parametrize("argv, needle", HANGS, ids=[" ".join(a[-2:]) for a, _ in HANGS])
def test_hang_refused_fast(capsys, argv, needle):
  t0 = time.perf_counter()
  line = one_error(capsys, argv, needle)
  assert time.perf_counter() - t0 < 2, line


@pytest.mark.parametrize("argv", [
    ["--set", "run.batch=2147483646", "--strategy", "auto", "--set", "hardware.hbm_bytes=1e15"],
    ["--set", "run.seq=2147483647", "--strategy", "auto", "--set", "hardware.hbm_bytes=1e15"],
    ["--set", "model.layers=65536", "--strategy", "auto"],
    ["--set", "run.batch=1000000", "--strategy", "layerwise"],
], ids=["batch 2^31 auto", "seq 2^31 auto", "65536 layers auto", "batch 10^6"])
def test_large_sizes_plan_in_well_under_a_second(capsys, argv):
  t0 = time.perf_counter()
  assert cli.main(["plan", *TINY, *argv]) == 0
  assert time.perf_counter() - t0 < 3     # typically 0.2 s; slack for 2 shared cores
  capsys.readouterr()


def test_divisors_by_factorisation():
  from jaxpart.placement.plan import divisors
  for n in range(1, 500):
    assert divisors(n) == [d for d in range(1, n + 1) if n % d == 0]
  t0 = time.perf_counter()
  assert len(divisors(10**12)) == 169 and divisors(2**31 - 1) == [1, 2**31 - 1]
  assert time.perf_counter() - t0 < 0.5


# --- models too large: refused before anything is allocated or traced -----------------------

# A device with room (hbm_bytes): these are the host's limits, which the planner's per-device
# memory check (tested with the hangs above) would otherwise refuse first.
ROOMY = ("--set", "hardware.hbm_bytes=1e15")
TOO_LARGE = [
    (["run", *TINY, "--set", f"model.d_ff={BIG}"], "ModelConfig.d_ff = 1,000,000,000,000"),
    (["run", *TINY, "--set", f"model.d_ff={HUGE_FF}", "--cache-mb", "1e6", *ROOMY],
     "model too large for this host"),
    (["run", *TINY, "--set", "run.seq=2000000000", *ROOMY], "model too large for this host"),
    (["compare", *TINY, "--set", f"model.d_ff={HUGE_FF}", "--cache-mb", "1e6", *ROOMY],
     "model too large"),
    (["bench", *TINY, "--set", f"model.d_ff={HUGE_FF}", "--cache-mb", "1e6", *ROOMY],
     "model too large"),
    (["gradcheck", *TINY, "--set", f"model.d_ff={HUGE_FF}", "--cache-mb", "1e6", *ROOMY],
     "model too large"),
]


@pytest.mark.parametrize("argv, needle", TOO_LARGE, ids=[a[0] + " " + a[5] for a, _ in TOO_LARGE])
def test_too_large_refused_before_tracing(capsys, argv, needle):
  one_error(capsys, argv, needle)


def test_save_init_too_large_writes_nothing(capsys, tmp_path):
  dst = tmp_path / "ck"
  one_error(capsys, ["save-init", str(dst), *TINY, "--set", f"model.d_ff={HUGE_FF}",
                      "--cache-mb", "1e6", *ROOMY], "model too large")
  assert list(tmp_path.iterdir()) == []


def test_too_large_for_many_simulated_devices(capsys):
  """Per-device bytes times the simulated devices sharing the host."""
  one_error(capsys, ["compare", *TINY, "--set", "model.layers=60000"],
             "model too large for 16 simulated CPU devices")


# --- OS errors: one line naming the path and the cause, before the run ----------------------

def test_config_is_a_directory(capsys, tmp_path):
  one_error(capsys, ["info", "--config", str(tmp_path)], "is a directory")


@pytest.mark.parametrize("data", [b"\xff\xfe\x00abc", bytes(range(256)) * 4],
                         ids=["utf16 bom", "binary"])
def test_config_binary(capsys, tmp_path, data):
  one_error(capsys, ["info", "--config", _toml(tmp_path, data)], "not UTF-8 text")


def test_config_missing(capsys, tmp_path):
  one_error(capsys, ["info", "--config", str(tmp_path / "no.toml")], "no such file")


@pytest.mark.parametrize("exc, needle", [(PermissionError(13, "Permission denied"),
                                          "permission denied"),
                                         (OSError(5, "Input/output error"),
                                          "cannot read (Input/output error)")],
                         ids=["unreadable", "io error"])
def test_config_unreadable(capsys, tmp_path, monkeypatch, exc, needle):
  path = _toml(tmp_path, "[model]\n")

  def refuse(*a, **k):
    raise exc
  monkeypatch.setattr(config, "open", refuse, raising=False)
  one_error(capsys, ["info", "--config", path], needle)


def _ro(monkeypatch, folder):
  """Make `folder` read-only as os.access sees it (tests may run as root, which chmod can't)."""
  real = os.access
  monkeypatch.setattr(paths.os, "access", lambda p, mode: False if os.path.abspath(p) == str(
      folder) else real(p, mode))


OUTPUTS = [
    (["run", *TINY, "--dump", "{missing}/x.npz"], "--dump", "does not exist"),
    (["run", *TINY, "--dump", "{tmp}"], "--dump", "is a folder"),
    (["run", *TINY, "--dump", "{ro}/x.npz"], "--dump", "is not writable"),
    (["run", *TINY, "--dump", "{file}/x.npz"], "--dump", "is not a folder"),
    (["run", *TINY, "--dump", ""], "--dump = ''", "empty path"),
    (["bench", *TINY, "--json", "{missing}/o.json"], "--json", "does not exist"),
    (["bench", *TINY, "--json", "{ro}/o.json"], "--json", "is not writable"),
    (["bench", *TINY, "--sweep", "--jsonl", "{missing}/o.jsonl"], "--jsonl", "does not exist"),
    (["experiments", "--results-dir", "{file}/r"], "--results-dir", "is not a folder"),
    (["experiments", "--results-dir", "{file}"], "--results-dir", "exists and is not a folder"),
    (["save-init", "{missing}/ck", *TINY], "DST", "does not exist"),
    (["save-init", "{ro}/ck", *TINY], "DST", "is not writable"),
    (["convert", "{tmp}/src", "{missing}/dst", "--to-strategy", "unsharded"], "DST",
     "does not exist"),
    (["convert", "{tmp}/src", "{missing}/dst.npz"], "DST", "does not exist"),
]


@pytest.mark.parametrize("argv, flag, cause", OUTPUTS,
                         ids=[f"{a[0]} {f} {c}" for a, f, c in OUTPUTS])
def test_output_path_checked_before_the_run(capsys, tmp_path, monkeypatch, argv, flag, cause):
  ro = tmp_path / "ro"
  ro.mkdir()
  _ro(monkeypatch, ro)
  (tmp_path / "file").write_text("x")
  subs = {"{missing}": str(tmp_path / "missing"), "{tmp}": str(tmp_path), "{ro}": str(ro),
          "{file}": str(tmp_path / "file")}
  for k, v in subs.items():
    argv = [a.replace(k, v) for a in argv]
  before = sorted(p.name for p in tmp_path.iterdir())
  line = one_error(capsys, argv, flag)
  assert cause in line
  assert sorted(p.name for p in tmp_path.iterdir()) == before


# --- TOML structure: which key, and what was expected --------------------------------------

TOML = [
    ("model = 5\n", "model = 5: expected a [model] table"),
    ("run = 'x'\n", "run = 'x': expected a [run] table"),
    ("hardware = 5\n", "hardware = 5: expected a hardware name (string) or a [hardware] table"),
    ("preset = 3\n", "preset = 3: expected a preset name (string)"),
    ("model = [1, 2]\n", "model = [1, 2]: expected a [model] table"),
    ("runs = {}\n", "unknown key 'runs'"),
    ("[model]\nlayer = 2\n", "model.layer: unknown field"),
    ("[model]\nlayers = 2.5\n", "ModelConfig.layers = 2.5: must be a positive integer"),
    ("[model]\nlayers = true\n", "ModelConfig.layers = True"),
    ("[model]\ndtype = 5\n", "ModelConfig.dtype = 5"),
    ("[model]\nln_eps = 'abc'\n", "model.ln_eps = 'abc': must be a float"),
    ("[model]\nln_eps = nan\n", "ModelConfig.ln_eps = nan: must be a positive finite number"),
    ("[hardware]\nlink_bw = inf\n", "Hardware.link_bw = inf"),
    ("[hardware]\nhbm_bytes = -1\n", "Hardware.hbm_bytes = -1.0"),
    ("[run]\nbatch = 0\n", "RunShape.batch = 0"),
    ("[model\n", "not valid TOML"),
]


@pytest.mark.parametrize("text, needle", TOML, ids=[t.split("\n")[-2] for t, _ in TOML])
def test_toml_structure(capsys, tmp_path, text, needle):
  one_error(capsys, ["info", "--config", _toml(tmp_path, text)], needle)


# --- non-finite numbers --------------------------------------------------------------------

NONFINITE = [
    (["--set", "model.ln_eps=nan"], "ModelConfig.ln_eps = nan"),
    (["--set", "model.ln_eps=inf"], "ModelConfig.ln_eps = inf"),
    (["--set", "model.ln_eps=-inf"], "ModelConfig.ln_eps = -inf"),
    (["--set", "hardware.link_bw=nan"], "Hardware.link_bw = nan"),
    (["--set", "hardware.peak_flops=inf"], "Hardware.peak_flops = inf"),
    (["--set", "hardware.l2_bytes=nan"], "Hardware.l2_bytes = nan"),
    (["--set", "hardware.link_latency=inf"], "Hardware.link_latency = inf"),
    (["--cache-mb", "inf"], "--cache-mb = inf"),
    (["--cache-mb", "nan"], "--cache-mb = nan"),
    (["--cache-mb", "-1"], "--cache-mb = -1.0"),
    (["--cache-mb", "0"], "--cache-mb = 0.0"),
]


@pytest.mark.parametrize("extra, needle", NONFINITE, ids=[" ".join(e) for e, _ in NONFINITE])
def test_nonfinite_config_refused(capsys, extra, needle):
  one_error(capsys, ["plan", *TINY, *extra], needle)


@pytest.mark.parametrize("tol", ["nan", "inf", "-1"])
def test_gradcheck_tol_finite(capsys, tol):
  one_error(capsys, ["gradcheck", *TINY, "--tol", tol], "--tol")


class _NaNPlaced:
  """Stands in for runs.place: an engine whose output is all NaN (no compile)."""

  def __init__(self, setup, plan, params, x, **kw):
    self.shape = x.shape

  def __call__(self):
    return np.full(self.shape, np.nan, np.float32)


def test_run_fails_when_output_not_finite(capsys, monkeypatch):
  monkeypatch.setattr(runs, "place", _NaNPlaced)
  one_error(capsys, ["run", *TINY, "--repeats", "1"],
             "output of the layerwise placement: 25,600 of 25,600 values are not finite")


def test_compare_fails_when_reference_not_finite(capsys, monkeypatch):
  monkeypatch.setattr(runs, "reference", lambda s, p, x, dtype=None: np.full(x.shape, np.inf))
  one_error(capsys, ["compare", *TINY, "--repeats", "1"],
             "output of the single-device reference (bfloat16)")


def test_compare_fails_when_a_placement_is_not_finite(capsys, monkeypatch):
  monkeypatch.setattr(runs, "reference", lambda s, p, x, dtype=None: np.zeros(x.shape))
  monkeypatch.setattr(runs, "place", _NaNPlaced)
  one_error(capsys, ["compare", *TINY, "--repeats", "1"], "output of the baseline placement")


def test_bench_fails_when_a_program_is_not_finite(capsys, monkeypatch):
  from jaxpart.measure import bench
  bad = types.SimpleNamespace(name="gspmd", out=np.array([1.0, np.nan, np.inf]))
  monkeypatch.setattr(bench, "bench_point", lambda *a, **k: bench.BenchPoint({}, [bad]))
  one_error(capsys, ["bench", *TINY], "output of bench program 'gspmd': 2 of 3 values")


def test_nonfinite_weights_named_for_the_checkpoint_code():
  """validate.check_finite_tree, the message the checkpoint reads below refuse with."""
  tree = {"attn": {"wq": np.ones((2, 2)), "wk": np.array([[np.nan, 1.0]])},
          "mlp": {"w_in": np.array([np.inf])}}
  with pytest.raises(validate.NonFiniteError) as e:
    validate.check_finite_tree("import x.npz", tree)
  assert "['attn']['wk']: 1 of 2 values are not finite (NaN 1, Inf 0)" in str(e.value)
  assert "and 1 more leaves" in str(e.value) and "--allow-nonfinite" in str(e.value)
  assert set(validate.check_finite_tree("x", tree, allow_nonfinite=True)) == {
      "['attn']['wk']", "['mlp']['w_in']"}
  assert validate.check_finite_tree("x", {"a": np.ones(3)}) == {}


# --- flags that do not apply, and numbers out of range -------------------------------------

FLAGS = [
    (["experiments", "--only", ""], "--only = ''"),
    (["experiments", "--only", ","], "--only = ','"),
    (["experiments", "--only", "a,,b"], "an empty experiment name"),
    (["experiments", "--list", "--only", "x"], "--only does not apply with --list"),
    (["experiments", "--list", "--json"], "--json does not apply with --list"),
    (["bench", *TINY, "--jsonl", "o.jsonl"], "--jsonl does not apply without --sweep"),
    (["bench", *TINY, "--chunks", "16"], "--chunks does not apply without --sweep"),
    (["bench", *TINY, "--device-counts", "4"], "--device-counts does not apply"),
    (["bench", *TINY, "--sweep", "--json"], "--json does not apply with --sweep"),
    (["bench", *TINY, "--sweep", "--memory-seqs", "100"], "--memory-seqs does not apply"),
    (["bench", *TINY, "--memory-only"], "--memory-only needs --memory-seqs"),
    (["convert", "a", "b", "--npz-layout", "per_layer"], "--npz-layout applies to an .npz"),
    (["plan", *TINY, "--top", "3"], "--top applies to --strategy auto only"),
    (["plan", *TINY, "--strategy", "auto", "--chunk-tokens", "16"], "--chunk-tokens does not"),
    (["plan", *TINY, "--strategy", "layerwise", "--pp", "2"], "--pp does not apply"),
    (["plan", *TINY, "--strategy", "baseline", "--tp", "8", "--chunk-rows", "1"],
     "--chunk-rows does not apply"),
    (["save-init", "ck", "--preset", "tiny", "--strategy", "unsharded", "--tp", "2"], "--tp applies to a sharded target"),
    (["run", *TINY, "--repeats", "0"], "--repeats = 0"),
    (["bench", *TINY, "--warmup", "-1"], "--warmup = -1"),
    (["run", *TINY, "--seed", "-1"], "--seed = -1"),
    (["run", *TINY, "--seed", str(2**64)], "--seed = 18,446,744,073,709,551,616"),
    (["plan", "--preset", "tiny", "--devices", "0"], "--devices = 0"),
    (["plan", *TINY, "--kv-block", "0"], "--kv-block = 0"),
    (["plan", *TINY, "--strategy", "auto", "--top", "0"], "--top = 0"),
    (["plan", "--config", ""], "--config = '': empty"),
    (["run", *TINY, "--coordinator", ""], "--coordinator = '': empty"),
    (["run", *TINY, "--local-devices", "0"], "--local-devices = 0"),
    (["run", *TINY, "--heartbeat-timeout", "0"], "--heartbeat-timeout = 0"),
    (["run", *TINY, "--process-id", "-1"], "--process-id = -1"),
    (["gradcheck", *TINY, "--remat", ""], "--remat = '': empty"),
    (["verify", ""], "PATH = '': empty"),
]


@pytest.mark.parametrize("argv, needle", FLAGS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in FLAGS])
def test_flag_refused(capsys, tmp_path, monkeypatch, argv, needle):
  monkeypatch.chdir(tmp_path)
  one_error(capsys, argv, needle)
  assert list(tmp_path.iterdir()) == []


# --- multi-process ends: which process died, in one line -----------------------------------

UNHEALTHY = ["E1201 coordination_service.cc:1549] Use error polling to propagate the following "
             "error to all tasks: UNAVAILABLE: The following tasks are unhealthy (stopped "
             "sending heartbeats):\n", "1\n", "The tasks have crashed.\n",
             "terminate called after throwing an instance of 'std::bad_cast'\n"]
RESET = ["W1201 preemption_sync_manager.cc:147] Failed to retrieve preemption notice: "
         "UNAVAILABLE: failed to connect to all addresses; last error: UNAVAILABLE: "
         "ipv4:127.0.0.1:29649: recvmsg:Connection reset by peer\n"]

ENDS = [
    (-signal.SIGABRT, UNHEALTHY,
     "killed by SIGABRT: JAX reports process 1 stopped sending heartbeats"),
    (-signal.SIGABRT, RESET, "killed by SIGABRT: lost the coordinator"),
    (-signal.SIGKILL, [], "killed by SIGKILL"),
    (2, ["jaxpart run: error: --coordinator 127.0.0.1:1: nothing accepted a connection\n"],
     "exited with status 2: jaxpart run: error: --coordinator 127.0.0.1:1: nothing accepted"),
    (1, ["Traceback (most recent call last):\n", "RuntimeError: injected failure\n"],
     "exited with status 1: Traceback"),
    (0, [], "exited with status 0"),
]


@pytest.mark.parametrize("rc, lines, want", ENDS, ids=[w[:30] for _, _, w in ENDS])
def test_how_a_process_ended(rc, lines, want):
  assert distributed.explain_end(rc, lines).startswith(want)


def test_a_child_that_said_ctrl_c_gets_no_second_line():
  """cli.py ends an interrupted child with its own line and 130; the supervisor adds none."""
  said = ["jaxpart forward: error: interrupted (Ctrl-C)\n"]
  assert supervise.summary("forward", "0", 130, said) is None
  assert supervise.exit_status(130) == 130
  assert supervise.summary("forward", "0", 131, said) is not None


def test_launcher_says_which_process_exited_how(tmp_path):
  code = ("import os, signal, sys\n"
          "i = int(sys.argv[sys.argv.index('--process-id') + 1])\n"
          "if i == 1: sys.exit(3)\n"
          f"sys.stderr.write({''.join(UNHEALTHY[:2])!r}); sys.stderr.flush()\n"
          "os.kill(os.getpid(), signal.SIGABRT)\n")
  err = io.StringIO()
  rc, reports = launch_local.launch([], 2, grace=5, timeout=30, out=io.StringIO(), err=err,
                                    program=[sys.executable, "-c", code])
  text = err.getvalue()
  assert rc != 0
  assert "launch_local: p0 killed by SIGABRT: JAX reports process 1 stopped sending " \
         "heartbeats" in text, text
  assert "launch_local: p1 exited with status 3" in text, text


# --- checkpoints: non-finite weights, damage that reads back, manifest structure, write faults

CKPT_TINY = ["--preset", "tiny"]


def _tiny_params(nonfinite: bool = False) -> dict:
  """Random tiny weights on the host (no compile); optionally 3 NaN in attn/wq, 2 Inf in
  mlp/w_in."""
  cfg = config.MODEL_PRESETS["tiny"]
  rng = np.random.default_rng(0)
  flat = {p: rng.standard_normal(s.shape, np.float32).astype(np_dtype(s.dtype))
          for p, s in ck.flatten(model.param_shapes(cfg)).items()}
  if nonfinite:
    flat["attn/wq"].reshape(-1)[:3] = np.nan
    flat["mlp/w_in"].reshape(-1)[5:7] = np.inf
  return ck.unflatten(model.param_shapes(cfg), flat)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  """Unsharded tiny checkpoints and .npz files, finite and not; shared read-only."""
  root = tmp_path_factory.mktemp("hostile_ckpt")
  cfg = config.MODEL_PRESETS["tiny"]
  run = config.to_dict(config.RUN_PRESETS["tiny"])
  good, bad = _tiny_params(), _tiny_params(nonfinite=True)
  ck.save(root / "good", good, cfg, run=run, hardware="h100")
  ck.save(root / "nan", bad, cfg, run=run, hardware="h100")
  ck.export_npz(root / "nan.npz", bad, cfg, run=run)
  np.savez(root / "foreign_nan.npz", **{p: np.asarray(x).view(np.uint16)
                                        for p, x in ck.flatten(bad).items()})
  return root


def _place(ckpts, tmp_path, name):
  dst = tmp_path / name
  (shutil.copytree if (ckpts / name).is_dir() else shutil.copy)(ckpts / name, dst)
  return dst


NONFINITE_WEIGHTS = [
    (["verify", "{nan}"], "nan: weight attn/wq: 3 of 16,384 values are not finite (NaN 3, Inf 0) "
     "(and 1 more leaves); pass --allow-nonfinite"),
    (["verify", "{nan.npz}"], "nan.npz: weight attn/wq: 3 of 16,384"),
    (["convert", "{nan}", "{out}", "--to-strategy", "unsharded"], "weight attn/wq"),
    (["convert", "{nan}", "{out}.npz"], "weight attn/wq"),
    (["convert", "{nan.npz}", "{out}", "--to-strategy", "unsharded"], "weight attn/wq"),
    (["convert", "{foreign_nan.npz}", "{out}", "--to-strategy", "unsharded", *CKPT_TINY],
     "foreign_nan.npz: weight attn/wq: 3 of 16,384"),
]


@pytest.mark.parametrize("argv, needle", NONFINITE_WEIGHTS,
                         ids=[" ".join(a[:2]) for a, _ in NONFINITE_WEIGHTS])
def test_nonfinite_weights_refused(capsys, ckpts, tmp_path, argv, needle):
  argv = [a.replace("{out}", str(tmp_path / "out")).replace("{", str(ckpts) + "/").replace(
      "}", "") for a in argv]
  before = snapshot(tmp_path), snapshot(ckpts)
  one_error(capsys, argv, needle)
  assert (snapshot(tmp_path), snapshot(ckpts)) == before


@pytest.mark.parametrize("src, dst", [("nan", "out"), ("nan.npz", "out.npz")])
def test_nonfinite_weights_allowed(capsys, ckpts, tmp_path, src, dst):
  argv = ["convert", str(ckpts / src), str(tmp_path / dst), "--allow-nonfinite"]
  assert cli.main(argv + ([] if dst.endswith(".npz") else ["--to-strategy", "unsharded"])) == 0
  out = capsys.readouterr().out
  assert "note: 2 leaves hold NaN or Inf (allowed by --allow-nonfinite): attn/wq: 3 of" in out
  one_error(capsys, ["verify", str(tmp_path / dst)], "weight attn/wq")
  assert cli.main(["verify", str(tmp_path / dst), "--allow-nonfinite"]) == 0
  assert "mlp/w_in: 2 of 65,536 values are not finite (NaN 0, Inf 2)" in capsys.readouterr().out


def test_nonfinite_hugging_face_import(capsys, tmp_path):
  cfg = dataclasses.replace(config.MODEL_PRESETS["llama-tiny"], layers=1, dtype="float32")
  tree = jax.tree.map(np.array, llama.init_params(cfg, jax.random.key(0)))   # writable copies
  ck.flatten(tree)["mlp/w_down"].reshape(-1)[:4] = np.nan
  hf.write_hf(tree, cfg, str(tmp_path / "hf"))
  argv = ["convert", str(tmp_path / "hf"), str(tmp_path / "out"), "--to-strategy", "unsharded"]
  before = snapshot(tmp_path)
  one_error(capsys, argv, "hf: weight mlp/w_down: 4 of")
  assert snapshot(tmp_path) == before
  assert cli.main(argv + ["--allow-nonfinite"]) == 0
  capsys.readouterr()


def _orbax_files(path: Path) -> list[str]:
  return sorted(p.relative_to(path).as_posix() for p in (path / "orbax").rglob("*")
                if p.is_file())


def _biggest_data_file(path: Path) -> str:
  return max((f for f in _orbax_files(path) if "/d/" in f),
             key=lambda f: (path / f).stat().st_size)


# Each of these restores bit-exact with orbax 0.12 (found by trying every file): only the
# manifest's list of files can tell.
DAMAGE = [
    ("delete", "orbax/0/_CHECKPOINT_METADATA", "orbax/0/_CHECKPOINT_METADATA is missing"),
    ("delete", "orbax/0/commit_success.txt", "orbax/0/commit_success.txt is missing"),
    ("delete", "orbax/0/params/commit_success.txt", "params/commit_success.txt is missing"),
    ("delete", "orbax/0/params/_METADATA", "orbax/0/params/_METADATA is missing"),
    ("delete", "orbax/0/params/_sharding", "orbax/0/params/_sharding is missing"),
    ("delete", "orbax/0/params/array_metadatas/process_0", "process_0 is missing"),
    ("delete", "orbax/0/params/ocdbt.process_0/manifest.ocdbt", "manifest.ocdbt is missing"),
    ("short", "orbax/0/_CHECKPOINT_METADATA", "bytes, 274 were written (truncated)"),
    ("short", "orbax/0/params/_sharding", "were written (truncated)"),
    ("short", "orbax/0/params/ocdbt.process_0/manifest.ocdbt", "were written (truncated)"),
    ("short", "{data}", "were written (truncated)"),
    ("grow", "{data}", "were written (grown)"),
    ("edit", "orbax/0/_CHECKPOINT_METADATA", "changed (sha256 differs from the one recorded"),
    ("add", "orbax/0/params/d/stray", "orbax/0/params/d/stray is not one of the files written"),
]


@pytest.mark.parametrize("how, rel, needle", DAMAGE, ids=[f"{h} {r.split('/')[-1]}"
                                                          for h, r, _ in DAMAGE])
def test_damage_that_reads_back_is_reported(capsys, ckpts, tmp_path, how, rel, needle):
  path = _place(ckpts, tmp_path, "good")
  rel = rel.replace("{data}", _biggest_data_file(path))
  f = path / rel
  if how == "delete":
    f.unlink()
  elif how == "short":
    f.write_bytes(f.read_bytes()[:-1])
  elif how == "grow":
    f.write_bytes(f.read_bytes() + b"\0")
  elif how == "edit":
    f.write_bytes(f.read_bytes().replace(b"metrics", b"METRICS"))
  else:
    f.write_bytes(b"x")
  before = snapshot(tmp_path)
  line = one_error(capsys, ["verify", str(path)], needle)
  assert "the checkpoint is damaged or incomplete" in line and "recorded in the manifest" in line
  assert snapshot(tmp_path) == before
  one_error(capsys, ["convert", str(path), str(tmp_path / "out"), "--to-strategy",
                      "unsharded"], needle)
  assert snapshot(tmp_path) == before


def test_every_orbax_file_is_on_the_list(capsys, ckpts, tmp_path):
  """Every file orbax wrote, deleted or one byte short in turn, is named by verify."""
  good = ckpts / "good"
  for rel in _orbax_files(good):
    for how in ("delete", "short"):
      path = _place(ckpts, tmp_path, "good")
      f = path / rel
      f.unlink() if how == "delete" else f.write_bytes(f.read_bytes()[:-1])
      one_error(capsys, ["verify", str(path)], rel)
      shutil.rmtree(path)
  assert cli.main(["verify", str(good)]) == 0
  assert f"all {len(_orbax_files(good))} files under orbax/ as recorded" in \
      capsys.readouterr().out


def test_checkpoint_without_a_file_list_still_verifies(capsys, ckpts, tmp_path):
  """Saved before the list existed: read as before, and verify says the files went unchecked."""
  path = _place(ckpts, tmp_path, "good")
  doc = json.loads((path / "manifest.json").read_text())
  del doc["files"]
  (path / "manifest.json").write_text(json.dumps(doc))
  assert cli.main(["verify", str(path)]) == 0
  assert "files not checked (no list recorded" in capsys.readouterr().out


DELETE = object()   # the key is removed instead of set
LEAF = "params['attn/wq']"
MANIFEST_CASES = [
    ("params|attn/wq", "x", f"manifest key {LEAF} = 'x': expected an object {{shape, dtype, "
     "checksum}"),
    ("layout_stages", "abc", "manifest key layout_stages = 'abc': expected a positive integer"),
    ("layout_stages", 0, "manifest key layout_stages = 0: expected a positive integer"),
    ("layout_stages", True, "manifest key layout_stages = True: expected a positive integer"),
    ("layout", 5, "manifest key layout = 5: expected one of stacked, per_layer, per_stage"),
    ("layout", DELETE, "manifest key layout is missing: expected one of stacked"),
    ("container", "zip", "manifest key container = 'zip': expected 'orbax' or 'npz'"),
    ("params", DELETE, "manifest key params is missing: expected an object of leaf path"),
    ("params", [1], "manifest key params = [1]: expected an object of leaf path"),
    ("params|attn/wq|shape", "4x128x32", f"manifest key {LEAF}.shape = '4x128x32': expected a "
     "list of non-negative integers"),
    ("params|attn/wq|shape", [4, -1, 32], f"{LEAF}.shape = [4, -1, 32]: expected a list"),
    ("params|attn/wq|dtype", 16, f"manifest key {LEAF}.dtype = 16: expected a dtype name"),
    ("params|attn/wq|checksum", 5, f"manifest key {LEAF}.checksum = 5: expected 16 lowercase "
     "hex digits"),
    ("params|attn/wq|checksum", DELETE, f"manifest key {LEAF}.checksum is missing"),
    ("params|attn/wq|stored_as", "int8", f"{LEAF}.stored_as = 'int8': expected 'uint16'"),
    ("opt_state", "x", "manifest key opt_state = 'x': expected an object of leaf path"),
    ("model", DELETE, "manifest key model is missing: expected an object of ModelConfig fields"),
    ("model", 5, "manifest key model = 5: expected an object of ModelConfig fields"),
    ("model|layers", DELETE, "manifest key model.layers is missing: expected every one of"),
    ("model|colour", "red", "manifest key model.colour: unknown field; ModelConfig has layers"),
    ("model|layers", "4", "ModelConfig.layers = '4'"),
    ("run", "x", "manifest key run = 'x': expected an object of RunShape fields"),
    ("run|seq", DELETE, "manifest key run.seq is missing"),
    ("plan", "x", "manifest key plan = 'x': expected a Plan object or null"),
    ("hardware", 5, "manifest key hardware = 5: expected a hardware name (string)"),
    ("created", 5, "manifest key created = 5: expected a time stamp (string)"),
    ("files", "x", "manifest key files = 'x': expected an object of relative path"),
    ("files|orbax/0/_CHECKPOINT_METADATA|bytes", -1,
     "manifest key files['orbax/0/_CHECKPOINT_METADATA'].bytes = -1: expected a non-negative"),
    ("files|orbax/0/_CHECKPOINT_METADATA|sha256", "abc", "sha256 = 'abc': expected 64 "),
    ("version", 2, "manifest version 2; this jaxpart reads version 1"),
]


@pytest.mark.parametrize("key, value, needle", MANIFEST_CASES,
                         ids=[f"{k}={v if v is not DELETE else 'missing'}"
                              for k, v, _ in MANIFEST_CASES])
def test_manifest_structure(capsys, ckpts, tmp_path, key, value, needle):
  path = _place(ckpts, tmp_path, "good")
  doc = json.loads((path / "manifest.json").read_text())
  node, parts = doc, key.split("|")
  for p in parts[:-1]:
    node = node[p]
  if value is DELETE:
    del node[parts[-1]]
  else:
    node[parts[-1]] = value
  (path / "manifest.json").write_text(json.dumps(doc))
  before = snapshot(tmp_path)
  line = one_error(capsys, ["verify", str(path)], needle)
  assert str(path) in line
  assert snapshot(tmp_path) == before


@pytest.mark.parametrize("data, needle", [
    (b"\xff\xfe{}", "manifest.json is not UTF-8 text (byte 0xff at offset 0)"),
    ("{\"format\": \"jaxpart-checkpoint\", \u00e9}".encode("latin-1"),
     "manifest.json is not UTF-8 text (byte 0xe9 at offset 33)"),
    (b"{\"format\": ", "manifest.json is not valid JSON"),
    (b"[1, 2]", "not a jaxpart manifest (format is 'list'"),
    (b"{}", "not a jaxpart manifest (format is None"),
], ids=["utf16 bom", "latin-1", "cut json", "a list", "empty object"])
def test_manifest_bytes(capsys, ckpts, tmp_path, data, needle):
  path = _place(ckpts, tmp_path, "good")
  (path / "manifest.json").write_bytes(data)
  one_error(capsys, ["verify", str(path)], needle)


def test_npz_embedded_manifest_structure(capsys, ckpts, tmp_path):
  with np.load(ckpts / "nan.npz") as z:
    arrays = {k: z[k] for k in z.files}
  doc = json.loads(str(arrays[ck.NPZ_MANIFEST_KEY][()]))
  doc["params"]["mlp/w_in"] = "x"
  arrays[ck.NPZ_MANIFEST_KEY] = np.array(json.dumps(doc))
  np.savez(tmp_path / "m.npz", **arrays)
  one_error(capsys, ["verify", str(tmp_path / "m.npz")],
             "m.npz: manifest key params['mlp/w_in'] = 'x': expected an object")


# Write faults: (where the fault strikes, what it raises, the exit status, what the line says)
ENOSPC = OSError(errno.ENOSPC, "No space left on device")
FAULTS = [
    ("orbax manifest", ENOSPC, 2, "writing failed: No space left on device (ENOSPC)"),
    ("orbax data", ENOSPC, 2, "writing failed: No space left on device (ENOSPC)"),
    ("npz leaf", ENOSPC, 2, "writing failed: No space left on device (ENOSPC)"),
    ("orbax data", ValueError("DATA_LOSS: Error writing local file \"/x/d/1\": [OS error 28: No "
                              "space left on device]"), 2,
     "writing failed: No space left on device (ENOSPC)"),
    ("orbax data", ValueError("DATA_LOSS: Error writing local file \"/x/d/1\""), 2,
     "writing failed: ValueError: DATA_LOSS: Error writing local file"),
    # what orbax 0.11 raises on a full disk, after logging it with a traceback from each writer
    # thread and while tensorstore reports `Event loop is closed` as unraisable (_FailingManager)
    ("orbax data", ValueError("RESOURCE_EXHAUSTED: Error writing \"attn.wo/0.0.0\" in OCDBT "
                              "database at local file \"/x/\": Failed to write 14367 bytes to "
                              "file 17: No space left on device [os_error_code='28']"), 2,
     "writing failed: No space left on device (ENOSPC): expected a writable destination"),
    ("orbax manifest", OSError(errno.EACCES, "Permission denied"), 2,
     "writing failed: Permission denied (EACCES)"),
    ("orbax manifest", KeyboardInterrupt(), 130, "interrupted (Ctrl-C) before the write finished"),
    ("orbax data", KeyboardInterrupt(), 130, "interrupted (Ctrl-C)"),
    ("npz leaf", KeyboardInterrupt(), 130, "interrupted (Ctrl-C)"),
]


class _ToStderr(logging.Handler):
  """Log records (with their tracebacks) to whatever sys.stderr is now, as absl's handler does."""

  def emit(self, record):
    sys.stderr.write(self.format(record) + "\n")


class _FailingManager:
  """Stands in for orbax's CheckpointManager: the data write fails part way."""

  def __init__(self, exc):
    self.exc = exc

  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False

  def save(self, *a, **k):
    """As orbax does on a full disk: log the failure with its traceback, let tensorstore report
    its closed event loop as unraisable, then raise."""
    try:
      raise self.exc
    except Exception:
      logging.getLogger("absl").exception("_SignalingThread.run() raised an exception")
      logging.getLogger("asyncio").error(    # as its loop reports an abandoned write task
          "Task exception was never retrieved\nfuture: <Task finished coro=<orbax write>>",
          exc_info=True)
    sys.unraisablehook(types.SimpleNamespace(
        exc_type=RuntimeError, exc_value=RuntimeError("Event loop is closed"),
        exc_traceback=None, err_msg=None, object=None))
    raise self.exc


def _strike(monkeypatch, where, exc):
  from jaxpart.checkpoint import npz, orbax_io  # noqa: PLC0415
  if where == "orbax manifest":
    monkeypatch.setattr(orbax_io, "_write_manifest", lambda *a: (_ for _ in ()).throw(exc))
  elif where == "orbax data":
    real = orbax_io._manager
    monkeypatch.setattr(orbax_io, "_manager", lambda root, items, read_only: (
        real(root, items, read_only) if read_only else _FailingManager(exc)))
  else:
    real, calls = npz._write_npy, []

    def second_leaf_fails(zf, key, a):
      calls.append(key)
      if len(calls) == 2:
        raise exc
      real(zf, key, a)
    monkeypatch.setattr(npz, "_write_npy", second_leaf_fails)


@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
@pytest.mark.parametrize("where, exc, code, needle", FAULTS,
                         ids=[f"{w} {type(e).__name__} {getattr(e, 'errno', '')}"
                              for w, e, _, _ in FAULTS])
def test_write_fault_during_convert(capsys, ckpts, tmp_path, monkeypatch, where, exc, code,
                                    needle, existing):
  """One line naming DST and the cause; the hidden .NAME.partial gone; DST as it was; none of
  orbax's logged tracebacks or tensorstore's unraisable reports."""
  monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
  for name in ("absl", "asyncio"):
    monkeypatch.setattr(logging.getLogger(name), "handlers", [_ToStderr()])
  dst = tmp_path / ("out.npz" if where == "npz leaf" else "out")
  extra = [] if dst.suffix == ".npz" else ["--to-strategy", "unsharded"]
  if existing:
    assert cli.main(["convert", str(ckpts / "good"), str(dst), *extra]) == 0
    capsys.readouterr()
  before = snapshot(tmp_path), snapshot(ckpts)
  _strike(monkeypatch, where, exc)
  line = one_error(capsys, ["convert", str(ckpts / "good"), str(dst), *extra, "--overwrite"],
                    needle, code=code)
  assert f"{dst}: " in line and f".{dst.name}.partial was removed and " in line
  assert line.endswith("it is as it was" if existing else "nothing was written there")
  assert (snapshot(tmp_path), snapshot(ckpts)) == before
  assert not list(tmp_path.glob(".out*"))
