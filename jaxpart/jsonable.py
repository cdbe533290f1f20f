"""One JSON encoding for every figure jaxpart writes (command output, experiment results, sweep
lines): objects with to_dict (Plan, Prediction, Manifest) by it, other dataclasses as dicts,
numpy and JAX scalars by item(), paths as text."""

from __future__ import annotations

import dataclasses
import json
from pathlib import PurePath
from typing import Any


def jsonable(o: Any) -> Any:
  """json.dumps' `default`: what an object is in JSON, or TypeError naming its type."""
  if hasattr(o, "to_dict"):
    return o.to_dict()
  if dataclasses.is_dataclass(o) and not isinstance(o, type):
    return dataclasses.asdict(o)
  if hasattr(o, "item"):
    return o.item()
  if isinstance(o, PurePath):
    return str(o)
  raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def dumps(obj: Any, **kw) -> str:
  return json.dumps(obj, default=jsonable, **kw)
