"""requirements.lock (`make lock`) agrees with the two pyproject.toml files it is made from.

The image installs the lock, not pyproject: a pin changed in pyproject but not re-locked would
ship the old version. Read offline: every runtime dependency is in the lock at a version its
specifier allows, and the lock names nothing as coming from a pyproject that no longer asks.
"""

from __future__ import annotations

import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from shared.settings import REPO_ROOT

LOCAL = {"allot", "allot-client"}  # installed from the repository, never from the lock


def pyproject_requirements() -> dict[str, list[Requirement]]:
    found: dict[str, list[Requirement]] = {}
    for path in ("pyproject.toml", "clients/python/pyproject.toml"):
        project = tomllib.loads((REPO_ROOT / path).read_text())["project"]
        found[path] = [Requirement(text) for text in project["dependencies"]]
    return found


def lock_entries() -> dict[str, tuple[str, str, str]]:
    """name -> (version, marker, the `# via` block that follows the pin)."""
    text = (REPO_ROOT / "requirements.lock").read_text()
    entries: dict[str, tuple[str, str, str]] = {}
    for match in re.finditer(
        r"^([A-Za-z0-9_.-]+)==(\S+)(?: ; (.*))?\n((?:    #.*\n)*)", text, re.MULTILINE
    ):
        name, version, marker, via = match.groups()
        entries[canonicalize_name(name)] = (version, marker or "", via)
    return entries


def test_every_runtime_dependency_is_locked_at_an_allowed_version():
    lock = lock_entries()
    problems = []
    for path, requirements in pyproject_requirements().items():
        for requirement in requirements:
            name = canonicalize_name(requirement.name)
            if name in LOCAL:
                continue
            if name not in lock:
                problems.append(f"{path}: {requirement} is not in requirements.lock")
                continue
            version, marker, _ = lock[name]
            if not requirement.specifier.contains(version, prereleases=True):
                problems.append(f"{path}: {requirement} but requirements.lock has {version}")
            locked_marker = Requirement(f"x ; {marker}").marker if marker else None
            if str(locked_marker) != str(requirement.marker):
                problems.append(f"{path}: {requirement} but the lock's marker is {marker!r}")
    assert problems == [], "run `make lock`:\n" + "\n".join(problems)


def test_the_lock_asks_for_nothing_a_pyproject_dropped():
    wanted = {
        (path, canonicalize_name(r.name))
        for path, requirements in pyproject_requirements().items()
        for r in requirements
    }
    stale = []
    for name, (_, _, via) in lock_entries().items():
        for path in re.findall(r"\((\S*pyproject\.toml)\)", via):
            if (path, name) not in wanted:
                stale.append(f"{name} via {path}")
    assert stale == [], "run `make lock`: " + ", ".join(stale)


def test_nothing_of_ours_and_no_index_in_the_lock():
    text = (REPO_ROOT / "requirements.lock").read_text()
    assert not LOCAL & set(lock_entries()), "allot and allot-client install from the source"
    assert not re.search(r"^-(-index-url|-extra-index-url|-find-links|i|f)\b", text, re.MULTILINE)
