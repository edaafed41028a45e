"""What `hps report` plots, read from the analysts' views (migration 0003)."""

from __future__ import annotations

from typing import Any

from db.connect import Executor

CHOICES_PER_DAY_SQL = """
SELECT day, choices, picks, ties, nones, flagged FROM choices_daily ORDER BY day
"""

ROUNDS_BY_STATUS_SQL = """
SELECT status, count(*) AS rounds FROM rounds GROUP BY status
ORDER BY array_position(ARRAY['queued', 'generating', 'ready', 'closed', 'failed'], status)
"""

CLASSIFIER_ACCURACY_SQL = """
SELECT name, status, top1, top1_low, top1_high, untuned_top1, chance, test_examples
FROM classifier_versions
WHERE top1 IS NOT NULL
ORDER BY id
"""

# Cumulative decided rounds and wins per day of each SD adapter against each opponent.
AB_WIN_RATE_OVER_TIME_SQL = """
SELECT (d.decided_at AT TIME ZONE 'UTC')::date AS day,
       v.name AS version,
       o.name AS opponent,
       (sum(count(*)) OVER w)::bigint AS rounds,
       (sum(count(*) FILTER (WHERE d.won)) OVER w)::bigint AS wins
FROM ab_decisions d
JOIN model_versions v ON v.id = d.version_id
JOIN model_versions o ON o.id = d.opponent_id
WHERE v.kind = 'sd_adapter'
GROUP BY 1, 2, 3
WINDOW w AS (PARTITION BY v.name, o.name ORDER BY (d.decided_at AT TIME ZONE 'UTC')::date)
ORDER BY version, opponent, day
"""

# Histograms over one shared set of bins, computed in the database: bounded whatever the
# number of images.
SCORE_HISTOGRAMS_SQL = """
WITH scored AS (
    SELECT v.name AS version, i.hps_score AS score
    FROM images i JOIN model_versions v ON v.id = i.model_version_id
    WHERE i.hps_score IS NOT NULL AND NOT i.nsfw
), bounds AS (
    SELECT min(score) AS lo, greatest(max(score), min(score) + 1e-3) AS hi FROM scored
)
SELECT s.version,
       least(width_bucket(s.score, b.lo, b.hi, $1), $1) AS bin,
       count(*) AS images,
       b.lo, b.hi
FROM scored s CROSS JOIN bounds b
GROUP BY s.version, 2, b.lo, b.hi
ORDER BY s.version, bin
"""

SCORE_SUMMARY_SQL = """
SELECT v.name AS version, count(*) AS images, avg(i.hps_score) AS mean_hps
FROM images i JOIN model_versions v ON v.id = i.model_version_id
WHERE i.hps_score IS NOT NULL AND NOT i.nsfw
GROUP BY v.name ORDER BY v.name
"""


async def report_data(db: Executor, bins: int = 30) -> dict[str, list[dict[str, Any]]]:
    """Every table the report draws, as lists of plain rows."""
    queries = {
        "choices_per_day": (CHOICES_PER_DAY_SQL, ()),
        "rounds_by_status": (ROUNDS_BY_STATUS_SQL, ()),
        "classifier_accuracy": (CLASSIFIER_ACCURACY_SQL, ()),
        "ab_win_rate_over_time": (AB_WIN_RATE_OVER_TIME_SQL, ()),
        "score_histograms": (SCORE_HISTOGRAMS_SQL, (bins,)),
        "score_summary": (SCORE_SUMMARY_SQL, ()),
    }
    return {
        name: [dict(r) for r in await db.fetch(sql, *args)] for name, (sql, args) in queries.items()
    }
