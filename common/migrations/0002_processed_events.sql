-- Idempotent consumers: every applied event id is recorded in the same
-- transaction as its effects, so a redelivered event changes nothing.
CREATE TABLE processed_events (
    event_id     UUID        PRIMARY KEY,
    event_type   TEXT        NOT NULL,
    topic        TEXT        NOT NULL,
    partition    INT         NOT NULL,
    kafka_offset BIGINT      NOT NULL,
    processed_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Counters the consume loop keeps for operators and the invariant checker
-- (duplicates suppressed, records dead-lettered), per topic.
CREATE TABLE consumer_counters (
    topic    TEXT   NOT NULL,
    name     TEXT   NOT NULL,
    value    BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (topic, name)
);
