-- Retention by partition. The outbox is partitioned by ranges of event_id:
-- ids are UUIDv7, so a range of ids is a range of creation times. The relay
-- leader creates the ranges ahead of time and drops a whole partition once
-- it is older than OUTBOX_RETENTION_SECS and nothing in it is pending
-- (common::partitions), instead of deleting every published row: a DELETE
-- costs a statement, WAL (full-page images) and vacuum work per row, about
-- four rows per order.
--
-- The rows already here become one partition, named after its upper bound
-- (now, in Unix milliseconds), dropped like any other once expired. Rows
-- that fall in no range (ids not of this clock, or written while no
-- partition was prepared) go to outbox_default, which the relay prunes row
-- by row.
ALTER TABLE outbox RENAME TO outbox_unpartitioned;
-- A partitioned table's primary key must include its partition key.
ALTER TABLE outbox_unpartitioned DROP CONSTRAINT outbox_pkey;
ALTER INDEX outbox_pending RENAME TO outbox_unpartitioned_pending;

CREATE TABLE outbox (
    id           BIGINT      NOT NULL DEFAULT nextval('outbox_id_seq'),
    topic        TEXT        NOT NULL,
    key          TEXT        NOT NULL,
    event_type   TEXT        NOT NULL,
    event_id     UUID        NOT NULL,
    payload      BYTEA       NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    published_at TIMESTAMPTZ,
    traceparent  TEXT,
    tracestate   TEXT,
    -- The relay marks by event id, within the batch's range of ids (so
    -- that PostgreSQL prunes the partitions the batch is not in).
    PRIMARY KEY (event_id)
) PARTITION BY RANGE (event_id);
ALTER SEQUENCE outbox_id_seq OWNED BY outbox.id;
-- The relay reads pending rows in id order (commit order, roughly).
CREATE INDEX outbox_pending ON outbox (id) WHERE published_at IS NULL;
CREATE TABLE outbox_default PARTITION OF outbox DEFAULT;

DO $$
DECLARE
    ms    BIGINT := floor(extract(epoch FROM clock_timestamp()) * 1000);
    hex   TEXT   := lpad(to_hex(ms), 12, '0');
    bound UUID   := (substr(hex, 1, 8) || '-' || substr(hex, 9, 4) || '-0000-0000-000000000000')::uuid;
BEGIN
    INSERT INTO outbox SELECT * FROM outbox_unpartitioned WHERE event_id >= bound;
    DELETE FROM outbox_unpartitioned WHERE event_id >= bound;
    EXECUTE format('ALTER TABLE outbox_unpartitioned RENAME TO outbox_0_%s', ms);
    EXECUTE format('ALTER TABLE outbox ATTACH PARTITION outbox_0_%s FOR VALUES FROM (MINVALUE) TO (%L)',
                   ms, bound);
END $$;
