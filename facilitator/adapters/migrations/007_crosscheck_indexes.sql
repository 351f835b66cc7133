-- What the cross-check and the auditors' API scan by, and the evidence a bad dump leaves.

ALTER TABLE og_batches
    ADD COLUMN dump_root bytea CHECK (dump_root IS NULL OR length(dump_root) = 32),
    ADD COLUMN dump_leaf_count integer,
    ADD COLUMN dump_error text;

ALTER TABLE findings
    ADD CONSTRAINT findings_tee_id_length CHECK (tee_id IS NULL OR length(tee_id) = 32),
    ADD CONSTRAINT findings_payer_length CHECK (payer IS NULL OR length(payer) = 20);

CREATE INDEX findings_detected ON findings (detected_at, id);
CREATE INDEX attestations_received ON attestations (received_at);
CREATE INDEX upto_sessions_settle_time ON upto_sessions ((COALESCE(settled_at, created_at)));
CREATE INDEX og_batches_time ON og_batches (chain_id, block_time);
