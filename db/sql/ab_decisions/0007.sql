-- As 0003's, from balanced rounds only: one pick is one win, fair only between versions
-- offering as many images.
SELECT a.round_id,
       a.decided_at,
       mine.version_id,
       theirs.version_id AS opponent_id,
       a.chosen_version_id = mine.version_id AS won
FROM ab_rounds a
CROSS JOIN LATERAL unnest(a.shown_version_ids) AS mine(version_id)
CROSS JOIN LATERAL unnest(a.shown_version_ids) AS theirs(version_id)
WHERE a.requester_verdict = 'pick' AND a.balanced AND mine.version_id <> theirs.version_id
