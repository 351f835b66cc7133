-- Chain watcher state: processed blocks (for reorg detection), a checkpoint per chain, and every
-- Transfer to a watched payee (matched to a settlement, or kept as unmatched for auditors).
--
-- Guarantees: a block is stored once per (chain_id, number) and replaced only by the watcher's
-- reorg handling, in the same transaction that reverts everything derived from it; transfers are
-- keyed by (chain_id, block_hash, log_index), so re-processing a block never duplicates one.

CREATE TABLE chain_blocks (
    chain_id      bigint NOT NULL,
    number        bigint NOT NULL CHECK (number >= 0),
    hash          bytea NOT NULL CHECK (length(hash) = 32),
    parent_hash   bytea NOT NULL CHECK (length(parent_hash) = 32),
    timestamp     timestamptz NOT NULL,
    processed_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (chain_id, number)
);

CREATE TABLE chain_cursors (
    chain_id       bigint PRIMARY KEY,
    network        text NOT NULL,
    head_number    bigint NOT NULL,           -- highest block processed
    head_hash      bytea NOT NULL,
    chain_head     bigint,                    -- highest block the node reported
    halted_reason  text,                      -- set by a reorg deeper than the maximum
    halted_at      timestamptz,
    updated_at     timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE chain_transfers (
    chain_id       bigint NOT NULL,
    block_number   bigint NOT NULL,
    block_hash     bytea NOT NULL CHECK (length(block_hash) = 32),
    tx_hash        bytea NOT NULL CHECK (length(tx_hash) = 32),
    log_index      integer NOT NULL,
    asset          bytea NOT NULL CHECK (length(asset) = 20),
    from_address   bytea NOT NULL CHECK (length(from_address) = 20),
    to_address     bytea NOT NULL CHECK (length(to_address) = 20),
    amount         numeric(78, 0) NOT NULL,
    settlement_id  bigint REFERENCES settlements (id),   -- NULL: an unmatched transfer
    observed_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (chain_id, block_hash, log_index)
);
CREATE INDEX chain_transfers_unmatched ON chain_transfers (chain_id, observed_at)
    WHERE settlement_id IS NULL;
CREATE INDEX chain_transfers_to ON chain_transfers (to_address, observed_at);
CREATE INDEX chain_transfers_block ON chain_transfers (chain_id, block_number);

-- confirmed -> broadcast: only after a reorg deeper than the confirmation depth, when an operator
-- has resumed the halted watcher (facilitator/core/settlement.py documents the same rule).
CREATE OR REPLACE FUNCTION settlement_transition_allowed(from_state text, to_state text)
RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT (from_state, to_state) IN (
        ('pending', 'signed'), ('pending', 'failed'), ('pending', 'included'), ('pending', 'expired'),
        ('signed', 'broadcast'), ('signed', 'pending'), ('signed', 'included'), ('signed', 'failed'),
        ('signed', 'expired'),
        ('broadcast', 'included'), ('broadcast', 'pending'), ('broadcast', 'failed'),
        ('broadcast', 'expired'),
        ('included', 'confirmed'), ('included', 'broadcast'),
        ('confirmed', 'broadcast'),
        ('failed', 'pending'))
$$;
