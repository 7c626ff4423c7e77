-- Some changes to watch arrive on weir.public.*:
--   psql -d test -f examples/postgres-cdc/changes.sql
INSERT INTO customers VALUES (1, 'Ann Example', 'ann@example.com', 'gold')
    ON CONFLICT (id) DO UPDATE SET email = EXCLUDED.email;
INSERT INTO orders VALUES (100, 1, 129.87, 'placed', now())
    ON CONFLICT (id) DO UPDATE SET status = 'placed';
UPDATE orders SET status = 'paid' WHERE id = 100;
BEGIN;
INSERT INTO orders VALUES (101, 1, 5.00, 'placed', now());
ROLLBACK; -- rolled back: publishes nothing
DELETE FROM orders WHERE id = 100;
