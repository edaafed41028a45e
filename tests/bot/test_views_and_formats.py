"""Button layout and message texts."""

from __future__ import annotations

from datetime import timedelta

import discord

from bot import formats
from bot.cogs.dream import dimensions, round_view
from hps.settings import GenerationSettings


def _layout(view: discord.ui.View) -> list[tuple[str, str, int, int, bool]]:
    return [
        (i.custom_id, i.item.label, i.item.style.value, i._rendered_row or 0, i.item.disabled)
        for i in view.children
    ]


def test_a_round_view_has_numbered_picks_then_tie_and_none() -> None:
    view = round_view(9, [1, 2, 4, 5, 6, 7, 8])
    view.to_components()  # lays out the rows
    rows = [(cid, label, row) for cid, label, _, row, _ in _layout(view)]
    assert rows == [
        ("hps:pick:9:1", "1", 0),
        ("hps:pick:9:2", "2", 0),
        ("hps:pick:9:4", "3", 0),
        ("hps:pick:9:5", "4", 0),
        ("hps:pick:9:6", "5", 0),
        ("hps:pick:9:7", "6", 1),
        ("hps:pick:9:8", "7", 1),
        ("hps:tie:9", "Can't decide", 2),
        ("hps:none:9", "None of these", 2),
    ]
    assert view.is_persistent() and view.timeout is None


def test_the_chosen_verdict_is_highlighted_and_closed_rounds_are_disabled() -> None:
    styles = [s for *_, s, _, _ in _layout(round_view(1, [1, 2], chosen=("pick", 2)))]
    assert styles == [2, 3, 2, 2]  # grey, green, grey, grey
    styles = [s for *_, s, _, _ in _layout(round_view(1, [1, 2], chosen=("tie", None)))]
    assert styles == [2, 2, 3, 2]
    assert all(d for *_, d in _layout(round_view(1, [1, 2], closed=True)))
    assert not any(d for *_, d in _layout(round_view(1, [1, 2])))


def test_dimensions_follow_the_aspect() -> None:
    generation = GenerationSettings(width=512, height=512)
    assert dimensions("square", generation) == (512, 512)
    assert dimensions("portrait", generation) == (512, 768)
    assert dimensions("landscape", GenerationSettings(width=520, height=520)) == (776, 520)


def test_durations_read_naturally() -> None:
    assert formats.duration(timedelta(seconds=5)) == "5s"
    assert formats.duration(timedelta(minutes=59, seconds=3)) == "59m 03s"
    assert formats.duration(3725.0) == "1h 02m"
    assert formats.duration(None) == "a while"


def test_score_results_mark_the_best_image_only_when_there_are_several() -> None:
    result = {"scores": [20.5, 22.25], "scale": "hps", "model": "classifier-3"}
    text = formats.score_result("a cat", ["a.png", "b.png"], result)
    assert text.split("\n")[1:3] == ["1. `a.png`: **20.50**", "2. `b.png`: **22.25** ← best"]
    single = formats.score_result("a cat", ["a.png"], {**result, "scores": [20.5]})
    assert single.split("\n")[1] == "1. `a.png`: **20.50**"


def test_prompts_cannot_ping_or_format_the_bots_messages() -> None:
    text = formats.queued("a cat <@123456789012345678> @everyone **bold** [x](http://e.vil)", "", 1)
    assert "<@123456789012345678>" not in text and "@everyone" not in text
    assert "\\*\\*bold\\*\\*" in text and "\\[x](" in text  # no bold, no masked link


def test_training_outcomes_show_nested_metrics_and_a_tracebacks_last_line() -> None:
    from datetime import UTC, datetime

    from db.jobs import Job

    def job(state: str, result: dict | None, error: str | None) -> Job:
        now = datetime.now(UTC)
        return Job(7, "train_classifier", {}, state, 0, None, 1, 2, now, "w", None, None,
                   now, now, now, result, error, None)  # fmt: skip

    done = job(
        "done",
        {"summary": "ok", "promoted": False,
         "metrics": {"new": {"model": "c-7", "n": 200, "top1": 0.4412, "top1_ci": [0.37, 0.51]},
                     "untuned": {"n": 200, "top1": 0.33}}},
        None,
    )  # fmt: skip
    assert formats.training_outcome(done) == (
        "`train_classifier` job 7 **done**: ok\n"
        "metrics: new: (n=200, top1=0.4412, top1_ci=[0.37, 0.51]), untuned: (n=200, top1=0.33)\n"
        "promoted: no"
    )
    dead = job("dead", None, "Traceback (most recent call last):\n  File x\nOSError: disk full")
    assert formats.training_outcome(dead) == "`train_classifier` job 7 **dead**: OSError: disk full"
    assert formats.score_failed(dead) == (
        "Scoring failed on our side; it has been logged. Please try again later."
    )
    bad = job("dead", None, "cannot score image 2: the image bytes is not an image")
    assert formats.score_failed(bad) == (
        "Scoring failed: cannot score image 2: the image bytes is not an image"
    )


def test_quoted_user_text_stays_within_its_limit_once_escaped() -> None:
    """Escaping can double a text: a prompt full of markdown must still fit its place in a
    2,000-character message, and never end in half an escape."""
    text = "*_" * 400  # 800 characters, 1,600 escaped
    quoted = formats.quote(text, 500)
    assert len(quoted) <= 500 and quoted.endswith("…")
    assert not quoted[:-1].endswith("\\")  # the last escape is whole
    assert quoted.startswith("\\*\\_")
    assert formats.quote("@everyone look", 100) == "@\u200beveryone look"
    assert formats.quote("short", 100) == "short"


def test_a_stale_click_says_a_later_one_counts() -> None:
    from datetime import UTC, datetime

    from db.choices import Choice, ChoiceResult

    now = datetime.now(UTC)
    held = Choice(1, 1, 1, "pick", 2, True, False, 2, now, now, interaction_id=9)
    text = formats.choice_confirmation(ChoiceResult(held, "stale", "pick", 2), "1")
    assert text == "A later click of yours already counts: this one changed nothing."
