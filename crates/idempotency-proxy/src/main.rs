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
use server::{ClientLimits, Drained};

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
    if let Err(e) = args.validate() {
        return config_error(&e);
    }
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
    let listener = match first_listen_socket(args.listen) {
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
        .with_max_response_body(args.max_response_body)
        .with_caller_timeout(args.upstream_timeout)
        .with_namespace(args.namespace.clone())
        .with_request_body_timeout(args.client_body_timeout)
        // One bound for the process: every worker's clone of the layer shares it.
        .with_max_in_flight(args.max_in_flight as usize)
        .with_storable({
            let release = cli::ReleaseStatus::new(&args.release_status);
            move |status| !release.releases(status)
        });
    let layer = match layer.with_fingerprint_headers(args.fingerprint_header.iter().cloned()) {
        Ok(layer) => layer,
        Err(e) => return config_error(&format!("--fingerprint-header: {e}")),
    };
    let layer = match args.key_secret() {
        Some(secret) => layer.with_key_secret(secret.bytes()),
        None => layer,
    };
    let in_flight = Arc::new(InFlight::default());
    // One bound on client connections for the process, shared by every worker's accept loop.
    let limits = ClientLimits {
        header_timeout: args.client_header_timeout,
        connections: Arc::new(tokio::sync::Semaphore::new(args.max_connections as usize)),
    };

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
    let workers = args.workers.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        usize::from,
    );
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let (release, released) = tokio::sync::watch::channel(false);
    let mut running = Workers {
        stop,
        release,
        started: Vec::with_capacity(workers),
    };
    for n in 0..workers {
        // Each worker has a socket of its own on the address (SO_REUSEPORT): the kernel spreads
        // connections over them, so that no worker takes more than its share.
        let socket = match n {
            0 => listener.try_clone(),
            _ => listen_socket(listen),
        };
        let socket = match socket {
            Ok(l) => l,
            Err(e) => {
                running.stop().await;
                return config_error(&format!("--listen {listen}: {e}"));
            }
        };
        let worker = Worker {
            listener: socket,
            layer: layer.clone(),
            upstream: args.upstream.clone(),
            upstream_timeout: args.upstream_timeout,
            upstream_deadline: args.upstream_deadline,
            in_flight: in_flight.clone(),
            trust_forwarded: args.trust_forwarded,
            limits: limits.clone(),
            stopping: stopping.clone(),
            released: released.clone(),
            grace: args.shutdown_timeout,
        };
        match worker.start(n) {
            Ok(started) => running.started.push(started),
            Err(e) => {
                running.stop().await;
                eprintln!("idempotency-proxy: cannot start worker {n}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    drop(listener);
    tracing::info!(
        %listen,
        upstream = %args.upstream,
        store = %args.store,
        key_secret = args.key_secret().is_some(),
        namespace = %args.namespace,
        workers,
        max_connections = args.max_connections,
        max_in_flight = args.max_in_flight,
        trust_forwarded = args.trust_forwarded,
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

/// The first listening socket on `addr`, shared with the other workers (SO_REUSEPORT). The
/// address must be free: a plain bind is tried first, so that a second proxy started on the
/// same address fails instead of taking a share of its connections.
fn first_listen_socket(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let addr = std::net::TcpListener::bind(addr)?.local_addr()?;
    listen_socket(addr)
}

/// A listening socket on `addr` that other sockets may share (SO_REUSEPORT), non-blocking.
fn listen_socket(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)?.into_std()
}

/// The worker threads started so far.
struct Workers {
    stop: tokio::sync::watch::Sender<bool>,
    release: tokio::sync::watch::Sender<bool>,
    started: Vec<(
        tokio::sync::oneshot::Receiver<Drained>,
        std::thread::JoinHandle<()>,
    )>,
}

impl Workers {
    /// Stops every worker and waits for each to drain; then lets their runtimes go, all at
    /// once. Until then every runtime keeps running, since tasks a request spawned on one (a
    /// store connection re-made after a failure, a request its caller left) may serve the
    /// others' requests in flight.
    async fn stop(self) -> Drained {
        let _ = self.stop.send(true);
        let mut drained = Drained::Clean;
        let mut threads = Vec::with_capacity(self.started.len());
        for (done, thread) in self.started {
            if !matches!(done.await, Ok(Drained::Clean)) {
                drained = Drained::TimedOut;
            }
            threads.push(thread);
        }
        let _ = self.release.send(true);
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
        drained
    }
}

/// One worker thread: its own single-threaded runtime, its own upstream connection pool, and a
/// socket of its own on the listening address to accept from.
struct Worker {
    listener: std::net::TcpListener,
    layer: IdempotencyLayer,
    upstream: cli::Upstream,
    upstream_timeout: std::time::Duration,
    upstream_deadline: std::time::Duration,
    in_flight: Arc<InFlight>,
    trust_forwarded: bool,
    limits: ClientLimits,
    stopping: tokio::sync::watch::Receiver<bool>,
    released: tokio::sync::watch::Receiver<bool>,
    grace: std::time::Duration,
}

impl Worker {
    /// Starts the thread; the receiver resolves with how its drain ended.
    fn start(
        self,
        n: usize,
    ) -> std::io::Result<(
        tokio::sync::oneshot::Receiver<Drained>,
        std::thread::JoinHandle<()>,
    )> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (done, drained) = tokio::sync::oneshot::channel();
        let mut released = self.released.clone();
        let thread = std::thread::Builder::new()
            .name(format!("proxy-worker-{n}"))
            .spawn(move || {
                runtime.block_on(async move {
                    let outcome = self.serve().await;
                    let _ = done.send(outcome);
                    let _ = released.wait_for(|go| *go).await;
                });
            })?;
        Ok((drained, thread))
    }

    async fn serve(self) -> Drained {
        let listener = match TcpListener::from_std(self.listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "worker cannot listen");
                return Drained::TimedOut;
            }
        };
        let stack = self.layer.layer(Proxy::new(
            self.upstream,
            self.upstream_timeout,
            self.upstream_deadline,
            self.in_flight.clone(),
            self.trust_forwarded,
        ));
        let mut stopping = self.stopping;
        let stop = async move {
            let _ = stopping.wait_for(|stop| *stop).await;
        };
        server::serve(
            listener,
            stack,
            &self.layer,
            self.in_flight,
            self.limits,
            stop,
            self.grace,
        )
        .await
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
