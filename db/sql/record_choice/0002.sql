-- Recording a click in one round trip (`db/choices.py` documents the steps and locks).
CREATE FUNCTION record_choice(
    p_round_id bigint,
    p_discord_id bigint,
    p_verdict text,
    p_position smallint,
    p_others_may_vote boolean,
    p_interaction_id bigint
) RETURNS TABLE (
    -- The choice's columns, flat: a composite column would cost asyncpg a slow type
    -- introspection on every new connection.
    id bigint,
    round_id bigint,
    user_id bigint,
    verdict text,
    chosen_position smallint,
    is_requester boolean,
    flagged boolean,
    revision integer,
    created_at timestamptz,
    updated_at timestamptz,
    outcome text,
    previous_verdict text,
    previous_position smallint
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    r record;
    u users;
    prev choices;
    had_prev boolean;
    cur choices;
    by_requester boolean;
    result text;
BEGIN
    SELECT rr.status, rr.requester_id,
           EXISTS (SELECT FROM images i WHERE i.round_id = rr.id AND i.position = p_position
                   AND NOT i.nsfw) AS shown
    INTO r FROM rounds rr WHERE rr.id = p_round_id
    -- Until commit, the round can be neither closed nor deleted (a forget) under the
    -- click: a click racing a close is decided by which commits first, never both.
    FOR SHARE OF rr;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'HP001', MESSAGE = 'unknown_round';
    END IF;
    IF r.status <> 'ready' THEN
        RAISE EXCEPTION USING ERRCODE = 'HP001', MESSAGE = 'status', DETAIL = r.status;
    END IF;
    IF p_verdict = 'pick' AND NOT r.shown THEN
        RAISE EXCEPTION USING ERRCODE = 'HP001', MESSAGE = 'bad_position';
    END IF;

    -- The user's row stays locked until commit: one user's clicks serialise here.
    INSERT INTO users (discord_id) VALUES (p_discord_id)
    ON CONFLICT (discord_id) DO UPDATE SET last_seen_at = now()
    RETURNING * INTO u;
    IF u.banned THEN
        RAISE EXCEPTION USING ERRCODE = 'HP001', MESSAGE = 'banned';
    END IF;
    by_requester := u.id IS NOT DISTINCT FROM r.requester_id;
    IF NOT by_requester AND NOT p_others_may_vote THEN
        RAISE EXCEPTION USING ERRCODE = 'HP001', MESSAGE = 'requester_only';
    END IF;

    SELECT * INTO prev FROM choices c
    WHERE c.round_id = p_round_id AND c.user_id = u.id FOR UPDATE;
    had_prev := FOUND;
    IF NOT had_prev THEN
        INSERT INTO choices (round_id, user_id, verdict, chosen_position, is_requester, flagged)
        VALUES (p_round_id, u.id, p_verdict, p_position, by_requester, u.shadow_banned)
        ON CONFLICT (round_id, user_id) DO NOTHING
        RETURNING * INTO cur;
        IF NOT FOUND THEN  -- a concurrent first click won the insert: now it exists
            SELECT * INTO prev FROM choices c
            WHERE c.round_id = p_round_id AND c.user_id = u.id FOR UPDATE;
            had_prev := true;
        END IF;
    END IF;
    IF had_prev THEN
        UPDATE choices c
        SET verdict = p_verdict, chosen_position = p_position, flagged = u.shadow_banned,
            updated_at = now(), revision = c.revision + 1
        WHERE c.id = prev.id
        RETURNING * INTO cur;
        result := CASE WHEN prev.verdict = p_verdict
                            AND prev.chosen_position IS NOT DISTINCT FROM p_position
                       THEN 'unchanged' ELSE 'changed' END;
    ELSE
        result := 'recorded';
    END IF;

    INSERT INTO choice_events (round_id, user_id, verdict, chosen_position, is_requester,
                               flagged, outcome, interaction_id)
    VALUES (p_round_id, u.id, p_verdict, p_position, by_requester, u.shadow_banned, result,
            p_interaction_id);
    RETURN QUERY SELECT cur.id, cur.round_id, cur.user_id, cur.verdict, cur.chosen_position,
        cur.is_requester, cur.flagged, cur.revision, cur.created_at, cur.updated_at, result,
        prev.verdict, prev.chosen_position;
END
$$
