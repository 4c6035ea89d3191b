"""The image: a CUDA runtime base, Python, this package; `shardserve` as the entrypoint.

PyTorch's CUDA wheels carry their own CUDA libraries; the base image brings the runtime
environment the NVIDIA container toolkit expects (and `sleep`/`sh` for preStop and the init
container). Build from the repository root: docker build -f DIR/Dockerfile -t IMAGE .
"""

from __future__ import annotations

CUDA_BASE_IMAGE = "nvidia/cuda:12.8.1-runtime-ubuntu24.04"


def dockerfile(base_image: str = CUDA_BASE_IMAGE) -> str:
    return f"""\
# Build from the shardserve repository root:
#   docker build -f <this folder>/Dockerfile -t <registry>/shardserve:<tag> .
ARG BASE_IMAGE={base_image}
FROM ${{BASE_IMAGE}}

ENV DEBIAN_FRONTEND=noninteractive \\
    PIP_NO_CACHE_DIR=1 \\
    PIP_DISABLE_PIP_VERSION_CHECK=1 \\
    PYTHONUNBUFFERED=1 \\
    VIRTUAL_ENV=/opt/venv \\
    PATH=/opt/venv/bin:$PATH

# gcc, libc6-dev and python3-dev: Triton compiles its kernel launcher (a C file against
# Python.h) the first time a kernel runs; without them every GPU step fails with "Failed to
# find C compiler".
RUN apt-get update \\
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip python3-dev \\
        gcc libc6-dev ca-certificates \\
 && rm -rf /var/lib/apt/lists/* \\
 && python3 -m venv /opt/venv

WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY shardserve ./shardserve
# huggingface_hub brings `hf`, which the init container's --download-from runs.
RUN pip install -c constraints.txt . huggingface_hub

# Kubernetes runs the server as a non-root user (uid 1000); the model cache is mounted at
# /models. Ubuntu 24.04 images already have user 'ubuntu' as uid 1000: it goes first, or
# useradd refuses the uid and the build fails.
RUN if id -u ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \\
 && useradd --create-home --uid 1000 shardserve && mkdir -p /models && chown shardserve /models
USER 1000
EXPOSE 8000
ENTRYPOINT ["shardserve"]
CMD ["serve", "--host=0.0.0.0", "--port=8000"]
"""
