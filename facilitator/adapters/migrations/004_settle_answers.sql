-- How often a settlement was answered `success: true`: the first answer and every replay of
-- the stored response (auditors see replays; the `reject` duplicate policy allows only one).
ALTER TABLE settlements
    ADD COLUMN success_answers integer NOT NULL DEFAULT 0 CHECK (success_answers >= 0),
    ADD COLUMN success_answered_at timestamptz;
