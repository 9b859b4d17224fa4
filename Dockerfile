# pgflow runtime image: `pgflow init`, the coordinator and the workers share it.
#
#   docker build -t pgflow:0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" \
#       --build-arg SOURCE=https://git.example.com/you/pgflow .
#   docker run --rm -e PGFLOW_DSN=postgresql://... pgflow:0.1.0 init
#   docker run --rm -e PGFLOW_DSN=postgresql://... pgflow:0.1.0 coordinator --metrics-port 9100
#
# Your flows live in your own image built FROM this one, run with `worker --import <module>`
# (deploy/README.md, "Your flow code"; worked example in deploy/examples/orders/).
#
# Base: debian:bookworm-slim and Debian's own python3 (3.11), not python:3.11-slim. The interpreter then comes
# from Debian's archive with Debian's security updates, and the base is a plain debootstrap minbase that any
# machine with a Debian mirror can rebuild (.ci/docker-setup does where no registry is reachable) instead of
# an image only a registry can supply. Two stages: `build` makes a virtualenv in /opt/pgflow (python3-venv,
# pip and its downloads stay there); the final stage copies only that virtualenv. No compiler is installed
# anywhere: every dependency ships a binary wheel.
#
# Plain Dockerfile syntax only (no RUN --mount, no heredocs), so the classic builder builds it as well.

FROM debian:bookworm-slim AS python

# Debian's packages move with bookworm's point releases: pinning them would break the build each release.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 ca-certificates \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*


FROM python AS build

# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*

# PEM text of extra CA certificates pip must trust, for networks whose egress proxy re-signs TLS (on a normal
# network leave it empty). Only this stage sees it; it never reaches the final image.
ARG EXTRA_CA_CERTS=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/opt/build-ca-certificates.crt
# pip (a current one: Debian's bundled 23.0 has known flaws) stays in the virtualenv, so that images built
# FROM this one can install their flows' dependencies; setuptools goes once pgflow is installed.
RUN cat /etc/ssl/certs/ca-certificates.crt > "$PIP_CERT" \
    && printf '%s\n' "$EXTRA_CA_CERTS" >> "$PIP_CERT" \
    && python3 -m venv /opt/pgflow \
    && /opt/pgflow/bin/pip install pip==26.3

# The dependencies first, read from pyproject.toml, so their layer stays cached while only src/ or the README
# change.
WORKDIR /build
COPY pyproject.toml ./
RUN python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > requirements.txt \
    && /opt/pgflow/bin/pip install --only-binary=:all: -r requirements.txt

COPY README.md ./
COPY src ./src
RUN /opt/pgflow/bin/pip install --no-deps . \
    && /opt/pgflow/bin/pip uninstall -y setuptools \
    && /opt/pgflow/bin/pgflow --help > /dev/null


FROM python

# Fixed numeric UID/GID so Kubernetes can verify runAsNonRoot
# (deploy/ manifests use runAsUser/runAsGroup 10001).
RUN groupadd --gid 10001 pgflow \
    && useradd --uid 10001 --gid 10001 --no-create-home --no-log-init \
       --home-dir /nonexistent --shell /usr/sbin/nologin pgflow

# HOME and PGFLOW_HOME (the embedded PostgreSQL used when no DSN is given) live under /tmp, writable also
# with a read-only root filesystem when /tmp is a tmpfs or volume, as in deploy/. The code is owned by root
# and compiled at build time, so nothing under /opt/pgflow is ever written.
ENV PATH=/opt/pgflow/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp \
    PGFLOW_HOME=/tmp/pgflow

COPY --from=build /opt/pgflow /opt/pgflow

WORKDIR /tmp
USER 10001:10001

# /metrics, /healthz and /readyz (--metrics-port)
EXPOSE 9100

# OCI annotations. VERSION follows pyproject.toml (tests/deploy/test_deploy.py checks); pass REVISION (the commit)
# and SOURCE (the repository URL) when building. Last, so a new commit rebuilds nothing but this metadata.
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=unknown
LABEL org.opencontainers.image.title="pgflow" \
      org.opencontainers.image.description="Durable DAG workflows whose only infrastructure is PostgreSQL: pgflow init, coordinator and worker" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="$VERSION" \
      org.opencontainers.image.revision="$REVISION" \
      org.opencontainers.image.source="$SOURCE" \
      org.opencontainers.image.base.name="docker.io/library/debian:bookworm-slim"

# Exec form: pgflow runs as PID 1 and receives SIGTERM directly, which starts the worker's drain of in-flight
# steps (--drain-timeout). A worker's children compare their parent with the supervisor's pid, so PID 1 is
# fine; no init process is needed.
ENTRYPOINT ["pgflow"]
CMD ["--help"]
