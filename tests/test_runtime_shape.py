"""The runtime room's shape (issue 22): no function over 60 lines anywhere in jaxpart/runtime/,
and loop state that is named, never a tuple read by index."""

import ast
from pathlib import Path

RUNTIME = Path(__file__).resolve().parent.parent / "jaxpart" / "runtime"
MAX_LINES = 60


def _functions(path: Path):
  tree = ast.parse(path.read_text(), filename=str(path))
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      yield node


def test_runtime_modules_exist():
  assert len(list(RUNTIME.rglob("*.py"))) >= 5


def test_no_function_over_60_lines_in_runtime():
  long = [f"{p.relative_to(RUNTIME.parent.parent)}:{f.lineno} {f.name} "
          f"({f.end_lineno - f.lineno + 1} lines)"
          for p in sorted(RUNTIME.rglob("*.py")) for f in _functions(p)
          if f.end_lineno - f.lineno + 1 > MAX_LINES]
  assert not long, "functions over 60 lines:\n" + "\n".join(long)


def test_the_check_sees_a_long_function(tmp_path):
  """The counter itself: a 61-line function is caught, a 60-line one is not."""
  body = "\n".join(f"  x{i} = {i}" for i in range(59))
  (tmp_path / "a.py").write_text(f"def ok():\n{body}\n\n\ndef long():\n{body}\n  y = 1\n")
  sizes = {f.name: f.end_lineno - f.lineno + 1 for f in _functions(tmp_path / "a.py")}
  assert sizes == {"ok": 60, "long": 61}


def test_decode_and_tick_state_are_named():
  """generate reads the decode state by name; the engine's and decode's loop carries are
  NamedTuples (no `state[4]`)."""
  from jaxpart.runtime import decode, engine  # noqa: PLC0415
  assert decode.DecodeState._fields == ("kcache", "vcache", "recv", "pending", "out", "logits",
                                        "lens")
  assert engine.Tick._fields == ("recv", "kcache", "vcache", "out")
  for name in ("generate.py", "decode.py", "engine.py"):
    tree = ast.parse((RUNTIME / name).read_text())
    indexed = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Subscript)
               and isinstance(n.value, ast.Name) and n.value.id in ("state", "carry", "st")
               and isinstance(n.slice, ast.Constant)]
    assert not indexed, f"{name}: state read by index at lines {indexed}"
