"""A paged KV cache's bookkeeping: fixed-size blocks, a free list and a block table per sequence.

Why pages: a contiguous cache reserves the longest sequence for every row (vLLM measured 60-80%
of it unused); blocks are handed out as a sequence grows and returned the step it ends, so
only the last, partly filled block of each sequence is wasted. This module holds no K/V: it
decides which block slots the compiled step writes and reads (models/paged_attention.py).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from jaxpart.errors import UserError, check_positive_ints
from jaxpart.placement.kv_blocks import DEFAULT_BLOCK_TOKENS, blocks_for


class PoolError(UserError):
  """The pool cannot serve what was asked (too small for one sequence, bad sizes)."""


@dataclass(frozen=True)
class PoolUsage:
  """One moment of the pool: kv_waste = allocated minus used token slots, over allocated."""
  blocks_total: int
  blocks_used: int
  blocks_free: int
  tokens_allocated: int
  tokens_used: int

  @property
  def kv_waste(self) -> float:
    alloc = self.tokens_allocated
    return (alloc - self.tokens_used) / alloc if alloc else 0.0


class BlockPool:
  """num_blocks blocks of block_tokens token slots. Slot s of block b is flat slot
  b * block_tokens + s, the index the compiled step writes K/V to."""

  def __init__(self, num_blocks: int, block_tokens: int = DEFAULT_BLOCK_TOKENS):
    check_positive_ints("BlockPool", PoolError, num_blocks=num_blocks, block_tokens=block_tokens)
    self.num_blocks = num_blocks
    self.block_tokens = block_tokens
    self._free: deque[int] = deque(range(num_blocks))
    self._tables: dict[object, list[int]] = {}
    self._used: dict[object, int] = {}

  @property
  def free_blocks(self) -> int:
    return len(self._free)

  @property
  def used_blocks(self) -> int:
    return self.num_blocks - len(self._free)

  def blocks_for(self, n_tokens: int) -> int:
    """Blocks that hold n_tokens tokens."""
    return blocks_for(n_tokens, self.block_tokens)

  def table(self, seq_id) -> list[int]:
    """The sequence's blocks in position order (empty for an unknown sequence)."""
    return list(self._tables.get(seq_id, ()))

  def capacity(self, seq_id) -> int:
    """Token slots the sequence's blocks hold."""
    return len(self._tables.get(seq_id, ())) * self.block_tokens

  def blocks_needed(self, n_tokens: int, seq_id=None) -> int:
    """Blocks to add so that the sequence (a new one when seq_id is None) holds n_tokens."""
    have = len(self._tables.get(seq_id, ())) if seq_id is not None else 0
    return max(0, self.blocks_for(n_tokens) - have)

  def can_allocate(self, n_tokens: int, seq_id=None, reserved_blocks: int = 0) -> bool:
    """Whether the sequence can grow to n_tokens with reserved_blocks kept back for others."""
    return self.blocks_needed(n_tokens, seq_id) <= self.free_blocks - reserved_blocks

  def allocate(self, seq_id, n_tokens: int) -> bool:
    """Grow the sequence's table to hold n_tokens; all or nothing (False: not enough free)."""
    need = self.blocks_needed(n_tokens, seq_id)
    if need > self.free_blocks:
      return False
    table = self._tables.setdefault(seq_id, [])
    self._used.setdefault(seq_id, 0)
    table.extend(self._free.popleft() for _ in range(need))
    return True

  def mark_used(self, seq_id, n_tokens: int) -> None:
    """The sequence's K/V now fills n_tokens slots (written by a step)."""
    if n_tokens > self.capacity(seq_id):
      raise ValueError(f"sequence {seq_id!r}: {n_tokens} tokens written into "
                       f"{self.capacity(seq_id)} allocated slots")
    self._used[seq_id] = n_tokens

  def free(self, seq_id) -> int:
    """Return the sequence's blocks to the free list (finish, cancel, preempt); blocks freed."""
    table = self._tables.pop(seq_id, [])
    self._used.pop(seq_id, None)
    self._free.extend(table)
    return len(table)

  def write_slot(self, seq_id, position: int) -> int:
    """The flat slot that holds the sequence's token at this position."""
    table = self._tables[seq_id]
    return table[position // self.block_tokens] * self.block_tokens + position % self.block_tokens

  def sequences(self) -> list:
    return list(self._tables)

  def usage(self) -> PoolUsage:
    blocks = sum(len(t) for t in self._tables.values())
    return PoolUsage(self.num_blocks, self.used_blocks, self.free_blocks,
                     blocks * self.block_tokens, sum(self._used.values()))

  def check(self) -> None:
    """Invariants: no block in two tables or in a table and the free list, free + used == total,
    every block id in range. Raises AssertionError naming the first breach."""
    held = [b for t in self._tables.values() for b in t]
    assert len(held) == len(set(held)), f"a block is in two tables: {sorted(held)}"
    assert not set(held) & set(self._free), "a block is both free and in a table"
    assert len(held) + len(self._free) == self.num_blocks, (
        f"free {len(self._free)} + used {len(held)} != total {self.num_blocks}")
    assert all(0 <= b < self.num_blocks for b in held + list(self._free)), "block id out of range"


def check_pool_fits(num_blocks: int, block_tokens: int, context: int,
                    field: str = "--kv-blocks") -> None:
  """A pool must hold one sequence of the whole context, else a request could never finish."""
  need = blocks_for(context, block_tokens)
  if num_blocks < need:
    raise PoolError(f"{field} = {num_blocks}: a pool of {num_blocks} x {block_tokens} tokens "
                    f"cannot hold one sequence of the {context}-token context; give at least "
                    f"{need} blocks")
