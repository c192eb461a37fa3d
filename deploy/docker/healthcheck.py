#!/usr/bin/env python3
"""Readiness check of the tokenreward server in this container: exit 0 when ``GET /readyz``
answers 200, else 1.

Docker's HEALTHCHECK runs it (the image has no curl). ``/readyz`` needs no API key; the script
still sends the first key it finds, which a server with keys accepts and one without ignores.

Port, host and key are found the way the server finds them: the ``--port``, ``--host`` and
``--api-keys`` flags of the server's own command line (PID 1, when that is ``tokenreward
serve``) win over ``TOKENREWARD_PORT``, ``TOKENREWARD_HOST`` and ``TOKENREWARD_API_KEYS``,
which win over 8000, all interfaces and no key. Standard library only: a probe starts a fresh
interpreter every few seconds, so it must start fast.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["main", "probe_request", "server_args"]

_ANY_ADDRESS = {"", "0.0.0.0", "::", "[::]"}


def server_args(cmdline: Path = Path("/proc/1/cmdline")) -> list[str]:
    """The arguments of PID 1 if it is ``tokenreward serve``, else none."""
    try:
        args = cmdline.read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []
    is_server = "serve" in args and any(
        arg.endswith(("tokenreward", "tokenreward_service.cli")) for arg in args
    )
    return args if is_server else []


def _flag(args: Sequence[str], name: str) -> str | None:
    """The value of the last ``--name V`` or ``--name=V`` (argparse: the last one wins)."""
    value = None
    for index, arg in enumerate(args):
        if arg == name and index + 1 < len(args):
            value = args[index + 1]
        elif arg.startswith(name + "="):
            value = arg[len(name) + 1 :]
    return value


def probe_request(args: Sequence[str], env: Mapping[str, str]) -> urllib.request.Request:
    """The ``/readyz`` request for a server started with ``args`` in environment ``env``."""
    port = _flag(args, "--port") or env.get("TOKENREWARD_PORT") or "8000"
    host = _flag(args, "--host") or env.get("TOKENREWARD_HOST") or ""
    if host in _ANY_ADDRESS:
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    request = urllib.request.Request(f"http://{host}:{port}/readyz")
    keys = _flag(args, "--api-keys") or env.get("TOKENREWARD_API_KEYS") or ""
    key = next((part.strip() for part in keys.split(",") if part.strip()), None)
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    return request


def main(
    args: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 4.0,
) -> int:
    request = probe_request(
        server_args() if args is None else args, os.environ if env is None else env
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            ready = response.status == 200
    except (urllib.error.URLError, OSError) as exc:
        print(f"not ready: {request.full_url}: {exc}", file=sys.stderr)
        return 1
    if not ready:
        print(f"not ready: {request.full_url} answered {response.status}", file=sys.stderr)
    return 0 if ready else 1


if __name__ == "__main__":
    sys.exit(main())
