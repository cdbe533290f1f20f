"""The shape of the house: small modules, imports that only run downward, no cycles.

Read from the source with `ast` (nothing is imported), so it runs in well under a second.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jaxpart"
MAX_LINES = 450
MAX_LOCAL_IMPORTS = 15
CLI = ("jaxpart.cli", "jaxpart.commands", "jaxpart.__main__")   # the command line, the top layer
UPPER = (*CLI, "experiments")   # what the library never imports


def _modules(folder: Path) -> dict[str, Path]:
  """Dotted module name -> file, for every .py under folder."""
  out = {}
  for path in sorted(folder.rglob("*.py")):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts.pop()
    out[".".join(parts)] = path
  return out


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, ast.stmt]]:
  """(imported module, statement) for every import in the file, at any depth. `from a import b`
  names a.b when that is a module, else a."""
  name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
  out = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out += [(a.name, node) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:   # relative: resolve against this module's package
        pkg = name.split(".")[:len(name.split(".")) - node.level]
        base = ".".join(pkg + ([base] if base else []))
      for a in node.names:
        sub = f"{base}.{a.name}"
        out.append((sub if sub in modules else base, node))
  return out


def _local_imports(path: Path) -> list[ast.stmt]:
  tree = ast.parse(path.read_text())
  return [n for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
          for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))]


def _under(name: str, prefixes) -> bool:
  return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_no_module_is_overgrown():
  long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
          if (n := len(p.read_text().splitlines())) > MAX_LINES}
  assert not long, f"split these on their seams (over {MAX_LINES} lines): {long}"


def test_library_never_imports_the_cli_or_the_experiments():
  modules = _modules(PACKAGE)
  bad = [f"{name} imports {target} (line {node.lineno})"
         for name, path in modules.items() if not _under(name, CLI)
         for target, node in _imports(path, modules) if _under(target, UPPER)]
  assert not bad, bad


def test_experiments_never_import_the_cli():
  modules = {**_modules(PACKAGE), **_modules(ROOT / "experiments")}
  bad = [f"{name} imports {target} (line {node.lineno})"
         for name, path in _modules(ROOT / "experiments").items()
         for target, node in _imports(path, modules)
         if _under(target, CLI)]
  assert not bad, bad


def test_no_import_cycles_in_the_package():
  """Between modules, by their top-level imports (a package's __init__ re-exporting its own
  modules is not an edge back up)."""
  modules = _modules(PACKAGE)
  graph = {}
  for name, path in modules.items():
    tree = ast.parse(path.read_text())
    body = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    targets = set()
    for node in body:
      if isinstance(node, ast.Import):
        targets |= {a.name for a in node.names}
      else:
        targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                    else node.module for a in node.names}
    graph[name] = {t for t in targets if t in modules and t != name
                   and not (path.name == "__init__.py" and t.startswith(name + "."))}
  state, stack, cycles = {}, [], []

  def visit(n):
    state[n] = "open"
    stack.append(n)
    for m in sorted(graph[n]):
      if state.get(m) == "open":
        cycles.append(stack[stack.index(m):] + [m])
      elif m not in state:
        visit(m)
    stack.pop()
    state[n] = "done"

  for n in sorted(graph):
    if n not in state:
      visit(n)
  assert not cycles, [" -> ".join(c) for c in cycles]


def test_imports_sit_at_the_top():
  """A function-local import hides a dependency; the few allowed say why on their line."""
  found = [(p, n) for p in sorted(PACKAGE.rglob("*.py")) for n in _local_imports(p)]
  assert len(found) <= MAX_LOCAL_IMPORTS, [f"{p.relative_to(ROOT)}:{n.lineno}" for p, n in found]
  silent = [f"{p.relative_to(ROOT)}:{n.lineno}" for p, n in found
            if "#" not in p.read_text().splitlines()[n.lineno - 1]]
  assert not silent, f"say why each import is local (start-up time, optional extra): {silent}"


def test_hlo_reader_stands_alone():
  """The HLO text reader imports nothing from jaxpart: it could be lifted out as it is."""
  modules = _modules(PACKAGE)
  assert not [t for t, _ in _imports(PACKAGE / "hlo.py", modules) if _under(t, ("jaxpart",))]
