"""Every message text the bot sends, in one place (pure functions, easy to test and reword)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from discord.utils import escape_markdown, escape_mentions

from db.choices import ChoiceResult
from db.jobs import Job, Worker
from db.models import ModelVersion
from db.rounds import RoundRefused, RoundView
from db.scorers import Agreement
from db.stats import Totals, UserStats

DB_DOWN = "The database is unavailable right now, so nothing was changed. Please try again soon."
CLICK_NOT_RECORDED = (
    "Your choice was **not recorded**: the database is unavailable right now. "
    "Please click again in a moment."
)
CLICK_UNCERTAIN = (
    "The database is slow right now and your choice may not have been recorded. "
    "Please click again: clicking twice never counts twice."
)
FAILED_COMMAND = "Something went wrong on our side; it has been logged. Nothing was changed."
NOT_YOURS = "This button is not for you."
BUSY = "Too many clicks at once: yours was **not recorded**. Please click again in a moment."


def failed_after(committed: Sequence[str], *, database_down: bool = False) -> str:
    """A failure after part of a command committed: what was done, then what went wrong."""
    what = (
        "the database became unavailable"
        if database_down
        else "something went wrong on our side (it has been logged)"
    )
    return "\n".join(committed) + f"\nThat much is done; after it, {what}."


VERDICT_LABELS = {"tie": "Can't decide", "none": "None of these"}


def clip(text: str, limit: int = 1800) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def duration(delta: timedelta | float | None) -> str:
    """`1h 05m`, `3m 10s`, `12s`."""
    if delta is None:
        return "a while"
    seconds = int(delta.total_seconds() if isinstance(delta, timedelta) else delta)
    hours, rest = divmod(max(seconds, 0), 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"


def quote(text: str, limit: int) -> str:
    """User text shown as it was typed: no markdown, links or mentions of its own (a prompt
    must not ping people or format the bot's message), at most `limit` characters once
    escaped (escaping can double a text's length)."""
    escaped = escape_markdown(escape_mentions(text))
    if len(escaped) <= limit:
        return escaped
    # Cut before the escaped text's end, never between a backslash and what it escapes.
    return escaped[: limit - 1].rstrip("\\") + "…"


def _prompt_block(prompt: str, negative_prompt: str) -> str:
    text = f"**{quote(prompt, 1500)}**"
    if negative_prompt:
        text += f"\n-# without: {quote(negative_prompt, 300)}"
    return text


def _prompt_lines(view: RoundView) -> str:
    return _prompt_block(view.prompt, view.negative_prompt)


def round_refused(exc: RoundRefused) -> str:
    text = str(exc)
    if exc.retry_after is not None:
        text += f" You can start another in {duration(exc.retry_after)}."
    return text


ROUND_QUEUED = "Your round is queued: its images will be posted here when they are ready."
ROUND_QUEUED_AGAIN = "The round is queued again: its images will be posted when they are ready."


def queued(prompt: str, negative_prompt: str, position: int, *, again: bool = False) -> str:
    text = _prompt_block(prompt, negative_prompt)
    what = "Queued again" if again else "Queued"
    place = f"#{position} in line" if position > 0 else "starting now"
    return text + f"\n{what}: {place}. I'll post the images here when they are ready."


def retried(view: RoundView) -> str:
    """A failed round a maintainer queued again (`hps jobs retry`)."""
    return (
        f"{_prompt_lines(view)}\nA maintainer queued this round again: "
        "I'll post the images here when they are ready."
    )


def ready(view: RoundView, labels: int, *, others_may_vote: bool) -> str:
    who = f"<@{view.requester_discord_id}>, pick" if view.requester_discord_id else "Pick"
    others = " Anyone may vote." if others_may_vote else ""
    return (
        f"{_prompt_lines(view)}\n{who} the image you like best (1–{labels}), "
        f"or tell us you can't decide or like none of them.{others}"
    )


def nothing_to_show(view: RoundView) -> str:
    return f"{_prompt_lines(view)}\nNo image passed the safety check: nothing to show."


def closed(view: RoundView) -> str:
    return f"{_prompt_lines(view)}\n-# This round is closed: thank you for choosing!"


def failed(view: RoundView) -> str:
    reason = quote(view.round.error or "unknown error", 500)
    return (
        f"{_prompt_lines(view)}\nGenerating the images failed: {reason}\n"
        "The person who asked can retry."
    )


def choice_confirmation(result: ChoiceResult, label: str | None) -> str:
    verdict = result.choice.verdict
    what = f"image {label}" if verdict == "pick" else f"“{VERDICT_LABELS[verdict]}”"
    if result.outcome == "stale":
        return "A later click of yours already counts: this one changed nothing."
    if result.outcome == "unchanged":
        return f"You had already chosen {what}: nothing changed."
    if result.outcome == "changed":
        return f"Changed: your choice is now {what}. Thank you!"
    return f"Recorded: you chose {what}. Thank you!"


def full_size(user_id: int, label: str) -> str:
    return f"<@{user_id}> chose image {label}:"


def score_result(prompt: str, filenames: list[str], result: Mapping[str, Any]) -> str:
    scores = [float(s) for s in result["scores"]]
    best = max(range(len(scores)), key=scores.__getitem__)
    lines = [
        f"HPS for **{quote(prompt, 500)}** (model `{result.get('model', '?')}`, "
        f"scale {result.get('scale', 'hps')}; higher means people would prefer it):"
    ]
    for i, (name, score) in enumerate(zip(filenames, scores, strict=True)):
        mark = " ← best" if i == best and len(scores) > 1 else ""
        lines.append(f"{i + 1}. `{clip(name, 80)}`: **{score:.2f}**{mark}")
    lines.append("-# Scores compare images of the same prompt; across prompts they mean little.")
    return "\n".join(lines)


def score_failed(job: Job) -> str:
    """Why /score failed: a problem with the input is said as the worker put it; our own
    failures (a traceback after the retries, a vanished worker) are not shown to users."""
    error = (job.error or "").strip()
    if not error or error.startswith(("Traceback", "lease expired")):
        return "Scoring failed on our side; it has been logged. Please try again later."
    return f"Scoring failed: {quote(error, 500)}"


def score_queued(job_id: int) -> str:
    return f"Your images are queued for scoring (job {job_id})."


def score_timeout(job_id: int, cancelled: bool) -> str:
    tail = (
        "It was cancelled; please try again later."
        if cancelled
        else "It is still running; please try again later."
    )
    return f"No worker scored your images in time (job {job_id}). {tail}"


def user_stats(stats: UserStats, totals: Totals) -> str:
    return (
        f"**You**: {stats.rounds} round(s) asked, {stats.choices} choice(s) made "
        f"({stats.picks} picks, {stats.ties} can't decide, {stats.nones} none of these).\n"
        f"**Everyone**: {totals.users} people, {totals.rounds} rounds, {totals.images} images, "
        f"{totals.choices} choices ({totals.choices_24h} in the last 24 h)."
    )


FORGET_PROMPT = (
    "This deletes every round you asked for (with its images, the votes on it and the bot's "
    "messages showing it) and every choice you made. It cannot be undone. Copies made "
    "before now are not reached: exported datasets, backups, and the files of training "
    "runs (their prompts and examples). Are you sure?"
)


FORGET_BUSY = (
    "Nothing was deleted: your data is in use right now (an image is being made or stored). "
    "Please try /forget-me again in a minute."
)


def forgotten_rows(choices: int, rounds: int) -> str:
    return f"Deleted {rounds} round(s) and {choices} choice(s) of yours."


def forgetting(choices: int, rounds: int, files: int, messages: int) -> str:
    """The first answer to a confirmed /forget-me: the rows are deleted (committed); the
    files and the bot's messages are queued, and being deleted."""
    text = f"Deleted {rounds} round(s) and {choices} choice(s) of yours."
    queued = [
        *([f"{files} image file(s)"] if files else []),
        *([f"the bot's {messages} message(s) showing your rounds"] if messages else []),
    ]
    if not queued:
        return f"Done: deleted {rounds} round(s) and {choices} choice(s)."
    return text + f" Deleting {' and '.join(queued)} now..."


def forgotten(
    choices: int,
    rounds: int,
    files: int,
    files_left: int,
    messages: int,
    *,
    messages_left: int,
    messages_given_up: int,
) -> str:
    """What forgetting did once its files and messages were dealt with, and only that:
    `files` were deleted (`files_left` are still to be); `messages` of the bot's were queued
    for deletion, of which `messages_left` are still to be deleted (negative: unknown) and
    `messages_given_up` cannot be by the bot."""
    text = f"Done: deleted {rounds} round(s), {choices} choice(s), {files} image file(s)"
    if messages and not messages_left and not messages_given_up:
        text += f" and the bot's {messages} message(s) showing your rounds."
    else:
        text += "."
        if messages_left:
            text += (
                f" The bot's {messages} message(s) showing your rounds could not all be "
                "deleted yet; it keeps trying."
            )
        if messages_given_up:
            text += (
                f" {messages_given_up} of the bot's messages showing your rounds cannot be "
                "deleted by the bot (it has no access to their channel any more): please ask "
                "a moderator to delete them."
            )
    if files_left:
        text += (
            f" {files_left} image file(s) could not be deleted yet; they are deleted as soon "
            "as the image store answers."
        )
    return text


# -- maintainers ------------------------------------------------------------------------


def training_jobs(jobs_: list[tuple[Job, bool]]) -> str:
    """What /retrain did: each job queued, or the one of its kind already queued or running."""
    lines = []
    for job, created in jobs_:
        if created:
            lines.append(f"Queued `{job.kind}` as job {job.id}.")
        else:
            lines.append(f"A `{job.kind}` job is already {job.state}: job {job.id}.")
    return "\n".join(lines)


def retrain(jobs_: list[tuple[Job, bool]]) -> str:
    return training_jobs(jobs_) + "\nThe outcome will be posted in the log channel."


def training_outcome(job: Job) -> str:
    result = job.result if isinstance(job.result, dict) else {}
    if job.state != "done":
        # A traceback's last line is the error; the whole of it is in the jobs table.
        error = (job.error or "no error text").strip().splitlines()[-1]
        return f"`{job.kind}` job {job.id} **{job.state}**: {clip(error, 1500)}"
    lines = [f"`{job.kind}` job {job.id} **done**: {clip(str(result.get('summary', '')), 1200)}"]
    metrics = result.get("metrics")
    if isinstance(metrics, dict) and metrics:
        lines.append("metrics: " + _metrics_text(metrics))
    if "promoted" in result:
        promoted = result["promoted"]
        lines.append(f"promoted: {'yes' if promoted else 'no'}")
    return clip("\n".join(lines), 1900)


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple) and all(isinstance(v, float) for v in value):
        return "[" + ", ".join(f"{v:.3g}" for v in value) + "]"
    return str(value)


def _metrics_text(metrics: Mapping[str, Any]) -> str:
    """`key=value, …`, one level of nesting as `key: (inner=value, …)`; None left out."""
    parts = []
    for key, value in sorted(metrics.items()):
        if isinstance(value, Mapping):
            inner = ", ".join(
                f"{k}={_number(v)}" for k, v in value.items() if v is not None and k != "model"
            )
            parts.append(f"{key}: ({inner})")
        elif value is not None:
            parts.append(f"{key}={_number(value)}")
    return ", ".join(parts)


def liveness_warnings(
    generate_workers: int, schedulers: int, fresh: timedelta, queued_round_minutes: int
) -> list[str]:
    """What `/status` must say first when the processes the channel needs are not alive."""
    warnings = []
    if not generate_workers:
        wait = (
            f"and fail after {queued_round_minutes} minutes"
            if queued_round_minutes
            else "until one starts"
        )
        warnings.append(
            f"**No worker is alive** that generates images (no heartbeat within "
            f"{duration(fresh)}): /dream rounds wait {wait}."
        )
    if not schedulers:
        warnings.append(
            "**No scheduler is alive**: rounds are not closed or given up on time, and no "
            "training is scheduled."
        )
    return warnings


def _ago(when: datetime | None, now: datetime) -> str:
    return "never" if when is None else f"{duration(now - when)} ago"


def _rate(rate: float, interval: Any) -> str:
    low, high = interval
    return f"{rate:.1%} [{low:.1%}–{high:.1%}]"


def _interval(value: float | None, low: float | None, high: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1%} [{low:.1%}–{high:.1%}]" if low is not None else f"{value:.1%}"


def scorer_agreement(rows: Sequence[Agreement]) -> str:
    """The latest `hps eval --scorers`: each reward model's agreement with the choices."""
    if not rows:
        return (
            "No reward model has been compared with the choices yet: run "
            "`hps eval --scorers hps,hpsv2,pickscore,aesthetic,clip`."
        )
    first = rows[0]
    source = "the choices" if first.source == "choices" else f"`{first.source}`"
    lines = [
        f"**Agreement with people's choices** ({source}, {first.split} split, "
        f"{first.evaluated_at:%Y-%m-%d %H:%M} UTC; 95% intervals)"
    ]
    for r in rows:
        chance = f" (chance {r.chance:.1%})" if r.chance is not None else ""
        lines.append(
            f"- **{r.scorer}** (`{clip(r.model, 120)}`): top-1 "
            f"{_interval(r.top1, r.top1_low, r.top1_high)} of {r.choices}{chance}; pairwise "
            f"{_interval(r.pairwise, r.pairwise_low, r.pairwise_high)} of {r.pairs} pairs "
            "(chance 50%)"
        )
    return clip("\n".join(lines), 1950)


def adapter_figures(version: ModelVersion, live: Mapping[str, Any] | None) -> str:
    """An SD adapter's offline and live numbers side by side."""
    offline = version.metrics.get("offline") or {}
    if offline.get("pairs"):
        figures = (
            f"offline win {_rate(offline['win_rate'], offline['win_rate_ci'])}, "
            f"HPS {offline['hps_gain']:+.3f} ({offline['pairs']} pairs)"
        )
        for name, judged in (offline.get("judges") or {}).items():  # the other reward models
            if judged.get("pairs"):
                figures += f"; {name} win {_rate(judged['win_rate'], judged['win_rate_ci'])}"
    else:
        figures = "offline: not evaluated"
    if live is not None:
        against = f" vs `{live['opponent']}`" if live.get("opponent") else ""
        if live.get("rounds"):
            figures += (
                f"; live {live['wins']}/{live['rounds']} rounds won, "
                f"{_rate(live['win_rate'], live['win_rate_ci'])}{against}"
            )
        else:
            figures += f"; live: no decided rounds yet{against}"
    return figures


def model_event(event: Mapping[str, Any]) -> str:
    """One log-channel line per promotion, retirement or rollback."""
    action = str(event.get("action"))
    actor = f" by {event['actor']}" if event.get("actor") else ""
    verb = {"promoted": "promoted", "retired": "retired", "rolled_back": "rolled back"}.get(
        action, action
    )
    text = f"`{event.get('name')}` ({event.get('kind')}) **{verb}**{actor}"
    if event.get("reason"):
        text += f": {clip(str(event['reason']), 1200)}"
    replaced, restored = event.get("replaced"), event.get("restored")
    if action == "promoted" and replaced:
        text += f"\n`{replaced['name']}` retired, replaced by it."
    if action == "rolled_back":
        text += f"\n`{restored['name']}` serves again." if restored else "\nNone serves now."
    return clip(text, 1900)


def status(
    depth: Mapping[str, Mapping[str, int]],
    workers: list[Worker],
    serving: Mapping[str, ModelVersion | None],
    last_training: Sequence[Job],
    choices_24h: int,
    now: datetime,
    adapters: Sequence[tuple[ModelVersion, Mapping[str, Any] | None]] = (),
    warnings: Sequence[str] = (),
) -> str:
    lines = [f"⚠️ {warning}" for warning in warnings]
    lines.append("**Queue**")
    if depth:
        for kind, states in sorted(depth.items()):
            counts = ", ".join(f"{state} {n}" for state, n in sorted(states.items()))
            lines.append(f"- `{kind}`: {counts}")
    else:
        lines.append("- empty")
    lines.append("**Workers**")
    for worker in workers[:10]:
        state = "stopped" if worker.stopped_at else f"job {worker.current_job_id or '-'}"
        lines.append(
            f"- `{worker.id}` ({worker.device}, {state}): last heartbeat "
            f"{_ago(worker.last_seen_at, now)}"
        )
    if not workers:
        lines.append("- none seen in the last day")
    lines.append("**Serving**")
    for kind, version in serving.items():
        lines.append(f"- {kind}: {version.name if version else 'none'}")
    if adapters:
        lines.append("**SD adapters**")
        for version, live in adapters:
            lines.append(f"- `{version.name}` ({version.status}): {adapter_figures(version, live)}")
    lines.append("**Last training**")
    if not last_training:
        lines.append("- none yet")
    for job in last_training:  # the latest finished job of each kind
        lines.append("- " + training_outcome(job).replace("\n", "; "))
    lines.append(f"**Choices in the last 24 h**: {choices_24h}")
    return clip("\n".join(lines), 1950)


def models(
    versions: list[ModelVersion], live: Mapping[int, Mapping[str, Any]] | None = None
) -> str:
    """The versions (the newest 25); SD adapters with their offline and live numbers."""
    if not versions:
        return "No model versions are registered yet."
    lines = []
    for v in versions[-25:]:
        if v.kind == "sd_adapter":
            figures = adapter_figures(v, (live or {}).get(v.id))
        else:
            figures = ", ".join(f"{k}={_number(x)}" for k, x in sorted(v.metrics.items())[:4])
        lines.append(f"- `{v.name}` ({v.kind}, {v.status}){': ' + figures if figures else ''}")
    return clip("\n".join(lines), 1950)
