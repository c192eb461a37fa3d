#!/usr/bin/env bash
# Every trainer environment of tests/integrations/envs (scripts/trainer-venv.sh), built side by
# side: the installs mostly wait on downloads and unpacking, so running them together takes
# little more than the slowest one. Each build's output goes to .venvs/NAME.log, shown if it fails.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .venvs
names=()
pids=()
for spec in tests/integrations/envs/*.txt; do
    case "$spec" in *.nodeps.txt) continue ;; esac
    name="$(basename "$spec" .txt)"
    scripts/trainer-venv.sh "$name" > ".venvs/$name.log" 2>&1 &
    names+=("$name")
    pids+=("$!")
done
failed=0
for i in "${!pids[@]}"; do
    if wait "${pids[$i]}"; then
        grep -h "installed in" ".venvs/${names[$i]}.log" >&2 || true
    else
        echo "trainer environment ${names[$i]} failed:" >&2
        tail -n 40 ".venvs/${names[$i]}.log" >&2
        failed=1
    fi
done
exit "$failed"
