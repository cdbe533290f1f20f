"""`predict --serving`'s library: the modelled serving figures of a Plan at a list of rates.

Each rate runs serving/simulate over the scenario's seeded stream, in each mode, with the pool
the planner gives the Plan (placement/kv_blocks.serving_pool) unless kv_blocks says otherwise.
Also here: the published H100 rows beside their predictions (cost/published_gpu), and the
seed's question under load: baseline (tp x pp) against layer-wise on the same devices.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from jaxpart import config
from jaxpart.cost import published_gpu
from jaxpart.cost.forward import SCORER
from jaxpart.cost.params import DEFAULT, ModelParams
from jaxpart.cost.serving_step import StepCost
from jaxpart.placement import planner
from jaxpart.placement.kv_blocks import DEFAULT_BLOCK_TOKENS, serving_pool
from jaxpart.serving import simulate, workload
from jaxpart.serving.kv_pages import check_pool_fits
from jaxpart.serving.scheduler import MODES

DEFAULT_REQUESTS = 200   # a modelling choice: enough for a p99 of ITL gaps, a few seconds to run


@dataclass(frozen=True)
class ServeModelOptions:
  """The scheduler (slots S, prompt tokens a step C, modes), the stream (scenario, requests,
  seed) and the pool (kv_blocks None: the planner's)."""
  slots: int
  chunk_tokens: int
  modes: tuple[str, ...] = MODES
  requests: int = DEFAULT_REQUESTS
  scenario: str = "poisson"
  seed: int = 0
  kv_blocks: int | None = None
  block_tokens: int = DEFAULT_BLOCK_TOKENS

  def __post_init__(self):
    for name in ("slots", "chunk_tokens", "requests", "block_tokens"):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise simulate.SimulationError(f"--{name.replace('_', '-')} = {v!r}: must be a "
                                       f"positive integer")
    bad = [m for m in self.modes if m not in MODES]
    if bad or not self.modes:
      raise simulate.SimulationError(f"--mode = {bad or self.modes!r}: valid modes are "
                                     f"{', '.join(MODES)}")
    if self.scenario not in workload.SCENARIOS:
      raise simulate.SimulationError(f"--scenario = {self.scenario!r}: valid scenarios are "
                                     f"{', '.join(workload.SCENARIOS)}")


def check_rates(rates) -> tuple[float, ...]:
  if not rates:
    raise simulate.SimulationError("--serving needs --rate R or --rates R1,R2,... (requests/s)")
  for r in rates:
    if not r > 0:
      raise simulate.SimulationError(f"--rate = {r!r}: rates are positive requests per second")
  return tuple(float(r) for r in rates)


def pool_for(setup, plan, opts: ServeModelOptions, mode: str) -> dict:
  """The mode's pool: the planner's for its step (S + C tokens chunked, the largest prefill
  bucket, the context, continuous), or opts.kv_blocks; refused if it cannot hold a sequence."""
  context = setup.run.seq
  step = opts.slots + opts.chunk_tokens if mode == "chunked" else max(opts.slots, context)
  pool = serving_pool(setup.model, setup.run, plan, setup.hardware.hbm_bytes, context, step,
                      opts.block_tokens)
  if opts.kv_blocks is not None:
    pool = {**pool, "blocks": opts.kv_blocks, "tokens": opts.kv_blocks * opts.block_tokens,
            "given": True}
    check_pool_fits(opts.kv_blocks, opts.block_tokens, context)
  else:
    check_pool_fits(pool["blocks"], opts.block_tokens, context,
                    field=f"the KV pool the planner leaves per device ({mode} step of {step} "
                          f"tokens, {pool['bytes_left'] / 1e9:.3g} GB left) in blocks")
  return pool


def _mode_run(cost, setup, pool, opts, mode, requests, slos) -> dict:
  sim_opts = simulate.SimOptions(opts.slots, opts.chunk_tokens, setup.run.seq, mode,
                                 pool["blocks"], opts.block_tokens)
  return simulate.metrics(simulate.run(cost, requests, sim_opts), slos["ttft_s"], slos["itl_s"])


def predict_serving(setup, plan, rates, opts: ServeModelOptions, requests_for=None,
                    params: ModelParams = DEFAULT, slos: dict | None = None) -> dict:
  """Modelled TTFT/ITL/throughput/goodput per rate and mode. requests_for(rate) gives the
  stream (default: the scenario's, seeded). SLOs: as given, else the issue's defaults from the
  unloaded figures of the first mode, for a median prompt and output of the stream."""
  rates = check_rates(rates)
  context = setup.run.seq
  cost = StepCost(setup, plan, opts.block_tokens, params)
  requests_for = requests_for or (lambda r: workload.make(
      opts.scenario, opts.requests, r, context, setup.model.vocab, opts.seed))
  pools = {m: pool_for(setup, plan, opts, m) for m in opts.modes}
  sample = requests_for(rates[0])
  prompt = sorted(len(r.prompt) for r in sample)[len(sample) // 2]
  output = sorted(r.params.max_tokens for r in sample)[len(sample) // 2]
  m0 = opts.modes[0]
  u = simulate.unloaded(cost, prompt, output, simulate.SimOptions(
      opts.slots, opts.chunk_tokens, context, m0, pools[m0]["blocks"], opts.block_tokens))
  slos = slos or simulate.default_slos(u)
  out = {}
  for rate in rates:
    reqs = requests_for(rate)
    out[f"{rate:g}"] = {m: _mode_run(cost, setup, pools[m], opts, m, reqs, slos)
                        for m in opts.modes}
  return {"preset": setup.preset, "hardware": setup.hardware.name, "plan": plan.to_dict(),
          "context": context, "options": dataclasses.asdict(opts), "pool": pools,
          "unloaded": {**u, "mode": m0, "prompt": prompt, "output": output}, "slo": slos,
          "rates": out}


def published(opts: ServeModelOptions, params: ModelParams = DEFAULT) -> dict:
  """Each published online row predicted on its own setup and workload, with the ratio."""
  rows = []
  for row in published_gpu.ROWS:
    setup = config.load_setup(preset=row.preset, hardware=row.hardware)
    plan = planner.make_plan(setup, row.devices, "baseline", tp=row.tp, pp=1, scorer=SCORER)
    o = dataclasses.replace(opts, requests=row.requests, kv_blocks=None)
    pred = predict_serving(setup, plan, (row.rate,), o, lambda r, row=row: simulate.
                           fixed_requests(row.requests, r, row.prompt, row.output, o.seed),
                           params)
    for mode, m in pred["rates"][f"{row.rate:g}"].items():
      got = {"mean_ttft_s": m["ttft_s"]["mean"], "mean_itl_s": m["itl_s"]["mean"]}
      rows.append({"id": row.id, "what": row.what, "source": row.source, "mode": mode,
                   "rate": row.rate, "workload": f"{row.prompt} in / {row.output} out, "
                   f"{row.requests} requests", "figures": {
                       k: {"published": v, "predicted": got[k], "ratio": got[k] / v}
                       for k, v in row.figures.items()}})
  return {"rows": rows, "not_expressed": dict(published_gpu.NOT_EXPRESSED)}


def compare_placements(setup, plans: dict, rates, opts: ServeModelOptions,
                       params: ModelParams = DEFAULT) -> dict:
  """The seed's question under load: each named Plan (baseline, layerwise) at the same rates,
  stream and SLOs (the first plan's); per rate and mode which has the lower TTFT and ITL p99
  and the higher goodput, and the unloaded decode step that explains it."""
  names = list(plans)
  first = predict_serving(setup, plans[names[0]], rates, opts, params=params)
  preds = {names[0]: first}
  for name in names[1:]:
    preds[name] = predict_serving(setup, plans[name], rates, opts, params=params,
                                  slos=first["slo"])
  verdicts = []
  for rate in first["rates"]:
    for mode in opts.modes:
      ms = {n: preds[n]["rates"][rate][mode] for n in names}
      best = {
          "ttft_p99": min(names, key=lambda n: ms[n]["ttft_s"]["p99"]),
          "itl_p99": min(names, key=lambda n: ms[n]["itl_s"]["p99"]),
          # every plan is held to the first plan's SLOs: the same bar for both
          "goodput": max(names, key=lambda n: ms[n]["goodput_req_s"]),
      }
      verdicts.append({"rate": rate, "mode": mode, "better": best,
                       "figures": {n: {"ttft_p99_s": ms[n]["ttft_s"]["p99"],
                                       "itl_p99_s": ms[n]["itl_s"]["p99"],
                                       "throughput_tok_s": ms[n]["throughput_tok_s"],
                                       "goodput_req_s": ms[n]["goodput_req_s"]}
                                   for n in names}})
  why = {n: {"stages": preds[n]["plan"]["stages"], "tp": preds[n]["plan"]["tp"],
             "unloaded_decode_step_s": preds[n]["unloaded"]["decode_step_s"],
             "unloaded_ttft_s": preds[n]["unloaded"]["ttft_s"],
             "pool_tokens": preds[n]["pool"][opts.modes[0]]["tokens"]} for n in names}
  return {"preset": setup.preset, "hardware": setup.hardware.name, "slo": first["slo"],
          "predictions": preds, "verdicts": verdicts, "why": why}

