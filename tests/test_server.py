"""`jaxpart serve` driven as users drive it: the official openai client for completions, chat
and streaming, raw httpx for bad requests, disconnects, overload, a fuzz run and SIGTERM.

One server (a subprocess on a free loopback port) serves a random llama-tiny model directory
built by scripts/make_tiny_model.py; greedy text through it must equal transformers' generate
token for token. Every loop is bounded in count and time, and the server is always killed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from jaxpart import cli
from jaxpart.serving.text import TextError, TextModel

openai = pytest.importorskip("openai")
ROOT = Path(__file__).resolve().parents[1]
CONTEXT, SLOTS, MAX_WAITING = 256, 2, 3
START_S = 240


def _load_script(name):
  spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  seed = int(np.random.SeedSequence().entropy % 2**31)
  print(f"model seed {seed}")
  d = tmp_path_factory.mktemp("tiny") / "tiny-chat"
  _load_script("make_tiny_model").make(str(d), "llama-tiny", seed)
  return d


@pytest.fixture(scope="module")
def server(model_dir):
  port = _free_port()
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  proc = subprocess.Popen(
      [sys.executable, "-m", "jaxpart", "serve", "--model-dir", str(model_dir), "--devices", "2",
       "--strategy", "layerwise", "--port", str(port), "--f32", "--slots", str(SLOTS),
       "--max-context", str(CONTEXT), "--max-waiting", str(MAX_WAITING), "--prefill-chunk",
       "16", "--drain-timeout", "20"], env=env, stderr=subprocess.PIPE, text=True)
  url = f"http://127.0.0.1:{port}"
  try:
    t0 = time.monotonic()
    while time.monotonic() - t0 < START_S and proc.poll() is None:
      try:
        if httpx.get(url + "/health", timeout=2).status_code == 200:
          break
      except httpx.TransportError:
        pass
      time.sleep(0.5)
    assert proc.poll() is None and httpx.get(url + "/health").status_code == 200, \
        proc.stderr.read() if proc.poll() is not None else "not healthy in time"
    yield proc, url, model_dir.name
  finally:
    if proc.poll() is None:
      proc.kill()
    proc.wait(30)


def _client(url):
  return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)


def _words(rng, n):
  vocab = _load_script("make_tiny_model").WORDS[8:]
  return " ".join(rng.choice(vocab) for _ in range(n))


def _metric(url, name) -> float:
  for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
    if line.startswith(name + " "):
      return float(line.split()[1])
  raise AssertionError(f"{name} not in /metrics")


def _at_rest(url, limit_s=10.0) -> float:
  t0 = time.monotonic()
  while time.monotonic() - t0 < limit_s and _metric(url, "jaxpart_kv_blocks_used") > 0:
    time.sleep(0.05)
  return _metric(url, "jaxpart_kv_blocks_used")


def test_missing_tokenizer_is_one_line_naming_the_file(tmp_path, capsys):
  with pytest.raises(TextError, match=r"tokenizer\.json: missing") as e:
    TextModel(str(tmp_path))
  assert "\n" not in str(e.value)
  assert cli.main(["serve", "--model-dir", str(tmp_path), "--port", str(_free_port())]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("jaxpart serve: error: ") and "tokenizer.json" in err[0]


def test_greedy_text_equals_transformers_generate(server, model_dir):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  _, url, name = server
  rng = random.Random(int(np.random.SeedSequence().entropy % 2**31))
  tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
  client, n = _client(url), rng.randint(3, 8)
  prompt = _words(rng, rng.randint(2, 12))
  msgs = [{"role": "user", "content": _words(rng, rng.randint(1, 6))}]
  for ids, got in (
      (tok(prompt, return_tensors="pt").input_ids,
       client.completions.create(model=name, prompt=prompt, max_tokens=n, temperature=0)),
      (tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                               return_dict=True)["input_ids"],
       client.chat.completions.create(model=name, messages=msgs, max_tokens=n, temperature=0))):
    with torch.no_grad():
      out = hf.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=2,
                        pad_token_id=0)[0, ids.shape[1]:].tolist()
    want = tok.decode(out, skip_special_tokens=True)
    text = got.choices[0].text if hasattr(got.choices[0], "text") else \
        got.choices[0].message.content
    assert text == want, (prompt, msgs, out)
    assert tok.encode(text, add_special_tokens=False) == [t for t in out if t != 2]
    assert got.usage.prompt_tokens == ids.shape[1] and got.usage.completion_tokens == len(out)


def test_streaming_equals_whole_response_and_ends_done(server):
  _, url, name = server
  rng = random.Random(int(np.random.SeedSequence().entropy % 2**31))
  client, n = _client(url), rng.randint(4, 10)
  msgs = [{"role": "user", "content": _words(rng, 4)}]
  whole = client.chat.completions.create(model=name, messages=msgs, max_tokens=n,
                                         temperature=0)
  chunks = list(client.chat.completions.create(model=name, messages=msgs, max_tokens=n,
                                               temperature=0, stream=True))
  text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  assert text == whole.choices[0].message.content
  assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
  assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
  with httpx.stream("POST", url + "/v1/completions", timeout=60, json={
      "model": name, "prompt": _words(rng, 3), "max_tokens": n, "stream": True,
      "stream_options": {"include_usage": True}}) as r:
    lines = [ln for ln in r.iter_lines() if ln]
  assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)
  assert json.loads(lines[-2][6:])["usage"]["completion_tokens"] <= n


def _refused(url, body, status, *words, raw=None):
  r = httpx.post(url + "/v1/completions", timeout=30,
                 **({"content": raw} if raw is not None else {"json": body}))
  assert r.status_code == status, (body, raw, r.text)
  msg = r.json()["error"]["message"]
  for w in words:
    assert str(w) in msg, (w, msg)
  return r


def test_bad_requests_get_4xx_naming_the_field(server):
  _, url, name = server
  rng = random.Random(int(np.random.SeedSequence().entropy % 2**31))
  ok = {"model": name, "prompt": _words(rng, 3), "max_tokens": 2}
  _refused(url, None, 400, "JSON", raw=b'{"model": ' + name.encode())
  _refused(url, {**ok, "max_tokens": str(rng.randint(1, 9))}, 400, "max_tokens")
  _refused(url, {**ok, "temperature": -rng.uniform(0.01, 5)}, 400, "temperature")
  _refused(url, {**ok, "top_p": rng.choice([0, 1 + rng.uniform(0.01, 2)])}, 400, "top_p")
  _refused(url, {**ok, "max_tokens": -rng.randint(0, 5)}, 400, "max_tokens")
  _refused(url, {**ok, "model": name + "-nope"}, 404, name + "-nope")
  _refused(url, {**ok, "logprobs": 6}, 400, "logprobs", "0 .. 5")
  _refused(url, {**ok, "n": 2}, 400, "n = 2")
  prompt = [rng.randint(3, 200) for _ in range(rng.randint(10, 40))]
  big = CONTEXT - len(prompt) + rng.randint(1, 50)
  _refused(url, {**ok, "prompt": prompt, "max_tokens": big}, 400, len(prompt), big, CONTEXT)
  assert httpx.post(url + "/v1/completions", json=ok, timeout=30).status_code == 200


def test_stop_string_and_seed(server):
  """A stop string ends the text just before it (finish_reason stop), streamed or not; a
  seeded sampled request gives the same text twice."""
  _, url, name = server
  rng = random.Random(int(np.random.SeedSequence().entropy % 2**31))
  client, prompt = _client(url), _words(rng, rng.randint(2, 8))
  full = client.completions.create(model=name, prompt=prompt, max_tokens=10, temperature=0,
                                   extra_body={"ignore_eos": True}).choices[0].text
  words = full.split(" ")
  k = next((i for i in range(1, len(words)) if words[i] not in words[:i]), None)
  if k is None:
    pytest.skip(f"no new word after the first in {full!r}")
  stop = " " + words[k]
  want = full[:full.index(stop)]
  got = client.completions.create(model=name, prompt=prompt, max_tokens=10, temperature=0,
                                  stop=[stop], extra_body={"ignore_eos": True})
  assert (got.choices[0].text, got.choices[0].finish_reason) == (want, "stop")
  chunks = list(client.completions.create(model=name, prompt=prompt, max_tokens=10,
                                          temperature=0, stop=stop, stream=True,
                                          extra_body={"ignore_eos": True}))
  assert "".join(c.choices[0].text for c in chunks if c.choices) == want
  seed = rng.randrange(2**31)
  twice = {client.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=1.0,
                                     top_p=0.9, seed=seed, extra_body={"top_k": 20}
                                     ).choices[0].text
           for _ in range(2)}
  assert len(twice) == 1
  assert _at_rest(url) == 0


def test_client_disconnect_mid_stream_frees_blocks(server):
  _, url, name = server
  itl0 = _metric(url, "jaxpart_inter_token_latency_seconds_count")
  max_tokens = CONTEXT - 20
  with httpx.stream("POST", url + "/v1/completions", timeout=60, json={
      "model": name, "prompt": "the time", "max_tokens": max_tokens, "stream": True,
      "temperature": 0.7, "ignore_eos": True}) as r:
    lines = r.iter_lines()
    got = [next(lines) for _ in range(3)]
  assert any(g.startswith("data: ") for g in got)
  assert _at_rest(url) == 0 and _metric(url, "jaxpart_requests_running") == 0
  assert _metric(url, "jaxpart_inter_token_latency_seconds_count") - itl0 < max_tokens - 1


def test_overload_gets_503_with_retry_after(server):
  _, url, name = server
  statuses, lock = [], threading.Lock()

  def one():
    r = httpx.post(url + "/v1/completions", timeout=120, json={
        "model": name, "prompt": "the", "max_tokens": CONTEXT - 4, "temperature": 1.0})
    with lock:
      statuses.append((r.status_code, r.headers.get("retry-after")))

  threads = [threading.Thread(target=one) for _ in range(SLOTS + MAX_WAITING + 6)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(120)
  assert {s for s, _ in statuses} <= {200, 503} and len(statuses) == len(threads)
  assert any(s == 503 and ra for s, ra in statuses) and any(s == 200 for s, _ in statuses)
  assert _at_rest(url) == 0


def _fuzz_body(rng, name):
  fields = {"model": [name, name, "other", 3, None], "prompt": ["the time", [1, 5, 9], [], 7,
            "", ["a", "b"], [10**9], None], "max_tokens": [1, 3, 0, -1, "2", 1.5, 10**6, None],
            "temperature": [0, 0.5, -1, "hot", 1e308, None], "top_p": [0.5, 1, 0, 2, None],
            "top_k": [0, 5, -3, "x"], "seed": [1, -5, "s", 2**70], "stop": [".", ["a", "b"],
            [""], 5, ["a"] * 6], "n": [1, 2, 0], "stream": [False, True, "yes"],
            "logprobs": [None, 1, True], "messages": [[{"role": "user", "content": "hi"}],
            [{"role": 5}], "x", [], [{"role": "user", "content": [{"type": "text",
                                                                    "text": "a"}]}]]}
  body = {k: rng.choice(v) for k, v in fields.items() if rng.random() < 0.5}
  kind = rng.random()
  if kind < 0.15:
    return None, bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 40)))
  if kind < 0.25:
    return None, json.dumps(rng.choice([[1, 2], "s", 3, None])).encode()
  return body, None


def test_fuzz_500_requests_server_stays_up_and_frees_everything(server):
  _, url, name = server
  seed = int(np.random.SeedSequence().entropy % 2**31)
  print(f"fuzz seed {seed}")
  rng, codes, t0 = random.Random(seed), {}, time.monotonic()
  with httpx.Client(timeout=30) as c:
    for i in range(500):
      assert time.monotonic() - t0 < 60, f"fuzz took over 60 s at request {i}"
      body, raw = _fuzz_body(rng, name)
      path = rng.choice(["/v1/completions", "/v1/chat/completions"])
      r = c.post(url + path, **({"content": raw} if raw is not None else {"json": body}))
      codes[r.status_code] = codes.get(r.status_code, 0) + 1
      assert r.status_code in (200, 400, 404, 503), (body, raw, r.text)
      if r.status_code >= 400:
        assert r.json()["error"]["message"]
  print(f"fuzz statuses {codes}")
  assert codes.get(200, 0) > 0 and codes.get(400, 0) > 0
  assert httpx.get(url + "/health").status_code == 200
  assert _at_rest(url) == 0


def test_generate_prompt_and_forward_text_agree_with_the_server(server, model_dir, capsys,
                                                                tmp_path):
  """Runs before the signal test stops the server (file order)."""
  _, url, name = server
  rng = random.Random(int(np.random.SeedSequence().entropy % 2**31))
  prompts, n = [_words(rng, rng.randint(1, 6)) for _ in range(2)], rng.randint(2, 6)
  (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n\n")
  common = ["--model-dir", str(model_dir), "--devices", "2", "--strategy", "layerwise", "--f32"]
  assert cli.main(["generate", *common, "--prompt-file", str(tmp_path / "p.txt"),
                   "--new-tokens", str(n), "--json"]) == 0
  got = json.loads(capsys.readouterr().out)
  for prompt, text in zip(prompts, got["text"]):
    want = _client(url).completions.create(model=name, prompt=prompt, max_tokens=n,
                                           temperature=0).choices[0].text
    assert text == want, prompt
  assert cli.main(["forward", *common, "--text", prompts[0], "--json"]) == 0
  ids = TextModel(str(model_dir)).encode(prompts[0])
  assert json.loads(capsys.readouterr().out)["logits_shape"] == [1, len(ids), 256]
  assert cli.main(["generate", *common, "--prompt", "a", "--input-ids", "x.npy"]) == 2
  assert "give one" in capsys.readouterr().err


def test_signal_drains_in_flight_then_exits_0(server):
  proc, url, name = server
  sig = random.choice([signal.SIGTERM, signal.SIGINT])
  print(f"signal {sig.name}")
  done = {}

  def stream():
    with httpx.stream("POST", url + "/v1/completions", timeout=60, json={
        "model": name, "prompt": "the", "max_tokens": 40, "stream": True, "temperature": 1.0,
        "seed": 3}) as r:
      done["lines"] = [ln for ln in r.iter_lines() if ln]

  t = threading.Thread(target=stream)
  t.start()
  time.sleep(0.3)
  proc.send_signal(sig)
  t.join(60)
  assert proc.wait(30) == 0
  assert done["lines"][-1] == "data: [DONE]"
  with pytest.raises(httpx.TransportError):
    httpx.get(url + "/health", timeout=2)
