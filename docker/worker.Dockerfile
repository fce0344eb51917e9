# GPU worker image on a CUDA base. torch's CUDA wheels bring their own CUDA and cuDNN libraries
# (nvidia-* packages), so the base only has to match the host driver; /models as in api.Dockerfile.
FROM nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY pyproject.toml README.md MANIFEST.in alembic.ini ./
COPY service ./service
COPY workers ./workers
COPY migrations ./migrations
RUN pip install . \
    && useradd --system --uid 10001 --home-dir /data qforget && mkdir -p /data /models && chown qforget /data /models
USER qforget
# HOME: torch, matplotlib and the data sets' downloads keep caches under it; the user has no other.
ENV QFORGET_ENVIRONMENT=production QFORGET_DATA_DIR=/data QFORGET_DEVICE=cuda HOME=/data
CMD ["qforget", "worker", "--queues", "gpu", "--concurrency", "1"]
