-- Warren's transactional outbox table, its dead-letter table and the
-- NOTIFY trigger that wakes the sidecar's relay (--relay-postgres).
--
-- The app inserts a row into warren_outbox in the same transaction as its
-- own change; the relay moves committed rows into the sidecar's durable
-- outbox and deletes them. Run this once per database (it is idempotent).
-- The relay's role needs SELECT, DELETE on warren_outbox and INSERT on
-- warren_outbox_dead.

CREATE TABLE IF NOT EXISTS warren_outbox (
    id           bigserial   PRIMARY KEY,
    -- Idempotency key; the AMQP message_id. Re-sent rows keep it, so
    -- consumers can drop duplicates.
    message_id   text        NOT NULL,
    -- '' or 'amq.default' is the default exchange.
    exchange     text        NOT NULL,
    routing_key  text        NOT NULL,
    payload      bytea       NOT NULL,
    -- A JSON object of string, number or boolean values: AMQP headers.
    headers      jsonb       NULL,
    content_type text        NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
-- The relay claims rows in primary-key order (ORDER BY id ... FOR UPDATE
-- SKIP LOCKED), which the primary key's index serves; it needs no other.
--
-- For ordering by key (--relay-order-by aggregate_id), add the key column
-- and the index the relay's "oldest row of this key" check uses:
--   ALTER TABLE warren_outbox ADD COLUMN IF NOT EXISTS aggregate_id text;
--   CREATE INDEX IF NOT EXISTS warren_outbox_aggregate_id
--       ON warren_outbox (aggregate_id, id);

-- Rows that cannot be relayed (invalid headers, an exchange name over 255
-- bytes, ...) land here with the reason; the rows behind them flow on.
-- To retry one after fixing it, insert it into warren_outbox again.
CREATE TABLE IF NOT EXISTS warren_outbox_dead (
    dead_id      bigserial   PRIMARY KEY,
    id           bigint      NOT NULL,
    message_id   text        NULL,
    exchange     text        NULL,
    routing_key  text        NULL,
    payload      bytea       NULL,
    -- Kept as text: the reason may be that it is not what the relay needs.
    headers      text        NULL,
    content_type text        NULL,
    created_at   timestamptz NULL,
    dead_at      timestamptz NOT NULL DEFAULT now(),
    reason       text        NOT NULL
);

-- One notification per inserting statement, delivered at commit (a rolled
-- back transaction notifies nobody). The relay also polls, so a missed
-- notification only costs latency.
CREATE OR REPLACE FUNCTION warren_outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('warren_outbox', TG_TABLE_NAME);
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS warren_outbox_notify ON warren_outbox;
CREATE TRIGGER warren_outbox_notify
    AFTER INSERT ON warren_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION warren_outbox_notify();
