"""The step's log-probabilities as OpenAI reports them: legacy completions and chat shapes.

A token's string is the text it adds after the tokens before it (what the streaming
detokenizer would show, a word's leading space included), so a completion's tokens join into
its text as OpenAI's do; an alternative's string is the text it would have added there.
text_offset is where the token's text starts in the completion's text. Every generated
token is reported, a stop string's tokens included (its text is cut, its tokens were chosen).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenLogprob:
  """One generated token: its string, log-probability, the top k alternatives (string,
  log-probability, most likely first) and where its text starts in the completion."""
  token: str
  logprob: float
  top: tuple[tuple[str, float], ...]
  offset: int


def entry(det, token_id: int, logprobs, k: int, offset: int) -> TokenLogprob:
  """The token's entry, read before det.add(token_id) (its strings depend on the text before
  it). logprobs: the engine's (logprob, top ids, top logprobs)."""
  lp, top_ids, top_lps = logprobs
  top = tuple((det.peek(t), float(v)) for t, v in zip(top_ids[:k], top_lps[:k]))
  return TokenLogprob(det.peek(token_id), float(lp), top, offset)


def _top_dict(e: TokenLogprob) -> dict:
  """The k most likely and the chosen token: legacy completions report "up to logprobs + 1"."""
  d = dict(e.top)
  d.setdefault(e.token, e.logprob)
  return d


def completion(entries: list[TokenLogprob]) -> dict:
  """OpenAI's legacy completions `logprobs` object (top_logprobs: one {token: logprob} each)."""
  return {"tokens": [e.token for e in entries],
          "token_logprobs": [e.logprob for e in entries],
          "top_logprobs": [_top_dict(e) for e in entries],
          "text_offset": [e.offset for e in entries]}


def _bytes(token: str) -> list[int]:
  return list(token.encode("utf-8"))


def chat(entries: list[TokenLogprob]) -> dict:
  """The chat `logprobs` object: content, one ChatCompletionTokenLogprob per token."""
  return {"content": [{"token": e.token, "logprob": e.logprob, "bytes": _bytes(e.token),
                       "top_logprobs": [{"token": t, "logprob": v, "bytes": _bytes(t)}
                                        for t, v in e.top]} for e in entries]}


def shaped(chat_: bool, entries: list[TokenLogprob] | None) -> dict | None:
  """The choice's `logprobs` for its endpoint; None when the request asked for none."""
  if entries is None:
    return None
  return chat(entries) if chat_ else completion(entries)
