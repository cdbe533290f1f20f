"""The shape of the house: rooms, small modules, imports that only run downward, no cycles,
no JAX where plans and costs are worked out, and no family asked its name outside models/.

Read from the source with `ast` (nothing is imported), so it runs in well under a second.
"""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jaxpart"
MAX_LINES = 400
MAX_LOCAL_IMPORTS = 15
CLI = ("jaxpart.cli", "jaxpart.commands", "jaxpart.__main__")   # the command line, the top layer
UPPER = (*CLI, "experiments")   # what the library never imports
ROOMS = ("models", "placement", "cost", "runtime", "measure", "checkpoint", "commands")
OPTIONAL_ROOMS = ("serving", "quant")
NO_JAX_ROOMS = ("jaxpart.placement", "jaxpart.cost")
JAX = ("jax", "jaxlib", "flax", "optax", "orbax")
# Lower may never import higher; within a layer anything goes (but no cycles). models.spec is
# the families' jax-free registry: the config validates `arch` against it, so it sits at the
# base. The package itself (jaxpart/__init__.py, the public API) may use every room below the
# command line.
LAYERS = (
    ("jaxpart.errors", "jaxpart.jsonable", "jaxpart.paths", "jaxpart.configtypes",
     "jaxpart.config", "jaxpart.validate", "jaxpart.models.spec", "jaxpart.quantspec"),
    ("jaxpart.models", "jaxpart.quant"),
    ("jaxpart.placement",),
    ("jaxpart.cost",),
    ("jaxpart.runtime",),
    ("jaxpart.serving",),
    ("jaxpart.measure",),
    ("jaxpart.checkpoint",),
    ("jaxpart.commands",),
    ("jaxpart.cli", "jaxpart.__main__"),
)
ARCH_COMPARISON = re.compile(r"\barch\s*(==|!=|\bin\b|\bnot\s+in\b)|\.arch\.")


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


def _top_level_imports(path: Path, modules: dict[str, Path]) -> set[str]:
  """Modules imported when the file is imported: statements outside functions and classes."""
  name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
  out, todo = set(), list(ast.parse(path.read_text()).body)
  while todo:
    node = todo.pop()
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      continue
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        pkg = name.split(".")[:len(name.split(".")) - node.level]
        base = ".".join(pkg + ([base] if base else []))
      out |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    else:
      todo += [c for c in ast.iter_child_nodes(node) if isinstance(c, ast.stmt)]
  return out


def _with_parents(name: str, modules: dict[str, Path]) -> list[str]:
  """Importing a.b.c runs a/__init__.py and a/b/__init__.py first."""
  parts = name.split(".")
  return [m for i in range(1, len(parts) + 1) if (m := ".".join(parts[:i])) in modules]


def _rank(name: str) -> int:
  """The layer of a module: the longest prefix LAYERS names; the package itself sits just
  below the command line."""
  best = (-1, None)
  for i, layer in enumerate(LAYERS):
    for prefix in layer:
      if _under(name, (prefix,)) and len(prefix) > best[0]:
        best = (len(prefix), i)
  if name == "jaxpart":
    return len(LAYERS) - 2
  assert best[1] is not None, f"{name}: in no layer; add it to LAYERS in {Path(__file__).name}"
  return best[1]


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
  path = PACKAGE / "measure" / "hlo.py"
  assert path.exists()
  assert not [t for t, _ in _imports(path, modules) if _under(t, ("jaxpart",))]


def test_the_rooms_are_there():
  rooms = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
  assert set(ROOMS) <= rooms, f"missing rooms: {sorted(set(ROOMS) - rooms)}"
  assert rooms <= set(ROOMS) | set(OPTIONAL_ROOMS), (
      f"rooms outside the layout: {sorted(rooms - set(ROOMS) - set(OPTIONAL_ROOMS))}")


def test_no_family_is_asked_its_name_outside_models():
  """What differs by family is a property or method of the family (models/spec.py, families.py),
  never `cfg.arch == ...` in the config, placement, cost, runtime or commands."""
  found = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in sorted(PACKAGE.rglob("*.py"))
           if "models" not in p.relative_to(PACKAGE).parts[:1]
           for i, line in enumerate(p.read_text().splitlines(), 1)
           if ARCH_COMPARISON.search(line)]
  assert not found, found


def test_the_arch_pattern_sees_what_it_forbids():
  for line in ('if cfg.arch == "llama":', "x = cfg.arch != 'dense'", "if m.arch in ARCHS:",
               "if self.arch not in names:", "setup.model.arch.capitalize()"):
    assert ARCH_COMPARISON.search(line), line
  for line in ('arch: str = "dense"', 'arch="llama", n_kv_heads=8', "f(arch=a.arch)",
               "archive in names"):
    assert not ARCH_COMPARISON.search(line), line


def test_placement_and_cost_import_no_jax():
  """Not directly, and not through any jaxpart module they import (package __init__s
  included): plans and costs are worked out where no accelerator library is installed."""
  modules = _modules(PACKAGE)
  graph = {n: _top_level_imports(p, modules) for n, p in modules.items()}
  bad = []
  for start in (n for n in modules if _under(n, NO_JAX_ROOMS)):
    seen, todo, via = set(), _with_parents(start, modules), {}
    while todo:
      n = todo.pop()
      if n in seen:
        continue
      seen.add(n)
      for t in graph[n]:
        if _under(t, JAX):
          chain, m = [t, n], n
          while m in via:
            m = via[m]
            chain.append(m)
          bad.append(" <- ".join(chain))
        for m in _with_parents(t, modules):
          if m not in seen:
            via.setdefault(m, n)
            todo.append(m)
  assert not bad, sorted(set(bad))


def test_nothing_imports_upward():
  """The layers in LAYERS only import downward; a room may import itself (no cycles, above).
  `import jaxpart` (for its path) is no edge: importing any jaxpart module runs the package's
  __init__ first (test_placement_and_cost_import_no_jax follows it)."""
  modules = _modules(PACKAGE)
  bad = [f"{name} (layer {_rank(name)}) imports {t} (layer {_rank(t)})"
         for name, path in modules.items() for t in _top_level_imports(path, modules)
         if t in modules and t != "jaxpart" and _rank(t) > _rank(name)]
  assert not bad, bad
