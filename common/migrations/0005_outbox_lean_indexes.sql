-- Fewer index entries per outbox row. Every row is inserted once and marked
-- published once, and each index costs an entry at both (an UPDATE of an
-- indexed column is never HOT): with four indexes a row cost six entries.
--   * event_id UNIQUE: ids are fresh UUIDv7s, nothing looks a row up by it,
--     and duplicates are dropped by the consumers (processed_events), not
--     here.
--   * outbox_published: the prune finds published rows in id order below
--     the oldest pending one instead (common::outbox::Relay::prune).
-- Left: the primary key and the partial index of pending rows, which the
-- relay reads.
ALTER TABLE outbox DROP CONSTRAINT IF EXISTS outbox_event_id_key;
DROP INDEX IF EXISTS outbox_published;
