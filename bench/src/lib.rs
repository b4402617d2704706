//! Shared parts of the benchmarks: release builds of the host and plugins, a master started in
//! its own process group (killed as a group when dropped), the modes and their budgets, and the
//! report (per-round ratios, median, spread, verdict; `report.rs`). The suite's figures
//! (`figures/`) and scaling curves (`scaling/`) are library modules too, beside all this that
//! they use; `bin/suite.rs` is the driver that picks and runs them.

pub mod chart;
pub mod figures;
pub mod gateway;
pub mod load;
pub mod nginx;
pub mod prefork;
pub mod procs;
pub mod rebuild;
pub mod report;
pub mod scaling;
pub mod tls;
pub mod upgrade;
pub mod wrk;
pub mod ws;

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

/// Release builds: `host`, `baseline` and `ws_baseline`; `hello` and `chat` (figure 13's
/// WebSocket plugin) as v1 and v2, and `hello-async`, copied to `<target>/bench-plugins`.
pub struct Build {
    pub host: PathBuf,
    pub baseline: PathBuf,
    pub ws_baseline: PathBuf,
    pub hello_v1: PathBuf,
    pub hello_v2: PathBuf,
    /// hello's handler as an async plugin (the `async` figure).
    pub hello_async: PathBuf,
    pub chat_v1: PathBuf,
    pub chat_v2: PathBuf,
}

impl Build {
    /// The hello build for the next of a series of reloads: v2, v1, v2, ... (`swaps` counts
    /// them), so that every reload loads a different build than the last.
    pub fn next_hello(&self, swaps: &mut usize) -> &Path {
        *swaps += 1;
        if *swaps % 2 == 1 {
            &self.hello_v2
        } else {
            &self.hello_v1
        }
    }
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
    let host = build_host_in(&host_target);
    cargo(
        &[
            "build",
            "--release",
            "-p",
            "bench",
            "--bin",
            "baseline",
            "--bin",
            "ws_baseline",
        ],
        None,
        &[],
    );
    // chat v2 beside hello v2: both plugins depend on plugin-api alone, so building them
    // together unifies nothing new, and a second run finds both fresh.
    let v2_target = target.join("bench-hello-v2");
    cargo(
        &["build", "--release", "-p", "hello", "-p", "chat"],
        Some(&v2_target),
        &[("HELLO_VERSION", "v2"), ("CHAT_VERSION", "v2")],
    );
    let copy = |from: &Path, name: &str| {
        let to = out.join(name);
        replace(from, &to);
        to
    };
    let b = Build {
        host,
        baseline: target.join("release/baseline"),
        ws_baseline: target.join("release/ws_baseline"),
        hello_v1: copy(&host_target.join("release/libhello.so"), "hello-v1.so"),
        hello_v2: copy(&v2_target.join("release/libhello.so"), "hello-v2.so"),
        hello_async: copy(
            &host_target.join("release/libhello_async.so"),
            "hello-async.so",
        ),
        chat_v1: copy(&host_target.join("release/libchat.so"), "chat-v1.so"),
        chat_v2: copy(&v2_target.join("release/libchat.so"), "chat-v2.so"),
    };
    for p in [
        &b.host,
        &b.baseline,
        &b.ws_baseline,
        &b.hello_v1,
        &b.hello_v2,
        &b.hello_async,
        &b.chat_v1,
        &b.chat_v2,
    ] {
        assert!(p.is_file(), "the build did not produce {}", p.display());
    }
    b
}

/// The release host binary alone (built with hello, hello-async and chat, in the same target
/// dir as [`build`], so that both find it fresh).
pub fn build_host() -> PathBuf {
    build_host_in(&target_dir().join("bench-host"))
}

fn build_host_in(host_target: &Path) -> PathBuf {
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
            "-p",
            "chat",
        ],
        Some(host_target),
        // hello v1 and chat v1 by name: the README's walk-through edits hello's default to v2,
        // and the figures that switch between the two builds must get two versions anyway.
        &[("HELLO_VERSION", "v1"), ("CHAT_VERSION", "v1")],
    );
    host_target.join("release/host")
}

/// Release builds of the tests' `fixture-versioned` crate, one per `(name, version, fault)`
/// (the `FIXTURE_VERSION` and `FIXTURE_FAULT` it reads when built, as tests/integration/
/// harness.rs builds its fault variants), copied to `<target>/bench-plugins/<name>.so`.
/// All in one target dir of their own: each variant rebuilds only the fixture crate.
pub fn build_fixtures(variants: &[(&str, &str, &str)]) -> Vec<PathBuf> {
    let target = target_dir();
    let fixture_target = target.join("bench-fixtures");
    let out = target.join("bench-plugins");
    fs::create_dir_all(&out).unwrap();
    variants
        .iter()
        .map(|(name, version, fault)| {
            cargo(
                &["build", "--release", "-p", "fixture-versioned"],
                Some(&fixture_target),
                &[("FIXTURE_VERSION", version), ("FIXTURE_FAULT", fault)],
            );
            let to = out.join(format!("{name}.so"));
            replace(&fixture_target.join("release/libfixture_versioned.so"), &to);
            to
        })
        .collect()
}

/// Where the plugin-boundary microbenchmark is built: a target dir of its own, because
/// `cargo bench -p bench` unifies the features of bench's dev-dependencies (host, criterion) into
/// hello's and bench's own dependencies, and in the shared dir every run would then rebuild
/// them twice (see [`build`]).
pub fn boundary_target() -> PathBuf {
    target_dir().join("bench-boundary")
}

/// Compiles the microbenchmarks (plugin boundary, metrics counting) without running them, so
/// that their build time is not counted in the time of the figures that run them. Both in one
/// invocation and one target dir: same package, same features.
pub fn build_boundary() {
    cargo(
        &[
            "bench", "--no-run", "-p", "bench", "--bench", "boundary", "--bench", "stats",
        ],
        Some(&boundary_target()),
        &[],
    );
}

/// The cargo that runs us (`CARGO` under `cargo run` and `cargo bench`), or the one on PATH,
/// without the variables `cargo run` sets for the crate it runs (`CARGO_PKG_NAME`,
/// `CARGO_MANIFEST_DIR`, ...): build scripts such as ring's ask to rerun when those change, so
/// passing ours on would rebuild ring, rustls and ureq on every run, and again for `cargo run`.
pub fn cargo_command() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    without_cargo_run_env(&mut cmd);
    cmd
}

/// Removes from `cmd`'s environment what `cargo run` set for the crate it runs (see
/// [`cargo_command`]); for any process that runs cargo in turn, such as `host dev`.
pub fn without_cargo_run_env(cmd: &mut Command) -> &mut Command {
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

/// The release host and v1 of plugin `plugin` (`hello` or `hello-async`) of commit `rev` of this
/// repository (figure `ab`): its tree exported with `git archive` into
/// `<target>/bench-ab/<commit>/src` and built there, in a target dir beside it (a second run
/// finds both fresh). Returns the commit's short hash, the host binary and the plugin.
pub fn build_at(rev: &str, plugin: &str) -> (String, PathBuf, PathBuf) {
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .args(args)
            .current_dir(root())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let commit = git(&["rev-parse", "--verify", &format!("{rev}^{{commit}}")]);
    let short = git(&["rev-parse", "--short", &commit]);
    let dir = target_dir().join("bench-ab").join(&commit);
    let src = dir.join("src");
    if !src.join("Cargo.toml").is_file() {
        let _ = fs::remove_dir_all(&src);
        fs::create_dir_all(&src).unwrap();
        let mut archive = Command::new("git")
            .args(["archive", "--format=tar", &commit])
            .current_dir(root())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let untar = Command::new("tar")
            .args(["-x", "-C"])
            .arg(&src)
            .stdin(archive.stdout.take().unwrap())
            .status()
            .unwrap();
        let archived = archive.wait().unwrap();
        assert!(
            archived.success() && untar.success(),
            "could not export {commit} into {}",
            src.display()
        );
    }
    let target = dir.join("target");
    cargo_in(
        &src,
        &["build", "--release", "-p", "host", "-p", plugin],
        Some(&target),
        &[("HELLO_VERSION", "v1")],
    );
    let library = format!("release/lib{}.so", plugin.replace('-', "_"));
    let (host, library) = (target.join("release/host"), target.join(library));
    assert!(
        host.is_file() && library.is_file(),
        "the build of {commit} made no host or {plugin}"
    );
    (short, host, library)
}

/// `cargo ARGS [--target-dir DIR]` with the build-time variables the plugins read
/// (`HELLO_VERSION`, `CHAT_VERSION`, `FIXTURE_VERSION`, `FIXTURE_FAULT`, `PAD_MIB`,
/// `PAD_VERSION`) unset unless `env` sets them.
fn cargo(args: &[&str], target_dir: Option<&Path>, env: &[(&str, &str)]) {
    cargo_in(&root(), args, target_dir, env)
}

/// [`cargo`] in the workspace at `dir`.
fn cargo_in(dir: &Path, args: &[&str], target_dir: Option<&Path>, env: &[(&str, &str)]) {
    let mut cmd = cargo_command();
    cmd.args(args)
        .current_dir(dir)
        .env_remove("HELLO_VERSION")
        .env_remove("CHAT_VERSION")
        .env_remove("FIXTURE_VERSION")
        .env_remove("FIXTURE_FAULT")
        .env_remove("PAD_MIB")
        .env_remove("PAD_VERSION")
        .envs(env.iter().copied());
    if let Some(dir) = target_dir {
        cmd.arg("--target-dir").arg(dir);
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
    /// `tls = { cert, key }` (absolute paths).
    pub tls: Option<(&'a Path, &'a Path)>,
    /// `access_log = { path, format = "json" }`.
    pub access_log: Option<&'a Path>,
}

impl<'a> Service<'a> {
    pub fn new(plugin: &'a Path, workers: usize) -> Service<'a> {
        Service {
            plugin,
            workers,
            probation: Probation::Default,
            watch: false,
            tls: None,
            access_log: None,
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
        if let Some((cert, key)) = self.tls {
            t += &format!(
                "tls = {{ cert = {:?}, key = {:?} }}\n",
                cert.display().to_string(),
                key.display().to_string()
            );
        }
        if let Some(path) = self.access_log {
            t += &format!(
                "access_log = {{ path = {:?}, format = \"json\" }}\n",
                path.display().to_string()
            );
        }
        t
    }
}

/// The body `GET http://ADDR/` answers, if it answers.
pub fn body_of(agent: &ureq::Agent, addr: &str) -> Option<String> {
    agent
        .get(&format!("http://{addr}/"))
        .call()
        .ok()
        .and_then(|r| r.into_string().ok())
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

    /// `host start --config host.toml` with the given config text (a service's `plugin` should
    /// be `plugin.so`, which is a copy of `plugin`).
    /// The temp dir (state dir, config, plugin, log) is made in `parent`, or in the system's
    /// temp dir.
    pub fn with_config(
        host: &Path,
        config: &str,
        plugin: &Path,
        log: &str,
        parent: Option<&Path>,
    ) -> Master {
        let dir = match parent {
            Some(p) => tempfile::tempdir_in(p).unwrap(),
            None => tempfile::tempdir().unwrap(),
        };
        fs::write(dir.path().join("host.toml"), config).unwrap();
        Master::start(dir, host, plugin, &["--config", "host.toml"], log)
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

    /// `host reload` after putting `plugin` in place of the plugin file: its wall time in ms
    /// (the CLI returns when every worker was replaced). Panics if the reload failed.
    pub fn timed_reload(&self, plugin: &Path) -> f64 {
        replace(plugin, &self.plugin_path());
        let start = std::time::Instant::now();
        let out = self.cli(&["reload"]);
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        assert!(
            out.status.success(),
            "reload failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ms
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

    /// The master serving now: after `host upgrade` it is another process than the one this
    /// started (`pid`), named in the state dir's pid file.
    pub fn current_pid(&self) -> Option<u32> {
        fs::read_to_string(self.dir.path().join(".host/host.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        // Every master this one became through upgrades (the pid file names the last; the ones
        // between exited once they handed over), then the first. Each worker leads a process
        // group of its own, so killing the masters' group alone would leave them draining.
        if let Some(current) = self.current_pid().filter(|p| *p != self.pid) {
            procs::kill_master_and_workers(current);
        }
        procs::kill_master_and_workers(self.pid);
        let _ = killpg(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// What each mode runs, and for how long. `--quick` is for development (minutes, still 5
/// interleaved rounds so that every ratio has a spread); the default is the one whose figures go
/// in docs/benchmarks.md; `--full` is the default plus the figures that only it runs (the
/// `FULL_ONLY` list in bin/suite.rs).
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
    /// Upgrade time with no load: rounds (one `host upgrade` per master each) and worker counts.
    pub upgrade_time_rounds: usize,
    pub upgrade_time_workers: &'static [usize],
    /// Upgrades under load: rounds of a run without and a run with upgrades, and their length
    /// (an upgrade at 1 s, 3 s, ... while it can finish within the run).
    pub upgrade_load_rounds: usize,
    pub upgrade_load_secs: u32,
    pub boundary_rounds: usize,
    pub boundary_warmup: Duration,
    pub boundary_measure: Duration,
    /// HTTPS and HTTP/2 (figure 10): rounds, and the length of each run (HTTP/1.1 over TLS with
    /// wrk, HTTP/2 with h2load, a new connection per request), per server.
    pub tls_rounds: usize,
    pub tls_secs: u32,
    /// Access log (figure 11): rounds of one run per variant (off, to a file, to /dev/null).
    pub access_log_rounds: usize,
    pub access_log_secs: u32,
    /// Figure 14 (async against inline sync): rounds, and seconds per run.
    pub async_rounds: usize,
    pub async_secs: u32,
    /// The metrics-counting microbenchmark (figure 12): rounds, criterion's warm-up and
    /// measurement per variant and round.
    pub stats_rounds: usize,
    pub stats_warmup: Duration,
    pub stats_measure: Duration,
    /// WebSocket gateway (figure 13): rounds of an echo run per side (host, host with a reload
    /// every 2 s, baseline) and its length; idle connections opened per server and round for
    /// the memory per connection.
    pub gateway_rounds: usize,
    pub gateway_secs: u32,
    pub gateway_idle_conns: usize,
    /// The scaling curves (`--full`, or named): their points, rounds and run lengths.
    pub scaling: scaling::Settings,
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
    upgrade_time_rounds: 5,
    upgrade_time_workers: &[1, 4],
    // One upgrade a run.
    upgrade_load_rounds: 5,
    upgrade_load_secs: 3,
    boundary_rounds: 5,
    boundary_warmup: Duration::from_millis(200),
    boundary_measure: Duration::from_millis(500),
    tls_rounds: 5,
    tls_secs: 2,
    access_log_rounds: 5,
    access_log_secs: 2,
    async_rounds: 5,
    async_secs: 3,
    stats_rounds: 5,
    stats_warmup: Duration::from_millis(100),
    stats_measure: Duration::from_millis(300),
    // One reload a run, at 2 s, with its canary probation (1 s) over before the run ends.
    gateway_rounds: 5,
    gateway_secs: 4,
    gateway_idle_conns: 1_000,
    scaling: scaling::QUICK,
};

pub const DEFAULT: Mode = Mode {
    name: "default",
    budget: Some(Duration::from_secs(20 * 60)),
    warmup_secs: 2,
    steady_rounds: 7,
    steady_secs: 10,
    reload_rounds: 7,
    // 7 reloads a run. (20 s runs took the default mode to 20 min 15 s with figures 9-12 and
    // 14, and 18 s runs to 20 min 6 s: 7 rounds of 4 runs is 28 runs, so 2 s less each is
    // about 56 s less.)
    reload_secs: 16,
    reload_time_reloads: 7,
    reload_time_workers: &[1, 2, 4, 8],
    rebuild_rounds: 21,
    upgrade_time_rounds: 7,
    upgrade_time_workers: &[1, 2, 4],
    // 4 upgrades a run, 20 in all.
    upgrade_load_rounds: 5,
    upgrade_load_secs: 10,
    boundary_rounds: 7,
    boundary_warmup: Duration::from_secs(1),
    boundary_measure: Duration::from_secs(2),
    // 5 rounds of 3 s runs (not the 7 of 10 s of figure 1): with figure 10's 30 runs and figure
    // 11's 15, more would take the default mode past its 20 min (4 s runs, with figure 14's and
    // figure 2's 18 s, took it to 20 min 6 s).
    tls_rounds: 5,
    tls_secs: 3,
    access_log_rounds: 5,
    access_log_secs: 3,
    // As figure 10's: 7 rounds of 10 s would take the default mode past its 20 min.
    async_rounds: 5,
    async_secs: 3,
    stats_rounds: 7,
    stats_warmup: Duration::from_millis(200),
    stats_measure: Duration::from_millis(500),
    // Reloads at 2 s and 4 s; 5 rounds of 5 s, not figure 1's 7 of 10 s: about 2 min 30 s in
    // all. Figure 13 is not in the default run (it would take it past its 20 min), but these are
    // its settings for `bash bench/run.sh gateway` and `--full`.
    gateway_rounds: 5,
    gateway_secs: 5,
    gateway_idle_conns: 10_000,
    scaling: scaling::DEFAULT,
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
        assert!(!default.contains("tls") && !default.contains("access_log"));
        let ops = Service {
            tls: Some((Path::new("/c/cert.pem"), Path::new("/c/key.pem"))),
            access_log: Some(Path::new("/dev/null")),
            ..Service::new(plugin, 2)
        }
        .toml();
        assert!(ops.contains("tls = { cert = \"/c/cert.pem\", key = \"/c/key.pem\" }\n"));
        assert!(ops.contains("access_log = { path = \"/dev/null\", format = \"json\" }\n"));
    }
}
