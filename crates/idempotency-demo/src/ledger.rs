//! Where the shop's orders live: in memory, or in a PostgreSQL table, written in the request's
//! own transaction when the idempotency records are in the same database.

use std::sync::{Arc, Mutex};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::response::Response;
use sqlx::PgPool;
use tower_idempotency::IdempotentTx;

use crate::{Order, Shop};

/// The orders' table, created when missing.
const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS shop_orders (
    id          bigserial PRIMARY KEY,
    product     text      NOT NULL,
    quantity    integer   NOT NULL,
    total_cents bigint    NOT NULL,
    placed_at   timestamptz NOT NULL DEFAULT now()
)";

/// The shop's orders.
#[derive(Clone)]
pub(crate) enum Ledger {
    /// In this process, gone when it stops.
    Memory(Arc<Mutex<Vec<Order>>>),
    /// In PostgreSQL. `transactional`: the idempotency records are in the same database, and
    /// each order is inserted in the request's [`IdempotentTx`], so it commits with its record
    /// or not at all. Otherwise each order commits on its own, before its record is stored.
    Postgres { pool: PgPool, transactional: bool },
}

/// An order not yet numbered.
pub(crate) struct Placed<'a> {
    pub(crate) product: &'a str,
    pub(crate) quantity: u32,
    pub(crate) total_cents: u64,
}

impl Ledger {
    /// Orders in PostgreSQL, the table created when missing.
    pub(crate) async fn postgres(pool: PgPool, transactional: bool) -> Result<Self, sqlx::Error> {
        sqlx::query(SCHEMA).execute(&pool).await?;
        Ok(Self::Postgres {
            pool,
            transactional,
        })
    }

    /// Adds an order, in `tx` when the shop is transactional.
    pub(crate) async fn add(
        &self,
        placed: Placed<'_>,
        tx: Option<&mut IdempotentTx>,
    ) -> Result<Order, String> {
        let insert = |product: &str| {
            sqlx::query_scalar::<_, i64>(
                "INSERT INTO shop_orders (product, quantity, total_cents) VALUES ($1, $2, $3) RETURNING id",
            )
            .bind(product.to_owned())
            .bind(i32::try_from(placed.quantity).unwrap_or(i32::MAX))
            .bind(i64::try_from(placed.total_cents).unwrap_or(i64::MAX))
        };
        let id = match (self, tx) {
            (Ledger::Memory(orders), _) => {
                let mut orders = orders.lock().unwrap_or_else(|p| p.into_inner());
                let order = Order {
                    id: orders.len() as u64 + 1,
                    product: placed.product.to_owned(),
                    quantity: placed.quantity,
                    total_cents: placed.total_cents,
                };
                orders.push(order.clone());
                return Ok(order);
            }
            (Ledger::Postgres { .. }, Some(tx)) => {
                insert(placed.product).fetch_one(&mut **tx).await
            }
            (Ledger::Postgres { pool, .. }, None) => insert(placed.product).fetch_one(pool).await,
        };
        let id = id.map_err(|e| format!("the order could not be saved: {e}"))?;
        Ok(Order {
            id: id.unsigned_abs(),
            product: placed.product.to_owned(),
            quantity: placed.quantity,
            total_cents: placed.total_cents,
        })
    }

    /// Every order, oldest first.
    pub(crate) async fn all(&self) -> Result<Vec<Order>, String> {
        match self {
            Ledger::Memory(orders) => Ok(orders.lock().unwrap_or_else(|p| p.into_inner()).clone()),
            Ledger::Postgres { pool, .. } => {
                let rows: Vec<OrderRow> = sqlx::query_as(&format!("{SELECT} ORDER BY id"))
                    .fetch_all(pool)
                    .await
                    .map_err(|e| format!("the orders could not be read: {e}"))?;
                Ok(rows.into_iter().map(order).collect())
            }
        }
    }

    /// One order.
    pub(crate) async fn get(&self, id: u64) -> Result<Option<Order>, String> {
        match self {
            Ledger::Memory(orders) => Ok(orders
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .find(|o| o.id == id)
                .cloned()),
            Ledger::Postgres { pool, .. } => {
                let row: Option<OrderRow> = sqlx::query_as(&format!("{SELECT} WHERE id = $1"))
                    .bind(i64::try_from(id).unwrap_or(i64::MAX))
                    .fetch_optional(pool)
                    .await
                    .map_err(|e| format!("the order could not be read: {e}"))?;
                Ok(row.map(order))
            }
        }
    }
}

/// An order's columns, in [`SELECT`]'s order.
type OrderRow = (i64, String, i32, i64);

/// The orders' columns, for [`order`].
const SELECT: &str = "SELECT id, product, quantity, total_cents FROM shop_orders";

fn order((id, product, quantity, total_cents): OrderRow) -> Order {
    Order {
        id: id.unsigned_abs(),
        product,
        quantity: quantity.unsigned_abs(),
        total_cents: total_cents.unsigned_abs(),
    }
}

/// The request's transaction when the shop is transactional, taken from the idempotency layer;
/// nothing otherwise. Handlers are written once for both.
pub(crate) struct ShopTx(pub(crate) Option<IdempotentTx>);

impl FromRequestParts<Shop> for ShopTx {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, shop: &Shop) -> Result<Self, Response> {
        match &shop.ledger {
            Ledger::Postgres {
                transactional: true,
                ..
            } => Ok(Self(Some(
                IdempotentTx::from_request_parts(parts, shop).await?,
            ))),
            _ => Ok(Self(None)),
        }
    }
}
