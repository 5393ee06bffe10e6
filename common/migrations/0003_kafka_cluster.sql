-- The Kafka cluster this database belongs with: recorded at the first start,
-- compared at every later one (common::broker_identity). One row at most.
CREATE TABLE kafka_cluster (
    singleton   BOOLEAN     PRIMARY KEY DEFAULT true CHECK (singleton),
    cluster_id  TEXT        NOT NULL,
    recorded_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
