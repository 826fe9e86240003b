//! The store's errors that are not about a record: a Redis that cannot be reached or does not
//! answer in time, and a configuration that cannot work.

use crate::store::StoreError;

pub(super) fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(Box::new(e))
}

pub(super) fn timed_out() -> StoreError {
    StoreError::Unavailable("Redis did not answer in time".into())
}

pub(super) fn config_error(why: impl Into<String>) -> StoreError {
    StoreError::Unavailable(format!("invalid Redis store configuration: {}", why.into()).into())
}
