//! [`PostgresStore`]: durable records in a PostgreSQL table, shared by every process that uses
//! the database.

mod notify;
mod sql;
mod tx;

pub use self::tx::IdempotentTx;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Row};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use uuid::Uuid;

use self::notify::Waiters;
use self::sql::Statements;
use super::{BeginOutcome, LeaseToken, StorageKey, Store, StoreError};
use crate::fingerprint::Fingerprint;
use crate::metrics::{self, Event};

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
const DEFAULT_POOL_SIZE: u32 = 16;
const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(500);
const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(60);
/// Rows deleted per sweep statement: small enough that no sweep holds many row locks.
const SWEEP_BATCH: i64 = 1000;
/// How many times a verb is sent again after its connection failed (a restarted server leaves
/// every pooled connection broken; each attempt drops one).
const IO_RETRIES: usize = 3;
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
/// Completions and releases send a `NOTIFY` on a channel named after the table, in the same
/// statement, so it is delivered when the change commits. Each store keeps one connection that
/// `LISTEN`s and wakes the waiters of the key it names, however many requests wait. A waiter
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

/// Options for a [`PostgresStore`], from [`PostgresStore::builder`].
#[derive(Debug, Clone)]
pub struct PostgresStoreBuilder {
    table: String,
    timeout: Duration,
    pool_size: u32,
    poll_interval: Duration,
    sweep_interval: Option<Duration>,
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
        PostgresStoreBuilder {
            table: sql::DEFAULT_TABLE.to_owned(),
            timeout: DEFAULT_TIMEOUT,
            pool_size: DEFAULT_POOL_SIZE,
            poll_interval: DEFAULT_POLL_INTERVAL,
            sweep_interval: Some(DEFAULT_SWEEP_INTERVAL),
        }
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
        let migrate = migrate(&self.inner.pool, lock, &self.inner.sql.schema);
        match tokio::time::timeout(self.inner.timeout * 5, migrate).await {
            Ok(result) => result.map_err(|e| self.error(e)),
            Err(_) => Err(timed_out()),
        }
    }

    /// Deletes expired rows now, in bounded batches, and returns how many went. The store
    /// also does this by itself in the background.
    pub async fn sweep(&self) -> Result<u64, StoreError> {
        sweep(&self.inner.pool, &self.inner.sql.sweep, self.inner.timeout)
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
                Ok(Err(e)) if retries < IO_RETRIES && broken_connection(&e) => {
                    retries += 1;
                    metrics::count(Event::StoreRetried);
                    tracing::debug!(error = %e, "idempotency store: a connection broke; sending again");
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

    /// How long the live lease under `key` still lives, or `None` when there is none.
    async fn lease_left(&self, key: &StorageKey) -> Result<Option<Duration>, StoreError> {
        let millis: Option<i64> = self
            .run(|| {
                sqlx::query_scalar(&self.inner.sql.lease_left)
                    .bind(&key.0[..])
                    .fetch_optional(&self.inner.pool)
            })
            .await?;
        Ok(millis.map(|ms| Duration::from_millis(ms.max(0).unsigned_abs())))
    }
}

impl PostgresStoreBuilder {
    /// The table (default `idempotency_records`), also the name of the notification channel: a
    /// lower-case identifier of at most 48 characters. Give each application sharing a
    /// database its own, or share one to share records.
    pub fn with_table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// Bounds each step (each verb, a connection from the pool) to `timeout` (default 2 s);
    /// past it the step fails with [`StoreError::Unavailable`].
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The most connections the store's own pool opens (default 16), one more for listening.
    /// Not used with [`from_pool`](Self::from_pool), where the application sized the pool.
    pub fn with_pool_size(mut self, connections: u32) -> Self {
        self.pool_size = connections;
        self
    }

    /// How often a waiter looks again while the listening connection is down (default 500 ms).
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// How often the background task deletes expired rows (default every minute); `None`
    /// turns it off, for a deployment that sweeps by other means (see
    /// [`PostgresStore::sweep`]).
    pub fn with_sweep_interval(mut self, interval: Option<Duration>) -> Self {
        self.sweep_interval = interval;
        self
    }

    /// Connects a pool of its own to the database named by `url` and returns the store.
    ///
    /// Fails with [`StoreError::Unavailable`] when the URL or the table name is malformed or
    /// the database cannot be reached.
    pub async fn connect(self, url: &str) -> Result<PostgresStore, StoreError> {
        self.check()?;
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(config_error(
                "invalid PostgreSQL URL: it must start with postgres:// or postgresql://",
            ));
        }
        let options: PgConnectOptions = url
            .parse()
            .map_err(|e| config_error(format!("invalid PostgreSQL URL: {e}")))?;
        let pool = PgPoolOptions::new()
            .max_connections(self.pool_size.max(1))
            .acquire_timeout(self.timeout)
            // A broken connection is found by using it, and the verb is sent again on another:
            // no round trip spent checking each connection first.
            .test_before_acquire(false)
            .connect_with(options);
        let pool = match tokio::time::timeout(self.timeout * 3, pool).await {
            Ok(pool) => pool.map_err(|e| StoreError::Unavailable(Box::new(e)))?,
            Err(_) => return Err(timed_out()),
        };
        Ok(self.start(pool))
    }

    /// The store on the application's own pool. Panics never; a malformed table name is
    /// reported by the first verb instead (use [`try_from_pool`](Self::try_from_pool) to learn
    /// it at once).
    pub fn from_pool(self, pool: PgPool) -> PostgresStore {
        match self.check() {
            Ok(()) => self.start(pool),
            Err(_) => {
                let table = sql::DEFAULT_TABLE.to_owned();
                tracing::error!(table = %self.table, "idempotency store: invalid table name; using {table}");
                Self { table, ..self }.start(pool)
            }
        }
    }

    /// The store on the application's own pool, or the reason the options cannot work.
    pub fn try_from_pool(self, pool: PgPool) -> Result<PostgresStore, StoreError> {
        self.check()?;
        Ok(self.start(pool))
    }

    fn check(&self) -> Result<(), StoreError> {
        if !sql::valid_table(&self.table) {
            return Err(config_error(format!(
                "the table name {:?} is not a lower-case identifier of at most 48 characters",
                self.table
            )));
        }
        Ok(())
    }

    /// Starts the listener and the sweeper. Must run inside a tokio runtime.
    fn start(self, pool: PgPool) -> PostgresStore {
        let sql = Statements::new(&self.table);
        let waiters = Arc::new(Waiters::default());
        let stop = CancellationToken::new();
        tokio::spawn(notify::listen(
            pool.clone(),
            sql.table.clone(),
            waiters.clone(),
            stop.clone(),
        ));
        if let Some(every) = self.sweep_interval {
            tokio::spawn(sweep_every(
                pool.clone(),
                sql.sweep.clone(),
                every,
                self.timeout,
                stop.clone(),
            ));
        }
        PostgresStore {
            inner: Arc::new(Inner {
                pool,
                sql,
                timeout: self.timeout,
                poll_interval: self.poll_interval,
                waiters,
                _tasks: stop.drop_guard(),
            }),
        }
    }
}

/// Runs the schema in one transaction, under an advisory lock so that processes migrating at
/// once take turns (`CREATE ... IF NOT EXISTS` alone races on the catalog).
///
/// Boxed, so that the future is known to be `Send` where it is made: spawning a caller's
/// future otherwise trips the compiler's inference over the executor's lifetimes.
fn migrate<'a>(
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

async fn sweep(pool: &PgPool, statement: &str, timeout: Duration) -> Result<u64, sqlx::Error> {
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

async fn sweep_every(
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

/// Whether the statement failed because its connection did, so that another may succeed.
fn broken_connection(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) => true,
        // 57P01 admin_shutdown, 57P02 crash_shutdown, 57P03 cannot_connect_now: the server
        // is going down or coming up; the pool drops such connections.
        sqlx::Error::Database(db) => {
            matches!(db.code().as_deref(), Some("57P01" | "57P02" | "57P03"))
        }
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
        let Some(left) = self.lease_left(key).await? else {
            return Ok(());
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
