//! Edit -> live: from a one-line edit of the hello plugin's source (the file written) to the
//! first response carrying the new answer, through a real `cargo build` each time:
//!
//! - `host dev` (debug: the profile `host dev` builds): its watcher sees the edit, waits out its
//!   debounce, runs `cargo build`, and the host's plugin watcher reloads the new library;
//! - `cargo build && host reload`, debug and release: the bench runs the build, then the
//!   reload, on a master with probation 0 (as `host dev`) serving cargo's output file.
//!
//! Never in the repository: each variant builds a copy of `plugins/hello/src/lib.rs` in a crate
//! of its own under `<target>/bench-edit-live/` (a `[workspace]` of its own, plugin-api by
//! path, cargo's lock file copied from the workspace so that it resolves the same versions),
//! with a target dir of its own, so that a second run of the suite rebuilds only the plugin.
//! The edit changes the line that names hello's version to a new string each round.

use std::{
    fs,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use super::{curve, Points};
use crate::{
    chart, prefork::free_port, procs, report::RoundTable, root, target_dir, without_cargo_run_env,
    Build, Master,
};

/// The line the edit replaces in hello's source (its version when `HELLO_VERSION` is unset).
const LINE: &str = "    None => \"v1\",";
/// Between two requests while waiting for the new answer (each on a new connection): coarse
/// enough to leave the cores to the build, fine against builds of a second or more.
const POLL: Duration = Duration::from_millis(10);
/// A round that takes longer than this is a failure, not a slow figure.
const GIVE_UP: Duration = Duration::from_secs(300);
const WORKERS: usize = 2;

#[derive(Clone, Copy, PartialEq)]
enum Variant {
    Dev,
    Debug,
    Release,
}

const VARIANTS: [Variant; 3] = [Variant::Dev, Variant::Debug, Variant::Release];

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Dev => "`host dev` (debug)",
            Variant::Debug => "`cargo build && host reload` (debug)",
            Variant::Release => "`cargo build --release && host reload` (release)",
        }
    }

    fn dir(self) -> &'static str {
        match self {
            Variant::Dev => "dev",
            Variant::Debug => "debug",
            Variant::Release => "release",
        }
    }
}

/// A crate copied from hello, with its target dir.
struct Crate {
    dir: PathBuf,
    target: PathBuf,
}

impl Crate {
    fn make(v: Variant) -> Crate {
        let base = target_dir().join("bench-edit-live").join(v.dir());
        let dir = base.join("crate");
        fs::create_dir_all(dir.join("src")).unwrap();
        let manifest = format!(
            "[package]\nname = \"hello\"\nversion = \"0.1.0\"\nedition = \"2021\"\npublish = \
             false\n\n[lib]\ncrate-type = [\"cdylib\"]\n\n[dependencies]\nplugin-api = {{ path \
             = {:?} }}\n\n# Not a member of the repository's workspace.\n[workspace]\n",
            root().join("plugin-api").display().to_string()
        );
        write_if_changed(&dir.join("Cargo.toml"), &manifest);
        if !dir.join("Cargo.lock").exists() {
            fs::copy(root().join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();
        }
        let c = Crate {
            dir,
            target: base.join("target"),
        };
        c.edit("edit-0");
        c
    }

    /// Writes hello's source with its version line answering `version`.
    fn edit(&self, version: &str) {
        let source = fs::read_to_string(root().join("plugins/hello/src/lib.rs")).unwrap();
        assert!(
            source.contains(LINE),
            "plugins/hello/src/lib.rs no longer has the line the edit replaces: {LINE}"
        );
        let edited = source.replacen(LINE, &format!("    None => {version:?},"), 1);
        fs::write(self.dir.join("src/lib.rs"), edited).unwrap();
    }

    /// `cargo build [--release]` of the copy: the environment the suite's builds get (no
    /// `HELLO_VERSION`), offline (the lock file names what the workspace already fetched).
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = crate::cargo_command();
        cmd.args(args)
            .arg("--manifest-path")
            .arg(self.dir.join("Cargo.toml"))
            .env("CARGO_TARGET_DIR", &self.target)
            .env("CARGO_NET_OFFLINE", "true")
            .env_remove("HELLO_VERSION");
        cmd
    }

    fn build(&self, release: bool) {
        let mut args = vec!["build", "--quiet"];
        if release {
            args.push("--release");
        }
        let out = self.command(&args).output().unwrap();
        assert!(
            out.status.success(),
            "cargo build of {} failed: {}",
            self.dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn library(&self, release: bool) -> PathBuf {
        self.target
            .join(if release { "release" } else { "debug" })
            .join("libhello.so")
    }
}

fn write_if_changed(path: &Path, text: &str) {
    if fs::read_to_string(path).ok().as_deref() != Some(text) {
        fs::write(path, text).unwrap();
    }
}

/// `host dev` on a crate, in its own process group; killed with its workers when dropped.
struct Dev {
    pid: u32,
    child: std::process::Child,
    addr: String,
    _state: tempfile::TempDir,
}

impl Dev {
    fn start(host: &Path, c: &Crate) -> Dev {
        let state = tempfile::tempdir().unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let log = fs::File::create(state.path().join("dev.log")).unwrap();
        let mut cmd = Command::new(host);
        without_cargo_run_env(&mut cmd);
        let child = cmd
            .arg("dev")
            .arg(&c.dir)
            .args(["--listen", &addr, "--workers", &WORKERS.to_string()])
            .arg("--state-dir")
            .arg(state.path().join(".host"))
            .env("CARGO_TARGET_DIR", &c.target)
            .env("CARGO_NET_OFFLINE", "true")
            .env_remove("HELLO_VERSION")
            .env("HOST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap();
        Dev {
            pid: child.id(),
            child,
            addr,
            _state: state,
        }
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        // The master first (its cargo builds are in its process group), then each worker's.
        procs::kill_master_and_workers(self.pid);
        let _ = self.child.wait();
    }
}

/// Waits until `addr` answers with `version` in the body; the time since `start`, in ms.
fn first_answer(addr: &str, version: &str, start: Instant) -> f64 {
    let agent = ureq::AgentBuilder::new()
        .max_idle_connections(0)
        .timeout(Duration::from_secs(5))
        .build();
    let want = format!("hello {version}\n");
    loop {
        let body = crate::body_of(&agent, addr);
        if body.is_some_and(|b| b.ends_with(&want)) {
            return start.elapsed().as_secs_f64() * 1000.0;
        }
        assert!(
            start.elapsed() < GIVE_UP,
            "{addr} never answered with {version}"
        );
        thread::sleep(POLL);
    }
}

/// The curve's table and chart (a bar per variant, as points 1, 2, 3 on x).
pub fn run(b: &Build, rounds: usize, svg: &Path) -> RoundTable {
    let crates = VARIANTS.map(Crate::make);
    // The first builds (dependencies included, on a first run) before the rounds: `host dev`
    // builds its own as it starts.
    crates[1].build(false);
    crates[2].build(true);
    let dev = Dev::start(&b.host, &crates[0]);
    first_answer(&dev.addr, "edit-0", Instant::now());
    let manual = |release: bool| {
        let lib = crates[if release { 2 } else { 1 }].library(release);
        let config = format!(
            "[[service]]\nname = \"hello\"\nlisten = [\"127.0.0.1:0\"]\nplugin = {:?}\n\
             workers = {WORKERS}\ncanary_probation = \"0s\"\nprobation = \"0s\"\n",
            lib.display().to_string()
        );
        Master::with_config(&b.host, &config, &lib, "info", None)
    };
    let (debug, release) = (manual(false), manual(true));
    let addrs = [dev.addr.clone(), debug.addr(), release.addr()];

    let mut ms = vec![Vec::new(); VARIANTS.len()];
    for round in 1..=rounds {
        // Each variant first, second and third in turn.
        for k in 0..VARIANTS.len() {
            let i = (round + k) % VARIANTS.len();
            let v = VARIANTS[i];
            let version = format!("edit-{round}-{}", v.dir());
            let start = Instant::now();
            crates[i].edit(&version);
            if v != Variant::Dev {
                let is_release = v == Variant::Release;
                crates[i].build(is_release);
                let master = if is_release { &release } else { &debug };
                let out = master.cli(&["reload"]);
                assert!(
                    out.status.success(),
                    "host reload failed: {}",
                    String::from_utf8_lossy(&out.stdout)
                );
            }
            ms[i].push(first_answer(&addrs[i], &version, start));
        }
    }
    drop(dev);
    drop((debug, release));

    let mut t = RoundTable::new(rounds);
    for (i, v) in VARIANTS.iter().enumerate() {
        t.values(
            &format!("edit -> first new answer (ms): {}", v.name()),
            &ms[i],
        );
    }
    t.ratios(
        "**`host dev` / `cargo build && host reload`, debug**",
        &crate::report::ratios(&ms[0], &ms[1]),
        None,
    );
    let points = |i: usize| -> Points { vec![((i + 1) as f64, ms[i].clone())] };
    chart::draw_curves(
        svg,
        &[chart::CurvePanel {
            caption: "edit -> first new answer (1: host dev, 2: cargo build && host reload, \
                      3: the same --release)"
                .into(),
            x_desc: "variant",
            y_desc: "ms",
            curves: (0..VARIANTS.len())
                .map(|i| curve(VARIANTS[i].name(), &points(i)))
                .collect(),
        }],
    )
    .expect("could not draw the chart");
    t
}
