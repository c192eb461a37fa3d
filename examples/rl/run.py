"""Dense vs sparse rewards for PPO, across the network: the whole comparison.

    python examples/rl/run.py --out docs/rl            # make rl-demo: 3 arms x 3 seeds
    python examples/rl/run.py --smoke --out /tmp/rl    # one seed, a few updates, seconds

It pre-trains the policy (or reuses it), starts the reward service (``tokenreward serve``, the
demo RM, with the policy's tokenizer loaded as ``policy``), and for each arm (β_c: 0 sparse, 0.5
mixed, 1 dense) and seed starts a learner and a rollout worker, each its own process. Every
run's curves go to ``<out>/runs/``; the summary (final scores, updates to reach a score, sample
texts) to ``<out>/rl-summary.json``, the curves to ``<out>/rl-curves.png``.

The service runs with ``--batching off``: each request is batched alone, so a run's rewards do
not depend on what another run sends at the same time, and a seed reproduces its numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import POLICY_NAME, RunConfig
from policy import PolicyRecipe, ensure_policy

HERE = Path(__file__).resolve().parent
SMOKE_POLICY = PolicyRecipe(hidden=32, steps=30, vocab_size=1024)
SMOKE_RUN = {"updates": 3, "prompts_per_update": 4, "samples_per_prompt": 2, "ppo_epochs": 1}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_service(
    policy_dir: Path, workdir: Path, rm: Path | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """``tokenreward serve`` with the demo RM (or ``rm``) and the policy's tokenizer, once it
    is ready."""
    from tokenreward import RewardClient

    port = free_port()
    command = [
        str(Path(sys.executable).with_name("tokenreward")),
        "serve",
        "--port",
        str(port),
        "--policy-tokenizer",
        f"{POLICY_NAME}={policy_dir}",
        "--batching",
        "off",
        "--shutdown-delay-s",
        "0",
        "--log-level",
        "warning",
        *(["--model", str(rm)] if rm is not None else []),
    ]
    service_log = (workdir / "service.log").open("wb")
    process = subprocess.Popen(command, stdout=service_log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    with RewardClient(url, timeout=5.0) as client:
        while not client.ready():
            if process.poll() is not None:
                raise RuntimeError(
                    f"the service exited ({process.returncode}): see {service_log.name}"
                )
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError("the service was not ready within 120 s")
            time.sleep(0.2)
    log(f"service: ready at {url}")
    return process, url


def launch(policy_dir: Path, url: str, config: RunConfig, curves: Path) -> tuple[Any, Any]:
    """A learner and its rollout worker, each a process of its own."""
    env = {**os.environ, "TOKENREWARD_RL_AUTHKEY": secrets.token_hex(16), "PYTHONUNBUFFERED": "1"}
    learner = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "learner.py"),
            "--policy",
            str(policy_dir),
            "--config",
            config.to_json(),
            "--curves",
            str(curves),
        ],
        stdout=subprocess.PIPE,
        env=env,
    )
    assert learner.stdout is not None
    line = learner.stdout.readline().decode()
    if not line.startswith("LISTENING "):
        learner.kill()
        raise RuntimeError(f"the learner did not start: {line!r}")
    port = int(line.split()[1])
    worker = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "rollout.py"),
            "--learner",
            f"127.0.0.1:{port}",
            "--service",
            url,
            "--policy",
            str(policy_dir),
            "--beta-c",
            str(config.beta_c),
        ],
        env=env,
    )
    return learner, worker


def run_all(
    configs: list[RunConfig], policy_dir: Path, url: str, runs_dir: Path, parallel: int
) -> list[Path]:
    runs_dir.mkdir(parents=True, exist_ok=True)
    pending = list(configs)
    active: list[tuple[RunConfig, Path, Any, Any]] = []
    done: list[Path] = []
    started = time.perf_counter()
    try:
        _drive(configs, pending, active, done, policy_dir, url, runs_dir, parallel, started)
    finally:
        for _, _, learner, worker in active:  # a failed run stops its siblings too
            for process in (learner, worker):
                if process.poll() is None:
                    process.kill()
                    process.wait()
    return done


def _drive(
    configs: list[RunConfig],
    pending: list[RunConfig],
    active: list[tuple[RunConfig, Path, Any, Any]],
    done: list[Path],
    policy_dir: Path,
    url: str,
    runs_dir: Path,
    parallel: int,
    started: float,
) -> None:
    while pending or active:
        while pending and len(active) < parallel:
            config = pending.pop(0)
            curves = runs_dir / f"beta{config.beta_c:g}-seed{config.seed}.json"
            active.append((config, curves, *launch(policy_dir, url, config, curves)))
        for entry in list(active):
            config, curves, learner, worker = entry
            if learner.poll() is None and worker.poll() is None:
                continue
            learner_rc, worker_rc = learner.wait(timeout=60), worker.wait(timeout=60)
            if learner_rc or worker_rc or not curves.exists():
                raise RuntimeError(
                    f"run {curves.name}: learner exited {learner_rc}, worker {worker_rc}"
                )
            active.remove(entry)
            done.append(curves)
            elapsed = time.perf_counter() - started
            eta = elapsed / len(done) * (len(configs) - len(done))
            log(f"run {len(done)}/{len(configs)} done ({curves.name}), ETA {eta / 60:.1f} min")
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--policy", type=Path, default=None, help="default: <repo>/build/rl/policy")
    parser.add_argument("--arms", default=None, help="β_c values (default 0,0.5,1; smoke: 0,1)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rm", type=Path, default=None, help="another RM (default: the demo RM)")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time")
    parser.add_argument("--smoke", action="store_true", help="a tiny policy, one seed, 3 updates")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a RunConfig field"
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    overrides: dict[str, Any] = dict(SMOKE_RUN) if args.smoke else {}
    defaults = RunConfig()
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in {f.name for f in dataclasses.fields(RunConfig)}:
            parser.error(f"--set: no run setting {key!r}")
        overrides[key] = type(getattr(defaults, key))(value)
    seeds = [0] if args.smoke else [int(s) for s in args.seeds.split(",")]
    arms = [float(a) for a in (args.arms or ("0,1" if args.smoke else "0,0.5,1")).split(",")]
    configs = [RunConfig(beta_c=arm, seed=seed, **overrides) for seed in seeds for arm in arms]
    recipe = SMOKE_POLICY if args.smoke else PolicyRecipe()
    policy_dir = args.policy or (
        args.out / "policy" if args.smoke else HERE.parents[1] / "build" / "rl" / "policy"
    )
    ensure_policy(recipe, policy_dir, log)
    service, url = start_service(policy_dir, args.out, args.rm)
    try:
        paths = run_all(configs, policy_dir, url, args.out / "runs", args.parallel)
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(timeout=60)
    from summary import summarise

    summary = summarise([json.loads(p.read_text()) for p in paths], args.out)
    summary["seconds"] = time.perf_counter() - started
    (args.out / "rl-summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    for line in summary["table"]:
        log(line)
    log(f"done in {summary['seconds'] / 60:.1f} min: {args.out / 'rl-summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
