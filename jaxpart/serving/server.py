"""`jaxpart serve`'s HTTP side: OpenAI's completions and chat API on FastAPI + uvicorn.

The event loop never runs the model: each request is tokenized here, submitted to the
OnlineEngine's thread, and its tokens come back on an asyncio queue, detokenized as they come
(streamed as server-sent events in OpenAI's chunk format, ending `data: [DONE]`). A stop
string is found in the text, as OpenAI defines it, and ends the request with its engine
blocks freed. A streaming client that goes away cancels its request (the generator is closed
and its `finally` cancels), so its blocks are freed by the engine's next step.

SIGTERM / SIGINT: uvicorn stops accepting, waits up to drain_timeout_s for the requests in
flight, then the engine stops; the process exits 0 (a server's Ctrl-C is a normal stop).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import signal
import threading
import time
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from jaxpart.serving import logprobs, protocol
from jaxpart.serving.metrics import CONTENT_TYPE, ServerMetrics
from jaxpart.serving.online import Busy, OnlineEngine
from jaxpart.serving.protocol import ApiError
from jaxpart.serving.requests import RequestError

RETRY_AFTER_S = 1


@dataclass(frozen=True)
class ServeOptions:
  host: str = "127.0.0.1"
  port: int = 8000
  drain_timeout_s: float = 10.0
  log_level: str = "warning"


class _State:
  """What the handlers share: the engine, the text model, the metrics, the draining flag."""

  def __init__(self, engine: OnlineEngine, text, metrics: ServerMetrics, model: str,
               context: int):
    self.engine, self.text, self.metrics, self.model = engine, text, metrics, model
    self.context = context
    self.draining = False
    self.seeds = iter(range(1 << 62))


def _error(e: ApiError) -> JSONResponse:
  return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _tokens(st: _State, g: protocol.Generation, max_tokens: int | None) -> tuple:
  """The prompt's ids and the request's settings with max_tokens filled in."""
  if g.chat:
    ids = st.text.encode_chat([dict(m) for m in g.prompt])
  elif g.prompt_is_text:
    ids = st.text.encode(g.prompt)
  else:
    ids = list(g.prompt)
    bad = [t for t in ids if not 0 <= t < st.text.vocab_size]
    if bad:
      raise ApiError(400, f"prompt holds token id {bad[0]}: ids are 0 .. "
                          f"{st.text.vocab_size - 1}", "prompt")
  if not ids:
    raise ApiError(400, "prompt: encodes to no tokens", "prompt")
  if max_tokens is None:
    max_tokens = max(1, st.context - len(ids))
  if len(ids) + max_tokens > st.context:
    raise ApiError(400, f"prompt of {len(ids)} tokens + max_tokens {max_tokens} = "
                        f"{len(ids) + max_tokens} exceeds the context of {st.context} tokens",
                   "max_tokens")
  return ids, dataclasses.replace(g.params, max_tokens=max_tokens)


async def _deltas(st: _State, rid: int, events: asyncio.Queue, g: protocol.Generation,
                  timing: dict):
  """(text, finish_reason or None, tokens so far, new logprob entries) as tokens arrive; text
  held back while it could still become a stop string (its tokens' entries wait with it).
  Cancels the request however the consumer ends; puts the engine's seconds for it in
  timing["engine_s"]."""
  det, held, n, stops, k = st.text.streamer(), "", 0, g.stop, g.logprobs
  shown, entries = 0, []      # characters the detokenizer has given; entries not yet yielded
  try:
    while True:
      kind, value, t, *lp = await events.get()
      if kind == "end":
        timing["engine_s"] = t
        if value.startswith("error"):
          raise RuntimeError(value)
        yield held, protocol.FINISH.get(value, "stop"), n, entries
        return
      n += 1
      if k is not None and lp[0] is not None:
        entries.append(logprobs.entry(det, value, lp[0], k, shown))
      piece = det.add(value)
      held, shown = held + piece, shown + len(piece)
      hit = min((i for i in (held.find(s) for s in stops) if i >= 0), default=-1)
      if hit >= 0:
        yield held[:hit], "stop", n, entries
        return
      keep = max((j for s in stops for j in range(1, len(s)) if held.endswith(s[:j])),
                 default=0)
      out, held = held[:len(held) - keep], held[len(held) - keep:]
      if out:
        yield out, None, n, entries
        entries = []
  finally:
    timing.setdefault("engine_s", time.perf_counter() - timing["submitted"])
    st.engine.cancel(rid)


def _submit(st: _State, ids: list, params, t_recv: float) -> tuple[int, asyncio.Queue]:
  events: asyncio.Queue = asyncio.Queue()
  if st.draining:
    raise ApiError(503, "the server is shutting down", None, "server_error",
                   {"Retry-After": str(RETRY_AFTER_S)})
  try:
    return st.engine.submit(ids, params, asyncio.get_running_loop(), events, t_recv), events
  except Busy as e:
    raise ApiError(503, str(e), None, "server_error",
                   {"Retry-After": str(RETRY_AFTER_S)}) from None
  except RequestError as e:
    raise ApiError(400, str(e), "max_tokens") from None


async def _handle(st: _State, request: Request, chat: bool):
  t_recv = time.perf_counter()
  body = protocol.parse_json(await request.body())
  parse = protocol.parse_chat if chat else protocol.parse_completion
  g, max_tokens = parse(body, st.model, st.text.eos_ids, next(st.seeds))
  try:
    ids, params = _tokens(st, g, max_tokens)
  except ApiError:
    raise
  except Exception as e:  # the tokenizer or the chat template refused the input
    raise ApiError(400, f"{'messages' if chat else 'prompt'}: {e}",
                   "messages" if chat else "prompt") from None
  timing = {"received": t_recv, "submitted": time.perf_counter()}
  rid, events = _submit(st, ids, params, t_recv)
  name = f"{'chatcmpl' if chat else 'cmpl'}-{rid}"
  stream = _deltas(st, rid, events, g, timing)
  if g.stream:
    return StreamingResponse(_sse(st, g, name, len(ids), stream, timing),
                             media_type="text/event-stream")
  text, finish, n, lps = [], None, 0, []
  async for piece, finish, n, new in stream:
    text.append(piece)
    lps += new
  _overhead(st, timing)
  choice = protocol.choice(chat, "".join(text), finish, delta=False,
                           logprobs=logprobs.shaped(chat, lps if g.logprobs is not None else None))
  return protocol.response(chat, name, st.model, [choice], False,
                           protocol.usage(len(ids), n))


def _overhead(st: _State, timing: dict) -> None:
  """The request's time outside the engine: HTTP, parsing, tokenization, detokenization."""
  total = time.perf_counter() - timing["received"]
  st.metrics.overhead.observe(max(0.0, total - timing.get("engine_s", 0.0)))


async def _sse(st: _State, g: protocol.Generation, name: str, n_prompt: int, stream,
               timing: dict):
  """Server-sent events: one chunk per text piece, the last with finish_reason and usage."""
  def event(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"

  first, asked = True, g.logprobs is not None
  try:
    async for piece, finish, n, new in stream:
      if finish is None or piece or first or new:
        ch = protocol.choice(g.chat, piece, None, delta=True, first=first,
                             logprobs=logprobs.shaped(g.chat, new if asked else None))
        yield event(protocol.response(g.chat, name, st.model, [ch], True, None))
        first = False
      if finish is not None:
        ch = protocol.choice(g.chat, "", finish, delta=True)
        usage = protocol.usage(n_prompt, n)
        yield event(protocol.response(g.chat, name, st.model, [ch], True,
                                      None if g.include_usage else usage))
        if g.include_usage:
          yield event(protocol.response(g.chat, name, st.model, [], True, usage))
    yield "data: [DONE]\n\n"
    _overhead(st, timing)
  finally:
    await stream.aclose()     # the client went away: cancel now, not when collected


def make_app(engine: OnlineEngine, text, metrics: ServerMetrics, model: str,
             context: int) -> FastAPI:
  """The ASGI app over a started engine; the engine is stopped at the app's shutdown."""

  @contextlib.asynccontextmanager
  async def lifespan(app):
    yield
    engine.stop()

  app = FastAPI(title="jaxpart", lifespan=lifespan)
  st = app.state.jaxpart = _State(engine, text, metrics, model, context)

  @app.exception_handler(ApiError)
  async def api_error(request: Request, e: ApiError):
    metrics.http.labels(str(e.status)).inc()
    return _error(e)

  @app.post("/v1/completions")
  async def completions(request: Request):
    return await _handle(st, request, chat=False)

  @app.post("/v1/chat/completions")
  async def chat(request: Request):
    return await _handle(st, request, chat=True)

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": model, "object": "model", "created": 0,
                                        "owned_by": "jaxpart", "max_model_len": context}]}

  @app.get("/health")
  async def health():
    ok = engine.alive() and engine.ready.is_set() and not st.draining
    return JSONResponse({"status": "ok" if ok else "unavailable", "error": engine.error},
                        status_code=200 if ok else 503)

  @app.get("/metrics")
  async def prometheus():
    return Response(metrics.text(), media_type=CONTENT_TYPE)

  return app


class _Server(uvicorn.Server):
  """uvicorn's server without re-raising the signal after a graceful stop: exit 0."""

  def __init__(self, config, state: _State):
    super().__init__(config)
    self.jaxpart = state

  @contextlib.contextmanager
  def capture_signals(self):
    if threading.current_thread() is not threading.main_thread():
      yield
      return

    def stop(sig, frame):
      self.jaxpart.draining = True
      self.force_exit = self.should_exit and sig == signal.SIGINT
      self.should_exit = True

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
      yield
    finally:
      for s, h in old.items():
        signal.signal(s, h)


def serve(app: FastAPI, opts: ServeOptions, ready=None) -> None:
  """Run until SIGTERM / SIGINT (or server.should_exit), draining requests in flight.
  ready(server), if given, is called with the uvicorn server once it listens."""
  config = uvicorn.Config(app, host=opts.host, port=opts.port, log_level=opts.log_level,
                          timeout_graceful_shutdown=opts.drain_timeout_s, lifespan="on")
  server = _Server(config, app.state.jaxpart)
  if ready is not None:
    threading.Thread(target=_when_started, args=(server, ready), daemon=True).start()
  server.run()


def _when_started(server, ready, limit_s: float = 600.0) -> None:
  t0 = time.monotonic()
  while not server.started and time.monotonic() - t0 < limit_s and not server.should_exit:
    time.sleep(0.02)
  if server.started:
    ready(server)
