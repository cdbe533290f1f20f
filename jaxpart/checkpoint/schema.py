"""The error every checkpoint module raises, and the structure of a manifest, checked key by key
before any of it is used.

A manifest comes from disk, so any JSON may be there (a hand edit, another tool, a damaged
file). Each wrong key ends in one line naming it, its value and what was expected, instead of a
traceback from whichever later line first touched it. The meaning of the values (the model's
leaves, the Plan's split) is checked afterwards, by the types that own them.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from jaxpart.errors import UserError

CHECKSUM_RE = re.compile(r"^[0-9a-f]{16}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class CheckpointError(UserError):
  """A checkpoint that cannot be read, written or converted; the message says why."""


def _show(value: Any, limit: int = 60) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit - 3] + "..."


def bad_key(where: str, key: str, value: Any, expected: str) -> CheckpointError:
  return CheckpointError(f"{where}: manifest key {key} = {_show(value)}: expected {expected}")


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def require(d: dict, key: str, where: str, ok, expected: str, prefix: str = "") -> Any:
  """d[key], or one line naming the key (missing, or a value `ok` refuses) and what to give."""
  if key not in d:
    raise CheckpointError(f"{where}: manifest key {prefix}{key} is missing: expected {expected}")
  if not ok(d[key]):
    raise bad_key(where, prefix + key, d[key], expected)
  return d[key]


def optional(d: dict, key: str, where: str, ok, expected: str) -> Any:
  """d[key] when present and not null, else None; a wrong value is refused like require's."""
  if d.get(key) is None:
    return None
  return require(d, key, where, ok, expected)


def _leaf_entry(e: Any, key: str, where: str) -> None:
  if not isinstance(e, dict):
    raise bad_key(where, key, e, "an object {shape, dtype, checksum}")
  require(e, "shape", where, lambda v: isinstance(v, list) and all(
      _is_int(n) and n >= 0 for n in v), "a list of non-negative integers", key + ".")
  require(e, "dtype", where, lambda v: isinstance(v, str), "a dtype name (string)", key + ".")
  require(e, "checksum", where, lambda v: isinstance(v, str) and CHECKSUM_RE.match(v),
          "16 lowercase hex digits", key + ".")
  if "stored_as" in e:
    require(e, "stored_as", where, lambda v: v == "uint16", "'uint16' (bfloat16 bits in .npz)",
            key + ".")


def leaf_table(d: dict, key: str, where: str, required: bool) -> dict | None:
  """A params or opt_state table: leaf path -> {shape, dtype, checksum[, stored_as]}."""
  ok = lambda v: isinstance(v, dict)   # noqa: E731
  what = "an object of leaf path -> {shape, dtype, checksum}"
  table = require(d, key, where, ok, what) if required else optional(d, key, where, ok, what)
  for path, e in (table or {}).items():
    _leaf_entry(e, f"{key}[{path!r}]", where)
  return table


def file_table(d: dict, where: str) -> dict | None:
  """The inventory of files under orbax/ (None: not recorded, an older checkpoint or an npz)."""
  files = optional(d, "files", where, lambda v: isinstance(v, dict),
                   "an object of relative path -> {bytes[, sha256]}")
  for path, e in (files or {}).items():
    key = f"files[{path!r}]"
    if not isinstance(e, dict):
      raise bad_key(where, key, e, "an object {bytes[, sha256]}")
    require(e, "bytes", where, lambda v: _is_int(v) and v >= 0, "a non-negative integer",
            key + ".")
    if "sha256" in e:
      require(e, "sha256", where, lambda v: isinstance(v, str) and SHA256_RE.match(v),
              "64 lowercase hex digits", key + ".")
  return files


def build(cls, d: dict, key: str, where: str):
  """cls(**d[key]) with unknown and missing fields named; the type checks the values."""
  value = require(d, key, where, lambda v: isinstance(v, dict), f"an object of {cls.__name__} "
                  f"fields")
  names = [f.name for f in dataclasses.fields(cls)]
  unknown = sorted(set(value) - set(names))
  if unknown:
    raise CheckpointError(f"{where}: manifest key {key}.{unknown[0]}: unknown field; "
                          f"{cls.__name__} has {', '.join(names)}")
  needed = [f.name for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
  missing = [n for n in needed if n not in value]
  if missing:
    raise CheckpointError(f"{where}: manifest key {key}.{missing[0]} is missing: expected "
                          f"every one of {', '.join(needed)}")
  return cls(**value)


def positive_int(v: Any) -> bool:
  return _is_int(v) and v >= 1


def is_str(v: Any) -> bool:
  return isinstance(v, str)
