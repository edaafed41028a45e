"""Images/s of the generator: a round of K images in one batched call vs K single calls.

- CPU, always: the tiny test pipeline (pipeline/tiny_models.py, built into a temporary folder and
  loaded with `from_pretrained` like a real one), 64 px, `--steps` steps.
- GPU, when CUDA is available: a real-size pipeline (`--gpu-model`, default SD 1.5) at
  512 px, 25 steps, float16, with the production optimisations (SDPA, channels-last,
  `--compile` for torch.compile): images/s and peak GPU memory. It must be in the local
  Hugging Face cache or a local folder (no download is attempted when offline).

    python bench/generate.py

Results: bench/results/generate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pipeline.generate import Generator, ImageRequest, SamplingParams  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"


def measure(generator: Generator, params: SamplingParams, k: int, rounds: int) -> dict[str, Any]:
    """Images/s for rounds of K images, batched and one image per call: the median round of
    `rounds`, alternating the two ways so that a load change hits both alike."""
    requests = [ImageRequest(PROMPT, "", seed) for seed in range(k)]
    sync = torch.cuda.synchronize if generator.device.startswith("cuda") else lambda: None

    def timed(calls: list[list[ImageRequest]]) -> float:
        sync()
        started = time.perf_counter()
        for call in calls:
            generator.generate(call, params)
        sync()
        return time.perf_counter() - started

    batched_calls, single_calls = [requests], [[r] for r in requests]
    timed(batched_calls + single_calls[:1])  # warm-up: each shape's kernels, compile
    batched, single = [], []
    for _ in range(rounds):
        batched.append(timed(batched_calls))
        single.append(timed(single_calls))
    batched_rate, single_rate = k / statistics.median(batched), k / statistics.median(single)
    return {
        "k": k,
        "rounds": rounds,
        "batched_images_per_s": round(batched_rate, 3),
        "single_images_per_s": round(single_rate, 3),
        "speedup": round(batched_rate / single_rate, 2),
    }


def cpu(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.tiny_models import build_tiny_sd

    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as folder:
        generator = Generator(
            str(build_tiny_sd(Path(folder) / "tiny_sd")), device="cpu", safety_checker=False
        )
        params = SamplingParams(steps=args.steps, guidance_scale=7.5, width=64, height=64)
        figures = measure(generator, params, args.k, args.rounds)
    return {
        "model": "pipeline/tiny_models.py (tiny UNet/VAE/CLIP)",
        "size": 64,
        "steps": args.steps,
        **figures,
    }


def gpu(args: argparse.Namespace) -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"measured": False, "reason": "not measured: no GPU lent"}
    generator = Generator(
        args.gpu_model,
        device="cuda",
        dtype="float16",
        safety_checker=True,
        torch_compile=args.compile,
    )
    params = SamplingParams(steps=25, guidance_scale=7.5, width=512, height=512)
    torch.cuda.reset_peak_memory_stats()
    figures = measure(generator, params, args.k, args.gpu_rounds)
    return {
        "measured": True,
        "model": args.gpu_model,
        "device": torch.cuda.get_device_name(),
        "size": 512,
        "steps": 25,
        "dtype": "float16",
        "torch_compile": args.compile,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        **figures,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=4, help="images per round")
    parser.add_argument("--steps", type=int, default=25, help="steps on the tiny pipeline")
    parser.add_argument("--rounds", type=int, default=5, help="rounds timed on the CPU")
    parser.add_argument("--gpu-model", default="stable-diffusion-v1-5/stable-diffusion-v1-5")
    parser.add_argument("--gpu-rounds", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (GPU)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/generate.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    report = {
        "benchmark": "generate",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "loadavg_before": [round(x, 2) for x in load_before],
        },
        "cpu_tiny": cpu(args),
        "gpu_sd15": gpu(args),
    }
    report["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
