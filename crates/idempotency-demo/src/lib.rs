//! A small shop that shows `tower-idempotency` end to end.
//!
//! `GET /` serves an order form that carries a fresh idempotency key in a hidden input, so a
//! double-clicked "Place order" creates one order. `POST /api/orders` takes JSON and an
//! `Idempotency-Key` header, for API clients, and answers `201 Created` with the order and its
//! `Location`, `/api/orders/{id}`; `GET` there answers the order as JSON, and `GET /api/orders`
//! every order.

mod ledger;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use minijinja::{Environment, context};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tower_idempotency::{IdempotencyLayer, ProblemDetails};

use crate::ledger::{Ledger, Placed, ShopTx};

/// The products the shop sells: (name, price in cents).
pub const PRODUCTS: &[(&str, u64)] = &[("Coffee beans", 1_450), ("Teapot", 3_900), ("Mug", 1_200)];

/// An order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Order {
    /// Its number, from 1.
    pub id: u64,
    /// What was bought.
    pub product: String,
    /// How many.
    pub quantity: u32,
    /// What it cost, in cents.
    pub total_cents: u64,
}

#[derive(Deserialize)]
struct OrderForm {
    product: String,
    quantity: u32,
}

/// What a client sends to place an order.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct NewOrder {
    /// One of [`PRODUCTS`].
    pub product: String,
    /// From 1 to 100.
    pub quantity: u32,
}

/// Why an order was not placed.
enum PlaceError {
    /// The order itself is wrong: 422, kept for replay like any answer.
    Refused(String),
    /// The orders cannot be written now: 503, not kept, so a retry places it (and, in a
    /// transaction, nothing of this attempt is kept either).
    Unavailable(String),
}

/// The shop's state: its orders and templates.
#[derive(Clone)]
pub struct Shop {
    ledger: Ledger,
    templates: Arc<Environment<'static>>,
    /// How long an order takes to confirm after it is charged (a stand-in for a payment
    /// provider's round trip), so that duplicates really overlap with the original.
    pub work: Duration,
}

impl Shop {
    /// A shop whose orders take `work` to place, kept in memory.
    pub fn new(work: Duration) -> Self {
        Self {
            ledger: Ledger::Memory(Arc::default()),
            templates: Arc::new(templates()),
            work,
        }
    }

    /// A shop whose orders are kept in PostgreSQL (the table `shop_orders`, created when
    /// missing). With `transactional`, the idempotency layer's store is a `PostgresStore` on
    /// the same database, and each order is inserted in the request's transaction, committed
    /// with its idempotency record or not at all; without, each order commits by itself before
    /// its record is stored elsewhere, so a crash between the two makes the retry order again.
    pub async fn on_postgres(
        pool: PgPool,
        transactional: bool,
        work: Duration,
    ) -> Result<Self, String> {
        let ledger = Ledger::postgres(pool, transactional)
            .await
            .map_err(|e| format!("cannot create the orders' table: {e}"))?;
        Ok(Self {
            ledger,
            ..Self::new(work)
        })
    }

    /// The orders placed so far (none when they cannot be read).
    pub async fn orders(&self) -> Vec<Order> {
        self.ledger.all().await.unwrap_or_default()
    }

    async fn place(&self, new: NewOrder, tx: &mut ShopTx) -> Result<Order, PlaceError> {
        let price = PRODUCTS
            .iter()
            .find(|(name, _)| *name == new.product)
            .map(|(_, price)| *price)
            .ok_or_else(|| PlaceError::Refused(format!("unknown product {:?}", new.product)))?;
        if !(1..=100).contains(&new.quantity) {
            return Err(PlaceError::Refused(
                "quantity must be between 1 and 100".into(),
            ));
        }
        let placed = Placed {
            product: &new.product,
            quantity: new.quantity,
            total_cents: price * u64::from(new.quantity),
        };
        let order = self
            .ledger
            .add(placed, tx.0.as_mut())
            .await
            .map_err(PlaceError::Unavailable)?;
        // The card is charged; the receipt takes a while. A browser that gives up now (a
        // second click replaces the first submission) leaves a charged order behind.
        tokio::time::sleep(self.work).await;
        Ok(order)
    }

    async fn get(&self, id: u64) -> Result<Option<Order>, String> {
        self.ledger.get(id).await
    }
}

/// The shop's routes behind `layer`.
pub fn app(shop: Shop, layer: IdempotencyLayer) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/orders", post(place_form))
        .route("/orders/{id}", get(order_page))
        .route("/api/orders", post(place_json).get(list_json))
        .route("/api/orders/{id}", get(order_json))
        .layer(layer)
        .with_state(shop)
}

fn templates() -> Environment<'static> {
    let mut env = Environment::new();
    tower_idempotency::minijinja::register(&mut env);
    for (name, source) in [
        ("base.html", include_str!("../templates/base.html")),
        ("index.html", include_str!("../templates/index.html")),
        ("order.html", include_str!("../templates/order.html")),
        ("message.html", include_str!("../templates/message.html")),
    ] {
        // The templates are part of the binary and covered by its tests.
        #[allow(clippy::expect_used)]
        env.add_template(name, source)
            .expect("built-in template parses");
    }
    env
}

fn money(cents: u64) -> String {
    format!("${}.{:02}", cents / 100, cents % 100)
}

fn view(o: &Order) -> minijinja::Value {
    context! { id => o.id, product => o.product.clone(), quantity => o.quantity, total => money(o.total_cents) }
}

impl Shop {
    fn render(&self, name: &str, ctx: minijinja::Value) -> Response {
        match self
            .templates
            .get_template(name)
            .and_then(|t| t.render(ctx))
        {
            Ok(html) => Html(html).into_response(),
            Err(e) => {
                tracing::error!(error = %e, template = name, "template failed");
                (StatusCode::INTERNAL_SERVER_ERROR, "template error").into_response()
            }
        }
    }

    fn message(&self, status: StatusCode, title: &str, message: &str) -> Response {
        let mut res = self.render("message.html", context! { title, message });
        *res.status_mut() = status;
        res
    }
}

async fn index(State(shop): State<Shop>) -> Response {
    let orders = match shop.ledger.all().await {
        Ok(orders) => orders,
        Err(why) => return shop.message(StatusCode::SERVICE_UNAVAILABLE, "Try again", &why),
    };
    let products: Vec<_> = PRODUCTS
        .iter()
        .map(|(name, price)| context! { name => *name, price => money(*price) })
        .collect();
    let orders: Vec<_> = orders.iter().rev().map(view).collect();
    shop.render("index.html", context! { products, orders })
}

async fn place_form(
    State(shop): State<Shop>,
    mut tx: ShopTx,
    Form(form): Form<OrderForm>,
) -> Response {
    let new = NewOrder {
        product: form.product,
        quantity: form.quantity,
    };
    match shop.place(new, &mut tx).await {
        Ok(order) => Redirect::to(&format!("/orders/{}", order.id)).into_response(),
        Err(PlaceError::Refused(why)) => {
            shop.message(StatusCode::UNPROCESSABLE_ENTITY, "Order refused", &why)
        }
        Err(PlaceError::Unavailable(why)) => {
            shop.message(StatusCode::SERVICE_UNAVAILABLE, "Try again", &why)
        }
    }
}

async fn order_page(State(shop): State<Shop>, Path(id): Path<u64>) -> Response {
    match shop.get(id).await {
        Ok(Some(order)) => shop.render("order.html", context! { order => view(&order) }),
        Ok(None) => shop.message(StatusCode::NOT_FOUND, "Not found", "No such order."),
        Err(why) => shop.message(StatusCode::SERVICE_UNAVAILABLE, "Try again", &why),
    }
}

async fn place_json(
    State(shop): State<Shop>,
    mut tx: ShopTx,
    Json(new): Json<NewOrder>,
) -> Response {
    match shop.place(new, &mut tx).await {
        Ok(order) => (
            StatusCode::CREATED,
            [(header::LOCATION, format!("/api/orders/{}", order.id))],
            Json(order),
        )
            .into_response(),
        Err(PlaceError::Unavailable(why)) => unavailable(why),
        Err(PlaceError::Refused(why)) => problem(
            ProblemDetails::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "about:blank",
                "Order refused",
            )
            .with_detail(why),
        ),
    }
}

async fn list_json(State(shop): State<Shop>) -> Response {
    match shop.ledger.all().await {
        Ok(orders) => Json(orders).into_response(),
        Err(why) => unavailable(why),
    }
}

async fn order_json(State(shop): State<Shop>, Path(id): Path<u64>) -> Response {
    match shop.get(id).await {
        Ok(Some(order)) => Json(order).into_response(),
        Err(why) => unavailable(why),
        Ok(None) => problem(
            ProblemDetails::new(StatusCode::NOT_FOUND, "about:blank", "Not Found")
                .with_detail(format!("There is no order {id}.")),
        ),
    }
}

/// 503: the orders cannot be read now.
fn unavailable(why: String) -> Response {
    problem(
        ProblemDetails::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "about:blank",
            "Service Unavailable",
        )
        .with_detail(why)
        .with_retry_after(Duration::from_secs(1)),
    )
}

/// A problem document (RFC 9457) as the shop's answer.
fn problem(problem: ProblemDetails) -> Response {
    problem.to_response().map(Body::from)
}
