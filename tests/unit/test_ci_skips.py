"""The CI skip guard (tests/support/ci_skips.py) run for real: pytest in a subprocess on a
small test file, with and without CI=true."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

from tests.support import ci_skips

ROOT = pathlib.Path(__file__).resolve().parents[2]
SAMPLE = """
import pytest

def test_runs():
    pass

def test_skips():
    pytest.skip("the moon is not full")
"""


def run_pytest(tmp_path: pathlib.Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = str(ROOT)
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "tests.support.ci_skips",
            "-p",
            "no:cacheprovider",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_skip_under_ci_fails_the_session_and_is_listed(tmp_path):
    run = run_pytest(tmp_path, "true")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "skips not allowed under CI=true" in run.stdout
    assert "test_sample.py::test_skips: the moon is not full" in run.stdout
    assert "1 passed, 1 skipped" in run.stdout


def test_the_same_skip_outside_ci_passes(tmp_path):
    run = run_pytest(tmp_path, None)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "skips not allowed" not in run.stdout
    assert "1 passed, 1 skipped" in run.stdout


def test_only_a_named_tool_on_the_list_may_be_missing(monkeypatch):
    assert not ci_skips.allowed("the moon is not full")
    assert not ci_skips.allowed("missing tool: zstd (apt install zstd)")
    monkeypatch.setitem(ci_skips.MAY_LACK, "zstd", "not packaged on the CI image")
    assert ci_skips.allowed("missing tool: zstd (apt install zstd)")
    assert not ci_skips.allowed("missing tool: zstdcat")
