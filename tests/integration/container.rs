//! Keeps examples/docker and examples/kubernetes honest without a container engine: the files
//! the Dockerfile's runtime stage places go to the same paths under a temporary root, with the
//! same owners and modes, and the image's ENTRYPOINT and CMD run there as the image's USER (a
//! non-root uid), with the token mounted as the Kubernetes Secret mounts it. The manifests are
//! read with a YAML parser and checked against the config (probes, grace period, args).

use std::{
    fs,
    io::{BufRead, BufReader},
    os::unix::{
        fs::{chown, PermissionsExt},
        process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use serde_json::Value;

use crate::{
    admin::TOKEN,
    harness::{artifacts, kill_master_and_workers, output_text},
    http::{get, Conn},
};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A uid and a gid.
type Ids = (u32, u32);

/// The runtime stage of the Dockerfile: its COPY lines, USER, ENTRYPOINT and CMD.
struct Image {
    /// (source, destination, owner) of each COPY.
    copies: Vec<(String, String, Option<Ids>)>,
    user: Ids,
    command: Vec<String>,
}

fn read_dockerfile() -> Image {
    let text = fs::read_to_string(repo().join("examples/docker/Dockerfile")).unwrap();
    let runtime = text
        .rsplit_once("\nFROM ")
        .expect("a multi-stage Dockerfile")
        .1;
    let ids = |s: &str| {
        let (u, g) = s.split_once(':').unwrap_or((s, s));
        (u.parse().unwrap(), g.parse().unwrap())
    };
    let array = |s: &str| -> Vec<String> { serde_json::from_str(s).unwrap() };
    let mut image = Image {
        copies: Vec::new(),
        user: (0, 0),
        command: Vec::new(),
    };
    let mut cmd = Vec::new();
    for line in runtime.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("COPY") => {
                let words: Vec<&str> = words.collect();
                let owner = words
                    .iter()
                    .find_map(|w| w.strip_prefix("--chown="))
                    .map(ids);
                let paths: Vec<&str> = words
                    .iter()
                    .filter(|w| !w.starts_with("--"))
                    .copied()
                    .collect();
                image
                    .copies
                    .push((paths[0].to_string(), paths[1].to_string(), owner));
            }
            Some("USER") => image.user = ids(words.next().unwrap()),
            Some("ENTRYPOINT") => image.command = array(line.trim_start_matches("ENTRYPOINT")),
            Some("CMD") => cmd = array(line.trim_start_matches("CMD")),
            _ => {}
        }
    }
    image.command.extend(cmd);
    assert_ne!(image.user.0, 0, "the image must run as a non-root user");
    image
}

/// A directory (and its parents) under `root`, root-owned and 0755 as in an image.
fn image_dir(root: &Path, path: &Path) {
    let mut dir = root.to_path_buf();
    for part in path.strip_prefix("/").unwrap().components() {
        dir.push(part);
        if !dir.exists() {
            fs::create_dir(&dir).unwrap();
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
}

/// `/a/b` under `root`.
fn under(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

#[test]
fn the_image_runs_its_command_as_its_non_root_user() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: running the image's command as another user needs root (CI is root)");
        return;
    }
    let image = read_dockerfile();
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path().join("image");
    fs::create_dir(&root).unwrap();
    fs::set_permissions(temp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
    let mut config_path = None;
    for (source, dest, owner) in &image.copies {
        let to = under(&root, dest);
        image_dir(&root, Path::new(dest).parent().unwrap());
        // The build stage's outputs are this test's builds (debug instead of release).
        let from = match source.as_str() {
            "/src/target/release/host" => Some(artifacts().host.clone()),
            "/src/target/release/libhello.so" => Some(artifacts().plugin("hello")),
            s if s.starts_with("/src/") => panic!("unknown build output {s}"),
            s if s.starts_with('/') => None, // a directory made in the build stage
            s => Some(repo().join(s)),
        };
        match from {
            Some(from) => {
                fs::copy(&from, &to).unwrap();
                if source.ends_with(".toml") {
                    config_path = Some(to.clone());
                }
            }
            // `install -d -m 0700` in the build stage.
            None => {
                fs::create_dir(&to).unwrap();
                fs::set_permissions(&to, fs::Permissions::from_mode(0o700)).unwrap();
            }
        }
        if let Some((uid, gid)) = owner {
            chown(&to, Some(*uid), Some(*gid)).unwrap();
        }
    }
    // The config as the image has it, with its absolute paths under the root and its
    // addresses on free ports of 127.0.0.1.
    let config_path = config_path.expect("the image has a config file");
    let mut config: toml::Table =
        toml::from_str(&fs::read_to_string(&config_path).unwrap()).unwrap();
    let root_str = root.display().to_string();
    let admin = config["admin"].as_table_mut().unwrap();
    admin.insert("listen".into(), "127.0.0.1:0".into());
    // The token as a Kubernetes Secret mounts it (defaultMode 0440, fsGroup the user's group).
    let token_file = admin["token_file"].as_str().unwrap().to_string();
    image_dir(&root, Path::new(&token_file).parent().unwrap());
    let token = under(&root, &token_file);
    fs::write(&token, TOKEN).unwrap();
    chown(&token, Some(0), Some(image.user.1)).unwrap();
    fs::set_permissions(&token, fs::Permissions::from_mode(0o440)).unwrap();
    admin.insert("token_file".into(), token.display().to_string().into());
    for svc in config["service"].as_array_mut().unwrap() {
        let svc = svc.as_table_mut().unwrap();
        svc.insert(
            "listen".into(),
            vec![toml::Value::from("127.0.0.1:0")].into(),
        );
        let plugin = svc["plugin"].as_str().unwrap();
        svc.insert("plugin".into(), format!("{root_str}{plugin}").into());
    }
    fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();

    // ENTRYPOINT and CMD, every absolute path in them under the root.
    let command: Vec<String> = image
        .command
        .iter()
        .map(|a| {
            if a.starts_with('/') {
                under(&root, a).display().to_string()
            } else {
                a.clone()
            }
        })
        .collect();
    // setpriv (util-linux) as the container runtime would: the user, its group, and no other
    // group (root's supplementary groups must not leak into the test).
    let mut child = Command::new("setpriv")
        .arg(format!("--reuid={}", image.user.0))
        .arg(format!("--regid={}", image.user.1))
        .arg("--clear-groups")
        .arg("--")
        .args(&command)
        .current_dir(&root)
        .env_remove("HOST_STATE_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let master = child.id();
    let _cleanup = Cleanup(master);
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let stderr = child.stderr.take().unwrap();
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            text += &line;
            text.push('\n');
        }
        text
    });
    let ready = loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) if line.starts_with("host: ready") => break line,
            Ok(_) => continue,
            Err(_) => {
                kill_master_and_workers(master);
                panic!(
                    "the image's command did not start:\n{}",
                    errors.join().unwrap()
                );
            }
        }
    };
    // "host: ready (master pid N): hello on http://A; admin on http://B/"
    let service = ready
        .split(" on http://")
        .nth(1)
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let admin = ready
        .rsplit("admin on http://")
        .next()
        .unwrap()
        .trim_end_matches('/')
        .to_string();
    assert!(get(&service, "/").body.contains("Hello"));
    assert_eq!(get(&admin, "/readyz").status, 200);
    let mut conn = Conn::new(&admin);
    conn.headers
        .push(("authorization".into(), format!("Bearer {TOKEN}")));
    let status: Value = serde_json::from_str(&conn.get("/api/status").unwrap().body).unwrap();
    // Master and workers run as the image's user.
    let uid = |pid: u64| {
        let text = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .unwrap()
            .to_string();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u32>()
            .unwrap()
    };
    assert_eq!(uid(status["master_pid"].as_u64().unwrap()), image.user.0);
    for w in status["services"][0]["workers"].as_array().unwrap() {
        assert_eq!(uid(w["pid"].as_u64().unwrap()), image.user.0);
    }
    // The access log goes to the container's stdout, one JSON line per request.
    let line = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("an access log line");
        if line.starts_with('{') {
            break line;
        }
    };
    let entry: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(entry["target"], "/");
    // The container stops with SIGTERM, drained.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(master as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = child.wait().unwrap();
    assert!(out.success(), "{}", errors.join().unwrap());
}

struct Cleanup(u32);

impl Drop for Cleanup {
    fn drop(&mut self) {
        kill_master_and_workers(self.0);
    }
}

/// The manifests, read by a YAML parser (Debian's python3-yaml), as JSON.
fn manifest(file: &str) -> Value {
    let out = Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
        ])
        .arg(repo().join("examples/kubernetes").join(file))
        .output()
        .expect("/usr/bin/python3 with python3-yaml");
    assert!(out.status.success(), "{}", output_text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_kubernetes_manifests_agree_with_the_image_and_its_config() {
    let deployment = manifest("deployment.yaml");
    let service = manifest("service.yaml");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let image = read_dockerfile();
    assert_eq!(pod["securityContext"]["runAsUser"], image.user.0);
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/livez");
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "http");
    // The grace period covers the preStop pause and the longest drain.
    let config: toml::Table =
        toml::from_str(&fs::read_to_string(repo().join("examples/docker/host.toml")).unwrap())
            .unwrap();
    let longest_drain = config["service"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| humantime::parse_duration(s["drain_timeout"].as_str().unwrap()).unwrap())
        .max()
        .unwrap();
    let pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .unwrap();
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace > longest_drain.as_secs() + pause,
        "terminationGracePeriodSeconds {grace} must exceed drain {longest_drain:?} + preStop {pause}s"
    );
    // The container's args are a command line the host accepts, with the image's paths.
    let args: Vec<String> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().replace("$(POD_IP)", "127.0.0.1"))
        .collect();
    assert_eq!(args[..args.len() - 4], image.command[1..]);
    let out = Command::new(&artifacts().host)
        .args(&args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    // The token mount is where the config and the args look.
    let mount = container["volumeMounts"][0]["mountPath"].as_str().unwrap();
    let token = args.last().unwrap();
    assert!(token.starts_with(mount), "{token} not under {mount}");
    assert_eq!(
        config["admin"]["token_file"].as_str().unwrap(),
        token.as_str()
    );
}
