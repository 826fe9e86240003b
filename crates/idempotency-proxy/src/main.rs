//! `idempotency-proxy`: a reverse proxy that gives any HTTP service idempotency keys.
//!
//! Put it in front of a service written in any language: every POST, PUT, PATCH or DELETE that
//! carries an idempotency key reaches the service once, and every duplicate gets the stored
//! response with `Idempotent-Replayed: true`. The contract is tower-idempotency's; this binary is
//! the CLI, a pooled keep-alive client to the upstream, a hyper server and admin endpoints
//! around it. Run `idempotency-proxy --help` for the flags.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use clap::error::ErrorKind;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tower::Layer;
use tower_idempotency::{IdempotencyLayer, OnConflict};

mod admin;
mod cli;
mod proxy;
mod server;
mod store;
mod telemetry;

use cli::{Args, ConflictMode};
use proxy::{InFlight, Proxy};
use server::Drained;

/// Exit code for a configuration error.
const CONFIG_ERROR: u8 = 2;

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) => {
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    let _ = e.print();
                    ExitCode::SUCCESS
                }
                _ => config_error(&cli::one_line(&e)),
            };
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("idempotency-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(args))
}

fn config_error(line: &str) -> ExitCode {
    eprintln!("idempotency-proxy: {line}");
    ExitCode::from(CONFIG_ERROR)
}

async fn run(args: Args) -> ExitCode {
    // Signals are caught from here on, so a SIGTERM during start-up is a clean stop too.
    let shutdown = match shutdown_signal() {
        Ok(shutdown) => shutdown,
        Err(e) => {
            eprintln!("idempotency-proxy: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let metrics = match telemetry::init_metrics() {
        Ok(handle) => handle,
        Err(e) => {
            eprintln!("idempotency-proxy: {e}");
            return ExitCode::FAILURE;
        }
    };
    let store = match store::open(&args.store).await {
        Ok(store) => store,
        Err(e) => return config_error(&e),
    };
    let listener = match TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => return config_error(&format!("--listen {}: {e}", args.listen)),
    };
    let admin_listener = match args.admin_listen {
        Some(addr) => match TcpListener::bind(addr).await {
            Ok(l) => Some(l),
            Err(e) => return config_error(&format!("--admin-listen {addr}: {e}")),
        },
        None => None,
    };
    // Logs start once the configuration is known to be good, so that a configuration error
    // stays one line, whatever the store's client logged while it failed.
    telemetry::init_logs(args.log_format);

    let layer = IdempotencyLayer::from_shared(store.clone())
        .with_ttl(args.ttl)
        .with_lock_ttl(args.lock_ttl)
        .with_wait_timeout(args.wait_timeout)
        .with_on_conflict(match args.on_conflict {
            ConflictMode::Wait => OnConflict::Wait,
            ConflictMode::Reject => OnConflict::Reject,
        })
        .with_methods(args.methods.iter().cloned())
        .with_require_key(args.require_key)
        .with_fail_open(args.fail_open)
        .with_scope_headers(args.scope_header.iter().cloned())
        .with_max_request_body(args.max_request_body)
        .with_max_response_body(args.max_response_body);
    let layer = match args.key_secret() {
        Some(secret) => layer.with_key_secret(secret.bytes()),
        None => layer,
    };
    let in_flight = Arc::new(InFlight::default());
    let stack = layer.layer(Proxy::new(
        args.upstream.clone(),
        args.upstream_timeout,
        in_flight.clone(),
    ));

    let (admin_stop, admin_stopped) = tokio::sync::watch::channel(false);
    let admin_task = admin_listener.map(|listener| {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "admin endpoints: /healthz, /metrics");
        }
        let app = admin::router(store.clone(), metrics);
        let mut stopped = admin_stopped;
        tokio::spawn(async move {
            let stop = async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
            {
                tracing::error!(error = %e, "admin server failed");
            }
        })
    });

    let listen = listener.local_addr().unwrap_or(args.listen);
    tracing::info!(
        %listen,
        upstream = %args.upstream,
        store = %args.store,
        key_secret = args.key_secret().is_some(),
        "idempotency-proxy ready"
    );
    let drained = server::serve(listener, stack, in_flight, shutdown, args.shutdown_timeout).await;
    let _ = admin_stop.send(true);
    if let Some(task) = admin_task {
        let _ = task.await;
    }
    match drained {
        Drained::Clean => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Drained::TimedOut => {
            tracing::warn!(
                timeout = ?args.shutdown_timeout,
                "stopped with requests still in flight (--shutdown-timeout)"
            );
            ExitCode::FAILURE
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT, with the signal's name. The handlers are installed
/// before this returns.
fn shutdown_signal()
-> std::io::Result<impl std::future::Future<Output = &'static str> + Send + 'static> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    })
}
