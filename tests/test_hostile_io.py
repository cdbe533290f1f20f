"""Hostile inputs for forward, generate and calibrate: token-id files, Ctrl-C, outputs in bad
places or on a full disk, and values too large for the model or the machine. Each ends in one
`error:` line naming the flag or file (exit 2; 130 for Ctrl-C), no traceback, an existing
output unchanged."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from jax._src import compiler as jax_compiler

from conftest import snapshot
from jaxpart import cli, config, paths
from jaxpart.checkpoint import hf
from jaxpart.measure import calibrate
from jaxpart.runtime import generate
from conftest import one_error
from test_hostile_hf import ROOT, _on_full_disk, _random_tree, full_disk

CFG = dataclasses.replace(config.MODEL_PRESETS["llama-tiny"], layers=2, dtype="float32")
V = CFG.vocab


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  """A tiny Hugging Face model with random weights and good ids for it (2 x 8); also the same
  model with no max_position_embeddings (no context limit), so memory is what refuses."""
  root = tmp_path_factory.mktemp("hostile_io")
  hf.write_hf(_random_tree(CFG), CFG, str(root / "hf"))
  np.save(root / "ids.npy", np.random.default_rng(1).integers(0, V, (2, 8)))
  (root / "unlimited").mkdir()
  for f in (root / "hf").iterdir():
    (root / "unlimited" / f.name).write_bytes(f.read_bytes())
  cfg = json.loads((root / "hf" / "config.json").read_text())
  del cfg["max_position_embeddings"]
  (root / "unlimited" / "config.json").write_text(json.dumps(cfg))
  return root


def _write(path: Path, what):
  if callable(what):
    what(path)
  elif isinstance(what, bytes):
    path.write_bytes(what)
  else:
    np.save(path, what)


def _truncated_npy(path: Path):
  np.save(path, np.zeros((4, 64), np.int64))
  path.write_bytes(path.read_bytes()[:200])


# (what --input-ids holds, the needle) for both commands; then what only one refuses
IDS = [
    (None, "cannot read it (No such file or directory)"),
    (b"1 2 3\n4 5 6\n", "not a .npy file (it starts b'1 2 3"),
    (lambda p: p.write_bytes(pickle.dumps([[1, 2]])), "a pickle (not loaded"),
    (np.int64(3), "a 0-D array of shape ()"),
    (np.arange(5), "a 1-D array of shape (5,)"),
    (np.zeros((2, 3, 4), np.int64), "a 3-D array of shape (2, 3, 4)"),
    (np.zeros((0, 8), np.int64), "shape (0, 8) holds no ids"),
    (lambda p: np.savez(open(p, "wb"), ids=np.zeros((2, 8), np.int64)), "an .npz archive"),
    (lambda p: p.mkdir(), "is a folder; expected a .npy file"),
    (np.full((2, 8), 3.7), "float64 values; token ids must be integers (not rounded"),
    (np.ones((2, 8), bool), "bool values; token ids must be integers"),
    (np.full((2, 8), V, np.int64), f"ids in {V} .. {V}; the model's vocabulary is 0 .. {V - 1}"),
    (_truncated_npy, "a damaged or unsupported .npy"),
]
FORWARD_ONLY = [(np.array([[-1, 5, 6], [1, 2, 3]]), f"ids in -1 .. 6; the model's vocabulary")]
GENERATE_ONLY = [
    (np.array([[-1, 5, 6], [1, 2, 3]]), "row 0 has padding (-1) before or inside its prompt "
                                        "(-1 5 6)"),
    (np.array([[1, -1, 6], [1, 2, 3]]), "row 0 has padding (-1) before or inside"),
    (np.array([[1, 2, 3], [-1, -1, -1]]), "row 1 is all padding"),
    (np.array([[1, 2, -1], [1, 2, -7]]), "ids in -7 .. 2; the model's vocabulary is 0 .. 255 "
                                         "(-1 only as padding after a prompt)"),
]
CASES = ([("forward", c, n) for c, n in IDS + FORWARD_ONLY]
         + [("generate", c, n) for c, n in IDS + GENERATE_ONLY])


@pytest.mark.parametrize("command, content, needle", CASES,
                         ids=[f"{c}-{n[:30]}" for c, _, n in CASES])
def test_input_ids(capsys, model, tmp_path, command, content, needle):
  ids = tmp_path / "ids.npy"
  if content is not None:
    _write(ids, content)
  before = snapshot(tmp_path)
  line = one_error(capsys, [command, "--model-dir", str(model / "hf"), "--input-ids", str(ids),
                             "--out", str(tmp_path / "out.npy")], needle)
  assert f"--input-ids = {str(ids)!r}: " in line
  assert snapshot(tmp_path) == before


def _raise_interrupt(*a, **k):
  raise KeyboardInterrupt


@pytest.mark.parametrize("command, target", [
    ("forward", "jaxpart.runtime.runs.place"), ("generate", "jaxpart.runtime.generate.generate"),
    ("calibrate", "jaxpart.measure.calibrate.calibrate")])
def test_ctrl_c_in_process(capsys, model, tmp_path, monkeypatch, command, target):
  monkeypatch.setattr(target, _raise_interrupt)
  out = tmp_path / ("hw.toml" if command == "calibrate" else "out.npy")
  argv = ([command, "--out", str(out), "--sizes", "64"] if command == "calibrate" else
          [command, "--model-dir", str(model / "hf"), "--input-ids", str(model / "ids.npy"),
           "--out", str(out)])
  assert one_error(capsys, argv, "interrupted (Ctrl-C)", code=130) == (
      f"jaxpart {command}: error: interrupted (Ctrl-C)")
  assert not out.exists()


COMPILING = textwrap.dedent("""
    import runpy, sys
    from jax._src import compiler
    real, marker = compiler.backend_compile_and_load, sys.argv[1]
    def marked(*a, **k):
      open(marker, "w").close()           # the test sends SIGINT now, during XLA's compile
      return real(*a, **k)
    compiler.backend_compile_and_load = marked
    sys.argv = ["jaxpart"] + sys.argv[2:]
    runpy.run_module("jaxpart", run_name="__main__")
    """)


@pytest.mark.skipif(not hasattr(jax_compiler, "backend_compile_and_load"),
                    reason="this JAX names its compile step differently")
@pytest.mark.parametrize("command", ["forward", "generate"])
def test_ctrl_c_during_compile(model, tmp_path, command):
  """A real SIGINT while XLA compiles: one line, 130, no traceback, no crash, no --out."""
  marker, out = tmp_path / "compiling", tmp_path / "out.npy"
  p = subprocess.Popen(
      [sys.executable, "-c", COMPILING, str(marker), command, "--model-dir", str(model / "hf"),
       "--input-ids", str(model / "ids.npy"), "--out", str(out)],
      env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)
  while not marker.exists() and p.poll() is None:
    time.sleep(0.005)
  p.send_signal(signal.SIGINT)
  _, err = p.communicate(timeout=300)
  assert p.returncode == 130, err[-3000:]
  assert err.strip() == f"jaxpart {command}: error: interrupted (Ctrl-C)", err[-3000:]
  assert not out.exists() and [f.name for f in tmp_path.iterdir()] == ["compiling"]


@pytest.mark.parametrize("command, name", [("forward", "logits.bin"), ("generate", "tok"),
                                           ("forward", "logits.NPY")])
def test_out_suffix_refused(capsys, model, tmp_path, command, name):
  """np.save would write NAME.npy instead of the name given: refused, before any work."""
  one_error(capsys, [command, "--model-dir", str(model / "hf"), "--input-ids",
                      str(model / "ids.npy"), "--out", str(tmp_path / name)],
             f"--out = {str(tmp_path / name)!r}: must end in .npy")
  assert list(tmp_path.iterdir()) == []


def test_atomic_file_keeps_the_old_file_on_a_write_fault(tmp_path):
  dst = tmp_path / "logits.npy"
  old = np.random.default_rng(2).standard_normal((3, 4))
  np.save(dst, old)
  before = snapshot(tmp_path)
  with pytest.raises(paths.PathError, match=r"--out = .*logits.npy': writing failed: No space "
                     r"left on device \(ENOSPC\): .*; it is as it was"):
    with paths.atomic_file("--out", str(dst)) as tmp:
      Path(tmp).write_bytes(b"half")
      raise OSError(errno.ENOSPC, "No space left on device")
  assert snapshot(tmp_path) == before
  with paths.atomic_file("--out", str(dst)) as tmp:
    np.save(tmp, old + 1)
  np.testing.assert_array_equal(np.load(dst), old + 1)
  assert [f.name for f in tmp_path.iterdir()] == ["logits.npy"]


@full_disk
def test_forward_out_on_a_full_disk_keeps_the_old_logits(model, tmp_path):
  """Logits of 2 x 8 x 256 float32 take 5 pages; the old file 5 more of a 9-page disk."""
  old = tmp_path / "old.npy"
  np.save(old, np.random.default_rng(3).standard_normal((2, 8, V)).astype(np.float32))
  argv = ["forward", "--model-dir", str(model / "hf"), "--input-ids", str(model / "ids.npy"),
          "--out", "/mnt/logits.npy"]
  codes, err, listings = _on_full_disk("36k", [argv], prepare=f"cp {old} /mnt/logits.npy")
  assert codes == [2], err
  lines = [line for line in err.splitlines() if line.strip()]
  assert "Traceback" not in err and len(lines) == 1, err[-3000:]
  assert lines[0].startswith("jaxpart forward: error: --out = '/mnt/logits.npy': writing "
                             "failed: No space left on device (ENOSPC)")
  assert lines[0].endswith("it is as it was")
  assert listings[0] == listings[-1] and "/mnt/logits.npy" in listings[0]


@pytest.mark.parametrize("argv, needle", [
    (["--set", "model.layers=2"], "--set model.layers=2: does not apply to a Hugging Face source"),
    (["--preset", "tiny"], "--preset tiny: does not apply to a Hugging Face source"),
])
def test_convert_hf_refuses_model_flags(capsys, model, tmp_path, argv, needle):
  line = one_error(capsys, ["convert", str(model / "hf"), str(tmp_path / "ck"),
                             "--to-strategy", "unsharded", *argv], needle)
  assert f"{model / 'hf'}/config.json decides the model" in line
  assert list(tmp_path.iterdir()) == []


def _gen(model, name, *flags):
  return ["generate", "--model-dir", str(model / name), "--input-ids", str(model / "ids.npy"),
          *flags]


GB64 = "68.7 GB; "     # the host memory the test pretends to have


@pytest.mark.parametrize("argv, needle, tail", [
    (lambda m: _gen(m, "unlimited", "--new-tokens", "1000000000"),
     "--new-tokens = 1,000,000,000: the KV cache of 2 row(s) x 1,000,000,008 positions needs at "
     "least 512.0 GB and the host has", GB64 + "generate fewer tokens or give fewer prompts"),
    (lambda m: ["generate", "--preset", "tiny", "--new-tokens", "1000000000"],
     "--new-tokens = 1,000,000,000: the KV cache of", GB64 + "generate fewer tokens or give "
     "fewer prompts"),
    (lambda m: _gen(m, "unlimited", "--new-tokens", "3000000000"),
     "--new-tokens = 3,000,000,000: prompt (8) + new tokens must be at most 2,147,483,647", ""),
    (lambda m: _gen(m, "hf", "--top-k", "1000000", "--temperature", "1"),
     f"--top-k = 1,000,000: must be in 0 .. {V}, the vocabulary (0: all of it)", ""),
    (lambda m: _gen(m, "hf", "--top-k", "-1", "--temperature", "1"), "--top-k = -1: must be in",
     ""),
    (lambda m: ["calibrate", "--out", "/tmp/never.toml", "--sizes", "64,1000000000"],
     "--sizes = 64,1000000000: the 1,000,000,000 x 512 @ 512 x 512 bfloat16 GEMM needs at least "
     "2.0 TB and the host has", GB64 + "give smaller sizes, for example 64,256,1024,4096"),
], ids=["new-tokens-memory", "new-tokens-dense", "new-tokens-index", "top-k", "top-k-negative",
        "calibrate-sizes"])
def test_extreme_values_refused_before_any_work(capsys, model, monkeypatch, argv, needle, tail):
  monkeypatch.setattr(generate, "generate", _raise_interrupt)    # any work would show as 130
  monkeypatch.setattr(calibrate, "calibrate", _raise_interrupt)
  monkeypatch.setattr("jaxpart.runtime.sizeguard.host_memory_bytes", lambda: 64 * 2**30)
  assert one_error(capsys, argv(model), needle).endswith(tail)
  assert not os.path.exists("/tmp/never.toml")
