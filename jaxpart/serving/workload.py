"""Seeded synthetic request streams that fit a model's context (serve-bench's scenarios).

Lengths are long-tailed, as in real chat traffic: most prompts short, a few long. Everything
comes from one numpy Generator seeded by `seed`, so a stream is the same on every run and
every machine. Token ids are uniform over [0, vocab).
"""

from __future__ import annotations

import numpy as np

from jaxpart.serving.requests import Request, RequestError, SamplingParams

SCENARIOS = ("poisson", "long-prompt")
PROMPT_RANGE = (16, 1024)     # lognormal prompts, clipped
OUTPUT_RANGE = (8, 256)       # lognormal outputs, clipped
PROMPT_MEDIAN, PROMPT_SIGMA = 128.0, 1.0
OUTPUT_MEDIAN, OUTPUT_SIGMA = 64.0, 0.8
LONG_FACTOR = 8               # long-prompt: prompts of 8x the mean prompt
LONG_SHARE = 0.25             # long-prompt: the last quarter of the requests are long


def _check(n: int, rate: float, context: int) -> None:
  if not isinstance(n, int) or n <= 0:
    raise RequestError(f"--requests = {n!r}: must be a positive integer")
  if not rate > 0:
    raise RequestError(f"--rates holds {rate!r}: rates are positive requests per second")
  if context < 2:
    raise RequestError(f"context = {context}: a request needs at least 2 positions "
                       f"(one prompt token and one generated)")


def _lognormal(rng, n: int, median: float, sigma: float, lo: int, hi: int) -> np.ndarray:
  return np.clip(np.rint(rng.lognormal(np.log(median), sigma, n)), lo, hi).astype(int)


def _lengths(rng, n: int, context: int) -> tuple[np.ndarray, np.ndarray]:
  """Prompt and output lengths, each clipped so that prompt + output fits the context: the
  output first to at most half the context, then the prompt to the rest."""
  prompt_N = _lognormal(rng, n, PROMPT_MEDIAN, PROMPT_SIGMA, *PROMPT_RANGE)
  out_N = _lognormal(rng, n, OUTPUT_MEDIAN, OUTPUT_SIGMA, *OUTPUT_RANGE)
  out_N = np.clip(out_N, 1, max(1, context // 2))
  prompt_N = np.clip(prompt_N, 1, context - out_N)
  return prompt_N, out_N


def _requests(rng, arrivals_N, prompt_N, out_N, vocab: int, eos_ids) -> list[Request]:
  return [Request(i, tuple(int(t) for t in rng.integers(0, vocab, p)), float(a),
                  SamplingParams(max_tokens=int(o), eos_ids=tuple(eos_ids)))
          for i, (a, p, o) in enumerate(zip(arrivals_N, prompt_N, out_N))]


def poisson(n: int, rate: float, context: int, vocab: int, seed: int = 0,
            eos_ids=()) -> list[Request]:
  """n requests with Poisson arrivals at `rate` per second (exponential gaps of mean 1/rate,
  the first at its gap after 0). Prompts: lognormal, median 128, sigma 1 (log space),
  rounded and clipped to 16..1024. Outputs (max_tokens): lognormal, median 64, sigma 0.8,
  clipped to 8..256. Then each output is clipped to half the context and each prompt to the
  context minus its output, so every request fits."""
  _check(n, rate, context)
  rng = np.random.default_rng(seed)
  arrivals_N = np.cumsum(rng.exponential(1.0 / rate, n))
  prompt_N, out_N = _lengths(rng, n, context)
  return _requests(rng, arrivals_N, prompt_N, out_N, vocab, eos_ids)


def long_prompt(n: int, rate: float, context: int, vocab: int, seed: int = 0,
                eos_ids=()) -> list[Request]:
  """Steady decodes, then long prompts: Poisson arrivals at `rate` as in `poisson`. The first
  three quarters are the steady stream (the poisson prompts; outputs at the top of their range,
  256 clipped to half the context, so they keep decoding). The last quarter (at least one)
  have prompts of 8x the mean of the poisson prompt distribution actually drawn, capped at the
  context minus their output (drawn as in poisson), so they arrive while the others decode."""
  _check(n, rate, context)
  rng = np.random.default_rng(seed)
  arrivals_N = np.cumsum(rng.exponential(1.0 / rate, n))
  prompt_N, out_N = _lengths(rng, n, context)
  n_long = max(1, int(round(n * LONG_SHARE)))
  steady = slice(0, n - n_long)
  out_N[steady] = max(1, min(OUTPUT_RANGE[1], context // 2))
  prompt_N[steady] = np.clip(prompt_N[steady], 1, context - out_N[steady])
  long_len = int(round(LONG_FACTOR * prompt_N.mean()))
  prompt_N[n - n_long:] = np.minimum(long_len, context - out_N[n - n_long:])
  return _requests(rng, arrivals_N, prompt_N, out_N, vocab, eos_ids)


def make(scenario: str, n: int, rate: float, context: int, vocab: int, seed: int = 0,
         eos_ids=()) -> list[Request]:
  """The named scenario's stream."""
  if scenario not in SCENARIOS:
    raise RequestError(f"--scenario = {scenario!r}: valid scenarios are {', '.join(SCENARIOS)}")
  fn = poisson if scenario == "poisson" else long_prompt
  return fn(n, rate, context, vocab, seed, eos_ids)
