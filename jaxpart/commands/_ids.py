"""The one reader of `--input-ids` files (forward and generate): a .npy of batch x seq integer
token ids in 0 .. vocab-1, where generate's rows may end in padding (-1). Anything else is one
line naming the file, what it holds and what would be valid; nothing is truncated or guessed
(float ids are refused, not rounded; a pickle is never loaded)."""

from __future__ import annotations

import os

import numpy as np

from jaxpart.config import ConfigError
from jaxpart.runtime.generate import PAD

_NPY, _NPZ, _PICKLE = b"\x93NUMPY", b"PK\x03\x04", b"\x80"


def load(path: str, vocab: int, *, padded: bool = False) -> np.ndarray:
  """int32 batch x seq ids; with `padded`, each row is a prompt followed by PAD (right padding)
  and holds at least one token."""
  want = ("batch x seq integer ids" + (f", each row right-padded with {PAD}" if padded else "")
          + f", in 0 .. {vocab - 1}: np.save(path, ids)")
  ids = _read(path, want)
  where = f"--input-ids = {path!r}"
  if ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer):
    raise ConfigError(f"{where}: {ids.dtype} values; token ids must be integers (not rounded or "
                      f"truncated); expected {want}")
  if ids.ndim != 2:
    raise ConfigError(f"{where}: a {ids.ndim}-D array of shape {ids.shape}; expected {want}")
  if 0 in ids.shape:
    raise ConfigError(f"{where}: shape {ids.shape} holds no ids; expected {want}")
  real = ids != PAD if padded else np.ones(ids.shape, bool)
  if padded:
    lens = real.sum(axis=1)
    bad = np.flatnonzero(~(real == (np.arange(ids.shape[1]) < lens[:, None])).all(axis=1))
    if bad.size:
      r = int(bad[0])
      raise ConfigError(f"{where}: row {r} has padding ({PAD}) before or inside its prompt "
                        f"({_head(ids[r])}); expected {want}")
    if (lens == 0).any():
      raise ConfigError(f"{where}: row {int(np.argmin(lens))} is all padding; every prompt needs "
                        f"at least one token")
  lo, hi = int(ids[real].min()), int(ids[real].max())
  if lo < 0 or hi >= vocab:
    raise ConfigError(f"{where}: ids in {lo} .. {hi}; the model's vocabulary is 0 .. {vocab - 1}"
                      + (f" ({PAD} only as padding after a prompt)" if padded else ""))
  return ids.astype(np.int32)


def _read(path: str, want: str) -> np.ndarray:
  where = f"--input-ids = {path!r}"
  if os.path.isdir(path):
    raise ConfigError(f"{where}: is a folder; expected a .npy file of {want}")
  try:
    with open(path, "rb") as f:
      magic = f.read(6)
  except OSError as e:
    raise ConfigError(f"{where}: cannot read it ({e.strerror or e}); expected a .npy file of "
                      f"{want}") from None
  if magic.startswith(_NPZ):
    raise ConfigError(f"{where}: an .npz archive; expected one .npy array of {want}")
  if magic.startswith(_PICKLE):
    raise ConfigError(f"{where}: a pickle (not loaded: unpickling can run code); expected a "
                      f".npy file of {want}")
  if magic != _NPY:
    raise ConfigError(f"{where}: not a .npy file (it starts {magic!r}); expected {want}")
  try:
    return np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError) as e:
    raise ConfigError(f"{where}: a damaged or unsupported .npy ({str(e)[:160]}); expected "
                      f"{want}") from None


def _head(row: np.ndarray, n: int = 8) -> str:
  return " ".join(map(str, row[:n].tolist())) + (" ..." if row.size > n else "")
