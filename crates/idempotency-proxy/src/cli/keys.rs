//! `idempotency-proxy keys ...`: the operator's commands, run against the store directly.
//!
//! ```text
//! idempotency-proxy keys inspect KEY [--scope VALUE]... [--body]
//! idempotency-proxy keys forget KEY [--scope VALUE]... [--force]
//! idempotency-proxy keys in-flight [--limit N]
//! ```
//!
//! Each takes `--store`, `--namespace`, `--key-secret` (or `--key-secret-file`) and
//! `--scope-header` as the server does, from the same environment variables, so that it finds
//! the server's records. Output is JSON: one object, or one per line for lists. Exit codes: 0
//! done, 1 no record under the key, 2 a usage or store error (a forget of a request in flight
//! without --force among them: it is left in place). What an operator forgets is logged on
//! standard error, with the key's hash; a forced forget of a request in flight as a warning.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tower_idempotency::admin::{Admin, MAX_PAGE, key_hash};
use tower_idempotency::{Forgotten, StorageKey};

use super::{KeyArgs, StoreArgs, StoreSpec};

/// Exit code: the key has no record.
const NO_RECORD: u8 = 1;
/// Exit code: a usage or store error, or a request in flight left in place without --force.
const ERROR: u8 = 2;

/// Ask the store about idempotency keys, forget one, list the requests in flight.
///
/// Run against the store the proxies use (`--store`, and the same --namespace, --key-secret and
/// --scope-header as theirs, or the same IDEMPOTENCY_PROXY_* environment). Output is JSON.
/// Exit codes: 0 done, 1 no record under the key, 2 a usage or store error, or (forget) a
/// request in flight left in place without --force. What is forgotten is logged on stderr.
#[derive(Parser, Debug)]
#[command(name = "idempotency-proxy keys", version)]
pub(crate) struct KeysArgs {
    #[command(subcommand)]
    command: KeysCommand,

    #[command(flatten)]
    store: StoreArgs,

    #[command(flatten)]
    keys: KeyArgs,
}

#[derive(Subcommand, Debug)]
enum KeysCommand {
    /// The record of KEY as JSON: state (in_flight, completed, unreplayable), status,
    /// fingerprint, created, expires, size, lease.
    Inspect {
        /// The idempotency key, as the client sent it.
        key: String,
        /// The request's value of a scope header, once per scope header in their order (e.g.
        /// `--scope 'Bearer abc'`); none for the global scope.
        #[arg(long, value_name = "VALUE")]
        scope: Vec<String>,
        /// Show the stored response's headers and body too.
        #[arg(long)]
        body: bool,
    },
    /// Forget the record of KEY, so that the next request with it runs again.
    Forget {
        /// The idempotency key, as the client sent it.
        key: String,
        /// The request's value of a scope header, once per scope header in their order.
        #[arg(long, value_name = "VALUE")]
        scope: Vec<String>,
        /// Forget it even while its request is in flight: the owner's outcome is then not kept,
        /// and a retry runs again, perhaps while the first still does.
        #[arg(long)]
        force: bool,
    },
    /// The requests in flight, one JSON object per line, in the order of their storage keys.
    InFlight {
        /// List at most this many.
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
    },
}

/// Runs `idempotency-proxy keys ...`; `argv` starts with the program name.
pub(crate) fn main(argv: Vec<std::ffi::OsString>) -> ExitCode {
    // `idempotency-proxy keys inspect ...` reads as `idempotency-proxy-keys inspect ...`.
    let argv = std::iter::once("idempotency-proxy keys".into()).chain(argv.into_iter().skip(2));
    let args = match KeysArgs::try_parse_from(argv) {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(ERROR),
            };
        }
    };
    // What the commands log (a forgotten record, a forced forget's warning) goes to stderr,
    // where an operator's shell history or a job's log keeps it; stdout stays JSON.
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_max_level(tracing::Level::INFO)
        .try_init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the runtime: {e}")),
    };
    runtime.block_on(run(args))
}

fn fail(line: &str) -> ExitCode {
    eprintln!("idempotency-proxy keys: {line}");
    ExitCode::from(ERROR)
}

async fn run(args: KeysArgs) -> ExitCode {
    if matches!(args.store.spec, StoreSpec::Memory) {
        return fail(
            "--store memory lives inside each proxy's process: name the shared store \
             (--store redis://... or postgres://...), or ask a proxy through its admin routes \
             (--admin-token)",
        );
    }
    // A store as it is: no table is created, so a read-only role can inspect.
    let store = match crate::store::open_existing(&args.store).await {
        Ok(store) => store,
        Err(e) => return fail(&e),
    };
    let mut admin = Admin::new(store)
        .with_namespace(args.keys.namespace.clone())
        .with_scope_headers(args.keys.scope_header.iter().cloned());
    if let Some(secret) = args.keys.key_secret() {
        admin = admin.with_key_secret(secret.bytes());
    }
    let key_of = |key: &str, scope: &[String]| -> Result<StorageKey, ExitCode> {
        admin.storage_key(key, scope).map_err(|why| fail(&why))
    };
    match &args.command {
        KeysCommand::Inspect { key, scope, body } => {
            let key = match key_of(key, scope) {
                Ok(key) => key,
                Err(code) => return code,
            };
            match admin.inspect(&key, *body).await {
                Ok(Some(doc)) => {
                    println!("{doc}");
                    ExitCode::SUCCESS
                }
                Ok(None) => no_record(&key),
                Err(e) => fail(&e.to_string()),
            }
        }
        KeysCommand::Forget { key, scope, force } => {
            let key = match key_of(key, scope) {
                Ok(key) => key,
                Err(code) => return code,
            };
            match admin.forget(&key, *force).await {
                Ok(gone @ (Forgotten::Record | Forgotten::Lease)) => {
                    println!(
                        "{}",
                        serde_json::json!({
                            "key_hash": key_hash(&key),
                            "forgotten": true,
                            "was": if gone == Forgotten::Lease { "in_flight" } else { "record" },
                        })
                    );
                    ExitCode::SUCCESS
                }
                Ok(Forgotten::NotFound) => no_record(&key),
                Ok(Forgotten::InFlight) => {
                    println!(
                        "{}",
                        serde_json::json!({
                            "key_hash": key_hash(&key),
                            "forgotten": false,
                            "state": "in_flight",
                        })
                    );
                    eprintln!(
                        "idempotency-proxy keys: the request is in flight; --force forgets it anyway"
                    );
                    ExitCode::from(ERROR)
                }
                Err(e) => fail(&e.to_string()),
            }
        }
        KeysCommand::InFlight { limit } => {
            let mut left = limit.unwrap_or(usize::MAX);
            let mut after = None;
            while left > 0 {
                let page = match admin.in_flight(after.as_ref(), left.min(MAX_PAGE)).await {
                    Ok(page) => page,
                    Err(e) => return fail(&e.to_string()),
                };
                left = left.saturating_sub(page.leases.len());
                for lease in &page.leases {
                    println!("{lease}");
                }
                match page.next {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
            ExitCode::SUCCESS
        }
    }
}

fn no_record(key: &StorageKey) -> ExitCode {
    eprintln!(
        "idempotency-proxy keys: no record for key hash {} in this scope",
        key_hash(key)
    );
    ExitCode::from(NO_RECORD)
}
