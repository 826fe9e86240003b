//! [`PostgresStore`]: durable records in a PostgreSQL table, shared by every process that uses
//! the database.

mod builder;
mod inspect;
mod maintenance;
mod notify;
mod sql;
mod tx;

pub use self::builder::PostgresStoreBuilder;
pub use self::tx::IdempotentTx;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use sqlx::{PgPool, Row};
use tokio::time::Instant;
use tokio_util::sync::DropGuard;
use uuid::Uuid;

use self::notify::Waiters;
use self::sql::Statements;
use super::{
    BeginOutcome, Forgotten, InFlightPage, Inspected, LeaseToken, StorageKey, Store, StoreError,
};
use crate::fingerprint::Fingerprint;
use crate::metrics::{self, Event};

/// How many times a verb is sent again after it failed without effect (a restarted server
/// leaves every pooled connection broken, and each attempt drops one; a serialization failure
/// under a strict default isolation is a lost race).
const RETRIES: usize = 3;
/// How many times `begin` runs again after losing a race for a new key (each loss means the
/// winner's row is now there to be seen, so one more is nearly always enough).
const BEGIN_RACES: usize = 8;
/// Waiters look again this long after the lease's expiry, so that the database sees it expired.
const EXPIRY_SLACK: Duration = Duration::from_millis(5);

/// A [`Store`] on PostgreSQL 13 or newer: records survive restarts of the application and of
/// the database, and every process that uses the same database and table shares them.
///
/// ```no_run
/// # async fn run() -> Result<(), tower_idempotency::StoreError> {
/// use tower_idempotency::{IdempotencyLayer, PostgresStore};
///
/// let store = PostgresStore::connect("postgres://shop@127.0.0.1/shop").await?;
/// store.migrate().await?; // or run PostgresStore::SCHEMA with your own migrations
/// let layer = IdempotencyLayer::new(store);
/// # Ok(()) }
/// ```
///
/// With an application's own [`PgPool`](sqlx::PgPool), use [`PostgresStore::from_pool`]: the
/// store then shares the application's connections.
///
/// # Schema
///
/// One table (`idempotency_records` unless [`PostgresStoreBuilder::with_table`] names another),
/// created by [`migrate`](PostgresStore::migrate) or by this SQL in the application's own
/// migrations:
///
/// ```sql
#[doc = include_str!("schema.sql")]
/// ```
///
/// A row is keyed by the 32-byte storage key (a hash of namespace, scope and key: no raw key is
/// stored). `record` is `NULL` while the request is in flight; `expires_at` is the lease's end,
/// then the completed record's. Every comparison of time is made by PostgreSQL's clock, never
/// the application's, so processes whose clocks disagree still agree on who holds a lease.
///
/// # What it costs
///
/// Every verb is one statement and one round trip: a new request costs two (`begin`, then
/// `complete` or `release`), plus one `renew` every `lock_ttl / 3` while its handler runs; a
/// replay costs one. Statements are prepared once per connection.
///
/// # Waiting
///
/// A duplicate that waits marks the lease first (the row's `waited`); the completion or
/// release of a marked lease sends a `NOTIFY` on a channel named after the table, in the same
/// statement, so it is delivered when the change commits. A request that nobody waits for
/// sends none: a `NOTIFY` serialises the commits of every transaction that sends one. Each
/// store keeps one connection that `LISTEN`s and wakes the waiters of the key it names, however
/// many requests wait. A waiter
/// registers before it re-checks the lease, so a completion between a duplicate's `begin` and
/// its wait is not missed; a wait is capped by the lease's remaining life, so a lease whose
/// owner died is taken over when it expires. When the listening connection is lost, every
/// waiter looks again, and until it is back they look every poll interval (500 ms by default,
/// [`PostgresStoreBuilder::with_poll_interval`]).
///
/// # Expiry
///
/// A row past `expires_at` is never served: `begin` treats it as absent and claims it again.
/// A background task deletes such rows every minute
/// ([`PostgresStoreBuilder::with_sweep_interval`]), at most 1000 per statement and skipping
/// rows other transactions hold, so a sweep never waits on a lock nor holds many. Several
/// processes sweeping the same table do not get in each other's way.
///
/// # Failures and restarts
///
/// Each step is bounded by a timeout (2 s by default, [`PostgresStoreBuilder::with_timeout`]);
/// a database that cannot be reached or does not answer in time is
/// [`StoreError::Unavailable`], answered by the layer with a 503 (or, with `fail_open`, by
/// running the request untracked). A verb whose connection broke (a restarted server leaves
/// every pooled connection so) is sent again on another connection; each verb is safe to send
/// twice (a `begin` again with the same owner token finds its own lease, a `complete` its own
/// record). A record that cannot be decoded is [`StoreError::Corrupt`]: the layer answers 500
/// `record-corrupt` and counts it, never failing open.
///
/// What survives is what PostgreSQL keeps: with its defaults (`fsync`, `synchronous_commit`
/// on), every lease and record the store acknowledged survives a crash of the database. A
/// crash of the application leaves its lease to expire, and the next attempt runs again: at
/// least once, unless the handler's writes and the record commit together, which is what
/// transactional mode does.
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    sql: Statements,
    timeout: Duration,
    poll_interval: Duration,
    waiters: Arc<Waiters>,
    /// Stops the listener and the sweeper when the last clone of the store is dropped.
    _tasks: DropGuard,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("table", &self.inner.sql.table)
            .field("timeout", &self.inner.timeout)
            .field("poll_interval", &self.inner.poll_interval)
            .field("listening", &self.inner.waiters.listening())
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// The schema of the default table, for teams that run their own migrations.
    pub const SCHEMA: &'static str = sql::SCHEMA;

    /// Connects to the database named by `url` (`postgres://user:password@host:port/db`, and
    /// every option libpq's URLs take, such as `sslmode`) with the default options.
    ///
    /// Fails with [`StoreError::Unavailable`] when the URL is malformed or the database cannot
    /// be reached. The table must exist: call [`migrate`](Self::migrate) once, or create it
    /// with [`SCHEMA`](Self::SCHEMA).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::builder().connect(url).await
    }

    /// A store on the application's own pool, with the default options.
    pub fn from_pool(pool: PgPool) -> Self {
        Self::builder().from_pool(pool)
    }

    /// A builder with the default options.
    pub fn builder() -> PostgresStoreBuilder {
        PostgresStoreBuilder::new()
    }

    /// The pool the store runs on: the application may run its own queries on it.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The store's table.
    pub fn table(&self) -> &str {
        &self.inner.sql.table
    }

    /// Creates the table and its index when they do not exist. Safe to call from many
    /// processes at once: they take turns under an advisory lock.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let lock = format!("tower-idempotency {}", self.inner.sql.table);
        let migrate = maintenance::migrate(&self.inner.pool, lock, &self.inner.sql.schema);
        match tokio::time::timeout(self.inner.timeout * 5, migrate).await {
            Ok(result) => result.map_err(|e| self.error(e)),
            Err(_) => Err(timed_out()),
        }
    }

    /// Deletes expired rows now, in bounded batches, and returns how many went. The store
    /// also does this by itself in the background.
    pub async fn sweep(&self) -> Result<u64, StoreError> {
        maintenance::sweep(&self.inner.pool, &self.inner.sql.sweep, self.inner.timeout)
            .await
            .map_err(|e| self.error(e))
    }

    /// Runs one statement with the step's timeout, again on another connection when its
    /// connection broke.
    async fn run<T, F, Fut>(&self, mut statement: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        let deadline = Instant::now() + self.inner.timeout;
        let mut retries = 0;
        loop {
            match tokio::time::timeout_at(deadline, statement()).await {
                Err(_) => return Err(timed_out()),
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(e)) if retries < RETRIES && retriable(&e) => {
                    retries += 1;
                    metrics::count(Event::StoreRetried);
                    tracing::debug!(error = %e, "idempotency store: a step failed without effect; sending again");
                }
                Ok(Err(e)) => return Err(self.error(e)),
            }
        }
    }

    fn error(&self, e: sqlx::Error) -> StoreError {
        match &e {
            sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
                StoreError::Corrupt(e.to_string())
            }
            sqlx::Error::Database(db) if db.code().as_deref() == Some("42P01") => {
                StoreError::Unavailable(
                    format!(
                        "the table {} does not exist: call PostgresStore::migrate, or create it with PostgresStore::SCHEMA ({db})",
                        self.inner.sql.table
                    )
                    .into(),
                )
            }
            _ => StoreError::Unavailable(Box::new(e)),
        }
    }

    /// Marks the live lease under `key` as waited for, and returns how long it still lives;
    /// `None` when there is none.
    async fn wait_on(&self, key: &StorageKey) -> Result<Option<Duration>, StoreError> {
        let millis: Option<i64> = self
            .run(|| {
                sqlx::query_scalar(&self.inner.sql.wait_on)
                    .bind(&key.0[..])
                    .fetch_optional(&self.inner.pool)
            })
            .await?;
        Ok(millis.map(|ms| Duration::from_millis(ms.max(0).unsigned_abs())))
    }
}

/// Whether the statement failed without effect for a reason that another try may not meet:
/// its connection broke, or (under a stricter default isolation than READ COMMITTED) it lost
/// a race with a concurrent statement on the same row.
fn retriable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) => true,
        // 57P01 admin_shutdown, 57P02 crash_shutdown, 57P03 cannot_connect_now: the server
        // is going down or coming up; the pool drops such connections. 40001
        // serialization_failure, 40P01 deadlock_detected: the statement was rolled back.
        sqlx::Error::Database(db) => matches!(
            db.code().as_deref(),
            Some("57P01" | "57P02" | "57P03" | "40001" | "40P01")
        ),
        _ => false,
    }
}

fn timed_out() -> StoreError {
    StoreError::Unavailable("PostgreSQL did not answer in time".into())
}

fn config_error(why: impl Into<String>) -> StoreError {
    StoreError::Unavailable(
        format!("invalid PostgreSQL store configuration: {}", why.into()).into(),
    )
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn owner(token: LeaseToken) -> Uuid {
    Uuid::from_u128(token.0)
}

#[async_trait]
impl Store for PostgresStore {
    async fn begin(
        &self,
        key: &StorageKey,
        fingerprint: &Fingerprint,
        lease_ttl: Duration,
    ) -> Result<BeginOutcome, StoreError> {
        let token = LeaseToken::random();
        for _ in 0..BEGIN_RACES {
            let row = self
                .run(|| {
                    sqlx::query(&self.inner.sql.begin)
                        .bind(&key.0[..])
                        .bind(&fingerprint.0[..])
                        .bind(owner(token))
                        .bind(millis(lease_ttl))
                        .fetch_optional(&self.inner.pool)
                })
                .await?;
            let Some(row) = row else {
                // Lost a race for a new key to a claim that committed meanwhile: look again.
                continue;
            };
            return begin_outcome(&row, token).map_err(|e| self.error(e));
        }
        Err(StoreError::Unavailable(
            "begin kept losing races for the same key".into(),
        ))
    }

    async fn complete(
        &self,
        key: &StorageKey,
        token: LeaseToken,
        record: Bytes,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let rows = self
            .run(|| {
                sqlx::query(&self.inner.sql.complete)
                    .bind(&key.0[..])
                    .bind(owner(token))
                    .bind(&record[..])
                    .bind(millis(ttl))
                    .fetch_all(&self.inner.pool)
            })
            .await?;
        Ok(!rows.is_empty())
    }

    async fn release(&self, key: &StorageKey, token: LeaseToken) -> Result<bool, StoreError> {
        let rows = self
            .run(|| {
                sqlx::query(&self.inner.sql.release)
                    .bind(&key.0[..])
                    .bind(owner(token))
                    .fetch_all(&self.inner.pool)
            })
            .await?;
        Ok(!rows.is_empty())
    }

    async fn renew(
        &self,
        key: &StorageKey,
        token: LeaseToken,
        lease_ttl: Duration,
    ) -> Result<bool, StoreError> {
        let done = self
            .run(|| {
                sqlx::query(&self.inner.sql.renew)
                    .bind(&key.0[..])
                    .bind(owner(token))
                    .bind(millis(lease_ttl))
                    .execute(&self.inner.pool)
            })
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn wait(&self, key: &StorageKey, timeout: Duration) -> Result<(), StoreError> {
        if timeout.is_zero() {
            return Ok(());
        }
        let deadline = Instant::now() + timeout;
        // Registered and enabled before looking at the lease: a notice from here on wakes it.
        let waiting = self.inner.waiters.register(*key);
        let notified = waiting.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let left = match self.wait_on(key).await {
            Ok(Some(left)) => left,
            Ok(None) => return Ok(()),
            // The mark waits on the row's lock while the owner commits, and a slow commit can
            // outlast the step: a spurious return, after a poll interval, lets the caller look
            // again with `begin`, which reports a real outage as one.
            Err(_) => {
                tokio::time::sleep_until(deadline.min(Instant::now() + self.inner.poll_interval))
                    .await;
                return Ok(());
            }
        };
        let mut until = deadline.min(Instant::now() + left + EXPIRY_SLACK);
        if !self.inner.waiters.listening() {
            until = until.min(Instant::now() + self.inner.poll_interval);
        }
        let _ = tokio::time::timeout_at(until, notified).await;
        Ok(())
    }

    fn transaction_source(&self) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        Some(self.inner.clone())
    }

    async fn inspect(&self, key: &StorageKey) -> Result<Option<Inspected>, StoreError> {
        self.inspect_row(key).await
    }

    async fn forget(&self, key: &StorageKey, force: bool) -> Result<Forgotten, StoreError> {
        self.forget_row(key, force).await
    }

    async fn in_flight(
        &self,
        after: Option<&StorageKey>,
        limit: usize,
    ) -> Result<InFlightPage, StoreError> {
        self.in_flight_rows(after, limit).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.run(|| sqlx::query("SELECT 1").execute(&self.inner.pool))
            .await
            .map(|_| ())
    }
}

/// What `begin`'s row says.
fn begin_outcome(
    row: &sqlx::postgres::PgRow,
    token: LeaseToken,
) -> Result<BeginOutcome, sqlx::Error> {
    let claimed: bool = row.try_get("claimed")?;
    let found_owner: Uuid = row.try_get("owner")?;
    if claimed || found_owner == owner(token) {
        return Ok(BeginOutcome::Acquired(token));
    }
    let record: Option<Vec<u8>> = row.try_get("record")?;
    if let Some(record) = record {
        return Ok(BeginOutcome::Completed(Bytes::from(record)));
    }
    let fingerprint: Vec<u8> = row.try_get("fingerprint")?;
    let fingerprint: [u8; 32] = fingerprint.try_into().map_err(|f: Vec<u8>| {
        sqlx::Error::Decode(format!("a fingerprint of {} bytes instead of 32", f.len()).into())
    })?;
    Ok(BeginOutcome::InFlight {
        fingerprint: Fingerprint(fingerprint),
    })
}
