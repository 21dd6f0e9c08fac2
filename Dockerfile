# Imagen in a container: one image for the API (`imagen serve`) and the GPU workers (`imagen worker`).
# compose.yaml runs it (docs/running-for-others.md, "Docker Compose"). tests/test_deploy.py checks this file against
# pyproject.toml and imagen's settings and commands; `make test-deploy` builds it on a local Debian base with Podman
# and runs compose.yaml's cluster from it (deploy/).
#
# The base image is a build argument: the CUDA runtime by default, any Ubuntu 22.04 or Debian 12 image otherwise
# (`make test-deploy` builds on a Debian bookworm made by debootstrap: deploy/base-image.sh).
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
FROM ${BASE_IMAGE}

# PyTorch's wheel index for the CUDA of the base image (cu128 = CUDA 12.8). The torch version is pyproject's pin.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Python 3.11 (pyproject: requires-python >=3.11,<3.12): Debian 12's own python3.11; on Ubuntu 22.04 (whose
# python3 is 3.10, and whose python3.11 is a release candidate) the deadsnakes build. A C compiler and Python's
# headers: torch.compile (IMAGEN_COMPILE=auto is on with CUDA) builds Triton's launchers at run time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && if . /etc/os-release && [ "$ID" = ubuntu ]; then \
         apt-get install -y --no-install-recommends gpg-agent software-properties-common \
         && add-apt-repository -y ppa:deadsnakes/ppa \
         && apt-get update; \
       fi \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev build-essential \
    && rm -rf /var/lib/apt/lists/*

# The project's own install (Makefile: a venv, then `pip install` of this project), without the dev extras.
# torch first, from the CUDA index, in its own layer: `pip install .` then finds the pin already satisfied.
RUN python3.11 -m venv /opt/imagen && /opt/imagen/bin/pip install --upgrade pip
ENV PATH=/opt/imagen/bin:$PATH
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0
WORKDIR /src
# The other dependencies, read from pyproject.toml, in a layer of their own: a change to imagen/ rebuilds only the
# last (small) layer, not this one.
COPY pyproject.toml README.md requirements-no-deps.txt ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && pip install --no-deps -r requirements-no-deps.txt \
    && rm /tmp/requirements.txt
COPY imagen ./imagen
RUN pip install . && rm -rf /src

# Not root. Models are mounted read-only at /models (registry.yaml and the weights it names); the job
# database, caches (Hugging Face, torch.compile) and generated images live in volumes.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin imagen \
    && mkdir -p /models /data /outputs \
    && chown imagen:imagen /models /data /outputs
ENV IMAGEN_DATA_DIR=/data \
    IMAGEN_OUTPUTS_DIR=/outputs \
    HF_HOME=/data/huggingface
VOLUME ["/models", "/data", "/outputs"]
USER imagen
WORKDIR /home/imagen

EXPOSE 8009
# The API's health; workers serve no HTTP (compose.yaml turns this check off for them).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8009/health', timeout=4)"]

CMD ["imagen", "serve"]
