//! The command line: parse it (clap), run the role or client command it names, pick the exit
//! code. Client commands talk to the running master over its control socket (`client`,
//! `status`).
//!
//! Exit codes: 0 success; 1 the operation failed (a reload was rejected, a check failed, the
//! master could not start); 2 bad usage or configuration; 3 no master is running.

mod client;
mod status;

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand};

use crate::{
    config::{Config, RawAdmin, RawConfig, RawService, RawTls, Source, DEFAULT_WORKERS},
    protocol::{ControlRequest, FromWorker, ToWorker},
    state_dir::StateDir,
};

const EXIT_FAILED: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_NO_MASTER: u8 = 3;

/// A server whose handlers are cdylib plugins, reloaded without dropping a request.
#[derive(Parser)]
#[command(name = "host", version)]
struct Cli {
    /// The state directory of the master: control socket, pid file, plugin copies.
    #[arg(long, global = true, env = "HOST_STATE_DIR", default_value = ".host")]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the master in the foreground (Ctrl-C or `host stop` to stop it).
    Start {
        #[command(flatten)]
        service: ServiceArgs,
        /// Reload by itself when a plugin file is rebuilt (every service).
        #[arg(long)]
        watch: bool,
        /// Run in the background; returns once every service is ready (with the master's pid),
        /// or with the reason it is not.
        #[arg(short, long)]
        daemon: bool,
        /// Log to this file instead of stderr (default with --daemon: host.log in the state
        /// directory); `host reopen-logs` opens it again.
        #[arg(long)]
        log_file: Option<PathBuf>,
    },
    /// Build a plugin crate, serve it with the watcher on, and rebuild it on every source change.
    Dev {
        /// The plugin crate's directory.
        #[arg(default_value = ".")]
        path: PathBuf,
        /// An address to listen on; repeat for more.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: Vec<String>,
        /// Number of worker processes.
        #[arg(long, default_value_t = DEFAULT_WORKERS)]
        workers: usize,
    },
    /// Create a new plugin crate in directory NAME, ready for `host dev NAME`.
    New {
        /// The crate's name (lower-case letters, digits, - and _).
        name: String,
        /// Where to create it (default: ./NAME).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The plugin-api the crate depends on: a directory, or a git URL (default: the
        /// plugin-api source this host was built from).
        #[arg(long, env = "HOST_PLUGIN_API")]
        plugin_api: Option<String>,
    },
    /// Re-read the config file, then replace the workers of the running master, one by one,
    /// with ones that load the rebuilt plugin (and the new config); waits for the outcome.
    /// A config file that is not valid changes nothing.
    Reload {
        /// Services to reload (default: every service with reloadable = true).
        services: Vec<String>,
    },
    /// Go back to the previous plugin version of a service (or to `--to HASH`), with the same
    /// rolling replacement and canary as reload.
    Rollback {
        /// The service (may be left out when there is only one).
        service: Option<String>,
        /// A kept version's hash (or its first characters), as `host status` shows it.
        #[arg(long)]
        to: Option<String>,
    },
    /// Open the log file again (for logrotate's postrotate).
    ReopenLogs,
    /// Replace the master itself with a new one (a new host binary, the config read again),
    /// without refusing a connection; waits for the outcome.
    Upgrade {
        /// The executable to start (default: the one the master was started from).
        #[arg(long)]
        exe: Option<PathBuf>,
    },
    /// Show the master, its services and workers.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Stop the running master gracefully: drain every worker, then exit.
    Stop,
    /// Check the configuration and load each plugin in a throwaway worker (like `nginx -t`).
    Check(ServiceArgs),
    /// Internal: a worker process, started by the master.
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        service: String,
        #[arg(long)]
        slot: usize,
        #[arg(long)]
        master_pid: u32,
    },
}

/// A config file, or the flags for one service.
#[derive(Args)]
struct ServiceArgs {
    /// Run the workers as this user (the master must be root): plugin code never runs as root.
    #[arg(long)]
    user: Option<String>,
    /// The workers' group (default: the user's own).
    #[arg(long, requires = "user")]
    group: Option<String>,
    /// Load plugins from paths other users could write (a warning is logged at every load).
    #[arg(long)]
    allow_insecure_plugin_path: bool,
    /// A TOML config file listing one or more services.
    #[arg(long, conflicts_with_all = ["plugin", "listen", "workers", "name"])]
    config: Option<PathBuf>,
    /// The plugin library (e.g. target/debug/libhello.so).
    #[arg(long, required_unless_present = "config")]
    plugin: Option<PathBuf>,
    /// An address to listen on, e.g. 127.0.0.1:8080; repeat for more.
    #[arg(long, required_unless_present = "config")]
    listen: Vec<String>,
    /// Number of worker processes.
    #[arg(long)]
    workers: Option<usize>,
    /// The service's name (default: the plugin's file name without lib and .so).
    #[arg(long)]
    name: Option<String>,
    /// Serve HTTPS (and HTTP/2 by ALPN) with this certificate (PEM, the chain after it).
    #[arg(long, requires = "tls_key", conflicts_with = "config")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert", conflicts_with = "config")]
    tls_key: Option<PathBuf>,
    /// Serve the admin page, API, health checks and metrics on this address
    /// (e.g. 127.0.0.1:9000); with --config, over the file's [admin] listen.
    #[arg(long, requires = "admin_token_file")]
    admin: Option<String>,
    /// The file holding the admin API's bearer token (mode 0600, at least 16 characters).
    #[arg(long, requires = "admin")]
    admin_token_file: Option<PathBuf>,
}

impl ServiceArgs {
    /// The configuration, and where it came from (so that a reload can read it again).
    fn config(self, watch: bool) -> Result<(Config, Source), String> {
        if let Some(path) = self.config {
            let absolute = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
            let source = Source {
                file: Some(absolute(path)),
                user: self.user.map(|u| (u, self.group)),
                allow_insecure_plugin_path: self.allow_insecure_plugin_path,
                watch,
                admin: self.admin.zip(self.admin_token_file.map(absolute)),
            };
            return Ok((source.load()?, source));
        }
        let plugin = self
            .plugin
            .expect("clap requires --plugin without --config");
        let name = self.name.unwrap_or_else(|| {
            let stem = plugin
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            stem.strip_prefix("lib").unwrap_or(&stem).to_string()
        });
        let tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some(RawTls { cert, key }),
            _ => None,
        };
        let service = RawService {
            name,
            plugin,
            listen: self.listen,
            workers: Some(self.workers.unwrap_or(DEFAULT_WORKERS)),
            tls,
            ..RawService::default()
        };
        let admin = match (self.admin, self.admin_token_file) {
            (Some(listen), Some(token_file)) => Some(RawAdmin {
                listen,
                token_file,
                ..RawAdmin::default()
            }),
            _ => None,
        };
        let globals = RawConfig {
            user: self.user,
            group: self.group,
            allow_insecure_plugin_path: Some(self.allow_insecure_plugin_path),
            admin,
            ..RawConfig::default()
        };
        let mut config = Config::from_flags(service, globals).map_err(|e| e.to_string())?;
        for svc in &mut config.services {
            svc.watch |= watch;
        }
        Ok((config, Source::default()))
    }
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    crate::logging::init();
    let state = StateDir::new(cli.state_dir);
    match cli.command {
        Command::Worker { master_pid, .. } => crate::worker::main(master_pid),
        Command::Start {
            service,
            watch,
            daemon,
            log_file,
        } => start(service, watch, daemon, log_file, state),
        Command::Dev {
            path,
            listen,
            workers,
        } => crate::dev::main(&path, listen, workers, state),
        Command::New {
            name,
            dir,
            plugin_api,
        } => crate::new::main(&name, dir, plugin_api),
        Command::Check(args) => match args.config(false) {
            Ok((config, _)) => check(config),
            Err(e) => usage_error(&e),
        },
        Command::Reload { services } => {
            finish(client::stream(&state, &ControlRequest::Reload { services }))
        }
        Command::Stop => finish(client::stop(&state)),
        Command::ReopenLogs => finish(client::stream(&state, &ControlRequest::ReopenLogs)),
        Command::Upgrade { exe } => {
            let exe = exe.map(|e| std::path::absolute(&e).unwrap_or(e));
            finish(client::stream(&state, &ControlRequest::Upgrade { exe }))
        }
        Command::Rollback { service, to } => finish(client::stream(
            &state,
            &ControlRequest::Rollback { service, to },
        )),
        Command::Status { json } => finish(status::status(&state, json)),
    }
}

/// `host start`: in the foreground, or (`--daemon`) in the background once started again by
/// this command (`crate::daemon`).
fn start(
    service: ServiceArgs,
    watch: bool,
    daemon: bool,
    log_file: Option<PathBuf>,
    state: StateDir,
) -> ExitCode {
    let log_file = log_file.map(|p| std::path::absolute(&p).unwrap_or(p));
    let log_file = match daemon {
        true => Some(crate::daemon::log_path(&state, log_file)),
        false => log_file,
    };
    // The config is checked here first, so that a daemon start fails in the terminal.
    let (config, source) = match service.config(watch) {
        Ok(parsed) => parsed,
        Err(e) => {
            crate::master::refuse_upgrade(&e);
            return usage_error(&e);
        }
    };
    // An upgraded master inherits the arguments, `--daemon` included, but is detached already.
    let upgraded = std::env::var_os("HOST_UPGRADE").is_some();
    if let (true, false, false, Some(log)) = (
        daemon,
        crate::daemon::is_daemon_child(),
        upgraded,
        &log_file,
    ) {
        return crate::daemon::start(&state, log);
    }
    if let Some(log) = &log_file {
        if let Err(e) = crate::daemon::log_to(log) {
            return usage_error(&e);
        }
    }
    crate::master::main(
        config,
        source,
        state,
        crate::master::Options {
            log_file,
            sidecar: None,
        },
    )
}

pub(crate) fn usage_error(message: &str) -> ExitCode {
    eprintln!("host: {message}");
    ExitCode::from(EXIT_USAGE)
}

fn finish(result: Result<(), (u8, String)>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, message)) => {
            eprintln!("host: {message}");
            ExitCode::from(code)
        }
    }
}

/// `host check`: the config is valid (we got here), and each plugin loads and starts in a
/// throwaway worker, from a throwaway shadow copy.
fn check(config: Config) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return finish(Err((
                EXIT_FAILED,
                format!("could not start the async runtime: {e}"),
            )))
        }
    };
    let mut ok = true;
    for svc in &config.services {
        match runtime.block_on(check_service(svc)) {
            Ok(line) => println!("ok    service {}: {line}", svc.name),
            Err(e) => {
                ok = false;
                println!("FAIL  service {}: {e}", svc.name);
            }
        }
    }
    if ok {
        println!("configuration ok: {} service(s)", config.services.len());
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    }
}

async fn check_service(svc: &crate::config::ServiceConfig) -> Result<String, String> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

    let dir = tempfile::tempdir().map_err(|e| format!("could not create a temp dir: {e}"))?;
    let store = crate::shadow::ShadowStore::open(&crate::state_dir::Dir::open(dir.path())?)?;
    let version = store.store_plugin(svc)?;
    let plugin = store.open_verified(&version)?;
    let mut spec = crate::master::worker_spec(svc, 0, &version, Vec::new());
    spec.check_only = true;
    spec.access_log = None;
    let spawned = crate::master::spawn_worker_process(&spec, Some(&plugin), Vec::new(), Vec::new())
        .map_err(|e| format!("could not start a worker: {e}"))?;
    let (mut child, channel) = (spawned.child, spawned.channel);
    let (read, mut write) = channel.into_split();
    let start = crate::protocol::encode(&ToWorker::Start(Box::new(spec)));
    write
        .write_all(&start)
        .await
        .map_err(|e| format!("could not talk to the worker: {e}"))?;
    let mut lines = tokio::io::BufReader::new(read).lines();
    let answer = tokio::time::timeout(svc.ready_timeout, lines.next_line()).await;
    let result = match answer {
        Ok(Ok(Some(line))) => match serde_json::from_str::<FromWorker>(&line) {
            Ok(FromWorker::Ready {
                plugin_name,
                plugin_crate_version,
                ..
            }) => Ok(format!(
                "plugin {plugin_name} {plugin_crate_version} ({version}) loads and starts"
            )),
            Ok(FromWorker::Failed { reason }) => Err(reason),
            _ => Err(format!("unexpected answer from the worker: {line}")),
        },
        Ok(_) => Err(format!(
            "the worker {} before it was ready",
            crate::master::describe_exit(child.wait().await)
        )),
        Err(_) => Err(format!(
            "the plugin did not start within ready_timeout ({}); its on_start is probably blocked",
            humantime::format_duration(svc.ready_timeout)
        )),
    };
    let _ = child.start_kill();
    let _ = child.wait().await;
    result
}
