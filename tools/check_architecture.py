#!/usr/bin/env python3
"""Check that broker/ and acl/ keep the layered architecture of ../shared/architecture.md (issue 10).

Usage: ``python tools/check_architecture.py [PROJECT_ROOT]`` (default: the repository this file is in).
Prints one line per problem and exits 1, or prints one "ok" line and exits 0. Stdlib only, no imports
of the checked code: it reads every ``.py`` file under ``broker/`` and ``acl/`` with :mod:`ast`.

Every import counts: module level, inside functions, under ``if TYPE_CHECKING:``, relative ones.
``from broker.x import y`` counts as importing ``broker.x.y`` when that module exists, else ``broker.x``.

Problems found:

- a cycle in the module import graph;
- an import of a layer above the importer's own, or of an independent sibling (``LAYERS``);
- acl importing anything of broker, ``broker/__init__.py`` importing anything;
- I/O modules (``NO_IO_MODULES``) imported by the pure packages (``PURE_PACKAGES``);
- a module over ``MAX_LINES`` lines;
- an event-like log line formatted by hand (``log.info("name key=%s", ...)``): events go through
  ``broker.logs.log_event`` so JSON logs carry ``event`` and text values are quoted.

The layer table lives here, not in the checked code, so modules that do not exist yet (they are listed
anyway) cost nothing. pyproject.toml's ``[tool.importlinter]`` contracts state the same layers for
import-linter; keep the two in step.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# Highest first; a module may import its own component and any component of a lower layer. Components in
# one layer are independent: they must not import each other. A package's modules (its __init__ included)
# belong to the package's component.
LAYERS: list[tuple[str, ...]] = [
    ("broker.cli",),
    # The subcommands broker.cli hands over to (check and its probe, acl explain, ctl and reload, users): independent
    # of each other.
    ("broker.cli_check", "broker.cli_explain", "broker.cli_ctl", "broker.cli_users"),
    # acl explain's CONNECT half: what run would answer a CONNECT (described, no I/O).
    ("broker.cli_explain_connect",),
    ("broker.server",),
    # What operators do to a running process (reload, revoke, kick, list); the admin API serves it.
    ("broker.control",),
    # A configuration reload prepared in full (and described) before the server swaps anything.
    ("broker.reload",),
    # Who gets in (admission) and what the limits.* keys do at run time: independent of each other.
    ("broker.admission", "broker.limits"),
    ("broker.ops",),
    ("broker.edge",),
    ("broker.relay", "broker.upstream", "broker.auth"),
    # Small I/O helpers of the relay: closing without a reset (the drain), paced login starts, counts the workers share,
    # the per-team counts replicas share in Redis (limits.store), children that end with their parent.
    ("broker.linger", "broker.pacing", "broker.shared_counts", "broker.cluster_store", "broker.parent_death"),
    ("broker.session",),
    # The shared leaves may be imported from anywhere above broker.mqtt and may import only broker.mqtt,
    # acl, the stdlib and third-party libraries.
    ("broker.logs", "broker.config", "broker.tlsfiles"),
    ("broker.mqtt",),
    # acl is its own pure package, below everything: the topic grammar and the rules both sides share.
    ("acl",),
]
# broker/__init__.py holds __version__: anyone in broker may import it, it imports nothing.
ROOT_PACKAGE = "broker"
# acl imports nothing of broker (not even the layers below it).
SELF_CONTAINED = ("acl",)
PURE_PACKAGES = ("broker.mqtt", "broker.session", "acl")
NO_IO_MODULES = frozenset({"asyncio", "socket", "ssl", "threading", "subprocess", "http", "selectors", "concurrent"})
MAX_LINES = 500
SCANNED_DIRS = ("broker", "acl")

LOG_METHODS = frozenset({"debug", "info", "warning", "warn", "error", "exception", "critical", "fatal", "log"})
# A lowercase snake_case word, a space, then ``key=``: the shape of a log_event line, typed by hand.
EVENT_LIKE = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*\s+[A-Za-z_]\w*=")

_RANK = {component: rank for rank, layer in enumerate(LAYERS) for component in layer}


@dataclass
class Module:
    name: str
    path: Path  # relative to the project root
    is_package: bool
    tree: ast.Module | None = None
    lines: int = 0
    imports: list[tuple[str, int]] = field(default_factory=list)  # (imported module, line number)


def component_of(module: str) -> str | None:
    """The LAYERS component a module belongs to (longest matching package prefix), or None."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in _RANK:
            return prefix
    return None


def _in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def discover(root: Path) -> dict[str, Module]:
    modules: dict[str, Module] = {}
    for top in SCANNED_DIRS:
        base = root / top
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(root)
            if any(part == "__pycache__" or part.startswith(".") for part in rel.parts):
                continue
            parts = list(rel.with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            modules[".".join(parts)] = Module(".".join(parts), rel, is_package)
    return modules


def _resolve(module: Module, node: ast.ImportFrom) -> str | None:
    """The absolute module named by ``from ... import``, or None when relative beyond the top."""
    if node.level == 0:
        return node.module
    package = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
    if node.level - 1 > len(package) - 1:
        return None
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def collect_imports(module: Module, known: dict[str, Module]) -> Iterator[tuple[str, int]]:
    """Every module this one imports, with the line number; anywhere in the file."""
    assert module.tree is not None
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            if target is None or target == "__future__":
                continue
            # A submodule counts as imported itself; a name defined in the module counts as the module.
            subs = (f"{target}.{alias.name}" for alias in node.names)
            for imported in dict.fromkeys(sub if sub in known else target for sub in subs):
                yield imported, node.lineno


def _string_head(node: ast.expr) -> str | None:
    """The literal text a logging format argument starts with, if it is a string of some kind."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):  # f"event key={x}": the literal part before the first {}
        head = node.values[0] if node.values else None
        return head.value if isinstance(head, ast.Constant) and isinstance(head.value, str) else ""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod):  # "event key=%s" % x
        return _string_head(node.left)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
        return _string_head(node.func.value)  # "event key={}".format(x)
    return None


def _is_logger(node: ast.expr) -> bool:
    """log, logger, self._log, logging, _lib_log...: a receiver whose name says it is a logger."""
    if isinstance(node, ast.Name):
        return "log" in node.id.lower()
    if isinstance(node, ast.Attribute):
        return "log" in node.attr.lower()
    if isinstance(node, ast.Call):  # logging.getLogger(...).info(...)
        return _is_logger(node.func)
    return False


def hand_formatted_events(tree: ast.Module) -> Iterator[tuple[int, str]]:
    for node in ast.walk(tree):
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in LOG_METHODS
            and _is_logger(node.func.value)
        ):
            continue
        for arg in node.args:
            head = _string_head(arg)
            if head is not None:
                if EVENT_LIKE.match(head):
                    yield node.lineno, head
                break


def find_cycles(graph: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """Per strongly connected component of more than one module (Tarjan): a shortest cycle, the members."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0

    def strongconnect(start: str) -> None:  # iterative, so deep graphs cannot hit the recursion limit
        nonlocal counter
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            strongconnect(node)

    cycles = []
    for component in sorted(components):
        members = set(component)
        start = component[0]
        # Breadth-first from start back to start, inside the component: a shortest cycle through start.
        previous: dict[str, str] = {}
        queue = [start]
        found = None
        while queue and found is None:
            next_queue = []
            for node in queue:
                for child in sorted(graph[node] & members):
                    if child == start:
                        found = node
                        break
                    if child not in previous:
                        previous[child] = node
                        next_queue.append(child)
                if found is not None:
                    break
            queue = next_queue
        path = [start]
        node = found if found is not None else start
        while node != start:
            path.append(node)
            node = previous[node]
        cycles.append(([start, *reversed(path[1:]), start], component))
    return cycles


def layer_problem(importer: str, imported: str) -> str | None:
    """Why importer must not import imported, or None when the layers allow it."""
    if importer == ROOT_PACKAGE:
        return "broker/__init__.py holds __version__ and must import nothing of the project"
    for package in SELF_CONTAINED:
        if _in_package(importer, package) and _in_package(imported, ROOT_PACKAGE):
            return f"{package} is its own pure package and must import nothing of {ROOT_PACKAGE}"
    if imported == ROOT_PACKAGE:
        return None
    source, target = component_of(importer), component_of(imported)
    if source is None or target is None or source == target:
        return None  # modules in no layer are reported once, by the caller
    if _RANK[target] < _RANK[source]:
        return f"layer {target} is above {source}"
    if _RANK[target] == _RANK[source]:
        siblings = ", ".join(LAYERS[_RANK[source]])
        return f"{source} and {target} are independent ({siblings} must not import each other)"
    return None


def check(root: Path) -> list[str]:
    """Every problem found under root, one line each: per file in line order, then the cycles."""
    found: list[tuple[str, int, str]] = []  # (path, line, message)
    modules = discover(root)
    for module in modules.values():
        try:
            source = (root / module.path).read_text(encoding="utf-8")
            module.tree = ast.parse(source, filename=str(module.path))
        except (OSError, UnicodeDecodeError, SyntaxError) as exc:
            found.append((str(module.path), 0, f"cannot parse: {exc}"))
            continue
        module.lines = len(source.splitlines())
        module.imports = list(collect_imports(module, modules))

    graph: dict[str, set[str]] = {name: set() for name, m in modules.items() if m.tree is not None}
    for module in modules.values():
        if module.tree is None:
            continue
        path, name = str(module.path), module.name
        if name != ROOT_PACKAGE and component_of(name) is None:
            found.append((path, 0, f"{name} is in no layer: add it to LAYERS in tools/check_architecture.py"))
        if module.lines > MAX_LINES:
            found.append((path, 0, f"{module.lines} lines, over the {MAX_LINES}-line limit: split it"))
        pure = any(_in_package(name, package) for package in PURE_PACKAGES)
        for imported, line in module.imports:
            top = imported.split(".")[0]
            if pure and top in NO_IO_MODULES:
                found.append((path, line, f"{name} imports {imported}: {', '.join(PURE_PACKAGES)} must not do I/O"))
            if top not in SCANNED_DIRS:
                continue
            why = layer_problem(name, imported)
            if why is not None:
                found.append((path, line, f"{name} imports {imported}: {why}"))
            if imported in graph and imported != name:
                graph[name].add(imported)
        for line, text in hand_formatted_events(module.tree):
            shown = text if len(text) <= 50 else text[:47] + "..."
            found.append((path, line, f"hand-formatted event log line {shown!r}: use broker.logs.log_event"))

    problems = [f"{path}:{line}: {message}" if line else f"{path}: {message}" for path, line, message in sorted(found)]
    for cycle, tangle in find_cycles(graph):
        extra = f" (one of the cycles among {len(tangle)} modules: {', '.join(tangle)})"
        problems.append(f"import cycle: {' -> '.join(cycle)}" + (extra if len(tangle) > len(cycle) - 1 else ""))
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("root", nargs="?", type=Path, default=Path(__file__).resolve().parent.parent)
    args = parser.parse_args(argv)
    problems = check(args.root)
    for problem in problems:
        print(problem)
    if problems:
        print(f"architecture check: {len(problems)} problem(s) in {args.root}", file=sys.stderr)
        return 1
    print("architecture check: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
