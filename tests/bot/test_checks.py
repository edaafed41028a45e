"""Prompt validation, channel and maintainer checks."""

from __future__ import annotations

import pytest

from bot.checks import PromptRejected, channel_allowed, clean_prompt
from hps.settings import DiscordSettings, LimitSettings

LIMITS = LimitSettings(prompt_max_length=30, banned_terms=["Gore", "  "])


def test_a_clean_prompt_is_stripped_and_kept_as_written() -> None:
    assert clean_prompt("  A Red Cube\t", LIMITS) == "A Red Cube"
    # Emoji sequences joined by a zero-width joiner are fine.
    assert clean_prompt("family 👩\u200d👩\u200d👧", LIMITS) == "family 👩\u200d👩\u200d👧"
    assert clean_prompt("", LIMITS, what="negative prompt") == ""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (" \n ", "Your prompt is empty: describe the image you want."),
        ("x" * 31, "Your prompt is 31 characters long; the limit is 30."),
        ("line\nbreak", "Your prompt contains control characters; please remove them."),
        ("evil\u202eecaf", "Your prompt contains control characters; please remove them."),
        ("zero\u200bwidth", "Your prompt contains control characters; please remove them."),
        ("so much gore", "Your prompt contains a term that is not allowed here."),
        ("so much GORE", "Your prompt contains a term that is not allowed here."),
        ("so much ｇｏｒｅ", "Your prompt contains a term that is not allowed here."),
        ("so much go\u200dre", "Your prompt contains a term that is not allowed here."),
    ],
)
def test_bad_prompts_are_refused_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(PromptRejected) as refused:
        clean_prompt(text, LIMITS)
    assert str(refused.value) == message


def test_blank_banned_terms_ban_nothing() -> None:
    assert clean_prompt("anything at all", LIMITS) == "anything at all"


def test_dream_channels() -> None:
    assert channel_allowed(5, DiscordSettings())
    assert channel_allowed(5, DiscordSettings(channel_ids=[5, 6]))
    assert not channel_allowed(7, DiscordSettings(channel_ids=[5, 6]))
    assert not channel_allowed(None, DiscordSettings(channel_ids=[5]))
