"""Scoring throughput: batched HPS scoring against a naive one-image-at-a-time loop, and
the multi-scorer pass (all reward models on one decoding) against each scorer decoding the
images on its own.

CPU (always): the same model scores the same JPEG files from disk, (a) batched through
`HPSModel.score` (the prompt encoded once, images in batches, decoding one batch ahead in a
thread) and (b) naively, one image per call, re-encoding the prompt each time. Target:
batched ≥ 3× naive. The two are measured in turns (`--repeats` rounds of batched then
naive), and the medians are reported: on a shared 2-core machine a single pair of runs
varies by 10-20%.

GPU (when CUDA is available): ViT-L/14 in bf16, (c) from JPEG files decoded in DataLoader
workers (target ≥ 2,000 img/s on one H100-class GPU) and (d) from decoded tensors already
on the GPU (target ≥ 4,000 img/s). Throughput does not depend on the weights, so the models
are randomly initialised unless `--pretrained` names local weights.

Multi-scorer (CPU, always): the five scorers of `hps eval --scorers` (HPS v1, HPS v2,
PickScore, the aesthetic predictor, CLIP score) on tiny random weights in their released
formats (`tests/tiny_scorers.py`), scoring the same SD-sized JPEGs (a) together, through
`pipeline.scorers.score_all` (each image decoded once, every scorer's preprocessing fed from
it), and (b) one after another, each decoding the images itself. With tiny models decoding
dominates, which is what the shared pass saves; on a GPU (when one is lent) the same
comparison runs at full size (ViT-L/14, ViT-H/14, random weights).

    python bench/score_throughput.py [--cpu-model ViT-B-32] [--images 256] [--multi-images 128]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.hps_model import HPSModel  # noqa: E402

PROMPT = "a castle on a hill at sunset, highly detailed, trending on artstation"


def write_jpegs(folder: Path, n: int, size: int = 512) -> list[Path]:
    """n distinct noisy JPEGs (SD-sized by default), like generated images on disk."""
    rng = random.Random(0)
    paths = []
    base = Image.effect_noise((size, size), 64).convert("RGB")
    for i in range(n):
        image = base.rotate(rng.uniform(0, 360)).point(lambda v, s=rng.randint(0, 80): v + s)
        path = folder / f"{i:05d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def rate(n: int, seconds: float) -> float:
    return round(n / seconds, 2)


def cpu_bench(
    model_name: str, paths: list[Path], naive_images: int, batch_size: int, repeats: int
) -> dict[str, Any]:
    torch.manual_seed(0)
    hps = HPSModel.load(model_name, device="cpu")
    hps.score(PROMPT, paths[:batch_size], batch_size=batch_size)  # warm-up

    def batched_run() -> tuple[float, list[float]]:
        started = time.perf_counter()
        scores = hps.score(PROMPT, paths, batch_size=batch_size)
        return rate(len(paths), time.perf_counter() - started), scores

    def naive_run() -> tuple[float, list[float]]:
        scores = []
        started = time.perf_counter()
        with torch.inference_mode():
            for path in paths[:naive_images]:
                # What a straightforward script does: tokenise and encode the prompt per image.
                text = hps.clip.encode_text(hps.tokenizer([PROMPT]), normalize=True)
                image = hps.clip.encode_image(hps.preprocess(path).unsqueeze(0), normalize=True)
                scores.append(float(100 * (image * text).sum()))
        return rate(naive_images, time.perf_counter() - started), scores

    runs = []
    agree = 0.0
    for _ in range(repeats):  # in turns, so that both see the same load on the machine
        batched_rate, batched = batched_run()
        naive_rate, naive = naive_run()
        agree = max(agree, *(abs(a - b) for a, b in zip(naive, batched, strict=False)))
        runs.append(
            {
                "batched_images_per_s": batched_rate,
                "naive_images_per_s": naive_rate,
                "ratio": round(batched_rate / naive_rate, 2),
                "load": round(os.getloadavg()[0], 2),
            }
        )
    batched_median = statistics.median(r["batched_images_per_s"] for r in runs)
    naive_median = statistics.median(r["naive_images_per_s"] for r in runs)
    return {
        "model": f"{model_name} (random weights), fp32, {torch.get_num_threads()} threads",
        "images": len(paths),
        "batch_size": batch_size,
        "naive_images": naive_images,
        "method": f"{repeats} rounds, each a batched run of all images then a naive run; "
        "medians over the rounds (ratio = median batched / median naive; "
        "median_of_ratios = the median of each round's ratio)",
        "batched_images_per_s": round(batched_median, 2),
        "naive_images_per_s": round(naive_median, 2),
        "ratio": round(batched_median / naive_median, 2),
        "median_of_ratios": round(statistics.median(r["ratio"] for r in runs), 2),
        "target_ratio": 3.0,
        "max_score_difference": agree,
        "runs": runs,
    }


def gpu_bench(
    paths: list[Path], pretrained: str | None, batch_size: int, workers: int
) -> dict[str, Any]:
    hps = HPSModel.load("ViT-L-14", pretrained=pretrained, device="cuda", precision="bf16")
    torch.backends.cuda.matmul.allow_tf32 = True
    hps.score(PROMPT, paths[:batch_size], batch_size=batch_size, num_workers=workers)  # warm-up
    torch.cuda.synchronize()
    started = time.perf_counter()
    hps.score(PROMPT, paths, batch_size=batch_size, num_workers=workers)
    torch.cuda.synchronize()
    files_rate = rate(len(paths), time.perf_counter() - started)

    pixels = torch.randn(len(paths), 3, 224, 224, device="cuda", dtype=hps.dtype)
    for start in range(0, batch_size * 2, batch_size):  # warm-up
        hps.score_pixels(PROMPT, pixels[start : start + batch_size])
    torch.cuda.synchronize()
    started = time.perf_counter()
    for start in range(0, len(pixels), batch_size):
        hps.score_pixels(PROMPT, pixels[start : start + batch_size])
    torch.cuda.synchronize()
    tensors_rate = rate(len(pixels), time.perf_counter() - started)
    return {
        "device": torch.cuda.get_device_name(),
        "model": f"ViT-L-14 ({pretrained or 'random weights'}), bf16",
        "images": len(paths),
        "batch_size": batch_size,
        "loader_workers": workers,
        "jpeg_files_images_per_s": files_rate,
        "target_jpeg_files_images_per_s": 2000,
        "tensors_images_per_s": tensors_rate,
        "target_tensors_images_per_s": 4000,
    }


def multi_scorer_bench(
    settings_sections: dict[str, dict[str, str]],
    paths: list[Path],
    batch_size: int,
    repeats: int,
    device: str,
) -> dict[str, Any]:
    """All scorers on one decoding pass against each decoding on its own (in turns)."""
    from hps.settings import load_settings
    from pipeline.scorers import SCORER_NAMES, load_scorers, score_all, score_with

    sections = {k: dict(v) for k, v in settings_sections.items()}
    sections["models"]["device"] = device
    settings = load_settings(**sections)
    scorers = load_scorers(SCORER_NAMES, settings)
    score_all(scorers, PROMPT, paths[:batch_size], batch_size=batch_size)  # warm-up
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    runs = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        together = score_all(scorers, PROMPT, paths, batch_size=batch_size)
        sync()
        together_s = time.perf_counter() - started
        alone_s: dict[str, float] = {}
        for scorer in scorers:
            started = time.perf_counter()
            alone = score_with(scorer, PROMPT, paths, batch_size=batch_size)
            sync()
            alone_s[scorer.name] = time.perf_counter() - started
            assert max(abs(a - b) for a, b in zip(alone, together[scorer.name], strict=True)) < 1e-3
        separate_s = sum(alone_s.values())
        runs.append(
            {
                "together_images_per_s": rate(len(paths), together_s),
                "separately_images_per_s": rate(len(paths), separate_s),
                "ratio": round(separate_s / together_s, 2),
                "alone_images_per_s": {k: rate(len(paths), v) for k, v in alone_s.items()},
                "load": round(os.getloadavg()[0], 2),
            }
        )
    together_median = statistics.median(r["together_images_per_s"] for r in runs)
    separate_median = statistics.median(r["separately_images_per_s"] for r in runs)
    return {
        "scorers": {s.name: s.label for s in scorers},
        "device": device if not device.startswith("cuda") else torch.cuda.get_device_name(),
        "images": len(paths),
        "batch_size": batch_size,
        "method": f"{repeats} rounds, each all scorers on one decoding pass (score_all), then "
        "each scorer on its own (score_with, decoding again); images/s counts each image once "
        "for all five scores; medians over the rounds",
        "together_images_per_s": together_median,
        "separately_images_per_s": separate_median,
        "ratio": round(together_median / separate_median, 2),
        "alone_images_per_s": {
            name: statistics.median(r["alone_images_per_s"][name] for r in runs)
            for name in runs[0]["alone_images_per_s"]
        },
        "runs": runs,
    }


def full_size_scorer_settings(directory: Path) -> dict[str, dict[str, str]]:
    """The five scorers at their real sizes with random weights, in their released formats
    (for the GPU: the throughput does not depend on the weights)."""
    import open_clip
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    from tests.tiny_scorers import tiny_aesthetic, tiny_hf_clips

    torch.manual_seed(0)
    vit_l = open_clip.create_model("ViT-L-14", pretrained=None, force_quick_gelu=True)
    torch.save(vit_l.state_dict(), directory / "vit-l-14.pt")
    vit_h = open_clip.create_model("ViT-H-14", pretrained=None)
    torch.save({"state_dict": vit_h.state_dict()}, directory / "HPS_v2.1_compressed.pt")
    [tokenized] = tiny_hf_clips(directory / "hf", seeds=(0,))
    processor = CLIPProcessor.from_pretrained(tokenized)
    processor.image_processor.size = {"shortest_edge": 224}
    processor.image_processor.crop_size = {"height": 224, "width": 224}
    folders = {}
    for name, (width, layers, heads, text_width, text_layers, text_heads, dim) in {
        "pickscore": (1280, 32, 16, 1024, 24, 16, 1024),  # ViT-H/14
        "clip": (1024, 24, 16, 768, 12, 12, 768),  # ViT-L/14
    }.items():
        config = CLIPConfig(
            text_config={"hidden_size": text_width, "intermediate_size": 4 * text_width,
                         "num_attention_heads": text_heads, "num_hidden_layers": text_layers},
            vision_config={"hidden_size": width, "intermediate_size": 4 * width,
                           "num_attention_heads": heads, "num_hidden_layers": layers,
                           "image_size": 224, "patch_size": 14},
            projection_dim=dim,
        )  # fmt: skip
        folders[name] = directory / name
        CLIPModel(config).save_pretrained(folders[name])
        processor.save_pretrained(folders[name])
    return {
        "models": {"hps_arch": "ViT-L-14", "hps_pretrained": str(directory / "vit-l-14.pt")},
        "scorers": {
            "hpsv2_arch": "ViT-H-14",
            "hpsv2_checkpoint": str(directory / "HPS_v2.1_compressed.pt"),
            "pickscore_model": str(folders["pickscore"]),
            "pickscore_processor": str(folders["pickscore"]),
            "aesthetic_checkpoint": str(tiny_aesthetic(directory / "aesthetic", width=768)),
            "aesthetic_clip": "ViT-L-14",
            "aesthetic_clip_pretrained": str(directory / "vit-l-14.pt"),
            "clip_model": str(folders["clip"]),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-model", default="ViT-B-32", help="open_clip architecture.")
    parser.add_argument("--images", type=int, default=256, help="Images scored batched (CPU).")
    parser.add_argument("--naive-images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="Rounds of batched + naive.")
    parser.add_argument("--gpu-images", type=int, default=8192)
    parser.add_argument("--gpu-batch-size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--pretrained", default=None, help="Local ViT-L-14 weights (GPU).")
    parser.add_argument("--multi-images", type=int, default=128, help="Multi-scorer (CPU).")
    parser.add_argument("--multi-repeats", type=int, default=3)
    parser.add_argument("--skip-single", action="store_true", help="Only the multi-scorer pass.")
    args = parser.parse_args()

    result: dict[str, Any] = {
        "benchmark": "score_throughput",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}",
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        n_files = max(args.images, args.gpu_images if torch.cuda.is_available() else 0)
        n_files = max(n_files, args.multi_images)
        paths = write_jpegs(Path(tmp), n_files)
        results = ROOT / "bench" / "results"
        previous = results / "score_throughput.json"
        if args.skip_single and previous.is_file():  # keep the last single-scorer figures
            old = json.loads(previous.read_text())
            result.update({k: old[k] for k in ("cpu", "gpu") if k in old})
        else:
            result["cpu"] = cpu_bench(args.cpu_model, paths[: args.images], args.naive_images,
                                      args.batch_size, args.repeats)  # fmt: skip
            if torch.cuda.is_available():
                result["gpu"] = gpu_bench(paths, args.pretrained, args.gpu_batch_size,
                                          args.workers)  # fmt: skip
            else:
                result["gpu"] = "not measured: no GPU lent"
        from tests.tiny_scorers import tiny_scorer_settings

        tiny = tiny_scorer_settings(Path(tmp) / "tiny")
        result["multi_scorer_cpu"] = multi_scorer_bench(
            tiny, paths[: args.multi_images], args.batch_size, args.multi_repeats, "cpu"
        )
        if torch.cuda.is_available():
            (Path(tmp) / "full").mkdir()
            full = full_size_scorer_settings(Path(tmp) / "full")
            result["multi_scorer_gpu"] = multi_scorer_bench(
                full, paths, args.gpu_batch_size, args.multi_repeats, "cuda"
            )
        else:
            result["multi_scorer_gpu"] = "not measured (no GPU lent)"
    print(json.dumps(result, indent=2))
    results.mkdir(parents=True, exist_ok=True)
    (results / "score_throughput.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
