"""`jaxpart serve-bench`: static, continuous and chunked serving of a seeded request stream on one
placement, interleaved in one process (measure/serve_bench.py does the work)."""

from __future__ import annotations

import sys

from jaxpart import config
from jaxpart.commands import _common
from jaxpart.commands._common import table
from jaxpart.cost import forward as costmodel
from jaxpart.measure import serve_bench
from jaxpart.placement import planner
from jaxpart.serving import workload

NAME = "serve-bench"
HELP = ("serve a seeded request stream three ways (static batches, continuous batching, chunked "
        "prefill) on one placement: TTFT, ITL, throughput and goodput against request rate")


def _rates(text: str) -> tuple[float, ...]:
  try:
    out = tuple(float(t) for t in text.split(",") if t.strip())
  except ValueError:
    out = ()
  if not out or any(not r > 0 or r == float("inf") for r in out):
    raise serve_bench.ServeBenchError(f"--rates = {text!r}: a comma-separated list of request "
                                      f"rates per second, each > 0, for example 0.5,1,2")
  return out


def add_arguments(p):
  _common.add_setup_args(p, default_preset="llama-tiny")
  g = p.add_argument_group("placement")
  g.add_argument("--devices", type=int, default=16)
  g.add_argument("--strategy", default="layerwise", choices=("baseline", "layerwise", "auto"))
  g.add_argument("--tp", type=int, default=None, help="tensor-parallel degree")
  g.add_argument("--pp", type=int, default=None, help="pipeline stages (baseline)")
  g = p.add_argument_group("workload and scheduler")
  g.add_argument("--scenario", default="all", choices=workload.SCENARIOS + ("all",))
  g.add_argument("--rates", default="1", metavar="R1,R2,...", help="requests per second")
  g.add_argument("--requests", type=int, default=100, help="requests per stream")
  g.add_argument("--seed", type=int, default=0, help="stream and parameter seed")
  g.add_argument("--slots", type=int, default=8, help="sequence slots S (static batch size)")
  g.add_argument("--chunk-tokens", type=int, default=256, help="prompt tokens per step C")
  g.add_argument("--kv-blocks", type=int, default=None,
                 help="paged pool size in blocks (default: every slot holds a whole context)")
  g.add_argument("--slo-ttft-s", type=float, default=None,
                 help="TTFT target (default: 5x the unloaded TTFT, measured at the start)")
  g.add_argument("--slo-itl-s", type=float, default=None,
                 help="ITL target (default: 2x the unloaded decode step)")
  g.add_argument("--png", default=None, metavar="OUT.png", help="latency against rate per mode")
  _common.add_json_arg(p, to_file=True)


def run(args) -> int:
  opts = serve_bench.ServeBenchOptions(
      scenarios=workload.SCENARIOS if args.scenario == "all" else (args.scenario,),
      rates=_rates(args.rates), requests=args.requests, seed=args.seed, slots=args.slots,
      chunk_tokens=args.chunk_tokens, kv_blocks=args.kv_blocks, slo_ttft_s=args.slo_ttft_s,
      slo_itl_s=args.slo_itl_s)
  setup = _common.setup_from(args)
  serve_bench.pool_blocks(opts, serve_bench.context_of(setup))   # refuse a bad pool up front
  fixed = {k: v for k, v in (("tp", args.tp), ("pp", args.pp)) if v is not None}

  def plan_for(s: config.Setup):
    return planner.make_plan(s, args.devices, args.strategy, scorer=costmodel.SCORER, **fixed)

  record, _ = serve_bench.run(setup, plan_for, opts)
  if args.png:
    serve_bench.plot(record, args.png)
    print(f"wrote {args.png}", file=sys.stderr)
  if args.json:
    _common.emit_json(record, args.json)
    if args.json == "-":
      return 0
  print_table(record)
  return 0


def print_table(record: dict) -> None:
  plan, slo = record["plan"], record["slo"]
  print(f"{record['preset']}: {plan['strategy']} on {plan['devices']} devices "
        f"({plan['stages']} stages x tp {plan['tp']}); SLO TTFT <= {slo['ttft_s'] * 1e3:.1f} ms, "
        f"ITL <= {slo['itl_s'] * 1e3:.1f} ms")
  if record["load"]["under_load"]:
    print(f"every time below was {record['load']['note']}")
  ms = lambda v: "-" if v is None else f"{v * 1e3:,.1f}"  # noqa: E731
  rows = []
  for sc, doc in record["scenarios"].items():
    for rate, modes in doc["rates"].items():
      for mode, m in modes.items():
        stall = (m["itl_s"]["p99"] / m["itl_decode_only_p50_s"]
                 if m["itl_s"]["p99"] and m["itl_decode_only_p50_s"] else None)
        rows.append([sc, rate, mode, f"{m['throughput_tok_s']:,.1f}", ms(m["ttft_s"]["p50"]),
                     ms(m["ttft_s"]["p99"]), ms(m["itl_s"]["p50"]), ms(m["itl_s"]["p99"]),
                     ms(m["itl_decode_only_p50_s"]), "-" if stall is None else f"{stall:.2f}",
                     f"{m['goodput_req_s']:.2f}", f"{m['kv_waste']:.3f}", m["preemptions"],
                     f"{m['host_gap_fraction']:.3f}", f"{m['load']['before']['load_1m']:.1f}"])
  print(table(rows, ["scenario", "rate", "mode", "out tok/s", "TTFT p50 ms", "TTFT p99 ms",
                     "ITL p50 ms", "ITL p99 ms", "ITL dec-only p50", "ITL p99/dec p50",
                     "goodput req/s", "kv_waste", "preempt", "host gap", "load"]))
