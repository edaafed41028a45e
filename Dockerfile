# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target bot    -t hps-bot .     # bot, scheduler, migrations: no torch
#   docker build --target worker -t hps-worker .  # GPU worker: torch with its CUDA libraries
# Both run the `hps` CLI; the command is the sub-command (`bot`, `scheduler`, `worker`, ...).

FROM python:3.11-slim AS base
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HPS_DATA_DIR=/data
RUN useradd --create-home --uid 10001 hps && mkdir -p /data && chown hps:hps /data
WORKDIR /app
COPY pyproject.toml README.md LICENSE constraints.txt alembic.ini ./
COPY hps ./hps
COPY db ./db
COPY bot ./bot
COPY pipeline ./pipeline
COPY cli ./cli

FROM base AS bot
RUN pip install -c constraints.txt .
USER hps
# Healthy while what runs in this container heartbeats (the bot: connected to Discord's
# gateway too): `hps health --here` reads the heartbeats in the database.
HEALTHCHECK --interval=30s --timeout=15s --start-period=90s CMD ["hps", "health", "--here"]
ENTRYPOINT ["hps"]
CMD ["bot"]

FROM base AS worker
# torch's PyPI wheels bundle the CUDA runtime; the host needs only the NVIDIA driver and
# the NVIDIA container toolkit (compose.yaml reserves the GPU).
RUN pip install -c constraints.txt ".[worker]"
ENV HF_HOME=/data/hf-cache
USER hps
HEALTHCHECK --interval=30s --timeout=15s --start-period=120s CMD ["hps", "health", "worker", "--here"]
ENTRYPOINT ["hps"]
CMD ["worker"]
