# syntax=docker/dockerfile:1
# The one Spaces image: `spaces serve --services ...` for the API services, `spaces media-node`
# for media nodes, `spaces drain` as their preStop hook. See docs/operations.md.
#
#   docker build -t ghcr.io/spaces-oss/spaces:0.1.0 .
#
# Both stages use the same base, so the virtualenv built in the first runs unchanged in the
# second. Every dependency ships manylinux wheels (PyAV bundles FFmpeg); the one compiled part,
# the native data plane (media-node/native/), is built in the first stage against Debian's
# libsrtp2-dev and libssl-dev; libsrtp2's shared library travels in /opt/spaces/lib (libssl3 is
# in the base image), so the second stage installs nothing. Pin by digest (python:3.11.13-slim-bookworm@sha256:...) for reproducible builds.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       gcc libc6-dev libsrtp2-dev libssl-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
RUN python -m venv /opt/spaces
COPY pyproject.toml setup.py README.md ./
COPY services ./services
COPY media-node ./media-node
COPY web ./web
# Byte-compiled here, because the runtime root filesystem is read-only. The import check fails
# the build if the wheel left a package out.
RUN /opt/spaces/bin/pip install . \
    && /opt/spaces/bin/python -c "import spaces.cli, spaces.server, spaces.media.node, spaces.media._dataplane, spaces.signal.service; spaces.signal.service.web_asset('spaces.js')" \
    && /opt/spaces/bin/spaces --help > /dev/null \
    && mkdir -p /opt/spaces/lib && cp -L /usr/lib/*-linux-gnu/libsrtp2.so.1 /opt/spaces/lib/ \
    && /opt/spaces/bin/pip uninstall --yes pip setuptools wheel

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.source="https://github.com/spaces-oss/spaces" \
      org.opencontainers.image.description="Spaces: self-hosted real-time video (gRPC API and media nodes)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 spaces \
    && useradd --system --uid 10001 --gid spaces --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin spaces
COPY --from=builder /opt/spaces /opt/spaces
ENV PATH=/opt/spaces/bin:$PATH \
    LD_LIBRARY_PATH=/opt/spaces/lib \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SPACES_GRPC_ADDR=0.0.0.0:50051 \
    SPACES_METRICS_ADDR=0.0.0.0:9464
# Numeric, so Kubernetes can verify runAsNonRoot without looking the name up.
USER 10001:10001
WORKDIR /tmp
# 50051: gRPC (every service, health, reflection). 9464: Prometheus /metrics. 8080: the
# signaling service for browsers (SPACES_SIGNAL_ADDR). Media nodes also use a UDP range
# (SPACES_UDP_PORT_RANGE) on the host network.
EXPOSE 50051 9464 8080
ENTRYPOINT ["spaces"]
CMD ["serve"]
