"""`--trace DIR`: a jax.profiler trace around the timed runs, for Perfetto or XProf. The
engine's named scopes (stage_step, attention, mlp, tensor_allreduce, pipeline_send, ...) name
its ops in the trace, so a reader sees the ticks and where time goes."""

from __future__ import annotations

import contextlib
import os
import sys

import jax

from jaxpart.errors import UserError


def check_dir(flag: str, path: str | None) -> None:
  """Refuse a trace path that exists and is not a directory, before anything is compiled."""
  if path and os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"{flag} = {path!r}: exists and is not a directory; give a directory "
                    f"(created if missing)")


def maybe_trace(path: str | None):
  """jax.profiler.trace(path) if a path is given, else nothing."""
  if not path:
    return contextlib.nullcontext()
  os.makedirs(path, exist_ok=True)
  print(f"writing a jax.profiler trace under {path} (open with Perfetto or XProf)",
        file=sys.stderr)
  return jax.profiler.trace(path)
