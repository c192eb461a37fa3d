#!/usr/bin/env bash
# End-to-end run of the container images (the server's and the Ray image) and of the compose
# stack with podman, on a machine that reaches no container registry:
#
#   1. base       a Debian bookworm base image made with debootstrap (python3, python3-venv)
#   2. wheelhouse torch==2.13.0 and the project's server and ray dependencies, downloaded on
#                 the host
#   3. build      the Dockerfile, from that base and wheelhouse, installing offline
#   4. container  the image alone: embedded default model; a mounted model with an API key;
#                 its health check; a graceful stop
#   5. ray-build  the Ray image (deploy/ray/Containerfile) FROM that image, offline too
#   6. ray        the Ray image as KubeRay runs a head node (bash -lc "ulimit ...; ray start
#                 --head --block"): deploy/ray/rayservice.yaml's probes; Serve's proxy's own
#                 404, reshaped by the proxy middleware; a CPU variant of deploy/ray/serve.yaml
#                 sent with `serve deploy` (the dashboard's REST API, as KubeRay sends
#                 serveConfigV2): the server image's rewards, one per response token, and the
#                 replica's /metrics; then SIGTERM ends the node
#   7. compose    docker-compose.yml + docker-compose.ci.yml with podman-compose: tokenreward,
#                 Prometheus (Debian's package in a local image) and the load generator; then
#                 every dashboard expression evaluated against that Prometheus
#
# Needs, as root: apt-get install -y podman runc debootstrap; a Python 3.11 for the wheelhouse
# (the base's Python is 3.11). Host networking only; the servers listen on 127.0.0.1 (Ray's
# internal services on free ports of every interface, as Ray binds them). Compose uses the
# ports 8000 and 9090, which must be free.
#
#   deploy/e2e/run.sh [STEP...]      # default: all steps; finished artefacts are reused
#
# Settings (environment): E2E_WORK (work folder, /tmp/tokenreward-e2e), PYTHON (the Python for
# `pip download`, .venv/bin/python), DEBIAN_MIRROR, TORCH_INDEX_URL (e.g. PyTorch's CPU index
# where no CPU wheel of torch is at hand; without it PyPI's CUDA build is downloaded).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
WORK=${E2E_WORK:-/tmp/tokenreward-e2e}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE_IMAGE=localhost/tokenreward-base:bookworm
IMAGE=localhost/tokenreward:e2e
RAY_IMAGE=localhost/tokenreward-ray:e2e
PROMETHEUS_IMAGE=localhost/tokenreward-e2e-prometheus:latest
PROJECT=tokenreward-e2e
export CONTAINERS_CONF="$REPO/deploy/e2e/containers.conf"

mkdir -p "$WORK"
TIMINGS="$WORK/timings.txt"

log() { printf '[e2e %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

step() {
    local name=$1 started=$EPOCHREALTIME
    shift
    log "step $name"
    "$@"
    local seconds
    seconds=$(awk -v a="$started" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
    log "step $name done in ${seconds} s"
    printf '%s\t%s s\n' "$name" "$seconds" >>"$TIMINGS"
}

wait_http() {  # URL SECONDS [CURL ARGS...]: until URL answers 200
    local url=$1 seconds=$2
    shift 2
    for _ in $(seq "$seconds"); do
        if [ "$(curl -s -o /dev/null -w '%{http_code}' "$@" "$url")" = 200 ]; then return 0; fi
        sleep 1
    done
    log "no 200 from $url within $seconds s"
    return 1
}

wait_answer() {  # URL SECONDS: until URL answers anything (a server listens there)
    for _ in $(seq "$2"); do
        if [ "$(curl -s -o /dev/null -w '%{http_code}' "$1")" != 000 ]; then return 0; fi
        sleep 1
    done
    log "no answer from $1 within $2 s"
    return 1
}

free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

check_tools() {
    local missing=()
    for tool in podman runc debootstrap curl; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        log "missing: ${missing[*]}; install with: apt-get install -y podman runc debootstrap curl"
        return 1
    fi
    "$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' || {
        log "PYTHON=$PYTHON must be Python 3.11, the Python of the Debian bookworm base"
        return 1
    }
}

make_base() {
    if podman image exists "$BASE_IMAGE"; then log "$BASE_IMAGE exists"; return; fi
    local rootfs="$WORK/rootfs"
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" "$DEBIAN_MIRROR" >"$WORK/debootstrap.log" 2>&1
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | podman import --change 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
}

make_wheelhouse() {
    # Both images' wheels: the server image's, and the Ray image's `ray` extra. The marker
    # holds the requirements it was made for; other requirements add what they lack.
    local wheelhouse="$WORK/wheelhouse"
    local wanted=('torch==2.13.0' "${REPO}[server,ray]" 'setuptools>=68' wheel)
    if [ "$(cat "$wheelhouse/.complete" 2>/dev/null)" = "${wanted[*]}" ]; then
        log "wheelhouse exists"
        return
    fi
    mkdir -p "$wheelhouse"
    # --find-links: a wheel already there (torch's CPU build) is kept, not fetched again.
    # shellcheck disable=SC2086
    "$PYTHON" -m pip download --quiet --dest "$wheelhouse" --find-links "$wheelhouse" \
        ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "${wanted[@]}"
    printf '%s' "${wanted[*]}" >"$wheelhouse/.complete"
}

make_context() {
    # What the Dockerfile copies, plus the wheelhouse as a top-level folder (WHEELHOUSE=wheelhouse).
    local context="$WORK/context"
    rm -rf "$context"
    mkdir -p "$context/deploy"
    cp "$REPO/Dockerfile" "$REPO/.dockerignore" "$REPO/pyproject.toml" "$REPO/README.md" "$context/"
    cp -r "$REPO/client" "$REPO/service" "$context/"
    cp -r "$REPO/deploy/docker" "$REPO/deploy/wheelhouse" "$context/deploy/"
    cp -rl "$WORK/wheelhouse" "$context/wheelhouse"  # hard links: the wheels are not copied
}

build_image() {
    make_context
    # --format docker: the OCI image format has no HEALTHCHECK.
    podman build --format docker --network host -t "$IMAGE" \
        --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg WHEELHOUSE=wheelhouse \
        "$WORK/context" >"$WORK/build.log" 2>&1
    podman image inspect "$IMAGE" --format '{{.Size}}' | awk '{ printf "image size %.0f MB\n", $1 / 1e6 }'
}

stop_container() {  # NAME: SIGTERM, wait, and require a clean exit
    local code
    podman stop --time 60 "$1" >/dev/null
    code=$(podman inspect "$1" --format '{{.State.ExitCode}}')
    podman rm "$1" >/dev/null
    [ "$code" = 0 ] || { log "$1 exited with $code"; return 1; }
}

run_container() {
    local port name=tokenreward-e2e-run models="$WORK/models"
    port=$(free_port)
    podman rm -f "$name" >/dev/null 2>&1 || true
    # a) The embedded default model; the image's own CMD but on loopback and a free port.
    podman run -d --name "$name" --network host "$IMAGE" --host 127.0.0.1 --port "$port" >/dev/null
    wait_http "http://127.0.0.1:$port/readyz" 180
    podman healthcheck run "$name"
    curl -sf "http://127.0.0.1:$port/v1/rewards" -H 'Content-Type: application/json' \
        -d '{"items": [{"prompt_ids": [1, 2, 3], "response_ids": [4, 5]}]}' >/dev/null
    # (Read whole, then searched: `curl | grep -q` fails under pipefail when grep stops early.)
    local metrics model
    metrics=$(curl -sf "http://127.0.0.1:$port/metrics")
    grep -q '^tokenreward_items_total 1.0$' <<<"$metrics"
    stop_container "$name"
    # b) A model from a read-only volume, API keys, a read-only root file system.
    rm -rf "$models"
    "$PYTHON" -c "from tokenreward_service.tiny import save_tiny_reward_model as s; s('$models/rm', 'llama', seed=3)"
    chmod -R a+rX "$models"  # the image's user (UID 10001) must be able to read the weights
    podman run -d --name "$name" --network host --read-only --tmpfs /tmp \
        -v "$models:/models:ro" -e TOKENREWARD_MODEL=/models/rm \
        -e TOKENREWARD_API_KEYS=e2e-key-0123456789 \
        "$IMAGE" --host 127.0.0.1 --port "$port" >/dev/null
    wait_http "http://127.0.0.1:$port/readyz" 180 -H 'Authorization: Bearer e2e-key-0123456789'
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/readyz")" = 200 ]  # probes need no key
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/v1/model")" = 401 ]
    podman healthcheck run "$name"  # sends the key from the container's environment
    model=$(curl -sf -H 'Authorization: Bearer e2e-key-0123456789' "http://127.0.0.1:$port/v1/model")
    grep -q '"random_weights":false' <<<"$model"
    stop_container "$name"
}

build_ray_image() {
    podman image exists "$IMAGE" || { log "$IMAGE is missing: run the build step first"; return 1; }
    make_context  # the Containerfile reads the wheelhouse only, as the Dockerfile does
    podman build --format docker --network host -t "$RAY_IMAGE" \
        --build-arg IMAGE="$IMAGE" --build-arg WHEELHOUSE=wheelhouse \
        -f "$REPO/deploy/ray/Containerfile" "$WORK/context" >"$WORK/ray-build.log" 2>&1
    podman image inspect "$RAY_IMAGE" --format '{{.Size}}' |
        awk '{ printf "Ray image size %.0f MB\n", $1 / 1e6 }'
}

RAY_ITEMS='{"items": [
    {"id": "a", "prompt_ids": [1, 2, 3], "response_ids": [4, 5]},
    {"id": "b", "prompt_ids": [7], "response_ids": [8, 9, 10, 11, 12]},
    {"id": "c", "prompt_ids": [20, 21, 22, 23], "response_ids": [24]}]}'

run_ray() {
    local name=tokenreward-e2e-ray plain=tokenreward-e2e-run folder="$WORK/ray"
    local key=e2e-key-0123456789 check=("$PYTHON" "$REPO/deploy/e2e/ray_check.py")
    local port gcs dashboard agent client ray_metrics http metrics start started code
    podman image exists "$RAY_IMAGE" || { log "no $RAY_IMAGE: run ray-build first"; return 1; }
    rm -rf "$folder"
    mkdir -p "$folder"
    printf '%s\n' "$RAY_ITEMS" >"$folder/request.json"
    # The reference: the plain image's answer to the same items.
    port=$(free_port)
    podman rm -f "$plain" >/dev/null 2>&1 || true
    podman run -d --name "$plain" --network host "$IMAGE" --host 127.0.0.1 --port "$port" >/dev/null
    wait_http "http://127.0.0.1:$port/readyz" 180
    "${check[@]}" rewards "http://127.0.0.1:$port" "$folder/request.json" --out "$folder/plain.json"
    stop_container "$plain"

    # A head node as KubeRay starts one: its command, free ports (host networking), CPUs for
    # the replica, /dev/shm for the object store (KubeRay mounts a memory volume there),
    # the API key from the environment as the RayService's Secret gives it. KubeRay's ulimit
    # reads RAY_START_ULIMIT_OPEN_FILES: here it is containers.conf's limit, which a sandbox
    # cannot raise to the default 65536.
    gcs=$(free_port) dashboard=$(free_port) agent=$(free_port) client=$(free_port)
    ray_metrics=$(free_port) http=$(free_port) metrics=$(free_port)
    "${check[@]}" config "$REPO/deploy/ray/serve.yaml" "$folder/serve.yaml" \
        --http-port "$http" --metrics-port "$metrics"
    chmod -R a+rX "$folder"
    start="ray start --head --block --port=$gcs --num-cpus=2"
    start+=" --object-store-memory=268435456 --dashboard-host=127.0.0.1"
    start+=" --dashboard-port=$dashboard --dashboard-agent-listen-port=$agent"
    start+=" --ray-client-server-port=$client --metrics-export-port=$ray_metrics"
    podman rm -f "$name" >/dev/null 2>&1 || true
    podman run -d --name "$name" --network host --shm-size 512m -v "$folder:/e2e:ro" \
        -e TOKENREWARD_API_KEYS="$key" -e RAY_START_ULIMIT_OPEN_FILES=20000 \
        -e RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=5 "$RAY_IMAGE" \
        /bin/bash -lc -- "ulimit -n \${RAY_START_ULIMIT_OPEN_FILES:-65536}; $start" >/dev/null
    # deploy/ray/rayservice.yaml's probes: the head's GCS through the dashboard, a node's raylet
    # through its dashboard agent.
    wait_http "http://127.0.0.1:$dashboard/api/gcs_healthz" 180
    wait_http "http://127.0.0.1:$agent/api/local_raylet_healthz" 60
    # Serve, then its proxy's own 404 (no application yet): the middleware gives it the
    # service's error shape.
    podman exec "$name" serve start --http-host 127.0.0.1 --http-port "$http" \
        >"$folder/serve-start.log" 2>&1
    wait_answer "http://127.0.0.1:$http/-/routes" 60  # 503 until an application has routes
    "${check[@]}" proxy-error "http://127.0.0.1:$http/v1/model"
    # The application, through the dashboard's REST API as KubeRay sends serveConfigV2.
    podman exec "$name" serve deploy --address "http://127.0.0.1:$dashboard" /e2e/serve.yaml \
        >"$folder/serve-deploy.log" 2>&1
    "${check[@]}" wait-running "http://127.0.0.1:$dashboard" --deadline 300
    wait_http "http://127.0.0.1:$http/-/healthz" 60  # a worker pod's readiness probe
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$http/v1/model")" = 401 ]
    "${check[@]}" rewards "http://127.0.0.1:$http" "$folder/request.json" --key "$key" \
        --reference "$folder/plain.json"
    "${check[@]}" metrics "http://127.0.0.1:$metrics/metrics" --items 3
    # KubeRay's command worked as written (the ulimit, the object store in /dev/shm), and the
    # image's environment keeps usage statistics off.
    podman logs "$name" >"$folder/head.log" 2>&1
    if grep -E 'ulimit: |instead of /dev/shm' "$folder/head.log"; then return 1; fi
    grep -q 'Usage stats collection is disabled' "$folder/head.log"
    # Kubernetes stops a pod with SIGTERM: `ray start --block` (bash execs it: PID 1) asks Ray
    # to drain the node, then ends every Ray process and exits with 1. A head node never
    # finishes draining (its Serve controller stays), so Ray waits out
    # RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S (30 s by default; 5 s here).
    started=$EPOCHREALTIME
    podman stop --time 60 "$name" >/dev/null
    code=$(podman inspect "$name" --format '{{.State.ExitCode}}')
    podman logs "$name" >"$folder/head.log" 2>&1
    podman rm "$name" >/dev/null
    log "Ray head stopped in $(awk -v a="$started" -v b="$EPOCHREALTIME" \
        'BEGIN { printf "%.1f", b - a }') s, exit code $code"
    [ "$code" = 0 ] || [ "$code" = 1 ] || { log "$name exited with $code"; return 1; }
}

compose() {
    "$WORK/compose-venv/bin/podman-compose" -p "$PROJECT" \
        -f "$REPO/docker-compose.yml" -f "$REPO/docker-compose.ci.yml" "$@"
}

COMPOSE_UP=0
cleanup() {  # whatever a failed step left running
    local name
    for name in tokenreward-e2e-run tokenreward-e2e-ray; do  # one each: a missing one stops rm
        podman rm -f "$name" >/dev/null 2>&1 || true
    done
    if [ "$COMPOSE_UP" = 1 ]; then compose --profile loadgen down -v >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

run_compose() {
    if [ ! -x "$WORK/compose-venv/bin/podman-compose" ]; then
        python3 -m venv "$WORK/compose-venv"
        "$WORK/compose-venv/bin/pip" install --quiet podman-compose
    fi
    podman image exists "$PROMETHEUS_IMAGE" || podman build --network host \
        --build-arg BASE_IMAGE="$BASE_IMAGE" -t "$PROMETHEUS_IMAGE" \
        -f "$REPO/deploy/e2e/prometheus.Containerfile" "$REPO/deploy/e2e" >"$WORK/prometheus-build.log" 2>&1
    export IMAGE_TAG=e2e PROMETHEUS_IMAGE LOADGEN_RUNS=2
    COMPOSE_UP=1
    compose --profile loadgen up -d >"$WORK/compose-up.log" 2>&1
    wait_http http://127.0.0.1:8000/readyz 180
    wait_http http://127.0.0.1:9090/-/ready 60
    # Refused requests, twice a scrape interval apart, so the error panels have rates too.
    for _ in 1 2; do
        curl -s -o /dev/null http://127.0.0.1:8000/v1/rewards -d '{not json'
        curl -s -o /dev/null http://127.0.0.1:8000/v1/rewards -H 'Content-Type: application/json' \
            -d '{"items": [{"prompt_ids": [1], "response_ids": [99999999]}]}'
        curl -s -o /dev/null http://127.0.0.1:8000/no-such-route
        sleep 6
    done
    "$PYTHON" "$REPO/deploy/e2e/check_dashboard.py" --prometheus http://127.0.0.1:9090 --deadline 120
    local report=""
    for _ in $(seq 120); do  # the load generator's report
        report=$(compose --profile loadgen logs loadgen 2>/dev/null || true)
        grep -q '"items_per_s"' <<<"$report" && break
        sleep 1
    done
    grep -q '"items_per_s"' <<<"$report"
    compose --profile loadgen down -v >"$WORK/compose-down.log" 2>&1
    COMPOSE_UP=0
}

main() {
    local steps=("$@")
    [ "${#steps[@]}" -gt 0 ] || steps=(base wheelhouse build container ray-build ray compose)
    : >"$TIMINGS"
    step tools check_tools
    for name in "${steps[@]}"; do
        case $name in
            base) step base make_base ;;
            wheelhouse) step wheelhouse make_wheelhouse ;;
            build) step build build_image ;;
            container) step container run_container ;;
            ray-build) step ray-build build_ray_image ;;
            ray) step ray run_ray ;;
            compose) step compose run_compose ;;
            *) log "unknown step $name"; return 2 ;;
        esac
    done
    log "timings:"
    cat "$TIMINGS" >&2
}

main "$@"
