//! The statements, one per verb, written for the store's table. Each is a single statement, so
//! each verb is one round trip and atomic without an explicit transaction.
//!
//! Time is the database's `statement_timestamp()`, not `now()`: inside the handler's
//! transaction `now()` is when the transaction began, and a lease that expired while the
//! handler ran would still look live to its completion.

/// The schema for the default table, as shipped.
pub(super) const SCHEMA: &str = include_str!("schema.sql");

/// The default table, which is also the notification channel.
pub(super) const DEFAULT_TABLE: &str = "idempotency_records";

/// Every statement the store sends, for one table.
#[derive(Debug)]
pub(super) struct Statements {
    pub(super) table: String,
    pub(super) schema: String,
    pub(super) begin: String,
    pub(super) complete: String,
    pub(super) release: String,
    pub(super) renew: String,
    pub(super) wait_on: String,
    pub(super) sweep: String,
    pub(super) completed_by: String,
    pub(super) inspect: String,
    pub(super) forget: String,
    pub(super) in_flight: String,
}

/// Whether `table` can name the table (and, unquoted, its index and notification channel).
pub(super) fn valid_table(table: &str) -> bool {
    let mut chars = table.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        // Room for the indexes' `_expires_at` and `_in_flight` within PostgreSQL's 63-byte
        // names.
        && table.len() <= 48
}

impl Statements {
    pub(super) fn new(table: &str) -> Self {
        // Quoted: a lower-case name means the same table quoted or not, and a reserved word
        // (`order`, `user`) works too. The channel is the bare name, as LISTEN quotes it.
        let t = format!("\"{table}\"");
        let channel = table;
        Self {
            table: table.to_owned(),
            schema: SCHEMA
                .replace(
                    &format!("{DEFAULT_TABLE}_expires_at"),
                    &format!("\"{table}_expires_at\""),
                )
                .replace(
                    &format!("{DEFAULT_TABLE}_in_flight"),
                    &format!("\"{table}_in_flight\""),
                )
                .replace(&format!("EXISTS {DEFAULT_TABLE}"), &format!("EXISTS {t}"))
                .replace(&format!("ON {DEFAULT_TABLE}"), &format!("ON {t}")),
            // Serves a live row (completed, or another owner's lease), or claims the key when
            // there is none or only an expired one. When two claims race for a new key, the one
            // that loses meets the winner's row in `ON CONFLICT`, finds it live, and the
            // statement returns no row: the caller runs it again and sees the winner's lease.
            // A retry with the same token after a lost answer finds its own lease in `live`.
            begin: format!(
                "WITH live AS ( \
                    SELECT owner, fingerprint, record FROM {t} \
                    WHERE key = $1 AND expires_at > statement_timestamp() \
                 ), claimed AS ( \
                    INSERT INTO {t} AS r (key, fingerprint, owner, record, expires_at, created_at, renewals) \
                    SELECT $1, $2, $3, NULL, statement_timestamp() + $4::float8 * interval '1 millisecond', statement_timestamp(), 0 \
                    WHERE NOT EXISTS (SELECT 1 FROM live) \
                    ON CONFLICT (key) DO UPDATE SET \
                        fingerprint = EXCLUDED.fingerprint, owner = EXCLUDED.owner, record = NULL, \
                        expires_at = EXCLUDED.expires_at, created_at = EXCLUDED.created_at, renewals = 0, \
                        waited = false \
                    WHERE r.expires_at <= statement_timestamp() \
                    RETURNING r.owner \
                 ) \
                 SELECT true AS claimed, owner, NULL::bytea AS fingerprint, NULL::bytea AS record FROM claimed \
                 UNION ALL \
                 SELECT false, owner, fingerprint, record FROM live"
            ),
            // The owner's live lease; or its own completed record with the same bytes, which
            // is a retry whose first answer was lost (a different record is refused: a record
            // is final). The notice goes out when the transaction commits.
            complete: format!(
                "WITH done AS ( \
                    UPDATE {t} SET record = $3, expires_at = statement_timestamp() + $4::float8 * interval '1 millisecond' \
                    WHERE key = $1 AND owner = $2 AND expires_at > statement_timestamp() \
                        AND (record IS NULL OR record = $3) \
                    RETURNING key, waited \
                 ) \
                 SELECT CASE WHEN waited THEN pg_notify('{channel}', encode(key, 'hex'))::text END FROM done"
            ),
            release: format!(
                "WITH gone AS ( \
                    DELETE FROM {t} \
                    WHERE key = $1 AND owner = $2 AND record IS NULL AND expires_at > statement_timestamp() \
                    RETURNING key, waited \
                 ) \
                 SELECT CASE WHEN waited THEN pg_notify('{channel}', encode(key, 'hex'))::text END FROM gone"
            ),
            renew: format!(
                "UPDATE {t} SET expires_at = statement_timestamp() + $3::float8 * interval '1 millisecond', \
                    renewals = renewals + 1 \
                 WHERE key = $1 AND owner = $2 AND record IS NULL AND expires_at > statement_timestamp()"
            ),
            // A waiter marks the lease before it waits, so that its end sends a notice. The
            // mark and the owner's completion lock the row in turn: either the completion
            // sees the mark and notifies, or the mark finds the lease gone and the waiter
            // does not wait.
            wait_on: format!(
                "UPDATE {t} SET waited = true \
                 WHERE key = $1 AND record IS NULL AND expires_at > statement_timestamp() \
                 RETURNING ceil(extract(epoch FROM expires_at - statement_timestamp()) * 1000)::int8"
            ),
            completed_by: format!(
                "SELECT record IS NOT NULL FROM {t} WHERE key = $1 AND owner = $2 FOR SHARE"
            ),
            // For operators. Ages and what is left are in milliseconds by the database's clock.
            inspect: format!(
                "SELECT key, owner, fingerprint, record, renewals, \
                    (extract(epoch FROM statement_timestamp() - created_at) * 1000)::float8 AS age_ms, \
                    (extract(epoch FROM expires_at - statement_timestamp()) * 1000)::float8 AS left_ms \
                 FROM {t} WHERE key = $1 AND expires_at > statement_timestamp()"
            ),
            // Drops the record, a live lease only when forced ($2), an expired row always; a
            // forced lease wakes its waiters. Returns whether a live row went, and whether a
            // live row stays (a lease, not forced).
            //
            // The index of leases it reads is built by `migrate()` with the table; on a large
            // table that exists already, build it first with `CREATE INDEX CONCURRENTLY`.
            forget: format!(
                "WITH gone AS ( \
                    DELETE FROM {t} \
                    WHERE key = $1 AND (record IS NOT NULL OR $2 OR expires_at <= statement_timestamp()) \
                    RETURNING key, waited, record IS NULL AS lease, expires_at > statement_timestamp() AS live \
                 ), woken AS ( \
                    SELECT pg_notify('{channel}', encode(key, 'hex')) FROM gone WHERE waited AND lease AND live \
                 ) \
                 SELECT EXISTS (SELECT 1 FROM gone WHERE live) AS forgotten, \
                    EXISTS (SELECT 1 FROM gone WHERE live AND lease) AS lease, \
                    (SELECT count(*) FROM woken) AS woken, \
                    EXISTS (SELECT 1 FROM {t} WHERE key = $1 AND expires_at > statement_timestamp() \
                        AND NOT EXISTS (SELECT 1 FROM gone)) AS in_flight"
            ),
            // Live leases after the cursor, in key order, from the partial index of leases.
            in_flight: format!(
                "SELECT key, owner, fingerprint, NULL::bytea AS record, renewals, \
                    (extract(epoch FROM statement_timestamp() - created_at) * 1000)::float8 AS age_ms, \
                    (extract(epoch FROM expires_at - statement_timestamp()) * 1000)::float8 AS left_ms \
                 FROM {t} WHERE record IS NULL AND key > $1 AND expires_at > statement_timestamp() \
                 ORDER BY key LIMIT $2"
            ),
            // Bounded: at most $1 rows, skipping rows another transaction holds (a claim of
            // an expired key, another process's sweep), so no sweep waits on a lock or holds
            // many.
            sweep: format!(
                "DELETE FROM {t} WHERE key IN ( \
                    SELECT key FROM {t} WHERE expires_at <= statement_timestamp() \
                    LIMIT $1 FOR UPDATE SKIP LOCKED \
                 )"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_plain_lower_case_identifiers() {
        assert!(valid_table("idempotency_records"));
        assert!(valid_table("_shop2"));
        for bad in [
            "",
            "2shop",
            "Shop",
            "shop-records",
            "a.b",
            "x; DROP TABLE y",
            &"a".repeat(49),
        ] {
            assert!(!valid_table(bad), "{bad:?}");
        }
    }

    #[test]
    fn the_schema_is_written_for_the_table() {
        let s = Statements::new("shop_keys");
        assert!(
            s.schema
                .contains("CREATE TABLE IF NOT EXISTS \"shop_keys\" (")
        );
        assert!(
            s.schema
                .contains("\"shop_keys_expires_at\" ON \"shop_keys\"")
        );
        assert!(!s.schema.contains("EXISTS idempotency_records"));
        assert!(s.complete.contains("pg_notify('shop_keys'"));
        // A reserved word is a table name like any other, quoted.
        assert!(
            Statements::new("order")
                .begin
                .contains("INSERT INTO \"order\" AS r")
        );
    }
}
