//! The `host` library: one executable that is the master, its workers and the CLI.
//!
//! - [`admin`]: the admin listener: page, JSON API, health and metrics.
//! - [`balance`]: the table a service's workers share to split new connections evenly.
//! - [`cli`]: command-line parsing and the client commands (`reload`, `status`, `stop`, `check`).
//! - [`config`]: the TOML config file and the flags, checked into [`config::Config`].
//! - [`dev`]: `host dev`, the build-serve-rebuild loop for one plugin crate.
//! - [`new`]: `host new`, a new plugin crate that `host dev` runs at once.
//! - [`state_dir`]: where a running master is found (control socket, pid file, lock).
//! - [`tls`]: rustls server configuration, for services and the admin listener.
//! - [`trust`]: the checks on every file and directory the host trusts (owner, mode, symlinks).
//! - [`shadow`]: content-addressed copies of plugin libraries, the only paths workers load.
//! - [`plugin_file`]: what a plugin file is (a library for this machine, or what instead).
//! - [`protocol`]: the messages between CLI and master, and between master and workers.
//! - [`master`]: binds listeners, supervises workers, reloads them one by one.
//! - [`gateway`]: a websocket service's connection-holding processes (no plugin code).
//! - [`kv`]: the key/value store the master keeps for plugins, across reloads.
//! - [`worker`]: loads the plugin in its on-start hook and serves HTTP until told to drain.
//!
//! The master never loads a plugin: dlopen runs the library's constructors, and a broken build
//! must only ever take down a disposable worker.

pub mod admin;
pub mod balance;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dev;
pub mod fdpass;
pub mod gateway;
pub mod inherit;
pub mod kv;
pub mod logging;
pub mod master;
pub mod new;
pub mod plugin_file;
pub mod protocol;
pub mod shadow;
pub mod state_dir;
pub mod tls;
pub mod trust;
pub mod worker;
