"""Open-loop load test of `jaxpart serve`, as vLLM's benchmark_serving: Poisson arrivals at a
given rate, streaming clients, text prompts with the serving workload's lengths (lognormal
prompts and outputs, serving/workload.py). Reports client-side throughput, TTFT and ITL (mean,
p50, p99) beside the server's own /metrics over the same interval.

  python scripts/serve_load.py --model-dir DIR [--devices 2 --strategy layerwise] \
      --rate 4 --requests 40            # starts a server on a free loopback port, then stops it
  python scripts/serve_load.py --url http://127.0.0.1:8000 --rate 4 --requests 40

Loopback only; bounded by --requests and --max-seconds. The client shares the machine with
the server: on a small CPU box its own work is part of the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np

from jaxpart.serving import workload
from jaxpart.serving.text import TextModel

ROOT = Path(__file__).resolve().parents[1]
SERIES = {"ttft": "jaxpart_time_to_first_token_seconds",
          "itl": "jaxpart_inter_token_latency_seconds",
          "http": "jaxpart_http_overhead_seconds"}


def _stats(xs) -> dict:
  a = np.asarray(xs, float)
  if not a.size:
    return {"mean": float("nan"), "p50": float("nan"), "p99": float("nan"), "n": 0}
  return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
          "p99": float(np.percentile(a, 99)), "n": int(a.size)}


def _scrape(url: str) -> dict:
  """{series: (sum, count, [(le, cumulative count)])} of the latency histograms."""
  out = {k: [0.0, 0.0, []] for k in SERIES}
  for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
    for k, name in SERIES.items():
      if line.startswith(name + "_sum "):
        out[k][0] = float(line.split()[1])
      elif line.startswith(name + "_count "):
        out[k][1] = float(line.split()[1])
      elif line.startswith(name + "_bucket{"):
        le = line.split('le="')[1].split('"')[0]
        out[k][2].append((float(le), float(line.split()[1])))
  return out


def _server_stats(before: dict, after: dict) -> dict:
  """Mean and p50 (linear within the bucket, as Prometheus' histogram_quantile) per series."""
  res = {}
  for k in SERIES:
    s = after[k][0] - before[k][0]
    n = after[k][1] - before[k][1]
    buckets = [(le, c1 - c0) for (le, c1), (_, c0) in zip(after[k][2], before[k][2])]
    p50, lo, prev = float("nan"), 0.0, 0.0
    for le, c in buckets:
      if n and c >= n / 2:
        p50 = lo + (le - lo) * (n / 2 - prev) / max(c - prev, 1e-12) if le != float("inf") \
            else lo
        break
      lo, prev = le, c
    res[k] = {"mean": s / n if n else float("nan"), "p50": p50, "n": int(n)}
  return res


async def _one(client, url, model, prompt, max_tokens, t_send, record):
  await asyncio.sleep(max(0.0, t_send - time.perf_counter()))
  t0, times, n = time.perf_counter(), [], 0
  body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
          "temperature": 0, "ignore_eos": True, "stream_options": {"include_usage": True}}
  async with client.stream("POST", url + "/v1/completions", json=body) as r:
    if r.status_code != 200:
      record.append({"status": r.status_code})
      return
    async for line in r.aiter_lines():
      if line.startswith("data: {"):
        chunk = json.loads(line[6:])
        if chunk["choices"] and chunk["choices"][0]["text"]:
          times.append(time.perf_counter())
        n = (chunk.get("usage") or {}).get("completion_tokens", n)
  record.append({"status": 200, "ttft": times[0] - t0 if times else None,
                 "itl": list(np.diff(times)), "tokens": n, "end": time.perf_counter()})


async def _run_load(url, model, prompts, rate, seed, max_s) -> tuple[list, float]:
  rng = np.random.default_rng(seed)
  t0 = time.perf_counter() + 0.1
  arrivals = t0 + np.cumsum(rng.exponential(1.0 / rate, len(prompts)))
  record: list = []
  async with httpx.AsyncClient(timeout=max_s) as client:
    tasks = [asyncio.create_task(_one(client, url, model, p, m, a, record))
             for (p, m), a in zip(prompts, arrivals)]
    done, pending = await asyncio.wait(tasks, timeout=max_s)
    for t in pending:
      t.cancel()
  return record, t0


def _prompts(text: TextModel, n: int, context: int, seed: int) -> list[tuple[str, int]]:
  """Text prompts and max_tokens with the workload's lengths (ids drawn, then decoded)."""
  reqs = workload.poisson(n, 1.0, context, text.vocab_size, seed)
  rng = np.random.default_rng(seed + 1)
  special = set(text.tokenizer.get_added_tokens_decoder())
  ids = [i for i in range(text.vocab_size) if i not in special]
  out = []
  for r in reqs:
    s = text.decode(rng.choice(ids, len(r.prompt)).tolist())
    room = context - len(text.encode(s)) - 1
    out.append((s, max(1, min(r.params.max_tokens, room))))
  return out


def _start_server(args) -> tuple[subprocess.Popen, str]:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  cmd = [sys.executable, "-m", "jaxpart", "serve", "--model-dir", args.model_dir, "--devices",
         str(args.devices), "--strategy", args.strategy, "--port", str(port), *args.serve_args]
  proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)})
  url, t0 = f"http://127.0.0.1:{port}", time.monotonic()
  while time.monotonic() - t0 < 300 and proc.poll() is None:
    try:
      if httpx.get(url + "/health", timeout=2).status_code == 200:
        return proc, url
    except httpx.TransportError:
      pass
    time.sleep(0.5)
  proc.kill()
  raise SystemExit("serve_load: error: the server did not become healthy in 300 s")


def _report(record, t0, before, after, rate) -> dict:
  ok = [r for r in record if r["status"] == 200]
  wall = max((r["end"] for r in ok), default=t0) - t0
  client = {"ttft": _stats([r["ttft"] for r in ok if r["ttft"] is not None]),
            "itl": _stats([x for r in ok for x in r["itl"]])}
  server = _server_stats(before, after)
  toks = sum(r["tokens"] for r in ok)
  print(f"rate {rate}/s: {len(ok)}/{len(record)} requests ok, {toks} output tokens in "
        f"{wall:.2f} s = {toks / max(wall, 1e-9):.1f} tok/s (client and server share this "
        f"machine's {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f})")
  print(f"{'':6} {'client mean':>12} {'p50':>9} {'p99':>9} | {'server mean':>12} {'p50':>9}"
        f" | mean/p50 within 10%")
  for k in ("ttft", "itl"):
    c, s = client[k], server[k]
    agree = all(abs(c[q] - s[q]) <= 0.1 * max(abs(s[q]), 1e-12) for q in ("mean", "p50"))
    print(f"{k:6} {c['mean'] * 1e3:10.2f}ms {c['p50'] * 1e3:7.2f}ms {c['p99'] * 1e3:7.2f}ms |"
          f" {s['mean'] * 1e3:10.2f}ms {s['p50'] * 1e3:7.2f}ms | {'yes' if agree else 'NO'}")
  h = server["http"]
  print(f"server-side time outside the engine (HTTP, tokenization, streaming): mean "
        f"{h['mean'] * 1e3:.2f} ms, p50 {h['p50'] * 1e3:.2f} ms over {h['n']} requests")
  return {"rate": rate, "requests": len(record), "ok": len(ok), "output_tokens": toks,
          "wall_s": wall, "throughput_tok_s": toks / max(wall, 1e-9), "client": client,
          "server": server, "load": os.getloadavg()}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--url", default=None, help="a running server (loopback only)")
  p.add_argument("--model-dir", required=True, help="the model directory (its tokenizer)")
  p.add_argument("--devices", type=int, default=2)
  p.add_argument("--strategy", default="layerwise")
  p.add_argument("--serve-args", nargs=argparse.REMAINDER, default=[],
                 help="further `jaxpart serve` flags (last on the line)")
  p.add_argument("--rate", type=float, default=4.0, help="requests per second (Poisson)")
  p.add_argument("--requests", type=int, default=40)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--max-seconds", type=float, default=300.0)
  p.add_argument("--json", default=None, metavar="OUT")
  args = p.parse_args(argv)
  if not 0 < args.requests <= 10_000 or not args.rate > 0:
    raise SystemExit("serve_load: error: --requests in 1..10000 and --rate > 0")
  if args.url and urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
    raise SystemExit(f"serve_load: error: --url {args.url}: loopback only")
  proc, url = (None, args.url.rstrip("/")) if args.url else _start_server(args)
  try:
    info = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]
    prompts = _prompts(TextModel(args.model_dir), args.requests, info["max_model_len"],
                       args.seed)
    before = _scrape(url)
    record, t0 = asyncio.run(_run_load(url, info["id"], prompts, args.rate, args.seed,
                                       args.max_seconds))
    out = _report(record, t0, before, _scrape(url), args.rate)
  finally:
    if proc is not None:
      proc.terminate()
      proc.wait(60)
  if args.json:
    Path(args.json).write_text(json.dumps(out, indent=2))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
