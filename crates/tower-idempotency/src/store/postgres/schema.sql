-- The table of idempotency records for tower-idempotency's PostgresStore (PostgreSQL 13 or newer).
-- `idempotency_records` is the default name; PostgresStoreBuilder::with_table names another.
CREATE TABLE IF NOT EXISTS idempotency_records (
    -- SHA-256 of (namespace, scope, key): no raw key is ever stored.
    key         bytea       PRIMARY KEY CHECK (octet_length(key) = 32),
    -- SHA-256 of the request that took the lease.
    fingerprint bytea       NOT NULL CHECK (octet_length(fingerprint) = 32),
    -- The lease's owner token; kept on the completed record, so that an owner whose first
    -- completion landed but whose answer was lost recognises its own record.
    owner       uuid        NOT NULL,
    -- The encoded response; NULL while the request is in flight.
    record      bytea,
    -- By the database's clock: the lease's end while in flight, the record's end once completed.
    -- A row past it is never served, and the sweep deletes it.
    expires_at  timestamptz NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    renewals    integer     NOT NULL DEFAULT 0,
    -- Set by a duplicate that waits for this lease, so that its completion or release sends
    -- a NOTIFY; a request nobody waits for sends none (NOTIFY serialises commits).
    waited      boolean     NOT NULL DEFAULT false
);
CREATE INDEX IF NOT EXISTS idempotency_records_expires_at ON idempotency_records (expires_at);
-- The requests in flight, for operators: a lease is a row without a record.
CREATE INDEX IF NOT EXISTS idempotency_records_in_flight ON idempotency_records (key) WHERE record IS NULL;
