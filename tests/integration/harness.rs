//! The test harness: builds the host and every plugin once, starts the real `host` in a temp
//! dir, and cleans up whatever a test started, also when it fails.
//!
//! - Every master runs in its own process group and each of its workers in one of their own;
//!   `Drop` stops the master (so it starts no more workers), SIGKILLs every worker's group and
//!   the master's, and reaps the master, so no process outlives a test, panicking or not.
//!   Nothing is killed by name.
//! - Ports are never fixed: services listen on port 0 and tests read the real address from
//!   `host status --json`.
//! - Readiness comes from the master's `host: ready` line on stdout, not from sleeps.
//! - On failure, the master's log (its stderr, which workers share) is printed.

use std::{
    fs,
    io::{BufRead, BufReader, Read},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{mpsc, Arc, Mutex, OnceLock},
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{kill, killpg, Signal},
    unistd::Pid,
};
use serde_json::Value;
use tempfile::TempDir;

/// Longest a test waits for anything (a build excepted).
pub const DEADLINE: Duration = Duration::from_secs(120);

/// The plugins and fixtures the tests use, by the name `plugin()` takes.
const PACKAGES: &[(&str, &str)] = &[
    ("hello", "hello"),
    ("versioned", "fixture_versioned"),
    ("echo", "echo"),
    ("slow", "slow"),
    ("panic", "panic"),
    ("counter", "counter"),
    ("chat", "chat"),
    ("wait", "wait"),
    ("fetch", "fetch"),
    ("api", "api"),
    ("upload", "upload"),
    ("sse", "sse"),
    ("bad-start", "fixture_bad_start"),
    ("start-panic", "fixture_start_panic"),
    ("start-hang", "fixture_start_hang"),
    ("start-crash", "fixture_start_crash"),
    ("old-api", "fixture_old_api"),
    ("not-a-plugin", "fixture_not_a_plugin"),
    ("inline-sleep", "fixture_inline_sleep"),
    ("api-0-1", "fixture_api_0_1"),
    ("api-0-2-0", "fixture_api_0_2_0"),
    ("async-wedge", "fixture_async_wedge"),
];

/// More builds of the `versioned` fixture, by the name `plugin()` takes, with the version and
/// the fault they are built with (see tests/fixtures/versioned): each a real rebuild of one
/// crate, as a user's edits would make.
const VARIANTS: &[(&str, &str, &str)] = &[
    ("versioned-v2", "v2", ""),
    ("versioned-v3", "v3", ""),
    ("fault-abort", "v2-abort", "abort"),
    ("fault-segv", "v2-segv", "segv"),
    ("fault-stack", "v2-stack", "stack"),
    ("fault-exit", "v2-exit", "exit"),
    ("fault-later-slot", "v2-later-slot", "later-slot"),
];

pub struct Artifacts {
    pub host: PathBuf,
    plugins: PathBuf,
}

impl Artifacts {
    /// A built plugin, by name: one of `PACKAGES` or `VARIANTS`.
    pub fn plugin(&self, name: &str) -> PathBuf {
        let path = self.plugins.join(format!("{name}.so"));
        assert!(
            path.exists(),
            "no built plugin {name} at {}",
            path.display()
        );
        path
    }
}

/// Builds the host and the plugins (once per test run) with the same cargo and target dir as
/// the test itself, then the `VARIANTS` of the versioned fixture.
pub fn artifacts() -> &'static Artifacts {
    static ARTIFACTS: OnceLock<Artifacts> = OnceLock::new();
    ARTIFACTS.get_or_init(|| {
        // target/<profile>/deps/integration-<hash>
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
        let target_dir = profile_dir.parent().unwrap().to_path_buf();
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .to_path_buf();
        let mut args = vec![
            "build".to_string(),
            "--target-dir".into(),
            target_dir.display().to_string(),
        ];
        for (name, lib) in PACKAGES {
            let package = if lib.starts_with("fixture_") {
                format!("fixture-{name}")
            } else {
                name.to_string()
            };
            args.extend(["-p".to_string(), package]);
        }
        args.extend(["-p".to_string(), "host".to_string()]);
        cargo(&root, &args, &[]);
        let plugins = target_dir.join("test-plugins");
        fs::create_dir_all(&plugins).unwrap();
        for (name, lib) in PACKAGES {
            copy_new_inode(
                &profile_dir.join(format!("lib{lib}.so")),
                &plugins.join(format!("{name}.so")),
            );
        }
        let fixture = [
            "build".to_string(),
            "--target-dir".into(),
            target_dir.display().to_string(),
            "-p".into(),
            "fixture-versioned".into(),
        ];
        for (name, version, fault) in VARIANTS {
            cargo(
                &root,
                &fixture,
                &[("FIXTURE_VERSION", version), ("FIXTURE_FAULT", fault)],
            );
            copy_new_inode(
                &profile_dir.join("libfixture_versioned.so"),
                &plugins.join(format!("{name}.so")),
            );
        }
        // Leave target/<profile>/libfixture_versioned.so as a plain build would.
        cargo(&root, &fixture, &[]);
        // The chat example as a second version, for the gateway's reload test.
        let chat = [
            "build".to_string(),
            "--target-dir".into(),
            target_dir.display().to_string(),
            "-p".into(),
            "chat".into(),
        ];
        cargo(&root, &chat, &[("CHAT_VERSION", "v2")]);
        copy_new_inode(&profile_dir.join("libchat.so"), &plugins.join("chat-v2.so"));
        cargo(&root, &chat, &[]);
        Artifacts {
            host: profile_dir.join("host"),
            plugins,
        }
    })
}

fn cargo(root: &Path, args: &[String], env: &[(&str, &str)]) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(args)
        .current_dir(root)
        .env_remove("FIXTURE_VERSION")
        .env_remove("FIXTURE_FAULT")
        .env_remove("CHAT_VERSION")
        .envs(env.iter().copied());
    let out = cmd.output().expect("could not run cargo");
    assert!(
        out.status.success(),
        "cargo {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Replaces `to` the way cargo does (remove, then a new file), never writing into the old inode.
pub fn copy_new_inode(from: &Path, to: &Path) {
    let _ = fs::remove_file(to);
    fs::copy(from, to)
        .unwrap_or_else(|e| panic!("copy {} -> {}: {e}", from.display(), to.display()));
}

/// A running master, its temp dir (cwd and state dir) and its output.
pub struct Host {
    pub dir: TempDir,
    child: Option<Child>,
    pub pid: u32,
    log: Arc<Mutex<String>>,
    /// The threads copying the master's stdout and stderr into `log`.
    readers: Vec<thread::JoinHandle<()>>,
}

impl Host {
    /// A temp dir holding `plugin.so`, a copy of the named plugin.
    pub fn dir_with_plugin(plugin: &str) -> TempDir {
        let dir = tempfile::tempdir().unwrap();
        copy_new_inode(&artifacts().plugin(plugin), &dir.path().join("plugin.so"));
        dir
    }

    /// One service, `plugin`, on 127.0.0.1 port 0 with `workers` workers (plus `extra` flags),
    /// from a fresh temp dir: the service is named `plugin` (after `plugin.so`).
    pub fn serving(plugin: &str, workers: usize, extra: &[&str]) -> Host {
        Host::serving_in(Host::dir_with_plugin(plugin), workers, extra)
    }

    /// Like `serving`, in a directory that already holds `plugin.so` (a restart in place).
    pub fn serving_in(dir: TempDir, workers: usize, extra: &[&str]) -> Host {
        Host::serving_with(dir, workers, extra, &[])
    }

    /// Like `serving_in`, with `env` set for the master (and so for its workers).
    pub fn serving_with(
        dir: TempDir,
        workers: usize,
        extra: &[&str],
        env: &[(&str, &Path)],
    ) -> Host {
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
        Host::start_with(dir, &args, env)
    }

    /// Sends `GET /?ms=N` to the first service (a `slow` one) on its own connection and returns
    /// once the handler is running (the plugin logs "sleeping N ms"); join the handle for the
    /// response.
    pub fn slow_request_in_flight(
        &self,
        ms: u64,
    ) -> thread::JoinHandle<Result<crate::http::Resp, String>> {
        let addr = self.status()["services"][0]["listen"][0]
            .as_str()
            .unwrap()
            .to_string();
        let request =
            thread::spawn(move || crate::http::Conn::new(&addr).get(&format!("/?ms={ms}")));
        let marker = format!("sleeping {ms} ms");
        wait_until("the slow request is in the handler", || {
            self.logs().contains(&marker)
        });
        request
    }

    /// `host start <args>` in `dir`, waiting for its ready line.
    pub fn start(dir: TempDir, args: &[&str]) -> Host {
        Host::start_with(dir, args, &[])
    }

    /// Like `start`, with `env` set for the master (and so for its workers).
    pub fn start_with(dir: TempDir, args: &[&str], env: &[(&str, &Path)]) -> Host {
        Host::launch("start", dir, args, env).unwrap_or_else(|(host, why)| {
            panic!(
                "host did not become ready: {why}\n--- host log ---\n{}",
                host.logs()
            )
        })
    }

    /// Like `start`, but a master that exits or stays silent is an `Err` (with the host, for its log).
    pub fn try_start(dir: TempDir, args: &[&str]) -> Result<Host, (Host, String)> {
        Host::launch("start", dir, args, &[])
    }

    /// `host start <args>` run through `wrapper` (a command that ends by executing its
    /// arguments, such as `sh -c '...; exec "$0" "$@"'`), until its ready line.
    pub fn launch_wrapped(wrapper: &[&str], dir: TempDir, args: &[&str]) -> Host {
        let mut cmd = Command::new(wrapper[0]);
        cmd.args(&wrapper[1..]).arg(&artifacts().host);
        Host::launch_command(cmd, "start", dir, args).unwrap_or_else(|(host, why)| {
            panic!(
                "host did not become ready: {why}\n--- host log ---\n{}",
                host.logs()
            )
        })
    }

    /// `host <subcommand> <args>` (`start` or `dev`) in `dir`, until its ready line.
    pub fn launch(
        subcommand: &str,
        dir: TempDir,
        args: &[&str],
        env: &[(&str, &Path)],
    ) -> Result<Host, (Host, String)> {
        let mut cmd = Command::new(&artifacts().host);
        cmd.envs(env.iter().copied());
        Host::launch_command(cmd, subcommand, dir, args)
    }

    pub fn launch_command(
        mut cmd: Command,
        subcommand: &str,
        dir: TempDir,
        args: &[&str],
    ) -> Result<Host, (Host, String)> {
        cmd.arg(subcommand)
            .args(args)
            .arg("--state-dir")
            .arg(dir.path().join(".host"))
            .current_dir(dir.path())
            .env_remove("HOST_STATE_DIR")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: Drop kills the master and every worker in one call.
            .process_group(0);
        let mut child = cmd.spawn().expect("could not start host");
        let pid = child.id();
        let log = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let readers = vec![
            drain_into(child.stderr.take().unwrap(), log.clone(), None),
            drain_into(child.stdout.take().unwrap(), log.clone(), Some(ready_tx)),
        ];
        let host = Host {
            dir,
            child: Some(child),
            pid,
            log,
            readers,
        };
        match ready_rx.recv_timeout(DEADLINE) {
            Ok(_) => Ok(host),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                Err((host, "no ready line within the deadline".into()))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err((host, "the master exited".into())),
        }
    }

    /// The master's output so far. Lines arrive through a pipe and a thread, so a line the
    /// host just wrote may not be here yet: use `wait_for_log` to expect one.
    pub fn logs(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the master's output contains `text`.
    pub fn wait_for_log(&self, text: &str) {
        let start = Instant::now();
        while !self.logs().contains(text) {
            assert!(
                start.elapsed() < DEADLINE,
                "timed out waiting for {text:?} in the host log:\n{}",
                self.logs()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join(".host")
    }

    /// Runs a client command (`reload`, `status`, ...) against this master.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(&artifacts().host);
        cmd.args(args)
            .arg("--state-dir")
            .arg(self.state_dir())
            .current_dir(self.dir.path());
        run(cmd)
    }

    /// `host reload`, asserting it succeeded.
    pub fn reload_ok(&self) -> String {
        let out = self.cli(&["reload"]);
        let text = output_text(&out);
        assert!(
            out.status.success(),
            "reload failed:\n{text}\n--- host log ---\n{}",
            self.logs()
        );
        text
    }

    pub fn status(&self) -> Value {
        let out = self.cli(&["status", "--json"]);
        assert!(out.status.success(), "status failed: {}", output_text(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn service(&self, name: &str) -> Value {
        let status = self.status();
        status["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no service {name} in {status}"))
            .clone()
    }

    /// The first bound address of a service, as `127.0.0.1:PORT`.
    pub fn addr(&self, service: &str) -> String {
        self.service(service)["listen"][0]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Pids of the service's ready workers.
    /// Waits until `service`, which had the ready workers `old`, has as many ready workers
    /// again and none of them is one of `old`.
    pub fn wait_for_replacement(&self, service: &str, old: &[u32]) {
        wait_until(&format!("{service}'s workers {old:?} are replaced"), || {
            let now = self.ready_pids(service);
            now.len() == old.len() && now.iter().all(|p| !old.contains(p))
        });
    }

    pub fn ready_pids(&self, service: &str) -> Vec<u32> {
        let svc = self.service(service);
        let mut pids: Vec<u32> = svc["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["state"] == "ready")
            .map(|w| w["pid"].as_u64().unwrap() as u32)
            .collect();
        pids.sort();
        pids
    }

    /// Puts plugin `name` where the service loads from, as a rebuild would.
    pub fn replace_plugin(&self, name: &str) {
        copy_new_inode(
            &artifacts().plugin(name),
            &self.dir.path().join("plugin.so"),
        );
    }

    /// Waits until the master process has exited; returns whether it exited with status 0.
    pub fn wait_exit(&mut self) -> bool {
        let mut child = self.child.take().expect("already waited");
        let (tx, rx) = mpsc::channel();
        let pid = child.id();
        thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        match rx.recv_timeout(DEADLINE) {
            Ok(status) => {
                // Read the output to its end once every process that held the pipes is gone;
                // after an upgrade the new master still holds them, so do not wait for long.
                let until = Instant::now() + Duration::from_secs(2);
                while self.readers.iter().any(|r| !r.is_finished()) && Instant::now() < until {
                    thread::sleep(Duration::from_millis(10));
                }
                status.map(|s| s.success()).unwrap_or(false)
            }
            Err(_) => {
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                panic!(
                    "master {pid} did not exit within the deadline\n{}",
                    self.logs()
                )
            }
        }
    }

    /// Kills this master (as Drop does) and hands its directory on, for a restart in place.
    pub fn into_dir(mut self) -> TempDir {
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }

    /// Sends a signal to the master only.
    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid as i32), signal).unwrap();
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // After an upgrade, the master the pid file names is another process, and it runs on
        // after the first one exited (a test that waited for that exit has no child left to
        // kill). Only a process that runs in this test's directory is ours: a stale pid file
        // could name a pid reused by anything.
        let current = fs::read_to_string(self.state_dir().join("host.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            .filter(|p| *p != self.pid)
            .filter(|p| {
                fs::read_link(format!("/proc/{p}/cwd")).ok()
                    == fs::canonicalize(self.dir.path()).ok()
            });
        if let Some(current) = current {
            kill_master_and_workers(current);
        }
        if self.child.is_some() {
            kill_master_and_workers(self.pid);
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
        if thread::panicking() {
            eprintln!(
                "--- host log (master pid {}) ---\n{}",
                self.pid,
                self.logs()
            );
        }
    }
}

/// Kills a master and every worker it started, each worker's process group included (a
/// worker leads its own group). The master is stopped first, so it cannot start another
/// worker between the look at its children and the kill.
pub fn kill_master_and_workers(master: u32) {
    let master_pid = Pid::from_raw(master as i32);
    let _ = kill(master_pid, Signal::SIGSTOP);
    for worker in children(master) {
        let _ = killpg(Pid::from_raw(worker as i32), Signal::SIGKILL);
    }
    let _ = killpg(master_pid, Signal::SIGKILL);
    // A master started by an upgrade is in the first master's group, not one it leads.
    let _ = kill(master_pid, Signal::SIGKILL);
}

/// The pids whose parent is `pid`, from /proc.
pub fn children(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return found;
    };
    for task in tasks.flatten() {
        let list = fs::read_to_string(task.path().join("children")).unwrap_or_default();
        found.extend(
            list.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    found
}

/// Copies a child's pipe into `log` on a thread; with `ready`, reports the `host: ready` line.
fn drain_into(
    pipe: impl Read + Send + 'static,
    log: Arc<Mutex<String>>,
    ready: Option<mpsc::Sender<()>>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if line.starts_with("host: ready") {
                if let Some(tx) = &ready {
                    let _ = tx.send(());
                }
            }
            let mut log = log.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    })
}

/// Runs a command to completion under the deadline (killed by pid if it overruns).
pub fn run(mut cmd: Command) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("could not run command");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            panic!("{cmd:?} did not finish within {DEADLINE:?}")
        }
    }
}

pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Whether a process exists (zombies count as gone: they run nothing).
pub fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// Waits for `cond`, polling: for conditions the host has no signal for (another process's
/// death, a slot being refilled).
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting until {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// A temp dir with a config file `host.toml` (and `plugin.so` when `plugin` is given).
pub fn dir_with_config(config: &str, plugins: &[(&str, &str)]) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (file, plugin) in plugins {
        copy_new_inode(&artifacts().plugin(plugin), &dir.path().join(file));
    }
    fs::write(dir.path().join("host.toml"), config).unwrap();
    dir
}
