"""`logprobs` through `jaxpart serve`, driven by the official openai client: the numbers equal
log_softmax of transformers' logits for the same tiny model and tokens, the top alternatives
are sorted and hold the greedy choice first, temperature does not change them (raw logprobs),
streaming chunks carry them, and a count above the served 5 is a 400 naming the field.

Uses test_server's fixtures (its own server for this module, on loopback)."""

from __future__ import annotations

import random

import httpx
import numpy as np
import pytest

from test_server import _client, _words, model_dir, server  # noqa: F401  (fixtures)

TOL = 1e-4


def _hf_logprobs(model_dir, prompt_ids, n):
  """transformers' greedy tokens for the prompt and log_softmax of its float32 logits at each
  of them (rows: the positions that chose them)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
  ids = torch.tensor([prompt_ids])
  with torch.no_grad():
    out = hf.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=2, pad_token_id=0)
    logits = hf(out).logits[0, len(prompt_ids) - 1:-1].float()
  return out[0, len(prompt_ids):].tolist(), torch.log_softmax(logits, -1).numpy()


def test_completion_logprobs_equal_transformers(server, model_dir):
  transformers = pytest.importorskip("transformers")
  _, url, name = server
  rng = random.Random(int(np.random.SeedSequence().entropy % 2**31))
  prompt, n = _words(rng, rng.randint(2, 10)), rng.randint(3, 6)
  tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
  want_ids, lp_NxV = _hf_logprobs(model_dir, tok(prompt).input_ids, n)
  got = _client(url).completions.create(model=name, prompt=prompt, max_tokens=n,
                                        temperature=0, logprobs=5)
  lp = got.choices[0].logprobs
  print(got.model_dump_json())
  assert len(lp.tokens) == len(want_ids) == got.usage.completion_tokens
  assert "".join(lp.tokens) == got.choices[0].text
  np.testing.assert_allclose(lp.token_logprobs, [lp_NxV[i, t] for i, t in enumerate(want_ids)],
                             atol=TOL)
  for i, (chosen, top) in enumerate(zip(lp.token_logprobs, lp.top_logprobs)):
    assert chosen <= 0 and max(top.values()) == chosen
    want_top = -np.sort(-lp_NxV[i])[:5]
    assert all(np.abs(want_top - v).min() < TOL for v in top.values()), (top, want_top)
  assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]


def test_chat_top_logprobs_sorted_and_temperature_free(server):
  _, url, name = server
  rng = random.Random(int(np.random.SeedSequence().entropy % 2**31))
  msgs, k = [{"role": "user", "content": _words(rng, rng.randint(1, 5))}], rng.randint(1, 5)
  client = _client(url)
  runs = [client.chat.completions.create(model=name, messages=msgs, max_tokens=3,
                                         temperature=t, seed=7, logprobs=True, top_logprobs=k)
          for t in (0, 1.5)]
  greedy = runs[0].choices[0].logprobs.content
  assert len(greedy) == runs[0].usage.completion_tokens
  for e in greedy:
    vals = [t.logprob for t in e.top_logprobs]
    assert len(vals) == k and vals == sorted(vals, reverse=True) and vals[0] <= 0
    assert (e.top_logprobs[0].token, vals[0]) == (e.token, e.logprob)
    assert e.bytes == list(e.token.encode("utf-8"))
  # the first position's distribution is the same whatever the temperature draws from it
  hot = runs[1].choices[0].logprobs.content[0]
  np.testing.assert_allclose([t.logprob for t in hot.top_logprobs],
                             [t.logprob for t in greedy[0].top_logprobs], atol=1e-6)
  assert [t.token for t in hot.top_logprobs] == [t.token for t in greedy[0].top_logprobs]
  assert hot.logprob <= hot.top_logprobs[0].logprob
  plain = client.chat.completions.create(model=name, messages=msgs, max_tokens=2, temperature=0)
  assert plain.choices[0].logprobs is None


def test_streaming_chunks_carry_logprobs(server):
  _, url, name = server
  rng = random.Random(int(np.random.SeedSequence().entropy % 2**31))
  client, prompt, n = _client(url), _words(rng, 3), rng.randint(3, 6)
  whole = client.completions.create(model=name, prompt=prompt, max_tokens=n, temperature=0,
                                    logprobs=2).choices[0].logprobs
  chunks = list(client.completions.create(model=name, prompt=prompt, max_tokens=n,
                                          temperature=0, logprobs=2, stream=True))
  got = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
  assert len(got) >= 1 and sum(len(g.tokens) for g in got) == len(whole.tokens)
  np.testing.assert_allclose([v for g in got for v in g.token_logprobs], whole.token_logprobs,
                             atol=1e-6)
  assert [o for g in got for o in g.text_offset] == whole.text_offset
  msgs = [{"role": "user", "content": prompt}]
  chat = list(client.chat.completions.create(model=name, messages=msgs, max_tokens=n,
                                             temperature=0, logprobs=True, top_logprobs=3,
                                             stream=True))
  content = [e for c in chat if c.choices and c.choices[0].logprobs
             for e in c.choices[0].logprobs.content]
  assert len(content) == chat[-1].usage.completion_tokens
  assert all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in content)


@pytest.mark.parametrize("path,body,field", [
    ("/v1/completions", {"logprobs": 6}, "logprobs"),
    ("/v1/completions", {"logprobs": -1}, "logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 6}, "top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": 3}, "logprobs")])
def test_bad_logprobs_are_400_naming_the_field(server, path, body, field):
  _, url, name = server
  base = {"model": name, "max_tokens": 2, "prompt": "the",
          "messages": [{"role": "user", "content": "the"}]}
  r = httpx.post(url + path, json={**base, **body}, timeout=30)
  assert r.status_code == 400, r.text
  err = r.json()["error"]
  assert err["param"] == field and field in err["message"]
  if body.get(field) in (6, -1):
    assert "0 .. 5" in err["message"], err["message"]
