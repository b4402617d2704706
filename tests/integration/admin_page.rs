//! The admin page in a real browser: headless Chromium, driven by tests/browser/admin_page.py
//! through Selenium and the system chromedriver. The page signs in with the token from the URL
//! fragment and from its form, loads with no console error under the page's CSP, shows the
//! workers the API reports, and a reload clicked on the page (its confirm() accepted) replaces
//! them, then a rollback clicked on the page replaces them again and shows the version it left
//! as set aside: the page then shows the pids `/api/status` reports. A service a config reload
//! removed is listed as kept but not running, with the version it ran.
//!
//! The script runs in its own process group (chromedriver and Chromium too): the group is
//! killed when the test ends, however it ends, and the test checks that nothing of it is left.
//! Missing Chromium, chromedriver or Selenium fails the test with what to install.
//!
//! The screenshot goes to the host's temp dir, or to `$ADMIN_PAGE_SCREENSHOT` when set (to look
//! at it, or at the page as it was when a check failed).

use std::{
    fs,
    io::{Read, Write},
    net::TcpStream,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::{
        signal::{killpg, Signal},
        wait::{waitid, Id, WaitPidFlag},
    },
    unistd::Pid,
};
use serde_json::Value;

use crate::{
    admin,
    harness::{wait_until, Host},
    load::Load,
};

const PYTHON: &str = "/usr/bin/python3";
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const INSTALL: &str = "install Chromium, its WebDriver and Selenium with `apt-get install \
                       chromium chromium-driver python3-selenium` (CI installs them)";
/// The whole browser run; each of the script's own waits is 20 s at most.
const SCRIPT_DEADLINE: Duration = Duration::from_secs(90);

#[test]
fn the_admin_page_shows_the_workers_and_reloads_and_rolls_back_from_clicks() {
    browser_prerequisites();
    let dir = Host::dir_with_plugin("hello");
    let token = random_token();
    let token_file = dir.path().join("admin-token");
    fs::write(&token_file, format!("{token}\n")).unwrap();
    fs::set_permissions(&token_file, fs::Permissions::from_mode(0o600)).unwrap();
    let host = Host::serving_in(
        dir,
        2,
        &[
            "--admin",
            "127.0.0.1:0",
            "--admin-token-file",
            token_file.to_str().unwrap(),
        ],
    );
    host.wait_for_log("; admin on http://");
    let url = admin_url(&host.logs());
    let admin = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();

    let before = ready_pids(&api_get(&admin, &token, "/api/status"));
    assert_eq!(before.len(), 2, "{}", host.logs());
    // Some traffic, so that the chart has something to draw in the screenshot.
    let load = Stopping(Some(Load::start(
        &host.addr("plugin"),
        1,
        Duration::from_millis(20),
    )));
    load.0.as_ref().unwrap().wait_for_more(10);

    // A rebuild for the page's reload to go live, and for its rollback to leave.
    host.replace_plugin("counter");

    let screenshot = std::env::var_os("ADMIN_PAGE_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| host.dir.path().join("admin-page.png"));
    let result = run_browser(
        &[
            "--url",
            &url,
            "--service",
            "plugin",
            "--expect-pids",
            &join(&before),
            "--expect-traffic",
            "--rollback",
            "--screenshot",
            screenshot.to_str().unwrap(),
        ],
        &token,
    );
    drop(load);

    let shown = pids_of(&result["shown"]);
    let after_reload = pids_of(&result["after_reload"]);
    let after_rollback = pids_of(&result["after_rollback"]);
    assert_eq!(shown, before, "the page showed other workers than the API");
    assert!(
        after_reload.iter().all(|p| !before.contains(p)),
        "the page shows an old worker after the reload: {after_reload:?} (before: {before:?})"
    );
    assert!(
        after_rollback.iter().all(|p| !after_reload.contains(p)),
        "the page shows an old worker after the rollback: {after_rollback:?}"
    );
    let status = api_get(&admin, &token, "/api/status");
    assert_eq!(
        after_rollback,
        ready_pids(&status),
        "the page's workers after the rollback differ from /api/status"
    );
    // The page said "set aside" of what the API says.
    let left = &status["services"][0]["previous"][0];
    assert!(left["set_aside"].is_string(), "{status}");
    let history = api_get(&admin, &token, "/api/history");
    let events = history["events"].as_array().unwrap();
    for kind in ["reload", "rollback"] {
        assert!(
            events
                .iter()
                .any(|e| e["kind"] == kind && e["outcome"] == "done"),
            "no {kind} in the history: {history}"
        );
    }
    let png = fs::read(&screenshot).expect("the script saved no screenshot");
    assert!(png.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
}

#[test]
fn the_admin_page_lists_the_services_kept_but_not_running() {
    browser_prerequisites();
    let api = "\n[[service]]\nname = \"api\"\nlisten = [\"127.0.0.1:0\"]\nplugin = \"plugin.so\"\n\
               workers = 1\ncanary_probation = \"0s\"\nprobation = \"0s\"\n";
    let host = admin::start("versioned", "", api);
    let live = host.service("api")["version"].as_str().unwrap().to_string();
    // A config reload that removes `api`: the host keeps its history.
    fs::write(host.dir.path().join("host.toml"), admin::config("", "")).unwrap();
    host.reload_ok();
    let addr = admin::admin_addr(&host);
    let status = api_get(&addr, admin::TOKEN, "/api/status");
    let web = ready_pids(&status);
    assert_eq!(status["services"][0]["name"], "web", "{status}");

    let screenshot = host.dir.path().join("admin-page.png");
    let result = run_browser(
        &[
            "--url",
            &format!("http://{addr}/"),
            "--service",
            "web",
            "--expect-pids",
            &join(&web),
            "--expect-not-running",
            &format!("api={live}"),
            "--screenshot",
            screenshot.to_str().unwrap(),
        ],
        admin::TOKEN,
    );
    assert_eq!(pids_of(&result["shown"]), web);
    assert_eq!(result["not_running"], serde_json::json!([["api", live]]));
}

/// Fails (never skips) when something the browser test needs is missing.
fn browser_prerequisites() {
    for path in [PYTHON, CHROMIUM, CHROMEDRIVER] {
        assert!(
            Path::new(path).exists(),
            "the admin page test needs {path}, which is missing: {INSTALL}"
        );
    }
    let selenium = Command::new(PYTHON)
        .args(["-c", "import selenium"])
        .stdin(Stdio::null())
        .output()
        .expect("could not run /usr/bin/python3");
    assert!(
        selenium.status.success(),
        "the admin page test needs Selenium for {PYTHON}, which cannot import it ({}): {INSTALL}",
        String::from_utf8_lossy(&selenium.stderr).trim()
    );
}

/// 32 random bytes, hex: what `openssl rand -hex 32` makes.
fn random_token() -> String {
    let mut bytes = [0u8; 32];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .unwrap();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The admin URL in the master's ready line.
fn admin_url(logs: &str) -> String {
    let line = logs
        .lines()
        .find(|l| l.starts_with("host: ready"))
        .unwrap_or_else(|| panic!("no ready line in:\n{logs}"));
    line.split("; admin on ")
        .nth(1)
        .unwrap_or_else(|| panic!("no admin URL in {line:?}"))
        .trim()
        .to_string()
}

/// `GET path` on the admin listener with the token; the JSON it answers.
fn api_get(addr: &str, token: &str, path: &str) -> Value {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP response: {response:?}"));
    assert!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

fn ready_pids(status: &Value) -> Vec<u64> {
    let mut pids: Vec<u64> = status["services"][0]["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["state"] == "ready")
        .map(|w| w["pid"].as_u64().unwrap())
        .collect();
    pids.sort();
    pids
}

fn pids_of(value: &Value) -> Vec<u64> {
    let mut pids: Vec<u64> = value
        .as_array()
        .unwrap_or_else(|| panic!("not a list of pids: {value}"))
        .iter()
        .map(|p| p.as_u64().unwrap())
        .collect();
    pids.sort();
    pids
}

fn join(pids: &[u64]) -> String {
    pids.iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Stops the load when dropped, also when the test panics.
struct Stopping(Option<Load>);

impl Drop for Stopping {
    fn drop(&mut self) {
        if let Some(load) = self.0.take() {
            load.stop();
        }
    }
}

/// The browser script in its own process group: dropped, the group is killed (the script,
/// chromedriver, Chromium and its helpers) and the script reaped.
struct BrowserRun {
    child: Child,
    pgid: Pid,
}

impl Drop for BrowserRun {
    fn drop(&mut self) {
        // The script is not reaped yet (see `exited`), so its pid, the group's id, cannot have
        // been reused by anyone else.
        let _ = killpg(self.pgid, Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

impl BrowserRun {
    /// Whether the script has exited, without reaping it.
    fn exited(&self) -> bool {
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        !matches!(
            waitid(Id::Pid(self.pgid), flags),
            Ok(nix::sys::wait::WaitStatus::StillAlive)
        )
    }
}

/// Runs the script with `args` (the token in its environment) and returns the JSON of its
/// last line, after checking that nothing it started is left.
fn run_browser(args: &[&str], token: &str) -> Value {
    let script: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("browser/admin_page.py");
    let mut child = Command::new(PYTHON)
        .arg(&script)
        .args(args)
        .env("ADMIN_TOKEN", token)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("could not run the browser script");
    let stdout = read_all(child.stdout.take().unwrap());
    let stderr = read_all(child.stderr.take().unwrap());
    let pgid = Pid::from_raw(child.id() as i32);
    let run = BrowserRun { child, pgid };
    let started = Instant::now();
    let mut in_time = true;
    while !run.exited() {
        if started.elapsed() > SCRIPT_DEADLINE {
            in_time = false;
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    drop(run); // kills what is left of the group, reaps the script
    let group = pgid.as_raw() as u32;
    wait_until("nothing the browser script started is left", || {
        group_members(group).is_empty()
    });
    let stdout = stdout.join().unwrap();
    let stderr = stderr.join().unwrap();
    assert!(
        in_time,
        "the browser script did not finish within {SCRIPT_DEADLINE:?}:\n{stderr}"
    );
    let last = stdout.lines().last().unwrap_or("");
    match serde_json::from_str::<Value>(last) {
        Ok(result) => {
            eprintln!("{stderr}");
            result
        }
        Err(_) if stderr.contains("apt-get install") => panic!("{stderr}"),
        Err(_) => panic!("the browser script failed:\n{stderr}\n--- stdout ---\n{stdout}"),
    }
}

fn read_all(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    })
}

/// The live processes (zombies excluded) in process group `pgid`, from /proc.
fn group_members(pgid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid pgrp ...: comm may hold spaces, so split after its ')'.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest)
            .split_whitespace()
            .collect();
        if fields.first() != Some(&"Z") && fields.get(2) == Some(&pgid.to_string().as_str()) {
            found.push(pid);
        }
    }
    found
}
