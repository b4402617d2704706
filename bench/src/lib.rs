//! Shared parts of the benchmarks: release builds of the host and plugins, a master started in
//! its own process group (killed as a group when dropped), the modes and their budgets, and the
//! report (per-round ratios, median, spread, verdict; `report.rs`).

pub mod chart;
pub mod nginx;
pub mod procs;
pub mod rebuild;
pub mod report;
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

/// Cargo's target directory as cargo itself resolves it (`CARGO_TARGET_DIR`, a config file's
/// `build.target-dir`, or `target/`), so that the bench finds what it built wherever that is.
pub fn target_dir() -> PathBuf {
    let out = cargo_command()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(root())
        .stderr(Stdio::inherit())
        .output()
        .expect("could not run cargo metadata");
    assert!(out.status.success(), "cargo metadata failed");
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    PathBuf::from(meta["target_directory"].as_str().unwrap())
}

/// Release builds: `host` and `baseline`, and `hello` as v1 and v2, copied to
/// `<target>/bench-plugins`.
pub struct Build {
    pub host: PathBuf,
    pub baseline: PathBuf,
    pub hello_v1: PathBuf,
    pub hello_v2: PathBuf,
    /// hello's handler as an async plugin (the `async` figure).
    pub hello_async: PathBuf,
}

pub fn build() -> Build {
    let target = target_dir();
    let out = target.join("bench-plugins");
    fs::create_dir_all(&out).unwrap();
    // Three cargo invocations, each always with the same packages and in a target dir of its
    // own, so that a second run finds everything fresh. In one invocation, `--bin baseline`
    // would apply to every `-p` package, and cargo would build neither the host binary nor
    // libhello.so. In one target dir, cargo rebuilds a crate whenever the features of its
    // dependencies differ from the last build there (`-p host -p hello` unifies them otherwise
    // than `-p bench`), and hello v2 would replace v1: hello, the host and what links them would
    // be rebuilt twice on every run.
    let host_target = target.join("bench-host");
    cargo(
        &[
            "build",
            "--release",
            "-p",
            "host",
            "-p",
            "hello",
            "-p",
            "hello-async",
        ],
        Some(&host_target),
        None,
    );
    cargo(
        &["build", "--release", "-p", "bench", "--bin", "baseline"],
        None,
        None,
    );
    let v2_target = target.join("bench-hello-v2");
    cargo(
        &["build", "--release", "-p", "hello"],
        Some(&v2_target),
        Some("v2"),
    );
    let hello_v1 = out.join("hello-v1.so");
    replace(&host_target.join("release/libhello.so"), &hello_v1);
    let hello_v2 = out.join("hello-v2.so");
    replace(&v2_target.join("release/libhello.so"), &hello_v2);
    let hello_async = out.join("hello-async.so");
    replace(&host_target.join("release/libhello_async.so"), &hello_async);
    let b = Build {
        host: host_target.join("release/host"),
        baseline: target.join("release/baseline"),
        hello_v1,
        hello_v2,
        hello_async,
    };
    for p in [
        &b.host,
        &b.baseline,
        &b.hello_v1,
        &b.hello_v2,
        &b.hello_async,
    ] {
        assert!(p.is_file(), "the build did not produce {}", p.display());
    }
    b
}

/// Where the plugin-boundary microbenchmark is built: a target dir of its own, because
/// `cargo bench -p bench` unifies the features of bench's dev-dependencies (host, criterion) into
/// hello's and bench's own dependencies, and in the shared dir every run would then rebuild
/// them twice (see [`build`]).
pub fn boundary_target() -> PathBuf {
    target_dir().join("bench-boundary")
}

/// Compiles the plugin-boundary microbenchmark without running it, so that its build time is
/// not counted in the time of the figure that runs it.
pub fn build_boundary() {
    cargo(
        &["bench", "--no-run", "-p", "bench", "--bench", "boundary"],
        Some(&boundary_target()),
        None,
    );
}

/// The cargo that runs us (`CARGO` under `cargo run` and `cargo bench`), or the one on PATH,
/// without the variables `cargo run` sets for the crate it runs (`CARGO_PKG_NAME`,
/// `CARGO_MANIFEST_DIR`, ...): build scripts such as ring's ask to rerun when those change, so
/// passing ours on would rebuild ring, rustls and ureq on every run, and again for `cargo run`.
pub fn cargo_command() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    for (name, _) in std::env::vars_os() {
        let n = name.to_string_lossy();
        if n.starts_with("CARGO_PKG_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_MANIFEST_LINKS",
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
            ]
            .contains(&n.as_ref())
        {
            cmd.env_remove(&name);
        }
    }
    cmd
}

/// `cargo ARGS [--target-dir DIR]`, with `HELLO_VERSION` set to `hello_version` or unset.
fn cargo(args: &[&str], target_dir: Option<&Path>, hello_version: Option<&str>) {
    let mut cmd = cargo_command();
    cmd.args(args)
        .current_dir(root())
        .env_remove("HELLO_VERSION");
    if let Some(dir) = target_dir {
        cmd.arg("--target-dir").arg(dir);
    }
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

/// The host's reload probation for a service (per service `canary_probation` and `probation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probation {
    /// The keys left out: what a user gets from `host start`.
    Default,
    /// `canary_probation = "0s"` and `probation = "0s"`: what `host dev` does.
    Zero,
}

impl Probation {
    pub fn label(self) -> &'static str {
        match self {
            Probation::Default => "default probation",
            Probation::Zero => "probation 0",
        }
    }

    /// The setting of the dev loop (`host dev` sets both probations to 0).
    pub fn dev() -> Probation {
        Probation::Zero
    }
}

/// One `[[service]]` of the generated host.toml: the hello plugin on 127.0.0.1 (port 0).
#[derive(Debug, Clone, Copy)]
pub struct Service<'a> {
    pub plugin: &'a Path,
    pub workers: usize,
    pub probation: Probation,
    pub watch: bool,
}

impl<'a> Service<'a> {
    pub fn new(plugin: &'a Path, workers: usize) -> Service<'a> {
        Service {
            plugin,
            workers,
            probation: Probation::Default,
            watch: false,
        }
    }

    /// The config file, with the plugin at `plugin.so` beside it.
    pub fn toml(&self) -> String {
        let mut t = format!(
            "[[service]]\nname = \"hello\"\nlisten = [\"127.0.0.1:0\"]\nplugin = \"plugin.so\"\n\
             workers = {}\nwatch = {}\n",
            self.workers, self.watch
        );
        if self.probation == Probation::Zero {
            t += "canary_probation = \"0s\"\nprobation = \"0s\"\n";
        }
        t
    }
}

/// A running master with its state dir; killed with its workers (by process group) on drop.
pub struct Master {
    pub dir: tempfile::TempDir,
    pub host: PathBuf,
    pub pid: u32,
    child: Child,
}

impl Master {
    /// `host start --config host.toml` for one service, with `HOST_LOG=log`; the master's log
    /// (stderr) goes to `<dir>/host.log`.
    pub fn serving(host: &Path, service: &Service, log: &str) -> Master {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("host.toml"), service.toml()).unwrap();
        Master::start(dir, host, service.plugin, &["--config", "host.toml"], log)
    }

    /// `host start <args>` in `dir`, after copying `plugin` to `dir/plugin.so`.
    fn start(
        dir: tempfile::TempDir,
        host: &Path,
        plugin: &Path,
        args: &[&str],
        log: &str,
    ) -> Master {
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
        let master = Master {
            pid: child.id(),
            dir,
            host: host.to_path_buf(),
            child,
        };
        // On failure `master` is dropped on the way out, which kills what did start.
        if rx.recv_timeout(Duration::from_secs(60)).is_err() {
            panic!("host did not become ready; its log:\n{}", master.log());
        }
        master
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

/// What each mode runs, and for how long. `--quick` is for development (minutes, still 5
/// interleaved rounds so that every ratio has a spread); the default is the one whose figures go
/// in docs/benchmarks.md; `--full` is the default plus the figures that only it runs (the
/// `FULL` list in suite.rs).
#[derive(Debug, Clone, Copy)]
pub struct Mode {
    pub name: &'static str,
    /// Wall-time budget of the measurements (the build is outside it), checked at the end.
    pub budget: Option<Duration>,
    /// Unmeasured wrk run per server before the rounds (caches, connection setup, clocks).
    pub warmup_secs: u32,
    pub steady_rounds: usize,
    pub steady_secs: u32,
    pub reload_rounds: usize,
    pub reload_secs: u32,
    pub reload_time_reloads: usize,
    pub reload_time_workers: &'static [usize],
    pub rebuild_rounds: usize,
    pub boundary_rounds: usize,
    pub boundary_warmup: Duration,
    pub boundary_measure: Duration,
}

pub const QUICK: Mode = Mode {
    name: "quick",
    budget: Some(Duration::from_secs(180)),
    warmup_secs: 1,
    steady_rounds: 5,
    steady_secs: 3,
    reload_rounds: 5,
    // Long enough for one reload at 2 s and a second of load after it.
    reload_secs: 3,
    reload_time_reloads: 5,
    reload_time_workers: &[1, 4],
    rebuild_rounds: 5,
    boundary_rounds: 5,
    boundary_warmup: Duration::from_millis(200),
    boundary_measure: Duration::from_millis(500),
};

pub const DEFAULT: Mode = Mode {
    name: "default",
    budget: Some(Duration::from_secs(20 * 60)),
    warmup_secs: 2,
    steady_rounds: 7,
    steady_secs: 10,
    reload_rounds: 7,
    // 9 reloads a run.
    reload_secs: 20,
    reload_time_reloads: 7,
    reload_time_workers: &[1, 2, 4, 8],
    rebuild_rounds: 21,
    boundary_rounds: 7,
    boundary_warmup: Duration::from_secs(1),
    boundary_measure: Duration::from_secs(2),
};

pub const FULL: Mode = Mode {
    name: "full",
    budget: None,
    ..DEFAULT
};

impl Mode {
    pub fn from_name(name: &str) -> Option<Mode> {
        [QUICK, DEFAULT, FULL].into_iter().find(|m| m.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_toml_names_probation_only_for_zero() {
        let plugin = Path::new("/x/hello.so");
        let default = Service::new(plugin, 2).toml();
        assert!(default.contains("workers = 2\nwatch = false\n"));
        assert!(!default.contains("probation"));
        let zero = Service {
            probation: Probation::Zero,
            ..Service::new(plugin, 2)
        }
        .toml();
        assert!(zero.contains("canary_probation = \"0s\"\nprobation = \"0s\"\n"));
    }
}
