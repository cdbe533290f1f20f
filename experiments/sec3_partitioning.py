"""Seed section 3.1: which layers go where, and what the planner chooses on its own."""

from __future__ import annotations

from jaxpart.cost import forward as costmodel
from jaxpart.placement import planner
from experiments import common, sec2_memory

NAME = "sec3_partitioning"
TITLE = "Section 3.1: partitioning"


def run(ctx: common.Context) -> common.Result:
  setup = common.paper()
  plans = common.seed_plans(setup)
  res = common.Result(NAME, TITLE)
  seed_text = {"baseline": "2 pipeline stages x 8-way tensor parallel",
               "layerwise": "4 layers x 4 GPUs each, 1 layer per 4-GPU group"}
  rows, data = [], {"plans": {}}
  for name, plan in plans.items():
    m = sec2_memory.paper_engine(ctx, name) if ctx.measure else None
    compiled = (f"compiled on a {plan.stages} x {plan.tp} (stage, tensor) mesh; "
                f"{common.mb(m['argument_bytes'] - setup.run.tokens * setup.model.d_model * 2)}"
                f" of weights per device" if m else common.NOT_MEASURABLE)
    rows.append([name, seed_text[name],
                 f"{plan.stages} stages x tp {plan.tp}; layers per stage "
                 f"{[list(s) for s in plan.stage_layers]}; {plan.split}", compiled])
    data["plans"][name] = plan.to_dict()
  res.add(*common.md_table(["placement", common.SEED, "jaxpart planner (16 x H100)",
                            common.CPU], rows))
  res.add("The planner reproduces the seed's grid: layer-wise on 16 devices and 4 layers is 4 "
          "stages of one layer, tp 4 inside each. Its chunk is the largest one whose step "
          "working set fits the 50 MB L2, which for this width is "
          f"{plans['layerwise'].rows} row(s) x {plans['layerwise'].chunk_tokens} tokens, not "
          "the seed's 128 x 64 (that chunk's activations alone are 256 MiB).", "")

  best, ranked, how = planner.plan_auto(setup, 16, scorer=costmodel.SCORER)
  res.add(f"## `auto`: every candidate ranked by {how}", "")
  res.add(*common.md_table(
      ["rank", "plan", "predicted seconds for the batch"],
      [[i + 1, common.plan_label(p), f"{s:.4f}"] for i, (s, p) in enumerate(ranked)]))
  data["auto"] = {"how": how, "ranked": [{"score_s": s, "plan": p.to_dict()} for s, p in ranked]}
  res.data = data
  return res
