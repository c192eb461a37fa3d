#!/usr/bin/env python3
"""Evaluate every PromQL expression of the Grafana dashboard against a running Prometheus.

Usage: check_dashboard.py [--prometheus URL] [--dashboard PATH] [--deadline SECONDS]

Grafana's variables are substituted ($__rate_interval: 1m, $instance: all replicas). Each
expression must parse and return data; the check retries until the deadline, since counters
need two scrapes inside the rate window. Exit 0 when every expression passed. Standard library
only, so it runs with any Python 3.10+.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).resolve().parents[1] / "grafana" / "dashboards" / "tokenreward.json"
VALUES = {"__rate_interval": "1m", "__interval": "15s", "instance": ".*"}


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for panel in _panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            out.append((f"{panel['title']} / {target['refId']}", target["expr"]))
    for variable in dashboard.get("templating", {}).get("list", []):
        match = re.fullmatch(r"label_values\((.+),\s*\w+\)", variable.get("definition", ""))
        if variable["type"] == "query" and match:
            out.append((f"variable {variable['name']}", match.group(1)))
    return out


def substitute(expr: str) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: VALUES[m.group(1)], expr)


def query(prometheus: str, expr: str) -> tuple[str, int]:
    """(status, number of series) of an instant query."""
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
    except urllib.error.HTTPError as exc:  # 400 for a query that does not parse
        body = json.load(exc)
    return body["status"], len(body.get("data", {}).get("result", []))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--dashboard", type=Path, default=DASHBOARD)
    parser.add_argument("--deadline", type=float, default=90.0)
    args = parser.parse_args()
    pending = dict(expressions(json.loads(args.dashboard.read_text())))
    results: dict[str, tuple[str, int]] = {}
    deadline = time.monotonic() + args.deadline
    while True:
        for where, expr in list(pending.items()):
            results[where] = query(args.prometheus, substitute(expr))
            if results[where] == ("success", results[where][1]) and results[where][1] > 0:
                del pending[where]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(2)
    for where, (status, series) in results.items():
        mark = "ok  " if where not in pending else "FAIL"
        print(f"{mark} {where}: {status}, {series} series")
    print(f"{len(results) - len(pending)} passed, {len(pending)} failed")
    return 0 if not pending else 1


if __name__ == "__main__":
    sys.exit(main())
