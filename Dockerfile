# World Models (TensorFlow / Keras 3): one image for GPU boxes, EC2 and CPU-only machines.
#
#   docker build -t worldmodels .
#   docker run --gpus all -v "$PWD/data:/app/data" worldmodels python 02_train_vae.py --preset paper
#   docker run -v "$PWD/data:/app/data" worldmodels                 # CPU only: whole pipeline, small preset
#
# tensorflow[and-cuda] brings CUDA and cuDNN as pip wheels, so the host needs only the NVIDIA
# driver and the NVIDIA container toolkit; without a GPU the same image runs on the CPU.
# BASE_IMAGE: any Debian bookworm image with Python 3.11 as `python` and `pip` (the official one by
# default; tools/docker_check.sh builds a stand-in from Debian's packages where Docker Hub is unreachable).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TF_PACKAGE="tensorflow[and-cuda]==2.21.0"

# SDL_VIDEODRIVER=dummy: CarRacing draws with pygame, which must not look for a display.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SDL_VIDEODRIVER=dummy \
    MPLBACKEND=Agg \
    WORLDMODELS_DATA=/app/data

WORKDIR /app

# Dependencies first: editing the code does not reinstall packages.
COPY requirements.txt .
RUN pip install --no-cache-dir "${TF_PACKAGE}" -r requirements.txt

RUN useradd --create-home --uid 1000 --shell /bin/bash worldmodels \
    && mkdir -p /app/data \
    && chown 1000:1000 /app /app/data

COPY --chown=1000:1000 . .

USER 1000:1000

# Every output (rollouts, models, checkpoints, logs) lives here: mount a host folder or an
# EBS-backed path so that a stopped or replaced container resumes where it left off.
VOLUME ["/app/data"]

# Jupyter and TensorBoard, for use over an SSH tunnel.
EXPOSE 8888 6006

CMD ["python", "run_pipeline.py", "--preset", "small", "--data-dir", "/app/data"]
