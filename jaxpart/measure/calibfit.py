"""The fits behind `jaxpart calibrate`: measured microbenchmark times in, hardware fields out.

Pure arithmetic, apart from the timing, so the tests check each fit against times made from
known constants (an oracle that does not share the fitting code).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

GEMM_TERMS = ("call_s", "element_s", "spill_element_s", "seconds_per_flop")


class NoRateError(ValueError):
  """The times do not grow with FLOPs, so no FLOP rate fits them (shapes too small to time)."""


def gemm_features(m: int, k: int, n: int, element_bytes: int, l2_bytes: float
                  ) -> tuple[float, float, float, float]:
  """The GEMM model's terms: one call; elements of its operands and result that fit the L2,
  and of those that do not (each array whole); its FLOPs. As cost/units.gemm_overhead_seconds
  splits them."""
  arrays = (m * k, k * n, m * n)
  small = sum(a for a in arrays if a * element_bytes <= l2_bytes)
  return 1.0, float(small), float(sum(arrays) - small), 2.0 * m * k * n


def gemm_model(fit: dict[str, float], features: Sequence[float]) -> float:
  c, e, s, f = features
  return (fit["call_s"] * c + fit["element_s"] * e + fit["spill_element_s"] * s
          + f / fit["flops_per_s"])


def gemm_fit(features: Sequence[Sequence[float]], seconds: Sequence[float]) -> dict[str, float]:
  """Non-negative least squares of t = call + elements x element + spilled elements x spill
  + FLOPs / rate over gemm_features rows, in relative error (each row divided by its time, so
  the small GEMMs count as much as the large ones). A term whose coefficient comes out
  negative is dropped and the rest refitted; the FLOP term always stays."""
  if len(features) != len(seconds) or len(features) < len(GEMM_TERMS):
    raise ValueError(f"gemm_fit: {len(features)} shapes and {len(seconds)} times; need equal "
                     f"counts of at least {len(GEMM_TERMS)}")
  t = np.asarray(seconds, np.float64)
  if not np.all(np.isfinite(t)) or np.any(t <= 0):
    raise ValueError(f"gemm_fit: times must be positive and finite, got {list(seconds)}")
  a = np.asarray(features, np.float64) / t[:, None]
  flop = len(GEMM_TERMS) - 1
  keep = list(range(len(GEMM_TERMS)))
  for _ in range(len(GEMM_TERMS)):
    sol, *_ = np.linalg.lstsq(a[:, keep], np.ones(len(t)), rcond=None)
    negative = [k for k, v in zip(keep, sol) if v < 0 and k != flop]
    if not negative:
      break
    keep = [k for k in keep if k not in negative]
  coef = np.zeros(len(GEMM_TERMS))
  coef[keep] = sol
  if coef[flop] <= 0:
    raise NoRateError("gemm_fit: no positive FLOP rate fits these times (they do not grow "
                     "with FLOPs); time larger shapes or more repeats")
  fit = {"call_s": float(coef[0]), "element_s": float(coef[1]),
         "spill_element_s": float(coef[2]), "flops_per_s": float(1.0 / coef[flop])}
  pred = np.array([gemm_model(fit, f) for f in features])
  fit["worst_rel_residual"] = float(np.max(np.abs(pred - t) / t))
  return fit


def attention_fit(visits: Sequence[float], scores: Sequence[float], flops: Sequence[float],
                  seconds: Sequence[float], flops_per_s: float) -> dict[str, float]:
  """Attention's time beyond its FLOPs (at the fitted GEMM rate) as visits x visit_s + score
  elements x score_element_s: non-negative least squares in relative error; a negative term
  is dropped and the other refitted."""
  rest = np.array([t - f / flops_per_s for t, f in zip(seconds, flops)], np.float64)
  if len(rest) < 2 or np.any(rest <= 0):
    raise ValueError(f"attention_fit: need two or more shapes whose time exceeds their FLOPs "
                     f"at {flops_per_s:.3g} FLOP/s; got {list(seconds)}")
  a = np.array([visits, scores], np.float64).T / rest[:, None]
  keep = [0, 1]
  for _ in range(2):
    sol, *_ = np.linalg.lstsq(a[:, keep], np.ones(len(rest)), rcond=None)
    if np.all(sol >= 0):
      break
    keep = [k for k, v in zip(keep, sol) if v >= 0] or [1]
  coef = np.zeros(2)
  coef[keep] = np.maximum(sol[:len(keep)], 0)
  return {"visit_s": float(coef[0]), "score_element_s": float(coef[1])}


def link_fit(payloads: Sequence[int], wall_s: Sequence[float], share: float,
             link_fraction: float) -> dict[str, float]:
  """link_bw and link_latency from a transfer's wall time at two payloads. The latency is the
  intercept (what each device waits); the bytes' time per device is the slope times `share`
  (on a host whose cores N devices share, cores / N of the wall time is one device's), read
  through the cost model's formula: bytes / (link_bw x link_fraction)."""
  (b1, b2), (t1, t2) = payloads, wall_s
  if t2 <= t1:
    raise ValueError(f"link_fit: a {b2}-byte transfer took {t2:.3g} s, no longer than a "
                     f"{b1}-byte one ({t1:.3g} s): too noisy to fit a bandwidth")
  slope = (t2 - t1) / (b2 - b1)
  return {"link_bw": float(1.0 / (slope * share * link_fraction)),
          "link_latency": float(max(t1 - slope * b1, 1e-9))}
