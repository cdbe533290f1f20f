"""Atomic destinations: a checkpoint is written into a hidden sibling (.NAME.partial, marked
by a sentinel file) and renamed into place at the end, so an interrupted write never leaves a
directory that restores as valid. Across processes, process 0 does the file work and every
process meets at the same barriers.

Whatever ends a write early (a full disk, a read-only folder, Ctrl-C, a bug) removes the hidden
sibling and leaves the destination as it was; an OSError becomes one CheckpointError line naming
the destination and the cause (write_failed), anything else is re-raised as it came."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

import jax
from jax.experimental import multihost_utils

from jaxpart.checkpoint.manifest import MANIFEST, SENTINEL, CheckpointError
from jaxpart.errors import first_line

def primary() -> bool:
  return jax.process_index() == 0


def sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def check_destination(dst: Path, overwrite: bool, src: Path | None = None) -> None:
  """Refuse, before any work, a destination that exists (unless overwrite) or is the source."""
  dst = Path(dst)
  if src is not None and Path(src).exists():
    if dst.exists() and os.path.samefile(src, dst):
      raise CheckpointError(f"destination {dst} is the source; write the conversion elsewhere")
    if Path(src).is_dir() and Path(dst).resolve().is_relative_to(Path(src).resolve()):
      raise CheckpointError(f"destination {dst} is inside the source {src}; the source is only "
                            f"read, write the conversion elsewhere")
  if not (dst.exists() or dst.is_symlink()):
    if dst.parent.exists() and not dst.parent.is_dir():
      raise CheckpointError(f"destination {dst}: {dst.parent} is not a directory")
    return
  if not overwrite:
    raise CheckpointError(f"destination {dst} exists; pass --overwrite (overwrite=True) to "
                          f"replace it")
  if dst.is_dir() and any(dst.iterdir()) and not (dst / MANIFEST).exists():
    raise CheckpointError(f"destination {dst} is a non-empty directory that is not a jaxpart "
                          f"checkpoint; refusing to replace it even with --overwrite")
  if dst.is_file() and dst.suffix != ".npz":
    raise CheckpointError(f"destination {dst} is a file that is not .npz; refusing to replace it")


def _partial_path(dst: Path) -> Path:
  return dst.with_name(f".{dst.name}.partial")


@contextlib.contextmanager
def atomic_dir(dst: Path, overwrite: bool) -> Iterator[Path]:
  """Yields a fresh hidden sibling; renames it to dst only if the body finishes."""
  check_destination(dst, overwrite)
  tmp = _partial_path(dst)
  if primary():
    dst.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
      if not (tmp / SENTINEL).exists():
        raise CheckpointError(f"{tmp} exists and is not a jaxpart partial write; remove it")
      shutil.rmtree(tmp)   # left by an interrupted write to the same destination
    tmp.mkdir()
    (tmp / SENTINEL).write_text("jaxpart: write in progress; not a checkpoint\n")
  sync("jaxpart-checkpoint-begin")
  try:
    yield tmp
    sync("jaxpart-checkpoint-written")
  except BaseException as e:
    if primary():
      shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(e, OSError):
      raise write_failed(dst, e) from e
    raise
  if primary():
    # With --overwrite the old checkpoint steps aside first: a kill between the two renames
    # leaves no destination (the old one survives as .NAME.replaced), never a mixed one.
    old = dst.with_name(f".{dst.name}.replaced")
    if dst.exists() or dst.is_symlink():
      _remove(old)
      os.rename(dst, old)
    os.rename(tmp, dst)
    (dst / SENTINEL).unlink()   # a kill before this leaves dst refused, never half-valid
    _fsync_dir(dst.parent)
    _remove(old)
  sync("jaxpart-checkpoint-committed")


def write_failed(dst: Path, e: Exception) -> CheckpointError:
  """One line for an OS error (or orbax's report of one) while writing dst; the caller removes
  the partial write."""
  number = e.errno if isinstance(e, OSError) else _os_error_in(str(e))
  if number:
    code = errno.errorcode.get(number, "")
    text = (e.strerror if isinstance(e, OSError) else None) or os.strerror(number)
    cause = text + (f" ({code})" if code else "")
  elif isinstance(e, OSError):
    cause = str(e) or type(e).__name__
  else:
    cause = first_line(e)
  kept = "it is as it was" if dst.exists() else "nothing was written there"
  return CheckpointError(f"{dst}: writing failed: {cause}: expected a writable destination "
                         f"with room for the checkpoint; {_partial_path(dst).name} was removed "
                         f"and {kept}")


def _os_error_in(message: str) -> int | None:
  """The OS error number tensorstore puts in its messages (`[os_error_code='28']`, `[OS error
  28: ...]`), so that a full disk under orbax reads as one, not as a page of tensorstore text."""
  m = re.search(r"os_error_code='(\d+)'|OS error (\d+)", message)
  return int(m.group(1) or m.group(2)) if m else None


def _remove(path: Path) -> None:
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path)
  elif path.exists() or path.is_symlink():
    path.unlink()


def _fsync_dir(path: Path) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)
