# gradstore indexer image (GPU): the `gradstore` command line with the indexer, CUDA PyTorch and faiss-gpu.
#
#   docker build -f docker/indexer.Dockerfile -t gradstore-indexer .        # from the repository root
#   docker run --rm --gpus all -v "$PWD/data:/data" -v gradstore-stores:/stores gradstore-indexer \
#       index --corpus /data/pool.jsonl --model /data/model --run /data/warmup --out /stores/pool
#
# Mount points:
#   /data    corpora, base models and warmup runs (inputs; writable only if `gradstore warmup --out`
#            writes there)
#   /stores  the datastores that `gradstore index` writes (a volume, shared with the service image)
#
# The container runs as the unprivileged user `gradstore` (uid 10001, the same in the service image,
# so both can use one stores volume). Multi-GPU: `--entrypoint torchrun ... -m gradstore.cli index ...`.

# ---- stage 1: the gradstore wheel, built from the sources --------------------------------------
FROM pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime AS wheel

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
FROM pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# Dependencies first, from pyproject.toml alone, so that this (large) layer is rebuilt only when the
# dependencies change. Empty package folders and README stand in for the sources while pip resolves
# the `gpu` extra (indexer + service + faiss-gpu; never faiss-cpu: both provide the `faiss` module);
# the stand-in gradstore is removed again and the real wheel is installed below. The base image's
# CUDA torch already satisfies the `torch` requirement, so pip keeps it.
WORKDIR /tmp/gradstore-deps
COPY pyproject.toml ./
RUN mkdir gradstore indexer service client \
    && touch README.md \
    && python -m pip install './[gpu]' \
    && python -m pip uninstall --yes gradstore \
    && if python -m pip show faiss-cpu >/dev/null 2>&1; then echo "faiss-cpu installed beside faiss-gpu" >&2; exit 1; fi \
    && rm -rf /tmp/gradstore-deps

COPY --from=wheel /wheels /tmp/wheels
RUN python -m pip install --no-deps /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels \
    && groupadd --gid 10001 gradstore \
    && useradd --uid 10001 --gid gradstore --create-home --shell /bin/bash gradstore \
    && mkdir -p /data /stores \
    && chown gradstore:gradstore /data /stores

USER 10001:10001
WORKDIR /home/gradstore
VOLUME ["/stores"]

ENTRYPOINT ["gradstore"]
CMD ["--help"]
