//! [`IdempotentTx`]: the handler's transaction, in which the layer also writes the record.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::StatusCode;
use sqlx::{PgConnection, Postgres, Transaction};

use super::{Inner, owner};
use crate::ProblemDetails;
use crate::store::{Completer, Completion, LeaseToken, StorageKey, StoreError};

type PgTransaction = Transaction<'static, Postgres>;

/// Where the handler's transaction goes back when the handler is done with it.
type Returned = Arc<Mutex<Option<PgTransaction>>>;

/// The handler's database transaction, in which the layer also writes the request's record:
/// the handler's writes and the stored response commit together or not at all.
///
/// An axum extractor (and, without axum, [`IdempotentTx::begin`] on the request's
/// extensions). It needs the request to pass through an
/// [`IdempotencyLayer`](crate::IdempotencyLayer) on a [`PostgresStore`](super::PostgresStore),
/// and gives a transaction on the store's pool. Run the handler's queries on it
/// (`.execute(&mut *tx)`) and return the response; do not commit it: the layer does, after
/// the handler.
///
/// ```no_run
/// use axum::{Json, Router, http::StatusCode, routing::post};
/// use tower_idempotency::{IdempotencyLayer, IdempotentTx, PostgresStore};
///
/// async fn create_order(mut tx: IdempotentTx, body: String) -> Result<(StatusCode, String), StatusCode> {
///     let id: i64 = sqlx::query_scalar("INSERT INTO orders (item) VALUES ($1) RETURNING id")
///         .bind(body)
///         .fetch_one(&mut *tx)
///         .await
///         .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
///     Ok((StatusCode::CREATED, format!("order {id}")))
/// }
///
/// # async fn run(pool: sqlx::PgPool) {
/// let store = PostgresStore::from_pool(pool);
/// let app: Router = Router::new()
///     .route("/orders", post(create_order))
///     .layer(IdempotencyLayer::new(store));
/// # }
/// ```
///
/// After the handler:
///
/// - **a response that is stored** (a 2xx, and the other storable statuses): the record is
///   written in this transaction, checked against the lease's owner, and the transaction
///   commits; only then does the caller get the response, and duplicates get its replay.
/// - **a response that is not stored** (5xx, 408, 409, 425, 429 by default), a handler error
///   or a panic: the transaction rolls back and the lease is released, so the retry runs on a
///   clean database.
/// - **a lease lost while the handler ran** (it expired and another request with the key took
///   over): the record's write finds another owner, the transaction rolls back with the
///   handler's writes, and the caller gets 409 `lease-lost`, never a response whose writes
///   were not kept.
/// - **a commit that fails**: nothing is kept, the lease is released, and the caller gets 503
///   with `Retry-After`. A commit whose answer was lost (the connection broke, or the step's
///   timeout passed) is settled by looking for the record, which commits only with the
///   handler's writes, waiting on its row lock while the commit is still under way: found,
///   the caller gets the response; not found within the timeout, a 503, and a retry replays
///   if the commit landed after all.
/// - **a request without a key**: the transaction commits after the handler when its status
///   would have been stored, and rolls back otherwise, so a handler is written once. A commit
///   whose answer was lost is a 503 here, since there is no record to look for.
///
/// The transaction runs at `READ COMMITTED`, whatever the database's default: the record's
/// row is updated by others while the handler runs (renewals, waiting duplicates), which a
/// stricter level would refuse at the record's write. It holds one connection of the pool
/// for the handler's whole run, while the store's own steps (renewals among them) take
/// others: give the pool at least twice as many connections as transactional requests run at
/// once, plus one for the store's listener.
///
/// Whatever instant the process dies at, either the record and the handler's writes are both
/// committed (the retry replays) or neither is (the retry runs once, on a clean database).
/// What lies outside the database (an e-mail sent, a charge at another company) is not undone
/// by a rollback: write such a message as a row in the same transaction (an outbox) and send
/// it from there, so it leaves exactly once with the rest.
pub struct IdempotentTx {
    tx: Option<PgTransaction>,
    returned: Returned,
    tracked: bool,
}

impl IdempotentTx {
    /// Opens the transaction for the request whose extensions these are, and hands it over to
    /// the layer, which ends it after the handler. A request has at most one.
    pub async fn begin(extensions: &http::Extensions) -> Result<Self, ProblemDetails> {
        let completion = extensions.get::<Completion>().ok_or_else(|| {
            unavailable_here(
                "IdempotentTx needs the request to pass through an IdempotencyLayer on a PostgresStore",
            )
        })?;
        let store = completion.source::<Inner>().ok_or_else(|| {
            unavailable_here(
                "IdempotentTx needs the IdempotencyLayer's store to be a PostgresStore",
            )
        })?;
        if completion.is_handed_over() {
            return Err(unavailable_here(
                "IdempotentTx was taken twice for one request, or after its handler",
            ));
        }
        // READ COMMITTED whatever the database's default: the record's row is updated by
        // others while the handler runs (renewals, a waiter's mark), and under REPEATABLE READ
        // or SERIALIZABLE the record's write would then fail as a concurrent update.
        let begin = store
            .pool
            .begin_with("BEGIN ISOLATION LEVEL READ COMMITTED");
        let tx = match tokio::time::timeout(store.timeout, begin).await {
            Ok(Ok(tx)) => tx,
            Ok(Err(e)) => return Err(cannot_begin(&store, &e.to_string())),
            Err(_) => return Err(cannot_begin(&store, "PostgreSQL did not answer in time")),
        };
        let returned = Returned::default();
        let completer = PgCompleter {
            store: store.clone(),
            returned: returned.clone(),
        };
        if completion.hand_over(Box::new(completer)).is_err() {
            return Err(unavailable_here(
                "IdempotentTx was taken twice for one request",
            ));
        }
        Ok(Self {
            tx: Some(tx),
            returned,
            tracked: completion.is_tracked(),
        })
    }

    /// Whether the request carries a key, so that its record is written in this transaction.
    pub fn is_tracked(&self) -> bool {
        self.tracked
    }
}

impl std::fmt::Debug for IdempotentTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotentTx")
            .field("tracked", &self.tracked)
            .finish_non_exhaustive()
    }
}

impl Deref for IdempotentTx {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        self.tx
            .as_ref()
            .expect("the transaction is held until drop")
    }
}

impl DerefMut for IdempotentTx {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.tx
            .as_mut()
            .expect("the transaction is held until drop")
    }
}

impl Drop for IdempotentTx {
    /// Gives the transaction back to the layer, which ends it.
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            *self.returned.lock().unwrap_or_else(PoisonError::into_inner) = Some(tx);
        }
    }
}

impl<S: Send + Sync> axum_core::extract::FromRequestParts<S> for IdempotentTx {
    type Rejection = axum_core::response::Response;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        Self::begin(&parts.extensions)
            .await
            .map_err(axum_core::response::IntoResponse::into_response)
    }
}

fn unavailable_here(why: &'static str) -> ProblemDetails {
    ProblemDetails::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "urn:tower-idempotency:problem:transaction-unavailable",
        "The handler's transaction cannot be opened here",
    )
    .with_detail(why)
}

/// The layer's own 503 `store-unavailable`, saying why.
fn cannot_begin(store: &Inner, why: &str) -> ProblemDetails {
    crate::Problem::StoreUnavailable {
        retry_after: store.timeout,
    }
    .details()
    .with_detail(format!("Cannot begin the handler's transaction: {why}"))
}

/// Ends the handler's transaction for the layer.
struct PgCompleter {
    store: Arc<Inner>,
    returned: Returned,
}

impl PgCompleter {
    fn take(&self) -> Result<PgTransaction, StoreError> {
        self.returned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or_else(|| {
                StoreError::Unavailable(
                    "the handler kept its IdempotentTx past its end; nothing was committed".into(),
                )
            })
    }
}

#[async_trait]
impl Completer for PgCompleter {
    async fn complete(
        self: Box<Self>,
        key: StorageKey,
        token: LeaseToken,
        record: Bytes,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let tx = self.take()?;
        let store = self.store.clone();
        let written = tokio::time::timeout(
            store.timeout,
            complete_in(tx, &store, key, token, record, ttl),
        )
        .await;
        match written {
            Ok(Ok(Written::Committed)) => Ok(true),
            Ok(Ok(Written::NotOwner)) => Ok(false),
            Ok(Err(e)) => {
                // The commit's answer may be lost while the commit itself landed: the record
                // commits only with the handler's writes, so finding it settles which.
                if super::retriable(&e) && committed(&store, &key, token).await {
                    return Ok(true);
                }
                Err(StoreError::Unavailable(Box::new(e)))
            }
            Err(_) => {
                if committed(&store, &key, token).await {
                    return Ok(true);
                }
                Err(StoreError::Unavailable(
                    "PostgreSQL did not commit in time".into(),
                ))
            }
        }
    }

    async fn commit(self: Box<Self>) -> Result<(), StoreError> {
        let tx = self.take()?;
        match tokio::time::timeout(self.store.timeout, tx.commit()).await {
            Ok(result) => result.map_err(|e| StoreError::Unavailable(Box::new(e))),
            Err(_) => Err(StoreError::Unavailable(
                "PostgreSQL did not commit in time".into(),
            )),
        }
    }

    async fn roll_back(self: Box<Self>) {
        if let Ok(tx) = self.take() {
            // Dropping it would roll back too, but later, when the connection is next used.
            let _ = tokio::time::timeout(self.store.timeout, tx.rollback()).await;
        }
    }
}

enum Written {
    Committed,
    NotOwner,
}

/// Writes the record in the handler's transaction and commits, or rolls back when the lease
/// is another owner's. Boxed, so that the future is known to be `Send` where it is made.
fn complete_in(
    mut tx: PgTransaction,
    store: &Inner,
    key: StorageKey,
    token: LeaseToken,
    record: Bytes,
    ttl: Duration,
) -> futures_util::future::BoxFuture<'_, Result<Written, sqlx::Error>> {
    Box::pin(async move {
        let rows = sqlx::query(&store.sql.complete)
            .bind(&key.0[..])
            .bind(owner(token))
            .bind(&record[..])
            .bind(super::millis(ttl))
            .fetch_all(&mut *tx)
            .await?;
        if rows.is_empty() {
            tx.rollback().await?;
            return Ok(Written::NotOwner);
        }
        tx.commit().await?;
        Ok(Written::Committed)
    })
}

/// Whether `token`'s record under `key` is committed.
async fn committed(store: &Inner, key: &StorageKey, token: LeaseToken) -> bool {
    let look = sqlx::query_scalar::<_, bool>(&store.sql.completed_by)
        .bind(&key.0[..])
        .bind(owner(token))
        .fetch_optional(&store.pool);
    matches!(
        tokio::time::timeout(store.timeout, look).await,
        Ok(Ok(Some(true)))
    )
}
