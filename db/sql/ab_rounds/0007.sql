-- As 0004's, with a last column `balanced`: every version shown in the round showed as
-- many images as the others (after the safety filter held some back).
SELECT r.id AS round_id,
       r.created_at,
       shown.version_ids AS shown_version_ids,
       c.verdict AS requester_verdict,
       chosen.model_version_id AS chosen_version_id,
       c.updated_at AS decided_at,
       shown.balanced
FROM rounds r
CROSS JOIN LATERAL (
    SELECT array_agg(per.version_id ORDER BY per.version_id) AS version_ids,
           min(per.images) = max(per.images) AS balanced
    FROM (
        SELECT i.model_version_id AS version_id, count(*) AS images
        FROM images i
        WHERE i.round_id = r.id AND NOT i.nsfw AND i.model_version_id IS NOT NULL
        GROUP BY i.model_version_id
    ) per
) shown
LEFT JOIN (
    choices c JOIN users u
        ON u.id = c.user_id AND NOT u.banned AND NOT u.shadow_banned AND u.forgotten_at IS NULL
) ON c.round_id = r.id AND c.is_requester AND NOT c.flagged
LEFT JOIN images chosen ON chosen.round_id = c.round_id AND chosen.position = c.chosen_position
WHERE cardinality(shown.version_ids) >= 2
