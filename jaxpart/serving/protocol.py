"""The OpenAI request bodies, checked field by field, and the response objects.

Parsed by hand rather than by a schema library so every refusal is one message naming the
field, the value and what is valid, in OpenAI's error shape ({"error": {"message", "type",
"param", "code"}}) with the HTTP status a client expects (400 bad field, 404 unknown model).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

from jaxpart.serving.requests import RequestError, SamplingParams
from jaxpart.serving.sampling import TOP_LOGPROBS

MAX_STOPS = 4
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "abort"}


class ApiError(Exception):
  """An HTTP error with OpenAI's body: status, message, the field at fault."""

  def __init__(self, status: int, message: str, param: str | None = None,
               kind: str = "invalid_request_error", headers: dict | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.kind = status, message, param, kind
    self.headers = headers or {}

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                      "code": self.status}}


@dataclass(frozen=True)
class Generation:
  """What a request asks the engine for, once parsed."""
  chat: bool
  model: str
  prompt: tuple          # token ids (the tokenizer's) or text, see prompt_is_text
  prompt_is_text: bool
  params: SamplingParams
  stop: tuple[str, ...]
  stream: bool
  include_usage: bool
  logprobs: int | None = None   # alternatives to report per token; None: no logprobs


def parse_json(raw: bytes) -> dict:
  try:
    body = json.loads(raw)
  except (ValueError, UnicodeDecodeError) as e:
    raise ApiError(400, f"the request body is not valid JSON ({e})", "body") from None
  if not isinstance(body, dict):
    raise ApiError(400, f"the request body is a JSON {type(body).__name__}; expected an object",
                   "body")
  return body


def _get(body: dict, name: str, kinds: tuple, default, what: str):
  v = body.get(name, default)
  if v is None:
    return default
  if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
    raise ApiError(400, f"{name} = {json.dumps(v)[:80]}: must be {what}", name)
  return v


def _number(body: dict, name: str, default: float, ok, valid: str) -> float:
  v = _get(body, name, (int, float), default, "a number")
  if not math.isfinite(v) or not ok(v):
    raise ApiError(400, f"{name} = {v!r}: must be {valid}", name)
  return float(v)


def _stops(body: dict) -> tuple[str, ...]:
  v = body.get("stop")
  stops = [] if v is None else [v] if isinstance(v, str) else v
  if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
    raise ApiError(400, "stop: must be a non-empty string or a list of them", "stop")
  if len(stops) > MAX_STOPS:
    raise ApiError(400, f"stop holds {len(stops)} strings; at most {MAX_STOPS}", "stop")
  return tuple(stops)


def _common(body: dict, served: str, default_max: int | None, seed: int) -> dict:
  model = _get(body, "model", (str,), served, "a string")
  if model != served:
    raise ApiError(404, f"model {model!r} does not exist; this server serves {served!r}",
                   "model", "not_found_error")
  if _get(body, "n", (int,), 1, "an integer") != 1:
    raise ApiError(400, f"n = {body['n']!r}: only n = 1 is served", "n")
  max_tokens = _get(body, "max_tokens", (int,), default_max, "an integer")
  if max_tokens is not None and max_tokens <= 0:
    raise ApiError(400, f"max_tokens = {max_tokens}: must be a positive integer", "max_tokens")
  temperature = _number(body, "temperature", 1.0, lambda v: v >= 0, "a number >= 0 (0 is greedy)")
  top_p = _number(body, "top_p", 1.0, lambda v: 0 < v <= 1, "in (0, 1]")
  top_k = _get(body, "top_k", (int,), 0, "an integer")
  if top_k < -1:
    raise ApiError(400, f"top_k = {top_k}: must be >= 0, or -1 or 0 for all tokens", "top_k")
  seed = _get(body, "seed", (int,), seed, "an integer")
  stream = _get(body, "stream", (bool,), False, "true or false")
  opts = _get(body, "stream_options", (dict,), {}, "an object")
  _get(body, "ignore_eos", (bool,), False, "true or false")   # vLLM's extension
  return dict(model=model, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
              top_k=max(top_k, 0), seed=seed, stop=_stops(body), stream=stream,
              include_usage=bool(opts.get("include_usage")),
              ignore_eos=body.get("ignore_eos") is True)


def _top(body: dict, name: str) -> int | None:
  """An alternatives count in 0 .. TOP_LOGPROBS (the step reports that many per token)."""
  k = _get(body, name, (int,), None, f"an integer in 0 .. {TOP_LOGPROBS}")
  if k is not None and not 0 <= k <= TOP_LOGPROBS:
    raise ApiError(400, f"{name} = {k}: must be an integer in 0 .. {TOP_LOGPROBS} (the "
                        f"alternatives served per token)", name)
  return k


def _chat_logprobs(body: dict) -> int | None:
  """Chat's `logprobs: true` with `top_logprobs: k` (k alone is refused, as OpenAI does)."""
  on = _get(body, "logprobs", (bool,), False, "true or false")
  k = _top(body, "top_logprobs")
  if k is not None and not on:
    raise ApiError(400, f"top_logprobs = {k}: needs logprobs = true", "top_logprobs")
  return (k or 0) if on else None


def _params(c: dict, eos_ids: tuple[int, ...], max_tokens: int) -> SamplingParams:
  try:
    return SamplingParams(max_tokens=max_tokens, eos_ids=eos_ids, temperature=c["temperature"],
                          top_k=c["top_k"], top_p=c["top_p"], seed=c["seed"])
  except RequestError as e:
    raise ApiError(400, str(e), str(e).split(" ")[0].split(".")[-1]) from None


def parse_completion(body: dict, served: str, eos_ids, seed: int) -> tuple[Generation, int | None]:
  """A /v1/completions body; returns the Generation (max_tokens filled in later when None)."""
  c = _common(body, served, 16, seed)
  c["logprobs"] = _top(body, "logprobs")
  prompt = body.get("prompt")
  if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
    prompt = prompt[0]          # a batch of one
  if isinstance(prompt, str):
    text = True
  elif (isinstance(prompt, list) and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
    text = False
  else:
    raise ApiError(400, "prompt: must be a string or a non-empty list of token ids (one prompt)",
                   "prompt")
  return _generation(c, False, prompt, text, eos_ids)


def parse_chat(body: dict, served: str, eos_ids, seed: int) -> tuple[Generation, int | None]:
  """A /v1/chat/completions body (max_tokens None: up to the context)."""
  c = _common(body, served, None, seed)
  c["logprobs"] = _chat_logprobs(body)
  if body.get("max_completion_tokens") is not None and c["max_tokens"] is None:
    c["max_tokens"] = _get(body, "max_completion_tokens", (int,), None, "an integer")
    if c["max_tokens"] <= 0:
      raise ApiError(400, f"max_completion_tokens = {c['max_tokens']}: must be a positive "
                          f"integer", "max_completion_tokens")
  msgs = body.get("messages")
  if not isinstance(msgs, list) or not msgs:
    raise ApiError(400, "messages: must be a non-empty list of {role, content} objects",
                   "messages")
  out = []
  for i, m in enumerate(msgs):
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
      raise ApiError(400, f"messages[{i}]: must be an object with a string role", "messages")
    content = m.get("content")
    if isinstance(content, list):    # content parts: the text ones, joined
      if not all(isinstance(p, dict) and p.get("type") == "text"
                 and isinstance(p.get("text"), str) for p in content):
        raise ApiError(400, f"messages[{i}].content: only text parts are served", "messages")
      content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
      raise ApiError(400, f"messages[{i}].content: must be a string", "messages")
    out.append({"role": m["role"], "content": content})
  return _generation(c, True, tuple(out), True, eos_ids)


def _generation(c: dict, chat: bool, prompt, text: bool, eos_ids):
  g = Generation(chat, c["model"], tuple(prompt) if not text or chat else prompt, text,
                 _params(c, () if c["ignore_eos"] else tuple(eos_ids), 1), c["stop"], c["stream"],
                 c["include_usage"], c["logprobs"])
  return g, c["max_tokens"]


def created() -> int:
  return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens}


def choice(chat: bool, text: str, finish: str | None, delta: bool, first: bool = False,
           logprobs: dict | None = None) -> dict:
  """One choice of a response or a chunk (chat: message / delta; completion: text)."""
  c: dict = {"index": 0, "finish_reason": finish, "logprobs": logprobs}
  if not chat:
    c["text"] = text
  elif delta:
    c["delta"] = ({"role": "assistant", "content": text} if first else
                  {"content": text} if text or finish is None else {})
  else:
    c["message"] = {"role": "assistant", "content": text}
  return c


def response(chat: bool, rid: str, model: str, choices: list, chunk: bool,
             usage_: dict | None) -> dict:
  kind = ("chat.completion" if chat else "text_completion") + (".chunk" if chunk and chat else "")
  out = {"id": rid, "object": kind, "created": created(), "model": model, "choices": choices}
  if usage_ is not None:
    out["usage"] = usage_
  return out
