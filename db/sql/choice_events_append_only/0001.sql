-- Every click is kept: events may be deleted (forgetting a user) but never rewritten.
CREATE FUNCTION choice_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'choice_events is append-only: rows cannot be updated';
END
$$
