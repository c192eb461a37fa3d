# tokenreward server image: the image is the program.
#
#   docker build -t tokenreward .
#   docker run --rm -p 127.0.0.1:8000:8000 tokenreward                      # embedded default model
#   docker run --rm --gpus all -p 127.0.0.1:8000:8000 \
#       -v /srv/reward-models:/models:ro -e TOKENREWARD_MODEL=/models/rm tokenreward
#   docker run --rm tokenreward --help                                        # every serve flag
#
# Arguments after the image name replace CMD and go to `tokenreward serve`; every flag is also
# an environment variable TOKENREWARD_<FLAG> (flags win). Weights come from a mounted volume:
# mount the model folder (read-only is enough) and name it with TOKENREWARD_MODEL (or --model).
# With neither, the server serves its embedded default model.
#
# GPU-capable by default: PyPI's torch wheel for Linux x86_64 carries CUDA, the host brings the
# driver (NVIDIA Container Toolkit: `docker run --gpus all`). On a host without a GPU the same
# image serves on the CPU. For a smaller CPU-only image:
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
#
# Air-gapped builds: put every wheel the build needs (torch, the server's dependencies,
# setuptools and wheel for building the project) in deploy/wheelhouse/, or in another folder of
# the build context named by --build-arg WHEELHOUSE=<folder>. When that folder holds any wheel,
# pip installs from it alone (--no-index), so a missing wheel fails the build instead of
# reaching for the network. For example, on a machine with the same platform and network:
#   pip download --dest deploy/wheelhouse 'torch==2.13.0' '.[server]' setuptools wheel
#
# Needs BuildKit (the default builder of Docker 23 and later; Podman/Buildah too): the runtime
# stage installs the builder's wheels through a bind mount, so they never become an image layer.

# A local base can be substituted (a mirror, or an image made with debootstrap). It needs
# Python 3.10 or later with the venv module (Debian: python3 and python3-venv).
ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------
# builder: every wheel the server needs, the project's own included, in /wheels.
FROM ${BASE_IMAGE} AS builder

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=
ARG WHEELHOUSE=deploy/wheelhouse

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

# A virtual environment, so the system Python of a Debian base (externally managed) is left alone.
RUN python3 -m venv /opt/build
WORKDIR /src

COPY ${WHEELHOUSE}/ /wheelhouse/
COPY pyproject.toml README.md ./
COPY client/ client/
COPY service/ service/

RUN set -eu; \
    if ls /wheelhouse/*.whl >/dev/null 2>&1; then \
        echo "installing from the wheelhouse only (no index)"; \
        export PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheelhouse; \
    fi; \
    /opt/build/bin/pip wheel --wheel-dir /wheels \
        ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        "torch==${TORCH_VERSION}" ".[server]"; \
    ls /wheels/tokenreward-*.whl; \
    cd /wheels && sha256sum -- *.whl >SHA256SUMS

# ---------------------------------------------------------------------------------------------
# runtime: the base image, a virtual environment with the server, and nothing used to build it.
FROM ${BASE_IMAGE} AS runtime

ARG TORCH_VERSION=2.13.0

LABEL org.opencontainers.image.title="tokenreward" \
      org.opencontainers.image.description="Token-level rewards for RLHF, served over HTTP" \
      org.opencontainers.image.licenses="Apache-2.0"

# Caches that libraries may write go to /tmp (writable; an emptyDir under Kubernetes). Weights
# are read from local folders only, never fetched from a hub.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/tokenreward/bin:$PATH \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/.cache/huggingface \
    HF_HUB_OFFLINE=1 \
    TORCHINDUCTOR_CACHE_DIR=/tmp/.cache/torchinductor

# A fixed UID/GID, so volume permissions and Kubernetes' runAsUser can name it.
RUN groupadd --system --gid 10001 tokenreward \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin tokenreward \
    && mkdir -p /models

# The wheels' checksums: this layer changes whenever a wheel does (the project's own with every
# source change), so the install below is never taken from a stale cache. BuildKit keys a bind
# mount on its content, but not every builder does (Buildah, under Podman, does not).
COPY --from=builder /wheels/SHA256SUMS /opt/tokenreward-wheels.sha256
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python3 -m venv /opt/tokenreward \
    && /opt/tokenreward/bin/pip install --no-index --find-links /wheels \
        "torch==${TORCH_VERSION}" "tokenreward[server]" \
    && tokenreward serve --help >/dev/null

COPY deploy/docker/healthcheck.py /usr/local/bin/tokenreward-healthcheck

USER 10001:10001
WORKDIR /tmp
EXPOSE 8000

# GET /readyz (with the API key when keys are set); the start period covers loading a large
# model, which happens before the server answers at all.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "/usr/local/bin/tokenreward-healthcheck"]

ENTRYPOINT ["tokenreward", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
