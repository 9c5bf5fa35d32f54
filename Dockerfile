# syntax=docker/dockerfile:1
#
# mqtt-kinesis-gateway container image.
#
#   docker build -t mqtt-kinesis-gateway:0.1.0 .
#
# Two stages: the builder makes a wheel of the project and installs it with its dependencies
# into a virtualenv at /opt/venv; the runtime stage copies only that venv onto a clean slim
# base, so the image carries no build tools, no pip cache and no source tree.
# Both stages use the same base image, so the venv's interpreter symlink stays valid.
# Python 3.11 is the version the test suite runs on; bump both FROM lines together.

FROM python:3.11-slim-bookworm AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv

WORKDIR /src

# Dependencies first, from pyproject.toml alone: this layer is rebuilt only when the
# dependency list changes, not on every code change. Every dependency ships manylinux
# wheels, so no compiler is needed even here.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
    && /opt/venv/bin/pip install --no-cache-dir -r requirements.txt

# Then the project itself, as a wheel (what a user installing from PyPI would get), with
# --no-deps because the layer above already holds them.
COPY README.md ./
COPY gateway/ gateway/
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps /wheels/*.whl

# The spool's directory, empty, for the runtime stage to copy with its owner: the runtime stage
# builds nothing, and a VOLUME over a directory the image lacks would be root's, not writable by
# the gateway's user.
RUN mkdir -p /var/spool/mqtt-kinesis-gateway


FROM python:3.11-slim-bookworm AS runtime

LABEL org.opencontainers.image.title="mqtt-kinesis-gateway" \
      org.opencontainers.image.description="Stream MQTT messages into Amazon Kinesis Data Streams, routed by a validated YAML route file, at least once." \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder --chown=10001:10001 /var/spool/mqtt-kinesis-gateway /var/spool/mqtt-kinesis-gateway

# GATEWAY_ROUTES points into the directory Kubernetes mounts the routes ConfigMap on
# (deploy/kubernetes); with `docker run`, mount a directory holding routes.yaml there.
# GATEWAY_SPOOL_DIR turns the spool on (docs/spool.md): a message is acknowledged once it is on
# disk there, so an uplink outage fills the volume instead of losing what the broker cannot queue.
# Give it a named volume (`-v mkg-spool:/var/spool/mqtt-kinesis-gateway`) so that it outlives the
# container; set GATEWAY_SPOOL_DIR= (empty) to acknowledge after Kinesis instead.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LOG_FORMAT=json \
    GATEWAY_ROUTES=/etc/mqtt-kinesis-gateway/routes.yaml \
    GATEWAY_SPOOL_DIR=/var/spool/mqtt-kinesis-gateway \
    HTTP_PORT=8081

VOLUME ["/var/spool/mqtt-kinesis-gateway"]

# A numeric user, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001

EXPOSE 8081

# For `docker run` and Compose only: Kubernetes ignores HEALTHCHECK and uses its own probes.
# The slim image has no curl, so ask the gateway's own /healthz with the standard library.
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('HTTP_PORT', '8081'), timeout=2)"]

# Exec form: the gateway is PID 1 and receives SIGTERM itself (it drains and exits within
# GATEWAY_SHUTDOWN_TIMEOUT_S); a shell-form ENTRYPOINT would swallow the signal.
ENTRYPOINT ["mqtt-kinesis-gateway"]
CMD ["run"]
