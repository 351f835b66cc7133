-- The upto scheme (Permit2), its sessions, asynchronous settle jobs and usage metadata.
--
-- Guarantees: at most one settlement per (chain, owner, Permit2 nonce) — Permit2 nonces are
-- per owner across every token, so the EIP-3009 key (which includes the asset) is not enough;
-- a job row exists for every accepted asynchronous /settle and moves queued -> processing ->
-- succeeded | failed exactly once (processing may return to queued when its worker died).

ALTER TABLE settlements
    ADD COLUMN transfer_method text NOT NULL DEFAULT 'eip3009'
        CHECK (transfer_method IN ('eip3009', 'permit2')),
    ADD COLUMN cap_amount numeric(78, 0) CHECK (cap_amount >= 0);

CREATE UNIQUE INDEX settlements_one_per_permit2_nonce ON settlements (chain_id, payer, nonce)
    WHERE transfer_method = 'permit2';

-- One row per upto permit: verified when a session starts, settled once with the summed cost.
CREATE TABLE upto_sessions (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    chain_id            bigint NOT NULL,
    payer               bytea NOT NULL CHECK (length(payer) = 20),
    nonce               bytea NOT NULL CHECK (length(nonce) = 32),      -- Permit2 nonce
    asset               bytea NOT NULL CHECK (length(asset) = 20),
    pay_to              bytea NOT NULL CHECK (length(pay_to) = 20),
    facilitator         bytea NOT NULL CHECK (length(facilitator) = 20),
    cap                 numeric(78, 0) NOT NULL,
    deadline            numeric(78, 0) NOT NULL,
    valid_after         numeric(78, 0) NOT NULL,
    gateway_session_id  text,                       -- usageMetadata.sessionId
    verified_at         timestamptz,
    verifications       integer NOT NULL DEFAULT 0,
    settled_amount      numeric(78, 0),
    settled_at          timestamptz,
    settlement_id       bigint REFERENCES settlements (id),
    usage               jsonb,
    created_at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (chain_id, payer, nonce),
    CHECK (settled_amount IS NULL OR settled_amount <= cap)
);
CREATE INDEX upto_sessions_gateway ON upto_sessions (gateway_session_id)
    WHERE gateway_session_id IS NOT NULL;
CREATE INDEX upto_sessions_pay_to ON upto_sessions (pay_to, created_at);

-- Usage a resource server reported with a settlement (OpenGradient's usageMetadata).
CREATE TABLE settlement_usage (
    settlement_id   bigint PRIMARY KEY REFERENCES settlements (id),
    session_id      text,
    request_count   bigint,
    cost_opg        numeric(78, 0),
    cost_usd        numeric(40, 18),
    input_tokens    bigint,
    output_tokens   bigint,
    total_tokens    bigint,
    service         text,
    model           text,
    raw             jsonb NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX settlement_usage_recorded ON settlement_usage (recorded_at);

CREATE TABLE settle_jobs (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),   -- jobId = 'payment-' || id
    status          text NOT NULL CHECK (status IN ('queued', 'processing', 'succeeded', 'failed')),
    queue           text NOT NULL DEFAULT 'payments',
    body            jsonb NOT NULL,                               -- the /settle request
    result          jsonb,                                        -- the final SettleResponse
    error           text,
    attempts        integer NOT NULL DEFAULT 0,
    not_before      timestamptz NOT NULL DEFAULT clock_timestamp(),
    settlement_id   bigint REFERENCES settlements (id),
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    started_at      timestamptz,
    finished_at     timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    CHECK (status NOT IN ('succeeded', 'failed') OR (result IS NOT NULL AND finished_at IS NOT NULL))
);
CREATE INDEX settle_jobs_runnable ON settle_jobs (not_before) WHERE status IN ('queued', 'processing');
