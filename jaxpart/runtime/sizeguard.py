"""Refuse a model that cannot fit before anything is allocated or traced: XLA aborts the process
(a C++ stack, no Python error) when an allocation fails, and the host can swap for minutes first.

Only lower bounds are compared (exact parameter and input bytes, the engine's own per-device
figures), so a refusal is certain: what passes may still not fit, but what is refused cannot.
"""

from __future__ import annotations

import os
from typing import Iterable

import jax

from jaxpart.placement import memory
from jaxpart.config import Setup
from jaxpart.errors import UserError


class TooLargeError(UserError):
  """The model or run shape cannot fit this machine; the message gives both figures."""


def _fmt(n: float) -> str:
  for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
    if n >= size:
      return f"{n / size:,.1f} {unit}"
  return f"{n:,.0f} B"


def host_memory_bytes() -> int:
  """Physical memory, or the cgroup's limit where one is set lower (containers, CI)."""
  total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  try:
    with open("/sys/fs/cgroup/memory.max") as f:
      text = f.read().strip()
    if text.isdigit():
      total = min(total, int(text))
  except OSError:
    pass
  return total


def device_memory_bytes(device) -> int | None:
  """What the allocator may use on one accelerator; None when JAX does not say (CPU)."""
  try:
    stats = device.memory_stats() or {}
  except Exception:  # noqa: BLE001  (backends without memory stats raise various errors)
    return None
  limit = stats.get("bytes_limit")
  return int(limit) if limit else None


def check_fits(setup: Setup, plans: Iterable, what: str, element_bytes: int | None = None) -> None:
  """TooLargeError unless the host copy of the model and input, and each plan's engine-resident
  bytes per device, fit this machine. element_bytes: the run's dtype width (--f32 is 4)."""
  cfg, run = setup.model, setup.run
  width = max(element_bytes or cfg.dtype_bytes, cfg.dtype_bytes)
  host_need = (cfg.total_params + run.batch * run.seq * cfg.d_model) * width
  host = host_memory_bytes()
  shape = (f"{cfg.layers} layers, d_model {cfg.d_model}, d_ff {cfg.d_ff}, batch {run.batch} x "
           f"seq {run.seq}")
  if host_need > host:
    raise TooLargeError(
        f"model too large for this host: {what} builds the parameters and input in host memory, "
        f"{_fmt(host_need)} ({shape}), and the host has {_fmt(host)}; use a smaller model "
        f"(--preset, --set model.*) or run shape (--set run.*)")
  devices = jax.local_devices()
  on_cpu = devices[0].platform == "cpu"
  for plan in plans:
    per_dev = memory.per_device(cfg, run, plan)["predicted_hbm_bytes"]
    per_dev = per_dev * width // cfg.dtype_bytes
    if on_cpu:   # simulated devices share the host's memory
      need = per_dev * min(plan.devices, len(devices))
      if need + host_need > host:
        raise TooLargeError(
            f"model too large for {plan.devices} simulated CPU devices: {what} ({plan.strategy}) "
            f"keeps {_fmt(per_dev)} per device ({shape}), {_fmt(need)} on the host beside the "
            f"{_fmt(host_need)} host copy, and the host has {_fmt(host)}")
      continue
    limit = device_memory_bytes(devices[0])
    if limit is not None and per_dev > limit:
      raise TooLargeError(
          f"model too large for {devices[0].device_kind}: {what} ({plan.strategy}, "
          f"{plan.stages} stages x tp {plan.tp}) keeps {_fmt(per_dev)} per device ({shape}), "
          f"and a device has {_fmt(limit)}; use more devices or a smaller model")


def memory_of_all_devices() -> tuple[int, str]:
  """(bytes, what they are) the local devices may hold together: the host's memory on CPU (the
  simulated devices share it), else the sum of the accelerators' limits (the host's if unknown)."""
  devices = jax.local_devices()
  limits = [device_memory_bytes(d) for d in devices] if devices[0].platform != "cpu" else [None]
  if None in limits:
    return host_memory_bytes(), "the host has"
  return sum(limits), f"{len(devices)} {devices[0].device_kind} devices have"


def check_bytes(need: int, flag: str, what: str, valid: str) -> None:
  """TooLargeError naming the flag when `need` bytes (a lower bound) exceed what the local
  devices may hold together; a refusal made before anything is traced or allocated."""
  have, who = memory_of_all_devices()
  if need > have:
    raise TooLargeError(f"{flag}: {what} needs at least {_fmt(need)} and {who} {_fmt(have)}; "
                        f"{valid}")
