-- Settlement records: one row per payment authorization, write-ahead of any broadcast.
--
-- Guarantees enforced here, independently of the application code:
--  * at most one row per (chain_id, asset, payer, nonce): the database, not a Python dict,
--    is what stops a second settlement of the same authorization;
--  * every state carries the columns that state needs (settlements_state_columns);
--  * only legal state transitions happen (settlements_guard_transition, mirroring
--    facilitator/core/settlement.py), and every state change is appended to settlement_events.

CREATE TABLE settlements (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    public_id       uuid NOT NULL UNIQUE DEFAULT gen_random_uuid(),
    scheme          text NOT NULL,
    x402_version    smallint NOT NULL CHECK (x402_version IN (1, 2)),
    network         text NOT NULL,                  -- as the client named it (CAIP-2 or v1 name)
    chain_id        bigint NOT NULL,
    asset           bytea NOT NULL CHECK (length(asset) = 20),
    payer           bytea NOT NULL CHECK (length(payer) = 20),
    pay_to          bytea NOT NULL CHECK (length(pay_to) = 20),
    amount          numeric(78, 0) NOT NULL CHECK (amount >= 0),
    nonce           bytea NOT NULL CHECK (length(nonce) = 32),
    valid_after     numeric(78, 0) NOT NULL,
    valid_before    numeric(78, 0) NOT NULL,
    signature       bytea NOT NULL,
    fingerprint     bytea NOT NULL CHECK (length(fingerprint) = 32),
    call_to         bytea NOT NULL CHECK (length(call_to) = 20),   -- contract the settlement calls
    calldata        bytea NOT NULL,
    state           text NOT NULL,
    reason          text,
    message         text,
    settled_by      text CHECK (settled_by IN ('facilitator', 'external')),
    signer          bytea CHECK (length(signer) = 20),
    signer_nonce    bigint CHECK (signer_nonce >= 0),
    gas_limit       bigint,
    max_fee_per_gas numeric(78, 0),
    tx_hash         bytea CHECK (length(tx_hash) = 32),
    raw_tx          bytea,
    block_number    bigint,
    block_hash      bytea CHECK (length(block_hash) = 32),
    log_index       integer,
    attempts        integer NOT NULL DEFAULT 1,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    signed_at       timestamptz,
    broadcast_at    timestamptz,
    included_at     timestamptz,
    confirmed_at    timestamptz,
    failed_at       timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT clock_timestamp(),

    CONSTRAINT settlements_state_valid CHECK (
        state IN ('pending', 'signed', 'broadcast', 'included', 'confirmed', 'failed', 'expired')),
    CONSTRAINT settlements_state_columns CHECK (
        (state NOT IN ('signed', 'broadcast') OR (
            raw_tx IS NOT NULL AND tx_hash IS NOT NULL AND signer IS NOT NULL
            AND signer_nonce IS NOT NULL AND signed_at IS NOT NULL))
        AND (state <> 'broadcast' OR broadcast_at IS NOT NULL)
        AND (state NOT IN ('included', 'confirmed') OR (
            tx_hash IS NOT NULL AND block_number IS NOT NULL AND block_hash IS NOT NULL
            AND included_at IS NOT NULL AND settled_by IS NOT NULL))
        AND (state <> 'confirmed' OR confirmed_at IS NOT NULL)
        AND (state NOT IN ('failed', 'expired') OR (reason IS NOT NULL AND failed_at IS NOT NULL))),
    CONSTRAINT settlements_one_per_authorization UNIQUE (chain_id, asset, payer, nonce)
);

CREATE INDEX settlements_unfinished ON settlements (state)
    WHERE state IN ('pending', 'signed', 'broadcast', 'included');
CREATE INDEX settlements_tx_hash ON settlements (tx_hash) WHERE tx_hash IS NOT NULL;
CREATE INDEX settlements_created_at ON settlements (created_at, id);
CREATE INDEX settlements_payer ON settlements (payer, created_at);
CREATE INDEX settlements_pay_to ON settlements (pay_to, created_at);

CREATE TABLE settlement_events (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    settlement_id   bigint NOT NULL REFERENCES settlements (id),
    at              timestamptz NOT NULL DEFAULT clock_timestamp(),
    from_state      text,
    to_state        text NOT NULL,
    reason          text,
    tx_hash         bytea,
    block_number    bigint
);
CREATE INDEX settlement_events_settlement ON settlement_events (settlement_id, id);

-- The legal transitions, as in facilitator/core/settlement.py::TRANSITIONS.
CREATE FUNCTION settlement_transition_allowed(from_state text, to_state text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT (from_state, to_state) IN (
        ('pending', 'signed'), ('pending', 'failed'), ('pending', 'included'), ('pending', 'expired'),
        ('signed', 'broadcast'), ('signed', 'pending'), ('signed', 'included'), ('signed', 'failed'),
        ('signed', 'expired'),
        ('broadcast', 'included'), ('broadcast', 'pending'), ('broadcast', 'failed'),
        ('broadcast', 'expired'),
        ('included', 'confirmed'), ('included', 'broadcast'),
        ('failed', 'pending'))
$$;

CREATE FUNCTION settlements_guard_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.state <> 'pending' THEN
            RAISE EXCEPTION 'settlement % must start in pending, not %', NEW.public_id, NEW.state
                USING ERRCODE = 'check_violation';
        END IF;
    ELSIF NEW.state IS DISTINCT FROM OLD.state THEN
        IF NOT settlement_transition_allowed(OLD.state, NEW.state) THEN
            RAISE EXCEPTION 'illegal settlement transition % -> % (settlement %)',
                OLD.state, NEW.state, OLD.public_id USING ERRCODE = 'check_violation';
        END IF;
    END IF;
    NEW.updated_at := clock_timestamp();
    RETURN NEW;
END $$;

CREATE TRIGGER settlements_guard BEFORE INSERT OR UPDATE ON settlements
    FOR EACH ROW EXECUTE FUNCTION settlements_guard_transition();

CREATE FUNCTION settlements_record_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.state IS DISTINCT FROM OLD.state
       OR NEW.tx_hash IS DISTINCT FROM OLD.tx_hash THEN
        INSERT INTO settlement_events (settlement_id, from_state, to_state, reason, tx_hash,
                                       block_number)
        VALUES (NEW.id, CASE WHEN TG_OP = 'INSERT' THEN NULL ELSE OLD.state END, NEW.state,
                NEW.reason, NEW.tx_hash, NEW.block_number);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER settlements_timeline AFTER INSERT OR UPDATE ON settlements
    FOR EACH ROW EXECUTE FUNCTION settlements_record_event();

-- Every /verify and every /settle verdict, for auditors (append-only, written in batches).
CREATE TABLE verifications (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at              timestamptz NOT NULL,
    endpoint        text NOT NULL CHECK (endpoint IN ('verify', 'settle')),
    request_id      text,
    scheme          text NOT NULL,
    x402_version    smallint NOT NULL,
    network         text NOT NULL,
    payer           bytea,
    pay_to          bytea,
    asset           bytea,
    amount          numeric(78, 0),
    nonce           bytea,
    valid_before    numeric(78, 0),
    fingerprint     bytea,
    is_valid        boolean NOT NULL,
    reason          text
);
CREATE INDEX verifications_at ON verifications (at);
CREATE INDEX verifications_payer ON verifications (payer, at);
