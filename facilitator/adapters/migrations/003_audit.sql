-- Indexes for the read-only audit API (facilitator/audit): no table or data changes.
--
-- * The detail endpoint lists the Transfer logs matched to one settlement.
-- * /v1/transfers/unmatched pages on (observed_at, chain_id, block_number, block_hash,
--   log_index): the index serves both the order and the keyset condition, for unmatched
--   transfers only.
-- Settlement listing uses the existing settlements_created_at (created_at, id) index.

CREATE INDEX chain_transfers_settlement ON chain_transfers (settlement_id)
    WHERE settlement_id IS NOT NULL;
CREATE INDEX chain_transfers_unmatched_page
    ON chain_transfers (observed_at, chain_id, block_number, block_hash, log_index)
    WHERE settlement_id IS NULL;
