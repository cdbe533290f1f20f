"""A small reader of compiled HLO text: which ops run only under a conditional branch.

Independent of jaxpart's own HLO reader (measure/compiled.py), so that a test of the engine's bubble
skipping does not trust the code it might share a bug with.
"""

import re

_HEADER = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$")
_CALLS = re.compile(r"\b(to_apply|body|condition|calls|true_computation|false_computation)"
                    r"=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_OP = re.compile(r"=\s*[^=]*?\s([a-z][\w\-]*)\(")


def parse(hlo_text: str):
  """{computation: [(opcode, plain callees, branch callees)]} and the ENTRY's name."""
  comps, entry, cur = {}, None, None
  for line in hlo_text.splitlines():
    m = _HEADER.match(line)
    if m:
      cur = m.group(1)
      comps[cur] = []
      if line.startswith("ENTRY"):
        entry = cur
      continue
    if line.startswith("}"):
      cur = None
      continue
    if cur is None or "=" not in line:
      continue
    op = _OP.search(line)
    plain = [c for _, c in _CALLS.findall(line)]
    branches = [b.strip().lstrip("%") for m2 in _BRANCHES.findall(line) for b in m2.split(",")]
    if op and op.group(1) == "conditional":
      branches += [c for k, c in _CALLS.findall(line) if k.endswith("_computation")]
      plain = [c for k, c in _CALLS.findall(line) if not k.endswith("_computation")]
    comps[cur].append((op.group(1) if op else "", plain, branches))
  return comps, entry


def reachable(comps, start: str, through_branches: bool) -> set[str]:
  """Computations called from `start`; through_branches False stops at conditional branches."""
  seen, todo = set(), [start]
  while todo:
    c = todo.pop()
    if c in seen or c not in comps:
      continue
    seen.add(c)
    for _, plain, branches in comps[c]:
      todo += plain + (branches if through_branches else [])
  return seen


def count_ops(comps, names, opcodes) -> int:
  return sum(1 for c in names for op, _, _ in comps[c] if op in opcodes)


def conditionals(comps, names):
  """[(branch computation names)] of every conditional op in `names`."""
  return [branches for c in names for op, _, branches in comps[c] if op == "conditional"]
