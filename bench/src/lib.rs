//! Shared parts of the benchmarks: release builds of the host and plugins, a master started in
//! its own process group (killed as a group when dropped), and timing summaries.

pub mod chart;
pub mod nginx;
pub mod procs;
pub mod wrk;

use std::{
    fs,
    io::{BufRead, BufReader},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use nix::{
    sys::signal::{killpg, Signal},
    unistd::Pid,
};

/// The workspace root (bench/ is one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Release builds: `host`, and `hello` as v1 and v2, copied to `target/bench-plugins`.
pub struct Build {
    pub host: PathBuf,
    pub baseline: PathBuf,
    pub hello_v1: PathBuf,
    pub hello_v2: PathBuf,
}

pub fn build() -> Build {
    let root = root();
    let release = root.join("target/release");
    let out = root.join("target/bench-plugins");
    fs::create_dir_all(&out).unwrap();
    // Two invocations: in one, `--bin baseline` would apply to every `-p` package, and cargo
    // would build neither the host binary nor libhello.so.
    cargo(&["build", "--release", "-p", "host", "-p", "hello"], None);
    cargo(&["build", "--release", "-p", "bench", "--bin", "baseline"], None);
    let hello_v1 = out.join("hello-v1.so");
    replace(&release.join("libhello.so"), &hello_v1);
    cargo(&["build", "--release", "-p", "hello"], Some("v2"));
    let hello_v2 = out.join("hello-v2.so");
    replace(&release.join("libhello.so"), &hello_v2);
    cargo(&["build", "--release", "-p", "hello"], None);
    Build {
        host: release.join("host"),
        baseline: release.join("baseline"),
        hello_v1,
        hello_v2,
    }
}

fn cargo(args: &[&str], hello_version: Option<&str>) {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(args)
        .current_dir(root())
        .env_remove("HELLO_VERSION");
    if let Some(v) = hello_version {
        cmd.env("HELLO_VERSION", v);
    }
    assert!(cmd.status().unwrap().success(), "cargo {args:?} failed");
}

/// Replaces `to` as cargo does: remove, then a new file.
pub fn replace(from: &Path, to: &Path) {
    let _ = fs::remove_file(to);
    fs::copy(from, to).unwrap();
}

/// A running master with its state dir; killed with its workers (by process group) on drop.
pub struct Master {
    pub dir: tempfile::TempDir,
    pub host: PathBuf,
    pub pid: u32,
    child: Child,
}

impl Master {
    /// One service of `plugin` with `workers` workers on 127.0.0.1 (port 0), plus `extra`
    /// flags, with `HOST_LOG=log`; the master's log (stderr) goes to `<dir>/host.log`.
    pub fn serving(
        host: &Path,
        plugin: &Path,
        workers: usize,
        extra: &[&str],
        log: &str,
    ) -> Master {
        let workers = workers.to_string();
        let mut args = vec![
            "--plugin",
            "plugin.so",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            &workers,
        ];
        args.extend_from_slice(extra);
        Master::start(host, plugin, &args, log)
    }

    /// `host start <args>` in a new temp dir holding `plugin.so` (a copy of `plugin`).
    pub fn start(host: &Path, plugin: &Path, args: &[&str], log: &str) -> Master {
        let dir = tempfile::tempdir().unwrap();
        replace(plugin, &dir.path().join("plugin.so"));
        let mut child = Command::new(host)
            .arg("start")
            .args(args)
            .arg("--state-dir")
            .arg(dir.path().join(".host"))
            .current_dir(dir.path())
            .env("HOST_LOG", log)
            .stdout(Stdio::piped())
            .stderr(fs::File::create(dir.path().join("host.log")).unwrap())
            .process_group(0)
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("host: ready") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(60))
            .expect("host did not become ready");
        Master {
            pid: child.id(),
            dir,
            host: host.to_path_buf(),
            child,
        }
    }

    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(&self.host)
            .args(args)
            .arg("--state-dir")
            .arg(self.dir.path().join(".host"))
            .output()
            .unwrap()
    }

    pub fn status(&self) -> serde_json::Value {
        serde_json::from_slice(&self.cli(&["status", "--json"]).stdout).unwrap()
    }

    pub fn addr(&self) -> String {
        self.status()["services"][0]["listen"][0]
            .as_str()
            .unwrap()
            .to_string()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("host.log")).unwrap_or_default()
    }

    /// Pids of the master and its workers.
    pub fn pids(&self) -> Vec<u32> {
        procs::tree(self.pid)
    }

    pub fn plugin_path(&self) -> PathBuf {
        self.dir.path().join("plugin.so")
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// p50, p90 and max of a sample, in milliseconds.
pub fn summary(samples: &mut [f64]) -> (f64, f64, f64) {
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.9), *samples.last().unwrap())
}
