//! What the workspace's tests (and the chaos program) share, written once:
//!
//! - [`process`]: child processes under a watchdog that kills them when the test process dies,
//!   free ports, throwaway directories;
//! - [`redis`]: real `redis-server` processes, standalone or as a Redis Cluster with replicas;
//! - [`postgres`]: real PostgreSQL servers, which tests can crash and restart;
//! - [`recording`]: a [`Store`](tower_idempotency::Store) wrapper that records every call and
//!   can fail or block chosen verbs;
//! - [`events`]: a `metrics` recorder of the layer's events, and readers of the Prometheus text
//!   the proxy exposes;
//! - [`harness`]: an axum server on a free port, a client, counting handlers, gates, and checks of
//!   problem documents;
//! - [`raw_http`]: HTTP/1.1 over raw TCP, for what a well-behaved client cannot send.
//!
//! It is not published: its helpers panic on any failure, which is what a test wants.

#![allow(
    clippy::unwrap_used,
    reason = "a test helper that cannot work fails the test"
)]

pub mod events;
pub mod harness;
pub mod postgres;
pub mod process;
pub mod raw_http;
pub mod recording;
pub mod redis;
