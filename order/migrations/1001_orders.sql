-- The catalog the order service prices from, seeded from fixtures/catalog.csv.
CREATE TABLE products (
    product_id  TEXT PRIMARY KEY,
    name        TEXT   NOT NULL,
    currency    TEXT   NOT NULL CHECK (length(currency) = 3),
    price_units BIGINT NOT NULL CHECK (price_units >= 0)
);

CREATE TABLE orders (
    order_id         UUID PRIMARY KEY,
    customer_id      TEXT        NOT NULL,
    status           TEXT        NOT NULL CHECK (status IN ('PENDING', 'CONFIRMED', 'CANCELLED')),
    reason           TEXT        NOT NULL DEFAULT '',
    currency         TEXT        NOT NULL,
    total_units      BIGINT      NOT NULL CHECK (total_units >= 0),
    -- What the two sides reported; NULL until they do.
    payment_status   TEXT CHECK (payment_status IN ('APPROVED', 'DECLINED', 'REFUNDED')),
    payment_reason   TEXT        NOT NULL DEFAULT '',
    inventory_status TEXT CHECK (inventory_status IN ('RESERVED', 'REJECTED', 'RELEASED')),
    inventory_reason TEXT        NOT NULL DEFAULT '',
    -- CreateOrder retries with the same key return this order.
    idempotency_key  TEXT UNIQUE,
    request_hash     BYTEA,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- A PENDING order past this instant is cancelled by the deadline sweeper.
    deadline_at      TIMESTAMPTZ NOT NULL
);

CREATE INDEX orders_pending_deadline ON orders (deadline_at) WHERE status = 'PENDING';
CREATE INDEX orders_customer ON orders (customer_id, created_at);

CREATE TABLE order_items (
    order_id         UUID    NOT NULL REFERENCES orders (order_id),
    line_no          INT     NOT NULL,
    product_id       TEXT    NOT NULL,
    quantity         INT     NOT NULL CHECK (quantity > 0),
    unit_price_units BIGINT  NOT NULL CHECK (unit_price_units >= 0),
    PRIMARY KEY (order_id, line_no)
);
