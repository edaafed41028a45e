"""`hps score --prompt TEXT IMAGE...`: the HPS of images for a prompt."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cli.common import console, database, fail, run, settings


def score(
    images: list[Path] = typer.Argument(..., help="Image files to score."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt the images were made for."),
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help="A registry version name, a saved model folder, a weights file (hpc.pth), a "
        "model-config JSON or an open_clip architecture. Default: the serving classifier, "
        "else the configured model.",
    ),
    pretrained: str | None = typer.Option(
        None, "--pretrained", help="open_clip pretrained tag or file, with an architecture."
    ),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Print the HPS (100 × cosine of the image and prompt embeddings) of each image.
    Scores compare images of one prompt."""
    from db.models import ModelError
    from pipeline.hps_model import SCALE, ImageError, ModelLoadError

    config = settings()
    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise fail(f"no such image file: {', '.join(missing)}")
    try:
        hps = run(_load(config, model, pretrained))
        scores = hps.score(prompt, images, batch_size=batch_size)
    except (ModelLoadError, ImageError, ModelError) as exc:
        raise fail(str(exc)) from None
    if as_json:
        rows = [{"image": str(p), "score": s} for p, s in zip(images, scores, strict=True)]
        print(json.dumps({"prompt": prompt, "model": hps.name, "scale": SCALE, "scores": rows}))
        return
    for path, value in zip(images, scores, strict=True):
        console.print(f"{value:8.4f}  {path}", highlight=False)


async def _load(config, model: str | None, pretrained: str | None):  # type: ignore[no-untyped-def]
    from pipeline import registry
    from pipeline.hps_model import ModelSpec

    if model is not None and registry.is_model_spec(model):
        return registry.load_spec(ModelSpec(model, pretrained), config)
    async with database(config) as pool:
        spec, label = await registry.resolve_version(pool, config, model)
    return registry.load_spec(spec, config, label)
