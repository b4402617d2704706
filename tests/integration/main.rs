//! Integration tests: the real `host` binary, plugins built by cargo, real sockets, a real HTTP
//! client. One test binary, one module per area; `harness` and `http` are the shared parts.

mod harness;
mod http;
mod load;

mod access_log;
mod admin;
mod admin_page;
mod async_handlers;
mod balance;
mod cli;
mod compat;
mod config_reload;
mod container;
mod daemon;
mod failures;
mod gateway;
mod kv;
mod lifecycle;
mod limits;
mod liveness;
mod new_plugin;
mod plugins;
mod reload;
mod requests;
mod rollout;
mod streaming;
mod systemd;
mod tls;
mod trust;
mod upgrade;
mod watch;
