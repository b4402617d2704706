//! The host's key/value store: state that outlives workers and reloads, shared by every worker
//! of a service. It lives in the master (which no reload replaces); workers reach it over their
//! channel (`FromWorker::Kv`, answered with `ToWorker::KvReply`), and plugins through
//! `plugin_api::kv`.
//!
//! Every operation is atomic, since the master applies them one at a time: get, set, delete,
//! increment, compare-and-swap, and expiry (a time to live per key, checked when the key is
//! read and swept when the store is full). Keys are per service: two services never see each
//! other's. The store is bounded ([`MAX_KEYS`], [`MAX_KEY_BYTES`], [`MAX_VALUE_BYTES`]) and
//! says which bound an operation hit. It lives in memory: it survives reloads and worker
//! crashes, not a restart or an upgrade of the master (use an external store for that: see
//! docs/plugin-guide.md).

use std::{
    collections::HashMap,
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

use crate::protocol::{KvOp, KvValue};

/// Keys held at most, over every service.
pub const MAX_KEYS: usize = 100_000;
/// The longest key.
pub const MAX_KEY_BYTES: usize = 256;
/// The largest value.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

struct Entry {
    value: Vec<u8>,
    expires: Option<Instant>,
}

impl Entry {
    fn live(&self, now: Instant) -> bool {
        self.expires.is_none_or(|at| at > now)
    }
}

/// The store (one per master).
#[derive(Default)]
pub struct Store {
    entries: Mutex<HashMap<(String, String), Entry>>,
}

/// The master's store.
pub fn store() -> &'static Store {
    static STORE: OnceLock<Store> = OnceLock::new();
    STORE.get_or_init(Store::default)
}

impl Store {
    /// Applies one operation for a worker of `service`.
    pub fn apply(&self, service: &str, op: KvOp) -> Result<KvValue, String> {
        let key = op.key();
        if key.is_empty() || key.len() > MAX_KEY_BYTES {
            return Err(format!(
                "a key must be 1 to {MAX_KEY_BYTES} bytes long, not {}",
                key.len()
            ));
        }
        let id = (service.to_string(), key.to_string());
        let now = Instant::now();
        let ttl = |ms: Option<u64>| ms.map(|ms| now + Duration::from_millis(ms));
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.get(&id).is_some_and(|e| !e.live(now)) {
            entries.remove(&id);
        }
        match op {
            KvOp::Get { .. } => Ok(KvValue::Value(entries.get(&id).map(|e| e.value.clone()))),
            KvOp::Set { value, ttl_ms, .. } => {
                check_value(&value)?;
                make_room(&mut entries, &id, now)?;
                entries.insert(
                    id,
                    Entry {
                        value,
                        expires: ttl(ttl_ms),
                    },
                );
                Ok(KvValue::Done(true))
            }
            KvOp::Delete { .. } => Ok(KvValue::Done(entries.remove(&id).is_some())),
            KvOp::Increment { by, .. } => {
                let current = match entries.get(&id) {
                    None => 0,
                    Some(e) => std::str::from_utf8(&e.value)
                        .ok()
                        .and_then(|v| v.parse::<i64>().ok())
                        .ok_or_else(|| {
                            format!("key {key:?} holds a value that is not a whole number")
                        })?,
                };
                let next = current
                    .checked_add(by)
                    .ok_or_else(|| format!("incrementing key {key:?} by {by} overflows"))?;
                make_room(&mut entries, &id, now)?;
                let expires = entries.get(&id).and_then(|e| e.expires);
                entries.insert(
                    id,
                    Entry {
                        value: next.to_string().into_bytes(),
                        expires,
                    },
                );
                Ok(KvValue::Number(next))
            }
            KvOp::CompareAndSwap {
                expected,
                new,
                ttl_ms,
                ..
            } => {
                let current = entries.get(&id).map(|e| &e.value);
                if current != expected.as_ref() {
                    return Ok(KvValue::Done(false));
                }
                match new {
                    None => {
                        entries.remove(&id);
                    }
                    Some(value) => {
                        check_value(&value)?;
                        make_room(&mut entries, &id, now)?;
                        entries.insert(
                            id,
                            Entry {
                                value,
                                expires: ttl(ttl_ms),
                            },
                        );
                    }
                }
                Ok(KvValue::Done(true))
            }
            KvOp::Expire { ttl_ms, .. } => match entries.get_mut(&id) {
                Some(e) => {
                    e.expires = ttl(ttl_ms);
                    Ok(KvValue::Done(true))
                }
                None => Ok(KvValue::Done(false)),
            },
        }
    }
}

fn check_value(value: &[u8]) -> Result<(), String> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(format!(
            "a value may be at most {MAX_VALUE_BYTES} bytes, not {}; keep large data in a \
             database or files and store its key here",
            value.len()
        ));
    }
    Ok(())
}

/// Makes sure a new key fits: expired keys are swept first.
fn make_room(
    entries: &mut HashMap<(String, String), Entry>,
    id: &(String, String),
    now: Instant,
) -> Result<(), String> {
    if entries.len() < MAX_KEYS || entries.contains_key(id) {
        return Ok(());
    }
    entries.retain(|_, e| e.live(now));
    if entries.len() < MAX_KEYS {
        return Ok(());
    }
    Err(format!(
        "the host's key/value store is full ({MAX_KEYS} keys); delete keys or give them a time \
         to live"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> String {
        k.to_string()
    }

    #[test]
    fn operations() {
        let s = Store::default();
        let get = |k: &str| s.apply("a", KvOp::Get { key: key(k) }).unwrap();
        assert_eq!(get("x"), KvValue::Value(None));
        let incr = |by| s.apply("a", KvOp::Increment { key: key("n"), by }).unwrap();
        assert_eq!(incr(2), KvValue::Number(2));
        assert_eq!(incr(-5), KvValue::Number(-3));
        assert_eq!(
            s.apply("b", KvOp::Get { key: key("n") }).unwrap(),
            KvValue::Value(None),
            "services do not share keys"
        );
        let cas = |expected: Option<&str>, new: Option<&str>| {
            s.apply(
                "a",
                KvOp::CompareAndSwap {
                    key: key("c"),
                    expected: expected.map(|v| v.as_bytes().to_vec()),
                    new: new.map(|v| v.as_bytes().to_vec()),
                    ttl_ms: None,
                },
            )
            .unwrap()
        };
        assert_eq!(cas(None, Some("1")), KvValue::Done(true));
        assert_eq!(cas(None, Some("2")), KvValue::Done(false));
        assert_eq!(cas(Some("1"), Some("2")), KvValue::Done(true));
        assert_eq!(get("c"), KvValue::Value(Some(b"2".to_vec())));
        s.apply(
            "a",
            KvOp::Set {
                key: key("t"),
                value: b"v".to_vec(),
                ttl_ms: Some(0),
            },
        )
        .unwrap();
        assert_eq!(get("t"), KvValue::Value(None), "expired at once");
        let big = s.apply(
            "a",
            KvOp::Set {
                key: key("big"),
                value: vec![0; MAX_VALUE_BYTES + 1],
                ttl_ms: None,
            },
        );
        assert!(big.unwrap_err().contains("at most"));
        let text = s.apply(
            "a",
            KvOp::Increment {
                key: key("c"),
                by: 1,
            },
        );
        assert_eq!(text, Ok(KvValue::Number(3)));
    }
}
