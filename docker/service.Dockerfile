# gradstore service image (CPU): `gradstore serve` over the datastores mounted at /stores.
#
#   docker build -f docker/service.Dockerfile -t gradstore-service .        # from the repository root
#   docker run -d -p 8080:8080 -v gradstore-stores:/stores -e GRADSTORE_API_KEYS=change-me gradstore-service
#
# API keys: GRADSTORE_API_KEYS=key1,key2, or a mounted secret file with one key per line given as
# GRADSTORE_API_KEY_FILE=/run/secrets/... (or `--api-key-file` after the image name, which replaces
# the default arguments below: repeat them). The service refuses to start without a key.
#
# Torch is the CPU-only wheel (no CUDA libraries in the image): the service computes target
# gradients on CPU. The container runs as the unprivileged user `gradstore` (uid 10001, the same
# in the indexer image, so both can use one stores volume).

# ---- stage 1: the gradstore wheel, built from the sources --------------------------------------
FROM python:3.11.15-slim-bookworm AS wheel

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY gradstore ./gradstore
COPY indexer ./indexer
COPY service ./service
COPY client ./client
RUN python -m pip wheel --no-deps --wheel-dir /wheels .

# ---- stage 2: the runtime image -----------------------------------------------------------------
FROM python:3.11.15-slim-bookworm

# The torch the project is tested with (the Makefile's TORCH_SPEC) and the indexer image's.
ARG TORCH_VERSION=2.13.0

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HEALTHCHECK_URL=http://127.0.0.1:8080/healthz

# CPU torch from the PyTorch CPU wheel index first: the `torch` requirement of the extras is then
# satisfied and pip does not pull the CUDA build (and its NVIDIA libraries) from PyPI.
RUN python -m pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"

# Dependencies next, from pyproject.toml alone, so that this layer is rebuilt only when the
# dependencies change. Empty package folders and README stand in for the sources while pip resolves
# the `cpu` extra (indexer + service + faiss-cpu); the stand-in gradstore is removed again and the
# real wheel is installed below.
WORKDIR /tmp/gradstore-deps
COPY pyproject.toml ./
RUN mkdir gradstore indexer service client \
    && touch README.md \
    && python -m pip install './[cpu]' \
    && python -m pip uninstall --yes gradstore \
    && rm -rf /tmp/gradstore-deps

COPY --from=wheel /wheels /tmp/wheels
RUN python -m pip install --no-deps /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels \
    && groupadd --gid 10001 gradstore \
    && useradd --uid 10001 --gid gradstore --create-home --shell /bin/bash gradstore \
    && mkdir -p /stores \
    && chown gradstore:gradstore /stores

USER 10001:10001
WORKDIR /home/gradstore
# Datastores, one sub-folder each; jobs and exports are kept under it too.
VOLUME ["/stores"]
EXPOSE 8080

# Liveness through the service's own /healthz, with Python (slim images have no curl). Set
# HEALTHCHECK_URL too when the service is told to listen on another port.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(0 if urllib.request.urlopen(os.environ['HEALTHCHECK_URL'], timeout=4).status == 200 else 1)"]

ENTRYPOINT ["gradstore", "serve"]
CMD ["--root", "/stores", "--host", "0.0.0.0", "--port", "8080"]
