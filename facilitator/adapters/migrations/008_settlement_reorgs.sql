-- Reorgs of externally settled payments, and per-method authorization keys.
--
-- * signed_tx_hash: the hash of OUR signed transaction (raw_tx), kept when someone else's
--   transaction settles the payment. `tx_hash` keeps meaning "the transaction that settled it"
--   (or, in flight, the one we sent), so every reader (GET /settle, the audit API, findings)
--   is unchanged; a reorg that removes an inclusion restores `tx_hash` from `signed_tx_hash`,
--   or, with no transaction of ours, sends the row back to `pending` to be settled again.
-- * included -> pending and confirmed -> pending (same rule in core/settlement.py).
-- * At most one row per EIP-3009 authorization (chain, asset, payer, nonce) and per Permit2
--   nonce (chain, payer, nonce), each key applying only to its transfer method: the payer
--   chooses both nonces, and the two nonce spaces belong to different contracts.

ALTER TABLE settlements ADD COLUMN signed_tx_hash bytea CHECK (length(signed_tx_hash) = 32);

-- An inclusion by someone else overwrote tx_hash before this migration: those rows' own hash
-- is unknown (NULL) and a reorg treats them as never signed.
UPDATE settlements SET signed_tx_hash = tx_hash
WHERE raw_tx IS NOT NULL AND settled_by IS DISTINCT FROM 'external';

-- Kept by the database, whoever writes the row: while a row is signed or broadcast its tx_hash
-- is our transaction's, so it is copied; without stored bytes (pending again, reclaimed) there
-- is no transaction of ours. Other states (included, confirmed, failed, expired) keep it.
CREATE FUNCTION settlements_keep_signed_tx_hash() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state IN ('signed', 'broadcast') THEN
        NEW.signed_tx_hash := NEW.tx_hash;
    ELSIF NEW.raw_tx IS NULL THEN
        NEW.signed_tx_hash := NULL;
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER settlements_signed_tx_hash BEFORE INSERT OR UPDATE ON settlements
    FOR EACH ROW EXECUTE FUNCTION settlements_keep_signed_tx_hash();

-- GET /settle/{hash} of our own transaction when another one settled the payment.
CREATE INDEX settlements_by_signed_tx_hash ON settlements (signed_tx_hash)
    WHERE signed_tx_hash <> tx_hash;

CREATE UNIQUE INDEX settlements_one_per_eip3009_authorization
    ON settlements (chain_id, asset, payer, nonce) WHERE transfer_method = 'eip3009';
ALTER TABLE settlements DROP CONSTRAINT settlements_one_per_authorization;

-- included|confirmed -> pending: a reorg removed the inclusion of a payment that has no signed
-- transaction of ours (it was settled by someone else's): it must be settled again.
CREATE OR REPLACE FUNCTION settlement_transition_allowed(from_state text, to_state text)
RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT (from_state, to_state) IN (
        ('pending', 'signed'), ('pending', 'failed'), ('pending', 'included'), ('pending', 'expired'),
        ('signed', 'broadcast'), ('signed', 'pending'), ('signed', 'included'), ('signed', 'failed'),
        ('signed', 'expired'),
        ('broadcast', 'included'), ('broadcast', 'pending'), ('broadcast', 'failed'),
        ('broadcast', 'expired'),
        ('included', 'confirmed'), ('included', 'broadcast'), ('included', 'pending'),
        ('confirmed', 'broadcast'), ('confirmed', 'pending'),
        ('failed', 'pending'))
$$;

-- Written on insert and never read.
ALTER TABLE chain_blocks DROP COLUMN processed_at;
