"""The bench's outputs: the printed tables, the goals of issue 13 beside their figures, and the
JSON record of a run (build/bench/<UTC timestamp>-<short commit>.json)."""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import time
from dataclasses import dataclass

from shared.settings import REPO_ROOT
from tests.bench.measure import Measurement


@dataclass
class Goal:
    database: str
    goal: str
    figure: float | None  # None: not measured in this run (scenario not selected)
    met: bool | None
    detail: str


def find(rows: list[Measurement], scenario: str, concurrency: int, name: str = ""):
    for m in rows:
        if m.scenario == scenario and m.concurrency == concurrency and (not name or m.name == name):
            return m
    return None


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else float("nan")


def goals(database: str, rows: list[Measurement], echo: dict[int, Measurement]) -> list[Goal]:
    """Issue 13's goals with this run's figures (ratios to the echo of the same run)."""
    out: list[Goal] = []

    def add(goal: str, figure: float | None, at_least: float | None, at_most: float | None, d=""):
        if figure is None or math.isnan(figure):
            out.append(Goal(database, goal, None, None, d or "not measured in this run"))
            return
        met = (at_least is None or figure >= at_least) and (at_most is None or figure <= at_most)
        out.append(Goal(database, goal, figure, met, d))

    def events(m):
        return m.throughput if m else None

    def vs(m, ref):
        return _ratio(m.throughput, ref.throughput) if m and ref else None

    def p50_vs(m, ref):
        return _ratio(m.percentile_ms(50), ref.percentile_ms(50)) if m and ref else None

    e1, e16, e64 = echo.get(1), echo.get(16), echo.get(64)
    ru1, ru64 = find(rows, "report_usage", 1), find(rows, "report_usage", 64)
    add("ReportUsage c64 >= 0.70x echo", vs(ru64, e64), 0.70, None)
    add("ReportUsage p50 c1 <= 2.5x echo p50", p50_vs(ru1, e1), None, 2.5)
    al64 = find(rows, "report_usage_alerts", 64)
    add("ReportUsage +5 alerts c64 >= 0.9x without", vs(al64, ru64), 0.9, None)
    batches = [m for m in rows if m.scenario == "batch"]
    best = max(batches, key=lambda m: m.throughput, default=None)
    add(
        "BatchReportUsage x100 >= 20,000 events/s (best concurrency)",
        events(best), 20_000, None, f"at c{best.concurrency}" if best else "",
    )  # fmt: skip
    b16 = find(rows, "batch", 16)
    add("BatchReportUsage x100 p99 c16 <= 300 ms", b16.percentile_ms(99) if b16 else None,
        None, 300)  # fmt: skip
    cq1, cq64 = find(rows, "check_quota", 1), find(rows, "check_quota", 64)
    add("CheckQuota c64 >= 0.80x echo", vs(cq64, e64), 0.80, None)
    add("CheckQuota p50 c1 <= 2x echo p50", p50_vs(cq1, e1), None, 2.0)
    pairs = (
        ("contention", "one account (64 callers) >= 0.9x 64 accounts"),
        ("growth_packages", "1,000 packages >= 0.9x one package"),
        ("growth_events", "database of 1,000,000 events >= 0.9x empty"),
    )
    for scenario, goal in pairs:
        two = [m for m in rows if m.scenario == scenario]
        if len(two) == 2:
            # contention: [together, apart]; growth: [base, grown]
            figure = vs(two[0], two[1]) if scenario == "contention" else vs(two[1], two[0])
            add(goal, figure, 0.9, None, f"c{two[0].concurrency}")
        else:
            add(goal, None, 0.9, None)
    del e16
    return out


def _echo_cpu(echo: dict[int, Measurement], concurrency: int) -> float:
    ref = echo.get(concurrency)
    cpu = ref.server_cpu_us_per_call if ref else None
    return math.nan if cpu is None else cpu


def print_table(title: str, rows: list[Measurement], echo: dict[int, Measurement] | None) -> None:
    print(f"\n{title}")
    unit = "events/s" if echo is not None else "req/s"
    header = f"  {'scenario':<28}{'conc':>5}{unit:>12}{'p50 ms':>10}{'p99 ms':>10}"
    if echo is not None:
        header += f"{'vs echo':>9}{'p50/echo':>10}"
    header += f"{'srv us':>8}"
    if echo is not None:
        header += f"{'/echo':>7}"
    print(header + f"{'errors':>8}  consistency")
    print("  " + "-" * (len(header) + 20))
    notes = []
    for m in rows:
        line = (
            f"  {m.name:<28}{m.concurrency:>5}{m.throughput:>12,.0f}"
            f"{m.percentile_ms(50):>10.2f}{m.percentile_ms(99):>10.2f}"
        )
        if echo is not None:
            ref = echo.get(m.concurrency)
            if ref and ref.throughput:
                line += f"{m.throughput / ref.throughput:>8.2f}x"
                line += f"{_ratio(m.percentile_ms(50), ref.percentile_ms(50)):>9.2f}x"
            else:
                line += f"{'-':>9}{'-':>10}"
        cpu = m.server_cpu_us_per_call
        line += f"{cpu:>8,.0f}" if cpu is not None else f"{'-':>8}"
        if echo is not None:
            ratio = _ratio(cpu or math.nan, _echo_cpu(echo, m.concurrency))
            line += f"{ratio:>6.2f}x" if not math.isnan(ratio) else f"{'-':>7}"
        print(line + f"{m.errors:>8}  {m.consistency}" + (f"  ({m.note})" if m.note else ""))
        if m.first_error:
            notes.append(f"  ! {m.name} c={m.concurrency}: first error: {m.first_error}")
    for note in notes:
        print(note)


def print_goals(rows: list[Goal]) -> None:
    """The goals this run measured (the others are in the JSON as not measured)."""
    measured = [g for g in rows if g.figure is not None]
    print(f"  goals of issue 13 ({len(measured)} of {len(rows)} measured in this run):")
    for g in measured:
        verdict = "goal met" if g.met else "NOT MET"
        figure = f"{g.figure:,.0f}" if g.figure >= 1000 else f"{g.figure:.2f}"
        detail = f"  ({g.detail})" if g.detail else ""
        print(f"    {g.goal:<58}{figure:>10}  {verdict}{detail}")


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_state() -> dict:
    commit = _git("rev-parse", "HEAD")
    return {
        "commit": commit,
        "short_commit": commit[:10],
        "dirty": bool(_git("status", "--porcelain")),  # untracked files count too
        "branch": _git("rev-parse", "--abbrev-ref", "HEAD"),
    }


def measurement_json(database: str, m: Measurement, echo: dict[int, Measurement] | None):
    ref = (echo or {}).get(m.concurrency)

    def num(x: float):
        return None if math.isnan(x) else round(x, 4)

    return {
        "database": database,
        "scenario": m.scenario,
        "name": m.name,
        "note": m.note,
        "concurrency": m.concurrency,
        "events_per_call": m.events_per_call,
        "seconds": m.seconds,
        "events_per_s": round(m.throughput, 2),
        "calls_per_s": round(m.calls_per_second, 2),
        "p50_ms": num(m.percentile_ms(50)),
        "p99_ms": num(m.percentile_ms(99)),
        "ratio_vs_echo": num(_ratio(m.throughput, ref.throughput)) if ref else None,
        "p50_vs_echo_p50": num(_ratio(m.percentile_ms(50), ref.percentile_ms(50))) if ref else None,
        # The server's CPU time per call (µs) in the measured window, and as a multiple of the
        # echo server's at the same concurrency: steadier than calls/s on a shared machine.
        "server_cpu_us_per_call": num(m.server_cpu_us_per_call or math.nan),
        "server_cpu_vs_echo": num(
            _ratio(m.server_cpu_us_per_call or math.nan, _echo_cpu(echo or {}, m.concurrency))
        ),
        "errors": m.errors,
        "first_error": m.first_error,
        "consistency": m.consistency,
    }


def write_json(record: dict) -> pathlib.Path:
    """build/bench/<UTC timestamp>-<short commit>.json; its path."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    short = record.get("git", {}).get("short_commit", "")[:7] or "nocommit"
    path = REPO_ROOT / "build" / "bench" / f"{stamp}-{short}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
