-- One row per decided A/B round and ordered pair of versions shown in it: the
-- requester picked an image (ties and "none" decide nothing) and `won` says whether it
-- was one of `version_id`'s.
SELECT a.round_id,
       a.decided_at,
       mine.version_id,
       theirs.version_id AS opponent_id,
       a.chosen_version_id = mine.version_id AS won
FROM ab_rounds a
CROSS JOIN LATERAL unnest(a.shown_version_ids) AS mine(version_id)
CROSS JOIN LATERAL unnest(a.shown_version_ids) AS theirs(version_id)
WHERE a.requester_verdict = 'pick' AND mine.version_id <> theirs.version_id
