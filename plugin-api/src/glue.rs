//! The `extern "C"` functions behind [`crate::export_plugin!`] and
//! [`crate::export_async_plugin!`]: they own the plugin instance, convert between FFI and plain
//! types, poll async handlers in the plugin runtime's context, and stop panics at the boundary
//! (abi_stable aborts the whole process if a panic unwinds through an `extern "C"` function).

use std::{
    any::Any,
    future::Future,
    panic::{catch_unwind, AssertUnwindSafe},
    pin::Pin,
    sync::OnceLock,
    task::Poll,
    time::Duration,
};

use abi_stable::{
    prefix_type::PrefixTypeTrait,
    std_types::{RErr, ROk, RResult, RStr, RString},
};
use async_ffi::{FfiFuture, FutureExt};

use crate::{
    ffi::{
        calls, FfiBody, FfiContextRef, FfiRequest, FfiRequestRef, FfiResponse, PluginMod,
        PluginModRef,
    },
    log::InRequest,
    runtime, AsyncPlugin, Context, Plugin, Request,
};

// One per library: each plugin links its own copy of plugin-api, and a worker loads one plugin.
// `Any`, so that the generic entry points find their own type in it.
static INSTANCE: OnceLock<Box<dyn Any + Send + Sync>> = OnceLock::new();
static CONTEXT: OnceLock<Context> = OnceLock::new();

fn instance<P: 'static>() -> Result<&'static P, RString> {
    INSTANCE
        .get()
        .and_then(|i| i.downcast_ref::<P>())
        .ok_or_else(|| RString::from("the plugin was not started"))
}

fn limits() -> (u64, u64) {
    CONTEXT.get().map_or((u64::MAX, u64::MAX), Context::limits)
}

/// Builds the root module for a sync plugin `P`; `name` and `version` are the plugin crate's.
pub fn root_module<P: Plugin>(name: &'static str, version: &'static str) -> PluginModRef {
    PluginMod {
        name: RStr::from_str(name),
        version: RStr::from_str(version),
        calls: if P::BLOCKING {
            calls::BLOCKING
        } else {
            calls::INLINE
        },
        start: start::<P>,
        handle: handle::<P>,
        handle_async: not_async,
        ping,
        drain,
        stop: stop::<P>,
        handle_ref: handle_ref::<P>,
        handle_async_ref: not_async_ref,
    }
    .leak_into_prefix()
}

/// Builds the root module for an async plugin `P`.
pub fn async_root_module<P: AsyncPlugin>(
    name: &'static str,
    version: &'static str,
) -> PluginModRef {
    PluginMod {
        name: RStr::from_str(name),
        version: RStr::from_str(version),
        calls: calls::ASYNC,
        start: start_async::<P>,
        handle: not_sync,
        handle_async: handle_async::<P>,
        ping,
        drain,
        stop: stop_async::<P>,
        handle_ref: not_sync_ref,
        handle_async_ref: handle_async_ref::<P>,
    }
    .leak_into_prefix()
}

/// What every start, HTTP or WebSocket, does before the plugin's own `on_start`.
pub(crate) fn prepare(ctx: FfiContextRef) -> Context {
    crate::log::install(ctx.host());
    let ctx = Context::from_ffi(ctx);
    let _ = CONTEXT.set(ctx);
    if let Some(n) = ctx.config("runtime_threads").and_then(|n| n.parse().ok()) {
        runtime::set_threads(n);
    }
    ctx
}

fn keep<P: Send + Sync + 'static>(
    result: std::thread::Result<Result<P, crate::Error>>,
) -> RResult<(), RString> {
    keep_with(result, |plugin| INSTANCE.set(Box::new(plugin)).is_ok())
}

/// The outcome of an `on_start` (`result`, a panic caught), the instance kept with `keep`
/// (false: one was started already).
pub(crate) fn keep_with<T>(
    result: std::thread::Result<Result<T, crate::Error>>,
    keep: impl FnOnce(T) -> bool,
) -> RResult<(), RString> {
    match result {
        Ok(Ok(plugin)) => match keep(plugin) {
            true => ROk(()),
            false => RErr("on_start was called twice in one process".into()),
        },
        Ok(Err(e)) => RErr(e.to_string().into()),
        Err(panic) => RErr(format!("on_start panicked: {}", panic_message(&*panic)).into()),
    }
}

extern "C" fn start<P: Plugin>(ctx: FfiContextRef) -> RResult<(), RString> {
    let ctx = prepare(ctx);
    keep(catch_unwind(AssertUnwindSafe(|| P::on_start(&ctx))))
}

extern "C" fn start_async<P: AsyncPlugin>(ctx: FfiContextRef) -> RResult<(), RString> {
    let ctx = prepare(ctx);
    // The host calls this from a plain thread: block on the plugin's runtime (started here).
    keep(catch_unwind(AssertUnwindSafe(|| {
        runtime::block_on(P::on_start(&ctx))
    })))
}

/// For a host built against plugin-api 0.2.0, which passes the head owned.
extern "C" fn handle<P: Plugin>(req: &FfiRequest, body: FfiBody) -> RResult<FfiResponse, RString> {
    req.with_ref(|req| handle_ref::<P>(req, body))
}

extern "C" fn handle_ref<P: Plugin>(
    req: &FfiRequestRef<'_>,
    body: FfiBody,
) -> RResult<FfiResponse, RString> {
    let plugin = match instance::<P>() {
        Ok(p) => p,
        Err(e) => return RErr(e),
    };
    let call = || {
        // SAFETY: `req` is dropped at the end of this closure, within the host's call, and the
        // handler is only lent it (`&Request`).
        let req = unsafe { Request::lent(req, body, limits()) };
        let _in_request = InRequest::enter(req.id());
        plugin.handle(&req).into_ffi()
    };
    match catch_unwind(AssertUnwindSafe(call)) {
        Ok(response) => ROk(response),
        Err(panic) => {
            let message = format!("handler panicked: {}", panic_message(&*panic));
            // Its payload's drop is plugin code too, and must not unwind into the host.
            let _ = catch_unwind(AssertUnwindSafe(|| drop(panic)));
            RErr(message.into())
        }
    }
}

pin_project_lite::pin_project! {
    /// An async handler's future, polled and dropped in the plugin runtime's context, with its
    /// panics stopped (neither may unwind into the host). The host drops it to cancel the
    /// handler (handler_timeout, client gone). The future is held in place, not boxed: the
    /// FFI future boxes this, and one allocation a request is enough.
    struct InContext<F: Future> {
        #[pin]
        future: Option<F>,
        // The request's, for the handler's log lines while it runs (the request itself is
        // the handler's).
        id: Id,
    }

    impl<F: Future> PinnedDrop for InContext<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if this.future.is_some() {
                let _context = runtime::handle().enter();
                let _in_request = InRequest::enter(this.id.as_str());
                end(this.future);
            }
        }
    }
}

/// A request id held in place when it fits (the host's are at most 64 bytes), so that an async
/// call allocates nothing for it.
enum Id {
    Inline { bytes: [u8; 64], len: u8 },
    Long(String),
}

impl Id {
    fn new(id: &str) -> Id {
        let mut bytes = [0; 64];
        match bytes.get_mut(..id.len()) {
            Some(place) => {
                place.copy_from_slice(id.as_bytes());
                Id::Inline {
                    bytes,
                    len: id.len() as u8,
                }
            }
            None => Id::Long(id.to_string()),
        }
    }

    fn as_str(&self) -> &str {
        match self {
            // A whole `str`'s bytes: always UTF-8.
            Id::Inline { bytes, len } => std::str::from_utf8(&bytes[..*len as usize]).unwrap_or(""),
            Id::Long(id) => id,
        }
    }
}

impl<F: Future<Output = FfiResponse>> Future for InContext<F> {
    type Output = RResult<FfiResponse, RString>;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut future = this.future;
        let Some(running) = future.as_mut().as_pin_mut() else {
            return Poll::Ready(RErr("polled after it ended".into()));
        };
        let _context = runtime::handle().enter();
        let _in_request = InRequest::enter(this.id.as_str());
        let output = match catch_unwind(AssertUnwindSafe(|| running.poll(cx))) {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(response)) => ROk(response),
            Err(panic) => {
                let message = format!("handler panicked: {}", panic_message(&*panic));
                // Its payload's drop is plugin code too.
                let _ = catch_unwind(AssertUnwindSafe(|| drop(panic)));
                RErr(message.into())
            }
        };
        // Ended: drop it now, in the context entered for this poll, rather than whenever the
        // host drops this.
        end(future);
        Poll::Ready(output)
    }
}

/// Drops a handler's future in place (the caller has entered the plugin runtime's context),
/// stopping a panic. The place holds `None` after, even when the drop panics.
fn end<F>(mut future: Pin<&mut Option<F>>) {
    if let Err(panic) = catch_unwind(AssertUnwindSafe(|| future.set(None))) {
        let _ = catch_unwind(AssertUnwindSafe(|| drop(panic)));
    }
}

/// For a host built against plugin-api 0.2.0, which passes the head owned.
extern "C" fn handle_async<P: AsyncPlugin>(
    req: &FfiRequest,
    body: FfiBody,
) -> FfiFuture<RResult<FfiResponse, RString>> {
    req.with_ref(|req| handle_async_ref::<P>(req, body))
}

extern "C" fn handle_async_ref<P: AsyncPlugin>(
    req: &FfiRequestRef<'_>,
    body: FfiBody,
) -> FfiFuture<RResult<FfiResponse, RString>> {
    let plugin = match instance::<P>() {
        Ok(p) => p,
        Err(e) => return std::future::ready(RErr(e)).into_ffi(),
    };
    let req = match catch_unwind(AssertUnwindSafe(|| Request::from_ffi(req, body, limits()))) {
        Ok(req) => req,
        Err(panic) => {
            let message = format!("reading the request panicked: {}", panic_message(&*panic));
            return std::future::ready(RErr(message.into())).into_ffi();
        }
    };
    let id = Id::new(req.id());
    // The handler's future is polled right here, on the host's thread that polls this one,
    // inside the plugin runtime's context (so its timers, sockets and `tokio::spawn` belong to
    // that runtime, whose threads drive them and wake the host). Spawning it onto the plugin's
    // runtime instead cost two thread hand-offs per request (docs/benchmarks.md, figure 14).
    // A handler that blocks in a poll holds the host's thread, as an inline sync handler does:
    // the host times every poll against handler_timeout.
    let handler = InContext {
        future: Some(async move { plugin.handle(req).await.into_ffi() }),
        id,
    };
    handler.into_ffi()
}

// The entry points a plugin of the other kind does not have: the host never calls them (it
// calls the one `calls` names), but a root module has every field.
extern "C" fn not_async(_: &FfiRequest, _: FfiBody) -> FfiFuture<RResult<FfiResponse, RString>> {
    std::future::ready(RErr(NOT_ASYNC.into())).into_ffi()
}

extern "C" fn not_async_ref(
    _: &FfiRequestRef<'_>,
    _: FfiBody,
) -> FfiFuture<RResult<FfiResponse, RString>> {
    std::future::ready(RErr(NOT_ASYNC.into())).into_ffi()
}

extern "C" fn not_sync(_: &FfiRequest, _: FfiBody) -> RResult<FfiResponse, RString> {
    RErr(NOT_SYNC.into())
}

extern "C" fn not_sync_ref(_: &FfiRequestRef<'_>, _: FfiBody) -> RResult<FfiResponse, RString> {
    RErr(NOT_SYNC.into())
}

const NOT_ASYNC: &str = "this plugin's handler is not async";
const NOT_SYNC: &str = "this plugin's handler is async";

extern "C" fn ping() -> FfiFuture<()> {
    if !runtime::started() {
        return std::future::ready(()).into_ffi();
    }
    let task = runtime::handle().spawn(async {});
    async move {
        let _ = task.await;
    }
    .into_ffi()
}

extern "C" fn drain() {
    runtime::start_draining();
}

extern "C" fn stop<P: Plugin>(timeout_ms: u64) -> RResult<(), RString> {
    let stopped = match instance::<P>() {
        // A panic in on_stop has nowhere useful to go: the hook has logged it.
        Ok(plugin) => catch_unwind(AssertUnwindSafe(|| plugin.on_stop())).is_ok(),
        Err(_) => true,
    };
    finish(stopped, timeout_ms)
}

extern "C" fn stop_async<P: AsyncPlugin>(timeout_ms: u64) -> RResult<(), RString> {
    let stopped = match instance::<P>() {
        Ok(plugin) => {
            catch_unwind(AssertUnwindSafe(|| runtime::block_on(plugin.on_stop()))).is_ok()
        }
        Err(_) => true,
    };
    finish(stopped, timeout_ms)
}

fn finish(stopped: bool, timeout_ms: u64) -> RResult<(), RString> {
    let tasks = runtime::stop(Duration::from_millis(timeout_ms));
    match (stopped, tasks) {
        (true, Ok(())) => ROk(()),
        (false, _) => RErr("on_stop panicked".into()),
        (true, Err(e)) => RErr(e.into()),
    }
}

/// The text of a panic payload (`panic!` gives a `&str` or a `String`).
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a panic payload that is not a string)".to_string()
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            atomic::{AtomicUsize, Ordering},
            Arc,
        },
        task::{Wake, Waker},
    };

    use super::*;

    /// Counts its drops, and panics in each.
    struct PanicsOnDrop(Arc<AtomicUsize>);

    impl Drop for PanicsOnDrop {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
            panic!("a handler's future panicked in its drop");
        }
    }

    /// A handler's future that answers at its first poll or never, and panics when dropped.
    struct Handler {
        answer: bool,
        _guard: PanicsOnDrop,
    }

    impl Future for Handler {
        type Output = FfiResponse;

        fn poll(self: Pin<&mut Self>, _: &mut std::task::Context<'_>) -> Poll<FfiResponse> {
            match self.answer {
                true => Poll::Ready(crate::Response::text(200, "done").into_ffi()),
                false => Poll::Pending,
            }
        }
    }

    struct Noop;

    impl Wake for Noop {
        fn wake(self: Arc<Self>) {}
    }

    fn in_context(answer: bool, drops: &Arc<AtomicUsize>) -> Pin<Box<InContext<Handler>>> {
        Box::pin(InContext {
            future: Some(Handler {
                answer,
                _guard: PanicsOnDrop(drops.clone()),
            }),
            id: Id::new("test"),
        })
    }

    #[test]
    fn a_request_id_reads_as_it_was_given_in_place_or_not() {
        for id in ["", "a", &"x".repeat(64), &"y".repeat(65), "é-ü"] {
            assert_eq!(Id::new(id).as_str(), id);
        }
        assert!(matches!(Id::new(&"x".repeat(64)), Id::Inline { .. }));
        assert!(matches!(Id::new(&"x".repeat(65)), Id::Long(_)));
    }

    /// One poll, as the host makes it (a waker that does nothing: nothing here wakes it).
    fn poll_once(
        handler: &mut Pin<Box<InContext<Handler>>>,
    ) -> Poll<RResult<FfiResponse, RString>> {
        let waker = Waker::from(Arc::new(Noop));
        handler
            .as_mut()
            .poll(&mut std::task::Context::from_waker(&waker))
    }

    #[test]
    fn a_handler_future_whose_drop_panics_is_dropped_once_when_it_answers() {
        let drops = Arc::new(AtomicUsize::new(0));
        let mut handler = in_context(true, &drops);
        let polled = poll_once(&mut handler);
        let Poll::Ready(ROk(response)) = polled else {
            panic!("the handler's answer was lost");
        };
        assert_eq!(response.status, 200);
        assert_eq!(drops.load(Ordering::SeqCst), 1, "dropped when it answered");
        drop(handler);
        assert_eq!(drops.load(Ordering::SeqCst), 1, "dropped once");
    }

    #[test]
    fn a_handler_future_whose_drop_panics_is_dropped_once_when_cancelled() {
        let drops = Arc::new(AtomicUsize::new(0));
        let mut handler = in_context(false, &drops);
        let polled = poll_once(&mut handler);
        assert!(polled.is_pending());
        assert_eq!(drops.load(Ordering::SeqCst), 0);
        drop(handler); // the host cancels it: the panic stays inside
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    }
}
