//! The operator's verbs of a [`PostgresStore`]: one statement each.

use std::time::Duration;

use bytes::Bytes;
use sqlx::Row;
use sqlx::postgres::PgRow;
use uuid::Uuid;

use super::PostgresStore;
use crate::fingerprint::Fingerprint;
use crate::store::{
    CompletedInfo, Forgotten, InFlightPage, Inspected, LeaseInfo, LeaseToken, StorageKey,
    StoreError,
};

impl PostgresStore {
    pub(super) async fn inspect_row(
        &self,
        key: &StorageKey,
    ) -> Result<Option<Inspected>, StoreError> {
        let row = self
            .run(|| {
                sqlx::query(&self.inner.sql.inspect)
                    .bind(&key.0[..])
                    .fetch_optional(&self.inner.pool)
            })
            .await?;
        row.map(|row| inspected(&row).map_err(|e| self.error(e)))
            .transpose()
    }

    pub(super) async fn forget_row(
        &self,
        key: &StorageKey,
        force: bool,
    ) -> Result<Forgotten, StoreError> {
        let row = self
            .run(|| {
                sqlx::query(&self.inner.sql.forget)
                    .bind(&key.0[..])
                    .bind(force)
                    .fetch_one(&self.inner.pool)
            })
            .await?;
        let read = |row: &PgRow| -> Result<(bool, bool, bool), sqlx::Error> {
            Ok((
                row.try_get("forgotten")?,
                row.try_get("lease")?,
                row.try_get("in_flight")?,
            ))
        };
        Ok(match read(&row).map_err(|e| self.error(e))? {
            (true, true, _) => Forgotten::Lease,
            (true, false, _) => Forgotten::Record,
            (false, _, true) => Forgotten::InFlight,
            (false, _, false) => Forgotten::NotFound,
        })
    }

    pub(super) async fn in_flight_rows(
        &self,
        after: Option<&StorageKey>,
        limit: usize,
    ) -> Result<InFlightPage, StoreError> {
        let after_bytes: &[u8] = after.map_or(&[], |k| &k.0[..]);
        // One more than asked, to know whether a next page exists.
        let asked = i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX);
        let rows = self
            .run(|| {
                sqlx::query(&self.inner.sql.in_flight)
                    .bind(after_bytes)
                    .bind(asked)
                    .fetch_all(&self.inner.pool)
            })
            .await?;
        let mut leases = Vec::with_capacity(rows.len().min(limit));
        for row in &rows {
            if let Inspected::InFlight(lease) = inspected(row).map_err(|e| self.error(e))? {
                leases.push(lease);
            }
        }
        Ok(InFlightPage::from_sorted(leases, after, limit))
    }
}

/// What a row of `inspect` or `in_flight` says.
fn inspected(row: &PgRow) -> Result<Inspected, sqlx::Error> {
    let bytes32 = |column: &str| -> Result<[u8; 32], sqlx::Error> {
        let v: Vec<u8> = row.try_get(column)?;
        v.try_into().map_err(|v: Vec<u8>| {
            sqlx::Error::Decode(format!("a {column} of {} bytes instead of 32", v.len()).into())
        })
    };
    let age = millis(row.try_get("age_ms")?);
    let expires_in = millis(row.try_get("left_ms")?);
    let record: Option<Vec<u8>> = row.try_get("record")?;
    if let Some(record) = record {
        return Ok(Inspected::Completed(CompletedInfo {
            record: Bytes::from(record),
            age: Some(age),
            expires_in,
        }));
    }
    let owner: Uuid = row.try_get("owner")?;
    let renewals: i32 = row.try_get("renewals")?;
    Ok(Inspected::InFlight(LeaseInfo {
        key: StorageKey(bytes32("key")?),
        owner: LeaseToken(owner.as_u128()),
        fingerprint: Fingerprint(bytes32("fingerprint")?),
        age,
        renewals: u32::try_from(renewals).unwrap_or(0),
        expires_in,
    }))
}

fn millis(ms: f64) -> Duration {
    Duration::try_from_secs_f64(ms.max(0.0) / 1000.0).unwrap_or_default()
}
