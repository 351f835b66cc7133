-- OpenGradient inference attestations, the OpenGradient chain's records of them, and the
-- cross-check findings that link (or fail to link) paid sessions and attested inferences.
--
-- Guarantees: an attestation posted twice is stored once (same TEE, hashes, timestamp and
-- session reference); a chain event is stored once per (chain, block hash, log index) and is
-- deleted with its block by the watcher's reorg handling; a finding is reported once per
-- fingerprint; every table says where its facts came from (tx hash, block, log index).

-- An operator's resume after a deep reorg: the watcher then accepts the chain as it is.
ALTER TABLE chain_cursors ADD COLUMN accept_deep_reorg boolean NOT NULL DEFAULT false;

-- What TEE gateways posted to /settle_data.
CREATE TABLE attestations (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    mode             text NOT NULL CHECK (mode IN ('private', 'batch', 'individual')),
    tee_id           bytea NOT NULL CHECK (length(tee_id) = 32),
    input_hash       bytea NOT NULL CHECK (length(input_hash) = 32),
    output_hash      bytea NOT NULL CHECK (length(output_hash) = 32),
    tee_signature    bytea NOT NULL,
    tee_timestamp    bigint NOT NULL CHECK (tee_timestamp >= 0),
    session_ref      text NOT NULL DEFAULT '',     -- the upto session reference ('' = none)
    payer            bytea CHECK (length(payer) = 20),
    permit_nonce     bytea CHECK (length(permit_nonce) = 32),
    session_id       bigint REFERENCES upto_sessions (id),  -- resolved link to the payment
    cost_opg         numeric(78, 0),               -- what the gateway charged for this request
    eth_address      bytea CHECK (length(eth_address) = 20),  -- individual mode
    request_body     jsonb,                        -- individual mode: the full request
    response_body    jsonb,                        -- individual mode: the full response
    verification     text NOT NULL DEFAULT 'pending' CHECK (verification IN
                         ('pending', 'valid', 'invalid_signature', 'unknown_tee', 'tee_disabled',
                          'hash_mismatch')),
    verified_at      timestamptz,
    relay_state      text NOT NULL DEFAULT 'none' CHECK (relay_state IN
                         ('none', 'queued', 'batched', 'submitted')),
    relay_batch_id   bigint,                       -- our data relay's batch (og_relay_submissions)
    received_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (tee_id, input_hash, output_hash, tee_timestamp, session_ref)
);
CREATE INDEX attestations_session ON attestations (session_id);
CREATE INDEX attestations_tee_time ON attestations (tee_id, tee_timestamp);
CREATE INDEX attestations_pending ON attestations (id) WHERE verification = 'pending';
CREATE INDEX attestations_relay ON attestations (relay_state, id) WHERE relay_state = 'queued';

-- TEERegistry facts on the OpenGradient chain, from the configured registry only.
CREATE TABLE tee_keys (
    chain_id         bigint NOT NULL,
    tee_id           bytea NOT NULL CHECK (length(tee_id) = 32),
    public_key       bytea NOT NULL,
    owner            bytea CHECK (length(owner) = 20),
    payment_address  bytea CHECK (length(payment_address) = 20),
    endpoint         text,
    registered_block bigint NOT NULL,
    PRIMARY KEY (chain_id, tee_id)
);
CREATE TABLE tee_events (
    chain_id      bigint NOT NULL,
    tee_id        bytea NOT NULL CHECK (length(tee_id) = 32),
    kind          text NOT NULL CHECK (kind IN ('registered', 'enabled', 'disabled')),
    block_number  bigint NOT NULL,
    block_hash    bytea NOT NULL,
    block_time    timestamptz NOT NULL,
    tx_hash       bytea NOT NULL,
    log_index     integer NOT NULL,
    PRIMARY KEY (chain_id, block_hash, log_index)
);
CREATE INDEX tee_events_history ON tee_events (chain_id, tee_id, block_number, log_index);

-- Settlement events of the configured relay contract sent by the configured relayer.
CREATE TABLE og_batches (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    chain_id       bigint NOT NULL,
    tx_hash        bytea NOT NULL,
    block_number   bigint NOT NULL,
    block_hash     bytea NOT NULL,
    block_time     timestamptz NOT NULL,
    log_index      integer NOT NULL,
    merkle_root    bytea NOT NULL CHECK (length(merkle_root) = 32),
    batch_size     numeric(78, 0) NOT NULL,
    blob_id        text NOT NULL,
    dump_status    text NOT NULL DEFAULT 'pending' CHECK (dump_status IN
                       ('pending', 'valid', 'unavailable', 'malformed', 'root_mismatch',
                        'size_mismatch')),
    dump_checked_at timestamptz,
    UNIQUE (chain_id, block_hash, log_index)
);
CREATE TABLE og_batch_leaves (
    batch_id       bigint NOT NULL REFERENCES og_batches (id) ON DELETE CASCADE,
    leaf_index     integer NOT NULL,
    tee_id         bytea NOT NULL,
    input_hash     bytea NOT NULL,
    output_hash    bytea NOT NULL,
    tee_signature  bytea NOT NULL,
    tee_timestamp  numeric(78, 0) NOT NULL,
    proof          jsonb NOT NULL,                -- hex sibling hashes, leaf to root
    PRIMARY KEY (batch_id, leaf_index)
);
CREATE INDEX og_batch_leaves_inference ON og_batch_leaves (tee_id, input_hash, output_hash);
CREATE TABLE og_individual_settlements (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    chain_id       bigint NOT NULL,
    tx_hash        bytea NOT NULL,
    block_number   bigint NOT NULL,
    block_hash     bytea NOT NULL,
    block_time     timestamptz NOT NULL,
    log_index      integer NOT NULL,
    tee_id         bytea NOT NULL,
    eth_address    bytea NOT NULL,
    input_hash     bytea NOT NULL,
    output_hash    bytea NOT NULL,
    tee_timestamp  numeric(78, 0) NOT NULL,
    blob_id        text NOT NULL,
    tee_signature  bytea NOT NULL,
    UNIQUE (chain_id, block_hash, log_index)
);
CREATE INDEX og_individual_inference ON og_individual_settlements (tee_id, input_hash, output_hash);

-- Our own data-settlement relay (optional): write-ahead batches and individual submissions.
CREATE TABLE og_relay_submissions (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind           text NOT NULL CHECK (kind IN ('batch', 'individual')),
    state          text NOT NULL CHECK (state IN ('pending', 'published', 'signed', 'broadcast',
                                                  'included', 'failed')),
    merkle_root    bytea,
    batch_size     integer,
    attestation_id bigint REFERENCES attestations (id),     -- individual
    dump           bytea,                                     -- what is published to the store
    blob_id        text,
    calldata       bytea,
    signer_nonce   bigint,
    raw_tx         bytea,
    tx_hash        bytea,
    block_number   bigint,
    attempts       integer NOT NULL DEFAULT 0,
    error          text,
    created_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    CHECK (state NOT IN ('signed', 'broadcast', 'included') OR (raw_tx IS NOT NULL AND
                                                                 tx_hash IS NOT NULL)),
    CHECK (state = 'pending' OR blob_id IS NOT NULL)
);
CREATE UNIQUE INDEX og_relay_one_individual ON og_relay_submissions (attestation_id)
    WHERE kind = 'individual';

-- Cross-check findings.
CREATE TABLE findings (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind           text NOT NULL CHECK (kind IN (
                       'paid_not_attested', 'attested_not_paid', 'invalid_tee_signature',
                       'unknown_tee', 'tee_disabled', 'attestation_not_settled',
                       'amount_mismatch', 'payto_mismatch', 'duplicate', 'late_settlement',
                       'batch_dump_invalid', 'unlinked_reconciliation')),
    linked         boolean NOT NULL,               -- false: from per-TEE window reconciliation
    session_id     bigint REFERENCES upto_sessions (id),
    attestation_id bigint REFERENCES attestations (id),
    tee_id         bytea,
    payer          bytea,
    evidence       jsonb NOT NULL,
    fingerprint    bytea NOT NULL UNIQUE,
    detected_at    timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX findings_kind ON findings (kind, detected_at);
CREATE INDEX findings_session ON findings (session_id);
CREATE INDEX findings_tee ON findings (tee_id, detected_at);
