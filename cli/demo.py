"""`hps demo`: the whole loop in a browser, without Discord, a GPU or downloads.

One command starts, on this machine:

- the embedded PostgreSQL (in a temporary data directory unless `--data-dir`), migrated;
- the local Discord-compatible server (`bot.fake_discord`) with one server, a #dream channel
  and a #hps-log channel, and two people: "you" (holding the maintainer role) and "a friend";
- tiny models built from configs (`pipeline.tiny_models`): a Stable Diffusion pipeline and
  a CLIP, untrained, so the images are noise-like and the scores random; `--sd-model` and
  `--hps-model` point the same demo at real models (a hub id or a local folder);
- the real bot, scheduler and worker (`python -m cli bot|scheduler|worker`), configured to
  talk to that server, their logs in `<data dir>/logs/`;
- a web page (`bot.fake_discord.web`) that shows the channels and lets you /dream, click the
  buttons, run the maintainer commands and read the log channel.

Ctrl-C stops everything (and deletes the temporary data directory).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import webbrowser
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from cli.common import console, err_console

if TYPE_CHECKING:
    from hps.settings import Settings

GUILD_ID = 900000000000000001
DREAM_CHANNEL_ID = 900000000000000011
LOG_CHANNEL_ID = 900000000000000012
MAINTAINER_ROLE_ID = 900000000000000021
YOU_ID = 800000000000000001
FRIEND_ID = 800000000000000002
SERVICES = ("bot", "scheduler", "worker")
TINY_NOTICE = (
    "Demo with tiny untrained models: the images are noise-like and the HPS scores random. "
    "Everything else is the real platform. Point it at real models with --sd-model and "
    "--hps-model."
)


def demo(
    port: int = typer.Option(8000, "--port", help="Port of the web page (0: any free one)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address of the web page."),
    sd_model: str | None = typer.Option(
        None, "--sd-model", help="A real text-to-image model (hub id or folder) instead of tiny."
    ),
    hps_model: str | None = typer.Option(
        None,
        "--hps-model",
        help="A real HPS model instead of tiny: an open_clip architecture (ViT-L-14 with "
        "OpenAI's weights), a saved version's folder, or a weights file such as hpc.pth.",
    ),
    data_dir: Path | None = typer.Option(
        None, "--data-dir", help="Keep the demo's data here (default: a temporary folder)."
    ),
    open_browser: bool = typer.Option(True, "--open/--no-open", help="Open the page in a browser."),
) -> None:
    """Try the platform in a browser: the bot, a worker and the scheduler against a local
    Discord-like server, with tiny models (no Discord, GPU or downloads needed)."""
    temporary = data_dir is None
    root = Path(tempfile.mkdtemp(prefix="hps-demo-")) if data_dir is None else data_dir
    root.mkdir(parents=True, exist_ok=True)
    from db.embedded import stop_embedded
    from hps.settings import load_settings

    settings = None
    try:
        settings = load_settings(data_dir=root, database_url="")
        code = asyncio.run(_demo(settings, host, port, sd_model, hps_model, open_browser))
    finally:
        # In this order: the bot, scheduler and worker stopped (in `_demo`), then the
        # embedded PostgreSQL (else it would outlive its deleted files), then the folder.
        if temporary:
            if settings is not None:
                stop_embedded(settings.postgres_dir)
            shutil.rmtree(root, ignore_errors=True)
    raise typer.Exit(code)


def _say(text: str) -> None:
    console.print(f"[bold]hps demo:[/bold] {text}", highlight=False)


async def _demo(
    settings: Settings,
    host: str,
    port: int,
    sd_model: str | None,
    hps_model: str | None,
    open_browser: bool,
) -> int:
    from bot.fake_discord import FakeDiscord, FakeGuild, FakeUser
    from bot.fake_discord.web import Channel, DemoPage
    from db import migrate
    from db.connect import database_url

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    root = settings.data_dir
    _say(f"data in {root}; starting the embedded PostgreSQL")
    url = await asyncio.to_thread(database_url, settings)
    await asyncio.to_thread(migrate.upgrade, url)
    _say(f"database: {url}")
    models = await asyncio.to_thread(_models, root / "demo-models", sd_model, hps_model)

    fake = FakeDiscord(
        guilds=[
            FakeGuild(
                GUILD_ID, "HPS demo", [DREAM_CHANNEL_ID, LOG_CHANNEL_ID], [MAINTAINER_ROLE_ID]
            )
        ]
    )
    await fake.start()
    you = FakeUser(YOU_ID, "you", roles=[MAINTAINER_ROLE_ID])
    friend = FakeUser(FRIEND_ID, "a friend")
    tiny = sd_model is None and hps_model is None
    page = DemoPage(
        fake,
        [you, friend],
        [
            Channel(DREAM_CHANNEL_ID, "dream", "Run /dream, then pick the image you like."),
            Channel(LOG_CHANNEL_ID, "hps-log", "Training and model outcomes (/retrain)."),
        ],
        title="HPS choice platform: demo",
        notice=TINY_NOTICE if tiny else "Demo with the models you gave.",
    )
    env = _environment(url, root, fake, models)
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    children: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name in SERVICES:
            children[name] = _start(name, env, logs / f"{name}.log")
        _say(f"started the bot, the scheduler and a worker (logs in {logs})")
        connected = asyncio.ensure_future(
            fake.wait_for(lambda: fake.commands.get(GUILD_ID), within=120)
        )
        while not connected.done():
            if died := _died(children):
                connected.cancel()
                err_console.print(
                    f"[red]hps demo: the {died} exited at start; see {logs / (died + '.log')}[/red]"
                )
                return 1
            await asyncio.sleep(0.2)
        connected.result()
        await page.start(host, port)
        _say(f"open {page.url} (Ctrl-C stops the demo)")
        if open_browser and _has_desktop():
            with contextlib.suppress(Exception):
                webbrowser.open(page.url)
        while not stop.is_set():
            if died := _died(children):
                err_console.print(
                    f"[red]hps demo: the {died} exited; see {logs / (died + '.log')}[/red]"
                )
                return 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
        _say("stopping")
        return 0
    finally:
        await asyncio.to_thread(_stop, children)
        await page.stop()
        await fake.stop()


def _start(name: str, env: dict[str, str], log_file: Path) -> subprocess.Popen[bytes]:
    """`python -m cli <name>`, its output appended to `log_file`."""
    with log_file.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "cli", name], env=env, stdout=out, stderr=subprocess.STDOUT
        )


def _has_desktop() -> bool:
    """Whether a graphical browser can open (without a display, Python's webbrowser would
    start a text browser in this terminal)."""
    graphical = os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    return sys.platform in ("darwin", "win32") or bool(graphical)


def _died(children: dict[str, subprocess.Popen[bytes]]) -> str | None:
    return next((name for name, p in children.items() if p.poll() is not None), None)


def _stop(children: dict[str, subprocess.Popen[bytes]]) -> None:
    from cli.serve import _stop as stop_children

    stop_children(children, 30)


def _models(folder: Path, sd_model: str | None, hps_model: str | None) -> dict[str, str]:
    """Settings for the models: the tiny ones built here, or those given."""
    from pipeline.tiny_models import build_tiny_sd, tiny_weights

    folder.mkdir(parents=True, exist_ok=True)
    settings: dict[str, str] = {}
    if sd_model is None:
        _say("building a tiny Stable Diffusion pipeline (untrained: noise-like images)")
        built = folder / "tiny-sd"
        if not (built / "model_index.json").exists():
            build_tiny_sd(built)
        settings.update(
            HPS_GENERATION__SD_MODEL=str(built),
            HPS_GENERATION__SAFETY_CHECKER="false",  # an untrained model has none to run
            HPS_GENERATION__STEPS="4",
            HPS_GENERATION__WIDTH="64",
            HPS_GENERATION__HEIGHT="64",
        )
    else:
        settings["HPS_GENERATION__SD_MODEL"] = sd_model
    if hps_model is None:
        _say("building a tiny CLIP as the HPS model (untrained: random scores)")
        config, weights = tiny_weights(folder)
        settings.update(HPS_MODELS__HPS_ARCH=str(config), HPS_MODELS__HPS_PRETRAINED=str(weights))
    elif Path(hps_model).is_file():  # a weights file such as hpc.pth, over ViT-L-14
        settings["HPS_MODELS__HPS_CHECKPOINT"] = hps_model
    else:
        settings["HPS_MODELS__HPS_ARCH"] = hps_model
    return settings


def _environment(url: str, root: Path, fake, models: dict[str, str]) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """The children's settings: this demo's database, server and models only (the user's
    own HPS_* variables are left out, and so are ./.env and ./hps.toml, so the demo never
    touches a real deployment: its bucket, its Discord)."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("HPS_")}
    env.update(
        HPS_CONFIG="",
        HPS_ENV_FILE="",
        HPS_DATABASE_URL=url,
        HPS_DATA_DIR=str(root),
        HPS_DISCORD__TOKEN=fake.token,
        HPS_DISCORD__API_BASE_URL=fake.api_base_url,
        HPS_DISCORD__GATEWAY_URL=fake.gateway_url,
        HPS_DISCORD__GUILD_IDS=f"[{GUILD_ID}]",
        HPS_DISCORD__CHANNEL_IDS=f"[{DREAM_CHANNEL_ID}]",
        HPS_DISCORD__MAINTAINER_ROLE_IDS=f"[{MAINTAINER_ROLE_ID}]",
        HPS_DISCORD__LOG_CHANNEL_ID=str(LOG_CHANNEL_ID),
        HPS_BOT__GUILD_READY_TIMEOUT="0.1",
        HPS_WORKER__POLL_SECONDS="1",
        HPS_WORKER__HEARTBEAT_SECONDS="5",
        HPS_TRAIN__NUM_WORKERS="0",
        HPS_ADAPT__NUM_WORKERS="0",
        PYTHONPATH=os.pathsep.join(
            p for p in (str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")) if p
        ),
        **models,
    )
    return env
