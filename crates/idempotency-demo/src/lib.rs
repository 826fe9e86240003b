//! A small shop that shows `tower-idempotency` end to end.
//!
//! `GET /` serves an order form that carries a fresh idempotency key in a hidden input, so a
//! double-clicked "Place order" creates one order. `POST /api/orders` takes JSON and an
//! `Idempotency-Key` header, for API clients.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use serde::{Deserialize, Serialize};
use tower_idempotency::{IdempotencyLayer, idempotent_input};

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

/// What a client sends to place an order.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct NewOrder {
    /// One of [`PRODUCTS`].
    pub product: String,
    /// From 1 to 100.
    pub quantity: u32,
}

/// The shop's state: its orders.
#[derive(Clone, Default)]
pub struct Shop {
    orders: Arc<Mutex<Vec<Order>>>,
    /// How long placing an order takes (a stand-in for charging a card), so that duplicates
    /// really overlap with the original.
    pub work: Duration,
}

impl Shop {
    /// A shop whose orders take `work` to place.
    pub fn new(work: Duration) -> Self {
        Self {
            orders: Arc::default(),
            work,
        }
    }

    /// The orders placed so far.
    pub fn orders(&self) -> Vec<Order> {
        self.orders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn place(&self, new: NewOrder) -> Result<Order, String> {
        let price = PRODUCTS
            .iter()
            .find(|(name, _)| *name == new.product)
            .map(|(_, price)| *price)
            .ok_or_else(|| format!("unknown product {:?}", new.product))?;
        if !(1..=100).contains(&new.quantity) {
            return Err("quantity must be between 1 and 100".into());
        }
        tokio::time::sleep(self.work).await;
        let mut orders = self.orders.lock().unwrap_or_else(|p| p.into_inner());
        let order = Order {
            id: orders.len() as u64 + 1,
            product: new.product,
            quantity: new.quantity,
            total_cents: price * u64::from(new.quantity),
        };
        orders.push(order.clone());
        Ok(order)
    }

    fn get(&self, id: u64) -> Option<Order> {
        self.orders().into_iter().find(|o| o.id == id)
    }
}

/// The shop's routes behind `layer`.
pub fn app(shop: Shop, layer: IdempotencyLayer) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/orders", post(place_form))
        .route("/orders/{id}", get(order_page))
        .route("/api/orders", post(place_json).get(list_json))
        .layer(layer)
        .with_state(shop)
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn money(cents: u64) -> String {
    format!("${}.{:02}", cents / 100, cents % 100)
}

fn page(title: &str, body: &str) -> Html<String> {
    Html(format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title} · Idempotent Shop</title>
<style>body{{font-family:system-ui,sans-serif;max-width:40rem;margin:2rem auto;padding:0 1rem}}
table{{border-collapse:collapse}}td,th{{padding:.3rem .8rem;border-bottom:1px solid #ddd;text-align:left}}
button{{font-size:1.1rem;padding:.4rem 1.2rem}}</style></head>
<body><h1><a href="/">Idempotent Shop</a></h1>{body}</body></html>"#,
        title = escape(title),
    ))
}

fn orders_table(orders: &[Order]) -> String {
    if orders.is_empty() {
        return "<p>No orders yet.</p>".into();
    }
    let rows: String = orders
        .iter()
        .rev()
        .map(|o| {
            format!(
                r#"<tr><td><a href="/orders/{id}">#{id}</a></td><td>{p}</td><td>{q}</td><td>{t}</td></tr>"#,
                id = o.id,
                p = escape(&o.product),
                q = o.quantity,
                t = money(o.total_cents)
            )
        })
        .collect();
    format!(
        "<table><tr><th>Order</th><th>Product</th><th>Qty</th><th>Total</th></tr>{rows}</table>"
    )
}

async fn index(State(shop): State<Shop>) -> Html<String> {
    let options: String = PRODUCTS
        .iter()
        .map(|(name, price)| {
            format!(
                r#"<option value="{n}">{n} ({m})</option>"#,
                n = escape(name),
                m = money(*price)
            )
        })
        .collect();
    page(
        "Order",
        &format!(
            r#"<form method="post" action="/orders">
{key}
<p><label>Product <select name="product">{options}</select></label></p>
<p><label>Quantity <input type="number" name="quantity" value="1" min="1" max="100"></label></p>
<p><button type="submit">Place order</button></p>
</form>
<h2>Orders</h2>{table}"#,
            key = idempotent_input(),
            table = orders_table(&shop.orders()),
        ),
    )
}

#[derive(Deserialize)]
struct OrderForm {
    product: String,
    quantity: u32,
}

async fn place_form(State(shop): State<Shop>, Form(form): Form<OrderForm>) -> Response {
    match shop
        .place(NewOrder {
            product: form.product,
            quantity: form.quantity,
        })
        .await
    {
        Ok(order) => Redirect::to(&format!("/orders/{}", order.id)).into_response(),
        Err(why) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            page("Order refused", &format!("<p>{}</p>", escape(&why))),
        )
            .into_response(),
    }
}

async fn order_page(State(shop): State<Shop>, Path(id): Path<u64>) -> Response {
    match shop.get(id) {
        Some(o) => page(
            &format!("Order #{}", o.id),
            &format!(
                r#"<h2 id="order">Order #{id}</h2><p>{q} × {p}, {t} charged once.</p><p><a href="/">Place another order</a></p>"#,
                id = o.id,
                q = o.quantity,
                p = escape(&o.product),
                t = money(o.total_cents)
            ),
        )
        .into_response(),
        None => (StatusCode::NOT_FOUND, page("Not found", "<p>No such order.</p>")).into_response(),
    }
}

async fn place_json(State(shop): State<Shop>, Json(new): Json<NewOrder>) -> Response {
    match shop.place(new).await {
        Ok(order) => (
            StatusCode::CREATED,
            [(header::LOCATION, format!("/api/orders/{}", order.id))],
            Json(order),
        )
            .into_response(),
        Err(why) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            [(header::CONTENT_TYPE, "application/problem+json")],
            serde_json::json!({"type": "about:blank", "title": "Order refused", "status": 422, "detail": why}).to_string(),
        )
            .into_response(),
    }
}

async fn list_json(State(shop): State<Shop>) -> Json<Vec<Order>> {
    Json(shop.orders())
}
