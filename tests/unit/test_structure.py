"""The house rules that imports and sizes can show, read with `ast` (README, "Layout").

Services share only `shared/` and the protos: a rule both need (validity periods, project ids)
lives in `shared/`, so a service can be changed, deployed and reasoned about on its own.
"""

from __future__ import annotations

import ast
import pathlib

from shared.settings import REPO_ROOT

SERVICES = ("quota", "billing", "notification")


def imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from allot.quota.v1 import quota_pb2` imports the module quota_pb2
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_no_service_imports_another_service():
    crossings = []
    for service in SERVICES:
        others = [f"services.{other}" for other in SERVICES if other != service]
        for path in sorted((REPO_ROOT / "services" / service).rglob("*.py")):
            for module in imported_modules(path):
                if any(module == o or module.startswith(o + ".") for o in others):
                    crossings.append(f"{path.relative_to(REPO_ROOT)} imports {module}")
    assert crossings == [], "\n".join(crossings)


def test_shared_imports_no_service():
    crossings = [
        f"{path.relative_to(REPO_ROOT)} imports {module}"
        for path in sorted((REPO_ROOT / "shared").rglob("*.py"))
        if "gen" not in path.relative_to(REPO_ROOT / "shared").parts
        for module in imported_modules(path)
        if module == "services" or module.startswith("services.")
    ]
    assert crossings == [], "\n".join(crossings)


# --- the house inside a service (README "Layout", docs/architecture.md) ----------------------

FORBIDDEN_IN_APP = ("grpc", "google.protobuf", "sqlalchemy")
MAX_LINES = 450
GENERATED = ("shared/gen/", "/migrations/versions/")


def python_files(*roots: str) -> list[pathlib.Path]:
    return sorted(
        path
        for root in roots
        for path in (REPO_ROOT / root).rglob("*.py")
        if not any(part in str(path.relative_to(REPO_ROOT)) for part in GENERATED)
    )


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolved_imports(path: pathlib.Path, known: set[str]) -> set[str]:
    """The repository modules a file imports, wherever the import statement stands (an
    import inside a function is a dependency too). `from package import name` counts as
    importing the submodule when `name` is one."""
    package = (
        module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else (module_name(path))
    )
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            # the longest known module the target names (a.b.c.name -> a.b.c)
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target:
                found.add(target)
    return found


def test_app_speaks_domain_types_only():
    """Use cases (`app/`) import no transport and no query construction: protobuf and grpc
    stay in `api/` and event builders in `adapters/`, SQL in `adapters/`."""
    offences = []
    for service in SERVICES:
        for path in python_files(f"services/{service}/app"):
            for module in imported_modules(path):
                if (
                    any(module == f or module.startswith(f + ".") for f in FORBIDDEN_IN_APP)
                    or module.endswith("_pb2")
                    or module.endswith("_pb2_grpc")
                ):
                    offences.append(f"{path.relative_to(REPO_ROOT)} imports {module}")
    assert offences == [], "\n".join(offences)


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    circles: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
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
                    circles.append(sorted(component))
    return circles


def test_import_circles_finder_finds_one():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_circles(graph) == [["a", "b", "c"]]
    assert import_circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    """A package's __init__ importing its own modules is not a circle worth a name; a
    module importing a module that imports it back is."""
    paths = python_files("services", "shared")
    known = {module_name(path) for path in paths}
    graph = {}
    for path in paths:
        name = module_name(path)
        # a module depends on its package's __init__ implicitly; that edge is not a circle
        graph[name] = {m for m in resolved_imports(path, known) if m != name}
    for name in graph:
        if name in known and any(p.name == "__init__.py" and module_name(p) == name for p in paths):
            graph[name] = {m for m in graph[name] if not m.startswith(name + ".")}
    circles = import_circles(graph)
    assert circles == [], "\n".join(" <-> ".join(c) for c in circles)


def test_modules_stay_small():
    long = [
        f"{path.relative_to(REPO_ROOT)}: {lines} lines"
        for path in python_files("services", "shared")
        if (lines := len(path.read_text().splitlines())) > MAX_LINES
    ]
    assert long == [], f"modules over {MAX_LINES} lines:\n" + "\n".join(long)
