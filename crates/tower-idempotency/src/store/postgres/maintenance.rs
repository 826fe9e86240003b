//! Keeping the table: creating it, and deleting expired rows in bounded batches.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Rows deleted per sweep statement: small enough that no sweep holds many row locks.
const SWEEP_BATCH: i64 = 1000;

/// Runs the schema in one transaction, under an advisory lock so that processes migrating at
/// once take turns (`CREATE ... IF NOT EXISTS` alone races on the catalog).
///
/// Boxed, so that the future is known to be `Send` where it is made: spawning a caller's
/// future otherwise trips the compiler's inference over the executor's lifetimes.
pub(super) fn migrate<'a>(
    pool: &'a PgPool,
    lock: String,
    schema: &'a str,
) -> futures_util::future::BoxFuture<'a, Result<(), sqlx::Error>> {
    Box::pin(async move {
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(lock)
            .execute(&mut *tx)
            .await?;
        // One statement at a time: a prepared statement holds one.
        for statement in schema.split_inclusive(";\n") {
            if statement
                .lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with("--"))
            {
                sqlx::query(statement).execute(&mut *tx).await?;
            }
        }
        tx.commit().await
    })
}

pub(super) async fn sweep(
    pool: &PgPool,
    statement: &str,
    timeout: Duration,
) -> Result<u64, sqlx::Error> {
    let mut total = 0;
    loop {
        let batch = tokio::time::timeout(
            timeout,
            sqlx::query(statement).bind(SWEEP_BATCH).execute(pool),
        )
        .await
        .map_err(|_| sqlx::Error::PoolTimedOut)??;
        total += batch.rows_affected();
        if batch.rows_affected() < SWEEP_BATCH.unsigned_abs() {
            return Ok(total);
        }
    }
}

pub(super) async fn sweep_every(
    pool: PgPool,
    statement: String,
    every: Duration,
    timeout: Duration,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        match sweep(&pool, &statement, timeout).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(rows = n, "idempotency store: swept expired records"),
            Err(e) => {
                tracing::debug!(error = %e, "idempotency store: sweep failed; trying again later")
            }
        }
    }
}
