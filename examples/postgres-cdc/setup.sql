-- Tables for the change-capture example. Run as a role that may create tables:
--   psql -d test -f examples/postgres-cdc/setup.sql
-- The server needs wal_level = logical (docs/postgres.md, "Server settings").

CREATE TABLE IF NOT EXISTS customers (
    id      bigint PRIMARY KEY,
    name    text NOT NULL,
    email   text,
    tier    text NOT NULL DEFAULT 'basic'
);

CREATE TABLE IF NOT EXISTS orders (
    id          bigint PRIMARY KEY,
    customer_id bigint NOT NULL REFERENCES customers (id),
    total       numeric(12, 2) NOT NULL,
    status      text NOT NULL,
    placed_at   timestamptz NOT NULL DEFAULT now()
);

-- Old rows in full on UPDATE and DELETE (and unchanged large values filled in).
ALTER TABLE orders REPLICA IDENTITY FULL;
