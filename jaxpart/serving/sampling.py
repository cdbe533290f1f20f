"""Choosing each sequence slot's next token with its own request's settings, all rows at once.

A step holds requests with different temperature / top-k / top-p / seed, so the settings are
arrays (one entry per slot) and the compiled step never changes with them. A row's key is its
request's seed folded with the index of the token it chooses, never the slot or the step: a
seeded request draws the same tokens alone or beside others, before and after a preemption.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxpart.serving.requests import SamplingParams

GREEDY = SamplingParams()
TOP_LOGPROBS = 5     # alternatives the step reports per row (OpenAI's legacy completions cap)


class StepOut(NamedTuple):
  """What one step gives back per slot: the chosen id (-1: the slot chose nothing), its
  log-probability, and the TOP_LOGPROBS most likely ids with theirs (most likely first)."""
  ids_S: np.ndarray
  logprob_S: np.ndarray
  top_ids_SxK: np.ndarray
  top_logprobs_SxK: np.ndarray


@dataclass(frozen=True)
class RowSettings:
  """Host arrays, one entry per slot: what sample_rows takes (the step's replicated inputs)."""
  temperature_S: np.ndarray   # float32; 0 is greedy
  top_k_S: np.ndarray         # int32; 0 keeps every token
  top_p_S: np.ndarray         # float32 in (0, 1]
  seed_S: np.ndarray          # uint32: the request's seed modulo 2^32
  count_S: np.ndarray         # int32: tokens the request has generated before this one

  def arrays(self) -> tuple[np.ndarray, ...]:
    return (self.temperature_S, self.top_k_S, self.top_p_S, self.seed_S, self.count_S)


def row_settings(params_S: list[SamplingParams | None], counts_S: list[int]) -> RowSettings:
  """RowSettings for the slots' requests (None: an empty slot, sampled greedily and dropped)."""
  ps = [p or GREEDY for p in params_S]
  return RowSettings(np.array([p.temperature for p in ps], np.float32),
                     np.array([p.top_k for p in ps], np.int32),
                     np.array([p.top_p for p in ps], np.float32),
                     np.array([p.seed % 2**32 for p in ps], np.uint32),
                     np.asarray(counts_S, np.int32))


def _filtered(z_SxV, top_k_S, top_p_S):
  """z with tokens outside each row's top-k, then outside its top-p nucleus, set to -inf.

  The nucleus is the smallest set of the most likely tokens whose probability reaches top_p
  (a token is kept when the mass before it is below top_p; the most likely is always kept).
  """
  v = z_SxV.shape[-1]
  desc_SxV = -jnp.sort(-z_SxV, axis=-1)
  k_S = jnp.where(top_k_S > 0, jnp.minimum(top_k_S, v), v)
  kth_S = jnp.take_along_axis(desc_SxV, (k_S - 1)[:, None], axis=-1)
  desc_SxV = jnp.where(jnp.arange(v)[None, :] < k_S[:, None], desc_SxV, -jnp.inf)
  prob_SxV = jax.nn.softmax(desc_SxV, axis=-1)
  before_SxV = jnp.cumsum(prob_SxV, axis=-1) - prob_SxV
  n_keep_S = jnp.maximum(jnp.sum(before_SxV < top_p_S[:, None], axis=-1), 1)
  pth_S = jnp.take_along_axis(desc_SxV, (n_keep_S - 1)[:, None], axis=-1)
  return jnp.where((z_SxV >= kth_S) & (z_SxV >= pth_S), z_SxV, -jnp.inf)


def sample_rows(logits_SxV, temperature_S, top_k_S, top_p_S, seed_S, count_S):
  """Each row's next token: argmax where temperature is 0, else a draw from its filtered,
  tempered distribution with key fold_in(PRNGKey(seed), count). Greedy rows never depend on
  the sampled ones beside them (the draw is per row, then selected away)."""
  logits_SxV = logits_SxV.astype(jnp.float32)
  greedy_S = jnp.argmax(logits_SxV, axis=-1).astype(jnp.int32)
  hot_S = temperature_S > 0
  z_SxV = logits_SxV / jnp.where(hot_S, temperature_S, 1.0)[:, None]
  z_SxV = _filtered(z_SxV, top_k_S, top_p_S)
  keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.PRNGKey(s), c))(seed_S, count_S)
  drawn_S = jax.vmap(jax.random.categorical)(keys, z_SxV).astype(jnp.int32)
  return jnp.where(hot_S, drawn_S, greedy_S)


def row_logprobs(logits_SxV, ids_S, k: int = TOP_LOGPROBS):
  """(logprob of ids_S, top-k ids, top-k logprobs) per row, from the raw logits.

  Raw, as vLLM reports by default (logprobs_mode "raw_logprobs": the model's log_softmax
  before temperature, top-k / top-p or any other processing) and as OpenAI's API describes
  them (the model's log-probability of each token): a request's temperature changes which
  token is drawn, never the numbers reported. logits_SxV must hold the true vocabulary only
  (never the padding columns a mesh adds), so no padded id can be reported.
  """
  lp_SxV = jax.nn.log_softmax(logits_SxV.astype(jnp.float32), axis=-1)
  top_lp_SxK, top_ids_SxK = jax.lax.top_k(lp_SxV, min(k, lp_SxV.shape[-1]))
  chosen_S = jnp.take_along_axis(lp_SxV, jnp.maximum(ids_S, 0)[:, None], axis=-1)[:, 0]
  return chosen_S, top_ids_SxK.astype(jnp.int32), top_lp_SxK
