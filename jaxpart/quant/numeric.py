"""Quantize and dequantize one matrix in NumPy, per format (jaxpart/quantspec.py).

Host-side, so checkpoint conversion, parameter quantization and the tests' float64 oracle all
use these same numbers; the JAX side (jaxpart/quant/) only dequantizes inside its matmuls.
Scales map each group's absolute maximum onto the element's largest finite value
(quantspec.ELEMENT_MAX); an all-zero group gets scale 1 so nothing divides by zero.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from jaxpart.quantspec import ELEMENT_MAX, WeightFormat

STORED = {"int8": np.int8, "int4": np.int8, "float8_e4m3fn": ml_dtypes.float8_e4m3fn}


def _expand(scale_GxH, fmt: WeightFormat, rows: int, cols: int) -> np.ndarray:
  """Scales repeated to one per element (block and group tiles), cropped to rows x cols."""
  if fmt.scale in ("block", "group"):
    scale_GxH = np.repeat(scale_GxH, fmt.block, axis=0)
    if fmt.scale == "block":
      scale_GxH = np.repeat(scale_GxH, fmt.block, axis=1)
  return np.broadcast_to(scale_GxH[:rows, :cols], (rows, cols))


def _absmax(w_RxC: np.ndarray, fmt: WeightFormat) -> np.ndarray:
  """Absolute maximum over each scale's group, shaped fmt.scale_shape(rows, cols)."""
  a = np.abs(w_RxC.astype(np.float64))
  rows, cols = a.shape
  if fmt.scale == "channel":
    return a.max(axis=0, keepdims=True)
  if fmt.scale == "tensor":
    return a.max(keepdims=True).reshape(1, 1)
  gr, gc = fmt.scale_shape(rows, cols)
  block_c = fmt.block if fmt.scale == "block" else 1
  padded = np.zeros((gr * fmt.block, gc * block_c))
  padded[:rows, :cols] = a
  return padded.reshape(gr, fmt.block, gc, block_c).max(axis=(1, 3))


def quantize(w_RxC: np.ndarray, fmt: WeightFormat) -> tuple[np.ndarray, np.ndarray]:
  """(stored elements rows x cols, float32 scales of fmt.scale_shape) for one matrix."""
  if not fmt.quantized:
    raise ValueError(f"format {fmt.name!r} stores no quantized elements")
  if w_RxC.ndim != 2:
    raise ValueError(f"quantize takes one rows x cols matrix, got shape {w_RxC.shape}")
  top = ELEMENT_MAX[fmt.element]
  amax = _absmax(w_RxC, fmt)
  scale = np.where(amax > 0, amax / top, 1.0).astype(np.float32)
  x = w_RxC.astype(np.float64) / _expand(scale.astype(np.float64), fmt, *w_RxC.shape)
  if fmt.element in ("int8", "int4"):
    q = np.clip(np.rint(x), -top - 1 if fmt.element == "int4" else -top, top)
    return q.astype(np.int8), scale
  return np.clip(x, -top, top).astype(np.float32).astype(STORED[fmt.element]), scale


def dequantize(q_RxC: np.ndarray, scale: np.ndarray, fmt: WeightFormat,
               dtype=np.float64) -> np.ndarray:
  """The matrix the stored elements and scales stand for, in dtype (float64: the oracle)."""
  rows, cols = q_RxC.shape
  return (q_RxC.astype(np.float64)
          * _expand(np.asarray(scale, np.float64), fmt, rows, cols)).astype(dtype)


def quantize_stacked(w_LxRxC: np.ndarray, fmt: WeightFormat) -> tuple[np.ndarray, np.ndarray]:
  """quantize() per layer of a stacked L x rows x cols leaf: (L x rows x cols, L x scale)."""
  pairs = [quantize(np.asarray(w), fmt) for w in w_LxRxC]
  return np.stack([q for q, _ in pairs]), np.stack([s for _, s in pairs])
