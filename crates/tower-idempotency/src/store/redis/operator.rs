//! The operator's verbs of a [`RedisStore`], and the index of leases that lists the requests in
//! flight without a scan of the keyspace.
//!
//! On a standalone Redis the index is one sorted set, `<prefix>leases`, of the record keys of
//! leases (score 0, so in key order), kept by the scripts in the same step as the lease. On a
//! Redis Cluster a script cannot reach a key of another slot, so the index is sixteen sorted
//! sets, `<prefix>leases{0}` to `<prefix>leases{f}` by the storage key's first hex digit, and
//! each lease is filed and unfiled by a command of its own (`ZADD`, `ZREM`), sent beside the
//! request's step without delaying it. Either way the records are the truth and the index a
//! list of candidates: the listing reads each candidate's record and drops from the index what
//! is no longer a lease (one that expired with its owner gone). Every renewal files its lease
//! again, so an entry that went missing (on a Cluster, a process that died between taking a
//! lease and filing it, or a filing that failed) comes back within a third of the lease's TTL.

use redis::Value;

use super::RedisStore;
use super::scripts;
use crate::store::{Forgotten, InFlightPage, Inspected, StorageKey, StoreError};

/// How many index sets a Redis Cluster spreads its leases over.
const CLUSTER_SHARDS: usize = 16;
/// The fewest candidates one listing examines before it may stop short (ten times the page
/// otherwise).
const MIN_EXAMINED: usize = 1000;
const HEX: &[u8; 16] = b"0123456789abcdef";

impl RedisStore {
    /// The index a script keeps in the same step: the standalone server's only.
    pub(super) fn script_index(&self) -> Option<String> {
        (!self.inner.cluster).then(|| format!("{}leases", self.inner.prefix))
    }

    /// The index set of `key` on a Redis Cluster.
    fn shard_index(&self, shard: usize) -> String {
        format!("{}leases{{{}}}", self.inner.prefix, HEX[shard] as char)
    }

    /// On a Redis Cluster, files (or unfiles) the lease of `key` in its index set, in the
    /// background: the request does not wait for it, and a failure only leaves the listing a
    /// candidate more or less until it next runs.
    pub(super) fn file_apart(&self, key: &StorageKey, filed: bool) {
        if !self.inner.cluster {
            return;
        }
        let index = self.shard_index(usize::from(key.0[0] >> 4));
        let member = self.record_key(key);
        let cmd = if filed {
            let mut cmd = redis::cmd("ZADD");
            cmd.arg(index).arg(0).arg(member);
            cmd
        } else {
            let mut cmd = redis::cmd("ZREM");
            cmd.arg(index).arg(member);
            cmd
        };
        let connection = self.inner.connection.clone();
        let timeout = self.inner.timeout;
        tokio::spawn(async move {
            let sent = tokio::time::timeout(timeout, connection.query::<Value>(&cmd)).await;
            if !matches!(sent, Ok(Ok(_))) {
                tracing::debug!("idempotency store: the index of leases was not updated");
            }
        });
    }

    pub(super) async fn inspect_key(
        &self,
        key: &StorageKey,
    ) -> Result<Option<Inspected>, StoreError> {
        let reply: Option<(Vec<u8>, i64, String)> = self
            .inner
            .scripts
            .inspect(&self.record_key(key))
            .run(&self.inner.connection, self.inner.timeout)
            .await?;
        scripts::inspected(key, reply)
    }

    pub(super) async fn forget_key(
        &self,
        key: &StorageKey,
        force: bool,
    ) -> Result<Forgotten, StoreError> {
        let index = self.script_index();
        let answer: i64 = self
            .inner
            .scripts
            .forget(
                &self.record_key(key),
                &self.channel(key),
                index.as_deref(),
                force,
            )
            .run(&self.inner.connection, self.inner.timeout)
            .await?;
        match answer {
            1 => Ok(Forgotten::Record),
            3 => {
                self.file_apart(key, false);
                Ok(Forgotten::Lease)
            }
            2 => Ok(Forgotten::InFlight),
            _ => Ok(Forgotten::NotFound),
        }
    }

    pub(super) async fn list_in_flight(
        &self,
        after: Option<&StorageKey>,
        limit: usize,
    ) -> Result<InFlightPage, StoreError> {
        let indexes: Vec<String> = match self.script_index() {
            Some(index) => vec![index],
            None => (0..CLUSTER_SHARDS).map(|s| self.shard_index(s)).collect(),
        };
        let mut cursor = match after {
            Some(after) => format!("({}", self.record_key(after)),
            None => "-".to_owned(),
        };
        // One call examines a bounded number of candidates: after many owners died, the index
        // holds many stale entries, and a page may then come back short, with where to go on.
        let budget = limit.saturating_mul(10).max(MIN_EXAMINED);
        let mut examined = 0;
        let mut leases = Vec::new();
        let mut last_examined = None;
        loop {
            let batch = limit.saturating_add(1).clamp(16, 1000);
            let mut candidates: Vec<(String, usize)> = Vec::new();
            for (shard, index) in indexes.iter().enumerate() {
                let mut cmd = redis::cmd("ZRANGEBYLEX");
                cmd.arg(index)
                    .arg(&cursor)
                    .arg("+")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(batch);
                let members: Vec<String> = self.query(&cmd).await?;
                candidates.extend(members.into_iter().map(|m| (m, shard)));
            }
            candidates.sort_unstable();
            candidates.truncate(batch);
            let exhausted = candidates.len() < batch;
            let mut stale: Vec<Vec<&str>> = vec![Vec::new(); indexes.len()];
            for (member, shard) in &candidates {
                examined += 1;
                let key = self.storage_key_of(member);
                // A value that cannot be read is no lease to list (`begin` reports it to its
                // requests); the listing goes on without it. An outage ends the listing.
                let found = match key {
                    Some(key) => match self.inspect_key(&key).await {
                        Ok(found) => found,
                        Err(StoreError::Corrupt(_)) => None,
                        Err(e) => return Err(e),
                    },
                    None => None,
                };
                match (key, found) {
                    (Some(key), Some(Inspected::InFlight(lease))) => {
                        leases.push(lease);
                        last_examined = Some(key);
                    }
                    (key, _) => {
                        stale[*shard].push(member.as_str());
                        last_examined = key.or(last_examined);
                    }
                }
                if leases.len() > limit || examined >= budget {
                    break;
                }
            }
            for (index, members) in indexes.iter().zip(&stale) {
                self.unfile(index, members).await;
            }
            if leases.len() > limit {
                return Ok(InFlightPage::from_sorted(leases, after, limit));
            }
            // Before `exhausted`: the budget may run out inside the last batch, whose rest
            // the next page must still examine.
            if examined >= budget {
                let mut page = InFlightPage::from_sorted(leases, after, limit);
                page.next = page.next.or(last_examined);
                return Ok(page);
            }
            match candidates.last() {
                Some((last, _)) if !exhausted => cursor = format!("({last}"),
                _ => return Ok(InFlightPage::from_sorted(leases, after, limit)),
            }
        }
    }

    /// Drops from an index set the members the listing found holding no lease: on a standalone
    /// Redis in one step with a second look, so that a lease taken meanwhile stays filed; on a
    /// Cluster plainly, and a lease wrongly dropped is filed again at its next renewal.
    async fn unfile(&self, index: &str, members: &[&str]) {
        if members.is_empty() {
            return;
        }
        if self.inner.cluster {
            let mut cmd = redis::cmd("ZREM");
            cmd.arg(index).arg(members);
            let _ = self.query::<Value>(&cmd).await;
        } else {
            let _ = scripts::unfile_call(&self.inner.scripts, index, members)
                .run::<Value>(&self.inner.connection, self.inner.timeout)
                .await;
        }
    }

    /// The storage key of a record key of this store's prefix.
    fn storage_key_of(&self, record_key: &str) -> Option<StorageKey> {
        let hex = record_key
            .strip_prefix(self.inner.prefix.as_str())?
            .strip_prefix('{')?
            .strip_suffix('}')?;
        StorageKey::from_hex(hex)
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, StoreError> {
        match tokio::time::timeout(self.inner.timeout, self.inner.connection.query(cmd)).await {
            Ok(result) => result.map_err(super::error::unavailable),
            Err(_) => Err(super::error::timed_out()),
        }
    }
}
