"""The package's layering, read from the source (ast; nothing is imported or run).

Every import counts, at module level or inside a function (a lazy import is still a dependency):

* no import cycle between modules of `stmoe/` (incl. `stmoe.tasks`, which installs from `tasks/`);
* the core (`config`, `errors`, `layers`, `moe`, `models`, `decoding`, `partitioning`) imports nothing
  from the layers above it: checkpoints, training, evaluation, interop, experiments, data, tasks, cli;
* nothing under `stmoe/` imports `stmoe.cli` except `stmoe.cli` itself (and the deprecated aliases kept
  for one release under old module paths: pure re-export modules, checked to be nothing more);
* `stmoe.data` / `stmoe.tasks` (seqio, TensorFlow) import nothing from training, evaluation or cli.

docs/architecture.md states the same layers.
"""

from __future__ import annotations

import ast
import os

ROOT = os.path.join(os.path.dirname(__file__), "..")
PACKAGE_DIRS = {"stmoe": os.path.join(ROOT, "stmoe"), "stmoe.tasks": os.path.join(ROOT, "tasks")}

CORE = ("stmoe.config", "stmoe.errors", "stmoe.special_ids", "stmoe.platform", "stmoe.layers", "stmoe.moe",
        "stmoe.models", "stmoe.decoding", "stmoe.partitioning")
ABOVE_CORE = ("stmoe.checkpoints", "stmoe.training", "stmoe.evaluation", "stmoe.interop", "stmoe.experiments",
              "stmoe.data", "stmoe.tasks", "stmoe.cli", "stmoe.gin_utils", "stmoe.export", "stmoe.inference",
              "stmoe.quickstart", "stmoe.plots")
DATA = ("stmoe.data", "stmoe.tasks")


def _modules() -> dict[str, str]:
  """module name -> file path for every .py file of the package."""
  out = {}
  for package, directory in PACKAGE_DIRS.items():
    for root, _, files in os.walk(directory):
      for name in files:
        if not name.endswith(".py"):
          continue
        rel = os.path.relpath(os.path.join(root, name), directory)[:-3].replace(os.sep, ".")
        module = package if rel == "__init__" else f"{package}.{rel.removesuffix('.__init__')}"
        if package == "stmoe" and (module == "stmoe.tasks" or module.startswith("stmoe.tasks.")):
          continue
        out[module] = os.path.join(root, name)
  return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
  if not node.level:
    return node.module or ""
  base = module.split(".") if is_package else module.split(".")[:-1]
  base = base[: len(base) - (node.level - 1)]
  return ".".join(base + ([node.module] if node.module else []))


def _imports(modules: dict[str, str]) -> dict[str, set[str]]:
  """module -> the stmoe modules it imports (the longest known prefix of each imported name)."""
  known = set(modules)

  def owner(name: str) -> str | None:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
      if ".".join(parts[:i]) in known:
        return ".".join(parts[:i])
    return None

  graph = {}
  for module, path in modules.items():
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    targets = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        targets.update(a.name for a in node.names)
      elif isinstance(node, ast.ImportFrom):
        base = _resolve(module, path.endswith("__init__.py"), node)
        subs = [f"{base}.{a.name}" for a in node.names]
        targets.update(s for s in subs if s in known)  # `from pkg import submodule`: the submodule only
        if not all(s in known for s in subs):
          targets.add(base)
    graph[module] = {o for t in targets if (o := owner(t)) and o != module and not module.startswith(o + ".")}
  return graph


def _in(module: str, prefixes) -> bool:
  return any(module == p or module.startswith(p + ".") for p in prefixes)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


GRAPH = _imports(_modules())


def _deprecated_aliases(modules: dict[str, str]) -> set[str]:
  """Modules kept for one release under an old path: a docstring starting "Deprecated alias" and a body
  of nothing but imports and `__all__` (checked below). They may point anywhere, even at the CLI."""
  out = set()
  for module, path in modules.items():
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    if (ast.get_docstring(tree) or "").startswith("Deprecated alias"):
      out.add(module)
  return out


ALIASES = _deprecated_aliases(_modules())


def test_the_reader_sees_the_package():
  assert {"stmoe.config", "stmoe.cli", "stmoe.tasks", "stmoe.checkpoints"} <= set(GRAPH)
  assert "stmoe.config" in GRAPH["stmoe.moe.layer"]


def test_no_import_cycles():
  assert _cycles(GRAPH) == []


def test_deprecated_aliases_are_pure_re_exports():
  assert {"stmoe.export", "stmoe.inference", "stmoe.training.commands"} <= ALIASES
  modules = _modules()
  for module in ALIASES:
    tree = ast.parse(open(modules[module], encoding="utf-8").read())
    body = tree.body[1:]  # after the docstring
    assert all(isinstance(n, (ast.Import, ast.ImportFrom)) or
               (isinstance(n, ast.Assign) and [t.id for t in n.targets] == ["__all__"]) for n in body), module


def test_core_imports_nothing_from_the_layers_above():
  bad = {m: sorted(t for t in ts if _in(t, ABOVE_CORE)) for m, ts in GRAPH.items() if _in(m, CORE)}
  assert {m: t for m, t in bad.items() if t} == {}


def test_only_the_cli_imports_the_cli():
  bad = {m: sorted(t for t in ts if _in(t, ("stmoe.cli",))) for m, ts in GRAPH.items()
         if not _in(m, ("stmoe.cli",)) and m not in ALIASES}
  assert {m: t for m, t in bad.items() if t} == {}


def test_data_and_tasks_stand_apart_from_training():
  upper = ("stmoe.training", "stmoe.evaluation", "stmoe.cli", "stmoe.experiments", "stmoe.checkpoints")
  bad = {m: sorted(t for t in ts if _in(t, upper)) for m, ts in GRAPH.items() if _in(m, DATA)}
  assert {m: t for m, t in bad.items() if t} == {}
