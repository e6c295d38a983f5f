"""The shape of the package: imports flow one way, files stay small, modules keep to
their own private state.

Three checks over the source of ``src/hessfree`` (read with ``ast``; nothing is imported):

* **No import cycles.** Every ``import`` / ``from ... import`` of a ``hessfree`` module counts,
  wherever it is written: at module level, inside a function (a lazy import) or under
  ``if TYPE_CHECKING:``. ``from pkg import name`` is an edge to ``pkg.name`` when that is a
  module, else to ``pkg``. Importing ``a.b.c`` runs the ``__init__`` of ``a`` and ``a.b`` too, so
  it is also an edge to each of those packages (except packages that contain the importer,
  which are running already, and the top-level ``hessfree``, the public door that imports
  everything). A cycle fails the test and is named, module by module.
* **No file over 400 lines** in ``src/hessfree``.
* **No private reads across modules.** In module M, an attribute access ``x._name`` (one
  leading underscore, not a dunder) fails when ``x`` is not ``self`` / ``cls`` / ``super()`` and
  ``_name`` is not an attribute M gives its own objects (a member of one of M's classes or an
  ``x._name = ...`` that M writes) but is defined in another ``hessfree`` module (as such an
  attribute, or as a module-level name). Types are not inferred: a name M also uses for its own
  objects is taken to be M's. Names that no hessfree
  module defines (``torch``'s ``module._parameters``, ``tensor._version``) are another library's
  business and are not checked here. ``from .other import _name`` of another module's private
  module-level name fails too; modules whose own name starts with ``_`` (``_io``,
  ``_progress``) are package-internal helpers and may be imported freely.

Every module passes; there are no exemptions.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "hessfree"
MAX_LINES = 400

def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, tuple[Path, ast.Module]]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        out[_module_name(path)] = (path, ast.parse(path.read_text(), filename=str(path)))
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name][0].name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom) -> str | None:
    """The absolute hessfree-relative name of ``from <node.module> import ...`` inside ``module``."""
    if node.level == 0:
        if not (node.module or "").startswith("hessfree"):
            return None
        base = node.module[len("hessfree") :].lstrip(".")
        return base
    parts = module.split(".") if module else []
    if not _is_package(module):
        parts = parts[:-1]
    up = node.level - 1
    if up:
        parts = parts[:-up] if up <= len(parts) else []
    if node.module:
        parts = parts + node.module.split(".")
    return ".".join(parts)


def _imports(module: str, tree: ast.Module) -> set[str]:
    """Every hessfree module ``module`` imports, anywhere in its source."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "hessfree" or alias.name.startswith("hessfree."):
                    out.add(alias.name[len("hessfree") :].lstrip("."))
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node)
            if base is None:
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}" if base else alias.name
                out.add(full if full in MODULES else base)
    out.discard(module)
    return {m for m in out if m in MODULES}


def _ancestors(m: str) -> list[str]:
    parts = m.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _graph() -> dict[str, set[str]]:
    """Module -> the hessfree modules that importing it runs.

    Importing ``a.b.c`` also runs ``a/__init__`` and ``a/b/__init__``, so an import of a module
    is an edge to each package above it too, except the packages that already contain the
    importer (they are running already) and the top-level ``hessfree`` package."""
    graph = {}
    for m, (_, tree) in MODULES.items():
        deps = set()
        for d in _imports(m, tree):
            for x in [*_ancestors(d), d]:
                if x and x in MODULES and not (m == x or m.startswith(x + ".")):
                    deps.add(x)
        graph[m] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as one cycle path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_one_cycle(graph, set(c)) for c in comps]


def _one_cycle(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A concrete cycle inside a strongly connected component, for the error message."""
    start = min(comp)
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, v, start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(comp)


def _label(m: str) -> str:
    return f"hessfree.{m}" if m else "hessfree"


def test_no_import_cycles():
    bad = []
    for cycle in _cycles(_graph()):
        bad.append(" -> ".join(_label(m) for m in cycle))
    assert not bad, "import cycles (lazy and TYPE_CHECKING imports count):\n" + "\n".join(bad)


def test_no_file_over_400_lines():
    bad = []
    for path, _ in MODULES.values():
        n = len(path.read_text().splitlines())
        if n > MAX_LINES:
            bad.append(f"{path.relative_to(SRC.parent)}: {n} lines")
    assert not bad, f"files over {MAX_LINES} lines; split them into modules:\n" + "\n".join(bad)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _attributes(tree: ast.Module) -> set[str]:
    """Private attribute names a module gives its objects: members of its classes (methods,
    class attributes, dataclass fields) and every ``x._name = ...`` it writes."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    out.add(item.name)
                elif isinstance(item, (ast.Assign, ast.AnnAssign)):
                    for t in item.targets if isinstance(item, ast.Assign) else [item.target]:
                        if isinstance(t, ast.Name):
                            out.add(t.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            out.add(node.attr)
    return {n for n in out if _private(n)}


def _module_level(tree: ast.Module) -> set[str]:
    out: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        out.add(n.id)
    return {n for n in out if _private(n)}


def _owner_is_self(node: ast.Attribute) -> bool:
    v = node.value
    if isinstance(v, ast.Name) and v.id in ("self", "cls"):
        return True
    return isinstance(v, ast.Call) and isinstance(v.func, ast.Name) and v.func.id == "super"


def _private_reads() -> list[str]:
    own = {m: _attributes(tree) for m, (_, tree) in MODULES.items()}
    top = {m: _module_level(tree) for m, (_, tree) in MODULES.items()}
    anywhere: dict[str, set[str]] = defaultdict(set)
    for m in MODULES:
        for n in own[m] | top[m]:
            anywhere[n].add(m)
    bad = []
    for m, (path, tree) in MODULES.items():
        where = path.relative_to(SRC.parent)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr) and not _owner_is_self(node):
                if node.attr not in own[m] and anywhere.get(node.attr, set()) - {m}:
                    owners = ", ".join(sorted(_label(o) for o in anywhere[node.attr]))
                    bad.append(f"{where}:{node.lineno}: reads .{node.attr} (defined in {owners})")
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(m, node)
                if base is None or base.split(".")[-1].startswith("_") or base not in MODULES:
                    continue
                for alias in node.names:
                    if _private(alias.name) and alias.name in top[base]:
                        bad.append(f"{where}:{node.lineno}: imports {alias.name} from {_label(base)}")
    return bad


def test_no_private_reads_across_modules():
    bad = _private_reads()
    assert not bad, "modules reading another module's private names; add a public method:\n" + "\n".join(bad)


def test_the_checks_can_fail():
    """The three checkers find what they look for, on small hand-written graphs and sources."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    tree = ast.parse("class A:\n    _k = 1\n    def f(self, other):\n        self._x = 2\n        return other._y\n")
    assert _attributes(tree) == {"_k", "_x"}
    attrs = [n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and not _owner_is_self(n)]
    assert attrs == ["_y"]

