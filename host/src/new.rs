//! `host new NAME`: a new plugin crate that builds and runs with `host dev NAME` at once.
//!
//! The crate depends on plugin-api by path or git. By default the path is the plugin-api source
//! this host was built from (a host built from a clone, or `cargo install --path host` from
//! one, knows where that is), so the crate builds offline and against exactly the API the host
//! loads. `--plugin-api PATH` or `--plugin-api GIT-URL` (or `HOST_PLUGIN_API`) points elsewhere:
//! another checkout, or the project's git repository.

use std::{
    fs,
    path::{Path, PathBuf},
    process::ExitCode,
};

use crate::cli::usage_error;

/// The plugin-api source next to the host's own source, as it was when the host was built.
fn built_from() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugin-api")
}

pub fn main(name: &str, dir: Option<PathBuf>, plugin_api: Option<String>) -> ExitCode {
    if let Err(e) = check_name(name) {
        return usage_error(&e);
    }
    let dir = dir.unwrap_or_else(|| PathBuf::from(name));
    if dir.exists() {
        return usage_error(&format!(
            "{} exists already; `host new` makes a new directory. Choose another name, or \
             pass --dir PATH for where to put the crate.",
            dir.display()
        ));
    }
    let dependency = match dependency(plugin_api.as_deref()) {
        Ok(d) => d,
        Err(e) => return usage_error(&e),
    };
    if let Err(e) = write_crate(&dir, name, &dependency) {
        eprintln!(
            "host: could not create the plugin crate in {}: {e}",
            dir.display()
        );
        return ExitCode::FAILURE;
    }
    println!(
        "created plugin crate {name} in {}\nrun it:   host dev {}\nthen:     curl http://127.0.0.1:8080/",
        dir.display(),
        dir.display()
    );
    ExitCode::SUCCESS
}

fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} cannot name a plugin crate: use lower-case letters, digits, - and _, \
             starting with a letter (it becomes the crate's name and the service's name)"
        ))
    }
}

/// The `plugin-api = ...` value for the new crate's Cargo.toml.
fn dependency(given: Option<&str>) -> Result<String, String> {
    let Some(given) = given.filter(|g| !g.is_empty()) else {
        let path = built_from();
        let path = fs::canonicalize(&path).map_err(|_| {
            format!(
                "this host was built from a source tree that is no longer at {} (the plugin-api \
                 crate the new plugin should use). Pass --plugin-api PATH (a plugin-api \
                 directory) or --plugin-api GIT-URL (the host's repository).",
                path.display()
            )
        })?;
        return Ok(path_dependency(&path));
    };
    if given.contains("://") || given.starts_with("git@") {
        return Ok(format!("{{ git = {} }}", toml_string(given)));
    }
    let path = fs::canonicalize(given).map_err(|e| {
        format!("--plugin-api {given}: {e}; give a plugin-api directory or a git URL")
    })?;
    let manifest = fs::read_to_string(path.join("Cargo.toml")).unwrap_or_default();
    if !manifest.contains("name = \"plugin-api\"") {
        return Err(format!(
            "--plugin-api {given}: {} is not the plugin-api crate (its Cargo.toml does not name \
             plugin-api); give the plugin-api directory of the host's source, or a git URL",
            path.display()
        ));
    }
    Ok(path_dependency(&path))
}

fn path_dependency(path: &Path) -> String {
    format!("{{ path = {} }}", toml_string(&path.to_string_lossy()))
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn write_crate(dir: &Path, name: &str, dependency: &str) -> std::io::Result<()> {
    fs::create_dir_all(dir.join("src"))?;
    fs::write(
        dir.join("Cargo.toml"),
        CARGO_TOML
            .replace("{name}", name)
            .replace("{plugin_api}", dependency),
    )?;
    fs::write(dir.join("src/lib.rs"), LIB_RS.replace("{name}", name))?;
    fs::write(dir.join(".gitignore"), "/target\n/.host\n")?;
    Ok(())
}

const CARGO_TOML: &str = r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2021"
publish = false

[lib]
# cdylib: the library the host loads; rlib: so `cargo test` can test it as plain Rust.
crate-type = ["cdylib", "rlib"]

[dependencies]
plugin-api = {plugin_api}
serde = { version = "1", features = ["derive"] }
tokio = { version = "1", features = ["time"] }

# A crate of its own, not a member of a workspace above it. Remove this to add it to yours.
[workspace]
"#;

const LIB_RS: &str = r#"//! {name}: a plugin for the host. `host dev .` builds it, serves it on 127.0.0.1:8080, and
//! rebuilds it on every change; the guide is docs/plugin-guide.md in the host's repository.

use std::time::Duration;

use plugin_api::{AsyncPlugin, Context, Request, Response, Router};

/// What every handler gets (cloned per request: keep it cheap, `Arc` what is big).
#[derive(Clone)]
struct App {
    worker: u32,
}

pub struct Plugin {
    router: Router<App>,
}

#[derive(serde::Deserialize, serde::Serialize)]
struct Greeting {
    name: String,
}

async fn hello(app: App, _req: Request) -> Response {
    Response::text(200, format!("Hello from {name} (worker {})\n", app.worker))
}

async fn wait(_app: App, req: Request) -> Response {
    let ms: u64 = req.param("ms").and_then(|ms| ms.parse().ok()).unwrap_or(0).min(10_000);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    Response::text(200, format!("waited {ms} ms\n"))
}

async fn greet(_app: App, mut req: Request) -> Response {
    match req.json::<Greeting>().await {
        Ok(greeting) => Response::json_value(200, &greeting),
        Err(e) => e.into(),
    }
}

impl AsyncPlugin for Plugin {
    async fn on_start(ctx: &Context) -> Result<Self, plugin_api::Error> {
        plugin_api::info!("{name} started as worker {}", ctx.worker_id());
        let router = Router::new(App { worker: ctx.worker_id() })
            .get("/", hello)
            .get("/wait/{ms}", wait)
            .post("/greet", greet);
        Ok(Plugin { router })
    }

    async fn handle(&self, req: Request) -> Response {
        self.router.handle(req).await
    }
}

plugin_api::export_async_plugin!(Plugin);
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_dependencies() {
        assert!(check_name("my-plugin_2").is_ok());
        assert!(check_name("My").is_err());
        assert!(check_name("2x").is_err());
        assert!(check_name("a/b").is_err());
        assert_eq!(
            dependency(Some("file:///srv/git/host.git")).unwrap(),
            r#"{ git = "file:///srv/git/host.git" }"#
        );
        let here = dependency(Some(built_from().to_str().unwrap())).unwrap();
        assert!(here.starts_with("{ path = "), "{here}");
        assert!(dependency(Some("/")).is_err());
    }
}
