"""Choices: what people picked. One current choice per (round, user); every accepted click
is also appended to `choice_events`.

A click is recorded in one transaction. Clicks of one user on one round serialise on the
user's row lock, so under any number of concurrent clicks there is exactly one choice per
user, and it is the verdict of that user's latest click: the choice keeps the Discord
interaction id (time-ordered) of the click it holds, and a click made earlier that commits
later is kept as a `stale` event and changes nothing. Clicking the same verdict again is
`unchanged` (the choice's `updated_at` stays). Refused clicks (unknown, not ready, closed or
expired round, banned user, bad position, voting not allowed) raise `ChoiceRefused` and
write nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

import asyncpg

from db.connect import Executor, transaction

Verdict = Literal["pick", "tie", "none"]
Outcome = Literal["recorded", "changed", "unchanged", "stale"]


class ChoiceRefused(Exception):
    """A click that is not recorded. `code` is for programs, the message for people."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Choice:
    id: int
    round_id: int
    user_id: int
    verdict: str
    chosen_position: int | None
    is_requester: bool
    flagged: bool
    revision: int
    created_at: datetime
    updated_at: datetime
    interaction_id: int | None = None  # the click it holds (not returned by record_choice)


@dataclass(frozen=True)
class ChoiceResult:
    choice: Choice
    outcome: Outcome
    previous_verdict: str | None
    previous_position: int | None


# One round trip: the `record_choice` SQL function (migrations 0002, 0006) does, in this
# order, in the statement's transaction: read the round (refuse unknown, not ready, past
# `open_for` since it was ready, position not shown); upsert the user (its row stays locked
# until commit: one user's clicks serialise there) and refuse banned users and
# non-requesters where others may not vote; lock the user's choice row, insert it or update
# it unless the click is older than the one it holds (a concurrent first click that won the
# insert is locked and updated instead); append the event. A refusal raises SQLSTATE HP001,
# so nothing is written.
RECORD_CHOICE_SQL = """
SELECT * FROM record_choice($1, $2, $3, $4, $5, $6, $7)
"""

REFUSED_SQLSTATE = "HP001"
MAX_POSITION = 16  # images.position's check: a larger one cannot exist (nor fit a smallint)

_STATUS_REFUSALS = {
    "queued": ("not_ready", "This round's images are not ready yet."),
    "generating": ("not_ready", "This round's images are not ready yet."),
    "failed": ("failed", "This round failed, so there is nothing to choose."),
    "closed": ("closed", "This round is closed: choices are no longer recorded. Thank you!"),
}


def _refusal(exc: asyncpg.PostgresError, position: int | None) -> ChoiceRefused:
    """The refusal the function raised (its code as message, a round's status as detail)."""
    code = exc.message
    if code == "status":
        return ChoiceRefused(*_STATUS_REFUSALS[exc.detail])
    message = {
        "unknown_round": "This round no longer exists.",
        "bad_position": f"Image {position} is not part of this round.",
        "banned": "You are not allowed to vote here.",
        "requester_only": "Only the person who asked can choose here.",
    }[code]
    return ChoiceRefused(code, message)


async def record_choice(
    db: Executor,
    *,
    round_id: int,
    discord_user_id: int,
    verdict: Verdict,
    position: int | None = None,
    others_may_vote: bool = True,
    interaction_id: int | None = None,
    open_for: timedelta | None = None,
) -> ChoiceResult:
    """Record one click: `verdict` "pick" with the chosen image's `position`, "tie"
    ("can't decide") or "none" ("none of these"). `interaction_id` orders one user's clicks
    (Discord's snowflakes grow with time); `open_for` is how long a ready round takes clicks
    (None: until it is closed)."""
    if verdict not in ("pick", "tie", "none"):
        raise ChoiceRefused("bad_verdict", f"Unknown verdict {verdict!r}.")
    if (verdict == "pick") != (position is not None):
        raise ChoiceRefused("bad_position", "A pick needs exactly one image position.")
    if position is not None and not 1 <= position <= MAX_POSITION:
        raise ChoiceRefused("bad_position", f"Image {position} is not part of this round.")
    args = (
        round_id,
        discord_user_id,
        verdict,
        position,
        others_may_vote,
        interaction_id,
        open_for,
    )
    try:
        if isinstance(db, asyncpg.Pool):
            # A single statement is its own transaction: no BEGIN/COMMIT round trips.
            record = await db.fetchrow(RECORD_CHOICE_SQL, *args)
        else:
            # On a connection, a savepoint keeps a refusal from aborting the caller's
            # transaction.
            async with transaction(db) as conn:
                record = await conn.fetchrow(RECORD_CHOICE_SQL, *args)
    except asyncpg.PostgresError as exc:
        if exc.sqlstate == REFUSED_SQLSTATE:
            raise _refusal(exc, position) from None
        raise
    assert record is not None
    fields = dict(record)
    outcome = fields.pop("outcome")
    previous = fields.pop("previous_verdict"), fields.pop("previous_position")
    return ChoiceResult(Choice(**fields), outcome, *previous)


CHOICES_OF_ROUND_SQL = """
SELECT * FROM choices WHERE round_id = $1 ORDER BY id
"""


async def choices_of_round(db: Executor, round_id: int) -> list[Choice]:
    return [Choice(**dict(r)) for r in await db.fetch(CHOICES_OF_ROUND_SQL, round_id)]


REQUESTER_CHOICE_SQL = """
SELECT c.* FROM choices c JOIN rounds r ON r.id = c.round_id
WHERE c.round_id = $1 AND c.user_id = r.requester_id
"""


async def requester_choice(db: Executor, round_id: int) -> Choice | None:
    record = await db.fetchrow(REQUESTER_CHOICE_SQL, round_id)
    return Choice(**dict(record)) if record else None
