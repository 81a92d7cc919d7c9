"""The house rules that imports can show, read with `ast` (README, "Layout").

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
            found.add(node.module)
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
