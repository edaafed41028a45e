"""The HPS commands as a user runs them: import, train, models, eval, score, export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_cli import hps
from tests.tiny_clip import tiny_config, write_colour_hpd

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
    assert (tmp_path / "data" / "models" / "good" / "model.safetensors").is_file()

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
    as_json = json.loads(hps("models", "list", "--kind", "sd_adapter", "--json", env=env).stdout)
    assert as_json[0]["live"]["rounds"] == 3 and as_json[0]["live"]["opponent"] == base.name

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
