"""The HPS commands as a user runs them: import, train, models, eval, score, export."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.tiny_models import tiny_config
from tests.colour_task import write_colour_hpd
from tests.test_cli import hps

FAST = ["--lr", "1e-3", "--batch-size", "10", "--image-blocks", "99", "--text-blocks", "99",
        "--num-workers", "0", "--min-examples", "20"]  # fmt: skip


@pytest.mark.slow
def test_score_prints_one_score_per_image_and_explains_missing_weights(
    tiny_model, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from pipeline.hps_model import HPSModel

    config, weights = tiny_model
    images = sorted(
        (write_colour_hpd(tmp_path / "d", n_train=1, n_test=0, k=3) / "preference_images").iterdir()
    )
    model = HPSModel.load(config, pretrained=str(weights))
    model.save(tmp_path / "saved")
    expected = model.score("a red cube", images)

    result = hps("score", "--model", str(tmp_path / "saved"), "--prompt", "a red cube",
                 *map(str, images), "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    assert output["scale"] == "hps" and output["model"] == model.name
    assert [r["image"] for r in output["scores"]] == [str(p) for p in images]
    assert [r["score"] for r in output["scores"]] == pytest.approx(expected, abs=1e-5)
    plain = hps("score", "-m", str(tmp_path / "saved"), "-p", "a red cube", str(images[0]))
    assert plain.stdout.split() == [f"{expected[0]:.4f}", str(images[0])]

    # Offline without the weights: a clear message, no traceback.
    offline = hps("score", "--model", "ViT-B-32", "--pretrained", "openai", "-p", "x",
                  str(images[0]), env={"HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert offline.returncode == 1
    assert "the 'openai' weights of ViT-B-32 are not in the local cache" in offline.stderr
    assert "HPS_MODELS__HPS_PRETRAINED" in offline.stderr and "Traceback" not in offline.stderr


@pytest.mark.slow
def test_import_train_promote_eval_rollback_export(database_url: str, tmp_path: Path) -> None:
    data = write_colour_hpd(tmp_path / "hpd", n_train=160, n_test=40, k=4)
    env = {
        "HPS_DATABASE_URL": database_url,
        "HPS_DATA_DIR": str(tmp_path / "data"),
        "HPS_MODELS__HPS_ARCH": str(tiny_config(tmp_path)),
        "HPS_MODELS__HPS_PRETRAINED": "",
        "HPS_TRAIN__PROMOTE_MARGIN": "0.05",
    }
    imported = hps("import", str(data), env=env)
    assert imported.returncode == 0, imported.stderr
    assert "200 records: 200 imported, 0 already there" in imported.stdout

    good = hps("train", "--name", "good", "--epochs", "3", *FAST, env=env)
    assert good.returncode == 0, good.stderr
    assert "Promoted to serving: better" in good.stdout and "untuned" in good.stdout
    [published] = (tmp_path / "data" / "models" / "good").iterdir()  # models/good/<sha256>
    assert (published / "model.safetensors").is_file()

    worse = hps("train", "--name", "worse", "--epochs", "1", *FAST[2:], "--lr", "1e-9", env=env)
    assert worse.returncode == 0, worse.stderr
    assert "Registered as a candidate, not promoted: not better by the margin" in worse.stdout
    refused = hps("models", "promote", "worse", env=env)
    assert refused.returncode == 1 and "worse does not beat good" in refused.stderr

    evaluated = hps("eval", "--model", "good", "--output", str(tmp_path / "eval.json"), env=env)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "Predicting the person's choice" in evaluated.stdout
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["split"] == "test" and set(report["reports"]) == {"good", "untuned"}
    assert report["reports"]["good"]["n"] == 40

    listed = hps("models", "list", "--json", env=env)
    versions = {v["name"]: v for v in json.loads(listed.stdout)}
    assert versions["good"]["status"] == "serving" and versions["worse"]["status"] == "candidate"
    assert versions["good"]["metrics"]["test"]["top1"] >= 0.9
    assert "evaluated_at" in versions["good"]["metrics"]  # hps eval recorded its results
    assert versions["good"]["metrics"]["test"]["top1"] == report["reports"]["good"]["top1"]

    rolled = hps("models", "rollback", env=env)
    assert "good rolled back; now serving: the configured base model" in rolled.stdout
    # Nothing serves: the configured model does, and worse was never compared with it.
    refused = hps("models", "promote", "worse", env=env)
    assert refused.returncode == 1
    assert "worse was not evaluated against the configured model" in refused.stderr
    forced = hps("models", "promote", "worse", "--force", env=env)
    assert forced.returncode == 0 and "worse is serving" in forced.stdout

    exported = hps("export", str(tmp_path / "out"), "--format", "parquet", env=env)
    assert exported.returncode == 0, exported.stderr
    assert "200 choices exported as 200 parquet rows" in exported.stdout


@pytest.mark.slow
async def test_adapt_review_and_models_list_show_live_and_offline_numbers(
    pool, database_url: str, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from db import models
    from db.choices import record_choice
    from tests.factories import ready_round

    base = await models.ensure_base(pool, kind="sd_base", artifact="tiny-sd")
    offline = {"pairs": 40, "win_rate": 0.6, "win_rate_ci": [0.45, 0.74], "hps_gain": 0.1}
    adapter = await models.register(pool, kind="sd_adapter", artifact="/m/a",
                                    config={"recipe": {"adapt": {"recipe": "dpo"}}},
                                    metrics={"offline": offline})  # fmt: skip
    await models.start_testing(pool, adapter.id, actor="test")
    for user in range(3):
        round_id = await ready_round(pool, requester=user + 1, prompt=f"p{user}",
                                     model_version_ids={1: base.id, 2: adapter.id})  # fmt: skip
        await record_choice(pool, round_id=round_id, discord_user_id=user + 1, verdict="pick",
                            position=2 if user else 1)  # fmt: skip
    env = {"HPS_DATABASE_URL": database_url, "HPS_DATA_DIR": str(tmp_path / "data"),
           "HPS_ADAPT__MIN_LIVE_ROUNDS": "3", "COLUMNS": "250"}  # fmt: skip

    listed = hps("models", "list", "--kind", "sd_adapter", env=env)
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if adapter.name in line)
    assert "60.0% [45.0%, 74.0%] (+0.100)" in row and "2/3" in row and "66.7% [20.8%, 93.9%]" in row
    assert " dpo " in row
    # The recipe's adapters together, against their incumbents (the base's side of the
    # same rounds is not counted again).
    by_recipe = listed.stdout[listed.stdout.index("Live win rate by recipe") :]
    [dpo] = [line for line in by_recipe.splitlines() if " dpo " in line]
    assert [cell.strip() for cell in dpo.split("│")[2:6]] == ["1", "3", "2", "66.7% [20.8%, 93.9%]"]
    as_json = json.loads(hps("models", "list", "--kind", "sd_adapter", "--json", env=env).stdout)
    assert as_json[0]["live"]["rounds"] == 3 and as_json[0]["live"]["opponent"] == base.name
    assert as_json[0]["recipe"] == "dpo"

    dry = hps("adapt", "review", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert "(dry run)" in dry.stdout and "keep: live win rate 66.7%" in dry.stdout
    assert (await models.get(pool, adapter.id)).metrics.get("live") is None
    reviewed = hps("adapt", "review", env=env)
    assert reviewed.returncode == 0 and "keep: live win rate 66.7%" in reviewed.stdout
    assert (await models.get(pool, adapter.id)).metrics["live"]["wins"] == 2

    unknown = hps("adapt", "eval", "nope", env=env)
    assert unknown.returncode == 1 and "no sd_adapter version 'nope'" in unknown.stderr
    missing = hps("adapt", "run", "--name", "r1", "--regularization-data",
                  str(tmp_path / "absent"), env=env)  # fmt: skip
    assert missing.returncode == 1 and "no regularization data at" in missing.stderr
    assert "Traceback" not in missing.stderr and not (tmp_path / "data" / "runs").exists()


async def test_eval_of_a_bare_weights_file_compares_it_with_the_untuned_configured_clip(
    database_url: str, colour_hpd: Path, tmp_path: Path
) -> None:
    """The paper's hpc.pth records no base: its baseline is the configured architecture's
    untuned CLIP (models.hps_arch with hps_pretrained), when the architectures match."""
    import torch

    from cli.train import _evaluate
    from hps.settings import load_settings
    from pipeline.data import examples_from_folder, read_path
    from pipeline.evaluate import evaluate as evaluate_model
    from pipeline.hps_model import HPSModel
    from pipeline.tiny_models import tiny_openai_checkpoint

    checkpoint = tiny_openai_checkpoint(tmp_path, seed=3)
    config = load_settings(
        database_url=database_url,
        data_dir=tmp_path / "data",
        models={"hps_arch": str(tiny_config(tmp_path)), "hps_pretrained": None},
    )
    reports, target = await _evaluate(config, str(checkpoint), colour_hpd, "test", False, 32)
    assert target == str(checkpoint).replace("/", "_")
    assert set(reports) == {str(checkpoint), "untuned", f"configured:{tiny_config(tmp_path)}"}
    test = [e for e in examples_from_folder(colour_hpd) if e.split == "test"]
    torch.manual_seed(config.train.seed)
    untuned = evaluate_model(HPSModel.load(tiny_config(tmp_path)), test, read_path)
    assert reports["untuned"]["pairwise"] == untuned["pairwise"]
    assert reports["untuned"]["top1"] == untuned["top1"]

    # Another configured architecture is no baseline of it: none is reported.
    other = {**json.loads(tiny_config(tmp_path).read_text()), "embed_dim": 16}
    (tmp_path / "other").mkdir()
    other_config = tmp_path / "other" / "hps-other-clip.json"
    other_config.write_text(json.dumps(other))
    config = load_settings(
        database_url=database_url,
        data_dir=tmp_path / "data",
        models={"hps_arch": str(other_config), "hps_pretrained": None},
    )
    reports, _ = await _evaluate(config, str(checkpoint), colour_hpd, "test", False, 32)
    assert "untuned" not in reports


def _classifier(name: str, compared: dict[str, dict]) -> object:
    from datetime import UTC, datetime

    from db.models import ModelVersion

    test = {"examples": "e1", "n": 40, "top1": 0.9}
    return ModelVersion(
        id=1, kind="classifier", name=name, parent_id=None, artifact="/m", sha256=None,
        config={}, metrics={"test": test, "compared": compared}, status="candidate",
        created_at=datetime.now(UTC), promoted_at=None, retired_at=None,
    )  # fmt: skip


def test_the_promotion_gate_compares_with_the_model_configured_now() -> None:
    from db.models import ModelError
    from db.promotion import check_promotable, configured_label
    from hps.settings import load_settings
    from pipeline.registry import configured_spec

    settings = load_settings(models={"hps_arch": "ViT-L-14", "hps_checkpoint": "/w/hpc.pth"})
    now = configured_label(settings)
    assert now == "configured:ViT-L-14 pretrained=openai checkpoint=/w/hpc.pth"
    assert now == "configured:" + configured_spec(settings).describe()  # one naming
    before = "configured:ViT-L-14 pretrained=openai"
    weak = {"examples": "e1", "n": 40, "top1": 0.5}

    # Evaluated only against a model configured before: not against the one to beat now.
    stale = _classifier("v2", {before: weak})
    with pytest.raises(ModelError) as refused:
        check_promotable(stale, None, 0.01, now)
    assert str(refused.value) == (
        f"v2 was not evaluated against the configured model ({now}) (only against {before}, "
        "configured before): run `hps eval --model v2` first (or force the promotion)"
    )
    fresh = _classifier("v3", {before: weak, now: weak})
    assert check_promotable(fresh, None, 0.01, now).startswith("better: top-1 0.900 vs 0.500")
    strong = _classifier("v4", {now: {"examples": "e1", "n": 40, "top1": 0.95}})
    with pytest.raises(ModelError, match=r"v4 does not beat the configured model \(configured:"):
        check_promotable(strong, None, 0.01, now)


@pytest.mark.slow
def test_train_in_two_processes_makes_one_run_whose_schedule_ends_with_it(tmp_path: Path) -> None:
    """`hps train` under a distributed launcher (here torchrun with two CPU processes and
    gloo, as `accelerate launch` on two GPUs): one run name and folder for both processes,
    each training on its half of the batches, the LR schedule ending at the last step."""
    import subprocess
    import sys

    data = write_colour_hpd(tmp_path / "hpd", n_train=40, n_test=10, k=4)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPS_")}
    env.update({"HPS_DATA_DIR": str(tmp_path / "data"), "HPS_MODELS__DEVICE": "cpu",
                "HPS_MODELS__HPS_ARCH": str(tiny_config(tmp_path)),
                "HPS_MODELS__HPS_PRETRAINED": ""})  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "cli", "train", "--data", str(data), "--no-register", "--epochs", "2",
         "--batch-size", "5", *FAST[:2], *FAST[4:]],
        capture_output=True, text=True, env=env, cwd=Path(__file__).parents[2], timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "data" / "runs").iterdir())
    assert len(runs) == 1 and result.stdout.count("Predicting the person's choice") == 1
    epochs = [json.loads(line) for line in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    # 38 training examples: 8 batches of 5, 4 for each process: 4 optimizer steps an epoch.
    assert [e["steps"] for e in epochs] == [4, 8]
    assert epochs[0]["lr"] == pytest.approx(5e-4) and epochs[-1]["lr"] == pytest.approx(0.0)
