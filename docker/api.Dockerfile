# API and scheduler image. Neither process loads a model, so torch comes as the CPU build.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY service ./service
COPY workers ./workers
COPY migrations ./migrations
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu . \
    && useradd --system --uid 10001 qforget && mkdir -p /data && chown qforget /data
USER qforget
ENV QFORGET_ENVIRONMENT=production QFORGET_DATA_DIR=/data QFORGET_API_HOST=0.0.0.0
EXPOSE 8000
CMD ["qforget", "api"]
