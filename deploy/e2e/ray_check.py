#!/usr/bin/env python3
"""Host-side checks of the Ray image's end-to-end run (deploy/e2e/run.sh, step `ray`).

  ray_check.py config SERVE_YAML OUT --http-port P --metrics-port M
      deploy/ray/serve.yaml made to fit one CPU container: the embedded demo model on the CPU
      (no model path), everything on 127.0.0.1 and free ports, one CPU per replica; the
      deployment options (autoscaling, health checks, shutdown) as shipped.
  ray_check.py proxy-error URL
      GET URL answers 404 in the service's error shape, made by Ray's proxy (no route yet) and
      reshaped by the proxy middleware: without it, Ray answers in plain text.
  ray_check.py wait-running DASHBOARD [--app NAME] [--deadline S]
      polls Ray's Serve REST API (GET /api/serve/applications/, which KubeRay polls too) until
      the application is RUNNING; fails at once when its deployment failed.
  ray_check.py rewards URL REQUEST [--key KEY] [--out FILE] [--reference FILE]
      POST REQUEST to URL/v1/rewards: one reward per response token; with --reference, the
      same answer (within 1e-5) as that file's, the plain image's.
  ray_check.py metrics URL --items N
      a replica's own /metrics counts N items.

Needs PyYAML for `config` only (the project's .venv has it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import NoReturn

TOLERANCE = 1e-5


def fail(message: str) -> NoReturn:
    print(f"ray_check: {message}", file=sys.stderr)
    raise SystemExit(1)


def request(
    url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """(status, lower-cased headers, body); an HTTP error status is an answer, not a raise."""
    req = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as answer:
            return answer.status, {k.lower(): v for k, v in answer.headers.items()}, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()


def make_config(args: argparse.Namespace) -> None:
    import yaml

    config = yaml.safe_load(Path(args.serve_yaml).read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": args.http_port}
    (application,) = config["applications"]
    settings = application["args"]["settings"]
    settings.pop("model", None)  # the embedded demo model
    settings.update(device="cpu", host="127.0.0.1")
    application["args"]["metrics_port"] = args.metrics_port
    (deployment,) = application["deployments"]
    deployment["ray_actor_options"] = {"num_cpus": 1}
    Path(args.out).write_text(yaml.safe_dump(config, sort_keys=False))


def proxy_error(args: argparse.Namespace) -> None:
    status, headers, body = request(args.url)
    if status != 404 or not headers.get("content-type", "").startswith("application/json"):
        fail(f"GET {args.url}: {status} {headers.get('content-type')} {body[:200]!r}")
    error = json.loads(body)["error"]
    # "Ray Serve: ..." is how ProxyErrorShape words what Ray's proxy said.
    if error["type"] != "not_found" or not error["message"].startswith("Ray Serve: "):
        fail(f"GET {args.url}: not the proxy middleware's error: {error}")
    if error["item"] is not None:
        fail(f"GET {args.url}: item {error['item']!r}")
    print(f"proxy 404 reshaped: {error['message'][:80]}")


def wait_running(args: argparse.Namespace) -> None:
    url = args.dashboard.rstrip("/") + "/api/serve/applications/"
    deadline = time.monotonic() + args.deadline
    status = "not deployed"
    while time.monotonic() < deadline:
        code, _, body = request(url)
        if code == 200:
            application = json.loads(body).get("applications", {}).get(args.app)
            if application is not None:
                status = application["status"]
                if status == "RUNNING":
                    print(f"{args.app} RUNNING")
                    return
                if status in ("DEPLOY_FAILED", "UNHEALTHY"):
                    fail(f"{args.app} {status}: {application.get('message', '')[:2000]}")
        time.sleep(1)
    fail(f"{args.app} not RUNNING within {args.deadline} s (last status: {status})")


def rewards(args: argparse.Namespace) -> None:
    body = Path(args.request).read_bytes()
    headers = {"Content-Type": "application/json"}
    if args.key:
        headers["Authorization"] = f"Bearer {args.key}"
    status, _, answer = request(args.url.rstrip("/") + "/v1/rewards", body, headers)
    if status != 200:
        fail(f"POST /v1/rewards: {status} {answer[:500]!r}")
    items = json.loads(body)["items"]
    results = json.loads(answer)["results"]
    if len(results) != len(items):
        fail(f"{len(results)} results for {len(items)} items")
    for item, result in zip(items, results, strict=True):
        if len(result["token_rewards"]) != len(item["response_ids"]):
            fail(f"{len(result['token_rewards'])} rewards for {len(item['response_ids'])} tokens")
    tokens = sum(len(item["response_ids"]) for item in items)
    summary = f"{len(results)} results, {tokens} token rewards"
    if args.out:
        Path(args.out).write_bytes(answer)
    if args.reference:
        reference = json.loads(Path(args.reference).read_text())["results"]
        worst = 0.0
        for got, want in zip(results, reference, strict=True):
            for key in ("score", "prompt_score"):
                worst = max(worst, abs(got[key] - want[key]))
            for a, b in zip(got["token_rewards"], want["token_rewards"], strict=True):
                worst = max(worst, abs(a - b))
        if worst > TOLERANCE:
            fail(f"rewards differ from the reference by {worst:.3g}")
        summary += f", largest difference from the reference {worst:.3g}"
    print(summary)


def metrics(args: argparse.Namespace) -> None:
    status, _, body = request(args.url)
    if status != 200:
        fail(f"GET {args.url}: {status}")
    match = re.search(r"^tokenreward_items_total (\S+)$", body.decode(), flags=re.M)
    if match is None or float(match.group(1)) != args.items:
        fail(f"{args.url}: tokenreward_items_total {match and match.group(1)}, not {args.items}")
    print(f"replica /metrics: tokenreward_items_total {match.group(1)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    config = commands.add_parser("config")
    config.add_argument("serve_yaml")
    config.add_argument("out")
    config.add_argument("--http-port", type=int, required=True)
    config.add_argument("--metrics-port", type=int, required=True)
    config.set_defaults(run=make_config)
    error = commands.add_parser("proxy-error")
    error.add_argument("url")
    error.set_defaults(run=proxy_error)
    running = commands.add_parser("wait-running")
    running.add_argument("dashboard")
    running.add_argument("--app", default="tokenreward")
    running.add_argument("--deadline", type=float, default=300)
    running.set_defaults(run=wait_running)
    scored = commands.add_parser("rewards")
    scored.add_argument("url")
    scored.add_argument("request")
    scored.add_argument("--key")
    scored.add_argument("--out")
    scored.add_argument("--reference")
    scored.set_defaults(run=rewards)
    counted = commands.add_parser("metrics")
    counted.add_argument("url")
    counted.add_argument("--items", type=float, required=True)
    counted.set_defaults(run=metrics)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
