"""Multi-host start-up on JAX's own multi-controller runtime (jax.distributed), nothing home-made.

Every process runs the same command. Where the processes learn about each other, in order:
  1. flags: --coordinator HOST:PORT --num-processes N --process-id I;
  2. the standard environment: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID
     (a flag wins over its variable);
  3. a cluster JAX detects by itself (SLURM, Open MPI with more than one task):
     jax.distributed.initialize() with no arguments;
  4. none of these: one process, nothing to start.

Every wait is bounded, so a missing or dead peer ends the others with an error instead of a
hang: --init-timeout bounds the wait for all processes to join, --heartbeat-timeout how long a
silent peer counts as alive, --shutdown-timeout the exit barrier. On CPU the cross-process
collectives are gloo over TCP, which is how one machine runs a real multi-host mesh.
"""

from __future__ import annotations

import argparse
import atexit
import faulthandler
import inspect
import os
import re
import signal
import socket
import sys
import time
import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import jax

from jaxpart.config import ConfigError
from jaxpart.errors import first_line

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"

DEFAULT_INIT_TIMEOUT_S = 120
DEFAULT_HEARTBEAT_TIMEOUT_S = 30
DEFAULT_SHUTDOWN_TIMEOUT_S = 300   # JAX's: process 0 may still be writing results at the end
EXIT_MARGIN_S = 30          # beyond --shutdown-timeout, before a process that will not exit is ended


class DistributedError(ConfigError):
  """The processes could not form one run; the message says which setting to look at."""


def add_arguments(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group(
      "multi-host (jax.distributed; default: the JAX_* environment, a detected SLURM / Open MPI "
      "cluster, else one process)")
  g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                 help=f"address of process 0, where the coordinator listens ({ENV_COORDINATOR})")
  g.add_argument("--num-processes", type=int, default=None, metavar="N",
                 help=f"processes in the run, one per host usually ({ENV_PROCESSES})")
  g.add_argument("--process-id", type=int, default=None, metavar="I",
                 help=f"this process, 0 .. N-1; 0 prints and writes results ({ENV_PROCESS_ID})")
  g.add_argument("--local-devices", type=int, default=None, metavar="N",
                 help="CPU only: simulated devices in this process (default: --devices / N)")
  g.add_argument("--local-device-ids", default=None, metavar="0,1,..",
                 help="accelerators this process drives (default: all it sees; under SLURM JAX "
                      "gives each task one GPU, SLURM_LOCALID, unless this or "
                      "JAX_LOCAL_DEVICE_IDS says otherwise)")
  g.add_argument("--init-timeout", type=int, default=DEFAULT_INIT_TIMEOUT_S, metavar="S",
                 help=f"seconds to wait for every process to join (default "
                      f"{DEFAULT_INIT_TIMEOUT_S})")
  g.add_argument("--heartbeat-timeout", type=int, default=DEFAULT_HEARTBEAT_TIMEOUT_S,
                 metavar="S", help=f"seconds of silence after which a process counts as dead "
                                   f"and the others stop (default {DEFAULT_HEARTBEAT_TIMEOUT_S})")
  g.add_argument("--shutdown-timeout", type=int, default=DEFAULT_SHUTDOWN_TIMEOUT_S,
                 metavar="S", help=f"seconds a finished process waits for the others at exit "
                                   f"(default {DEFAULT_SHUTDOWN_TIMEOUT_S})")


@dataclass(frozen=True)
class LaunchFlags:
  """The multi-host flags of add_arguments as typed values (same names and defaults): what
  resolve and initialize read, so they never take an argparse Namespace."""

  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_devices: int | None = None
  local_device_ids: str | None = None
  init_timeout: int = DEFAULT_INIT_TIMEOUT_S
  heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT_S
  shutdown_timeout: int = DEFAULT_SHUTDOWN_TIMEOUT_S

  @classmethod
  def from_flags(cls, flags: Mapping[str, Any]) -> "LaunchFlags":
    """From parsed flags, e.g. vars(namespace); keys that are not launch flags are ignored."""
    return cls(**{f.name: flags[f.name] for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class Launch:
  """How this process joins the run. `explicit` False: JAX reads the cluster's environment."""

  coordinator: str | None
  num_processes: int | None
  process_id: int | None
  local_device_ids: tuple[int, ...] | None
  init_timeout: int
  heartbeat_timeout: int
  shutdown_timeout: int
  explicit: bool = True


def detected_cluster(environ: Mapping[str, str] = os.environ) -> str | None:
  """The multi-task cluster JAX's own auto-detection would use (same variables), or None. A
  single-task allocation (an interactive salloc shell) is not worth a coordinator."""
  slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
  if all(v in environ for v in slurm) and _int_or_none(environ["SLURM_NTASKS"]) not in (None, 1):
    return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in environ and _int_or_none(
      environ.get("OMPI_COMM_WORLD_SIZE", "")) not in (None, 1):
    return "openmpi"
  return None


def _int_or_none(s: str) -> int | None:
  try:
    return int(s)
  except ValueError:
    return None


def process_count_hint(argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> int:
  """Processes in the run, read before argument parsing (the simulated CPU device count must be
  fixed before JAX starts). Unreadable values count as 1 here; resolve() names them later."""
  value = _flag_value(argv, "--num-processes")
  if value is None:
    value = environ.get(ENV_PROCESSES)
  if value is None and detected_cluster(environ) == "slurm":
    value = environ["SLURM_NTASKS"]
  if value is None and detected_cluster(environ) == "openmpi":
    value = environ["OMPI_COMM_WORLD_SIZE"]
  n = _int_or_none(value) if value is not None else None
  return n if n is not None and n > 0 else 1


def process_id_hint(argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> str:
  """This process's number as the flags, the environment or the cluster give it, for messages
  written before (or without) jax.distributed; "?" when none says."""
  for value in (_flag_value(argv, "--process-id"), environ.get(ENV_PROCESS_ID),
                environ.get("SLURM_PROCID") if detected_cluster(environ) == "slurm" else None,
                environ.get("OMPI_COMM_WORLD_RANK") if detected_cluster(environ) == "openmpi"
                else None):
    if value:
      return value
  return "?"


def _flag_value(argv: Sequence[str], flag: str) -> str | None:
  for i, a in enumerate(argv):
    if a == flag and i + 1 < len(argv):
      return argv[i + 1]
    if a.startswith(flag + "="):
      return a.split("=", 1)[1]
  return None


def resolve(flags: LaunchFlags, environ: Mapping[str, str] = os.environ) -> Launch | None:
  """Launch settings from flags, then environment, then a detected cluster; None: one process."""
  for name in ("init_timeout", "heartbeat_timeout", "shutdown_timeout"):
    value = getattr(flags, name)
    if value < 1:
      raise ConfigError(f"--{name.replace('_', '-')} = {value}: must be at least 1 second")
  if flags.local_devices is not None and flags.local_devices < 1:
    raise ConfigError(f"--local-devices = {flags.local_devices}: must be at least 1")
  ids = _device_ids(flags.local_device_ids)
  timeouts = dict(init_timeout=flags.init_timeout, heartbeat_timeout=flags.heartbeat_timeout,
                  shutdown_timeout=flags.shutdown_timeout)
  coordinator = flags.coordinator or environ.get(ENV_COORDINATOR) or None
  n = _count(flags.num_processes, environ, ENV_PROCESSES, "--num-processes")
  pid = _count(flags.process_id, environ, ENV_PROCESS_ID, "--process-id")
  given = {"--coordinator": coordinator, "--num-processes": n, "--process-id": pid}
  if all(v is None for v in given.values()):
    if detected_cluster(environ):
      return Launch(None, None, None, ids, explicit=False, **timeouts)
    return None
  missing = [k for k, v in given.items() if v is None]
  if missing and not detected_cluster(environ):
    env_of = {"--coordinator": ENV_COORDINATOR, "--num-processes": ENV_PROCESSES,
              "--process-id": ENV_PROCESS_ID}
    raise ConfigError(
        f"multi-host start needs {', '.join(given)}; got "
        f"{', '.join(f'{k} {v}' for k, v in given.items() if v is not None)} but not "
        f"{', '.join(f'{k} (or {env_of[k]})' for k in missing)}")
  if coordinator is not None:
    _check_address(coordinator)
  if n is not None and n < 1:
    raise ConfigError(f"--num-processes = {n}: must be at least 1")
  if pid is not None and n is not None and not 0 <= pid < n:
    raise ConfigError(f"--process-id = {pid}: must be in 0 .. {n - 1} for --num-processes {n}")
  return Launch(coordinator, n, pid, ids, explicit=not missing, **timeouts)


def _count(flag_value: int | None, environ, var: str, flag: str) -> int | None:
  if flag_value is not None:
    return flag_value
  raw = environ.get(var)
  if raw is None or raw == "":
    return None
  value = _int_or_none(raw)
  if value is None:
    raise ConfigError(f"{var} = {raw!r} (for {flag}): must be an integer")
  return value


def _device_ids(raw: str | None) -> tuple[int, ...] | None:
  if raw is None:
    return None
  try:
    ids = tuple(int(s) for s in raw.split(","))
  except ValueError:
    raise ConfigError(f"--local-device-ids = {raw!r}: must be comma-separated device numbers, "
                      f"e.g. 0,1,2,3") from None
  if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
    raise ConfigError(f"--local-device-ids = {raw!r}: device numbers must be distinct and >= 0")
  return ids


def _check_address(address: str) -> None:
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ConfigError(f"--coordinator = {address!r}: must be HOST:PORT with a port in 1..65535, "
                      f"e.g. 10.0.0.1:1234 (the address of process 0)")


def initialize(flags: LaunchFlags, environ: Mapping[str, str] = os.environ) -> Launch | None:
  """Start jax.distributed as the flags / environment / cluster say; must run before anything
  touches a JAX backend. Returns the settings used, or None for a single process."""
  launch = resolve(flags, environ)
  if launch is None:
    return None
  if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in environ:
    # gloo is JAX's default today; said explicitly because without cross-process collectives a
    # CPU mesh that spans processes cannot run at all.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kw = dict(initialization_timeout=launch.init_timeout,
            heartbeat_timeout_seconds=launch.heartbeat_timeout,
            shutdown_timeout_seconds=launch.shutdown_timeout)
  # None fields are left to JAX's cluster detection (launch.explicit False).
  kw.update(coordinator_address=launch.coordinator, num_processes=launch.num_processes,
            process_id=launch.process_id)
  if launch.local_device_ids is not None:
    kw["local_device_ids"] = list(launch.local_device_ids)
  accepted = inspect.signature(jax.distributed.initialize).parameters
  dropped = [k for k in kw if k not in accepted]
  if dropped:   # jax 0.10 takes them all; a later one might rename one
    print(f"jaxpart: this JAX's jax.distributed.initialize takes no {', '.join(dropped)}; "
          f"its defaults apply", file=sys.stderr, flush=True)
  kw = {k: v for k, v in kw.items() if k in accepted}
  where = (f"coordinator {launch.coordinator} as process {launch.process_id} of "
           f"{launch.num_processes}" if launch.explicit else
           f"the {detected_cluster(environ) or 'detected'} cluster")
  # JAX aborts the process (C++ CHECK, not an exception) when the coordinator does not answer in
  # time, so say first what is being waited for, and fail cleanly where we can tell beforehand.
  print(f"jaxpart: joining {where} (waiting up to {launch.init_timeout} s for all processes)",
        file=sys.stderr, flush=True)
  if launch.coordinator is not None and launch.process_id not in (None, 0):
    _wait_for_coordinator(launch.coordinator, launch.init_timeout)
  try:
    jax.distributed.initialize(**kw)
  except Exception as e:  # noqa: BLE001  (XlaRuntimeError and friends carry the reason)
    raise DistributedError(
        f"could not join {where} within --init-timeout {launch.init_timeout} s: "
        f"{first_line(e)} (check the address, that process 0 is running and that all "
        f"--num-processes processes were started)") from None
  _keep_stdout_for_results()
  _bound_exit(launch.shutdown_timeout + EXIT_MARGIN_S)
  return launch


def _bound_exit(limit_s: float) -> None:
  """Make leaving bounded too. An uncaught error ends this process at once (after its
  traceback), without the exit barrier: its peers learn of it within --heartbeat-timeout. And
  however the command ended, a process still not gone `limit_s` after (an asynchronous
  collective waiting for a peer that has left can block JAX's own clean-up for ever) dumps its
  threads' stacks and exits with status 1: faulthandler's watchdog thread needs no GIL."""
  previous = sys.excepthook

  def leave_now(kind, value, tb):
    previous(kind, value, tb)
    print("jaxpart: this process failed; leaving without the exit barrier, the others stop "
          "within --heartbeat-timeout", file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
      stream.flush()
    os._exit(1)

  sys.excepthook = leave_now
  atexit.register(faulthandler.dump_traceback_later, limit_s, exit=True)


def _keep_stdout_for_results() -> None:
  """gloo writes a note per connection ("[Gloo] Rank 0 is connected to 3 peer ranks...") to the
  C++ stdout, which would break `--json` output. Native code's file descriptor 1 is pointed at
  stderr; Python's sys.stdout keeps the original stdout, so results still go there."""
  try:
    fd = sys.stdout.fileno()
  except (AttributeError, OSError, ValueError):
    return                      # stdout is not a real file (captured): nothing to protect
  if fd != 1:
    return
  sys.stdout.flush()
  results = os.dup(1)
  os.dup2(2, 1)
  sys.stdout = os.fdopen(results, "w", buffering=1, encoding=sys.stdout.encoding,
                         errors=sys.stdout.errors)


def _wait_for_coordinator(address: str, timeout: float) -> None:
  """Until process 0's coordinator accepts TCP connections, or DistributedError at `timeout`."""
  host, _, port = address.rpartition(":")
  host = host.strip("[]")
  deadline = time.monotonic() + timeout
  while True:
    left = deadline - time.monotonic()
    try:
      with socket.create_connection((host, int(port)), timeout=max(0.1, min(left, 2.0))):
        return
    except OSError as e:
      if time.monotonic() + 0.25 >= deadline:
        raise DistributedError(
            f"--coordinator {address}: nothing accepted a connection within --init-timeout "
            f"{timeout:g} s ({e.strerror or e}); process 0 starts the coordinator there: check "
            f"that it runs, the address and port, and firewalls") from None
    time.sleep(0.25)


_UNHEALTHY = "The following tasks are unhealthy (stopped sending heartbeats):"
# gloo, when a peer dies mid-collective, or when a collective's new connection to a dead peer
# is refused ("context initialization failed: ... Connection refused").
_GLOO_LOST = re.compile(r"Gloo.*(Connection (?:reset|closed) by peer|Broken pipe|"
                        r"Connection refused)")


def explain_end(returncode: int | None, stderr_lines: Sequence[str]) -> str:
  """One line on how a process of the run ended, from its exit status and the end of its
  stderr: JAX's coordination service aborts the survivors of a dead peer with a C++ stack
  whose useful part is one line deep in it."""
  if returncode is None:
    how = "still running"
  elif returncode < 0:
    try:
      how = f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
      how = f"killed by signal {-returncode}"
  else:
    how = f"exited with status {returncode}"
  text = [line.rstrip("\n") for line in stderr_lines]
  cause = None
  for i, line in enumerate(text):
    if _UNHEALTHY in line:
      dead = text[i + 1].strip() if i + 1 < len(text) else "?"
      task = re.search(r"task:(\d+)$", dead)     # or /job:jax_worker/replica:0/task:1
      dead = task.group(1) if task else dead
      cause = f"JAX reports process {dead} stopped sending heartbeats (it died or hung)"
    elif "RegisterTask" in line and any("DEADLINE_EXCEEDED" in t for t in text[:i]):
      cause = ("not every process joined within --init-timeout (each must be started, with the "
               "same --coordinator and --num-processes)")
    elif gloo := _GLOO_LOST.search(line):
      peer = re.search(r"\[([^\]]+)\]:(\d+)", line)
      at = f" at {peer.group(1)}:{peer.group(2)}" if peer else ""
      cause = (f"a collective lost its connection to another process{at} (gloo: "
               f"{gloo.group(1)}): that process died or cannot be reached")
    elif cause is None and "another task died" in line:
      cause = "JAX's coordination service reports that another process died"
    elif cause is None and ("Connection reset by peer" in line or "failed to connect to all "
                                                                  "addresses" in line):
      cause = "lost the coordinator (process 0 died or is unreachable)"
    elif "error: " in line and line.lstrip().startswith(("jaxpart", "error:")):
      cause = line.strip()
    elif line.startswith("RuntimeError") or line.startswith("Traceback"):
      cause = cause or line.strip()
  return how + (f": {cause}" if cause else "")


def is_main() -> bool:
  """Process 0 prints tables and writes files; the others compute and stay quiet."""
  return jax.process_index() == 0
