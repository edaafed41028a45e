"""Choices: what people picked. One current choice per (round, user); every accepted click
is also appended to `choice_events`.

A click is recorded in one transaction. Clicks of one user on one round serialise on the
choice row's lock, so under any number of concurrent clicks there is exactly one choice per
user, and it is the verdict of that user's last event (the event ids follow commit order).
Refused clicks (unknown or not-ready or closed round, banned user, bad position, voting
not allowed) raise `ChoiceRefused` and write nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from db import users
from db.connect import Executor, transaction

Verdict = Literal["pick", "tie", "none"]
Outcome = Literal["recorded", "changed", "unchanged"]


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


@dataclass(frozen=True)
class ChoiceResult:
    choice: Choice
    outcome: Outcome
    previous_verdict: str | None
    previous_position: int | None


ROUND_FOR_CHOICE_SQL = """
SELECT r.status, r.requester_id,
       EXISTS (SELECT FROM images i
               WHERE i.round_id = r.id AND i.position = $2 AND NOT i.nsfw) AS position_shown
FROM rounds r WHERE r.id = $1
"""

LOCK_CHOICE_SQL = """
SELECT * FROM choices WHERE round_id = $1 AND user_id = $2 FOR UPDATE
"""

INSERT_CHOICE_SQL = """
INSERT INTO choices (round_id, user_id, verdict, chosen_position, is_requester, flagged)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (round_id, user_id) DO NOTHING
RETURNING *
"""

UPDATE_CHOICE_SQL = """
UPDATE choices
SET verdict = $2, chosen_position = $3, flagged = $4, updated_at = now(),
    revision = revision + 1
WHERE id = $1
RETURNING *
"""

INSERT_EVENT_SQL = """
INSERT INTO choice_events (round_id, user_id, verdict, chosen_position, is_requester, flagged,
                           outcome, interaction_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
"""

_STATUS_REFUSALS = {
    "queued": ("not_ready", "This round's images are not ready yet."),
    "generating": ("not_ready", "This round's images are not ready yet."),
    "failed": ("failed", "This round failed, so there is nothing to choose."),
    "closed": ("closed", "This round is closed: choices are no longer recorded. Thank you!"),
}


async def record_choice(
    db: Executor,
    *,
    round_id: int,
    discord_user_id: int,
    verdict: Verdict,
    position: int | None = None,
    others_may_vote: bool = True,
    interaction_id: int | None = None,
) -> ChoiceResult:
    """Record one click: `verdict` "pick" with the chosen image's `position`, "tie"
    ("can't decide") or "none" ("none of these")."""
    if verdict not in ("pick", "tie", "none"):
        raise ChoiceRefused("bad_verdict", f"Unknown verdict {verdict!r}.")
    if (verdict == "pick") != (position is not None):
        raise ChoiceRefused("bad_position", "A pick needs exactly one image position.")
    async with transaction(db) as conn:
        round_ = await conn.fetchrow(ROUND_FOR_CHOICE_SQL, round_id, position or 0)
        if round_ is None:
            raise ChoiceRefused("unknown_round", "This round no longer exists.")
        if round_["status"] != "ready":
            raise ChoiceRefused(*_STATUS_REFUSALS[round_["status"]])
        if verdict == "pick" and not round_["position_shown"]:
            raise ChoiceRefused("bad_position", f"Image {position} is not part of this round.")
        user = await users.ensure_user(conn, discord_user_id)
        if user.banned:
            raise ChoiceRefused("banned", "You are not allowed to vote here.")
        is_requester = user.id == round_["requester_id"]
        if not is_requester and not others_may_vote:
            raise ChoiceRefused("requester_only", "Only the person who asked can choose here.")
        flagged = user.shadow_banned

        previous = await conn.fetchrow(LOCK_CHOICE_SQL, round_id, user.id)
        if previous is None:
            record = await conn.fetchrow(
                INSERT_CHOICE_SQL, round_id, user.id, verdict, position, is_requester, flagged
            )
            if record is None:  # a concurrent first click won the insert: now it exists
                previous = await conn.fetchrow(LOCK_CHOICE_SQL, round_id, user.id)
        if previous is not None:
            record = await conn.fetchrow(
                UPDATE_CHOICE_SQL, previous["id"], verdict, position, flagged
            )
            same = (previous["verdict"], previous["chosen_position"]) == (verdict, position)
            outcome: Outcome = "unchanged" if same else "changed"
        else:
            outcome = "recorded"
        await conn.execute(
            INSERT_EVENT_SQL,
            round_id,
            user.id,
            verdict,
            position,
            is_requester,
            flagged,
            outcome,
            interaction_id,
        )
        return ChoiceResult(
            Choice(**dict(record)),
            outcome,
            previous["verdict"] if previous else None,
            previous["chosen_position"] if previous else None,
        )


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
