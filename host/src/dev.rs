//! `host dev [PATH]`: the one-command dev loop, as `gf run -w` is for Go.
//!
//! Build the plugin crate at PATH with cargo, start the host on the library it produced with the
//! watcher on, and run `cargo build` again on every source change under the crate (cargo's own
//! output goes to the terminal). A rebuilt library goes live through the watcher, canary
//! included; a compile error leaves the running version serving.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    time::Duration,
};

use notify::{Event, EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::{cli::usage_error, config::Config, state_dir::StateDir};

/// Source edits come in bursts (an editor's save writes several files): wait this long after
/// the last change before building.
const SOURCE_DEBOUNCE: Duration = Duration::from_millis(200);

pub fn main(path: &Path, listen: Vec<String>, workers: usize, state: StateDir) -> ExitCode {
    let manifest = path.join("Cargo.toml");
    if !manifest.is_file() {
        return usage_error(&format!(
            "{} has no Cargo.toml; `host dev` takes the directory of a plugin crate",
            path.display()
        ));
    }
    let manifest = std::path::absolute(&manifest).unwrap_or(manifest);
    let library = match first_build(&manifest) {
        Ok(library) => library,
        Err(e) => {
            eprintln!("host: {e}");
            return ExitCode::FAILURE;
        }
    };
    let stem = library
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = stem.strip_prefix("lib").unwrap_or(&stem).to_string();
    let service = crate::config::RawService {
        name,
        plugin: library,
        listen,
        workers: Some(workers),
        ..Default::default()
    };
    let mut config = match Config::from_flags(service, Default::default()) {
        Ok(c) => c,
        Err(e) => return usage_error(&e.to_string()),
    };
    // Edit to live in under a second: no canary probation, no probation.
    config.services[0].watch = true;
    config.services[0].canary_probation = std::time::Duration::ZERO;
    config.services[0].probation = std::time::Duration::ZERO;
    let crate_dir = manifest.parent().unwrap_or(Path::new(".")).to_path_buf();
    crate::master::main(
        config,
        Default::default(),
        state,
        crate::master::Options {
            sidecar: Some(Box::pin(rebuild_on_change(crate_dir, manifest))),
            ..Default::default()
        },
    )
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Builds the crate and finds its cdylib in cargo's JSON messages (the human output still goes
/// to the terminal, on stderr).
fn first_build(manifest: &Path) -> Result<PathBuf, String> {
    let output = Command::new(cargo())
        .args([
            "build",
            "--message-format=json-render-diagnostics",
            "--manifest-path",
        ])
        .arg(manifest)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("could not run cargo: {e}"))?;
    if !output.status.success() {
        return Err("cargo build failed; fix the errors above and run `host dev` again".into());
    }
    let manifest_text = manifest.to_string_lossy();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["manifest_path"] == *manifest_text)
        .filter(|m| m["target"]["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "cdylib")))
        .flat_map(|m| m["filenames"].as_array().cloned().unwrap_or_default())
        .filter_map(|f| f.as_str().map(PathBuf::from))
        .find(|f| f.extension().is_some_and(|e| e == "so"))
        .ok_or_else(|| {
            format!(
                "{} builds no shared library; a plugin crate needs `crate-type = [\"cdylib\"]` in [lib]",
                manifest.display()
            )
        })
}

/// Whether a changed path is one of the crate's sources (not build output, not dot-dirs such as
/// `.git` or the host's `.host` state directory).
fn is_source(path: &Path, crate_dir: &Path) -> bool {
    let Ok(rel) = path.strip_prefix(crate_dir) else {
        return false;
    };
    !rel.components().any(|c| {
        let c = c.as_os_str().to_string_lossy();
        c == "target" || c.starts_with('.')
    })
}

async fn rebuild_on_change(crate_dir: PathBuf, manifest: PathBuf) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let dir = crate_dir.clone();
    let watcher = notify::recommended_watcher(move |event: notify::Result<Event>| {
        let Ok(event) = event else { return };
        if !matches!(event.kind, EventKind::Access(_))
            && event.paths.iter().any(|p| is_source(p, &dir))
        {
            let _ = tx.send(());
        }
    });
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(e) => return tracing::error!("could not watch the crate's sources: {e}"),
    };
    if let Err(e) = watcher.watch(&crate_dir, RecursiveMode::Recursive) {
        return tracing::error!("could not watch {}: {e}", crate_dir.display());
    }
    tracing::info!("watching {} for source changes", crate_dir.display());
    while rx.recv().await.is_some() {
        while let Ok(Some(())) = tokio::time::timeout(SOURCE_DEBOUNCE, rx.recv()).await {}
        tracing::info!("source changed: cargo build");
        let status = tokio::process::Command::new(cargo())
            .args(["build", "--manifest-path"])
            .arg(&manifest)
            .stdin(Stdio::null())
            .status()
            .await;
        match status {
            Ok(s) if s.success() => tracing::info!("build done; the watcher takes it from here"),
            Ok(_) => tracing::error!(
                "build failed (cargo's errors are above); the running version keeps serving"
            ),
            Err(e) => tracing::error!("could not run cargo: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sources_count() {
        let dir = Path::new("/work/p");
        assert!(is_source(Path::new("/work/p/src/lib.rs"), dir));
        assert!(is_source(Path::new("/work/p/Cargo.toml"), dir));
        assert!(!is_source(Path::new("/work/p/target/debug/libp.so"), dir));
        assert!(!is_source(Path::new("/work/p/.host/host.sock"), dir));
        assert!(!is_source(Path::new("/elsewhere/x.rs"), dir));
    }
}
