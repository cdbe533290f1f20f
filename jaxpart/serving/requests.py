"""A request and its sampling settings, checked when made so a bad one fails before it queues.

Each check raises RequestError with one line naming the field, the bad value and what is valid
(the command line prints it as `error: ...`). The context checks need the model, so they live
in check_fits, called by the scheduler when a request is added.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from jaxpart.errors import UserError


class RequestError(UserError):
  """A request or its sampling settings cannot be served; the message says what is valid."""


def _int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _ids(name: str, values) -> tuple[int, ...]:
  out = tuple(values)
  bad = [v for v in out if not _int(v) or v < 0]
  if bad:
    raise RequestError(f"{name} holds {bad[0]!r}: token ids are non-negative integers")
  return out


@dataclass(frozen=True)
class SamplingParams:
  """Per-request settings; requests with different ones share a step.

  temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off. A stop sequence ends
  the request when the generated tokens end with it (it stays in the output, as EOS does).
  """
  max_tokens: int = 16
  eos_ids: tuple[int, ...] = ()
  stop: tuple[tuple[int, ...], ...] = ()
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0

  def __post_init__(self):
    if not _int(self.max_tokens) or self.max_tokens <= 0:
      raise RequestError(f"SamplingParams.max_tokens = {self.max_tokens!r}: must be a positive "
                         f"integer (tokens to generate)")
    if (not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool)
        or not math.isfinite(self.temperature) or self.temperature < 0):
      raise RequestError(f"SamplingParams.temperature = {self.temperature!r}: must be a finite "
                         f"number >= 0 (0 is greedy)")
    if (not isinstance(self.top_p, (int, float)) or isinstance(self.top_p, bool)
        or not 0 < self.top_p <= 1):
      raise RequestError(f"SamplingParams.top_p = {self.top_p!r}: must be in (0, 1] "
                         f"(1 keeps every token)")
    if not _int(self.top_k) or self.top_k < 0:
      raise RequestError(f"SamplingParams.top_k = {self.top_k!r}: must be an integer >= 0 "
                         f"(0 keeps every token)")
    if not _int(self.seed):
      raise RequestError(f"SamplingParams.seed = {self.seed!r}: must be an integer")
    object.__setattr__(self, "eos_ids", _ids("SamplingParams.eos_ids", self.eos_ids))
    stop = tuple(_ids("SamplingParams.stop", s) for s in self.stop)
    if any(not s for s in stop):
      raise RequestError("SamplingParams.stop holds an empty sequence: each stop sequence needs "
                         "at least one token id")
    object.__setattr__(self, "stop", stop)

  def stops(self, generated: list[int]) -> str | None:
    """Why generation ends after these generated tokens: 'eos', 'stop', 'length' or None."""
    if generated and generated[-1] in self.eos_ids:
      return "eos"
    if any(len(s) <= len(generated) and tuple(generated[-len(s):]) == s for s in self.stop):
      return "stop"
    if len(generated) >= self.max_tokens:
      return "length"
    return None


@dataclass(frozen=True)
class Request:
  """One request: its id, prompt token ids and arrival time in seconds (stream clock)."""
  id: int | str
  prompt: tuple[int, ...]
  arrival_s: float = 0.0
  params: SamplingParams = field(default_factory=SamplingParams)

  def __post_init__(self):
    prompt = _ids(f"Request {self.id!r}: prompt", self.prompt)
    if not prompt:
      raise RequestError(f"Request {self.id!r}: prompt is empty; give at least one token id")
    object.__setattr__(self, "prompt", prompt)
    if (not isinstance(self.arrival_s, (int, float)) or not math.isfinite(self.arrival_s)
        or self.arrival_s < 0):
      raise RequestError(f"Request {self.id!r}: arrival_s = {self.arrival_s!r}: must be a "
                         f"finite number >= 0")


def check_fits(request: Request, context: int) -> None:
  """The prompt and everything it may generate fit the model's context."""
  n, m = len(request.prompt), request.params.max_tokens
  if n > context:
    raise RequestError(f"Request {request.id!r}: prompt of {n} tokens is longer than the "
                       f"context of {context} tokens")
  if n + m > context:
    raise RequestError(f"Request {request.id!r}: prompt of {n} tokens + max_tokens {m} = "
                       f"{n + m} exceeds the context of {context} tokens; max_tokens can be at "
                       f"most {context - n}")
