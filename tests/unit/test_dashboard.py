"""The Grafana dashboard (deploy/grafana/allot.json) is valid JSON and uses only metrics that
docs/operations.md lists."""

from __future__ import annotations

import json
import re

from shared.settings import REPO_ROOT

SUFFIXES = ("_bucket", "_count", "_sum")


def test_dashboard_uses_documented_metrics():
    dashboard = json.loads((REPO_ROOT / "deploy" / "grafana" / "allot.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert len(exprs) >= 15
    documented = (REPO_ROOT / "docs" / "operations.md").read_text()
    used = set()
    for expr in exprs:
        for name in re.findall(r"\ballot_[a-z_]+", expr):
            for suffix in SUFFIXES:
                name = name.removesuffix(suffix)
            used.add(name)
    missing = sorted(name for name in used if f"`{name}`" not in documented)
    assert not missing
    assert {"allot_rpc_requests_total", "allot_consumer_lag_seconds"} <= used
