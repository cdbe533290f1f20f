"""Multi-host on jax.distributed, with real local processes: 2 processes x 8 simulated CPU
devices on 127.0.0.1 (gloo collectives, a free port, bounded timeouts) against one process of 16.

Bit for bit: with jax.distributed started, XLA's CPU client runs every collective through gloo,
in-process ones included, and gloo's ring all-reduce adds the tensor-parallel partial sums in
another order than XLA's in-process all-reduce. So the 2-process result is compared bit for bit
with a 1-process 16-device run on the same collectives (jax.distributed with one process), and
within float32 tolerance with the plain in-process run.
"""

import argparse
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import require_devices
from jaxpart import checkpoint, cli, config
from jaxpart.runtime import distributed
from jaxpart.placement import planner
from jaxpart.runtime import runs
from jaxpart.runtime import supervise
from jaxpart.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import launch_local  # noqa: E402

WORKER = [sys.executable, str(ROOT / "tests" / "dist_worker.py")]
LAUNCH_TIMEOUT = 420       # a whole multi-process run, compiles included, on 2 busy cores
HEARTBEAT_S = 5


def _args(**kw):
  return distributed.LaunchFlags(**kw)


def test_launch_flags_match_the_parsers_names_and_defaults():
  p = argparse.ArgumentParser()
  distributed.add_arguments(p)
  assert distributed.LaunchFlags.from_flags(vars(p.parse_args([]))) == distributed.LaunchFlags()
  given = p.parse_args(["--coordinator", "10.0.0.1:1234", "--num-processes", "2",
                        "--process-id", "1", "--local-device-ids", "0,1", "--init-timeout", "7"])
  flags = distributed.LaunchFlags.from_flags(vars(given))
  assert (flags.coordinator, flags.num_processes, flags.process_id, flags.local_device_ids,
          flags.init_timeout) == ("10.0.0.1:1234", 2, 1, "0,1", 7)


# --- start-up settings (no processes) ------------------------------------------------------

def test_single_process_when_nothing_says_otherwise():
  assert distributed.resolve(_args(), environ={}) is None


def test_flags_win_over_environment():
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.9:99", "JAX_NUM_PROCESSES": "4",
         "JAX_PROCESS_ID": "3"}
  launch = distributed.resolve(_args(coordinator="127.0.0.1:1234", process_id=1,
                                     heartbeat_timeout=7), environ=env)
  assert (launch.coordinator, launch.num_processes, launch.process_id) == ("127.0.0.1:1234", 4, 1)
  assert launch.explicit and launch.heartbeat_timeout == 7
  launch = distributed.resolve(_args(), environ=env)
  assert (launch.coordinator, launch.num_processes, launch.process_id) == ("10.0.0.9:99", 4, 3)


@pytest.mark.parametrize("kw, env, needle", [
    (dict(coordinator="h:1", num_processes=2), {}, "--process-id (or JAX_PROCESS_ID)"),
    (dict(num_processes=2, process_id=2, coordinator="h:1"), {}, "must be in 0 .. 1"),
    (dict(num_processes=0, process_id=0, coordinator="h:1"), {}, "--num-processes = 0"),
    (dict(num_processes=2, process_id=0, coordinator="nohost"), {}, "must be HOST:PORT"),
    (dict(num_processes=2, process_id=0, coordinator="h:70000"), {}, "port in 1..65535"),
    (dict(), {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two",
              "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES = 'two'"),
    (dict(init_timeout=0), {}, "--init-timeout = 0"),
    (dict(local_device_ids="0,x"), {}, "--local-device-ids = '0,x'"),
    (dict(local_devices=0), {}, "--local-devices = 0"),
])
def test_bad_settings_name_the_field(kw, env, needle):
  with pytest.raises(ConfigError) as e:
    distributed.resolve(_args(**kw), environ=env)
  assert needle in str(e.value)


SLURM = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[01-02]", "SLURM_PROCID": "1",
         "SLURM_LOCALID": "0"}


def test_slurm_is_left_to_jax_detection():
  launch = distributed.resolve(_args(), environ={**SLURM, "SLURM_NTASKS": "2"})
  assert launch is not None and not launch.explicit and launch.coordinator is None
  assert distributed.process_count_hint([], {**SLURM, "SLURM_NTASKS": "2"}) == 2
  # one task (an interactive allocation) is a single process: no coordinator to wait for
  assert distributed.resolve(_args(), environ={**SLURM, "SLURM_NTASKS": "1"}) is None


@pytest.mark.parametrize("argv, env, want", [
    (["run", "--devices", "16", "--num-processes", "2"], {}, 8),
    (["run", "--num-processes=4"], {}, 4),                 # default 16 devices, shared
    (["run", "--devices", "16"], {"JAX_NUM_PROCESSES": "2"}, 8),
    (["run", "--num-processes", "2", "--local-devices", "3"], {}, 3),
    (["run", "--devices", "32"], {}, 32),                  # one process: as before
    (["run", "--devices", "4"], {}, 16),
])
def test_simulated_devices_per_process(monkeypatch, argv, env, want):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  cli._ensure_cpu_devices(argv)
  assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count={want}"


def test_launcher_gives_each_process_its_own_setup():
  env = launch_local.child_env({"XLA_FLAGS": "--xla_dump_to=/x "
                                "--xla_force_host_platform_device_count=16",
                                "JAX_PROCESS_ID": "5", "SLURM_PROCID": "3", "HOME": "/h"}, "cpu")
  assert env == {"XLA_FLAGS": "--xla_dump_to=/x", "JAX_PLATFORMS": "cpu", "HOME": "/h",
                 "PYTHONUNBUFFERED": "1"}
  cmds = launch_local.commands(["run", "--f32"], 2, 4321, None)
  assert [c[c.index("--process-id") + 1] for c in cmds] == ["0", "1"]
  assert all(c[c.index("--coordinator") + 1] == "127.0.0.1:4321" for c in cmds)


def test_launcher_stops_the_others_when_one_fails():
  code = ("import sys, time\n"
          "i = int(sys.argv[sys.argv.index('--process-id') + 1])\n"
          "sys.exit(3) if i == 1 else time.sleep(60)\n")
  err = io.StringIO()
  t0 = time.monotonic()
  rc, reports = launch_local.launch([], 2, grace=1, timeout=30, out=io.StringIO(), err=err,
                                    program=[sys.executable, "-c", code])
  assert time.monotonic() - t0 < 20, err.getvalue()
  assert rc == 3
  assert reports[1] == {"process": 1, "returncode": 3, "killed_by_launcher": False}
  assert reports[0]["killed_by_launcher"] and reports[0]["returncode"] != 0
  assert "process 1 exited with status 3" in err.getvalue()


# --- real processes ------------------------------------------------------------------------

def _launch(args, n, program=None):
  out, err = io.StringIO(), io.StringIO()
  rc, reports = launch_local.launch(args, n, local_devices=16 // n, timeout=LAUNCH_TIMEOUT,
                                    grace=30, out=out, err=err, program=program)
  assert rc == 0, f"{reports}\n{err.getvalue()[-4000:]}"
  return out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def worker_runs(tmp_path_factory):
  """2 processes x 8 devices: layer-wise (4 x 4) and baseline (2 x 8) forwards, the layer-wise
  parameters saved as a checkpoint; then 1 process x 16 devices: the same forwards, and the
  checkpoint restored into the baseline placement."""
  tmp = tmp_path_factory.mktemp("dist")
  ckpt = tmp / "ckpt"
  _launch(["--out", str(tmp / "two.npz"), "--save", str(ckpt)], 2, WORKER)
  _launch(["--out", str(tmp / "one.npz"), "--restore", str(ckpt)], 1, WORKER)
  return np.load(tmp / "two.npz"), np.load(tmp / "one.npz"), ckpt


@pytest.mark.slow
def test_two_processes_match_one_process_and_checkpoint_crosses(worker_runs):
  require_devices(16)
  two, one, ckpt = worker_runs
  assert (int(two["processes"]), int(two["local_devices"]), int(two["devices"])) == (2, 8, 16)
  assert (int(one["processes"]), int(one["local_devices"]), int(one["devices"])) == (1, 16, 16)

  setup = config.load_setup("tiny")
  params_h, x_h = runs.host_params(setup, 0), runs.host_input(setup, 0)
  ref = runs.reference(setup, params_h, x_h, jnp.float32)
  # every process built the same input and parameters: the single-device reference agrees
  np.testing.assert_array_equal(two["reference"], ref)
  for name in ("layerwise", "baseline"):
    np.testing.assert_array_equal(two[name], one[name], err_msg=f"{name}: 2 vs 1 process")
    err = runs.errors(two[name], ref)
    assert err["finite"] and err["max_rel_err"] < 1e-5, (name, err)
  # the checkpoint saved as layer-wise by 2 processes, restored as baseline by 1, gives the
  # same forward as the parameters it was saved from
  np.testing.assert_array_equal(one["restored_baseline"], one["baseline"])

  # ...and restores in this plain 16-device process too, leaf for leaf
  plan = planner.make_plan(setup, 16, "layerwise", chunk_tokens=32)
  restored = checkpoint.flatten(checkpoint.restore(ckpt, setup.model, plan).params)
  for path, leaf in checkpoint.flatten(params_h).items():
    assert restored[path].sharding.mesh.devices.size == 16, path
    np.testing.assert_array_equal(np.asarray(restored[path]), leaf, err_msg=path)


@pytest.mark.slow
def test_two_process_cli_run_prints_once(tmp_path, worker_runs):
  """`jaxpart run` through the launcher: one JSON document on stdout (process 0's), the check
  passes, and the dump is the 2-process layer-wise forward above, bit for bit."""
  require_devices(16)
  dump = tmp_path / "run.npz"
  out, err = _launch(["run", "--preset", "tiny", "--f32", "--devices", "16", "--strategy",
                      "layerwise", "--chunk-tokens", "32", "--repeats", "1", "--check", "--json",
                      "--dump", str(dump)], 2)
  res = json.loads(out)                 # fails if process 1 or gloo wrote to stdout
  assert res["processes"] == 2 and res["devices_present"] == 16
  assert res["check"]["ok"] and res["check"]["max_rel_err"] < 1e-5
  assert "[p1] {" not in err
  np.testing.assert_array_equal(np.load(dump)["output"], worker_runs[0]["layerwise"])


def _spawn(args, n, port, only=None, program=None):
  """Processes `only` (default: all) of an n-process run, stderr piped."""
  env = launch_local.child_env(dict(os.environ), "cpu")
  cmds = launch_local.commands(args, n, port, 16 // n, program)
  return [subprocess.Popen(cmds[i], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
          for i in (range(n) if only is None else [only])]


def _finish(proc, timeout):
  """(returncode, stderr, seconds) of a process we started; killed (and the test failed) if it
  outlives `timeout`."""
  t0 = time.monotonic()
  try:
    _, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    pytest.fail(f"process {proc.pid} still running after {timeout} s:\n{err[-3000:]}")
  return proc.returncode, err, time.monotonic() - t0


@contextlib.contextmanager
def _reaped(procs):
  """Whatever the test does, no process it started outlives it."""
  try:
    yield
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
      p.wait()


def _read_until(proc, needle, timeout):
  """Lines of proc's stderr until one contains `needle`."""
  seen, t0 = [], time.monotonic()
  for line in iter(proc.stderr.readline, ""):
    seen.append(line)
    if needle in line or time.monotonic() - t0 > timeout:
      break
  assert any(needle in line for line in seen), "".join(seen)[-3000:]


@pytest.mark.slow
def test_a_dead_process_ends_the_other():
  """Process 1 is killed (its supervisor, by SIGKILL: the child dies with it) while both run
  the pipeline; process 0, blocked on its peer, ends within the heartbeat timeout, not a hang,
  either as JAX's heartbeat notices or as a collective on the dead peer's socket fails (gloo:
  connection reset). Its supervisor holds back the C++ stack and says why in one last line."""
  port = launch_local.free_port()
  procs = _spawn(["run", "--preset", "tiny", "--f32", "--devices", "16", "--chunk-tokens",
                  "32", "--repeats", "100000", "--heartbeat-timeout", str(HEARTBEAT_S),
                  "--shutdown-timeout", str(HEARTBEAT_S), "--init-timeout", "120"], 2, port)
  with _reaped(procs):
    _read_until(procs[0], "[Gloo]", LAUNCH_TIMEOUT)   # collectives are running
    procs[1].kill()
    rc, err, elapsed = _finish(procs[0], HEARTBEAT_S + 60)
  lines = err.splitlines()
  assert rc != 0, err[-3000:]
  assert lines[-1].startswith("jaxpart run: error: process 0: "), err[-3000:]
  assert any(cause in lines[-1] for cause in (
      "process 1 stopped sending heartbeats", "another process died", "lost the coordinator",
      "lost its connection to another process")), lines[-1]
  assert [line for line in lines if line.startswith("jaxpart run: error:")] == lines[-1:], err
  assert not [line for line in lines if supervise._DUMP.match(line.encode())], err[-3000:]
  assert elapsed < HEARTBEAT_S + 45, elapsed


@pytest.mark.slow
def test_a_failing_process_leaves_at_once_and_ends_the_other():
  """Process 1 raises right after start-up: it leaves with status 1 and its traceback (no wait
  at the exit barrier); process 0, which goes on to run the pipeline, ends within the
  heartbeat timeout."""
  port = launch_local.free_port()
  procs = _spawn(["--out", os.devnull, "--fail-process", "1", "--heartbeat-timeout",
                  str(HEARTBEAT_S), "--shutdown-timeout", str(HEARTBEAT_S)], 2, port,
                 program=WORKER)
  with _reaped(procs):
    rc1, err1, _ = _finish(procs[1], 120)
    rc0, err0, elapsed = _finish(procs[0], HEARTBEAT_S + 60)
  assert rc1 == 1, err1[-3000:]
  assert "RuntimeError: injected failure in process 1" in err1
  assert "leaving without the exit barrier" in err1
  assert rc0 != 0
  assert "another task died" in err0 or "unhealthy" in err0, err0[-3000:]
  assert elapsed < HEARTBEAT_S + 45, elapsed


def test_unreachable_coordinator_is_a_clear_error():
  port = launch_local.free_port()
  (proc,) = _spawn(["run", "--preset", "tiny", "--init-timeout", "3"], 2, port, only=1)
  rc, err, seconds = _finish(proc, 90)
  assert rc == 2, err
  assert f"--coordinator 127.0.0.1:{port}: nothing accepted a connection within " \
         f"--init-timeout 3 s" in err
  assert seconds < 60


def test_missing_peer_ends_process_0():
  port = launch_local.free_port()
  (proc,) = _spawn(["run", "--preset", "tiny", "--init-timeout", "3"], 2, port, only=0)
  rc, err, seconds = _finish(proc, 90)
  assert rc != 0
  assert f"joining coordinator 127.0.0.1:{port} as process 0 of 2 (waiting up to 3 s" in err
  # JAX aborts with a C++ stack; the supervisor holds it back and says why in one last line
  assert err.splitlines()[-1].startswith(
      "jaxpart run: error: process 0: killed by SIGABRT: not every process joined within "
      "--init-timeout"), err[-3000:]
  assert "Check failure stack trace" not in err
  assert seconds < 60


# --- the supervisor's filter and its one line (canned lines, no processes) ----------------

ABORT = [b"jaxpart: joining coordinator 127.0.0.1:1234 as process 0 of 2\n",
         b"E1201 coordination_service.cc:1549] Use error polling to propagate the following error"
         b" to all tasks: UNAVAILABLE: The following tasks are unhealthy (stopped sending "
         b"heartbeats):\n", b"/job:jax_worker/replica:0/task:1\n",
         b"F1201 16:57:55.936360    1581 client.h:80] Terminating process because the JAX "
         b"distributed service detected fatal errors. This most likely indicates that another "
         b"task died\n", b"\n", b"*** Check failure stack trace: ***\n",
         b"    @     0x7fd493840634  absl::log_internal::LogMessage::SendToLog()\n",
         b"terminate called after throwing an instance of 'std::bad_cast'\n",
         b"Fatal Python error: Aborted\n", b"Thread 0x00007f (most recent call first):\n"]
GLOO = [b"Traceback (most recent call last):\n", b"  File \"x.py\", line 1, in <module>\n",
        b"jax.errors.JaxRuntimeError: INTERNAL: Error dispatching computation: Gloo collective "
        b"permute failed: [external/gloo/gloo/transport/tcp/pair.cc:538] Read error "
        b"[127.0.0.1]:51374: Connection reset by peer\n",
        b"jaxpart: this process failed; leaving without the exit barrier\n"]


@pytest.mark.parametrize("lines, forwarded", [(ABORT, 3), (GLOO, 4)])
def test_supervisor_holds_back_the_fatal_dump(lines, forwarded):
  filt = supervise.StderrFilter(keep=5)
  shown = [line for line in lines if filt.feed(line)]
  assert shown == lines[:forwarded]
  assert shown + filt.held == lines
  assert len(filt.tail) == min(5, len(lines))


@pytest.mark.parametrize("rc, lines, want", [
    (-signal.SIGABRT, ABORT, "jaxpart run: error: process 1: killed by SIGABRT: JAX reports "
                             "process 1 stopped sending heartbeats (it died or hung)"),
    (1, GLOO, "jaxpart run: error: process 1: exited with status 1: a collective lost its "
              "connection to another process at 127.0.0.1:51374 (gloo: Connection reset by "
              "peer): that process died or cannot be reached"),
    (1, [GLOO[0], b"jax.errors.JaxRuntimeError: INTERNAL: Gloo collective permute failed: "
                  b"[external/gloo/gloo/transport/tcp/pair.cc:547] Connection closed by peer "
                  b"[127.0.0.1]:11405\n"],
     "jaxpart run: error: process 1: exited with status 1: a collective lost its connection to "
     "another process at 127.0.0.1:11405 (gloo: Connection closed by peer): that process died "
     "or cannot be reached"),
    # seen in a CI run: the dead peer's socket refused a collective's new connection
    (1, [GLOO[0], b"jax.errors.JaxRuntimeError: INTERNAL: Error dispatching computation: Gloo "
                  b"context initialization failed: [external/gloo/gloo/transport/tcp/pair.cc:152]"
                  b" timed out connecting: SO_ERROR: Connection refused, remote=[127.0.0.1]:39329"
                  b"$32\n", GLOO[3]],
     "jaxpart run: error: process 1: exited with status 1: a collective lost its connection to "
     "another process at 127.0.0.1:39329 (gloo: Connection refused): that process died or "
     "cannot be reached"),
    (-signal.SIGKILL, [], "jaxpart run: error: process 1: killed by SIGKILL"),
    (7, [], "jaxpart run: error: process 1: exited with status 7"),
    (-signal.SIGINT, GLOO[:1], "jaxpart run: error: process 1: interrupted (SIGINT, Ctrl-C)"),
    (1, GLOO[:2], None), (2, GLOO, None), (0, ABORT, None),   # normal ends: nothing added
])
def test_supervisor_one_line(rc, lines, want):
  filt = supervise.StderrFilter()
  for line in lines:
    filt.feed(line)
  assert supervise.summary("run", "1", rc, filt.tail) == want


def test_supervisor_exits_as_a_shell_would():
  assert [supervise.exit_status(rc) for rc in (0, 1, 2, 7, -signal.SIGABRT, -signal.SIGKILL)] \
      == [0, 1, 2, 7, 134, 137]


def test_supervisor_only_for_several_unsupervised_processes(monkeypatch):
  tied = []
  monkeypatch.setattr(supervise, "_die_with_supervisor", tied.append)   # not this test process
  assert supervise.needed(["run", "--num-processes", "2"], {})
  assert supervise.needed(["run"], {"JAX_NUM_PROCESSES": "4"})
  assert not supervise.needed(["run", "--num-processes", "1"], {})
  assert not supervise.needed(["run"], {})
  assert not supervise.needed(["run", "--num-processes", "2"], {supervise.ENV: "99"})
  assert tied == ["99"]
  assert distributed.process_id_hint(["--process-id", "3"], {"JAX_PROCESS_ID": "1"}) == "3"
  assert distributed.process_id_hint([], {"JAX_PROCESS_ID": "1"}) == "1"
  assert distributed.process_id_hint([], {**SLURM, "SLURM_NTASKS": "2"}) == "1"
  assert distributed.process_id_hint([], {}) == "?"
