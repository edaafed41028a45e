"""Training the classifier: the loss, the data rules, learning, and the job end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from db import jobs, models, prompts, users
from db.choices import record_choice
from hps.settings import TrainSettings, load_settings
from hps.store import LocalImageStore
from pipeline.data import (
    Example,
    assign_split,
    examples_from_db,
    examples_from_folder,
    read_path,
    split_counts,
)
from pipeline.datasets import import_hpd
from pipeline.evaluate import accuracy_report, evaluate, wilson_interval
from pipeline.handlers import JobContext, PermanentError
from pipeline.hps_model import HPSModel, ModelSpec
from pipeline.loss import grouped_logits, preference_loss
from pipeline.tiny_models import tiny_clip
from pipeline.train_classifier import handle_train_classifier
from pipeline.trainer import freeze_lower_blocks, train
from tests.factories import ready_round

# What makes the tiny model learn in seconds (the paper's defaults suit a pretrained ViT-L).
FAST = {
    "learning_rate": 1e-3,
    "batch_size": 10,
    "epochs": 3,
    "image_blocks": 99,
    "text_blocks": 99,
    "warmup_fraction": 0.1,
    "num_workers": 0,
}


def test_loss_is_cross_entropy_over_each_examples_images() -> None:
    image = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)  # K = 3, then K = 2
    text = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    counts = torch.tensor([3, 2])
    targets = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]])  # a pick, then a tie
    weights = torch.tensor([1.5, 0.5])
    scale = torch.tensor(math.log(200.0))  # clamped to 100

    logits = grouped_logits(image, text, counts, scale)
    assert logits.shape == (2, 3) and logits[1, 2] == float("-inf")
    first = 100 * image[:3] @ text[0]
    second = 100 * image[3:] @ text[1]
    assert torch.allclose(logits[0], first) and torch.allclose(logits[1, :2], second)

    expected = (
        1.5 * -torch.log_softmax(first, 0)[1] + 0.5 * -(0.5 * torch.log_softmax(second, 0)).sum()
    ) / 2
    loss = preference_loss(image, text, counts, targets, weights, scale)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)

    trainable = torch.zeros((), requires_grad=True)
    preference_loss(image, text, counts, targets, weights, trainable).backward()
    assert torch.isfinite(trainable.grad)


def test_splits_are_by_prompt_and_keep_a_declared_test_split(colour_hpd: Path) -> None:
    examples = examples_from_folder(colour_hpd, val_fraction=0.1, test_fraction=0.1)
    counts = split_counts(examples)
    assert counts["test"] == 80 and counts["train"] + counts["val"] == 320 and counts["val"] > 0
    sides: dict[str, set[str]] = {}
    for e in examples:
        sides.setdefault(e.prompt, set()).add(e.split)
    assert all(len(s) == 1 for s in sides.values())  # no prompt on two sides
    # Each prompt's examples weigh 1/(its count), rescaled to a mean of 1 per split.
    train = [e for e in examples if e.split == "train"]
    assert sum(e.weight for e in train) == pytest.approx(len(train))
    by_prompt: dict[str, list[float]] = {}
    for e in train:
        by_prompt.setdefault(e.prompt, []).append(e.weight)
    totals = {round(sum(ws), 9) for ws in by_prompt.values()}
    assert len(totals) == 1  # every prompt carries the same total weight
    # Stable: the same prompt always lands on the same side; undeclared prompts may be test.
    assert assign_split("abc", None, val_fraction=0.1, test_fraction=0.1) == assign_split(
        "abc", None, val_fraction=0.1, test_fraction=0.1
    )
    placed = [assign_split(str(i), None, val_fraction=0.1, test_fraction=0.2) for i in range(2000)]
    assert 0.17 < placed.count("test") / 2000 < 0.23 and 0.07 < placed.count("val") / 2000 < 0.13
    assert {
        assign_split(str(i), "train", val_fraction=0.1, test_fraction=0.2) for i in range(200)
    } == {"train", "val"}


def test_a_prompt_declared_test_anywhere_is_test_everywhere() -> None:
    from pipeline.data import Example, one_side_per_prompt

    def example(key: str, group: str, split: str) -> Example:
        return Example("p", ("a", "b"), 0, split, key, group)

    settled = one_side_per_prompt(
        [example("hpd:1", "g1", "test"), example("choice:7", "g1", "train"),
         example("choice:8", "g2", "val"), example("choice:9", "g2", "val")]
    )  # fmt: skip
    assert [e.split for e in settled] == ["test", "test", "val", "val"]


def test_only_the_last_blocks_of_each_tower_train(tmp_path: Path) -> None:
    clip, _ = tiny_clip(tmp_path)
    trainable = freeze_lower_blocks(clip, image_blocks=1, text_blocks=1)
    names = {n for n, p in clip.named_parameters() if p.requires_grad}
    assert trainable == sum(p.numel() for n, p in clip.named_parameters() if n in names)
    assert "visual.transformer.resblocks.1.attn.in_proj_weight" in names
    assert {"visual.ln_post.weight", "visual.proj", "ln_final.weight", "text_projection"} <= names
    assert "transformer.resblocks.1.mlp.c_fc.weight" in names and "logit_scale" in names
    frozen = {"visual.transformer.resblocks.0.attn.in_proj_weight", "visual.conv1.weight",
              "transformer.resblocks.0.mlp.c_fc.weight", "token_embedding.weight",
              "positional_embedding", "visual.class_embedding"}  # fmt: skip
    assert not names & frozen


def test_tiny_clip_learns_the_choice_rule(colour_hpd: Path, tmp_path: Path) -> None:
    config_file = tmp_path / "hps-tiny-clip.json"
    tiny_clip(tmp_path)  # writes the config
    examples = examples_from_folder(colour_hpd)
    recipe = TrainSettings(patience=1, **FAST)
    result = train(examples, read_path, recipe, base=ModelSpec(str(config_file)),
                   out_dir=tmp_path / "run", progress=False)  # fmt: skip

    assert result.initial is not None and result.initial["n"] == 80
    assert result.initial["top1"] < 0.45  # untrained: near chance (0.25)
    trained = HPSModel.load(result.best)
    report = evaluate(trained, [e for e in examples if e.split == "test"], read_path)
    assert report["top1"] >= 0.9 and report["pairwise"] >= 0.95
    assert report["top1_ci"][0] > 0.8 and report["chance"] == 0.25

    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == result.epochs_run and json.loads(lines[0])["epoch"] == 1
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "best").resolve() == checkpoints / f"epoch-{result.best_epoch}"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best", f"epoch-{result.best_epoch}"]
    meta = json.loads((checkpoints / "best" / "hps.json").read_text())
    assert meta["training"]["epoch"] == result.best_epoch
    assert meta["training"]["config"]["learning_rate"] == 1e-3


async def _import(pool: Any, folder: Path, data_dir: Path) -> None:
    async with pool.acquire() as conn:
        await import_hpd(conn, LocalImageStore(data_dir / "images"), folder, progress=False)


def _context(pool: Any, settings: Any, job: jobs.Job) -> JobContext:
    return JobContext(
        job=job,
        settings=settings,
        pool=pool,
        store=LocalImageStore(settings.images_dir),
        worker_id="test-worker",
        device="cpu",
        cache={},
    )


@pytest.mark.slow
async def test_train_job_registers_promotes_and_refuses_a_worse_model(
    pool, colour_hpd: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    _, config_file = tiny_clip(tmp_path)
    settings = load_settings(
        models={"hps_arch": str(config_file), "hps_pretrained": None},
        train={**FAST, "min_examples": 50, "promote_margin": 0.05},
    )
    await _import(pool, colour_hpd, settings.data_dir)

    job, _ = await jobs.enqueue_training(pool, "classifier", requested_by="test")
    result = await handle_train_classifier(_context(pool, settings, job))
    name = f"classifier-job{job.id}"
    assert result["status"] == "trained" and result["promoted"] is True
    assert result["version"] == name
    assert result["examples"]["test"] == 80
    metrics = result["metrics"]
    assert metrics["new"]["top1"] >= 0.9 and metrics["untuned"]["top1"] < 0.45
    # With no serving version the configured model (here the same untuned base) serves.
    configured = f"configured:{config_file}"
    assert metrics[configured] == metrics["untuned"]
    assert f"Promoted to serving: better: top-1 {metrics['new']['top1']:.3f}" in result["summary"]

    version = await models.serving(pool, "classifier")
    assert version is not None and version.name == name and version.parent_id is None
    assert version.artifact == f"models/{name}/{version.sha256}"  # in the (local) store
    folder = settings.data_dir / version.artifact
    assert version.sha256 == json.loads((folder / "hps.json").read_text())["weights_sha256"]
    assert version.metrics["test"]["top1"] == metrics["new"]["top1"]
    assert set(version.metrics["compared"]) == {"untuned", configured}
    run_dir = settings.runs_dir / name
    assert {p.name for p in run_dir.iterdir()} >= {"config.json", "metrics.jsonl", "eval.json"}

    # A run that barely trains is worse than the serving version: registered, not promoted.
    job2, _ = await jobs.enqueue(
        pool, "train_classifier", {"learning_rate": 1e-9, "epochs": 1, "requested_by": "test"}
    )
    worse = await handle_train_classifier(_context(pool, settings, job2))
    assert worse["status"] == "trained" and worse["promoted"] is False
    assert worse["metrics"][name]["top1"] == pytest.approx(metrics["new"]["top1"])
    assert "not better by the margin" in worse["reason"]
    assert "Registered as a candidate, not promoted" in worse["summary"]
    assert (await models.serving(pool, "classifier")).name == name
    second = await models.get(pool, f"classifier-job{job2.id}")
    assert second.status == "candidate" and second.parent_id == version.id

    # A retried attempt (after a crash past registering) finishes without training again.
    retried = await handle_train_classifier(_context(pool, settings, job2))
    assert retried["version"] == second.name and retried["promoted"] is False
    assert "not better by the margin" in retried["reason"]
    again = await handle_train_classifier(_context(pool, settings, job))
    assert again["promoted"] is True and again["reason"] == "promoted by an earlier attempt"
    assert len(await models.list_versions(pool, "classifier")) == 2


async def test_train_job_skips_when_there_are_too_few_examples(pool, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings = load_settings(train={"min_examples": 10})
    job, _ = await jobs.enqueue_training(pool, "classifier", requested_by="test")
    result = await handle_train_classifier(_context(pool, settings, job))
    assert result == {
        "status": "skipped",
        "summary": "Classifier training skipped: 0 training examples, fewer than the 10 "
        "needed (val 0, test 0).",
        "promoted": False,
        "reason": "0 training examples, fewer than the 10 needed (val 0, test 0)",
    }
    assert await models.list_versions(pool, "classifier") == []


async def test_training_examples_leave_out_flagged_banned_forgotten_and_none(pool) -> None:  # type: ignore[no-untyped-def]
    async def round_by(requester: int, prompt: str, k: int = 4) -> int:
        return await ready_round(pool, requester=requester, prompt=prompt, k=k)

    kept_pick = await round_by(1, "a red cube")
    kept_tie = await round_by(2, "a blue ball", k=3)
    await record_choice(pool, round_id=kept_pick, discord_user_id=1, verdict="pick", position=3)
    await record_choice(pool, round_id=kept_pick, discord_user_id=9, verdict="pick", position=1)
    await record_choice(pool, round_id=kept_tie, discord_user_id=2, verdict="tie")

    none_round = await round_by(3, "a green car")
    await record_choice(pool, round_id=none_round, discord_user_id=3, verdict="none")
    await users.ban(pool, 4, shadow=True, reason="spam", actor="mod")
    flagged = await round_by(4, "a black cat")
    await record_choice(pool, round_id=flagged, discord_user_id=4, verdict="pick", position=1)
    banned = await round_by(5, "a white dog")
    await record_choice(pool, round_id=banned, discord_user_id=5, verdict="pick", position=2)
    await users.ban(pool, 5, reason="abuse", actor="mod")
    forgotten = await round_by(6, "an orange hat")
    await record_choice(pool, round_id=forgotten, discord_user_id=6, verdict="pick", position=2)
    await users.forget_user(pool, 6)
    await prompts.ensure_prompt(pool, "a photo of Jane Doe", contains_name=True)
    named = await round_by(7, "a photo of Jane Doe")
    await record_choice(pool, round_id=named, discord_user_id=7, verdict="pick", position=4)

    examples = await examples_from_db(pool)
    assert [(e.prompt, e.chosen, e.k) for e in examples] == [
        ("a red cube", 2, 4),
        ("a blue ball", None, 3),
    ]
    everyone = await examples_from_db(pool, all_choosers=True, include_contains_name=True)
    assert sorted((e.prompt, e.chosen) for e in everyone) == [
        ("a blue ball", None),
        ("a photo of Jane Doe", 3),
        ("a red cube", 0),
        ("a red cube", 2),
    ]
    assert all(isinstance(e, Example) and e.key.startswith("choice:") for e in everyone)
    red = [e for e in everyone if e.prompt == "a red cube"]
    assert red[0].weight == red[1].weight  # two choices of one prompt share its weight


def test_gradient_accumulation_steps_the_optimizer_once_per_group(
    colour_hpd: Path, tmp_path: Path
) -> None:
    _, config_file = tiny_clip(tmp_path)
    examples = [e for e in examples_from_folder(colour_hpd) if e.split == "train"][:40]
    recipe = TrainSettings(**{**FAST, "epochs": 1, "batch_size": 5, "grad_accumulation": 4})
    result = train(examples, read_path, recipe, base=ModelSpec(str(config_file)),
                   out_dir=tmp_path / "run", progress=False)  # fmt: skip
    assert result.steps == 2  # 8 batches of 5, one optimizer step per 4 batches
    assert result.history[0]["val_top1"] is None and result.best_epoch == 1
    assert result.initial is None  # no test examples given


def test_a_cancelled_run_stops_at_its_next_step(colour_hpd: Path, tmp_path: Path) -> None:
    """A worker giving a job up sets the event; the training thread stops within a step
    instead of training on for hours."""
    import threading

    from pipeline.handlers import Cancelled

    _, config_file = tiny_clip(tmp_path)
    examples = [e for e in examples_from_folder(colour_hpd) if e.split != "test"][:60]
    recipe = TrainSettings(**{**FAST, "epochs": 3})
    cancelled = threading.Event()
    with pytest.raises(Cancelled, match="training cancelled at step"):
        train(examples, read_path, recipe, base=ModelSpec(str(config_file)),
              out_dir=tmp_path / "run", progress=False, on_epoch=lambda record: cancelled.set(),
              cancelled=cancelled)  # fmt: skip
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 1  # epoch 1 ran; epoch 2 stopped at its first step


def test_training_follows_the_configured_device(tmp_path: Path) -> None:
    from hps.settings import load_settings
    from pipeline.runs import Run, RunContext
    from pipeline.train_classifier import CLASSIFIER

    settings = load_settings(models={"device": "cpu"})
    assert RunContext(CLASSIFIER, Run(tmp_path, {}), settings).device == "cpu"


def test_accuracy_report_counts_top1_pairs_ties_and_intervals() -> None:
    def example(k: int, chosen: int | None, key: str) -> Example:
        return Example("p", tuple(f"{key}-{i}" for i in range(k)), chosen, "test", key, key)

    examples = [example(2, 0, "a"), example(2, 1, "b"), example(3, 2, "c"), example(3, 0, "d"),
                example(3, None, "e")]  # fmt: skip
    scores = [[5.0, 1.0], [5.0, 1.0], [1.0, 2.0, 3.0], [2.0, 2.0, 1.0], [1.0, 2.0, 3.0]]
    report = accuracy_report(examples, scores)
    assert (report["n"], report["ties"]) == (4, 1)
    # d's chosen image 0 shares the best score with image 1: it counts half (the expected
    # top-1 of a random tie-break), not 1 as argmax's first-of-equals once gave it.
    assert report["top1"] == 2.5 / 4 and report["chance"] == pytest.approx(
        (0.5 + 0.5 + 1 / 3 + 1 / 3) / 4
    )
    # Pairs: a 1/1, b 0/1, c 2/2, d (tie with 1 → half, beats 2) 1.5/2: 4.5 of 6.
    assert report["pairwise_n"] == 6 and report["pairwise"] == 0.75
    # One example per prompt: Wilson's interval, of fractional successes too.
    assert report["top1_ci"] == list(wilson_interval(2.5, 4))
    assert report["per_k"] == {
        "2": {"n": 2, "top1": 0.5, "top1_ci": list(wilson_interval(1, 2)), "chance": 0.5},
        "3": {"n": 2, "top1": 0.75, "top1_ci": list(wilson_interval(1.5, 2)), "chance": 1 / 3},
    }
    low, high = wilson_interval(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    assert report["pairwise_ci"][0] <= 0.75 <= report["pairwise_ci"][1]


def test_top1_of_tied_best_scores_does_not_depend_on_the_position_shown() -> None:
    def top1(scores: list[float], chosen: int) -> float:
        example = Example("p", tuple(f"i{j}" for j in range(len(scores))), chosen, "test", "k", "g")
        return accuracy_report([example], [scores])["top1"]

    # CLIP score clamps at 0: three images at 0, the chosen one among them, wherever shown.
    assert [top1([0.0, 0.0, 0.0, -1.0], chosen) for chosen in range(3)] == [1 / 3] * 3
    assert top1([0.0, 0.0, 0.0, -1.0], 3) == 0.0
    assert top1([3.0, 3.0], 0) == top1([3.0, 3.0], 1) == 0.5  # identical images
    assert top1([1.0, 3.0], 1) == 1.0


def test_intervals_resample_prompts_not_choices() -> None:
    """With everyone's choices (or repeated prompts) a prompt's choices agree with one
    another: repeating them must not narrow the intervals, as it would narrow an interval
    over choices."""

    def examples(repeats: int) -> tuple[list[Example], list[list[float]]]:
        made, scores = [], []
        for prompt in range(12):
            right = prompt < 7  # 7 of 12 prompts scored right, every choice of them alike
            for r in range(repeats):
                key = f"{prompt}:{r}"
                made.append(Example(f"p{prompt}", (f"{key}a", f"{key}b", f"{key}c"), 0, "test",
                                    key, f"g{prompt}"))  # fmt: skip
                scores.append([3.0, 2.0, 1.0] if right else [1.0, 2.0, 3.0])
        return made, scores

    once = accuracy_report(*examples(1))
    twice, five = accuracy_report(*examples(2)), accuracy_report(*examples(5))
    assert once["top1"] == twice["top1"] == five["top1"] == 7 / 12
    assert once["top1_ci"] == list(wilson_interval(7, 12))  # one choice per prompt
    # Repeated: a bootstrap over the 12 prompts, as wide however many times they repeat,
    # and wider than Wilson's over 60 choices would claim.
    assert twice["top1_ci"] == five["top1_ci"]
    low, high = five["top1_ci"]
    wilson_low, wilson_high = wilson_interval(35, 60)
    assert high - low > 1.3 * (wilson_high - wilson_low)
    assert once["pairwise_ci"] == twice["pairwise_ci"] == five["pairwise_ci"]
    assert five["per_k"]["3"]["top1_ci"] == five["top1_ci"]
    # Deterministic: the same examples give the same interval.
    assert accuracy_report(*examples(5))["top1_ci"] == five["top1_ci"]


async def test_train_job_refuses_invalid_options(pool) -> None:  # type: ignore[no-untyped-def]
    job, _ = await jobs.enqueue(pool, "train_classifier", {"epochs": 0, "requested_by": "x"})
    with pytest.raises(PermanentError, match="invalid train_classifier options"):
        await handle_train_classifier(_context(pool, load_settings(), job))
    assert not (load_settings().runs_dir / f"classifier-job{job.id}").exists()


@pytest.mark.parametrize(
    ("processes", "accumulation", "split_batches"), [(1, 1, False), (4, 1, False), (4, 2, False),
                                                     (3, 1, True)]
)  # fmt: skip
def test_the_lr_schedule_ends_with_the_training_however_many_processes(
    processes: int, accumulation: int, split_batches: bool
) -> None:
    """accelerate's scheduler wrapper steps the schedule once per process per optimizer step
    (unless batches are split); the schedule must still warm up for 10% of the steps and
    reach its end at the last one, as with one process."""
    from pipeline.trainer import _scheduler, schedule_lengths

    batches, epochs = 40, 2  # of the whole data set, per epoch
    per_process = batches if split_batches else math.ceil(batches / processes)
    ticks = 1 if split_batches else processes
    total, warmup = schedule_lengths(
        per_process, grad_accumulation=accumulation, epochs=epochs, warmup_fraction=0.1,
        ticks_per_step=ticks,
    )  # fmt: skip
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = _scheduler(optimizer, total, warmup)
    steps = math.ceil(per_process / accumulation) * epochs  # one process's optimizer steps
    lrs = []
    for _ in range(steps):  # what AcceleratedScheduler does after each optimizer step
        optimizer.step()
        for _ in range(ticks):
            scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    warmup_steps = int(0.1 * steps)
    assert max(lrs) == pytest.approx(1.0) and lrs.index(max(lrs)) == warmup_steps - 1
    assert lrs[-1] == pytest.approx(0.0, abs=1e-9)  # the cosine ends with the last step
    decay = lrs[warmup_steps - 1 :]
    assert decay == sorted(decay, reverse=True)  # then it only decays


def _tiny_examples(tmp_path: Path, n: int, size: tuple[int, int] = (32, 32)) -> list[Example]:
    """n examples of 3 images (of `size`: three vertical bands of random colours) each,
    split train/test alternately. Cropping a wide one to a square keeps the middle band only."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    examples = []
    for i in range(n):
        paths = []
        for j in range(3):
            path = tmp_path / f"{i}_{j}.png"
            bands = rng.integers(0, 256, (3, 3), dtype=np.uint8)
            pixels = np.repeat(bands, -(-size[0] // 3), axis=0)[: size[0]]
            Image.fromarray(np.broadcast_to(pixels, (size[1], size[0], 3)).copy()).save(path)
            paths.append(str(path))
        split = "train" if i % 2 else "test"
        examples.append(Example(f"a red cube {i}", tuple(paths), i % 3, split, f"x:{i}", str(i)))
    return examples


def test_two_trainings_in_one_process_with_other_precisions(tmp_path: Path) -> None:
    """A worker trains one run after another: the second may use another mixed precision
    (or device) than the first without accelerate refusing to start."""
    _, config_file = tiny_clip(tmp_path)
    examples = [e for e in _tiny_examples(tmp_path, 20) if e.split == "train"]
    for precision in ("bf16", "no"):
        recipe = TrainSettings(mixed_precision=precision, **{**FAST, "epochs": 1, "batch_size": 5})
        result = train(examples, read_path, recipe, base=ModelSpec(str(config_file)),
                       out_dir=tmp_path / f"run-{precision}", device="cpu",
                       progress=False)  # fmt: skip
        assert result.steps == 2


def test_the_untuned_base_is_evaluated_with_the_preprocessing_it_serves_with(
    tmp_path: Path,
) -> None:
    """Training pads images (the recipe's resize mode); the report on the base it starts
    from, which is also the serving model's report when the base serves, must crop as the
    base does when it serves."""
    _, config_file = tiny_clip(tmp_path)
    examples = _tiny_examples(tmp_path, 40, size=(48, 24))  # wide: cropping ≠ padding
    test = [e for e in examples if e.split == "test"]
    recipe = TrainSettings(**{**FAST, "epochs": 1})
    result = train(examples, read_path, recipe, base=ModelSpec(str(config_file)),
                   out_dir=tmp_path / "run", progress=False)  # fmt: skip

    def report(resize_mode: str | None) -> dict[str, Any]:
        torch.manual_seed(recipe.seed)  # the base's random initialisation, as train() made it
        model = HPSModel.load(config_file, resize_mode=resize_mode, device="cpu")
        return evaluate(model, test, read_path)

    serving = report(None)
    assert serving["examples"] == result.initial["examples"]
    assert serving["pairwise"] != report("longest")["pairwise"]  # the test can tell them apart
    assert result.initial["pairwise"] == serving["pairwise"]
    assert result.initial["top1"] == serving["top1"]
    saved = json.loads((result.best / "open_clip_config.json").read_text())
    assert saved["preprocess_cfg"]["resize_mode"] == "longest"  # trained and saved padding


def test_every_process_agrees_on_the_run_name(tmp_path: Path) -> None:
    from cli.train import RunExists, agree_run_name

    stamped = agree_run_name(tmp_path, None)
    assert stamped.startswith("classifier-") and len(stamped) == len("classifier-20261201-120000")
    assert agree_run_name(tmp_path, "mine") == "mine"
    (tmp_path / "mine").mkdir()
    with pytest.raises(RunExists, match=f"a run named mine exists in {tmp_path}"):
        agree_run_name(tmp_path, "mine")


@pytest.mark.parametrize("fails", [False, True])
async def test_a_runs_image_copies_are_removed_when_it_ends(tmp_path: Path, fails: bool) -> None:
    """Copies of an object store's images in the run folder live as long as the run: gone
    when it finishes, and when it fails (the store's deletions must reach them)."""
    from pipeline.runs import Outcome, Recipe, Run, Stage, run_recipe

    settings = load_settings(data_dir=tmp_path)

    async def open_run(pool: Any, settings: Any, name: str, **_: Any) -> Run:
        return Run.create(settings.runs_dir / name, name=name, recipe={})

    async def copy(rc: Any) -> dict[str, Any]:
        (rc.image_copies / "ab").mkdir(parents=True)
        (rc.image_copies / "ab" / "abcd.png").write_bytes(b"an image")
        return {}

    async def train(rc: Any) -> dict[str, Any]:
        assert (rc.image_copies / "ab" / "abcd.png").is_file()  # there while it runs
        if fails:
            raise RuntimeError("training died")
        return {}

    recipe = Recipe(
        kind="hps_classifier", section="train", title="test", open=open_run,
        stages=(Stage("copy", copy), Stage("train", train)), gate=lambda rc: None,  # type: ignore[arg-type,return-value]
        outcome=Outcome, passed="promoted",
    )  # fmt: skip
    if fails:
        with pytest.raises(RuntimeError, match="training died"):
            await run_recipe(recipe, None, settings, name="r1", progress=False)
    else:
        await run_recipe(recipe, None, settings, name="r1", progress=False)
    assert (settings.runs_dir / "r1" / "manifest.json").is_file()
    assert not (settings.runs_dir / "r1" / "image-copies").exists()
