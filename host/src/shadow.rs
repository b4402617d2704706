//! The shadow store: content-addressed, read-only copies of plugin libraries.
//!
//! Workers never load the path cargo writes to. Overwriting a library that a process has mapped
//! crashes that process (SIGSEGV/SIGBUS), and a load racing a build may see half a file. So the
//! master copies the plugin into `<state>/plugins/<name>-<hash>.so` (written to a temp file, then
//! renamed, so a reader sees all of it or nothing) and workers load that copy. The same content
//! always gets the same name, which is also the plugin's version as `host status` shows it.
//!
//! `history.json` beside the copies remembers, per service, the versions that were live before
//! (oldest first), so that `host rollback` still has somewhere to go after a master restart.

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
    pub fn store(&self, source: &Path) -> Result<PluginVersion, String> {
        let bytes = fs::read(source).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => format!(
                "plugin file {} does not exist; build the plugin first (cargo build) or fix the path",
                source.display()
            ),
            _ => format!("could not read plugin file {}: {e}", source.display()),
        })?;
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

    /// The previous versions of each service, as last saved; entries whose copy is gone are
    /// dropped. A missing or unreadable file is an empty history (it is a convenience, not
    /// state the host needs to run).
    pub fn load_history(&self) -> HashMap<String, Vec<PluginVersion>> {
        let Ok(text) = fs::read_to_string(self.history_file()) else {
            return HashMap::new();
        };
        let mut history: HashMap<String, Vec<PluginVersion>> = match serde_json::from_str(&text) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!("ignoring unreadable {}: {e}", self.history_file().display());
                return HashMap::new();
            }
        };
        for versions in history.values_mut() {
            versions.retain(|v| v.path.exists());
        }
        history
    }

    /// Saves the previous versions of each service (temp file, then rename).
    pub fn save_history(&self, history: &HashMap<String, Vec<PluginVersion>>) {
        let json = serde_json::to_vec_pretty(history).expect("versions serialize");
        if let Err(e) = self.write_atomically(&self.history_file(), &json) {
            tracing::warn!("could not save {}: {e}", self.history_file().display());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_content_same_copy_and_source_changes_do_not_touch_it() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("libp.so");
        fs::write(&src, b"one").unwrap();
        let store = ShadowStore::new(dir.path().join("store"));
        let a = store.store(&src).unwrap();
        let again = store.store(&src).unwrap();
        assert_eq!(a.path, again.path);
        assert_eq!(a.short().len(), 7);
        // cargo replaces the file; the copy keeps the old content.
        fs::remove_file(&src).unwrap();
        fs::write(&src, b"two").unwrap();
        let b = store.store(&src).unwrap();
        assert_ne!(a.path, b.path);
        assert_eq!(fs::read(&a.path).unwrap(), b"one");
        store.prune(&HashSet::from([b.path.clone()]));
        assert!(!a.path.exists() && b.path.exists());
    }

    #[test]
    fn history_survives_and_forgets_pruned_copies() {
        let dir = tempfile::tempdir().unwrap();
        let store = ShadowStore::new(dir.path().join("store"));
        let src = dir.path().join("libp.so");
        fs::write(&src, b"one").unwrap();
        let one = store.store(&src).unwrap();
        fs::write(&src, b"two").unwrap();
        let two = store.store(&src).unwrap();
        store.save_history(&HashMap::from([(
            "svc".to_string(),
            vec![one.clone(), two.clone()],
        )]));
        store.prune(&HashSet::from([two.path.clone()]));
        assert_eq!(
            store.load_history()["svc"],
            vec![two],
            "the pruned copy left the history"
        );
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
