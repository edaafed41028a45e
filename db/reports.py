"""What `hps report` draws, read from the analysts' views and the columns `hps_analyst` may
read (so an analyst's own login can make the report: no internal user id is needed).

Every series over time is aggregated in the database by period (`day`, `week` or `month`,
UTC; weeks start on Monday) over a range [`since`, `until`), with every period of the range
present, an empty one as zero counts (and no rate). Flagged choices (shadow-banned users')
are never counted, except in the `flagged` column that says how many were left out. Every
query returns at most a row per period, position, bin or version: the report's memory does
not grow with the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from db import stats
from db.connect import Executor
from db.scorers import LATEST_AGREEMENT_SQL

Rows = list[dict[str, Any]]
PERIODS = ("day", "week", "month")

# The first and last activity (a round requested, a choice made) within [$1, $2).
RANGE_SQL = """
SELECT least((SELECT min(created_at) FROM rounds WHERE created_at >= $1 AND created_at < $2),
             (SELECT min(created_at) FROM choices WHERE created_at >= $1 AND created_at < $2))
           AS first,
       greatest((SELECT max(created_at) FROM rounds WHERE created_at >= $1 AND created_at < $2),
                (SELECT max(created_at) FROM choices WHERE created_at >= $1 AND created_at < $2))
           AS last
"""


@dataclass(frozen=True)
class Span:
    since: datetime  # inclusive
    until: datetime  # exclusive
    period: str  # day | week | month


async def data_range(
    db: Executor, since: datetime, until: datetime
) -> tuple[datetime, datetime] | None:
    """When the first and last round or choice within [since, until) happened; None if none."""
    record = await db.fetchrow(RANGE_SQL, since, until)
    return None if record["first"] is None else (record["first"], record["last"])


# Every period of the span ($1 period, $2 since, $3 until), for the series to join onto.
_PERIODS = """
periods AS (
    SELECT generate_series(date_trunc($1, $2::timestamptz AT TIME ZONE 'UTC'),
                           date_trunc($1, ($3::timestamptz - interval '1 microsecond')
                                          AT TIME ZONE 'UTC'),
                           ('1 ' || $1)::interval)::date AS period
)"""

CHOICES_OVER_TIME_SQL = f"""
WITH {_PERIODS},
counted AS (
    SELECT date_trunc($1, c.created_at AT TIME ZONE 'UTC')::date AS period,
           count(*) FILTER (WHERE NOT c.flagged) AS choices,
           count(*) FILTER (WHERE NOT c.flagged AND c.is_requester) AS requester_choices,
           count(*) FILTER (WHERE NOT c.flagged AND NOT c.is_requester) AS other_choices,
           count(*) FILTER (WHERE NOT c.flagged AND c.verdict = 'pick') AS picks,
           count(*) FILTER (WHERE NOT c.flagged AND c.verdict = 'tie') AS ties,
           count(*) FILTER (WHERE NOT c.flagged AND c.verdict = 'none') AS nones,
           count(*) FILTER (WHERE c.flagged) AS flagged
    FROM choices c
    WHERE c.created_at >= $2 AND c.created_at < $3
    GROUP BY 1
)
SELECT p.period,
       coalesce(c.choices, 0) AS choices,
       coalesce(c.requester_choices, 0) AS requester_choices,
       coalesce(c.other_choices, 0) AS other_choices,
       coalesce(c.picks, 0) AS picks,
       coalesce(c.ties, 0) AS ties,
       coalesce(c.nones, 0) AS nones,
       coalesce(c.flagged, 0) AS flagged
FROM periods p LEFT JOIN counted c USING (period)
ORDER BY p.period
"""

# Rounds requested per period; of those that finished (ready, closed or failed), how many
# failed; and how long the ready ones took from request to images.
ROUNDS_OVER_TIME_SQL = f"""
WITH {_PERIODS},
counted AS (
    SELECT date_trunc($1, r.created_at AT TIME ZONE 'UTC')::date AS period,
           count(*) AS rounds,
           count(*) FILTER (WHERE r.status IN ('ready', 'closed', 'failed')) AS finished,
           count(*) FILTER (WHERE r.status = 'failed') AS failed,
           percentile_cont(0.5) WITHIN GROUP (
               ORDER BY extract(epoch FROM r.ready_at - r.created_at)) AS median_seconds,
           percentile_cont(0.9) WITHIN GROUP (
               ORDER BY extract(epoch FROM r.ready_at - r.created_at)) AS p90_seconds
    FROM rounds r
    WHERE r.created_at >= $2 AND r.created_at < $3
    GROUP BY 1
)
SELECT p.period,
       coalesce(c.rounds, 0) AS rounds,
       coalesce(c.finished, 0) AS finished,
       coalesce(c.failed, 0) AS failed,
       c.median_seconds,
       c.p90_seconds
FROM periods p LEFT JOIN counted c USING (period)
ORDER BY p.period
"""

ROUNDS_BY_STATUS_SQL = """
SELECT status, count(*) AS rounds FROM rounds
WHERE created_at >= $1 AND created_at < $2
GROUP BY status
ORDER BY array_position(ARRAY['queued', 'generating', 'ready', 'closed', 'failed'], status)
"""

CLASSIFIER_ACCURACY_SQL = """
SELECT name, status, top1, top1_low, top1_high, untuned_top1, chance, test_examples
FROM classifier_versions
WHERE top1 IS NOT NULL
ORDER BY id
"""

# What the shown images and the picks of the span say, in one statement that reads each table
# about once: the unflagged picks made in the span (`picks`); each round's facts from its
# shown images made in the span and its requester's pick (`facts`: how many images it
# showed, whether one classifier scored them all, the top score, the requester's pick and
# its score, the lowest and highest version shown, and sums that give each version's mean
# score in a round showing two). A round's images are made seconds after it is requested and
# its picks within `limits.round_ttl_minutes`: the span is read on those tables' own times,
# which spares joining the rounds. Each result is a JSON list of rows. $1 period, $2 since,
# $3 until, $4 the classifier whose scores the A/B comparison uses (NULL: the configured
# model), $5 its histograms' bins.
#
# - position_bias: requesters' picks by images shown (K) and position picked, in rounds that
#   held no image back (positions run 1..K as shown);
# - top_hps_picked: per classifier, requesters' picks in rounds whose shown images it scored
#   all, and how many picked the image it scored highest (a pick among m images sharing the
#   highest score counts 1/m, the expected hit of a random tie-break, as
#   `pipeline.evaluate.top1_credit`); chance is the mean of 1/K;
# - agreement, per period of a round's first pick: pairs of pickers of one round who picked
#   the same image, of all pairs (and chance: 1/K a pair); the other voters who picked the
#   requester's image, of the other voters who picked where the requester picked;
# - ab_score_summary and ab_score_histograms: like for like, rounds that showed exactly two
#   versions, as many images each (as `ab_rounds.balanced`), all scored by classifier $4: per
#   pair the rounds, each version's mean and the mean and spread of the per-round difference
#   (the second version's mean minus the first's, versions ordered by id as in
#   `ab_rounds.shown_version_ids`), and histograms of each version's mean score per round
#   (a round counts once for each version), per pair, over one set of bins.
_COUNTS = ", ".join(f"count(*) FILTER (WHERE p.chosen_position = {k})" for k in range(1, 17))
_SQUARES = " + ".join(f"count(*) FILTER (WHERE p.chosen_position = {k}) ^ 2" for k in range(1, 17))
ROUND_FACTS_SQL = f"""
WITH {_PERIODS},
picks AS MATERIALIZED (
    SELECT c.round_id, c.chosen_position, c.is_requester, c.created_at
    FROM choices c
    WHERE c.verdict = 'pick' AND NOT c.flagged AND c.created_at >= $2 AND c.created_at < $3
),
facts AS MATERIALIZED (
    SELECT i.round_id,
           count(*)::int AS k,
           count(i.hps_score) = count(*)
               AND (count(i.hps_version_id) = 0
                    OR (count(i.hps_version_id) = count(*)
                        AND min(i.hps_version_id) = max(i.hps_version_id))) AS one_scorer,
           min(i.hps_version_id) AS scorer,
           max(i.hps_score) AS top,
           max(i.hps_score) FILTER (WHERE i.position = rp.chosen_position) AS chosen_score,
           min(rp.chosen_position) AS requester_position,
           min(i.model_version_id) AS first_id,
           max(i.model_version_id) AS second_id,
           count(i.model_version_id) AS versioned,
           sum(i.model_version_id::float8) AS version_sum,
           sum((i.model_version_id * i.model_version_id)::float8) AS version_square_sum,
           sum(i.hps_score::float8) AS score_sum,
           sum(i.model_version_id * i.hps_score::float8) AS version_score_sum
    FROM images i
    LEFT JOIN choices rp
        ON rp.round_id = i.round_id AND rp.is_requester AND rp.verdict = 'pick' AND NOT rp.flagged
    WHERE NOT i.nsfw AND i.created_at >= $2 AND i.created_at < $3
    GROUP BY i.round_id
),
position_bias AS (
    SELECT k AS shown, requester_position AS position, count(*) AS picks
    FROM facts
    WHERE requester_position IS NOT NULL
      AND round_id NOT IN (SELECT round_id FROM images WHERE nsfw)
    GROUP BY 1, 2
),
top_hps_picked AS (
    SELECT coalesce(v.name, 'the configured model') AS classifier, v.status,
           count(*) AS picks,
           coalesce(sum(1.0 / (SELECT count(*) FROM images j
                               WHERE j.round_id = f.round_id AND NOT j.nsfw
                                 AND j.hps_score = f.top))
                    FILTER (WHERE f.chosen_score = f.top), 0)::float8 AS top_picked,
           avg(1.0 / f.k)::float8 AS chance,
           v.id
    FROM facts f
    LEFT JOIN model_versions v ON v.id = f.scorer
    WHERE f.requester_position IS NOT NULL AND f.one_scorer
    GROUP BY v.id, v.name, v.status
),
-- Per round with two or more pickers: pairs of pickers who picked the same image are
-- (sum of n_p^2 - n) / 2, n_p the pickers of position p (1..16: `images.position`).
per_round AS (
    SELECT p.round_id,
           date_trunc($1, min(p.created_at) AT TIME ZONE 'UTC')::date AS period,
           count(*) AS pickers,
           (({_SQUARES} - count(*)) / 2)::bigint AS agreeing_pairs,
           count(*) FILTER (WHERE NOT p.is_requester) AS others,
           (ARRAY[{_COUNTS}])[max(p.chosen_position) FILTER (WHERE p.is_requester)] - 1
               AS others_with_requester,
           bool_or(p.is_requester) AS requester_picked
    FROM picks p
    GROUP BY p.round_id
    HAVING count(*) >= 2
),
agreed AS (
    SELECT pr.period,
           count(*) AS rounds,
           sum(pr.pickers * (pr.pickers - 1) / 2) AS pairs,
           sum(pr.agreeing_pairs) AS agreeing_pairs,
           sum(pr.pickers * (pr.pickers - 1) / 2 / f.k::float8) AS chance_pairs,
           coalesce(sum(pr.others) FILTER (WHERE pr.requester_picked), 0) AS other_votes,
           coalesce(sum(pr.others_with_requester), 0) AS with_requester,
           sum(pr.others / f.k::float8) FILTER (WHERE pr.requester_picked) AS chance_votes
    FROM per_round pr
    JOIN facts f ON f.round_id = pr.round_id
    GROUP BY 1
),
agreement AS (
    SELECT p.period,
           coalesce(a.rounds, 0) AS rounds,
           coalesce(a.pairs, 0) AS pairs,
           coalesce(a.agreeing_pairs, 0) AS agreeing_pairs,
           coalesce(a.chance_pairs, 0) AS chance_pairs,
           coalesce(a.other_votes, 0) AS other_votes,
           coalesce(a.with_requester, 0) AS with_requester,
           coalesce(a.chance_votes, 0) AS chance_votes
    FROM periods p LEFT JOIN agreed a USING (period)
),
-- Rounds that showed exactly two versions a < b, as many images each, all scored by $4, and
-- each version's mean score there, from the sums `facts` kept (no second pass over images):
-- every version v shown lies in [a, b], so sum((v - a)(b - v)) = 0 exactly when each is a
-- or b; then a's images number (b n - sum v) / (b - a) and their scores add up to
-- (b sum s - sum v s) / (b - a). (The sums of ids are of integers far below 2^53: exact in
-- float8.)
two_versions AS (
    SELECT f.round_id, f.first_id, f.second_id, f.k, f.score_sum, f.version_score_sum,
           (f.second_id * f.k - f.version_sum) / (f.second_id - f.first_id) AS first_count
    FROM facts f
    WHERE f.first_id < f.second_id AND f.versioned = f.k AND f.one_scorer
      AND f.scorer IS NOT DISTINCT FROM $4::bigint
      AND (f.first_id + f.second_id) * f.version_sum - f.version_square_sum
          - f.first_id * f.second_id * f.k = 0
),
ab_pairs AS MATERIALIZED (
    SELECT round_id, first_id, second_id,
           (second_id * score_sum - version_score_sum) / (second_id - first_id)
               / first_count::float8 AS first_mean,
           (score_sum - (second_id * score_sum - version_score_sum) / (second_id - first_id))
               / (k - first_count)::float8 AS second_mean
    FROM two_versions
    WHERE 2 * first_count = k
),
ab_summary AS (
    SELECT fv.name AS first, sv.name AS second,
           count(*) AS rounds,
           avg(first_mean)::float8 AS first_mean_hps,
           avg(second_mean)::float8 AS second_mean_hps,
           avg(second_mean - first_mean)::float8 AS mean_difference,
           coalesce(stddev_samp(second_mean - first_mean), 0)::float8 AS sd_difference
    FROM ab_pairs a
    JOIN model_versions fv ON fv.id = a.first_id
    JOIN model_versions sv ON sv.id = a.second_id
    GROUP BY fv.name, sv.name
),
ab_means AS (
    SELECT first_id, second_id, first_id AS version_id, first_mean AS mean FROM ab_pairs
    UNION ALL
    SELECT first_id, second_id, second_id, second_mean FROM ab_pairs
),
bounds AS MATERIALIZED (
    SELECT min(mean) AS lo, greatest(max(mean), min(mean) + 1e-3) AS hi FROM ab_means
),
ab_binned AS (
    SELECT m.first_id, m.second_id, m.version_id,
           least(width_bucket(m.mean, b.lo, b.hi, $5), $5) AS bin,
           count(*) AS rounds, b.lo, b.hi
    FROM ab_means m CROSS JOIN bounds b
    GROUP BY 1, 2, 3, 4, b.lo, b.hi
),
ab_histograms AS (
    SELECT fv.name AS first, sv.name AS second, v.name AS version, h.bin, h.rounds, h.lo, h.hi
    FROM ab_binned h
    JOIN model_versions fv ON fv.id = h.first_id
    JOIN model_versions sv ON sv.id = h.second_id
    JOIN model_versions v ON v.id = h.version_id
)
SELECT
    (SELECT coalesce(json_agg(x ORDER BY x.shown, x.position), '[]')
     FROM position_bias x) AS position_bias,
    (SELECT coalesce(json_agg(x ORDER BY x.id NULLS FIRST), '[]')
     FROM top_hps_picked x) AS top_hps_picked,
    (SELECT coalesce(json_agg(x ORDER BY x.period), '[]') FROM agreement x) AS agreement,
    (SELECT coalesce(json_agg(x ORDER BY x.rounds DESC, x.first, x.second), '[]')
     FROM ab_summary x) AS ab_score_summary,
    (SELECT coalesce(json_agg(x ORDER BY x.first, x.second, x.version, x.bin), '[]')
     FROM ab_histograms x) AS ab_score_histograms
"""

# People by how much they did (choices made, rounds asked for), in buckets of powers of two
# (0, 1, 2-3, 4-7, ...): users neither banned, shadow-banned nor forgotten.
USER_ACTIVITY_SQL = """
WITH counted AS (
    SELECT choices, rounds_requested FROM user_activity
    WHERE NOT banned AND NOT shadow_banned AND NOT forgotten
), buckets AS (
    SELECT 'choices' AS measure,
           CASE WHEN choices = 0 THEN 0 ELSE floor(log(2, choices))::int + 1 END AS bucket,
           choices AS amount
    FROM counted
    UNION ALL
    SELECT 'rounds', CASE WHEN rounds_requested = 0 THEN 0
                          ELSE floor(log(2, rounds_requested))::int + 1 END,
           rounds_requested
    FROM counted
)
SELECT measure, bucket, count(*) AS users, sum(amount)::bigint AS amount
FROM buckets
GROUP BY 1, 2
ORDER BY 1, 2
"""

# Scores of different classifiers are on different scales: the distributions compare one
# classifier's, the serving one's if it scored served images, else the latest that did.
SCORE_CLASSIFIER_SQL = """
SELECT v.id, v.name, v.status
FROM (SELECT * FROM model_versions WHERE kind = 'classifier'
      ORDER BY status = 'serving' DESC, id DESC) v
WHERE EXISTS (SELECT FROM images i
              WHERE i.hps_version_id = v.id AND i.hps_score IS NOT NULL AND NOT i.nsfw)
LIMIT 1
"""

# The SD adapters with a live test: in testing now, or reviewed before (their metrics keep
# the live record, with the design and the looks taken).
LIVE_TESTS_SQL = """
SELECT v.id, v.name, v.status, v.metrics -> 'live' AS live
FROM model_versions v
WHERE v.kind = 'sd_adapter' AND (v.status = 'testing' OR v.metrics ? 'live')
ORDER BY v.status = 'testing' DESC, v.id DESC
"""

VERSION_NAMES_SQL = """
SELECT id, name FROM model_versions WHERE id = ANY($1::bigint[])
"""


# The report's statements aggregate a year of rows: in its own sessions, hash tables big
# enough not to spill to disk, and no JIT (its compilation costs more than it saves here).
TUNE_SQL = """
SELECT set_config('work_mem', '64MB', false), set_config('jit', 'off', false)
"""


async def tune(db: Executor) -> None:
    """Settings for the report's statements, for the rest of the session (a pool resets
    them when the connection goes back)."""
    await db.execute(TUNE_SQL)


async def series(db: Executor, span: Span) -> dict[str, Rows]:
    """The choices and the rounds over time, a row per period of the span."""
    args = (span.period, span.since, span.until)
    return {
        "choices_over_time": _rows(await db.fetch(CHOICES_OVER_TIME_SQL, *args)),
        "rounds_over_time": _rows(await db.fetch(ROUNDS_OVER_TIME_SQL, *args)),
    }


async def round_facts(db: Executor, span: Span, bins: int = 30) -> dict[str, Rows]:
    """What `ROUND_FACTS_SQL` computes, and `score_classifier`: the classifier whose scores
    the A/B comparison of HPS uses (one row; none when only the configured, unregistered
    model scored images)."""
    classifier = _rows(await db.fetch(SCORE_CLASSIFIER_SQL))
    scorer = classifier[0]["id"] if classifier else None
    facts = await db.fetchrow(ROUND_FACTS_SQL, span.period, span.since, span.until, scorer, bins)
    return {
        "score_classifier": classifier,
        "position_bias": facts["position_bias"],
        "top_hps_picked": [
            {k: v for k, v in r.items() if k != "id"} for r in facts["top_hps_picked"]
        ],
        "agreement": [{**r, "period": date.fromisoformat(r["period"])} for r in facts["agreement"]],
        "ab_score_summary": facts["ab_score_summary"],
        "ab_score_histograms": facts["ab_score_histograms"],
    }


async def breakdowns(db: Executor, span: Span) -> dict[str, Rows]:
    """Rounds by status (over the span), the classifiers' offline accuracy, how active
    people are, the reward models' agreement, and each adaptation recipe's live record."""
    return {
        "rounds_by_status": _rows(await db.fetch(ROUNDS_BY_STATUS_SQL, span.since, span.until)),
        "classifier_accuracy": _rows(await db.fetch(CLASSIFIER_ACCURACY_SQL)),
        "user_activity": _rows(await db.fetch(USER_ACTIVITY_SQL)),
        "scorer_agreement": _rows(await db.fetch(LATEST_AGREEMENT_SQL)),
        "live_by_recipe": await stats.live_by_recipe(db),
    }


async def live_tests(db: Executor) -> Rows:
    """The SD adapters with a live test (see `LIVE_TESTS_SQL`)."""
    return _rows(await db.fetch(LIVE_TESTS_SQL))


async def version_names(db: Executor, ids: list[int]) -> dict[int, str]:
    return {r["id"]: r["name"] for r in await db.fetch(VERSION_NAMES_SQL, ids)}


def _rows(records: list[Any]) -> Rows:
    return [dict(r) for r in records]
