"""What `hps report` plots, read from the analysts' views (migration 0003)."""

from __future__ import annotations

from typing import Any

from db.connect import Executor
from db.scorers import LATEST_AGREEMENT_SQL

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

# Scores of different classifiers are on different scales: the distributions compare one
# classifier's, the serving one's if it scored served images, else the latest that did.
SCORE_CLASSIFIER_SQL = """
SELECT v.id, v.name, v.status
FROM model_versions v
WHERE v.kind = 'classifier'
  AND EXISTS (SELECT FROM images i
              WHERE i.hps_version_id = v.id AND i.hps_score IS NOT NULL AND NOT i.nsfw)
ORDER BY v.status = 'serving' DESC, v.id DESC
LIMIT 1
"""

# Histograms over one shared set of bins, computed in the database: bounded whatever the
# number of images. $2: the classifier whose scores count (NULL: the configured model's,
# which has no registry version).
SCORE_HISTOGRAMS_SQL = """
WITH scored AS (
    SELECT v.name AS version, i.hps_score AS score
    FROM images i JOIN model_versions v ON v.id = i.model_version_id
    WHERE i.hps_score IS NOT NULL AND NOT i.nsfw
      AND i.hps_version_id IS NOT DISTINCT FROM $2::bigint
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
  AND i.hps_version_id IS NOT DISTINCT FROM $1::bigint
GROUP BY v.name ORDER BY v.name
"""


async def report_data(db: Executor, bins: int = 30) -> dict[str, list[dict[str, Any]]]:
    """Every table the report draws, as lists of plain rows. `score_classifier` is the
    classifier whose scores the HPS distributions show (one row; none when only the
    configured, unregistered model scored images)."""
    classifier = [dict(r) for r in await db.fetch(SCORE_CLASSIFIER_SQL)]
    scorer = classifier[0]["id"] if classifier else None
    queries = {
        "choices_per_day": (CHOICES_PER_DAY_SQL, ()),
        "rounds_by_status": (ROUNDS_BY_STATUS_SQL, ()),
        "classifier_accuracy": (CLASSIFIER_ACCURACY_SQL, ()),
        "ab_win_rate_over_time": (AB_WIN_RATE_OVER_TIME_SQL, ()),
        "score_histograms": (SCORE_HISTOGRAMS_SQL, (bins, scorer)),
        "score_summary": (SCORE_SUMMARY_SQL, (scorer,)),
        "scorer_agreement": (LATEST_AGREEMENT_SQL, ()),
    }
    data = {
        name: [dict(r) for r in await db.fetch(sql, *args)] for name, (sql, args) in queries.items()
    }
    return {**data, "score_classifier": classifier}
