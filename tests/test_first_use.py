"""What a new user hits first (issue 23): compile-only memory at paper scale, planning one's own
Hugging Face config, and legal flags that used to crash. Called in-process through cli.main."""

import json
import time

import pytest

from conftest import require_devices
from jaxpart import cli, config


def _json(capsys, argv):
  rc = cli.main(argv)
  cap = capsys.readouterr()
  assert rc == 0, cap.err[-2000:]
  return json.loads(cap.out), cap.err


def _one_error(capsys, argv, needle):
  rc = cli.main(argv)
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if "error:" in line]
  assert rc == 2 and len(lines) == 1, err[-2000:]
  assert needle in lines[0], lines[0]
  assert "Traceback" not in err
  return lines[0]


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
  _one_error(capsys, ["bench", "--preset", "paper", "--devices", "16", "--repeats", "1"],
             "model too large")


@pytest.mark.parametrize("cmd", ["plan", "predict", "memory"])
def test_analytic_commands_not_guarded(capsys, cmd):
  out, _ = _json(capsys, [cmd, "--preset", "paper-30b", "--devices", "16", "--json"])
  assert out["plan"]["devices"] == 16
