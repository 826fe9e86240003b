//! The Lua scripts behind the verbs (the `*.lua` files beside this one): the `EVALSHA` each
//! verb sends, with its keys and arguments in the order the script reads them, how it is run,
//! and what its answer means.
//!
//! A record's value starts with a tag: `L` for a lease (`L`, the owner token, the request's
//! fingerprint, then `<granted ms>,<renewals>` in ASCII), `C` for a completed record (`C`, the
//! encoded record).

use std::time::Duration;

use bytes::Bytes;
use redis::{Cmd, ErrorKind, FromRedisValue, Script, ServerErrorKind, ToRedisArgs, Value};

use super::connection::{AckedConnections, Connection};
use super::error::{timed_out, unavailable};
use crate::config::MAX_DURATION;
use crate::fingerprint::Fingerprint;
use crate::store::{
    BeginOutcome, CompletedInfo, Inspected, LeaseInfo, LeaseToken, StorageKey, StoreError,
};

/// The longest expiry passed to Redis, in milliseconds: [`MAX_DURATION`], well within what
/// `PX` takes without overflowing Redis's clock.
const MAX_PX: u64 = MAX_DURATION.as_millis() as u64;

const TAG_LEASE: u8 = b'L';
const TAG_COMPLETED: u8 = b'C';
/// `begin`'s answer for a lease without an expiry.
const TAG_NO_EXPIRY: u8 = b'E';

/// The scripts, and the command they announce changes with.
pub(super) struct Scripts {
    begin: Script,
    complete: Script,
    release: Script,
    renew: Script,
    probe: Script,
    inspect: Script,
    forget: Script,
    unfile: Script,
    /// `PUBLISH`, or `SPUBLISH` on a Redis Cluster, so that a notice stays on the key's shard.
    publish: &'static str,
}

impl Scripts {
    pub(super) fn new(cluster: bool) -> Self {
        Self {
            begin: Script::new(include_str!("begin.lua")),
            complete: Script::new(include_str!("complete.lua")),
            release: Script::new(include_str!("release.lua")),
            renew: Script::new(include_str!("renew.lua")),
            probe: Script::new(include_str!("probe.lua")),
            inspect: Script::new(include_str!("inspect.lua")),
            forget: Script::new(include_str!("forget.lua")),
            unfile: Script::new(include_str!("unfile.lua")),
            publish: if cluster { "SPUBLISH" } else { "PUBLISH" },
        }
    }

    /// Loads every script, so that the first request does not pay for it.
    pub(super) async fn load(
        &self,
        connection: &Connection,
        timeout: Duration,
    ) -> Result<(), StoreError> {
        let all = [
            &self.begin,
            &self.complete,
            &self.release,
            &self.renew,
            &self.probe,
            &self.inspect,
            &self.forget,
            &self.unfile,
        ];
        for script in all {
            tokio::time::timeout(timeout, connection.load(script))
                .await
                .map_err(|_| timed_out())?
                .map_err(unavailable)?;
        }
        Ok(())
    }

    /// Finds the completed record, reports the request in flight, or grants `token` a lease.
    /// Its answer goes to [`begin_outcome`]. `index`: the index of leases the script keeps, on
    /// a standalone Redis.
    pub(super) fn begin(
        &self,
        record_key: &str,
        index: Option<&str>,
        token: LeaseToken,
        fingerprint: &Fingerprint,
        lease_ttl: Duration,
    ) -> ScriptCall<'_> {
        let mut lease = Vec::with_capacity(1 + 16 + 32);
        lease.extend_from_slice(&lease_prefix(token));
        lease.extend_from_slice(&fingerprint.0);
        ScriptCall::new(&self.begin, &with_index(&[record_key], index))
            .arg(lease)
            .arg(millis(lease_ttl))
    }

    /// Replaces `token`'s lease with `record` and wakes the waiters. Its answer goes to
    /// [`completed`].
    pub(super) fn complete(
        &self,
        record_key: &str,
        channel: &str,
        index: Option<&str>,
        token: LeaseToken,
        record: &Bytes,
        ttl: Duration,
    ) -> ScriptCall<'_> {
        let mut value = Vec::with_capacity(1 + record.len());
        value.push(TAG_COMPLETED);
        value.extend_from_slice(record);
        ScriptCall::new(&self.complete, &with_index(&[record_key, channel], index))
            .arg(&lease_prefix(token)[..])
            .arg(value)
            .arg(millis(ttl))
            .arg(self.publish)
    }

    /// Drops `token`'s lease and wakes the waiters; answers 1, or 0 when the lease is not
    /// `token`'s.
    pub(super) fn release(
        &self,
        record_key: &str,
        channel: &str,
        index: Option<&str>,
        token: LeaseToken,
    ) -> ScriptCall<'_> {
        ScriptCall::new(&self.release, &with_index(&[record_key, channel], index))
            .arg(&lease_prefix(token)[..])
            .arg(self.publish)
    }

    /// Extends `token`'s lease and tells the waiters its new lifetime; answers 1, or 0 when the
    /// lease is not `token`'s.
    pub(super) fn renew(
        &self,
        record_key: &str,
        channel: &str,
        index: Option<&str>,
        token: LeaseToken,
        lease_ttl: Duration,
    ) -> ScriptCall<'_> {
        ScriptCall::new(&self.renew, &with_index(&[record_key, channel], index))
            .arg(&lease_prefix(token)[..])
            .arg(millis(lease_ttl))
            .arg(self.publish)
    }

    /// How long the lease under `record_key` still lives. Its answer goes to
    /// [`lease_remaining`].
    pub(super) fn probe(&self, record_key: &str) -> ScriptCall<'_> {
        ScriptCall::new(&self.probe, &[record_key])
    }

    /// The value under `record_key`, its `PTTL` and Redis's clock. Its answer goes to
    /// [`inspected`].
    pub(super) fn inspect(&self, record_key: &str) -> ScriptCall<'_> {
        ScriptCall::new(&self.inspect, &[record_key])
    }

    /// Drops the record, a lease only with `force`; answers 1 (a record gone), 3 (a lease
    /// gone), 0 (none) or 2 (a lease left in place).
    pub(super) fn forget(
        &self,
        record_key: &str,
        channel: &str,
        index: Option<&str>,
        force: bool,
    ) -> ScriptCall<'_> {
        ScriptCall::new(&self.forget, &with_index(&[record_key, channel], index))
            .arg(if force { "1" } else { "0" })
            .arg(self.publish)
    }
}

/// Drops from `index` those of `record_keys` that hold no lease, in one step with the look.
pub(super) fn unfile_call<'a>(
    scripts: &'a Scripts,
    index: &str,
    record_keys: &[&str],
) -> ScriptCall<'a> {
    let mut keys = vec![index];
    keys.extend_from_slice(record_keys);
    ScriptCall::new(&scripts.unfile, &keys)
}

/// A script's keys, with the index of leases last when there is one.
fn with_index<'a>(keys: &[&'a str], index: Option<&'a str>) -> Vec<&'a str> {
    let mut all = keys.to_vec();
    all.extend(index);
    all
}

/// What `inspect` answered for `key`: the live record, or `None`.
pub(super) fn inspected(
    key: &StorageKey,
    reply: Option<(Vec<u8>, i64, String)>,
) -> Result<Option<Inspected>, StoreError> {
    let Some((value, pttl, now)) = reply else {
        return Ok(None);
    };
    let expires_in = match pttl {
        -1 => {
            return Err(StoreError::Corrupt(
                "a record without an expiry, not written by this store".to_owned(),
            ));
        }
        ms if ms <= 0 => return Ok(None),
        ms => Duration::from_millis(ms.unsigned_abs()),
    };
    let now: u64 = now
        .parse()
        .map_err(|_| StoreError::Corrupt(format!("Redis's clock read {now:?}")))?;
    match value.first() {
        Some(&TAG_COMPLETED) => Ok(Some(Inspected::Completed(CompletedInfo {
            record: Bytes::from(value).slice(1..),
            age: None,
            expires_in,
        }))),
        Some(&TAG_LEASE) if value.len() >= 49 => {
            let token = u128::from_be_bytes(value[1..17].try_into().unwrap_or_default());
            let fingerprint: [u8; 32] = value[17..49].try_into().unwrap_or_default();
            // `<granted>,<renewals>`: absent on a lease an earlier version wrote.
            let meta = std::str::from_utf8(&value[49..]).unwrap_or_default();
            let (granted, renewals) = meta
                .split_once(',')
                .and_then(|(g, r)| Some((g.parse::<u64>().ok()?, r.parse::<u32>().ok()?)))
                .unwrap_or((now, 0));
            Ok(Some(Inspected::InFlight(LeaseInfo {
                key: *key,
                owner: LeaseToken(token),
                fingerprint: Fingerprint(fingerprint),
                age: Duration::from_millis(now.saturating_sub(granted)),
                renewals,
                expires_in,
            })))
        }
        _ => Err(StoreError::Corrupt(format!(
            "a value of {} bytes that is neither a lease nor a completed record",
            value.len()
        ))),
    }
}

/// One run of a script: its `EVALSHA`, and the script to load should Redis have forgotten it (a
/// restart, `SCRIPT FLUSH`, a new master).
pub(super) struct ScriptCall<'a> {
    script: &'a Script,
    evalsha: Cmd,
}

impl<'a> ScriptCall<'a> {
    fn new(script: &'a Script, keys: &[&str]) -> Self {
        let mut evalsha = redis::cmd("EVALSHA");
        evalsha.arg(script.get_hash()).arg(keys.len()).arg(keys);
        Self { script, evalsha }
    }

    fn arg(mut self, arg: impl ToRedisArgs) -> Self {
        self.evalsha.arg(arg);
        self
    }

    /// Runs the script on `connection` within `timeout`.
    pub(super) async fn run<T: FromRedisValue>(
        &self,
        connection: &Connection,
        timeout: Duration,
    ) -> Result<T, StoreError> {
        let call = async {
            match connection.query(&self.evalsha).await {
                Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    connection.load(self.script).await?;
                    connection.query(&self.evalsha).await
                }
                other => other,
            }
        };
        match tokio::time::timeout(timeout, call).await {
            Ok(result) => result.map_err(script_failed),
            Err(_) => Err(timed_out()),
        }
    }

    /// Runs the script followed on the same connection by `WAIT` for the replicas: one round
    /// trip. Returns the script's answer and how many replicas acknowledged every write made so
    /// far on that connection (so the script's own write too).
    ///
    /// On a Redis Cluster the pipeline goes where its `EVALSHA` goes (the master of the key's
    /// slot, following MOVED and ASK): redis-rs routes a pipeline by its first command with a
    /// key, and a keyless `WAIT`, which sent alone it would fan out to every master, goes along.
    pub(super) async fn run_acked(
        self,
        acked: &AckedConnections,
        timeout: Duration,
    ) -> Result<(Value, u32), StoreError> {
        let (connection, acks) = (acked.next(), &acked.acks);
        let script = self.script;
        let mut pipe = redis::pipe();
        pipe.add_command(self.evalsha)
            .cmd("WAIT")
            .arg(acks.replicas)
            .arg(millis(acks.timeout));
        let call = async {
            match connection.pipeline::<(Value, u32)>(&pipe).await {
                Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    connection.load(script).await?;
                    connection.pipeline(&pipe).await
                }
                other => other,
            }
        };
        match tokio::time::timeout(timeout, call).await {
            Ok(result) => result.map_err(script_failed),
            Err(_) => Err(timed_out()),
        }
    }
}

/// Whether `begin` granted the lease. The script answers Lua's `false`: nil in RESP2, and
/// possibly a boolean on a RESP3 connection.
pub(super) fn granted(reply: &Value) -> bool {
    matches!(reply, Value::Nil | Value::Boolean(false))
}

/// What `begin` answered: the lease is `token`'s, the request is completed, or another owner's
/// request is in flight.
pub(super) fn begin_outcome(reply: Value, token: LeaseToken) -> Result<BeginOutcome, StoreError> {
    match reply {
        ref reply if granted(reply) => Ok(BeginOutcome::Acquired(token)),
        Value::BulkString(found) => decode_found(found),
        other => Err(StoreError::Corrupt(format!(
            "unexpected reply to begin: {other:?}"
        ))),
    }
}

/// The value `begin` found at the record's key.
fn decode_found(found: Vec<u8>) -> Result<BeginOutcome, StoreError> {
    if found == [TAG_NO_EXPIRY] {
        return Err(no_expiry());
    }
    match found.first() {
        Some(&TAG_COMPLETED) => Ok(BeginOutcome::Completed(Bytes::from(found).slice(1..))),
        Some(&TAG_LEASE) => match <[u8; 32]>::try_from(&found[1..]) {
            Ok(fingerprint) => Ok(BeginOutcome::InFlight {
                fingerprint: Fingerprint(fingerprint),
            }),
            Err(_) => Err(StoreError::Corrupt(format!(
                "a lease of {} bytes",
                found.len()
            ))),
        },
        _ => Err(StoreError::Corrupt(
            "a value that is neither a lease nor a completed record".to_owned(),
        )),
    }
}

/// `complete`'s answer as a number, when it came back from a pipeline undecoded.
pub(super) fn complete_reply(reply: Value) -> Result<i64, StoreError> {
    i64::from_redis_value(reply)
        .map_err(|e| StoreError::Corrupt(format!("unexpected reply to complete: {e}")))
}

/// Whether `complete` stored the record: 1, or 2 when this very record was stored already, by
/// an earlier attempt whose answer was lost. 0 means the caller no longer owns the lease.
pub(super) fn completed(reply: i64) -> bool {
    matches!(reply, 1 | 2)
}

/// What `probe` answered (the lease's `PTTL`): how long it still lives, or `None` when there is
/// no live lease.
pub(super) fn lease_remaining(pttl: i64) -> Result<Option<Duration>, StoreError> {
    if pttl == -1 {
        return Err(no_expiry());
    }
    Ok(u64::try_from(pttl)
        .ok()
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis))
}

/// `L` and the owner token: the first 17 bytes of a lease's value, which `complete`, `release`
/// and `renew` compare with the stored lease to act only for its owner.
fn lease_prefix(token: LeaseToken) -> [u8; 17] {
    let mut out = [0u8; 17];
    out[0] = TAG_LEASE;
    out[1..].copy_from_slice(&token.0.to_be_bytes());
    out
}

/// A duration as Redis's milliseconds: at least 1 (0 means "no expiry" or "forever" to Redis),
/// at most [`MAX_PX`].
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_PX)
}

/// A script's error: [`StoreError::Corrupt`] when a record's key holds a value of another type
/// (another tool's data: not an outage, and the same on every retry), else unavailable.
fn script_failed(e: redis::RedisError) -> StoreError {
    // Redis 7 passes the code of a failed `redis.call` on; Redis 6 wraps it in an ERR message.
    let wrong_type = e.code() == Some("WRONGTYPE") || e.to_string().contains("WRONGTYPE");
    if wrong_type {
        return StoreError::Corrupt(format!("a record's key holds a value of another type: {e}"));
    }
    unavailable(e)
}

/// A lease that never expires: every lease this store writes has a TTL, so another tool wrote
/// it (or removed its expiry), and nobody would ever complete or release it. Waiting for it
/// would last until the caller's wait timeout, two round trips at a time.
fn no_expiry() -> StoreError {
    StoreError::Corrupt("a lease without an expiry, not written by this store".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_tagged() {
        let fp = [9u8; 32];
        let mut lease = vec![TAG_LEASE];
        lease.extend_from_slice(&fp);
        assert!(matches!(
            decode_found(lease),
            Ok(BeginOutcome::InFlight { fingerprint }) if fingerprint.0 == fp
        ));
        assert!(matches!(
            decode_found(b"Cabc".to_vec()),
            Ok(BeginOutcome::Completed(b)) if &b[..] == b"abc"
        ));
        assert!(decode_found(b"Xabc".to_vec()).is_err());
        assert_eq!(lease_prefix(LeaseToken(1))[16], 1);
        assert_eq!(millis(Duration::ZERO), 1);
    }
}
