"""Load-aware timing (a figure timed under load says so) and `--trace` profiler traces."""

import json
import os
from pathlib import Path


from conftest import require_devices
from jaxpart import cli
from jaxpart.measure import load

SCOPES = ("stage_step", "attention", "mlp", "tensor_allreduce", "pipeline_send")


def _loadavg(monkeypatch, one, cores=2):
  monkeypatch.setattr(os, "getloadavg", lambda: (one, one / 2, one / 4))
  monkeypatch.setattr(os, "cpu_count", lambda: cores)


def test_load_over_cores_warns_and_marks_the_record(monkeypatch, capsys):
  _loadavg(monkeypatch, 11.5, cores=2)
  before = load.start("bench baseline:")
  assert "warning: bench baseline: taken under load (load 11.5 on 2 cores): not a result" \
      in capsys.readouterr().err
  rec = load.finish(before)
  assert rec["under_load"] and rec["note"] == "taken under load (load 11.5 on 2 cores): not a result"
  assert rec["before"] == {"load_1m": 11.5, "load_5m": 5.75, "load_15m": 2.875, "cores": 2}
  assert set(rec["after"]) == {"load_1m", "load_5m", "load_15m", "cores"}


def test_idle_machine_is_quiet(monkeypatch, capsys):
  _loadavg(monkeypatch, 1.7, cores=2)
  rec = load.finish(load.start("bench"))
  assert capsys.readouterr().err == ""
  assert rec["under_load"] is False and rec["note"] is None


def test_bench_json_records_load_before_and_after(monkeypatch, tmp_path, capsys):
  require_devices(4)
  _loadavg(monkeypatch, 9.0, cores=2)
  out = tmp_path / "bench.json"
  rc = cli.main(["bench", "--preset", "tiny", "--devices", "4", "--strategy", "baseline",
                 "--tp", "2", "--pp", "2", "--repeats", "1", "--warmup", "0", "--no-gspmd",
                 "--json", str(out)])
  assert rc == 0
  rec = json.loads(out.read_text())["load"]
  assert rec["under_load"] and rec["before"]["load_1m"] == 9.0 and rec["after"]["cores"] == 2
  captured = capsys.readouterr()
  assert "taken under load (load 9.0 on 2 cores): not a result" in captured.err
  assert "every time below was taken under load" in captured.out


def test_run_trace_holds_the_engine_scopes(tmp_path, capsys):
  require_devices(16)
  trace = tmp_path / "trace"
  rc = cli.main(["run", "--preset", "tiny", "--devices", "16", "--strategy", "baseline",
                 "--tp", "4", "--repeats", "1", "--trace", str(trace), "--json"])
  assert rc == 0
  out = json.loads(capsys.readouterr().out)
  assert out["trace"] == str(trace) and "under_load" in out["load"]
  # The scopes name the ops (HLO op_name metadata) in the XSpace protobuf XProf reads.
  planes = list(Path(trace).rglob("*.xplane.pb"))
  assert planes, f"no .xplane.pb under {trace}"
  raw = b"".join(p.read_bytes() for p in planes)
  missing = [s for s in SCOPES if s.encode() not in raw]
  assert not missing, f"scopes missing from the trace: {missing}"


def test_trace_path_that_is_a_file_is_refused(tmp_path, capsys):
  f = tmp_path / "file"
  f.write_text("x")
  assert cli.main(["run", "--preset", "tiny", "--devices", "1", "--trace", str(f)]) == 2
  assert "--trace" in capsys.readouterr().err
