//! The trust boundary: the files and directories the host relies on, checked for who could
//! change them, the way sshd's StrictModes checks a user's home directory.
//!
//! The host often runs as root, and it executes what it finds in its state directory (the
//! shadow copies of plugins) and at its plugin paths. Whoever can write one of those, or replace
//! a directory on the way to it, can run code as the host. So:
//!
//! - the state directory must be a real directory (not a symlink), owned by the user the host
//!   runs as, and not writable by group or others; each directory above it must be owned by root
//!   or that user and not writable by others, unless it is root-owned and sticky (`/tmp`), where
//!   others cannot rename what is ours;
//! - a plugin file must be owned by root or that user and not writable by group or others, and
//!   so must every directory above it (the same rule), both on the path as given and on the
//!   path its symlinks resolve to.
//!
//! Every refusal says what is wrong and how to fix it.

use std::{
    fs::{self, Metadata},
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Component, Path, PathBuf},
};

use nix::unistd::{Uid, User};

const GROUP_WRITE: u32 = 0o020;
const OTHER_WRITE: u32 = 0o002;
const OTHER_READ: u32 = 0o004;
const STICKY: u32 = 0o1000;

/// Who may own what the host trusts: the user it runs as, and root.
fn trusted_owner(uid: u32, me: Uid) -> bool {
    uid == 0 || uid == me.as_raw()
}

fn owner_name(uid: u32) -> String {
    match User::from_uid(Uid::from_raw(uid)) {
        Ok(Some(user)) => format!("{} (uid {uid})", user.name),
        _ => format!("uid {uid}"),
    }
}

fn me_name(me: Uid) -> String {
    owner_name(me.as_raw())
}

/// Checks the state directory itself (see the module comment).
pub fn check_state_dir(path: &Path, me: Uid) -> Result<(), String> {
    let shown = path.display();
    let meta = fs::symlink_metadata(path)
        .map_err(|e| format!("could not look at state directory {shown}: {e}"))?;
    if meta.file_type().is_symlink() {
        return Err(format!(
            "state directory {shown} is a symlink; the host does not follow symlinks to the \
             directory it trusts. Point --state-dir (or HOST_STATE_DIR) at the real directory, \
             or remove the link."
        ));
    }
    if !meta.is_dir() {
        return Err(format!(
            "state directory {shown} is not a directory; remove it or choose another --state-dir"
        ));
    }
    if meta.uid() != me.as_raw() {
        return Err(format!(
            "state directory {shown} belongs to {}, not to {} who runs the host: another user \
             could have planted files in it. Remove it (the host creates its own), or \
             `chown {} {shown}` if it is yours.",
            owner_name(meta.uid()),
            me_name(me),
            me.as_raw()
        ));
    }
    if meta.mode() & (GROUP_WRITE | OTHER_WRITE) != 0 {
        return Err(format!(
            "state directory {shown} is writable by {} (mode {:o}): another user could plant \
             files in it. Run `chmod 700 {shown}`.",
            if meta.mode() & OTHER_WRITE != 0 {
                "everyone"
            } else {
                "its group"
            },
            meta.mode() & 0o7777
        ));
    }
    check_ancestors(path, me, "state directory")
}

/// Checks every directory above `path` (see the module comment).
fn check_ancestors(path: &Path, me: Uid, what: &str) -> Result<(), String> {
    let mut dir = path.parent();
    while let Some(d) = dir {
        if d.as_os_str().is_empty() {
            break;
        }
        let meta =
            fs::metadata(d).map_err(|e| format!("could not look at {}: {e}", d.display()))?;
        check_dir(d, &meta, me, what, path)?;
        dir = d.parent();
    }
    Ok(())
}

fn check_dir(dir: &Path, meta: &Metadata, me: Uid, what: &str, below: &Path) -> Result<(), String> {
    let shown = dir.display();
    if !trusted_owner(meta.uid(), me) {
        return Err(format!(
            "{what} {} is inside {shown}, which belongs to {}: that user could replace what is \
             in it and run code as {}. Move it to a directory owned by {} or root, or (for a \
             plugin, if you accept the risk) set allow_insecure_plugin_path = true.",
            below.display(),
            owner_name(meta.uid()),
            me_name(me),
            me_name(me)
        ));
    }
    let writable = meta.mode() & (GROUP_WRITE | OTHER_WRITE) != 0;
    let sticky_root = meta.uid() == 0 && meta.mode() & STICKY != 0;
    if writable && !sticky_root {
        return Err(format!(
            "{what} {} is inside {shown}, which is writable by {} (mode {:o}): they could replace \
             what is in it and run code as {}. Run `chmod go-w {shown}`, or (for a plugin, if \
             you accept the risk) set allow_insecure_plugin_path = true.",
            below.display(),
            if meta.mode() & OTHER_WRITE != 0 {
                "everyone"
            } else {
                "its group"
            },
            meta.mode() & 0o7777,
            me_name(me)
        ));
    }
    Ok(())
}

/// Checks a plugin file and the directories above it, on the path as given and on the path
/// its symlinks resolve to (see the module comment).
pub fn check_plugin_path(path: &Path, me: Uid) -> Result<(), String> {
    let shown = path.display();
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let lexical = normalize(&absolute);
    let real = fs::canonicalize(path).map_err(|e| format!("could not look at {shown}: {e}"))?;
    let meta = fs::metadata(&real).map_err(|e| format!("could not look at {shown}: {e}"))?;
    if !trusted_owner(meta.uid(), me) {
        return Err(format!(
            "plugin {shown} belongs to {}: that user could change it and run code as {}. Make \
             {} or root its owner (`chown`), or, if you accept the risk, set \
             allow_insecure_plugin_path = true (--allow-insecure-plugin-path).",
            owner_name(meta.uid()),
            me_name(me),
            me_name(me)
        ));
    }
    if meta.permissions().mode() & (GROUP_WRITE | OTHER_WRITE) != 0 {
        return Err(format!(
            "plugin {shown} is writable by {} (mode {:o}): they could change it and run code as \
             {}. Run `chmod go-w {shown}`, or, if you accept the risk, set \
             allow_insecure_plugin_path = true (--allow-insecure-plugin-path).",
            if meta.mode() & OTHER_WRITE != 0 {
                "everyone"
            } else {
                "its group"
            },
            meta.mode() & 0o7777,
            me_name(me)
        ));
    }
    check_ancestors(&lexical, me, "plugin")?;
    if real != lexical {
        check_ancestors(&real, me, "plugin")?;
    }
    Ok(())
}

/// Checks a file that holds a secret (the admin token): owned by root or the user the host runs
/// as, writable by neither group nor others, readable by no one else, and the directories above
/// it as for a plugin, on the path as given and on the path its symlinks resolve to (a
/// Kubernetes Secret volume is a chain of root-owned symlinks).
pub fn check_secret_file(path: &Path, me: Uid, what: &str) -> Result<(), String> {
    let shown = path.display();
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let lexical = normalize(&absolute);
    let real = fs::canonicalize(path).map_err(|e| format!("could not read {what} {shown}: {e}"))?;
    let meta = fs::metadata(&real).map_err(|e| format!("could not read {what} {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{what} {shown} is not a file"));
    }
    if !trusted_owner(meta.uid(), me) {
        return Err(format!(
            "{what} {shown} belongs to {}: that user could change it. Make {} or root its \
             owner (`chown`).",
            owner_name(meta.uid()),
            me_name(me)
        ));
    }
    if meta.mode() & (GROUP_WRITE | OTHER_WRITE | OTHER_READ) != 0 {
        return Err(format!(
            "{what} {shown} can be read or changed by other users (mode {:o}). Run `chmod 600 \
             {shown}` (in Kubernetes, mount the Secret with defaultMode: 0400).",
            meta.mode() & 0o7777
        ));
    }
    check_ancestors(&lexical, me, what)?;
    if real != lexical {
        check_ancestors(&real, me, what)?;
    }
    Ok(())
}

/// `a/./b/../c` -> `a/c`, without touching the file system (symlinks are the resolved path's
/// business).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> Uid {
        nix::unistd::geteuid()
    }

    #[test]
    fn a_private_state_dir_passes_and_a_shared_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("s");
        fs::create_dir(&state).unwrap();
        fs::set_permissions(&state, fs::Permissions::from_mode(0o700)).unwrap();
        check_state_dir(&state, me()).unwrap();
        fs::set_permissions(&state, fs::Permissions::from_mode(0o777)).unwrap();
        let e = check_state_dir(&state, me()).unwrap_err();
        assert!(
            e.contains("writable by everyone") && e.contains("chmod 700"),
            "{e}"
        );
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&state, &link).unwrap();
        assert!(check_state_dir(&link, me())
            .unwrap_err()
            .contains("is a symlink"));
    }

    #[test]
    fn plugins_writable_by_others_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let plugin = dir.path().join("libp.so");
        fs::write(&plugin, b"x").unwrap();
        fs::set_permissions(&plugin, fs::Permissions::from_mode(0o644)).unwrap();
        check_plugin_path(&plugin, me()).unwrap();
        fs::set_permissions(&plugin, fs::Permissions::from_mode(0o666)).unwrap();
        assert!(check_plugin_path(&plugin, me())
            .unwrap_err()
            .contains("writable by everyone"));
        fs::set_permissions(&plugin, fs::Permissions::from_mode(0o644)).unwrap();
        let open = dir.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        let inside = open.join("libp.so");
        fs::write(&inside, b"x").unwrap();
        let e = check_plugin_path(&inside, me()).unwrap_err();
        assert!(e.contains("which is writable by everyone"), "{e}");
    }

    #[test]
    fn paths_are_normalized_lexically() {
        assert_eq!(normalize(Path::new("/a/./b/../c")), Path::new("/a/c"));
    }
}
