"""PNGs where a curve says more than a table, drawn from the other experiments' JSON.

chunk_sweep.png is drawn by chunk_sweep itself (measured GPU points beside the model); this
draws the rest: working set and modelled tokens/s against chunk length with the L2 line,
modelled throughput against devices for both placements (strong and weak scaling), and a
roofline placing each modelled step. Needs matplotlib (the `plot` extra).
"""

from __future__ import annotations

from experiments import common

NAME = "plots"
TITLE = "Plots of the modelled figures"
NEEDS = ("chunk_sweep", "sec7_scaling", "sec4_throughput")
COLORS = {"baseline": "tab:blue", "layerwise": "tab:orange", "h100": "tab:green",
          "h200": "tab:purple"}


def hardware(name: str):
  return common.paper(name).hardware


def draw_chunk_working_set(fig, sweep: dict) -> None:
  """Left: working set per device against chunk tokens, the L2 as a line; right: modelled
  tokens/s of one layer step per device (tp 4, with its all-reduces)."""
  ax, ax2 = fig.add_subplot(121), fig.add_subplot(122)
  for hw in ("h100", "h200"):
    pts = sweep["sweeps"][hw]
    c = [p["chunk_tokens"] for p in pts]
    ax.plot(c, [p["working_set_bytes"] / 1e6 for p in pts], marker="o", ms=3,
            color=COLORS[hw], label=f"{hw} working set")
    ax2.plot(c, [1e6 / p["us_per_token"] for p in pts], marker="o", ms=3, color=COLORS[hw],
             label=hw)
    ax.axhline(hardware(hw).l2_bytes / 1e6, ls="--", color=COLORS[hw], alpha=0.6,
               label=f"{hw} L2 ({hardware(hw).l2_bytes / 1e6:.0f} MB)")
    over = sweep["sweeps"][hw + "_thresholds"]["first_chunk_overflowing_l2"]
    if over:
      ax2.axvline(over, ls="--", color=COLORS[hw], alpha=0.4)
  for a in (ax, ax2):
    a.set_xscale("log", base=2)
    a.set_xlabel("chunk tokens (1 row)")
  ax.set_yscale("log")
  ax.set_ylabel("working set per device, MB")
  ax.set_title("working set vs L2", fontsize=9)
  ax.legend(fontsize=7)
  ax2.set_ylabel("modelled tokens/s, one layer step")
  ax2.set_title("dashed: chunk leaves the L2", fontsize=9)
  ax2.legend(fontsize=7)


def draw_scaling(fig, scaling: dict) -> None:
  """Modelled tokens/s against devices: strong (paper model, 2..16 devices) and weak (layers
  and devices grown together)."""
  ax, ax2 = fig.add_subplot(121), fig.add_subplot(122)
  strong = scaling["strong"]
  devs = sorted(strong, key=int)
  for name in ("baseline", "layerwise"):
    ax.plot([int(d) for d in devs], [strong[d][name]["prediction"]["tokens_per_s"] for d in devs],
            marker="o", color=COLORS[name], label=name)
    weak = sorted(scaling["weak"].values(), key=lambda w: (w["devices"], w["layers"]))
    ax2.plot([w["devices"] for w in weak], [w[name]["tokens_per_s"] for w in weak], marker="o",
             ls="", color=COLORS[name], label=name)
    for w in weak:
      ax2.annotate(f"{w['layers']}L", (w["devices"], w[name]["tokens_per_s"]), fontsize=6,
                   xytext=(3, 2), textcoords="offset points")
  for a, title in ((ax, "strong scaling (paper, 4 layers)"),
                   (ax2, "weak scaling (layers per point)")):
    a.set_xscale("log", base=2)
    a.set_xlabel("devices (H100)")
    a.set_ylabel("modelled tokens/s")
    a.set_title(title, fontsize=9)
    a.legend(fontsize=7)


def draw_roofline(fig, sweep: dict, throughput: dict) -> None:
  """H100 roofline: min(peak, intensity x HBM bandwidth), with each modelled chunk step and
  the seed's two placements (whole run, per device) placed on it."""
  hw = hardware("h100")
  ax = fig.add_subplot(111)
  pts = sweep["sweeps"]["h100"]
  xs = [4.0, hw.peak_flops / hw.hbm_bw, 1e4]   # the roof bends at the ridge
  ax.plot(xs, [min(hw.peak_flops, x * hw.hbm_bw) / 1e12 for x in xs], color="black", lw=1)
  ax.plot([p["intensity"] for p in pts], [p["tflops_no_allreduce"] for p in pts], marker="o",
          ms=3, ls="", color=COLORS["h100"], label="layer-wise step, by chunk")
  for p in pts[::3]:
    ax.annotate(str(p["chunk_tokens"]), (p["intensity"], p["tflops_no_allreduce"]), fontsize=6,
                xytext=(3, -8), textcoords="offset points")
  for name, m in throughput["modelled"].items():
    ax.plot(m["arithmetic_intensity"], m["flops_per_device"] / m["total_s"] / 1e12, marker="*",
            ms=10, ls="", color=COLORS.get(name), label=f"{name}, whole run")
  ax.axvline(hw.peak_flops / hw.hbm_bw, ls=":", color="grey")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("FLOP per HBM byte")
  ax.set_ylabel("TFLOP/s per device (modelled)")
  ax.set_title("H100 roofline (dotted: ridge); chunk tokens beside points", fontsize=9)
  ax.legend(fontsize=7)


PLOTS = (("chunk_working_set.png", lambda d: lambda f: draw_chunk_working_set(f, d["chunk_sweep"])),
         ("scaling.png", lambda d: lambda f: draw_scaling(f, d["sec7_scaling"])),
         ("roofline.png",
          lambda d: lambda f: draw_roofline(f, d["chunk_sweep"], d["sec4_throughput"])))


def run(ctx: common.Context) -> common.Result:
  res = common.Result(NAME, TITLE)
  docs = {n: common.read_result(ctx.results_dir, n) for n in NEEDS}
  missing = [n for n, d in docs.items() if d is None]
  if missing:
    raise RuntimeError(f"plots need {', '.join(m + '.json' for m in missing)} in "
                       f"{common.repo_path(ctx.results_dir)}: run "
                       f"`--only {','.join(missing)},plots` first")
  res.add("Every figure here is modelled (jaxpart.cost.forward, paper preset), drawn from "
          f"{', '.join(n + '.json' for n in NEEDS)}.", "")
  for filename, make in PLOTS:
    common.plot(ctx, res, filename, make(docs), figsize=(10, 4.2))
  res.data = {"plots": list(res.plots)}
  return res
