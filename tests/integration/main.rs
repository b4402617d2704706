//! Integration tests: the real `host` binary, plugins built by cargo, real sockets, a real HTTP
//! client. One test binary, one module per area; `harness` and `http` are the shared parts.

mod harness;
mod http;
mod load;

mod access_log;
mod admin;
mod admin_page;
mod cli;
mod config_reload;
mod container;
mod daemon;
mod failures;
mod gateway;
mod lifecycle;
mod limits;
mod liveness;
mod plugins;
mod reload;
mod rollout;
mod systemd;
mod tls;
mod trust;
mod upgrade;
mod watch;
