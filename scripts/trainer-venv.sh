#!/usr/bin/env bash
# A trainer's own virtual environment for the integration tests: .venvs/NAME, built from
# tests/integrations/envs/NAME.txt (pinned, torch first so pip keeps the CPU/CUDA-agnostic
# 2.13.0 instead of pulling a CUDA build), then NAME.nodeps.txt if there is one (packages whose
# own requirements cannot be installed here, with --no-deps: the file says why), plus this
# checkout's client (and server) on the path (the client needs only httpx and pydantic, which
# the file lists).
# Rebuilt only when a file or this script changes; prints how long the install took.
set -euo pipefail
cd "$(dirname "$0")/.."
name="$1"
spec="tests/integrations/envs/$name.txt"
venv=".venvs/$name"
python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
nodeps="tests/integrations/envs/$name.nodeps.txt"
key="$(cat "$spec" "$0" $( [ -f "$nodeps" ] && echo "$nodeps" ) | sha256sum | cut -d' ' -f1)"
if [ -f "$venv/.stamp" ] && [ "$(cat "$venv/.stamp")" = "$key" ]; then
    exit 0
fi
started=$(date +%s)
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet 'torch==2.13.0'
"$venv/bin/python" -m pip install --quiet -r "$spec"
if [ -f "$nodeps" ]; then
    "$venv/bin/python" -m pip install --quiet --no-deps -r "$nodeps"
fi
# This checkout's packages (a path file, like an editable install, without a build in the
# source tree that parallel builds would share): the client, and the server for an environment
# whose file installs the server's requirements.
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
printf '%s\n%s\n' "$PWD/client" "$PWD/service" > "$site/tokenreward.pth"
echo "$key" > "$venv/.stamp"
echo "trainer environment $name installed in $(( $(date +%s) - started )) s" >&2
