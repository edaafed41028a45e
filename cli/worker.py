"""`hps worker`: run queue jobs on this machine's device."""

from __future__ import annotations

import asyncio
import os

import typer

from cli.common import fail, run_service, settings

# Short names people use for the training kinds (`hps worker --kinds generate,train`).
KIND_ALIASES = {"train": "train_classifier", "adapt": "adapt_sd"}


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def worker(
    kinds: str | None = typer.Option(
        None,
        "--kinds",
        help="Comma-separated job kinds to take (default: worker.kinds); train and adapt "
        "stand for train_classifier and adapt_sd.",
    ),
    device: str | None = typer.Option(
        None, "--device", help="Torch device: auto, cpu, cuda, cuda:1 … (default: models.device)."
    ),
    concurrency: int | None = typer.Option(
        None, "--concurrency", min=1, help="Jobs run at once (default: worker.concurrency)."
    ),
    handlers: list[str] = typer.Option(
        [],
        "--handler",
        help="KIND=module:function: add or replace the handler of a kind (plugins, tests).",
    ),
    worker_id: str | None = typer.Option(None, "--id", help="Worker id (default: hostname:pid)."),
) -> None:
    """Take jobs from the queue and run them until SIGTERM or Ctrl-C (the job in hand
    finishes first)."""
    from db.connect import create_pool, database_url
    from hps.storage import storage
    from pipeline.devices import resolve_device
    from pipeline.handlers import HANDLERS
    from pipeline.worker import Worker

    config = settings()
    registry = dict(HANDLERS)
    for spec in handlers:
        kind, _, target = spec.partition("=")
        if not kind or ":" not in target:
            raise fail(f"--handler {spec!r}: expected KIND=module:function", 2)
        registry[kind] = target
    chosen = [KIND_ALIASES.get(k, k) for k in _names(kinds)] if kinds else None
    device = device or config.models.device
    label = device  # what /status shows: the GPU of the machine, not of this process
    index = device.removeprefix("cuda:")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if device.startswith("cuda:") and index.isdigit():
        if visible is None:
            # One GPU per worker process, before torch starts: every library (diffusers,
            # open_clip, accelerate) then sees only that GPU, as cuda:0.
            os.environ["CUDA_VISIBLE_DEVICES"] = index
            device = "cuda:0"
        else:
            label = f"{device} of CUDA_VISIBLE_DEVICES={visible}"
    device = resolve_device(device)
    # Every job of this worker runs there: generation, scoring and training alike.
    config = config.with_changes("models", device=device)

    async def service(stop: asyncio.Event) -> None:
        # A GPU node whose store credentials or bucket are wrong says so now, in one line.
        await storage(config).check_async()
        # Each job may hold a connection for its transaction; heartbeats, expired leases
        # and the LISTEN connection must never wait behind them.
        jobs_at_once = concurrency or config.worker.concurrency
        pool = await create_pool(database_url(config), max_size=2 * jobs_at_once + 4)
        try:
            runner = Worker(
                pool,
                config,
                kinds=chosen,
                device=device,
                device_label=label,
                concurrency=concurrency,
                worker_id=worker_id,
                registry=registry,
            )
            task = asyncio.create_task(runner.run())
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait([task, stopping], return_when=asyncio.FIRST_COMPLETED)
            runner.stop()
            stopping.cancel()
            await task
        finally:
            await pool.close()

    try:
        run_service(service)
    except ValueError as exc:  # an unknown kind
        raise fail(str(exc), 2) from None
