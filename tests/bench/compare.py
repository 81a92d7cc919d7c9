"""`python -m tests.bench.compare BEFORE.json AFTER.json`: two bench runs side by side.

For every row both runs measured (database, scenario, name, concurrency): events/s, the ratio
to the echo of its own run, and p50, before -> after; then the goals of issue 13 of each run.
The ratios are what to compare (each run's echo absorbs the machine's load at the time).
With one argument, the newest file of build/bench/ is AFTER; with none, the two newest.
"""

from __future__ import annotations

import json
import pathlib
import sys

from shared.settings import REPO_ROOT


def _key(row: dict) -> tuple:
    return row["database"], row["scenario"], row["name"], row["concurrency"]


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def compare(before: dict, after: dict) -> list[str]:
    def label(run: dict) -> str:
        git = run["git"]
        return f"{git['short_commit']}{' (dirty)' if git['dirty'] else ''} {run['started_utc']}"

    lines = [f"before: {label(before)}", f"after:  {label(after)}", ""]
    lines.append(
        f"{'database':<11}{'scenario':<30}{'conc':>5}{'events/s':>22}{'vs echo':>16}{'p50 ms':>20}"
        f"{'srv us/call':>20}"
    )
    old = {_key(r): r for r in before["results"]}
    for row in after["results"]:
        was = old.get(_key(row))
        if was is None:
            continue
        lines.append(
            f"{row['database']:<11}{row['name']:<30}{row['concurrency']:>5}"
            f"{was['events_per_s']:>10,.0f} -> {row['events_per_s']:>7,.0f}"
            f"{_fmt(was['ratio_vs_echo'], '.2f'):>8} -> {_fmt(row['ratio_vs_echo'], '.2f'):>5}"
            f"{_fmt(was['p50_ms'], '.2f'):>11} -> {_fmt(row['p50_ms'], '.2f'):>6}"
            # Runs written before the bench measured the server's CPU have none.
            f"{_fmt(was.get('server_cpu_us_per_call'), ',.0f'):>11} -> "
            f"{_fmt(row.get('server_cpu_us_per_call'), ',.0f'):>6}"
        )
    lines.append("")
    goals = {(g["database"], g["goal"]): g for g in before["goals"]}
    for g in after["goals"]:
        was = goals.get((g["database"], g["goal"]), {})
        if g["figure"] is None and was.get("figure") is None:
            continue
        verdict = {True: "met", False: "NOT MET", None: "-"}[g["met"]]
        lines.append(
            f"{g['database']:<11}{g['goal']:<58}{_fmt(was.get('figure'), ',.2f'):>10} -> "
            f"{_fmt(g['figure'], ',.2f'):>9}  {verdict}"
        )
    return lines


def main(argv: list[str]) -> None:
    newest = sorted((REPO_ROOT / "build" / "bench").glob("*.json"))
    paths = [pathlib.Path(a) for a in argv]
    if len(paths) < 2:
        paths = (newest[-2:] if not paths else [paths[0], newest[-1]]) if newest else paths
    if len(paths) != 2:
        sys.exit("usage: python -m tests.bench.compare BEFORE.json AFTER.json")
    before, after = (json.loads(p.read_text()) for p in paths)
    print("\n".join(compare(before, after)))


if __name__ == "__main__":
    main(sys.argv[1:])
