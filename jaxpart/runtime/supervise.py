"""One process of a multi-process run, watched by a small parent that stays alive to say how it
ended. When a peer dies, JAX's coordination service ends the survivors with SIGABRT and a C++
stack (its missed-heartbeat hook aborts before any Python handler could run), so no in-process
handler can print a clear line; the parent can.

The parent re-runs the same command as its child (JAXPART_SUPERVISED set), passes stdout through
untouched and stderr line by line, holds back a C++ fatal dump, and on a signal or a status other
than 0, 1, 2 prints one line: `jaxpart CMD: error: process I: <how it ended and why>`.
"""

from __future__ import annotations

import collections
import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import jaxpart
from jaxpart.runtime import distributed

ENV = "JAXPART_SUPERVISED"    # in the child: its supervisor's process id
TAIL_LINES = 200              # of the child's stderr, for distributed.explain_end
# success, a failure with its traceback, a one-line user error, Ctrl-C said in one line (cli.py)
NORMAL = (0, 1, 2, 130)
FORWARDED = (signal.SIGINT, signal.SIGTERM)
_PR_SET_PDEATHSIG = 1         # linux/prctl.h

# Where a C++ fatal dump begins: an absl/glog FATAL line, a CHECK's stack, std::terminate,
# CPython's fatal error handler, absl's failure signal handler.
_DUMP = re.compile(rb"F\d{4} \d\d:\d\d:\d\d|\*\*\* Check failure stack trace|\s+@\s+0x"
                   rb"|terminate called|Fatal Python error|\*\*\* SIG[A-Z]+ received|PC: @ ")

# What a process that lost a peer or the coordinator writes (JAX's coordination service, gloo).
_LOST_PEER = ("Connection reset by peer", "Connection closed by peer", "another task died",
              "stopped sending heartbeats", "failed to connect to all addresses",
              "Gloo context initialization failed")


def needed(argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> bool:
  """True for one of several processes (as distributed.py counts them) not yet supervised. In
  the supervised child: False, once the child is tied to die with its supervisor."""
  if ENV in environ:
    _die_with_supervisor(environ[ENV])
    return False
  return distributed.process_count_hint(argv, environ) > 1


class StderrFilter:
  """Which child stderr lines to forward: all until a fatal dump starts, none after (held, and
  shown after all if the child exits normally). The last TAIL_LINES are kept to explain the end."""

  def __init__(self, keep: int = TAIL_LINES):
    self.tail: collections.deque[str] = collections.deque(maxlen=keep)
    self.held: list[bytes] = []

  def feed(self, line: bytes) -> bool:
    self.tail.append(line.decode("utf-8", "replace"))
    if self.held or _DUMP.match(line):
      self.held.append(line)
      return False
    return True


def summary(command: str, process: str, returncode: int, tail: Iterable[str]) -> str | None:
  """The one line for an abnormal end (a signal, a status other than 0, 1, 2, or a status 1
  whose stderr shows a lost peer: gloo raises "Connection reset by peer"); None otherwise."""
  tail = list(tail)
  lost_peer = any(sign in line for line in tail for sign in _LOST_PEER)
  if returncode in NORMAL and not (returncode == 1 and lost_peer):
    return None
  how = ("interrupted (SIGINT, Ctrl-C)" if returncode == -signal.SIGINT
         else distributed.explain_end(returncode, tail))
  return f"jaxpart {command}: error: process {process}: {how}"


def exit_status(returncode: int) -> int:
  """The shell's convention: 128 + N for a child ended by signal N."""
  return 128 - returncode if returncode < 0 else returncode


def run(command: str, argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> int:
  """Run `jaxpart <argv>` as a supervised child; its exit status, or 128 + N for signal N."""
  proc = subprocess.Popen([sys.executable, "-m", "jaxpart", *argv], env=_child_env(environ),
                          stdout=_fd_or_pipe(sys.stdout), stderr=subprocess.PIPE)
  copier = None
  if proc.stdout is not None:      # our stdout is not a real file (captured): copy it over
    copier = threading.Thread(target=_copy, args=(proc.stdout, sys.stdout), daemon=True)
    copier.start()
  previous = _forward_signals(proc)
  filt = StderrFilter()
  try:
    for line in iter(proc.stderr.readline, b""):
      if filt.feed(line):
        _write(sys.stderr, [line])
    returncode = proc.wait()
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  if copier is not None:
    copier.join(timeout=5)
  if returncode in NORMAL:
    _write(sys.stderr, filt.held)
  line = summary(command, distributed.process_id_hint(argv, environ), returncode, filt.tail)
  if line is not None:
    print(line, file=sys.stderr, flush=True)
  return exit_status(returncode)


def _child_env(environ: Mapping[str, str]) -> dict[str, str]:
  """The same environment, marked, and able to import this very jaxpart (it may have been
  found through sys.path rather than installed)."""
  env = dict(environ, **{ENV: str(os.getpid())})
  root = str(Path(jaxpart.__file__).resolve().parents[1])
  if Path(root).name not in ("site-packages", "dist-packages"):
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, environ.get("PYTHONPATH")) if p)
  return env


def _fd_or_pipe(stream):
  try:
    stream.flush()
    return stream.fileno()
  except (AttributeError, OSError, ValueError):
    return subprocess.PIPE


def _copy(src, dst) -> None:
  for chunk in iter(lambda: src.read1(65536), b""):
    _write(dst, [chunk])


def _write(stream, chunks: Iterable[bytes]) -> None:
  buffer = getattr(stream, "buffer", None)
  for chunk in chunks:
    if buffer is not None:
      buffer.write(chunk)
    else:
      stream.write(chunk.decode("utf-8", "replace"))
  stream.flush()


def _forward_signals(proc: subprocess.Popen) -> dict:
  """Ctrl-C and SIGTERM go to the child, which ends as it would unsupervised; the parent
  waits to report. A Ctrl-C typed at a terminal already reached the child (same process
  group), so it is not sent twice."""
  def forward(sig, _frame):
    if sig == signal.SIGINT and _terminal_sent_it():
      return
    if proc.poll() is None:
      proc.send_signal(sig)

  try:   # a signal ignored here (a shell's background job: SIGINT) is ignored by the child too
    return {sig: signal.signal(sig, forward) for sig in FORWARDED
            if signal.getsignal(sig) is not signal.SIG_IGN}
  except ValueError:               # not the main thread: signals stay as they are
    return {}


def _terminal_sent_it() -> bool:
  """Whether this process group is a terminal's foreground group (where Ctrl-C goes)."""
  for fd in (0, 1, 2):
    try:
      if os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp():
        return True
    except OSError:
      pass
  return False


def _die_with_supervisor(parent: str) -> None:
  """A supervisor killed outright (SIGKILL) must not leave its child running alone: Linux ends
  the child with it. Elsewhere the supervisor's process group is what a launcher kills."""
  if not sys.platform.startswith("linux"):
    return
  try:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
  except (OSError, AttributeError):
    return
  if parent.isdigit() and os.getppid() != int(parent):   # it died before prctl took effect
    os._exit(128 + int(signal.SIGKILL))
