//! Who may use the admin API: a bearer token read from `token_file`, compared in constant
//! time, and a brake on whoever keeps guessing.
//!
//! The token file is checked as every secret the host trusts (`trust::check_secret_file`): no
//! other user may read or change it. A token shorter than [`MIN_TOKEN`] bytes is refused: the
//! listener may face a network, and a short token is guessed.
//!
//! A request with a wrong or missing token gets 401 and nothing else (no hint of which), and is
//! logged. After [`FREE_FAILURES`] failures in a row from one address, each further failure from
//! it waits before its 401, twice as long each time up to [`MAX_DELAY`], and the failures of one
//! address are answered one at a time: many connections in parallel do not guess faster. An
//! address is forgotten [`FORGET_AFTER`] after its last failure; the table is bounded.

use std::{
    collections::HashMap,
    net::IpAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The shortest token accepted, in bytes.
pub const MIN_TOKEN: usize = 16;
/// The longest token file read.
const MAX_TOKEN_FILE: u64 = 4096;
/// Failures in a row from one address answered at once (typos happen).
const FREE_FAILURES: u32 = 3;
const MAX_DELAY: Duration = Duration::from_secs(30);
const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);
/// Addresses remembered at most; past this, the oldest are forgotten.
const MAX_ADDRESSES: usize = 10_000;

/// The token's digest: comparing digests of equal length hides the token's length too.
#[derive(Clone)]
pub struct Token([u8; 32]);

impl Token {
    /// Reads and checks the token file.
    pub fn read(path: &Path) -> Result<Token, String> {
        use std::io::Read;
        crate::trust::check_secret_file(path, nix::unistd::geteuid(), "admin token file")?;
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_TOKEN_FILE).read_to_string(&mut text))
            .map_err(|e| format!("could not read admin token file {}: {e}", path.display()))?;
        let token = text.trim();
        if token.len() < MIN_TOKEN {
            return Err(format!(
                "the admin token in {} is {} bytes long; use at least {MIN_TOKEN} random \
                 characters (for example `openssl rand -hex 32 > {}`)",
                path.display(),
                token.len(),
                path.display()
            ));
        }
        Ok(Token(Sha256::digest(token.as_bytes()).into()))
    }

    /// Whether an `Authorization` header value carries this token.
    pub fn accepts(&self, authorization: Option<&[u8]>) -> bool {
        let given = authorization
            .and_then(|v| v.strip_prefix(b"Bearer "))
            .map(|t| t.trim_ascii())
            .unwrap_or_default();
        let digest: [u8; 32] = Sha256::digest(given).into();
        bool::from(digest.ct_eq(&self.0)) & !given.is_empty()
    }
}

/// Failures per address; see the module comment.
#[derive(Default)]
pub struct Guard {
    addresses: Mutex<HashMap<IpAddr, Arc<Address>>>,
}

#[derive(Default)]
struct Address {
    /// Held while a request from this address is judged: one at a time once it failed.
    turn: tokio::sync::Mutex<()>,
    state: Mutex<(u32, Option<Instant>)>,
}

impl Guard {
    /// Judges a request from `ip`: `accepted` says whether its token was right. A failure is
    /// logged and, past the free ones, answered late. Returns `accepted`.
    pub async fn judge(&self, ip: IpAddr, accepted: bool, what: &str) -> bool {
        let address = self.addresses.lock().unwrap().get(&ip).cloned();
        let Some(address) = address else {
            if accepted {
                return true; // the common case: no failure on record, nothing to wait for
            }
            let address = self.remember(ip);
            return self.fail(ip, &address, what).await;
        };
        let _turn = address.turn.lock().await;
        if accepted {
            self.addresses.lock().unwrap().remove(&ip);
            return true;
        }
        self.fail(ip, &address, what).await
    }

    fn remember(&self, ip: IpAddr) -> Arc<Address> {
        let mut addresses = self.addresses.lock().unwrap();
        addresses.retain(|_, a| {
            a.state
                .lock()
                .unwrap()
                .1
                .is_some_and(|t| t.elapsed() < FORGET_AFTER)
        });
        if addresses.len() >= MAX_ADDRESSES {
            let oldest = addresses
                .iter()
                .min_by_key(|(_, a)| a.state.lock().unwrap().1)
                .map(|(ip, _)| *ip);
            if let Some(oldest) = oldest {
                addresses.remove(&oldest);
            }
        }
        addresses.entry(ip).or_default().clone()
    }

    async fn fail(&self, ip: IpAddr, address: &Address, what: &str) -> bool {
        let failures = {
            let mut state = address.state.lock().unwrap();
            state.0 += 1;
            state.1 = Some(Instant::now());
            state.0
        };
        let delay = delay(failures);
        tracing::warn!(
            "admin: refused {what} from {ip}: wrong or missing token ({failures} in a row from \
             this address{})",
            if delay.is_zero() {
                String::new()
            } else {
                format!("; answering after {}", humantime::format_duration(delay))
            }
        );
        tokio::time::sleep(delay).await;
        false
    }
}

/// How long the `failures`-th failure in a row waits before its 401.
fn delay(failures: u32) -> Duration {
    if failures <= FREE_FAILURES {
        return Duration::ZERO;
    }
    let exp = (failures - FREE_FAILURES - 1).min(16);
    (Duration::from_secs(1) * 2u32.pow(exp)).min(MAX_DELAY)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn tokens_are_read_checked_and_compared() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "0123456789abcdef0123\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let token = Token::read(&path).unwrap();
        assert!(token.accepts(Some(b"Bearer 0123456789abcdef0123")));
        assert!(!token.accepts(Some(b"Bearer 0123456789abcdef012")));
        assert!(!token.accepts(Some(b"0123456789abcdef0123")));
        assert!(!token.accepts(None));

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Token::read(&path).err().unwrap();
        assert!(e.contains("chmod 600"), "{e}");

        std::fs::write(&path, "short").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = Token::read(&path).err().unwrap();
        assert!(e.contains("at least 16"), "{e}");
    }

    #[test]
    fn delays_grow_after_the_free_failures_and_cap() {
        assert_eq!(delay(3), Duration::ZERO);
        assert_eq!(delay(4), Duration::from_secs(1));
        assert_eq!(delay(5), Duration::from_secs(2));
        assert_eq!(delay(40), MAX_DELAY);
    }
}
