"""The files orbax wrote, recorded in the manifest at save time and checked before every read.

Why a recorded list: a deleted _METADATA, _CHECKPOINT_METADATA, _sharding or commit marker, a
deleted or shortened ocdbt manifest, or a data file one byte short all restore bit-exact with
orbax 0.12 (tensorstore reads only the byte ranges it needs, and orbax falls back when metadata
is absent), so neither the restore nor the leaf checksums can see them; the next orbax version
or a resumed run may. orbax's own metadata does not list its files (the ocdbt b-tree names data
files only in its binary format), so jaxpart lists them itself: every file under orbax/ with its
size, and for the metadata files (those outside a `d/` data folder: small, one per item or
process) a sha256 as well. Data files get sizes only: the leaf checksums already cover what
they hold, and hashing them would read the whole checkpoint a second time.

A checkpoint saved before the list existed has none (manifest key `files` absent): it is read as
before, and `verify` says the files were not checked.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from jaxpart.checkpoint.schema import CheckpointError

SHOWN = 4   # problems named in the one line; the rest are counted


def _is_data(rel: str) -> bool:
  return "d" in rel.split("/")[:-1]


def _sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _walk(root: Path, under: str) -> dict[str, Path]:
  """relative path (from root, '/'-separated) -> file, for every file under root/under."""
  base = root / under
  if not base.is_dir():
    return {}
  return {p.relative_to(root).as_posix(): p for p in sorted(base.rglob("*")) if p.is_file()}


def record(root: Path, under: str) -> dict[str, dict]:
  """{relative path: {bytes[, sha256]}} of every file under root/under, as written."""
  out = {}
  for rel, p in _walk(root, under).items():
    e = {"bytes": p.stat().st_size}
    if not _is_data(rel):
      e["sha256"] = _sha256(p)
    out[rel] = e
  return out


def problems(root: Path, under: str, recorded: dict[str, dict]) -> list[str]:
  """What differs from the recorded list: missing, shorter or longer, changed, unexpected."""
  have = _walk(root, under)
  out = [f"{rel} is missing" for rel in sorted(set(recorded) - set(have))]
  for rel in sorted(set(recorded) & set(have)):
    want, size = recorded[rel], have[rel].stat().st_size
    if size != want["bytes"]:
      how = "truncated" if size < want["bytes"] else "grown"
      out.append(f"{rel} is {size:,} bytes, {want['bytes']:,} were written ({how})")
    elif "sha256" in want and _sha256(have[rel]) != want["sha256"]:
      out.append(f"{rel} changed (sha256 differs from the one recorded at save)")
  out += [f"{rel} is not one of the files written" for rel in sorted(set(have) - set(recorded))]
  return out


def check(root: Path, under: str, recorded: dict[str, dict] | None, where: str) -> int:
  """Refuse a checkpoint whose files differ from the recorded list; the number checked."""
  if recorded is None:
    return 0
  found = problems(root, under, recorded)
  if found:
    more = f" (and {len(found) - SHOWN} more)" if len(found) > SHOWN else ""
    raise CheckpointError(f"{where}: the checkpoint is damaged or incomplete: "
                          f"{'; '.join(found[:SHOWN])}{more}: expected the {len(recorded)} "
                          f"files recorded in the manifest at save")
  return len(recorded)
