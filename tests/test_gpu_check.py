"""scripts/gpu_check.py --tiny runs on CPU as the GPU machine runs it (PYTHONPATH=.), so the
prepared GPU script cannot rot; its figures follow from its own timings."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_tiny(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(OUT=str(tmp_path), PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--tiny"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  assert lines[-1].startswith("wrote ") and lines[-2].startswith("total ")
  assert any(l.startswith("chunk") for l in lines[-20:])   # the tables come last
  rep = json.loads((tmp_path / "gpu_check.json").read_text())
  assert not rep["errors"]
  c = rep["ceilings"]
  assert c["matmul_tflops"] == pytest.approx(2 * 256 ** 3 / c["matmul_s"] / 1e12)
  steps = rep["stage_steps"]
  assert [(s["chunk"], s["kv_block"]) for s in steps] == [(16, 16), (64, 64), (16, 32), (64, 32)]
  heads, e, proj = 2, 4, 49152 // 4     # tiny: 2 of 8 heads x 4, a quarter of the weights
  for s in steps:
    c_, q0 = s["chunk"], s["q_start"]
    want = 2 * c_ * proj + 4 * heads * e * (c_ * q0 + c_ * (c_ + 1) // 2)
    assert s["useful_flops"] == want
    assert s["tflops"] == pytest.approx(want / (s["ms"] / 1e3) / 1e12)
    assert s["hbm_bytes"] > s["weight_bytes"] > 0
  # the engine's blocked attention over the whole sequence equals full causal attention
  for u in rep["unchunked"][:-1]:
    assert u["max_abs_diff_vs_full"] < 0.1
  assert rep["bf16_check"]["ok"] and rep["bf16_check"]["finite"]
