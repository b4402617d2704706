//! The worker's side of the host's key/value store (`crate::kv` in the master): the
//! `HostApi::kv` callback a plugin calls, which sends the operation to the master on the
//! worker's channel and returns a future for the answer, and the answers' delivery.
//!
//! The future is polled on the plugin's threads, so it waits on a oneshot channel only (no
//! timer or I/O of the host's runtime); a master that never answers is covered by the
//! request's `handler_timeout`, and every waiting call fails when the channel closes.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
};

use abi_stable::std_types::{RErr, ROk, ROption, RResult, RString};
use async_ffi::{FfiFuture, FutureExt};
use plugin_api::ffi::{kv_ops, FfiKvOp, FfiKvReply};
use tokio::sync::oneshot;

use super::link::Link;
use crate::protocol::{FromWorker, KvOp, KvValue};

type Waiting = HashMap<u64, oneshot::Sender<Result<KvValue, String>>>;

static WAITING: Mutex<Option<Waiting>> = Mutex::new(None);
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// `HostApi::kv`: one operation, answered by the master.
pub extern "C" fn call(op: FfiKvOp) -> FfiFuture<RResult<FfiKvReply, RString>> {
    let op = match from_ffi(op) {
        Ok(op) => op,
        Err(e) => return std::future::ready(RErr(e.into())).into_ffi(),
    };
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = oneshot::channel();
    WAITING
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(HashMap::new)
        .insert(id, tx);
    let sent = Link::global().is_some_and(|link| link.send(&FromWorker::Kv { id, op }));
    if !sent {
        forget(id);
        let e = "could not reach the master for the key/value store";
        return std::future::ready(RErr(e.into())).into_ffi();
    }
    async move {
        match rx.await {
            Ok(Ok(value)) => ROk(to_ffi(value)),
            Ok(Err(e)) => RErr(e.into()),
            Err(_) => RErr("the master went away before it answered".into()),
        }
    }
    .into_ffi()
}

/// Delivers the master's answer to operation `id`.
pub fn answer(id: u64, result: Result<KvValue, String>) {
    if let Some(tx) = forget(id) {
        let _ = tx.send(result);
    }
}

/// Fails every operation still waiting (the channel to the master closed).
pub fn fail_all() {
    if let Some(waiting) = WAITING.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
        waiting.clear();
    }
}

fn forget(id: u64) -> Option<oneshot::Sender<Result<KvValue, String>>> {
    WAITING
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_mut()?
        .remove(&id)
}

fn from_ffi(op: FfiKvOp) -> Result<KvOp, String> {
    let key = op.key.into_string();
    let ttl_ms = op.ttl_ms.into_option();
    let bytes = |v: ROption<abi_stable::std_types::RVec<u8>>| v.into_option().map(|v| v.into_vec());
    Ok(match op.op {
        kv_ops::GET => KvOp::Get { key },
        kv_ops::SET => KvOp::Set {
            key,
            value: bytes(op.value).unwrap_or_default(),
            ttl_ms,
        },
        kv_ops::DELETE => KvOp::Delete { key },
        kv_ops::INCREMENT => KvOp::Increment { key, by: op.by },
        kv_ops::COMPARE_AND_SWAP => KvOp::CompareAndSwap {
            key,
            expected: bytes(op.expected),
            new: bytes(op.value),
            ttl_ms,
        },
        kv_ops::EXPIRE => KvOp::Expire { key, ttl_ms },
        other => return Err(format!("unknown key/value operation {other}")),
    })
}

fn to_ffi(value: KvValue) -> FfiKvReply {
    let (value, number, done) = match value {
        KvValue::Value(v) => (v, 0, true),
        KvValue::Number(n) => (None, n, true),
        KvValue::Done(d) => (None, 0, d),
    };
    FfiKvReply {
        value: value.map(Into::into).into(),
        number,
        done,
    }
}
