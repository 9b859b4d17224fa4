# pgflow runtime image: coordinator, workers and `pgflow init` share it.
#   docker build -t pgflow:0.1.0 .
#   docker run --rm -e PGFLOW_DSN=postgresql://... pgflow:0.1.0 coordinator --metrics-port 9100
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp \
    PGFLOW_HOME=/tmp/pgflow

WORKDIR /build
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install . \
    && rm -rf /build

# Fixed numeric UID/GID so Kubernetes can verify runAsNonRoot
# (deploy/ manifests use runAsUser/runAsGroup 10001).
RUN groupadd --system --gid 10001 pgflow \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin pgflow

# HOME and PGFLOW_HOME (the embedded PostgreSQL used when no DSN is given)
# live under /tmp, writable also with a read-only root filesystem when /tmp
# is a volume, as in deploy/.
WORKDIR /tmp
USER 10001:10001

# /metrics, /healthz and /readyz (--metrics-port)
EXPOSE 9100

# Exec form: pgflow runs as PID 1 and receives SIGTERM directly, which starts
# the worker's drain of in-flight steps (--drain-timeout).
ENTRYPOINT ["pgflow"]
CMD ["--help"]
