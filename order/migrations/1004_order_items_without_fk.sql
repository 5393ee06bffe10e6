-- Items are written only with their order (issue 11, BENCHMARKS.md).
--
-- The foreign key ran a query per item row (a trigger that looks the order up
-- and locks it): intake's group write took 271 µs of statement time per order
-- with it and 207 µs without, at a fixed 1,000/s. Intake inserts an order's
-- items in the statement that inserts the order, only for orders that
-- statement inserted (`WHERE order_id IN (SELECT order_id FROM o)`), and
-- nothing deletes orders; `shopctl check` reports an item without its order.
ALTER TABLE order_items DROP CONSTRAINT IF EXISTS order_items_order_id_fkey;
