-- Retention of the consumers' record of applied events. Without it
-- processed_events grows by one row per consumed event forever. A row is
-- only needed while its event can still be delivered again, that is while
-- it may be on a topic: PROCESSED_RETENTION_SECS (default 7 days, Kafka's
-- default retention) must be at least the topics' retention.ms.
--
-- Partitioned by ranges of event_id: ids are UUIDv7, which begin with their
-- creation time, so a range of ids is a range of times. A redelivered event
-- meets its first delivery's row in the same partition (the primary key
-- stays event_id), and expired rows leave with their partition, dropped by
-- the relay leader (common::partitions): no DELETE, WAL or vacuum per row.
-- The rows already here become one partition, bounded by now; rows outside
-- every range go to processed_events_default, pruned row by row.
ALTER TABLE processed_events RENAME TO processed_events_unpartitioned;
ALTER INDEX processed_events_pkey RENAME TO processed_events_unpartitioned_pkey;

CREATE TABLE processed_events (
    event_id     UUID        NOT NULL,
    event_type   TEXT        NOT NULL,
    topic        TEXT        NOT NULL,
    partition    INT         NOT NULL,
    kafka_offset BIGINT      NOT NULL,
    processed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id)
) PARTITION BY RANGE (event_id);
CREATE TABLE processed_events_default PARTITION OF processed_events DEFAULT;

DO $$
DECLARE
    ms    BIGINT := floor(extract(epoch FROM clock_timestamp()) * 1000);
    hex   TEXT   := lpad(to_hex(ms), 12, '0');
    bound UUID   := (substr(hex, 1, 8) || '-' || substr(hex, 9, 4) || '-0000-0000-000000000000')::uuid;
BEGIN
    INSERT INTO processed_events
        SELECT * FROM processed_events_unpartitioned WHERE event_id >= bound;
    DELETE FROM processed_events_unpartitioned WHERE event_id >= bound;
    EXECUTE format('ALTER TABLE processed_events_unpartitioned RENAME TO processed_events_0_%s', ms);
    EXECUTE format('ALTER TABLE processed_events ATTACH PARTITION processed_events_0_%s
                    FOR VALUES FROM (MINVALUE) TO (%L)', ms, bound);
END $$;
