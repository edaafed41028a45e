-- One row per choice: the prompt as the round wrote it, who asked and who chose (pseudonyms
-- only), the images that were shown (safety-flagged images never are) and which one was
-- chosen.
SELECT
    c.id AS choice_id,
    c.round_id,
    r.source AS round_source,
    r.split,
    r.created_at AS round_created_at,
    coalesce(r.prompt_text, p.text) AS prompt,
    p.negative_text AS negative_prompt,
    p.contains_name,
    requester.pseudonym AS requester,
    chooser.pseudonym AS chooser,
    c.is_requester,
    c.verdict,
    c.chosen_position,
    chosen.storage_key AS chosen_image_key,
    chosen.model_version_id AS chosen_model_version_id,
    shown.k AS shown_count,
    shown.positions AS shown_positions,
    shown.image_keys,
    shown.model_version_ids,
    shown.seeds,
    c.flagged,
    c.revision,
    c.created_at,
    c.updated_at
FROM choices c
JOIN rounds r ON r.id = c.round_id
JOIN prompts p ON p.id = r.prompt_id
JOIN users chooser ON chooser.id = c.user_id
LEFT JOIN users requester ON requester.id = r.requester_id
LEFT JOIN images chosen
    ON chosen.round_id = c.round_id AND chosen.position = c.chosen_position
CROSS JOIN LATERAL (
    SELECT
        count(*)::int AS k,
        array_agg(i.position ORDER BY i.position) AS positions,
        array_agg(i.storage_key ORDER BY i.position) AS image_keys,
        array_agg(i.model_version_id ORDER BY i.position) AS model_version_ids,
        array_agg(i.seed ORDER BY i.position) AS seeds
    FROM images i
    WHERE i.round_id = c.round_id AND NOT i.nsfw
) shown
