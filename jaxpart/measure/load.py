"""Machine load around a timing: a figure timed while other jobs share the cores is not a
result (under load the single-threaded reference slows more than the 16-thread engine, so
ratios flatter the engine). Timers record load before and after and say so when it was high."""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO


def snapshot() -> dict[str, Any]:
  """1-, 5- and 15-minute load averages and the core count, now."""
  one, five, fifteen = os.getloadavg()
  return {"load_1m": one, "load_5m": five, "load_15m": fifteen, "cores": os.cpu_count() or 1}


def under_load(snap: dict[str, Any]) -> bool:
  """More runnable work than cores: timings then measure the other jobs too."""
  return snap["load_1m"] > snap["cores"]


def note(snap: dict[str, Any]) -> str:
  return (f"taken under load (load {snap['load_1m']:.1f} on {snap['cores']} cores): "
          f"not a result")


def start(what: str, stream: TextIO | None = None) -> dict[str, Any]:
  """The load before timing `what`; warns on stderr when the 1-minute load exceeds the cores."""
  snap = snapshot()
  if under_load(snap):
    print(f"warning: {what} {note(snap)}; rerun on an idle machine", file=stream or sys.stderr)
  return snap


def finish(before: dict[str, Any]) -> dict[str, Any]:
  """The record a results file keeps: load before and after, and the verdict on the start."""
  loaded = under_load(before)
  return {"before": before, "after": snapshot(), "under_load": loaded,
          "note": note(before) if loaded else None}
