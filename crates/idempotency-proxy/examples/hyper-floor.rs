//! The least a reverse proxy built on hyper and tokio can do, for the benchmarks to measure the
//! proxy against (`scripts/bench-floor`): what hyper's HTTP/1 costs on both sides, with none of
//! the proxy's own work.
//!
//! Built like the proxy (the release profile, mimalloc, one single-threaded runtime per worker
//! thread, each with its own `SO_REUSEPORT` socket, hyper's server and client connections with
//! `writev(false)`), it leaves out everything else: each client connection gets one upstream
//! connection of its own, opened when it is accepted (no pool, no lock), and a request goes to
//! the upstream as hyper parsed it, its headers untouched (no `Host` set, no hop-by-hop headers
//! removed, no `X-Forwarded-*` added), and its answer comes back the same way. No idempotency
//! layer, no metrics, no timeouts, no limits. It is a yardstick, not a proxy to run.
//!
//! ```text
//! cargo run --release -p idempotency-proxy --example hyper-floor -- \
//!     --listen 127.0.0.1:8080 --upstream 127.0.0.1:3000 [--workers 2] [--auto]
//! ```
//!
//! `--auto` serves client connections with hyper-util's HTTP/1-or-2 server, as the proxy does,
//! instead of hyper's HTTP/1 server alone.

use std::net::SocketAddr;
use std::sync::Arc;

use clap::Parser;
use hyper::Request;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Mutex;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The least a reverse proxy on hyper can do: a yardstick for the benchmarks, not a proxy to run.
#[derive(Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// The upstream's address.
    #[arg(long)]
    upstream: SocketAddr,
    /// Worker threads (default: one per CPU).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    workers: Option<u16>,
    /// Serve with hyper-util's HTTP/1-or-2 server, as the proxy does.
    #[arg(long)]
    auto: bool,
}

fn main() {
    let args = Arc::new(Args::parse());
    let workers = args.workers.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        usize::from,
    );
    let threads: Vec<_> = (0..workers)
        .map(|n| {
            let args = args.clone();
            std::thread::Builder::new()
                .name(format!("floor-worker-{n}"))
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("a runtime");
                    if let Err(e) = rt.block_on(worker(&args)) {
                        eprintln!("hyper-floor: worker {n}: {e}");
                        std::process::exit(1);
                    }
                })
                .expect("a worker thread")
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

async fn worker(args: &Args) -> std::io::Result<()> {
    let socket = match args.listen {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(args.listen)?;
    let listener = socket.listen(1024)?;
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1.writev(false);
    let mut auto = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    auto.http1().writev(false);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let upstream = match connect(args.upstream).await {
            Ok(tx) => Arc::new(Mutex::new(tx)),
            Err(e) => {
                eprintln!("hyper-floor: upstream: {e}");
                continue;
            }
        };
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let upstream = upstream.clone();
            async move {
                let mut tx = upstream.lock().await;
                tx.ready().await?;
                tx.send_request(req).await
            }
        });
        let io = TokioIo::new(stream);
        if args.auto {
            let conn = auto.serve_connection(io, service).into_owned();
            tokio::spawn(async move {
                let _ = conn.await;
            });
        } else {
            let conn = http1.serve_connection(io, service);
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
    }
}

async fn connect(addr: SocketAddr) -> Result<SendRequest<Incoming>, Box<dyn std::error::Error>> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut builder = hyper::client::conn::http1::Builder::new();
    builder.writev(false);
    let (tx, conn) = builder.handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(tx)
}
