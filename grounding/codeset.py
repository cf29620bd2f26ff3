"""Derived code sets: which library files a module's behaviour can depend on, found statically.

:func:`code_set` walks a module's imports inside the ``grounding`` package transitively with :mod:`ast`
(no module is imported, so nothing runs): ``import grounding.x``, ``from grounding import x`` where ``x`` is
a submodule, ``from grounding.x import y`` (and ``y`` when it is itself a submodule), relative imports, and
imports inside function bodies (lazy imports count: a sound over-approximation, the safe side for a cache).
Every package ``__init__.py`` on the way is included. :func:`code_version` hashes the sources of that set:
it is the code part of every stage key, and the same files are the stage's code deps in ``dvc.yaml``.
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

PACKAGE = "grounding"
#: the directory holding the ``grounding`` package (the repository root)
ROOT = Path(__file__).resolve().parents[1]


def module_file(name: str) -> Path | None:
    """The source file of library module ``name`` (``grounding.x.y``), or ``None`` when it is not one."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _packages(name: str) -> list[str]:
    """``grounding.a.b`` -> ``[grounding, grounding.a]`` (whose ``__init__`` run first on import)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@lru_cache(maxsize=None)
def direct_imports(name: str) -> frozenset[str]:
    """Library modules that module ``name`` imports anywhere in its source (incl. its parent packages)."""
    path = module_file(name)
    if path is None:
        raise ValueError(f"{name} is not a module of the {PACKAGE} package (no source file under {ROOT / PACKAGE})")
    tree = ast.parse(path.read_bytes(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set(_packages(name))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                here = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = here[: len(here) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # kept only where a submodule exists
    out: set[str] = set()
    for mod in found:
        for m in (*_packages(mod), mod):
            if module_file(m) is not None:
                out.add(m)
    out.discard(name)
    return frozenset(out)


@lru_cache(maxsize=None)
def code_modules(name: str) -> tuple[str, ...]:
    """``name`` and every library module it reaches through imports, transitively (sorted names)."""
    seen: set[str] = set()
    todo = [name, *_packages(name)]
    while todo:
        mod = todo.pop()
        if mod in seen or module_file(mod) is None:
            continue
        seen.add(mod)
        todo.extend(direct_imports(mod))
    if name not in seen:
        raise ValueError(f"{name} is not a module of the {PACKAGE} package")
    return tuple(sorted(seen))


def code_set(name: str) -> tuple[str, ...]:
    """The source files of :func:`code_modules`, as sorted POSIX paths relative to the repository root."""
    return tuple(sorted(module_file(m).relative_to(ROOT).as_posix() for m in code_modules(name)))  # type: ignore[union-attr]


@lru_cache(maxsize=None)
def _file_digest(rel: str) -> str:
    return hashlib.sha256((ROOT / rel).read_bytes()).hexdigest()


def files_version(files: tuple[str, ...]) -> str:
    """sha256 over (path, sha256 of bytes) of ``files`` (repository-relative): any edit, a comment included,
    changes it."""
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(rel.encode() + b"\0" + _file_digest(rel).encode() + b"\n")
    return h.hexdigest()


def code_version(name: str) -> str:
    """The code part of a stage key: :func:`files_version` of :func:`code_set` of module ``name``.
    Computed once per process (sources are not expected to change under a running process)."""
    return files_version(code_set(name))


def import_graph() -> dict[str, frozenset[str]]:
    """Every library module -> the library modules it imports (for the cycle and layering tests)."""
    mods = sorted(_module_name(p) for p in (ROOT / PACKAGE).rglob("*.py"))
    return {m: direct_imports(m) for m in mods}


def cycles(graph: dict[str, frozenset[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted; ``[]``: acyclic.
    Edges to parent packages are ignored (a package importing its own submodule is not a cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def edges(v: str) -> list[str]:
        return [w for w in graph.get(v, ()) if w in graph and not v.startswith(w + ".")]

    def strong(v: str) -> None:  # iterative Tarjan
        work = [(v, iter(edges(v)))]
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        while work:
            node, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(edges(w))))
                    break
                if w in on:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out
