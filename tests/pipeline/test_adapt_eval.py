"""The offline evaluation beside a worker's other jobs: the adapters it uses stay loaded
while generate jobs unload others, and a crashed evaluation resumes its recorded pairs."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from db import models
from hps.settings import AdaptSettings
from hps.store import StoreUnavailable
from pipeline.adapt import dataset as data
from pipeline.adapt.evaluate import PAIRS_FILE, evaluate_adapter
from pipeline.adapt.run import EVAL_DIR, PROMPTS_FILE, SD_ADAPTATION, open_run
from pipeline.generate import Generator, ImageRequest, SamplingParams
from pipeline.handlers import Cancelled
from pipeline.hps_model import HPSModel
from pipeline.runs import Resources, run_recipe
from pipeline.scorers import cached_scorers
from tests.pipeline.conftest import make_settings

PARAMS = SamplingParams(steps=2, guidance_scale=7.5, width=64, height=64)
HELD_OUT = ["a red cube", "a blue ball"]


class CountingScorer:
    """The tiny HPS model, counting the images it scores; `then` runs after each batch."""

    def __init__(self, model: HPSModel, then: Any = None) -> None:
        self.model, self.then, self.images = model, then, 0
        self.name = model.name

    def score(self, prompts: Any, pictures: list[Any]) -> Any:
        self.images += len(pictures)
        scores = self.model.score(prompts, pictures)
        if self.then is not None:
            self.then(self)
        return scores


@pytest.fixture(scope="module")
def generator(tiny_sd_dir: Path) -> Generator:
    return Generator(str(tiny_sd_dir), device="cpu", safety_checker=False)


@pytest.fixture(scope="module")
def scorer(tiny_model: tuple[Path, Path]) -> HPSModel:
    config, weights = tiny_model
    return HPSModel.load(config, pretrained=str(weights), device="cpu")


def test_pinned_adapters_stay_loaded_and_an_unloaded_one_a_round_needs_loads_again(
    generator: Generator, tiny_lora_dirs: list[Path]
) -> None:
    with generator.pinned(["run:x", None]):
        generator.load_adapter("run:x", str(tiny_lora_dirs[0]))
        generator.load_adapter("v9", str(tiny_lora_dirs[1]), "Odd. ")
        [before] = generator.generate([ImageRequest("a red cube", "", 1, "v9")], PARAMS)
        generator.keep_adapters(set())  # a generate job: no version serves or tests
        assert set(generator.adapters) == {"run:x"}
    generator.keep_adapters(set())
    assert generator.adapters == {}
    # A generate job planned a round with v9 before another job unloaded it: it loads again,
    # with its identifier, and makes the same image.
    [after] = generator.generate([ImageRequest("a red cube", "", 1, "v9")], PARAMS)
    assert after.png == before.png and generator.identifiers["v9"] == "Odd. "
    generator.keep_adapters(set())


def test_a_crashed_evaluation_resumes_its_recorded_pairs(
    generator: Generator, scorer: HPSModel, tiny_lora_dirs: list[Path], tmp_path: Path
) -> None:
    generator.load_adapter("tuned", str(tiny_lora_dirs[0]))

    def evaluate(out: Path, counting: CountingScorer, cancelled: threading.Event | None) -> Any:
        return evaluate_adapter(HELD_OUT, generator=generator, scorer=counting,  # type: ignore[arg-type]
                                adapter="tuned", parent=None, params=PARAMS, seeds_per_prompt=2,
                                seed=42, batch=2, out_dir=out, progress=False,
                                cancelled=cancelled)  # fmt: skip

    whole = evaluate(tmp_path / "whole", CountingScorer(scorer), None)
    assert whole["pairs"] == 4

    cancelled = threading.Event()  # the worker gives the job up during the second batch

    def give_up(counting: CountingScorer) -> None:
        if counting.images == 4:
            cancelled.set()

    with pytest.raises(Cancelled):
        evaluate(tmp_path / "crashed", CountingScorer(scorer, give_up), cancelled)
    lines = (tmp_path / "crashed" / PAIRS_FILE).read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(x)["scorer"] == scorer.name for x in lines)
    with (tmp_path / "crashed" / PAIRS_FILE).open("a") as torn:  # a crash mid-write
        torn.write('{"prompt_index": 1, "pro')

    resumed_scorer = CountingScorer(scorer)
    resumed = evaluate(tmp_path / "crashed", resumed_scorer, None)
    assert resumed_scorer.images == 4  # the two pairs not recorded, nothing else
    assert resumed == whole
    assert len((tmp_path / "crashed" / PAIRS_FILE).read_text().splitlines()) == 4
    assert len(list((tmp_path / "crashed" / "images").iterdir())) == 8

    # Pairs another classifier scored are made again, never mixed in.
    other = CountingScorer(scorer)
    other.name = "another-classifier"
    assert evaluate(tmp_path / "crashed", other, None) == whole and other.images == 8
    generator.keep_adapters(set())


async def test_the_eval_stage_keeps_its_adapter_while_generate_jobs_unload_others(
    pool,
    generator: Generator,
    scorer: HPSModel,
    tiny_sd_dir: Path,
    tiny_lora_dirs: list[Path],
    tiny_model,
    tiny_scorers: dict[str, dict[str, str]],
    tmp_path: Path,
) -> None:  # type: ignore[no-untyped-def]
    config, weights = tiny_model
    settings = make_settings(
        data_dir=str(tmp_path / "data"),
        generation={"sd_model": str(tiny_sd_dir), "steps": 2, "width": 64, "height": 64,
                    "safety_checker": False},
        models={"hps_arch": str(config), "hps_pretrained": str(weights), "device": "cpu"},
        adapt={"min_prompts": 1, "eval_seeds": 2, "sample_batch": 2, "offline_gate": "none",
               "offline_scorers": ["aesthetic"]},
        scorers=tiny_scorers["scorers"],
    )  # fmt: skip
    base = await models.ensure_base(pool, kind="sd_base", artifact=str(tiny_sd_dir))
    parent = await models.register(pool, kind="sd_adapter", artifact=str(tiny_lora_dirs[1]),
                                   parent_id=base.id)  # fmt: skip
    await models.promote(pool, parent.id, actor="test")
    # A run whose fine-tuning is done (the adapter: a tiny LoRA).
    run = await open_run(pool, settings, "evalrun")
    (run.path / PROMPTS_FILE).write_text(json.dumps({"train": ["a cone"], "heldout": HELD_OUT}))
    run.finish("prompts", train=1, heldout=2)
    run.finish("samples", images=0)
    data.write_items(run.path / data.FINETUNE_FILE, [data.Item("x.jpg", "a cone", "positive")])
    run.finish("label")
    run.finish("train", adapter=str(tiny_lora_dirs[0]))
    # The parent stops serving meanwhile: generate jobs keep no adapter loaded at all.
    await models.rollback(pool, "sd_adapter", actor="test")
    kept: list[set[str]] = []

    def generate_job_between_batches(counting: CountingScorer) -> None:
        generator.keep_adapters(set())
        kept.append(set(generator.adapters))

    cache: dict[str, Any] = {}

    async def judges(names: Any) -> Any:
        return await cached_scorers(names, settings, cache)

    resources = Resources(
        generator=_value(generator),
        scorer=_value(CountingScorer(scorer, generate_job_between_batches)),
        judges=judges,
    )
    outcome = await run_recipe(SD_ADAPTATION, pool, settings, name="evalrun",
                               resources=resources, until="eval", progress=False)  # fmt: skip
    report = outcome.stages["eval"]["report"]
    assert report["pairs"] == 4 and report["judges"]["aesthetic"]["pairs"] == 4
    assert list(cache) == ["scorer:aesthetic"]  # the worker keeps it for the next run
    assert kept == [{"run:evalrun", f"v{parent.id}"}] * 4  # neither was unloaded
    assert generator.adapters == {f"v{parent.id}": str(tiny_lora_dirs[1])}  # the run's own: gone
    assert (run.path / EVAL_DIR / PAIRS_FILE).is_file()
    generator.keep_adapters(set())


def _value(value: Any) -> Any:
    async def get() -> Any:
        return value

    return get


def test_judges_score_the_same_pairs_and_a_pair_without_a_judges_score_is_made_again(
    generator: Generator,
    scorer: HPSModel,
    tiny_lora_dirs: list[Path],
    tiny_scorers: dict[str, dict[str, str]],
    tmp_path: Path,
) -> None:
    from pipeline.scorers import load_scorers

    settings = make_settings(**tiny_scorers)
    pickscore, aesthetic = load_scorers(["pickscore", "aesthetic"], settings)
    generator.load_adapter("tuned", str(tiny_lora_dirs[0]))

    def evaluate(counting: CountingScorer, judges: list[Any]) -> Any:
        return evaluate_adapter(HELD_OUT, generator=generator, scorer=counting,  # type: ignore[arg-type]
                                adapter="tuned", parent=None, params=PARAMS, seeds_per_prompt=2,
                                seed=42, batch=4, out_dir=tmp_path, progress=False,
                                judges=judges)  # fmt: skip

    report = evaluate(CountingScorer(scorer), [pickscore])
    judged = report["judges"]["pickscore"]
    assert judged["pairs"] == report["pairs"] == 4 and judged["model"] == pickscore.label
    # Its win rate is that of the scores it recorded for each pair.
    lines = [json.loads(x) for x in (tmp_path / PAIRS_FILE).read_text().splitlines()]
    assert all(x["judges"] == {"pickscore": pickscore.label} for x in lines)
    opinions = [x["judged"]["pickscore"] for x in lines]
    assert judged["wins"] == sum((a > b) + 0.5 * (a == b) for a, b in opinions)
    assert judged["gain"] == pytest.approx(sum(a - b for a, b in opinions) / 4)

    # Resumed with another judge: its scores are missing from every pair, so all are made
    # again; with the same judge, none is.
    again = CountingScorer(scorer)
    assert evaluate(again, [pickscore]) == report and again.images == 0
    other = CountingScorer(scorer)
    both = evaluate(other, [pickscore, aesthetic])
    assert other.images == 8 and set(both["judges"]) == {"pickscore", "aesthetic"}
    generator.keep_adapters(set())


def _report(win: float, low: float, judges: dict[str, tuple[float, float]]) -> dict[str, Any]:
    return {
        "pairs": 40, "prompts": 20, "win_rate": win, "win_rate_ci": [low, 0.9],
        "hps_gain": 0.5, "hps_gain_ci": [0.1, 0.9],
        "judges": {name: {"pairs": 40, "win_rate": w, "win_rate_ci": [lo, 0.9]}
                   for name, (w, lo) in judges.items()},
    }  # fmt: skip


def test_the_gate_asks_a_judge_that_played_no_part_in_training() -> None:
    from hps.settings import AdaptSettings
    from pipeline.adapt.evaluate import offline_gate

    alone = AdaptSettings()
    passed, reason = offline_gate(_report(0.7, 0.6, {}), alone)
    assert passed and reason.endswith(
        " held-out prompts; no independent judge (adapt.offline_scorers names no scorer but "
        "hps): the HPS classifier that labelled its training data judged alone; win-rate lower "
        "bound > 50%"
    )
    judged = AdaptSettings(offline_scorers=["hps", "pickscore", "clip"])  # auto: pickscore
    passed, reason = offline_gate(_report(0.7, 0.6, {"pickscore": (0.66, 0.55)}), judged)
    assert passed and reason.endswith(
        "; pickscore, which played no part in training, agrees: win rate 66.0% (95% CI "
        "55.0%–90.0%), lower bound > 50%; win-rate lower bound > 50%"
    )
    # The classifier is fooled, the judge is not: reward hacking stays out of A/B testing.
    passed, reason = offline_gate(_report(0.8, 0.7, {"pickscore": (0.45, 0.35)}), judged)
    assert not passed and reason.startswith("offline evaluation failed: ")
    assert "pickscore, which played no part in training, does not agree" in reason
    clip = AdaptSettings(offline_scorers=["pickscore", "clip"], offline_gate_scorer="clip")
    passed, reason = offline_gate(_report(0.7, 0.6, {"pickscore": (0.7, 0.6)}), clip)
    assert not passed and reason.endswith(
        "; clip did not judge its pairs; win-rate lower bound > 50%"
    )
    off = AdaptSettings(offline_gate="none", offline_scorers=["clip"])
    assert offline_gate(_report(0.2, 0.1, {"clip": (0.1, 0.0)}), off)[0]


def test_the_gate_says_why_the_classifier_judged_alone_by_recipe_and_setting() -> None:
    from pipeline.adapt.evaluate import offline_gate

    tail = "; win-rate lower bound > 50%"
    # Set explicitly, although offline_scorers names another: worded by what was configured.
    chosen = AdaptSettings(offline_scorers=["pickscore"], offline_gate_scorer="hps")
    passed, reason = offline_gate(_report(0.7, 0.6, {"pickscore": (0.4, 0.3)}), chosen)
    assert passed and reason.endswith(
        " held-out prompts; no independent judge (adapt.offline_gate_scorer = hps): the HPS "
        "classifier that labelled its training data judged alone" + tail
    )
    # A Diffusion-DPO adapter trains on people's pairs: the classifier played no part.
    dpo = AdaptSettings(recipe="dpo")
    passed, reason = offline_gate(_report(0.7, 0.6, {}), dpo)
    assert passed and reason.endswith(
        " held-out prompts; the HPS classifier judged alone (adapt.offline_scorers names no "
        "scorer but hps); it played no part in training: a Diffusion-DPO adapter trains on "
        "people's pairs" + tail
    )
    dpo_chosen = AdaptSettings(recipe="dpo", offline_scorers=["clip"], offline_gate_scorer="hps")
    passed, reason = offline_gate(_report(0.7, 0.6, {}), dpo_chosen)
    assert reason.endswith(
        "; the HPS classifier judged alone (adapt.offline_gate_scorer = hps); it played no "
        "part in training: a Diffusion-DPO adapter trains on people's pairs" + tail
    )
    assert "labelled its training data" not in reason


async def test_a_listed_judge_whose_weights_cannot_load_fails_the_evaluation(
    tiny_scorers: dict[str, dict[str, str]], tmp_path: Path
) -> None:
    """A reward model adapt.offline_scorers lists is required: the evaluation fails, naming
    the setting and the scorer's own, instead of gating on fewer judges than configured."""
    from pipeline.adapt.dpo import DIFFUSION_DPO
    from pipeline.adapt.evaluate import JudgeUnavailable, load_judges

    missing = str(tmp_path / "nowhere" / "hpsv2.pt")
    settings = make_settings(
        models={"device": "cpu"},
        scorers={**tiny_scorers["scorers"], "hpsv2_checkpoint": missing},
        adapt={"offline_scorers": ["aesthetic", "hpsv2"]},
    )

    async def load(names: Any) -> Any:
        return await cached_scorers(names, settings, {})

    with pytest.raises(JudgeUnavailable) as raised:
        await load_judges(["aesthetic", "hpsv2"], load)
    assert str(raised.value) == (
        "adapt.offline_scorers (HPS_ADAPT__OFFLINE_SCORERS) lists hpsv2, so the offline "
        f"evaluation needs its weights, and they cannot be loaded: scorers.hpsv2_checkpoint: "
        f"no such file {missing!r} (give a local file, or a hub file as owner/repo/filename). "
        "Make them loadable, or remove hpsv2 from adapt.offline_scorers"
    )
    [aesthetic] = await load_judges(["aesthetic"], load)
    assert aesthetic.name == "aesthetic"

    # An outage while loading is not a setting to fix: it stays itself, and the job retries.
    async def store_down(names: Any) -> Any:
        raise StoreUnavailable("the object store s3://b/hps cannot be reached")

    with pytest.raises(StoreUnavailable):
        await load_judges(["aesthetic"], store_down)
    assert not any(issubclass(StoreUnavailable, e) for e in SD_ADAPTATION.user_errors)
    # A person's setting to fix: the adapt_sd job is dead-lettered, the CLI says why.
    assert JudgeUnavailable in SD_ADAPTATION.user_errors
    assert JudgeUnavailable in DIFFUSION_DPO.user_errors
