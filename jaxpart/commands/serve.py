"""`jaxpart serve`: an OpenAI-compatible HTTP server over a placed model (serving/server.py).

Thin: reads the model directory (weights, tokenizer, chat template), places the model with the
usual placement flags, compiles the serving step, starts the engine thread and runs uvicorn
until SIGTERM or Ctrl-C (exit 0 once drained).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import jax.numpy as jnp

from jaxpart import config
from jaxpart.commands import _common
from jaxpart.commands.forward import add_model_args, load_model
from jaxpart.serving.kv_pages import DEFAULT_BLOCK_TOKENS
from jaxpart.serving.metrics import ServerMetrics
from jaxpart.serving.online import EngineOptions, OnlineEngine
from jaxpart.serving.server import ServeOptions, make_app, serve
from jaxpart.serving.step import Stepper
from jaxpart.serving.text import TextModel

NAME = "serve"
HELP = "serve a model directory over OpenAI's HTTP API (completions, chat, streaming, metrics)"
DEFAULT_CONTEXT = 2048


def add_arguments(p):
  p.add_argument("--model-dir", required=True, metavar="DIR",
                 help="Hugging Face model directory (Llama family) with tokenizer.json")
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--served-model-name", default=None,
                 help="the model name clients give (default: the directory's name)")
  p.add_argument("--slots", type=int, default=8, help="sequences decoding at once")
  p.add_argument("--prefill-chunk", type=int, default=64,
                 help="prompt tokens per engine step (chunked prefill)")
  p.add_argument("--max-context", type=int, default=None,
                 help=f"prompt + output tokens per request (default: the model's, at most "
                      f"{DEFAULT_CONTEXT})")
  p.add_argument("--kv-blocks", type=int, default=None,
                 help=f"KV cache blocks of {DEFAULT_BLOCK_TOKENS} tokens (default: half of "
                      f"slots x context)")
  p.add_argument("--max-waiting", type=int, default=64,
                 help="requests queued beyond it get 503 with Retry-After")
  p.add_argument("--drain-timeout", type=float, default=10.0,
                 help="seconds to finish requests in flight after SIGTERM / SIGINT")
  p.add_argument("--f32", action="store_true", help="run in float32 instead of the model dtype")
  p.add_argument("--hardware", default=None, help="hardware preset for the planner (h100)")
  add_model_args(p)
  _common.add_plan_args(p)


def _check(args) -> None:
  for name in ("port", "slots", "prefill_chunk", "max_context", "kv_blocks", "max_waiting"):
    v = getattr(args, name)
    if v is not None and v <= 0:
      raise config.ConfigError(f"--{name.replace('_', '-')} = {v}: must be a positive integer")
  if not math.isfinite(args.drain_timeout) or args.drain_timeout < 0:
    raise config.ConfigError(f"--drain-timeout = {args.drain_timeout}: must be >= 0 seconds")
  if args.host not in ("127.0.0.1", "localhost", "::1"):
    print(f"jaxpart serve: listening on {args.host}: the API has no authentication",
          file=sys.stderr)


def run(args) -> int:
  _check(args)
  text = TextModel(args.model_dir)           # before the weights: a missing tokenizer is cheap
  cfg, params = load_model(args.model_dir, args.allow_nonfinite)
  context = args.max_context or min(cfg.max_positions or DEFAULT_CONTEXT, DEFAULT_CONTEXT)
  if cfg.max_positions and context > cfg.max_positions:
    raise config.ConfigError(f"--max-context = {context}: the model's max_position_embeddings "
                             f"is {cfg.max_positions}")
  per_seq = -(-context // DEFAULT_BLOCK_TOKENS)
  kv_blocks = args.kv_blocks or max(per_seq, args.slots * per_seq // 2)
  setup = config.Setup(model=cfg, run=config.RunShape(args.slots, context),
                       hardware=config.HARDWARE_PRESETS[args.hardware or "h100"],
                       preset=Path(args.model_dir).name)
  plan = _common.plan_from(args, setup)
  stepper = Stepper(setup, plan, params, kv_blocks, DEFAULT_BLOCK_TOKENS,
                    dtype=jnp.float32 if args.f32 else None)
  opts = EngineOptions(args.slots, args.prefill_chunk, context, kv_blocks,
                       max_waiting=args.max_waiting)
  metrics = ServerMetrics()
  engine = OnlineEngine(stepper, opts, metrics.observe).start()
  name = args.served_model_name or Path(args.model_dir).resolve().name
  app = make_app(engine, text, metrics, name, context)
  print(f"jaxpart serve: {name} ({plan.strategy} on {plan.devices} devices, {args.slots} slots, "
        f"context {context}, {kv_blocks} KV blocks) on http://{args.host}:{args.port}",
        file=sys.stderr, flush=True)
  serve(app, ServeOptions(args.host, args.port, args.drain_timeout, "warning"))
  print("jaxpart serve: stopped", file=sys.stderr, flush=True)
  return 0
