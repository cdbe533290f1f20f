"""`jaxpart calibrate`: measure this device's GEMM rate and copy bandwidth and write them as a
hardware TOML for `--config`, so predictions use measured rates (jaxpart.calibrate)."""

from __future__ import annotations

import sys

from jaxpart import calibrate, paths
from jaxpart.commands import _common
from jaxpart.config import ConfigError

NAME = "calibrate"
HELP = "measure GEMM rate and memory bandwidth and write a hardware TOML that --config loads"


def add_arguments(p):
  p.add_argument("--out", required=True, metavar="HW.toml", help="the TOML file to write")
  p.add_argument("--hardware", default=None,
                 help="base preset for the fields not measured (default: the device's own)")
  p.add_argument("--sizes", default="256,512,1024,2048", metavar="N1,N2,...",
                 help="square matmul sizes to time")
  p.add_argument("--copy-mb", type=float, default=256.0,
                 help="array size of the bandwidth test, MB (10^6 bytes)")
  p.add_argument("--dtype", default="bfloat16", choices=calibrate.DTYPES)
  p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
  _common.add_json_arg(p)


def run(args) -> int:
  paths.check_output_file("--out", args.out)
  try:
    sizes = [int(t) for t in args.sizes.split(",") if t.strip()]
  except ValueError:
    sizes = []
  if not sizes or any(n <= 0 for n in sizes):
    raise ConfigError(f"--sizes = {args.sizes!r}: must be a comma-separated list of positive "
                      f"integers, for example 256,1024")
  if not args.copy_mb > 0:
    raise ConfigError(f"--copy-mb = {args.copy_mb!r}: must be a positive number of MB")
  result = calibrate.calibrate(sizes, int(args.copy_mb * 1e6), args.dtype, args.repeats,
                               args.hardware)
  with open(args.out, "w") as f:
    f.write(calibrate.toml_text(result))
  print(f"wrote {args.out}", file=sys.stderr)
  if args.json:
    _common.emit_json({**result, "out": args.out})
    return 0
  rows = [[g["n"], f"{g['median_s'] * 1e3:,.3f}", f"{g['flops_per_s'] / 1e9:,.2f}"]
          for g in result["gemm"]]
  print(_common.table(rows, ["n (n^3 matmul)", "median ms", f"GFLOP/s ({args.dtype})"]))
  c = result["copy"]
  print(f"copy: {c['bytes'] / 1e6:,.1f} MB in {c['median_s'] * 1e3:,.3f} ms, "
        f"{c['bytes_per_s'] / 1e9:,.2f} GB/s (read + write)")
  hw = result["hardware"]
  print(f"{args.out}: base {result['base']}, peak_flops {hw['peak_flops']:.3e}, hbm_bw "
        f"{hw['hbm_bw']:.3e}; use it with --config {args.out}")
  if result["load"]["under_load"]:
    print(f"every figure above was {result['load']['note']}")
  return 0
