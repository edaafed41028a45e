-- Days are UTC calendar days.
SELECT (c.created_at AT TIME ZONE 'UTC')::date AS day,
       count(*) AS choices,
       count(*) FILTER (WHERE c.is_requester) AS requester_choices,
       count(*) FILTER (WHERE c.verdict = 'pick') AS picks,
       count(*) FILTER (WHERE c.verdict = 'tie') AS ties,
       count(*) FILTER (WHERE c.verdict = 'none') AS nones,
       count(*) FILTER (WHERE c.flagged) AS flagged,
       count(DISTINCT c.user_id) AS choosers
FROM choices c
GROUP BY 1
