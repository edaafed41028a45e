SELECT u.pseudonym,
       u.source,
       u.first_seen_at,
       u.last_seen_at,
       u.banned,
       u.shadow_banned,
       u.forgotten_at IS NOT NULL AS forgotten,
       (SELECT count(*) FROM rounds r WHERE r.requester_id = u.id) AS rounds_requested,
       count(c.id) AS choices,
       count(c.id) FILTER (WHERE c.is_requester) AS choices_on_own_rounds,
       count(c.id) FILTER (WHERE NOT c.is_requester) AS votes_on_others_rounds,
       count(c.id) FILTER (WHERE c.verdict = 'pick') AS picks,
       count(c.id) FILTER (WHERE c.verdict = 'tie') AS ties,
       count(c.id) FILTER (WHERE c.verdict = 'none') AS nones,
       max(c.updated_at) AS last_choice_at
FROM users u
LEFT JOIN choices c ON c.user_id = u.id
GROUP BY u.id
