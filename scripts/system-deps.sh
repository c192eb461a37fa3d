#!/usr/bin/env bash
# Debian packages that tests need beyond Python: a real Prometheus (the dashboard's PromQL is
# evaluated against it) and docker-compose (to validate the compose files offline). With
# `e2e`, also what the container end-to-end run needs. Installs only what is missing; needs
# root (or sudo). --no-install-recommends keeps container engines and exporters from being
# pulled in and started.
set -euo pipefail

packages=()
need() {  # COMMAND PACKAGE
    command -v "$1" >/dev/null 2>&1 || packages+=("$2")
}
need prometheus prometheus
need promtool prometheus
need docker-compose docker-compose
if [ "${1:-}" = "e2e" ]; then
    need podman podman
    need runc runc
    need debootstrap debootstrap
    need curl curl
fi
[ ${#packages[@]} -eq 0 ] && exit 0

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || {
        echo "missing Debian packages: ${packages[*]} (install them as root)" >&2
        exit 1
    }
    sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
