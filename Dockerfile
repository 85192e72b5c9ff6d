# The explorer for a Hugging Face Docker Space with a GPU (it runs on a CPU-only host as well),
# serving the demo gallery in hosted mode (--public) on port 7860.
#
# Base: the official Python 3.11 image. CUDA comes with the pinned torch itself: its CUDA build
# depends on NVIDIA's runtime libraries (cudart, cuBLAS, cuDNN, NCCL...) as pip packages, and
# the host's driver is mounted into the container by the NVIDIA container runtime (asked for by
# the two NVIDIA_* variables below, as the nvidia/cuda images set them). An nvidia/cuda runtime
# base would add a second, unused copy of the CUDA libraries (several GB) and bring Ubuntu's
# Python (3.12 on 24.04, an early 3.11.0 on 22.04); pytorch/pytorch brings conda and a torch of
# its own beside the pinned one.
FROM python:3.11-slim-bookworm

# The CUDA build of the pinned torch. cu130 (CUDA 13.0) is the build PyPI itself serves for
# torch 2.14.1; it needs an NVIDIA driver >= 580. Another index can be given as a build
# argument (on a Space: a variable of the same name; Spaces pass variables as build arguments).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
# Query models whose gallery index, trained SSP model, maps and scores are baked into the image
# besides the default lite0 (empty: build them on first use instead; the build is then shorter).
ARG BAKE_QUERY_MODELS=lite2,ssp

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# torch and torchvision first, the same pins as requirements.txt: the CUDA index's builds
# (2.14.1+cu130 ranks above PyPI's plain 2.14.1; their dependencies come from either index).
# The second install finds them satisfied and takes everything else from PyPI, faiss-cpu
# included (search moves to a GPU only with a faiss GPU build, and stays on the CPU otherwise).
COPY requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" \
        torch==2.14.1 torchvision==0.29.1 \
    && pip install --no-cache-dir -r /tmp/requirements.txt

# Spaces run the container as uid 1000; everything the app writes lives in its home.
RUN groupadd --gid 1000 user && useradd --create-home --uid 1000 --gid 1000 user
USER 1000:1000
ENV HOME=/home/user \
    PATH=/home/user/.local/bin:$PATH \
    RETRIEVAL_EXPLORER_CACHE=/home/user/.cache/retrieval-explorer \
    HF_HOME=/home/user/.cache/huggingface \
    TORCH_HOME=/home/user/.cache/torch \
    MPLCONFIGDIR=/home/user/.cache/matplotlib \
    NUMBA_CACHE_DIR=/home/user/.cache/numba \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860
RUN mkdir -p /home/user/app
WORKDIR /home/user/app

COPY --chown=1000:1000 engine ./engine
COPY --chown=1000:1000 app ./app
COPY --chown=1000:1000 assets ./assets
COPY --chown=1000:1000 launch.py ./

# Bake the demo gallery: features, faiss index, kNN graph, UMAP maps, Compare scores and every
# trained state (SSR, SGRR, the SSP query model), by the code path every start takes. No GPU
# exists during a build: on the CPU here; the GPU, when the Space has one, is found at start.
RUN python launch.py --prepare-only --device cpu --query-models "${BAKE_QUERY_MODELS}"

EXPOSE 7860
CMD ["python", "launch.py", "--public", "--host", "0.0.0.0", "--port", "7860"]
