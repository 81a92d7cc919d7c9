"""Skips under CI=true (a pytest plugin, loaded by tests/conftest.py).

On a developer's machine a skip is a note. Under CI=true every skip is collected and the
session fails, listing them, unless the skip names a tool this machine genuinely cannot have:
its reason reads `missing tool: <name> ...` and <name> is in MAY_LACK. Nothing in the suite
needs one today (PostgreSQL, grpcurl and certificates are all required or made in-process).
"""

from __future__ import annotations

import os
import re

import pytest

# Tools a CI machine may lack, each with why; keep this short.
MAY_LACK: dict[str, str] = {}
NAMED_TOOL = re.compile(r"missing tool: (\S+)")


def ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def allowed(reason: str) -> bool:
    found = NAMED_TOOL.search(reason)
    return found is not None and found.group(1) in MAY_LACK


def pytest_configure(config: pytest.Config) -> None:
    if ci():
        config.pluginmanager.register(SkipGuard(), "allot-ci-skips")


class SkipGuard:
    """Collects the skips of one CI session and fails it when one is not allowed."""

    def __init__(self) -> None:
        self.skips: list[tuple[str, str]] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if not report.skipped or hasattr(report, "wasxfail"):
            return
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        if not allowed(reason):
            self.skips.append((report.nodeid, reason))

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.skips and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.skips:
            return
        terminalreporter.section("skips not allowed under CI=true", red=True, bold=True)
        for nodeid, reason in self.skips:
            terminalreporter.line(f"{nodeid}: {reason}")
        terminalreporter.line(
            f"{len(self.skips)} skip(s) under CI=true: make the need real, or name the missing"
            " tool ('missing tool: <name> ...') and add it to MAY_LACK in tests/support/ci_skips.py"
        )
