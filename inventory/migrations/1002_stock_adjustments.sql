-- Every change of stock that is not a reservation or a release: the seed
-- from the catalog and SetStock. Reservations only move units between
-- available and reserved, so at any time, per product,
--   sum(delta) = available + reserved
-- and once every order is decided, reserved = confirmed quantities. The
-- invariant checker (shopctl check) relies on this ledger.
CREATE TABLE stock_adjustments (
    id         BIGSERIAL PRIMARY KEY,
    product_id TEXT        NOT NULL,
    delta      BIGINT      NOT NULL,
    reason     TEXT        NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX stock_adjustments_product ON stock_adjustments (product_id);

-- Databases created before this table existed start from their balance.
INSERT INTO stock_adjustments (product_id, delta, reason)
SELECT product_id, available + reserved, 'balance when the ledger began'
FROM stock;
