"""Where results go, checked before any long work: a run that ends by failing to write its
output has wasted the run. Each failure is one line naming the path and the cause."""

from __future__ import annotations

import os

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
