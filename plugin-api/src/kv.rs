//! The host's key/value store: state shared by every worker of the service, that survives
//! reloads (it lives in the host's master process, which a reload does not replace).
//!
//! Every operation is atomic, whichever worker calls it, so counters and locks work across
//! workers: [`increment`] never loses an update, and [`compare_and_swap`] changes a value only
//! if nobody changed it since it was read. Keys are strings of 1 to 256 bytes, values bytes of
//! at most 64 KiB; the store holds at most 100,000 keys (over every service) and says so when
//! it is full. A key may have a time to live. The store is in memory: a restart of the host
//! (`host stop`, `host upgrade`) empties it, so keep what must last in a database (see the
//! plugin guide: SQLite, Redis).
//!
//! ```no_run
//! # async fn handler() -> Result<(), plugin_api::kv::KvError> {
//! let visits = plugin_api::kv::increment("visits", 1).await?;
//! plugin_api::kv::set_with_ttl("last", format!("{visits}"), std::time::Duration::from_secs(60)).await?;
//! # Ok(()) }
//! ```

use std::{fmt, time::Duration};

use abi_stable::std_types::{RErr, RNone, ROk, ROption, RSome, RVec};

use crate::ffi::{kv_ops, FfiKvOp, FfiKvReply};

/// Why a key/value operation failed: the store's limit that was hit, a value that is not a
/// number for [`increment`], or no host (in unit tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvError(String);

impl fmt::Display for KvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for KvError {}

async fn call(
    op: u8,
    key: &str,
    value: Option<&[u8]>,
    expected: Option<&[u8]>,
    by: i64,
    ttl: Option<Duration>,
) -> Result<FfiKvReply, KvError> {
    let Some(kv) = crate::log::host().and_then(|h| h.kv()) else {
        return Err(KvError(
            "the host's key/value store is there only when a worker of a host that has one \
             runs the plugin"
                .into(),
        ));
    };
    let bytes = |v: Option<&[u8]>| ROption::from(v.map(RVec::from));
    let op = FfiKvOp {
        op,
        key: key.into(),
        value: bytes(value),
        expected: bytes(expected),
        by,
        ttl_ms: ttl.map(|t| t.as_millis() as u64).into(),
    };
    match kv(op).await {
        ROk(reply) => Ok(reply),
        RErr(e) => Err(KvError(e.into_string())),
    }
}

/// The value of `key`, if it is there (and has not expired).
pub async fn get(key: &str) -> Result<Option<Vec<u8>>, KvError> {
    let reply = call(kv_ops::GET, key, None, None, 0, None).await?;
    Ok(match reply.value {
        RSome(v) => Some(v.into_vec()),
        RNone => None,
    })
}

/// Sets `key` to `value`, with no time to live.
pub async fn set(key: &str, value: impl AsRef<[u8]>) -> Result<(), KvError> {
    call(kv_ops::SET, key, Some(value.as_ref()), None, 0, None)
        .await
        .map(drop)
}

/// Sets `key` to `value`; it expires after `ttl`.
pub async fn set_with_ttl(
    key: &str,
    value: impl AsRef<[u8]>,
    ttl: Duration,
) -> Result<(), KvError> {
    call(kv_ops::SET, key, Some(value.as_ref()), None, 0, Some(ttl))
        .await
        .map(drop)
}

/// Deletes `key`; whether it was there.
pub async fn delete(key: &str) -> Result<bool, KvError> {
    Ok(call(kv_ops::DELETE, key, None, None, 0, None).await?.done)
}

/// Adds `by` to the whole number `key` holds (a missing key counts as 0) and returns the new
/// number, atomically: concurrent increments from any worker are never lost.
pub async fn increment(key: &str, by: i64) -> Result<i64, KvError> {
    Ok(call(kv_ops::INCREMENT, key, None, None, by, None)
        .await?
        .number)
}

/// Sets `key` to `new` (`None`: deletes it) only if its value is `expected` (`None`: the key
/// is missing); whether it did.
pub async fn compare_and_swap(
    key: &str,
    expected: Option<&[u8]>,
    new: Option<&[u8]>,
) -> Result<bool, KvError> {
    Ok(call(kv_ops::COMPARE_AND_SWAP, key, new, expected, 0, None)
        .await?
        .done)
}

/// Gives `key` a time to live (`None`: keeps it for good); whether the key was there.
pub async fn expire(key: &str, ttl: Option<Duration>) -> Result<bool, KvError> {
    Ok(call(kv_ops::EXPIRE, key, None, None, 0, ttl).await?.done)
}
