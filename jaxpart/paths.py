"""Where results go, checked before any long work: a run that ends by failing to write its
output has wasted the run; and written so that a failure (a full disk, Ctrl-C) leaves an
existing file as it was. Each failure is one line naming the path and the cause."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from typing import Iterator

from jaxpart.errors import UserError


class PathError(UserError):
  """An output path that cannot be written; the message names the flag, path and cause."""


def _folder_problem(folder: str) -> str | None:
  if not os.path.exists(folder):
    return f"folder {folder!r} does not exist"
  if not os.path.isdir(folder):
    return f"{folder!r} is not a folder"
  if not os.access(folder, os.W_OK | os.X_OK):
    return f"folder {folder!r} is not writable"
  return None


def check_output_file(flag: str, path: str) -> None:
  """A file this command will create or replace: its folder exists and is writable, and the
  path itself is not a folder or a file we may not replace."""
  if not path:
    raise PathError(f"{flag} = '': empty path: name the file to write")
  if os.path.isdir(path):
    raise PathError(f"{flag} = {path!r}: is a folder: name a file inside it")
  problem = _folder_problem(os.path.dirname(os.path.abspath(path)))
  if problem:
    raise PathError(f"{flag} = {path!r}: {problem}: create it or write elsewhere")
  if os.path.exists(path) and not os.access(path, os.W_OK):
    raise PathError(f"{flag} = {path!r}: exists and is not writable: write elsewhere")


def check_output_dir(flag: str, path: str, *, create: bool = False) -> None:
  """A folder this command writes into (created with its parents when `create`), or creates
  itself next to a hidden partial copy: the nearest existing ancestor must be writable."""
  if not path:
    raise PathError(f"{flag} = '': empty path: name the folder to write")
  full = os.path.abspath(path)
  if os.path.exists(full) and not os.path.isdir(full):
    raise PathError(f"{flag} = {path!r}: exists and is not a folder")
  if os.path.isdir(full) and create:
    if not os.access(full, os.W_OK | os.X_OK):
      raise PathError(f"{flag} = {path!r}: folder is not writable: write elsewhere")
    return
  parent = os.path.dirname(full)
  if create:
    while not os.path.exists(parent) and parent != os.path.dirname(parent):
      parent = os.path.dirname(parent)
  problem = _folder_problem(parent)
  if problem:
    raise PathError(f"{flag} = {path!r}: {problem}: create it or write elsewhere")


@contextlib.contextmanager
def atomic_file(flag: str, path: str) -> Iterator[str]:
  """Yields a temporary path beside `path` (same folder, hence same disk; it ends in path's own
  suffix, so np.save adds none) and renames it over `path` when the body finishes. Whatever
  ends the body early removes it, leaving an existing `path` as it was; an OSError becomes one
  PathError naming the flag, the path and the cause."""
  folder, name = os.path.split(os.path.abspath(path))
  suffix = os.path.splitext(name)[1]
  try:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=f".partial{suffix}", dir=folder)
    os.close(fd)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)   # as open() would create it, not mkstemp's 0600
  except OSError as e:
    raise _write_error(flag, path, e) from None
  try:
    yield tmp
    os.replace(tmp, path)
  except OSError as e:
    raise _write_error(flag, path, e) from None
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _write_error(flag: str, path: str, e: OSError) -> PathError:
  """One line for a failed write; numpy reports a short write on a full disk without an errno
  ("4096 requested and 4064 written"), so a disk with no room left is named as such."""
  number = e.errno
  if number is None and _no_room(os.path.dirname(os.path.abspath(path))):
    number = errno.ENOSPC
  code = errno.errorcode.get(number, "") if number else ""
  cause = (os.strerror(number) if number and not e.strerror else e.strerror or str(e)) + (
      f" ({code})" if code else "")
  kept = "it is as it was" if os.path.exists(path) else "nothing was written there"
  return PathError(f"{flag} = {path!r}: writing failed: {cause}: expected a writable folder with "
                   f"room for the file; {kept}")


def _no_room(folder: str) -> bool:
  try:
    return os.statvfs(folder).f_bavail == 0
  except OSError:
    return False
