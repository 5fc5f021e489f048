# syntax=docker/dockerfile:1
# The gateway and the controller: vpool with no extras, so no torch and no vLLM (about
# 150 MB instead of several GB). One Dockerfile, two final stages sharing every layer but
# the last:
#   docker build -f deploy/docker/gateway.Dockerfile --target gateway    -t vpool-gateway .
#   docker build -f deploy/docker/gateway.Dockerfile --target controller -t vpool-controller .
# Build from the repository root (the context needs pyproject.toml, README.md and vpool/).

ARG PYTHON_IMAGE=python:3.11-slim

# Builder: build vpool's wheel and install it with its dependencies into a venv that the
# runtime stage copies whole (no compiler, pip cache or source tree in the final image).
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY vpool ./vpool
RUN python -m venv /opt/vpool \
 && /opt/vpool/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/vpool/bin/pip install /wheels/vpool-*.whl \
 && /opt/vpool/bin/python -c "import vpool.gateway.app, vpool.controller.app"

FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/vpool/bin:$PATH PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 vpool \
 && useradd --system --uid 10001 --gid vpool --create-home --home-dir /home/vpool vpool
COPY --from=builder /opt/vpool /opt/vpool
COPY deploy/docker/healthcheck.py /usr/local/bin/vpool-healthcheck
USER vpool
WORKDIR /home/vpool
ENTRYPOINT ["vpool"]

FROM runtime AS controller
EXPOSE 8001
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "/usr/local/bin/vpool-healthcheck", "http://127.0.0.1:8001/health", "--token-env", "VPOOL_REGISTRATION_TOKEN"]
CMD ["controller", "--host", "0.0.0.0", "--no-launch"]

# Last, so that a plain `docker build` without --target makes the gateway.
FROM runtime AS gateway
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "/usr/local/bin/vpool-healthcheck", "http://127.0.0.1:8000/health"]
CMD ["gateway", "--host", "0.0.0.0"]
