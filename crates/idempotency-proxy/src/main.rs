//! `idempotency-proxy`: a reverse proxy that gives any HTTP service idempotency keys.
//!
//! Put it in front of a service written in any language: every POST, PUT, PATCH or DELETE that
//! carries an idempotency key reaches the service once, and every duplicate gets the stored
//! response with `Idempotent-Replayed: true`. The contract is tower-idempotency's; this binary is
//! the CLI, a pooled keep-alive client to the upstream, a hyper server and admin endpoints
//! around it. Run `idempotency-proxy --help` for the flags.

use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

mod admin;
mod cli;
mod layer;
mod proxy;
mod server;
mod store;
mod telemetry;
mod upstream;
mod workers;

use cli::{Args, OtlpEndpoint};
use server::Drained;
use workers::StartError;

/// The allocator: a request's many small, short-lived allocations (header maps, buffers, the
/// futures of its tasks) cost less with mimalloc's per-thread heaps than with glibc's malloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for a configuration error.
const CONFIG_ERROR: u8 = 2;

fn main() -> ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == "keys") {
        return cli::keys::main(argv);
    }
    let args = match Args::try_parse_from(argv) {
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
    if let Err(e) = args.validate() {
        return config_error(&e);
    }
    let otlp = match args.otlp_traces(|name| std::env::var(name).ok()) {
        Ok(otlp) => otlp,
        Err(e) => return config_error(&e),
    };
    // This runtime runs the signals, the admin endpoints and the store's connections; the
    // requests are served by the worker threads `run` starts.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("idempotency-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(args, otlp))
}

fn config_error(line: &str) -> ExitCode {
    eprintln!("idempotency-proxy: {line}");
    ExitCode::from(CONFIG_ERROR)
}

/// Serves until a signal; `otlp` is where traces go, if anywhere.
async fn run(args: Args, otlp: Option<OtlpEndpoint>) -> ExitCode {
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
    let listener = match workers::first_listen_socket(args.listen) {
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
    // stays one line, whatever the store's client logged while it failed. The last spans are
    // sent when `_tracing` is dropped, on the way out.
    let _tracing = match telemetry::init(args.log_format, otlp.as_ref()) {
        Ok(tracing) => tracing,
        Err(e) => return config_error(&e),
    };

    let layer = match layer::from_args(&args, store.clone()) {
        Ok(layer) => layer,
        Err(e) => return config_error(&e),
    };

    let (admin_stop, admin_stopped) = tokio::sync::watch::channel(false);
    let admin_task = admin_listener.map(|listener| {
        let keys = args
            .admin_token()
            .map(|token| (admin::keys(&layer, &args), token.bytes().to_vec()));
        if let Ok(addr) = listener.local_addr() {
            match keys {
                Some(_) => tracing::info!(%addr, "admin endpoints: /healthz, /metrics, /keys/{{key}}, /in-flight"),
                None => tracing::info!(%addr, "admin endpoints: /healthz, /metrics"),
            }
        }
        let app = admin::router(store.clone(), metrics, keys);
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
    let workers = workers::count(&args);
    let running = match workers::start(&args, listener, &layer, workers).await {
        Ok(running) => running,
        Err(StartError::Listen(addr, e)) => return config_error(&format!("--listen {addr}: {e}")),
        Err(StartError::Thread(n, e)) => {
            eprintln!("idempotency-proxy: cannot start worker {n}: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        %listen,
        upstream = %args.upstream,
        store = %args.store,
        key_secret = args.keys.key_secret().is_some(),
        namespace = %args.keys.namespace,
        workers,
        max_connections = args.max_connections,
        max_in_flight = args.max_in_flight,
        trust_forwarded = args.trust_forwarded,
        otlp = otlp.as_ref().map(tracing::field::display),
        "idempotency-proxy ready"
    );
    let signal = shutdown.await;
    tracing::info!(
        signal,
        "shutting down: no new connections; waiting for requests in flight"
    );
    let drained = running.stop().await;
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
