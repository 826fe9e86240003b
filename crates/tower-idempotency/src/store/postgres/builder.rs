//! [`PostgresStoreBuilder`]: the store's options, and starting its background tasks.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio_util::sync::CancellationToken;

use super::maintenance::sweep_every;
use super::notify::{self, Waiters};
use super::sql::{self, Statements};
use super::{Inner, PostgresStore, config_error, timed_out};
use crate::store::StoreError;

pub(super) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
pub(super) const DEFAULT_POOL_SIZE: u32 = 16;
pub(super) const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(500);
pub(super) const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Options for a [`PostgresStore`], from [`PostgresStore::builder`].
#[derive(Debug, Clone)]
pub struct PostgresStoreBuilder {
    table: String,
    timeout: Duration,
    pool_size: u32,
    poll_interval: Duration,
    sweep_interval: Option<Duration>,
}

impl PostgresStoreBuilder {
    /// The default options.
    pub(super) fn new() -> Self {
        Self {
            table: sql::DEFAULT_TABLE.to_owned(),
            timeout: DEFAULT_TIMEOUT,
            pool_size: DEFAULT_POOL_SIZE,
            poll_interval: DEFAULT_POLL_INTERVAL,
            sweep_interval: Some(DEFAULT_SWEEP_INTERVAL),
        }
    }

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
            // One more for the listener, which keeps one of the pool's connections.
            .max_connections(self.pool_size.max(1) + 1)
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

    /// The store on the application's own pool, which also lends one connection for good to
    /// the store's listener. A malformed table name is logged and the default table used
    /// instead (use [`try_from_pool`](Self::try_from_pool) to get the error). Must be called
    /// inside a tokio runtime: it starts the listener and the sweeper there.
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
