"""Progress bars for long checkpoint phases; silent unless asked for."""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
from tqdm import tqdm

def array_bytes(x) -> int:
  return int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize


def leaf_bar(items, desc: str, sized: dict | None, enabled: bool):
  """tqdm over leaves, counting bytes when sizes are known; silent unless enabled."""
  if not enabled:
    yield from items
    return
  items = list(items)
  if sized is None:
    yield from tqdm(items, desc=desc, unit="leaf", leave=False)
    return
  with tqdm(total=sum(array_bytes(x) for x in sized.values()), desc=desc, unit="B",
            unit_scale=True, leave=False) as bar:
    for item in items:
      yield item
      bar.update(array_bytes(sized[item[0] if isinstance(item, tuple) else item]))


@contextlib.contextmanager
def phase(desc: str, enabled: bool, nbytes: int) -> Iterator[None]:
  """A bar for one call that reports no progress of its own (orbax save and restore, the
  jitted checksums): it fills when the call returns and shows the bytes per second."""
  if not enabled:
    yield
    return
  with tqdm(total=nbytes, desc=desc, unit="B", unit_scale=True, leave=False) as bar:
    yield
    bar.update(nbytes)
