"""Non-finite numbers found where a result or a weight should be: said in one line naming which
array, instead of a NaN that exits 0 or a checkpoint that verifies as fine.

check_finite guards command outputs (run, compare, bench); check_finite_tree and
check_finite_counts are for weights read from outside: every checkpoint, .npz and Hugging Face
read (checkpoint/digest.py counts on the devices, then calls check_finite_counts), which
--allow-nonfinite lets through.

Positions past a model's max_position_embeddings are said too: a warning where transformers
also computes past the limit (forward, modelled decoding), a refusal where a server would
(generate, as vLLM's max_model_len).
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import numpy as np

from jaxpart.configtypes import ConfigError, ModelConfig
from jaxpart.errors import UserError


class NonFiniteError(UserError):
  """An output or a weight holds NaN or Inf; the message names it and counts them."""


def nonfinite_counts(array: Any) -> tuple[int, int, int]:
  """(NaN count, Inf count, size) of an array; integer arrays have none."""
  a = np.asarray(array)
  if not np.issubdtype(a.dtype, np.inexact):
    if a.dtype.kind == "V" or str(a.dtype) == "bfloat16":
      a = a.astype(np.float32)
    else:
      return 0, 0, int(a.size)
  return int(np.isnan(a).sum()), int(np.isinf(a).sum()), int(a.size)


def _describe(nan: int, inf: int, size: int) -> str:
  return f"{nan + inf:,} of {size:,} values are not finite (NaN {nan:,}, Inf {inf:,})"


def check_finite(what: str, array: Any) -> None:
  """NonFiniteError naming `what` unless every value of `array` is finite."""
  nan, inf, size = nonfinite_counts(array)
  if nan or inf:
    raise NonFiniteError(f"{what}: {_describe(nan, inf, size)}")


def nonfinite_leaves(tree: Any) -> dict[str, str]:
  """{leaf path: what is wrong} for every leaf of a pytree (or flat dict) with NaN or Inf."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  out = {}
  for path, leaf in flat:
    nan, inf, size = nonfinite_counts(leaf)
    if nan or inf:
      out[jax.tree_util.keystr(path)] = _describe(nan, inf, size)
  return out


def check_finite_tree(what: str, tree: Any, allow_nonfinite: bool = False) -> dict[str, str]:
  """The non-finite leaves; NonFiniteError naming the first (and how many) unless allowed."""
  return _refuse_unless_allowed(what, nonfinite_leaves(tree), allow_nonfinite)


def check_finite_counts(what: str, counts: dict[str, tuple[int, int, int]],
                        allow_nonfinite: bool = False) -> dict[str, str]:
  """As check_finite_tree, from {leaf name: (NaN, Inf, size)} counted elsewhere (on the devices
  that hold a checkpoint's shards, so no leaf is gathered to check it)."""
  bad = {name: _describe(*c) for name, c in counts.items() if c[0] or c[1]}
  return _refuse_unless_allowed(what, bad, allow_nonfinite)


def _refuse_unless_allowed(what: str, bad: dict[str, str],
                           allow_nonfinite: bool) -> dict[str, str]:
  if bad and not allow_nonfinite:
    first, why = next(iter(bad.items()))
    more = f" (and {len(bad) - 1} more leaves)" if len(bad) > 1 else ""
    raise NonFiniteError(f"{what}: weight {first}: {why}{more}; pass --allow-nonfinite to "
                         f"accept it")
  return bad


def warn_past_positions(cfg: ModelConfig, positions: int, what: str, stream=None) -> bool:
  """One warning line when `positions` exceed the model's stated limit (0: none); True if so."""
  if not cfg.max_positions or positions <= cfg.max_positions:
    return False
  print(f"warning: {what} reaches {positions:,} positions, past the model's "
        f"max_position_embeddings = {cfg.max_positions:,}: computed anyway (as transformers "
        f"does), but the model was not trained that far", file=stream or sys.stderr)
  return True


def check_generation_positions(cfg: ModelConfig, prompt: int, new_tokens: int) -> None:
  """ConfigError naming both numbers when prompt + new tokens exceed max_position_embeddings."""
  limit = cfg.max_positions
  if limit and prompt + new_tokens > limit:
    room = (f"at most {limit - prompt:,} new tokens for this prompt" if prompt < limit
            else "the prompt alone fills it")
    raise ConfigError(f"--new-tokens = {new_tokens:,}: prompt {prompt:,} + {new_tokens:,} new "
                      f"tokens = {prompt + new_tokens:,} positions, past the model's "
                      f"max_position_embeddings = {limit:,}; {room}")
