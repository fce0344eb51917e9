# API and scheduler image. Neither process loads a model, so torch comes as the CPU build.
# /models exists and belongs to the service user: a new named volume mounted there takes the
# image folder's ownership; were the folder absent, the volume would be root-owned and the
# service user could not write artifacts into it.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md MANIFEST.in alembic.ini ./
COPY service ./service
COPY workers ./workers
COPY migrations ./migrations
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu . \
    && useradd --system --uid 10001 --home-dir /data qforget && mkdir -p /data /models && chown qforget /data /models
USER qforget
ENV QFORGET_ENVIRONMENT=production QFORGET_DATA_DIR=/data QFORGET_API_HOST=0.0.0.0
EXPOSE 8000
CMD ["qforget", "api"]
