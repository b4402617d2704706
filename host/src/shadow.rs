//! The shadow store: content-addressed, read-only copies of plugin libraries.
//!
//! Workers never load the path cargo writes to. Overwriting a library that a process has mapped
//! crashes that process (SIGSEGV/SIGBUS), and a load racing a build may see half a file. So the
//! master copies the plugin into `<state>/plugins/<name>-<hash>.so` (written to a temp file, then
//! renamed, so a reader sees all of it or nothing) and workers load that copy. The same content
//! always gets the same name, which is also the plugin's version as `host status` shows it.
//!
//! `history.json` beside the copies remembers, per service, the live version, the versions that
//! were live before (oldest first), which of them proved healthy and which failed, and the last
//! reloads and rollbacks: `host rollback` still has somewhere to go after a master restart, and
//! a version that crash-loops after a restart can return to the last healthy one.

use std::{
    collections::{HashMap, HashSet},
    fmt, fs,
    io::{self, Write},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::protocol::RolloutEvent;

/// How many reloads and rollbacks the history file keeps (all services together).
const KEEP_EVENTS: usize = 200;

/// One stored version of a plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginVersion {
    /// The full SHA-256 of the library, in hex.
    pub hash: String,
    /// The library as the user built it.
    pub source: PathBuf,
    /// The read-only copy workers load.
    pub path: PathBuf,
    pub size: u64,
    pub stored_at: SystemTime,
}

impl PluginVersion {
    /// The short hash users see (7 hex digits, as git shows commits).
    pub fn short(&self) -> &str {
        &self.hash[..7]
    }
}

impl fmt::Display for PluginVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.short())
    }
}

/// The store, a directory owned by one master.
#[derive(Debug, Clone)]
pub struct ShadowStore {
    dir: PathBuf,
}

impl ShadowStore {
    pub fn new(dir: PathBuf) -> ShadowStore {
        ShadowStore { dir }
    }

    /// Copies `source` into the store (if this content is not there yet) and returns its version.
    /// A file that is not a shared library for this machine is refused with what it is.
    pub fn store(&self, source: &Path) -> Result<PluginVersion, String> {
        let bytes = fs::read(source).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => format!(
                "plugin file {} does not exist; build the plugin first (cargo build) or fix the path.{}",
                source.display(),
                crate::plugin_file::missing_hint(source).unwrap_or_default()
            ),
            _ => format!("could not read plugin file {}: {e}", source.display()),
        })?;
        crate::plugin_file::check(source, &bytes)?;
        let hash = format!("{:x}", Sha256::digest(&bytes));
        let stem = source
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "plugin".into());
        let path = self.dir.join(format!("{stem}-{}.so", &hash[..16]));
        if !path.exists() {
            self.write_atomically(&path, &bytes)
                .map_err(|e| format!("could not copy plugin into {}: {e}", self.dir.display()))?;
        }
        Ok(PluginVersion {
            hash,
            source: source.to_path_buf(),
            path,
            size: bytes.len() as u64,
            stored_at: SystemTime::now(),
        })
    }

    fn write_atomically(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        fs::create_dir_all(&self.dir)?;
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
        tmp.write_all(bytes)?;
        tmp.as_file().sync_all()?;
        tmp.as_file()
            .set_permissions(fs::Permissions::from_mode(0o444))?;
        tmp.persist(path).map_err(|e| e.error)?;
        Ok(())
    }

    fn history_file(&self) -> PathBuf {
        self.dir.join("history.json")
    }

    /// The history as last saved; versions whose copy is gone are dropped. A missing or
    /// unreadable file is an empty history (it is a convenience, not state the host needs to
    /// run). The first format (previous versions only) still reads.
    pub fn load_history(&self) -> History {
        let Ok(text) = fs::read_to_string(self.history_file()) else {
            return History::default();
        };
        let mut history = match serde_json::from_str::<SavedFormats>(&text) {
            Ok(SavedFormats::Current(h)) => h,
            Ok(SavedFormats::First(previous)) => History {
                services: previous
                    .into_iter()
                    .map(|(name, previous)| {
                        let saved = SavedService {
                            previous,
                            ..SavedService::default()
                        };
                        (name, saved)
                    })
                    .collect(),
                events: Vec::new(),
            },
            Err(e) => {
                tracing::warn!("ignoring unreadable {}: {e}", self.history_file().display());
                return History::default();
            }
        };
        for service in history.services.values_mut() {
            service.previous.retain(|v| v.path.exists());
            service.live = service.live.take().filter(|v| v.path.exists());
        }
        history
    }

    /// Saves the history (temp file, then rename), keeping the newest events.
    pub fn save_history(&self, history: &History) {
        let skip = history.events.len().saturating_sub(KEEP_EVENTS);
        let trimmed = History {
            services: history.services.clone(),
            events: history.events[skip..].to_vec(),
        };
        let json = serde_json::to_vec_pretty(&trimmed).expect("versions serialize");
        if let Err(e) = self.write_atomically(&self.history_file(), &json) {
            tracing::warn!("could not save {}: {e}", self.history_file().display());
        }
    }

    /// Removes one stored copy (a version that a failed start stored and nothing else uses).
    pub fn remove(&self, version: &PluginVersion) {
        if version.path.starts_with(&self.dir) {
            let _ = fs::remove_file(&version.path);
        }
    }

    /// Removes every stored library not in `keep` (the history file stays). A worker that still has a removed file mapped
    /// keeps running: unlinking does not touch the mapping.
    pub fn prune(&self, keep: &HashSet<PathBuf>) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if !keep.contains(&path) && path != self.history_file() {
                if let Err(e) = fs::remove_file(&path) {
                    tracing::warn!("could not remove old plugin copy {}: {e}", path.display());
                }
            }
        }
    }
}

/// What `history.json` holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct History {
    pub services: HashMap<String, SavedService>,
    /// Reloads and rollbacks, oldest first.
    #[serde(default)]
    pub events: Vec<RolloutEvent>,
}

/// One service in `history.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SavedService {
    /// The version that was live when the history was saved.
    #[serde(default)]
    pub live: Option<PluginVersion>,
    /// Versions that were live before, oldest first.
    #[serde(default)]
    pub previous: Vec<PluginVersion>,
    /// Hashes of the versions that served through a whole probation.
    #[serde(default)]
    pub healthy: Vec<String>,
    /// Hashes of versions that were rejected or rolled back, with the reason.
    #[serde(default)]
    pub failed: HashMap<String, String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SavedFormats {
    Current(History),
    First(HashMap<String, Vec<PluginVersion>>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_content_same_copy_and_source_changes_do_not_touch_it() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("libp.so");
        fs::write(&src, elf(b"one")).unwrap();
        let store = ShadowStore::new(dir.path().join("store"));
        let a = store.store(&src).unwrap();
        let again = store.store(&src).unwrap();
        assert_eq!(a.path, again.path);
        assert_eq!(a.short().len(), 7);
        // cargo replaces the file; the copy keeps the old content.
        fs::remove_file(&src).unwrap();
        fs::write(&src, elf(b"two")).unwrap();
        let b = store.store(&src).unwrap();
        assert_ne!(a.path, b.path);
        assert_eq!(fs::read(&a.path).unwrap(), elf(b"one"));
        store.prune(&HashSet::from([b.path.clone()]));
        assert!(!a.path.exists() && b.path.exists());
    }

    #[test]
    fn history_survives_and_forgets_pruned_copies() {
        let dir = tempfile::tempdir().unwrap();
        let store = ShadowStore::new(dir.path().join("store"));
        let src = dir.path().join("libp.so");
        fs::write(&src, elf(b"one")).unwrap();
        let one = store.store(&src).unwrap();
        fs::write(&src, elf(b"two")).unwrap();
        let two = store.store(&src).unwrap();
        let saved = SavedService {
            live: Some(two.clone()),
            previous: vec![one.clone(), two.clone()],
            ..SavedService::default()
        };
        store.save_history(&History {
            services: HashMap::from([("svc".to_string(), saved)]),
            events: Vec::new(),
        });
        store.prune(&HashSet::from([two.path.clone()]));
        let loaded = store.load_history();
        assert_eq!(
            loaded.services["svc"].previous,
            vec![two.clone()],
            "the pruned copy left the history"
        );
        assert_eq!(loaded.services["svc"].live, Some(two));
    }

    /// A minimal shared-library header for this machine, followed by `tail`.
    fn elf(tail: &[u8]) -> Vec<u8> {
        let machine: u16 = match std::env::consts::ARCH {
            "aarch64" => 183,
            _ => 62,
        };
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[16..18].copy_from_slice(&3u16.to_le_bytes());
        b[18..20].copy_from_slice(&machine.to_le_bytes());
        b.extend_from_slice(tail);
        b
    }

    #[test]
    fn missing_plugin_says_to_build_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = ShadowStore::new(dir.path().into())
            .store(&dir.path().join("nope.so"))
            .unwrap_err();
        assert!(
            err.contains("does not exist; build the plugin first"),
            "{err}"
        );
    }
}
