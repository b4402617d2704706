//! The shadow store: content-addressed, read-only copies of plugin libraries.
//!
//! Workers never load the path cargo writes to. Overwriting a library that a process has mapped
//! crashes that process (SIGSEGV/SIGBUS), and a load racing a build may see half a file. So the
//! master copies the plugin into `<state>/plugins/<name>-<hash>.so` (written to a temp file, then
//! renamed, so a reader sees all of it or nothing) and workers load that copy. The same content
//! always gets the same name, which is also the plugin's version as `host status` shows it.
//!
//! `history.json` beside the copies remembers, per service (of every config run on this state
//! directory, not only the running one), the live version, the versions that were live before
//! (oldest first), which of them proved healthy and which failed, and the last reloads and
//! rollbacks: `host rollback` still has somewhere to go after a master restart, and a version
//! that crash-loops after a restart can return to the last healthy one.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    fs::{self, File},
    io,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use nix::fcntl::OFlag;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{config::ServiceConfig, protocol::RolloutEvent, state_dir::Dir};

/// How many reloads and rollbacks the history file keeps (all services together).
pub const KEEP_EVENTS: usize = 200;

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

/// The store, a directory owned by one master (`<state>/plugins`).
///
/// Every copy a worker will load is opened once and its SHA-256 checked against its name;
/// the store keeps that open file, and workers get a dup of it (loaded through
/// `/proc/self/fd`), so a worker loads exactly the bytes that were verified, whatever happens
/// to the path afterwards (a copy replaced in the directory, or deleted with it).
#[derive(Debug)]
pub struct ShadowStore {
    dir: Mutex<Arc<Dir>>,
    verified: Mutex<HashMap<String, Arc<File>>>,
    /// The thread that writes the history file (see [`ShadowStore::save_history`]).
    history_writer: Mutex<Option<std::sync::mpsc::Sender<HistoryWrite>>>,
}

/// What the history writer thread is asked to do.
enum HistoryWrite {
    Save(Arc<Dir>, Vec<u8>),
    /// Everything saved before this is on disk: tell the sender.
    Flush(std::sync::mpsc::Sender<()>),
}

impl ShadowStore {
    /// The store in `state`'s `plugins/` (created 0700 and checked).
    pub fn open(state: &Dir) -> Result<ShadowStore, String> {
        Ok(ShadowStore {
            dir: Mutex::new(Arc::new(state.subdir("plugins")?)),
            verified: Mutex::default(),
            history_writer: Mutex::default(),
        })
    }

    fn dir(&self) -> Arc<Dir> {
        self.dir.lock().unwrap().clone()
    }

    /// Stores a service's plugin, after the trust checks on its path (`crate::trust`); with
    /// `allow_insecure_plugin_path`, a failed check is a warning, at every load.
    pub fn store_plugin(&self, service: &ServiceConfig) -> Result<PluginVersion, String> {
        // A missing file is for `store` to explain.
        if service.plugin.exists() {
            if let Err(e) = crate::trust::check_plugin_path(&service.plugin, nix::unistd::geteuid())
            {
                if !service.allow_insecure_plugin_path {
                    return Err(e);
                }
                tracing::warn!(
                    service = %service.name,
                    "loading the plugin anyway (allow_insecure_plugin_path = true): {e}"
                );
            }
        }
        self.store(&service.plugin)
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
        let name = format!("{stem}-{}.so", &hash[..16]);
        let dir = self.dir();
        let version = PluginVersion {
            hash,
            source: source.to_path_buf(),
            path: dir.path().join(&name),
            size: bytes.len() as u64,
            stored_at: SystemTime::now(),
        };
        // A copy with this name that does not verify (planted, or damaged) is replaced.
        if self.open_verified(&version).is_err() {
            self.verified.lock().unwrap().remove(&version.hash);
            dir.write_atomically(&name, &bytes, 0o444)
                .map_err(|e| format!("could not copy plugin into {}: {e}", dir.path().display()))?;
            self.open_verified(&version)?;
        }
        Ok(version)
    }

    /// The verified open copy of `version`, for a worker to load (see the type's comment).
    /// The first call opens the copy (never through a symlink), checks that nobody else can
    /// write it and that its SHA-256 is the version's; later calls return the same file.
    pub fn open_verified(&self, version: &PluginVersion) -> Result<Arc<File>, String> {
        if let Some(file) = self.verified.lock().unwrap().get(&version.hash) {
            return Ok(file.clone());
        }
        let name = file_name(version);
        let dir = self.dir();
        let shown = dir.path().join(&name);
        let mut file = dir
            .open_file(&name, OFlag::O_RDONLY, 0)
            .map_err(|e| format!("the copy of plugin {version} is gone or unusable ({e})"))?;
        let meta = file
            .metadata()
            .map_err(|e| format!("could not look at {}: {e}", shown.display()))?;
        if !meta.is_file()
            || meta.uid() != nix::unistd::geteuid().as_raw()
            || meta.permissions().mode() & 0o222 != 0
        {
            return Err(format!(
                "{} is not a copy this host made (owner uid {}, mode {:o}); refusing to load it",
                shown.display(),
                meta.uid(),
                meta.permissions().mode() & 0o7777
            ));
        }
        let mut hasher = Sha256::new();
        io::copy(&mut file, &mut hasher)
            .map_err(|e| format!("could not read {}: {e}", shown.display()))?;
        // Leave the offset where a reader of a dup would expect it.
        io::Seek::seek(&mut file, io::SeekFrom::Start(0))
            .map_err(|e| format!("could not read {}: {e}", shown.display()))?;
        let found = format!("{:x}", hasher.finalize());
        if found != version.hash {
            return Err(format!(
                "{} does not hold plugin {version}: its SHA-256 is {}, not {}. The copy was \
                 changed after the host stored it; refusing to load it. Reload to store the \
                 plugin again.",
                shown.display(),
                &found[..16],
                &version.hash[..16]
            ));
        }
        let file = Arc::new(file);
        self.verified
            .lock()
            .unwrap()
            .insert(version.hash.clone(), file.clone());
        Ok(file)
    }

    /// Moves the store into a recreated state directory: every verified copy is written again
    /// from its open file (the bytes that were checked), so nothing a worker or a rollback needs
    /// is lost with the old directory.
    pub fn rehome(&self, state: &Dir, versions: &[PluginVersion]) -> Result<(), String> {
        let dir = Arc::new(state.subdir("plugins")?);
        for version in versions {
            let Some(file) = self.verified.lock().unwrap().get(&version.hash).cloned() else {
                continue;
            };
            // Read with positioned reads: workers get dups of this file, which share its offset.
            let mut bytes = vec![0u8; version.size as usize];
            std::os::unix::fs::FileExt::read_exact_at(&*file, &mut bytes, 0)
                .map_err(|e| format!("could not read the copy of {version}: {e}"))?;
            dir.write_atomically(&file_name(version), &bytes, 0o444)
                .map_err(|e| format!("could not restore the copy of {version}: {e}"))?;
        }
        *self.dir.lock().unwrap() = dir;
        Ok(())
    }

    /// Writes again, from its verified open file, the copy of every version in `versions`
    /// whose file is gone from the store; returns their short hashes.
    pub fn restore_missing(&self, versions: &[PluginVersion]) -> Vec<String> {
        let dir = self.dir();
        let mut restored = Vec::new();
        let mut seen = HashSet::new();
        for version in versions {
            if !seen.insert(version.hash.clone()) {
                continue;
            }
            let name = file_name(version);
            if dir.open_file(&name, OFlag::O_RDONLY, 0).is_ok() {
                continue;
            }
            let Some(file) = self.verified.lock().unwrap().get(&version.hash).cloned() else {
                continue;
            };
            let mut bytes = vec![0u8; version.size as usize];
            let copied = std::os::unix::fs::FileExt::read_exact_at(&*file, &mut bytes, 0)
                .and_then(|()| dir.write_atomically(&name, &bytes, 0o444));
            match copied {
                Ok(()) => restored.push(version.short().to_string()),
                Err(e) => tracing::warn!("could not restore the copy of {version}: {e}"),
            }
        }
        restored
    }

    /// The history as last saved; versions whose copy is gone are dropped. A missing or
    /// unreadable file is an empty history (it is a convenience, not state the host needs to
    /// run). The first format (previous versions only) still reads.
    pub fn load_history(&self) -> History {
        // A save still on its way to the disk would be missed.
        self.flush_history();
        let dir = self.dir();
        let Ok(text) = dir.read_to_string(HISTORY) else {
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
                tracing::warn!(
                    "ignoring unreadable {}: {e}",
                    dir.path().join(HISTORY).display()
                );
                return History::default();
            }
        };
        let usable = |v: &PluginVersion| match self.open_verified(v) {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!("dropping {v} from the version history: {e}");
                false
            }
        };
        for service in history.services.values_mut() {
            service.previous.retain(usable);
            service.live = service.live.take().filter(usable);
        }
        history
    }

    /// Saves the history (temp file, synced, then renamed), keeping the newest events. The
    /// write happens on a thread of its own: a sync can take seconds on a busy disk, and the
    /// master's one thread must go on reading heartbeats meanwhile (or it would think its
    /// workers wedged). Saves that pile up meanwhile are written once, the newest.
    pub fn save_history(&self, history: &History) {
        let skip = history.events.len().saturating_sub(KEEP_EVENTS);
        let trimmed = History {
            services: history.services.clone(),
            events: history.events[skip..].to_vec(),
        };
        let json = serde_json::to_vec_pretty(&trimmed).expect("versions serialize");
        self.to_history_writer(HistoryWrite::Save(self.dir(), json));
    }

    /// Waits until every history saved so far is written (before the master exits).
    pub fn flush_history(&self) {
        if self.history_writer.lock().unwrap().is_none() {
            return; // nothing was saved yet
        }
        let (tx, rx) = std::sync::mpsc::channel();
        self.to_history_writer(HistoryWrite::Flush(tx));
        let _ = rx.recv_timeout(std::time::Duration::from_secs(10));
    }

    fn to_history_writer(&self, job: HistoryWrite) {
        let mut writer = self.history_writer.lock().unwrap();
        let tx = writer.get_or_insert_with(|| {
            let (tx, rx) = std::sync::mpsc::channel();
            let spawned = std::thread::Builder::new()
                .name("history".into())
                .spawn(move || write_histories(rx));
            if let Err(e) = spawned {
                tracing::error!("could not start the history writer: {e}");
            }
            tx
        });
        if let Err(std::sync::mpsc::SendError(job)) = tx.send(job) {
            // The thread is gone (it could not start): write here instead.
            *writer = None;
            if let HistoryWrite::Save(dir, json) = job {
                write_history(&dir, &json);
            }
        }
    }

    /// Removes one stored copy (a version that a failed start stored and nothing else uses).
    pub fn remove(&self, version: &PluginVersion) {
        self.verified.lock().unwrap().remove(&version.hash);
        let _ = self.dir().remove(&file_name(version));
    }

    /// Removes every stored library whose hash is not in `keep` (the history file stays), and
    /// closes their verified files. A worker that still has a removed file mapped keeps running:
    /// unlinking does not touch the mapping.
    pub fn prune(&self, keep: &HashSet<String>) {
        self.verified
            .lock()
            .unwrap()
            .retain(|hash, _| keep.contains(hash));
        let dir = self.dir();
        let kept: HashSet<String> = keep.iter().map(|h| h[..16].to_string()).collect();
        for name in dir.names() {
            let hash16 = name
                .strip_suffix(".so")
                .and_then(|n| n.rsplit('-').next())
                .unwrap_or("");
            if name == HISTORY || name.starts_with('.') || kept.contains(hash16) {
                continue;
            }
            if let Err(e) = dir.remove(&name) {
                tracing::warn!(
                    "could not remove old plugin copy {}: {e}",
                    dir.path().join(&name).display()
                );
            }
        }
    }
}

const HISTORY: &str = "history.json";

/// The name of a version's copy in the store.
fn file_name(version: &PluginVersion) -> String {
    version
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// What `history.json` holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct History {
    pub services: HashMap<String, SavedService>,
    /// Reloads and rollbacks, oldest first.
    #[serde(default)]
    pub events: Vec<RolloutEvent>,
}

fn write_histories(rx: std::sync::mpsc::Receiver<HistoryWrite>) {
    while let Ok(first) = rx.recv() {
        let mut latest = None;
        let mut flushes = Vec::new();
        for job in std::iter::once(first).chain(rx.try_iter()) {
            match job {
                HistoryWrite::Save(dir, json) => latest = Some((dir, json)),
                HistoryWrite::Flush(done) => flushes.push(done),
            }
        }
        if let Some((dir, json)) = latest {
            write_history(&dir, &json);
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}

fn write_history(dir: &Dir, json: &[u8]) {
    if let Err(e) = dir.write_atomically(HISTORY, json, 0o600) {
        tracing::warn!("could not save {}: {e}", dir.path().join(HISTORY).display());
    }
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
    pub failed: Marks,
    /// Hashes of versions an operator rolled back from (`host rollback`, the admin API), with
    /// when. Not failures: the crash-loop fallback and the watcher still take them.
    #[serde(default)]
    pub set_aside: Marks,
    /// When a master last ran the service (saved it): of the services a config does not have,
    /// the longest gone are the first forgotten (`Master::dormant`).
    #[serde(default)]
    pub last_ran: Option<SystemTime>,
}

/// Versions marked failed or set aside: hash -> why (or when), oldest first (the order is kept
/// in the file too), so that the oldest marks are the first a service forgets.
pub type Marks = indexmap::IndexMap<String, String>;

#[derive(Deserialize)]
#[serde(untagged)]
enum SavedFormats {
    Current(History),
    First(HashMap<String, Vec<PluginVersion>>),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_in(dir: &Path) -> ShadowStore {
        let state = dir.join("state");
        fs::create_dir(&state).unwrap();
        ShadowStore::open(&Dir::open(&state).unwrap()).unwrap()
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
    fn same_content_same_copy_and_source_changes_do_not_touch_it() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("libp.so");
        fs::write(&src, elf(b"one")).unwrap();
        let store = store_in(dir.path());
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
        store.prune(&HashSet::from([b.hash.clone()]));
        assert!(!a.path.exists() && b.path.exists());
    }

    #[test]
    fn a_changed_copy_is_refused_and_a_planted_one_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("libp.so");
        fs::write(&src, elf(b"one")).unwrap();
        let store = store_in(dir.path());
        let v = store.store(&src).unwrap();
        // Someone swaps the copy (as root could): a fresh store (a restarted master) refuses it.
        fs::remove_file(&v.path).unwrap();
        fs::write(&v.path, elf(b"evil")).unwrap();
        fs::set_permissions(&v.path, fs::Permissions::from_mode(0o444)).unwrap();
        let fresh = ShadowStore::open(&Dir::open(&dir.path().join("state")).unwrap()).unwrap();
        let e = fresh.open_verified(&v).unwrap_err();
        assert!(e.contains("does not hold plugin"), "{e}");
        // Storing the source again replaces the planted copy with the real bytes.
        let again = fresh.store(&src).unwrap();
        assert_eq!(fs::read(&again.path).unwrap(), elf(b"one"));
    }

    #[test]
    fn history_survives_and_forgets_pruned_copies() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_in(dir.path());
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
        store.prune(&HashSet::from([two.hash.clone()]));
        let loaded = store.load_history();
        assert_eq!(
            loaded.services["svc"].previous,
            vec![two.clone()],
            "the pruned copy left the history"
        );
        assert_eq!(loaded.services["svc"].live, Some(two));
    }

    #[test]
    fn missing_plugin_says_to_build_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = store_in(dir.path())
            .store(&dir.path().join("nope.so"))
            .unwrap_err();
        assert!(
            err.contains("does not exist; build the plugin first"),
            "{err}"
        );
    }
}
