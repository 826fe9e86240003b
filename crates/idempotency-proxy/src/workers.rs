//! The worker threads that serve requests: each has its own single-threaded runtime, its own
//! pool of upstream connections and its own socket on the listening address, so that a request
//! stays on one thread from accept to answer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tower::Layer;
use tower_idempotency::IdempotencyLayer;

use crate::cli::Args;
use crate::proxy::{InFlight, Proxy};
use crate::server::{self, ClientLimits, Drained};
use crate::upstream::Upstream;

/// Why the workers could not all start. Those that had started are stopped.
#[derive(Debug)]
pub(crate) enum StartError {
    /// Another socket on the listening address could not be opened.
    Listen(SocketAddr, std::io::Error),
    /// Worker `n`'s runtime or thread could not be made.
    Thread(usize, std::io::Error),
}

/// The first listening socket on `addr`, shared with the other workers (SO_REUSEPORT). The
/// address must be free: a plain bind is tried first, so that a second proxy started on the
/// same address fails instead of taking a share of its connections.
pub(crate) fn first_listen_socket(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let addr = std::net::TcpListener::bind(addr)?.local_addr()?;
    listen_socket(addr)
}

/// A listening socket on `addr` that other sockets may share (SO_REUSEPORT), non-blocking.
fn listen_socket(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)?.into_std()
}

/// How many workers `--workers` asks for: one per CPU unless it says otherwise.
pub(crate) fn count(args: &Args) -> usize {
    args.workers.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        usize::from,
    )
}

/// Starts `count` workers serving `layer` in front of `--upstream`, the first on `listener`
/// (from [`first_listen_socket`]), the others on sockets of their own on its address. The
/// workers share one bound on client connections (`--max-connections`) and one count of
/// upstream calls in flight, which a shutdown waits for.
pub(crate) async fn start(
    args: &Args,
    listener: std::net::TcpListener,
    layer: &IdempotencyLayer,
    count: usize,
) -> Result<Workers, StartError> {
    let listen = listener.local_addr().unwrap_or(args.listen);
    let in_flight = Arc::new(InFlight::default());
    let limits = ClientLimits {
        header_timeout: args.client_header_timeout,
        connections: Arc::new(tokio::sync::Semaphore::new(args.max_connections as usize)),
    };
    let (stop, stopping) = watch::channel(false);
    let (release, released) = watch::channel(false);
    let mut running = Workers {
        stop,
        release,
        started: Vec::with_capacity(count),
    };
    for n in 0..count {
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
                return Err(StartError::Listen(listen, e));
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
                return Err(StartError::Thread(n, e));
            }
        }
    }
    Ok(running)
}

/// The worker threads started so far.
pub(crate) struct Workers {
    stop: watch::Sender<bool>,
    release: watch::Sender<bool>,
    started: Vec<(oneshot::Receiver<Drained>, JoinHandle<()>)>,
}

impl Workers {
    /// Stops every worker and waits for each to drain; then lets their runtimes go, all at
    /// once. Until then every runtime keeps running, since tasks a request spawned on one (a
    /// store connection re-made after a failure, a request its caller left) may serve the
    /// others' requests in flight.
    pub(crate) async fn stop(self) -> Drained {
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
    upstream: Upstream,
    upstream_timeout: Duration,
    upstream_deadline: Duration,
    in_flight: Arc<InFlight>,
    trust_forwarded: bool,
    limits: ClientLimits,
    stopping: watch::Receiver<bool>,
    released: watch::Receiver<bool>,
    grace: Duration,
}

impl Worker {
    /// Starts the thread; the receiver resolves with how its drain ended.
    fn start(self, n: usize) -> std::io::Result<(oneshot::Receiver<Drained>, JoinHandle<()>)> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (done, drained) = oneshot::channel();
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
