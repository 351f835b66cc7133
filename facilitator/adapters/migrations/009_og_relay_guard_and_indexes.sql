-- Our data relay's submissions get a state machine enforced by the database (as settlements do,
-- migration 001/002) and a re-send counter; the queries run on every tick get their indexes.
-- Independent of migration 008.

-- Re-sends of the same signed bytes (a re-sign counts in `attempts`): bounded by the relay, and
-- counted here so the bound survives restarts.
ALTER TABLE og_relay_submissions ADD COLUMN resends integer NOT NULL DEFAULT 0;

-- The legal transitions, as in facilitator/adapters/og_relay.py. `signed -> signed` (a re-sign
-- replacing a transaction whose nonce was taken) is not a change of state.
CREATE FUNCTION og_relay_transition_allowed(from_state text, to_state text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT (from_state, to_state) IN (
        ('pending', 'published'), ('pending', 'failed'),
        ('published', 'signed'), ('published', 'failed'),
        ('signed', 'broadcast'), ('signed', 'included'), ('signed', 'failed'),
        ('broadcast', 'signed'), ('broadcast', 'included'), ('broadcast', 'failed'))
$$;

CREATE FUNCTION og_relay_guard_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.state <> 'pending' THEN
            RAISE EXCEPTION 'relay submission % must start in pending, not %', NEW.id, NEW.state
                USING ERRCODE = 'check_violation';
        END IF;
    ELSIF NEW.state IS DISTINCT FROM OLD.state THEN
        IF NOT og_relay_transition_allowed(OLD.state, NEW.state) THEN
            RAISE EXCEPTION 'illegal relay submission transition % -> % (submission %)',
                OLD.state, NEW.state, OLD.id USING ERRCODE = 'check_violation';
        END IF;
    END IF;
    NEW.updated_at := clock_timestamp();
    RETURN NEW;
END $$;

CREATE TRIGGER og_relay_guard BEFORE INSERT OR UPDATE ON og_relay_submissions
    FOR EACH ROW EXECUTE FUNCTION og_relay_guard_transition();

-- The relay's next submission to work on (every 0.5 s).
CREATE INDEX og_relay_unfinished ON og_relay_submissions (id)
    WHERE state IN ('pending', 'published', 'signed', 'broadcast');

-- Batch dumps still to check (every OpenGradient watcher tick). The cross-check's read of
-- unchecked batches by time is served by og_batches_time (007).
CREATE INDEX og_batches_pending ON og_batches (chain_id, id) WHERE dump_status = 'pending';

-- A batch submission's attestations (read when it is published).
CREATE INDEX attestations_relay_batch ON attestations (relay_batch_id)
    WHERE relay_batch_id IS NOT NULL;
ALTER TABLE attestations ADD CONSTRAINT attestations_relay_batch_fk
    FOREIGN KEY (relay_batch_id) REFERENCES og_relay_submissions (id);
COMMENT ON COLUMN attestations.relay_batch_id IS
    'our data relay''s batch submission holding this attestation (og_relay_submissions.id)';

-- Attestations that can still be linked to a session (every second): only those that name one.
CREATE INDEX attestations_linkable ON attestations (id)
    WHERE session_id IS NULL AND (payer IS NOT NULL OR session_ref <> '');
