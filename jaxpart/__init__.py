"""jaxpart: place a dense or Llama-family transformer on N accelerators (pipeline stages x tensor
parallelism), prove it right against one device, predict its cost, generate text.

The names a Python script calls (README, "Use from Python"); each lives in the module named
below and is looked up on first use, so `import jaxpart` stays cheap (no JAX until a name that
runs something is touched, and the planner and cost model never need it):

- config and presets: load_setup, Setup, ModelConfig, RunShape, Hardware, MODEL_PRESETS,
  HARDWARE_PRESETS (jaxpart.config);
- plan (placement.planner.make_plan) and Plan (placement.plan);
- predict (cost.forward.predict): the modelled time of a Plan on the Setup's hardware;
- read_hf (checkpoint.hf): a Hugging Face model directory as (ModelConfig, numpy tree);
- host_params, host_input, reference, make_forward (runtime.runs): random parameters and
  input, the single-device reference, and the Plan's forward as a host function;
- generate (runtime.generate): prefill and decode on a Plan.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_WHERE = {
    "load_setup": ("jaxpart.config", "load_setup"),
    "Setup": ("jaxpart.config", "Setup"),
    "ModelConfig": ("jaxpart.config", "ModelConfig"),
    "RunShape": ("jaxpart.config", "RunShape"),
    "Hardware": ("jaxpart.config", "Hardware"),
    "MODEL_PRESETS": ("jaxpart.config", "MODEL_PRESETS"),
    "HARDWARE_PRESETS": ("jaxpart.config", "HARDWARE_PRESETS"),
    "plan": ("jaxpart.placement.planner", "make_plan"),
    "Plan": ("jaxpart.placement.plan", "Plan"),
    "predict": ("jaxpart.cost.forward", "predict"),
    "read_hf": ("jaxpart.checkpoint.hf", "read_hf"),
    "host_params": ("jaxpart.runtime.runs", "host_params"),
    "host_input": ("jaxpart.runtime.runs", "host_input"),
    "reference": ("jaxpart.runtime.runs", "reference"),
    "make_forward": ("jaxpart.runtime.runs", "make_forward"),
    "generate": ("jaxpart.runtime.generate", "generate"),
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
  """PEP 562: import the module that holds `name` only when a script first asks for it."""
  if name not in _WHERE:
    raise AttributeError(f"module 'jaxpart' has no attribute {name!r}; the public names are "
                         f"{', '.join(__all__)}")
  module, attr = _WHERE[name]
  value = getattr(importlib.import_module(module), attr)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
