"""Hostile inputs for the Hugging Face side and for full disks: damaged config.json, safetensors
and shard indexes, paths that leave the model directory, and writes that run out of room. Each
ends in one `error:` line naming the file or field (exit 2), no traceback, nothing written."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import one_error, snapshot
from jaxpart import checkpoint as ck
from jaxpart import config
from jaxpart.checkpoint import hf
from jaxpart.models import llama

ROOT = Path(__file__).resolve().parents[1]
CFG = dataclasses.replace(config.MODEL_PRESETS["llama-tiny"], layers=2, dtype="float32")




def _random_tree(cfg) -> dict:
  """Random weights, norm scales included (no compile: host numpy)."""
  rng = np.random.default_rng(7)
  flat = {p: rng.standard_normal(s.shape).astype(np.float32)
          for p, s in ck.flatten(llama.param_shapes(cfg)).items()}
  return ck.unflatten(llama.param_shapes(cfg), flat)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """A one-file and a sharded Hugging Face directory and a jaxpart checkpoint of one tiny model;
  shared read-only (each test copies what it damages)."""
  root = tmp_path_factory.mktemp("hostile_hf")
  tree = _random_tree(CFG)
  hf.write_hf(tree, CFG, str(root / "hf"))
  hf.write_hf(tree, CFG, str(root / "sharded"), max_shard_bytes=200_000)
  ck.save(root / "ck", tree, CFG, run={"batch": 2, "seq": 8}, hardware="h100")
  return root


def _copy(models, tmp_path, name) -> Path:
  return Path(shutil.copytree(models / name, tmp_path / "model" / name))


def _convert(src: Path, tmp_path) -> list[str]:
  return ["convert", str(src), str(tmp_path / "out"), "--to-strategy", "unsharded"]


# (what is written to config.json, or a change to its dict; the needle of the error line)
CONFIGS = [
    (b"{not json", "config.json: not valid JSON (Expecting property name"),
    (b"", "config.json: not valid JSON (Expecting value at line 1 column 1)"),
    (b"[1, 2]", "config.json: a JSON list; config.json must be a JSON object"),
    (b"\xff\xfe{}", "config.json: not UTF-8 text (invalid start byte at byte 0)"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     "config.json rope_scaling: low_freq_factor, high_freq_factor, "
     "original_max_position_embeddings missing; the llama3 rope type needs factor"),
    ({"rope_scaling": "llama3"}, "config.json rope_scaling = 'llama3': expected an object"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": "8", "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
     "config.json rope_scaling.factor = '8': expected a finite number"),
    ({"rms_norm_eps": "abc"}, "config.json rms_norm_eps = 'abc': expected a finite number"),
    ({"rope_theta": None, "rope_parameters": {"rope_theta": [1]}},
     "config.json rope_parameters.rope_theta = [1]: expected a finite number"),
    ({"model_type": ["llama"]}, "config.json model_type = ['llama']: not supported; valid: llama"),
    ({"num_key_value_heads": 2.5}, "config.json num_key_value_heads = 2.5: expected an integer"),
    ({"vocab_size": True}, "config.json: vocab_size missing or not an integer"),
]


@pytest.mark.parametrize("content, needle", CONFIGS, ids=[str(c)[:40] for c, _ in CONFIGS])
@pytest.mark.parametrize("command", ["convert", "forward"])
def test_damaged_config(capsys, models, tmp_path, content, needle, command):
  src = _copy(models, tmp_path, "hf")
  if isinstance(content, dict):
    content = json.dumps(json.loads((src / "config.json").read_text()) | content).encode()
  (src / "config.json").write_bytes(content)
  argv = _convert(src, tmp_path) if command == "convert" else [
      "forward", "--model-dir", str(src), "--input-ids", str(tmp_path / "none.npy")]
  before = snapshot(tmp_path)
  line = one_error(capsys, argv, needle)
  assert str(src) in line
  assert snapshot(tmp_path) == before


def _truncate(p: Path):
  p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _empty(p: Path):
  p.write_bytes(b"")


def _corrupt_header(p: Path):
  data = bytearray(p.read_bytes())
  data[8:24] = b"\x00garbage\x01\x02{[}]"
  p.write_bytes(bytes(data))


def _huge_header(p: Path):
  data = bytearray(p.read_bytes())
  data[0:8] = (2**40).to_bytes(8, "little")
  p.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _empty, _corrupt_header, _huge_header],
                         ids=lambda f: f.__name__[1:])
@pytest.mark.parametrize("name", ["hf", "sharded"])
def test_damaged_safetensors(capsys, models, tmp_path, damage, name):
  src = _copy(models, tmp_path, name)
  victim = sorted(src.glob("*.safetensors"))[-1]
  damage(victim)
  before = snapshot(tmp_path)
  one_error(capsys, _convert(src, tmp_path),
             f"{victim}: not a readable safetensors file (SafetensorError: ")
  assert snapshot(tmp_path) == before


def _index(src: Path) -> dict:
  return json.loads((src / hf.INDEX).read_text())


INDEXES = [
    ("missing shard", lambda d, x: {"weight_map": {k: "model-9.safetensors" for k in
                                                   _index(d)["weight_map"]}},
     "names shard 'model-9.safetensors', which is not in"),
    ("not JSON", None, "model.safetensors.index.json: not valid JSON"),
    ("no weight_map", lambda d, x: {"metadata": {}}, "no weight_map (an object of tensor name"),
    ("weight_map a list", lambda d, x: {"weight_map": ["a"]}, "no weight_map"),
    ("leaves the directory", lambda d, x: {"weight_map": {k: "../../../x.safetensors" for k in
                                                          _index(d)["weight_map"]}},
     "shard '../../../x.safetensors' is outside the model directory; valid: a file name inside"),
    ("absolute", lambda d, x: {"weight_map": {k: str(x) for k in _index(d)["weight_map"]}},
     "is outside the model directory"),
]


@pytest.mark.parametrize("what, change, needle", INDEXES, ids=[w for w, _, _ in INDEXES])
def test_damaged_shard_index(capsys, models, tmp_path, what, change, needle):
  """A shard outside the directory is refused even when a valid file lies there."""
  src = tmp_path / "a" / "b" / "c"
  shutil.copytree(models / "sharded", src)
  outside = tmp_path / "x.safetensors"
  hf.write_hf(_random_tree(CFG), CFG, str(tmp_path / "whole"))
  shutil.move(tmp_path / "whole" / "model.safetensors", outside)
  shutil.rmtree(tmp_path / "whole")
  (src / hf.INDEX).write_text("{weight" if change is None else json.dumps(change(src, outside)))
  before = snapshot(tmp_path)
  one_error(capsys, ["convert", str(src), str(tmp_path / "out"), "--to-strategy", "unsharded"],
             needle)
  assert snapshot(tmp_path) == before


# --- a real full disk: a small tmpfs in a private mount namespace (where the kernel allows it)

def _can_mount_tmpfs() -> bool:
  if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
    return False
  probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                         capture_output=True)
  return probe.returncode == 0


full_disk = pytest.mark.skipif(not _can_mount_tmpfs(),
                               reason="needs unshare -rm and tmpfs (a Linux user namespace)")


def _on_full_disk(size: str, commands: list[list[str]], prepare: str = "true"
                  ) -> tuple[list[int], str, list[str]]:
  """Run jaxpart commands one after another on a fresh tmpfs of `size` mounted at /mnt (a private
  mount) after the shell command `prepare`; returns their exit codes, the last one's stderr,
  and a listing of /mnt with file hashes before the first and after each."""
  err = f"/tmp/jaxpart_full_disk_{os.getpid()}"
  listing = ("find /mnt -mindepth 1 | sort | while read f; do echo \"$f\"; "
             "test -f \"$f\" && md5sum < \"$f\"; done; echo ===")
  script = ["mount -t tmpfs -o size=$0 tmpfs /mnt", prepare, "echo rc=0", listing]
  for c in commands:
    script += [" ".join(map(repr, [sys.executable, "-m", "jaxpart", *c])) + f" >/dev/null 2>{err}",
               "echo rc=$?", listing]
  script.append(f"cat {err} >&2; rm -f {err}")
  r = subprocess.run(["unshare", "-rm", "sh", "-c", "\n".join(script), size],
                     env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                     timeout=600)
  blocks = r.stdout.split("===\n")[:-1]
  codes = [int(b.split("\n", 1)[0][3:]) for b in blocks[1:]]
  return codes, r.stderr, [b.split("\n", 1)[1] for b in blocks]


def _one_line(err: str, needle: str) -> str:
  lines = [line for line in err.splitlines() if line.strip()]
  assert "Traceback" not in err and "Event loop is closed" not in err, err[-3000:]
  assert len(lines) == 1 and "error:" in lines[0], err[-3000:]
  assert needle in lines[0], lines[0]
  return lines[0]


FULL = "writing failed: No space left on device (ENOSPC): expected a writable destination"


@full_disk
@pytest.mark.parametrize("src, dst, extra", [
    ("ck", "out", ["--to-strategy", "unsharded"]),
    ("hf", "out", ["--to-strategy", "unsharded"]),
    ("ck", "hfout", ["--to-format", "hf"])], ids=["checkpoint", "hf-import", "hf-export"])
def test_full_disk(models, src, dst, extra):
  """The tiny model is ~400 KB; a 200 KB disk fills part way through the write."""
  codes, err, listings = _on_full_disk("200k", [["convert", str(models / src), f"/mnt/{dst}",
                                                 *extra]])
  assert codes == [2], err
  line = _one_line(err, FULL)
  assert f"/mnt/{dst}: " in line and line.endswith("nothing was written there")
  assert listings == ["", ""]


@full_disk
def test_full_disk_overwrite_keeps_the_checkpoint(models):
  argv = ["convert", str(models / "ck"), "/mnt/out", "--to-strategy", "unsharded"]
  codes, err, listings = _on_full_disk("700k", [argv, argv + ["--overwrite"]])
  assert codes == [0, 2], err
  assert _one_line(err, FULL).endswith("it is as it was")
  assert listings[2] == listings[1] and "/mnt/out/manifest.json" in listings[1]
