-- As 0003's, leaving out also the choices of requesters banned, shadow-banned or forgotten
-- since (training leaves them out: `db.datasets`, "who counts").
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
LEFT JOIN (
    choices c JOIN users u
        ON u.id = c.user_id AND NOT u.banned AND NOT u.shadow_banned AND u.forgotten_at IS NULL
) ON c.round_id = r.id AND c.is_requester AND NOT c.flagged
LEFT JOIN images chosen ON chosen.round_id = c.round_id AND chosen.position = c.chosen_position
WHERE cardinality(shown.version_ids) >= 2
