-- Customer credit. Created with the default limit on a customer's first
-- order (or by SetCreditLimit); `used_units` is the sum of the customer's
-- APPROVED payments, kept in step by the consumer in the same transaction.
CREATE TABLE accounts (
    customer_id        TEXT PRIMARY KEY,
    currency           TEXT        NOT NULL CHECK (length(currency) = 3),
    credit_limit_units BIGINT      NOT NULL CHECK (credit_limit_units >= 0),
    used_units         BIGINT      NOT NULL DEFAULT 0 CHECK (used_units >= 0),
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at         TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One payment decision per order: the primary key makes a redelivered or
-- duplicated OrderCreated change nothing.
CREATE TABLE payments (
    order_id     UUID PRIMARY KEY,
    customer_id  TEXT        NOT NULL,
    currency     TEXT        NOT NULL,
    amount_units BIGINT      NOT NULL CHECK (amount_units >= 0),
    status       TEXT        NOT NULL CHECK (status IN ('APPROVED', 'DECLINED', 'REFUNDED')),
    reason       TEXT        NOT NULL DEFAULT '',
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX payments_customer ON payments (customer_id, created_at);
