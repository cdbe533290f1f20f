#!/usr/bin/env python3
"""Run one jaxpart command as K processes on this machine, the way a K-host cluster would.

  python scripts/launch_local.py -n 2 -- compare --preset tiny --devices 16

Each process gets --coordinator 127.0.0.1:<free port> --num-processes K --process-id I and its
own simulated CPU devices (--devices / K unless --local-devices says), with gloo collectives
between processes. Process 0's stdout passes through untouched (tables, --json); everything
else is forwarded to stderr prefixed [pI]. When one process fails, the others get --grace
seconds to stop by themselves (a dead peer should end them: that is what is being tested),
then are killed; after --timeout all are killed. Exit status: 0 when all succeed, else the
first failure's status (124 on timeout).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

TIMEOUT_EXIT = 124


def free_port() -> int:
  """A port nobody listens on right now (the coordinator binds it a moment later)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_env(base: dict[str, str], platform: str) -> dict[str, str]:
  """The parent's environment without what would override the per-process set-up: a fixed
  simulated device count in XLA_FLAGS, and another launcher's JAX_* / cluster variables."""
  env = {k: v for k, v in base.items()
         if k not in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
         and not k.startswith(("SLURM_", "OMPI_"))}
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = " ".join(flags.split())
  if not env["XLA_FLAGS"]:
    del env["XLA_FLAGS"]
  env["JAX_PLATFORMS"] = platform
  env.setdefault("PYTHONUNBUFFERED", "1")
  return env


def commands(jaxpart_args: list[str], n: int, port: int, local_devices: int | None,
             program: list[str] | None = None) -> list[list[str]]:
  """One command line per process. `program` replaces `python -m jaxpart` for any script that
  takes the same multi-host flags (jaxpart.runtime.distributed.add_arguments)."""
  program = program or [sys.executable, "-m", "jaxpart"]
  extra = [] if local_devices is None else ["--local-devices", str(local_devices)]
  return [[*program, *jaxpart_args, "--coordinator", f"127.0.0.1:{port}",
           "--num-processes", str(n), "--process-id", str(i), *extra] for i in range(n)]


TAIL_LINES = 200      # of each process's stderr, kept to say how it ended


def _pump(stream, sink, prefix: str, tail: collections.deque | None = None) -> None:
  for line in iter(stream.readline, ""):
    sink.write(prefix + line)
    sink.flush()
    if tail is not None:
      tail.append(line)
  stream.close()


def _stop(proc: subprocess.Popen, sig: int) -> None:
  """Signal the process group this launcher created for `proc` (the process and any helpers
  it spawned), if it is still running."""
  if proc.poll() is None:
    try:
      os.killpg(proc.pid, sig)
    except ProcessLookupError:
      pass


def launch(jaxpart_args: list[str], n: int, *, local_devices: int | None = None,
           timeout: float = 600, grace: float = 30, platform: str = "cpu",
           port: int | None = None, program: list[str] | None = None, out=None,
           err=None) -> tuple[int, list[dict]]:
  """Run the K processes to completion. Returns (exit status, per-process reports)."""
  out, err = out or sys.stdout, err or sys.stderr
  port = port or free_port()
  env = child_env(dict(os.environ), platform)
  procs, pumps = [], []
  tails = [collections.deque(maxlen=TAIL_LINES) for _ in range(n)]
  t0 = time.monotonic()
  for i, cmd in enumerate(commands(jaxpart_args, n, port, local_devices, program)):
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    procs.append(p)
    for stream, sink, prefix in ((p.stdout, out if i == 0 else err, "" if i == 0 else f"[p{i}] "),
                                 (p.stderr, err, f"[p{i}] ")):
      tail = tails[i] if stream is p.stderr else None
      th = threading.Thread(target=_pump, args=(stream, sink, prefix, tail), daemon=True)
      th.start()
      pumps.append(th)
  killed: set[int] = set()
  first_fail: tuple[float, int] | None = None
  status = 0
  try:
    while [p.poll() for p in procs].count(None):     # poll every one: updates returncode
      now = time.monotonic()
      failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode not in (None, 0)]
      if failed and first_fail is None:
        first_fail = (now, failed[0][0])
        status = failed[0][1] if failed[0][1] > 0 else 128 - failed[0][1]
        print(f"launch_local: process {failed[0][0]} exited with status {failed[0][1]}; giving "
              f"the others {grace:g} s to stop", file=err, flush=True)
      late = first_fail is not None and now - first_fail[0] > grace
      if now - t0 > timeout or late:
        if first_fail is None:
          status = TIMEOUT_EXIT
          print(f"launch_local: timeout after {timeout:g} s; killing", file=err, flush=True)
        for i, p in enumerate(procs):
          if p.poll() is None:
            killed.add(i)
            _stop(p, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
          time.sleep(0.1)
        for p in procs:
          _stop(p, signal.SIGKILL)
        for p in procs:
          p.wait()
        break
      time.sleep(0.1)
  except BaseException:          # Ctrl-C or a launcher bug: leave no process behind
    for p in procs:
      _stop(p, signal.SIGKILL)
    raise
  for th in pumps:
    th.join(timeout=5)
  reports = [{"process": i, "returncode": p.returncode, "killed_by_launcher": i in killed}
             for i, p in enumerate(procs)]
  if status == 0:
    bad = [r for r in reports if r["returncode"] != 0]
    if bad:   # a failure seen only after every process had ended
      rc = bad[0]["returncode"]
      status = rc if rc > 0 else 128 - rc
  elapsed = time.monotonic() - t0
  summary = ", ".join(f"p{r['process']} {r['returncode']}"
                      f"{' (killed by launcher)' if r['killed_by_launcher'] else ''}"
                      for r in reports)
  print(f"launch_local: {n} processes, exit statuses {summary}; {elapsed:.1f} s", file=err,
        flush=True)
  if any(r["returncode"] != 0 for r in reports):
    for r in reports:   # which process exited how, and why where its stderr says
      ended = _explain(r["returncode"], list(tails[r["process"]]), r["killed_by_launcher"])
      print(f"launch_local: p{r['process']} {ended}", file=err, flush=True)
  return status, reports


def _explain(returncode, lines, killed: bool) -> str:
  """How one process ended, in one line (jaxpart.runtime.distributed.explain_end when importable)."""
  if killed:
    return f"killed by the launcher after another failed (status {returncode})"
  try:
    from jaxpart.runtime.distributed import explain_end  # noqa: PLC0415
  except ImportError:
    return f"exited with status {returncode}"
  return explain_end(returncode, lines)


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--" not in argv:
    print("usage: launch_local.py [-n K] [options] -- JAXPART_COMMAND [ARGS...]", file=sys.stderr)
    return 2
  cut = argv.index("--")
  p = argparse.ArgumentParser(prog="launch_local.py", description=__doc__.split("\n\n")[0])
  p.add_argument("-n", "--processes", type=int, default=2)
  p.add_argument("--local-devices", type=int, default=None,
                 help="simulated CPU devices per process (default: the command's --devices / K)")
  p.add_argument("--timeout", type=float, default=600, help="seconds before all are killed")
  p.add_argument("--grace", type=float, default=30,
                 help="seconds the others get to stop by themselves after one fails")
  p.add_argument("--platform", default="cpu", help="JAX_PLATFORMS for the processes")
  p.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
  args = p.parse_args(argv[:cut])
  if args.processes < 1:
    p.error(f"--processes = {args.processes}: must be at least 1")
  if not argv[cut + 1:]:
    p.error("no jaxpart command after --")
  status, _ = launch(argv[cut + 1:], args.processes, local_devices=args.local_devices,
                     timeout=args.timeout, grace=args.grace, platform=args.platform,
                     port=args.port)
  return status


if __name__ == "__main__":
  raise SystemExit(main())
