-- The idempotency key's uniqueness, indexed only where there is a key (issue 11).
--
-- A UNIQUE constraint indexes every row, NULLs included, and most orders carry
-- no key: that was an index entry per new order, and another at the order's
-- decision (changing its status is not a HOT update, so every index of the
-- table gets an entry for the new row version). A partial unique index keeps
-- the same rule for keyed orders: intake's ON CONFLICT DO NOTHING arbitrates on
-- it, and lookups by key (`idempotency_key = $1`, `= ANY($1)`) can use it,
-- since an equality implies the key is not null.
CREATE UNIQUE INDEX orders_idempotency_key ON orders (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
ALTER TABLE orders DROP CONSTRAINT orders_idempotency_key_key;
