-- A round that showed images of two or more model versions, with the requester's
-- verdict (flagged choices left out) and the version of the image they picked.
SELECT r.id AS round_id,
       r.created_at,
       shown.version_ids AS shown_version_ids,
       c.verdict AS requester_verdict,
       chosen.model_version_id AS chosen_version_id,
       c.updated_at AS decided_at
FROM rounds r
CROSS JOIN LATERAL (
    SELECT array_agg(DISTINCT i.model_version_id ORDER BY i.model_version_id) AS version_ids
    FROM images i
    WHERE i.round_id = r.id AND NOT i.nsfw AND i.model_version_id IS NOT NULL
) shown
LEFT JOIN choices c ON c.round_id = r.id AND c.is_requester AND NOT c.flagged
LEFT JOIN images chosen ON chosen.round_id = c.round_id AND chosen.position = c.chosen_position
WHERE cardinality(shown.version_ids) >= 2
