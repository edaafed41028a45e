-- Per ordered pair of versions shown together: decided rounds, wins, win rate and its
-- 95 % Wilson interval.
SELECT v.id AS version_id,
       v.name AS version,
       v.kind,
       o.id AS opponent_id,
       o.name AS opponent,
       s.rounds,
       s.wins,
       s.wins::float8 / s.rounds AS win_rate,
       (p + z*z/(2*n) - z*sqrt(p*(1-p)/n + z*z/(4*n*n))) / (1 + z*z/n) AS win_rate_low,
       (p + z*z/(2*n) + z*sqrt(p*(1-p)/n + z*z/(4*n*n))) / (1 + z*z/n) AS win_rate_high
FROM (
    SELECT version_id, opponent_id, count(*) AS rounds, count(*) FILTER (WHERE won) AS wins
    FROM ab_decisions
    GROUP BY 1, 2
) s
JOIN model_versions v ON v.id = s.version_id
JOIN model_versions o ON o.id = s.opponent_id
CROSS JOIN LATERAL (SELECT s.wins::float8 / s.rounds AS p, s.rounds::float8 AS n, 1.96 AS z) k
