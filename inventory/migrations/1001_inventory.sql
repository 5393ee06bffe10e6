-- Stock per product, seeded from fixtures/catalog.csv at first start (never
-- overwritten) and set through the gRPC API. The CHECK constraints are the
-- last line of defence: whatever races, stock never goes negative.
CREATE TABLE stock (
    product_id TEXT PRIMARY KEY,
    -- Units that can still be reserved.
    available  BIGINT      NOT NULL CHECK (available >= 0),
    -- Units held by RESERVED reservations.
    reserved   BIGINT      NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One row per order inventory has decided on: the primary key makes a second
-- OrderCreated for the same order change nothing.
CREATE TABLE reservations (
    order_id    UUID PRIMARY KEY,
    customer_id TEXT        NOT NULL,
    status      TEXT        NOT NULL CHECK (status IN ('RESERVED', 'REJECTED', 'RELEASED')),
    -- Why it was rejected or released; empty while RESERVED.
    reason      TEXT        NOT NULL DEFAULT '',
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- What an order asked for, one row per product (lines of the same product
-- are summed). Kept for rejected orders too, for the record.
CREATE TABLE reservation_items (
    order_id   UUID   NOT NULL REFERENCES reservations (order_id),
    product_id TEXT   NOT NULL,
    quantity   BIGINT NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (order_id, product_id)
);
