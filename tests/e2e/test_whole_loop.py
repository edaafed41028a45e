"""The whole loop under production conditions: `hps serve` with the bot, the scheduler and
the real worker as child processes, production log settings (INFO, JSON lines), the local
Discord-compatible server, the tiny SD pipeline and a tiny CLIP as the HPS model. The
scenario and its expectations are in `tests/whole_loop.py` (reused with other stores)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.whole_loop import LoopModels, run_scenario, serve_env, served, standard_fake


@pytest.mark.slow
async def test_the_whole_loop_as_deployed(
    database_url: str, tmp_path: Path, loop_models: LoopModels
) -> None:
    async with standard_fake() as fake:
        env = serve_env(fake, database_url, tmp_path / "data", loop_models)
        async with served(env, tmp_path / "serve.log", database_url, fake) as loop:
            await run_scenario(loop)
            loop.serve.stop_cleanly()
        assert loop.serve.problems() == []
