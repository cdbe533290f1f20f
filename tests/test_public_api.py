"""The public API (jaxpart/__init__.py): the README's "Use from Python" script runs as written,
and planning and predicting through it never import JAX."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import jaxpart

ROOT = Path(__file__).resolve().parents[1]


def _readme_script() -> str:
  text = (ROOT / "README.md").read_text()
  section = text.split("## Use from Python", 1)[1].split("\n## ", 1)[0]
  blocks = re.findall(r"```python\n(.*?)```", section, re.S)
  assert len(blocks) == 1, f"expected one python block under 'Use from Python', got {len(blocks)}"
  return blocks[0]


def _run(code: str, devices: int | None = None) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  env.pop("XLA_FLAGS", None)
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)


def test_readme_script_plans_runs_and_checks_a_placement():
  out = _run(_readme_script(), devices=16)
  assert out.returncode == 0, out.stderr[-3000:]
  m = re.search(r"(\d+) stages x tp (\d+).*max \|err\| / max \|ref\| = (\S+)", out.stdout)
  assert m, out.stdout
  assert int(m[1]) * int(m[2]) == 16 and float(m[3]) < 2e-6
  assert re.search(r"predicted on \w+: [\d.]+ us, [\d,]+ tokens/s", out.stdout), out.stdout


def test_planning_and_predicting_never_import_jax():
  code = ("import sys, jaxpart\n"
          "s = jaxpart.load_setup('tiny')\n"
          "p = jaxpart.plan(s, 16, 'layerwise')\n"
          "assert jaxpart.predict(s, p).total_s > 0\n"
          "print(sorted(m for m in sys.modules if m == 'jax' or m.startswith('jax.')))\n")
  out = _run(code)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip() == "[]", out.stdout


def test_public_names_resolve_to_where_they_live():
  from jaxpart.cost import forward
  from jaxpart.placement import planner
  from jaxpart.runtime import runs
  assert jaxpart.plan is planner.make_plan and jaxpart.predict is forward.predict
  assert jaxpart.make_forward is runs.make_forward
  for name in jaxpart.__all__:
    assert getattr(jaxpart, name) is not None, name
  with pytest.raises(AttributeError, match="the public names are"):
    jaxpart.no_such_name  # noqa: B018
