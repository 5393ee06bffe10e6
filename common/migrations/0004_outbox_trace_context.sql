-- The W3C trace context of the transaction that wrote each event, so that
-- the relay's publish and every consumer continue the order's trace.
ALTER TABLE outbox ADD COLUMN traceparent TEXT, ADD COLUMN tracestate TEXT;
