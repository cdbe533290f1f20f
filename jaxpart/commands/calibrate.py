"""`jaxpart calibrate`: microbenchmarks (GEMMs, attention, copy, psum) on the
devices present, written as a hardware TOML for `--config`, so predictions use measured rates
(jaxpart.measure.calibrate)."""

from __future__ import annotations

import sys

import jax.numpy as jnp
import numpy as np

from jaxpart import paths
from jaxpart.measure import calibfit
from jaxpart.measure import calibrate
from jaxpart.runtime import sizeguard
from jaxpart.commands import _common
from jaxpart.config import ConfigError

NAME = "calibrate"
HELP = ("measure GEMM, attention, memory and collective costs and write a hardware TOML that "
        "--config loads")


def add_arguments(p):
  p.add_argument("--out", required=True, metavar="HW.toml", help="the TOML file to write")
  p.add_argument("--hardware", default=None,
                 help="base preset for the fields not measured (default: the device's own)")
  p.add_argument("--sizes", default="64,256,1024,4096", metavar="M1,M2,...",
                 help="GEMM rows m to time, each against (k, n) of "
                 + ", ".join(f"{k}x{n}" for k, n in calibrate.GEMM_KN))
  p.add_argument("--copy-mb", type=float, default=None,
                 help="array size of the memory bandwidth test, MB (10^6 bytes); default 8 "
                      "times the L2, the size of a step's arrays that do not fit it")
  p.add_argument("--dtype", default="bfloat16", choices=calibrate.DTYPES)
  p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
  _common.add_json_arg(p)


def _check_sizes(args, sizes: list[int], copy_bytes: int | None) -> None:
  """The largest GEMM's operands and result (and the copy test's two arrays) must fit the
  devices' memory: refused here rather than by XLA running out of it."""
  item = np.dtype(jnp.dtype(args.dtype)).itemsize
  m = max(sizes)
  need, k, n = max(((m * k + k * n + m * n) * item, k, n) for k, n in calibrate.GEMM_KN)
  sizeguard.check_bytes(need, f"--sizes = {args.sizes}",
                        f"the {m:,} x {k} @ {k} x {n} {args.dtype} GEMM",
                        "give smaller sizes, for example 64,256,1024,4096")
  if copy_bytes is not None:
    sizeguard.check_bytes(2 * copy_bytes, f"--copy-mb = {args.copy_mb:g}",
                          "the copy test's source and destination", "give a smaller size")


def run(args) -> int:
  paths.check_output_file("--out", args.out)
  try:
    sizes = [int(t) for t in args.sizes.split(",") if t.strip()]
  except ValueError:
    sizes = []
  if not sizes or any(n <= 0 for n in sizes):
    raise ConfigError(f"--sizes = {args.sizes!r}: must be a comma-separated list of positive "
                      f"integers, for example 256,1024")
  if args.copy_mb is not None and not args.copy_mb > 0:
    raise ConfigError(f"--copy-mb = {args.copy_mb!r}: must be a positive number of MB")
  copy_bytes = None if args.copy_mb is None else int(args.copy_mb * 1e6)
  _check_sizes(args, sizes, copy_bytes)
  result = calibrate.calibrate(sizes, copy_bytes, args.dtype, args.repeats,
                               args.hardware)
  with paths.atomic_file("--out", args.out) as tmp, open(tmp, "w") as f:
    f.write(calibrate.toml_text(result))
  print(f"wrote {args.out}", file=sys.stderr)
  if args.json:
    _common.emit_json({**result, "out": args.out})
    return 0
  fit = result["gemm_fit"]
  rows = [[f"{g['m']}x{g['k']}x{g['n']}", f"{g['median_s'] * 1e6:,.1f}",
           f"{calibfit.gemm_model(fit, g['features']) * 1e6:,.1f}",
           f"{g['flops_per_s'] / 1e9:,.2f}"] for g in result["gemm"]]
  print(f"GEMMs ({args.dtype}, {result['timed']}): fit t = {fit['call_s'] * 1e6:.2f} us + "
        f"elements x {fit['element_s'] * 1e9:.3f} ns (beyond the L2: "
        f"{fit['spill_element_s'] * 1e9:.3f} ns) + FLOPs / {fit['flops_per_s'] / 1e9:.1f} "
        f"GFLOP/s (worst residual {fit['worst_rel_residual']:.0%})")
  print(_common.table(rows, ["m x k x n", "measured us", "fitted us", "GFLOP/s"]))
  print(f"attention: {result['hardware']['score_element_s'] * 1e9:.3f} ns per score element "
        f"beyond its FLOPs, {result['hardware']['attention_visit_s'] * 1e6:.2f} us per (query "
        f"tile, KV block) visited")
  for key, where in (("stream_near", "in the L2"), ("stream", "beyond it")):
    if result[key]:
      c = result[key]
      print(f"elementwise pass ({where}): {c['bytes'] / 1e6:,.2f} MB in "
            f"{c['median_s'] * 1e6:,.1f} us, {c['bytes_per_s'] / 1e9:,.2f} GB/s (read + write)")
  if result["ppermute"]:
    p = result["ppermute"]
    print(f"ppermute among {p['devices']} devices: link_bw {p['link_bw']:.3e} B/s, latency "
          f"{p['link_latency'] * 1e6:.1f} us (per device)")
  print(f"{args.out}: base {result['base']}; use it with --config {args.out}")
  if result["load"]["under_load"]:
    print(f"every figure above was {result['load']['note']}")
  return 0
