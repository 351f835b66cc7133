-- settle_jobs.settlement_id was never written: a job finds its settlement through the
-- authorization in its body (the unique key of `settlements`), and its answer carries the
-- transaction. A column that is always NULL only misleads a reader of the schema.
ALTER TABLE settle_jobs DROP COLUMN settlement_id;
