//! Plugin logging: the macros [`crate::info!`] and friends hand their message to the host.
//!
//! A plugin has its own copy of every crate it links, `tracing` included, and that copy has no
//! subscriber: events from it would vanish. So logging goes through a callback the host passes in
//! [`crate::ffi::HostApi`], and the host writes the line with the worker's service, pid
//! and plugin version, and the request's id when a handler logs it (the glue sets it for the
//! length of each handler call). Before the host starts the plugin (or in unit tests) lines go
//! to stderr.

use std::{cell::RefCell, fmt, sync::OnceLock};

use abi_stable::std_types::RStr;

use crate::ffi::HostApiRef;

/// How important a log line is; the host maps it onto its own log levels.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Something failed.
    Error = 1,
    /// Something looks wrong but the plugin carries on.
    Warn = 2,
    /// Normal operation.
    Info = 3,
    /// Details for debugging.
    Debug = 4,
}

impl Level {
    /// The level for a number received over FFI; unknown numbers count as `Info`.
    pub fn from_u8(n: u8) -> Level {
        match n {
            1 => Level::Error,
            2 => Level::Warn,
            4 => Level::Debug,
            _ => Level::Info,
        }
    }
}

static HOST_LOG: OnceLock<HostApiRef> = OnceLock::new();

std::thread_local! {
    /// The id of the request whose handler runs on this thread (empty: none): set for the
    /// length of a sync handler's call, and of each poll (and the drop) of an async handler's
    /// future, which is where its code runs. Kept from call to call, so that setting it
    /// allocates only when an id is longer than any before.
    static REQUEST_ID: RefCell<String> = const { RefCell::new(String::new()) };
}

/// This thread's request id, set until the value is dropped (a panic unwinding through the
/// handler clears it too).
pub(crate) struct InRequest(());

impl InRequest {
    // `inline`: the handler's entry points are generic, built in each plugin's crate, where a
    // call to this one (about 60 instructions under callgrind) would not be inlined otherwise.
    #[inline]
    pub(crate) fn enter(id: &str) -> InRequest {
        // `try_with`: a handler may run while the thread's locals are being destroyed.
        let _ = REQUEST_ID.try_with(|current| {
            let mut current = current.borrow_mut();
            current.clear();
            current.push_str(id);
        });
        InRequest(())
    }
}

impl Drop for InRequest {
    #[inline]
    fn drop(&mut self) {
        let _ = REQUEST_ID.try_with(|current| current.borrow_mut().clear());
    }
}

/// The host's services, once the host started the plugin.
pub(crate) fn host() -> Option<HostApiRef> {
    HOST_LOG.get().copied()
}

/// Routes this plugin's log lines, and its panic messages, to the host.
pub(crate) fn install(host: HostApiRef) {
    if HOST_LOG.set(host).is_ok() {
        // The plugin links its own copy of std, so this hook replaces only the plugin's default
        // hook (which would print to stderr without service or pid). The glue still catches the
        // panic; this line adds where it happened.
        std::panic::set_hook(Box::new(|info| {
            let location = info
                .location()
                .map(|l| format!(" at {}:{}", l.file(), l.line()))
                .unwrap_or_default();
            log(
                Level::Error,
                format_args!(
                    "panicked{location}: {}",
                    crate::glue::panic_message(info.payload())
                ),
            );
        }));
    }
}

/// Sends one line to the host (or to stderr before the host started the plugin).
pub fn log(level: Level, args: fmt::Arguments<'_>) {
    let message = args.to_string();
    let Some(host) = HOST_LOG.get() else {
        return eprintln!("{level:?}: {message}");
    };
    let id = REQUEST_ID
        .try_with(|id| Some(id.borrow().clone()).filter(|id| !id.is_empty()))
        .ok()
        .flatten();
    match id {
        Some(id) => {
            (host.log_for_request())(level as u8, RStr::from_str(&id), RStr::from_str(&message))
        }
        None => (host.log())(level as u8, RStr::from_str(&message)),
    }
}
