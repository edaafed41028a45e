-- Days are UTC calendar days.
SELECT (r.created_at AT TIME ZONE 'UTC')::date AS day,
       count(*) AS rounds,
       count(*) FILTER (WHERE r.status IN ('queued', 'generating')) AS in_flight,
       count(*) FILTER (WHERE r.status = 'ready') AS ready,
       count(*) FILTER (WHERE r.status = 'closed') AS closed,
       count(*) FILTER (WHERE r.status = 'failed') AS failed,
       count(DISTINCT r.requester_id) AS requesters,
       round(avg(extract(epoch FROM r.ready_at - r.created_at))::numeric, 1)
           AS avg_seconds_to_ready
FROM rounds r
GROUP BY 1
