//! A websocket service's business worker: loads the plugin (a [`plugin_api::ws::WsPlugin`]) in
//! its on-start hook, takes events from every gateway over its links, and runs them on one
//! plugin thread, one at a time, in the order each gateway sent them; what the plugin asks
//! (send, join, session, ...) goes to the gateway that holds the client, before the event's
//! `Done`. A reload replaces these workers only; the gateways keep the clients.
//!
//! Liveness covers the plugin thread: the heartbeat stops while an event has been running
//! longer than `handler_timeout`, so the master replaces a worker whose plugin is stuck (and
//! the clients move to the replacement; the stuck event is lost, and logged by the gateway).
//! A drain ends when every gateway has let the worker go (moved its clients away).

use std::{
    collections::HashMap,
    ffi::c_void,
    os::unix::net::UnixStream as StdUnixStream,
    panic::{catch_unwind, AssertUnwindSafe},
    path::Path,
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc as std_mpsc, Arc, Mutex,
    },
    time::Duration,
};

use abi_stable::{
    library::{lib_header_from_path, LibraryError},
    std_types::{RErr, RNone, ROk, RSlice, RSome, RString, RVec, Tuple2},
};
use bytes::Bytes;
use futures_util::StreamExt;
use plugin_api::{
    ffi::{FfiHeader, PluginModRef},
    ws::ffi::{self as wsffi, FfiAnswer, FfiConnect, FfiGateway, FfiOp, WsPluginModRef},
};
use tokio::{net::UnixStream, sync::mpsc, sync::watch};
use tracing::Instrument;

use super::link::Link;
use crate::{
    gateway::wire::{self, Answer, FromBusiness, Question, Session, Target, ToBusiness},
    inherit::{self, Kind},
    protocol::{
        monotonic_ns, FromWorker, Role, StartTimings, ToWorker, WorkerSpec, FIRST_LISTENER_FD,
    },
};

/// How long a plugin waits for a gateway's answer (`client_ids_by_group`, another client's
/// session).
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// A loaded and started WebSocket plugin.
#[derive(Clone, Copy)]
struct WsPlugin {
    module: WsPluginModRef,
}

impl WsPlugin {
    fn load_and_start(spec: &WorkerSpec, path: &Path) -> Result<WsPlugin, String> {
        let header =
            lib_header_from_path(path).map_err(|e| super::plugin::explain(e, spec, None))?;
        let declared = header.version_strings().to_string();
        let module = match header.init_root_module::<WsPluginModRef>() {
            Ok(module) => module,
            Err(LibraryError::AbiInstability(_))
                if header.init_root_module::<PluginModRef>().is_ok() =>
            {
                return Err(format!(
                    "{} is an HTTP plugin (plugin_api::export_plugin!), but service {} has \
                     kind = \"websocket\": implement plugin_api::ws::WsPlugin and export it with \
                     plugin_api::export_ws_plugin!, or set kind = \"http\"",
                    spec.plugin_source.display(),
                    spec.service
                ))
            }
            Err(e) => return Err(super::plugin::explain(e, spec, Some(&declared))),
        };
        match (module.start())(super::plugin::context(spec)) {
            ROk(()) => Ok(WsPlugin { module }),
            RErr(reason) => Err(format!(
                "plugin {} ({}) failed to start: {reason}. Fix the cause in the plugin's \
                 on_start and reload.",
                module.name(),
                spec.plugin_source.display()
            )),
        }
    }
}

/// The links to the gateways, by gateway index, and the plugin's questions waiting for answers.
struct Links {
    writers: Mutex<HashMap<u32, mpsc::UnboundedSender<Bytes>>>,
    open: watch::Sender<usize>,
    asks: Mutex<HashMap<u64, std_mpsc::Sender<Answer>>>,
    next_ask: AtomicU64,
    max_message_bytes: usize,
}

impl Links {
    fn send(&self, gateway: u32, frame: &FromBusiness) {
        if let Some(tx) = self.writers.lock().unwrap().get(&gateway) {
            let _ = tx.send(wire::encode(frame));
        }
    }

    fn send_all(&self, frame: &FromBusiness) {
        let bytes = wire::encode(frame);
        for tx in self.writers.lock().unwrap().values() {
            let _ = tx.send(bytes.clone());
        }
    }

    /// Asks `gateways` a question; their answers, as many as came within [`ASK_TIMEOUT`].
    fn ask(&self, gateways: &[u32], question: impl Fn() -> Question) -> Vec<Answer> {
        let (tx, rx) = std_mpsc::channel();
        let mut ids = Vec::new();
        for gateway in gateways {
            let id = self.next_ask.fetch_add(1, Ordering::Relaxed);
            self.asks.lock().unwrap().insert(id, tx.clone());
            ids.push(id);
            self.send(
                *gateway,
                &FromBusiness::Ask {
                    id,
                    question: question(),
                },
            );
        }
        drop(tx);
        let deadline = std::time::Instant::now() + ASK_TIMEOUT;
        let mut answers = Vec::new();
        while answers.len() < ids.len() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(answer) => answers.push(answer),
                Err(_) => break,
            }
        }
        let mut asks = self.asks.lock().unwrap();
        for id in ids {
            asks.remove(&id);
        }
        answers
    }
}

/// The host's state for one event, behind the `FfiGateway` the plugin gets.
struct EventCtx<'a> {
    links: &'a Links,
}

extern "C" fn host_call(host: *const c_void, op: &FfiOp<'_>) -> FfiAnswer {
    // SAFETY: `host` is the `&EventCtx` this module put in the `FfiGateway` of the event being
    // handled; the plugin only gets a reference to that `FfiGateway` for the duration of the
    // event's call, so it can only call back while the `EventCtx` (on the caller's stack) lives.
    let ctx = unsafe { &*(host as *const EventCtx<'_>) };
    // A panic must not unwind into the plugin's frames.
    catch_unwind(AssertUnwindSafe(|| ctx.call(op))).unwrap_or_default()
}

fn owner(client: u64) -> u32 {
    (client >> 48) as u32
}

impl EventCtx<'_> {
    fn call(&self, op: &FfiOp<'_>) -> FfiAnswer {
        let links = self.links;
        let clients = op.clients.as_slice();
        let first = clients.first().copied();
        let message = || (op.text, Bytes::copy_from_slice(op.data.as_slice()));
        match op.kind {
            wsffi::OP_SEND_CLIENTS => {
                let (text, data) = message();
                let mut by_gateway: HashMap<u32, Vec<u64>> = HashMap::new();
                for c in clients {
                    by_gateway.entry(owner(*c)).or_default().push(*c);
                }
                for (gateway, ids) in by_gateway {
                    links.send(
                        gateway,
                        &FromBusiness::Send {
                            to: Target::Clients(ids),
                            text,
                            data: data.clone(),
                        },
                    );
                }
            }
            wsffi::OP_SEND_GROUP | wsffi::OP_SEND_ALL => {
                let (text, data) = message();
                let to = if op.kind == wsffi::OP_SEND_ALL {
                    Target::All
                } else {
                    Target::Group(op.group.to_string())
                };
                links.send_all(&FromBusiness::Send { to, text, data });
            }
            wsffi::OP_JOIN | wsffi::OP_LEAVE | wsffi::OP_CLOSE | wsffi::OP_SET_SESSION => {
                let Some(client) = first else {
                    return FfiAnswer::default();
                };
                let group = op.group.to_string();
                let frame = match op.kind {
                    wsffi::OP_JOIN => FromBusiness::Join { client, group },
                    wsffi::OP_LEAVE => FromBusiness::Leave { client, group },
                    wsffi::OP_CLOSE => FromBusiness::Close { client },
                    _ => FromBusiness::SetSession {
                        client,
                        key: op.key.to_string(),
                        value: op.value.map(|v| v.to_string()).into_option(),
                    },
                };
                links.send(owner(client), &frame);
            }
            wsffi::OP_GROUP_CLIENTS => {
                let gateways: Vec<u32> = links.writers.lock().unwrap().keys().copied().collect();
                let group = op.group.to_string();
                let mut answer = FfiAnswer::default();
                for a in links.ask(&gateways, || Question::GroupClients(group.clone())) {
                    if let Answer::Clients(ids) = a {
                        answer.clients.extend(ids);
                    }
                }
                return answer;
            }
            wsffi::OP_GET_SESSION => {
                let Some(client) = first else {
                    return FfiAnswer::default();
                };
                let mut answer = FfiAnswer::default();
                if let Some(Answer::Session(Some(session))) = links
                    .ask(&[owner(client)], || Question::Session(client))
                    .pop()
                {
                    answer.session = ffi_session(&session);
                }
                return answer;
            }
            other => {
                return FfiAnswer {
                    error: RSome(format!("unknown gateway operation {other}").into()),
                    ..FfiAnswer::default()
                }
            }
        }
        FfiAnswer::default()
    }
}

fn ffi_session(session: &Session) -> RVec<Tuple2<RString, RString>> {
    session
        .iter()
        .map(|(k, v)| Tuple2(RString::from(k.as_str()), RString::from(v.as_str())))
        .collect()
}

/// Runs a business worker (`host worker` with [`Role::Business`]) until its drain ends.
pub fn run(
    spec: WorkerSpec,
    channel: StdUnixStream,
    link: Arc<Link>,
    mut timings: StartTimings,
) -> ExitCode {
    let Role::Business {
        gateways,
        max_message_bytes,
    } = spec.role.clone()
    else {
        return ExitCode::FAILURE;
    };
    let fail = |reason: String| link.start_failed(reason);
    // The on-start hook.
    let plugin = match super::inherited_plugin().and_then(|path| {
        timings.loaded = monotonic_ns();
        WsPlugin::load_and_start(&spec, &path)
    }) {
        Ok(p) => p,
        Err(reason) => return fail(reason),
    };
    timings.started = monotonic_ns();
    if spec.check_only {
        (plugin.module.stop())();
        link.send(&ready(&plugin, timings));
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(format!("could not start the async runtime: {e}")),
    };
    let links = Arc::new(Links {
        writers: Mutex::default(),
        open: watch::Sender::new(0),
        asks: Mutex::default(),
        next_ask: AtomicU64::new(0),
        max_message_bytes,
    });
    let (events_tx, events_rx) = std_mpsc::channel::<(u32, ToBusiness)>();
    let busy_since = Arc::new(AtomicU64::new(0));
    let handled = Arc::new(AtomicU64::new(0));
    let span = tracing::Span::current();
    let code = runtime.block_on(
        async {
            for (i, gateway) in gateways.iter().enumerate() {
                let fd = FIRST_LISTENER_FD + i as i32;
                match inherit::adopt(fd, Kind::Socket) {
                    Some(fd) => open_link(&links, *gateway, StdUnixStream::from(fd), &events_tx),
                    None => {
                        return fail(format!(
                            "the link to gateway {gateway} was not passed at fd {fd}"
                        ))
                    }
                }
            }
            // The plugin thread: events one at a time, in order.
            {
                let (links, busy_since, handled) =
                    (links.clone(), busy_since.clone(), handled.clone());
                let span = tracing::Span::current();
                std::thread::Builder::new()
                    .name("plugin".into())
                    .spawn(move || {
                        let _entered = span.enter();
                        for (gateway, event) in events_rx {
                            busy_since.store(monotonic_ns(), Ordering::Relaxed);
                            handle(plugin, &links, gateway, event);
                            busy_since.store(0, Ordering::Relaxed);
                            handled.fetch_add(1, Ordering::Relaxed);
                        }
                    })
                    .map_err(|e| format!("could not start the plugin thread: {e}"))
                    .map(drop)
                    .unwrap_or_else(|e| tracing::error!("{e}"));
            }
            timings.serving = monotonic_ns();
            if !link.send(&ready(&plugin, timings)) {
                return ExitCode::FAILURE;
            }
            tracing::info!(
                "ready: plugin {} {} (business worker, {} gateways)",
                plugin.module.name(),
                plugin.module.version(),
                gateways.len()
            );
            let draining = Arc::new(AtomicBool::new(false));
            tokio::spawn(
                heartbeat(
                    link.clone(),
                    spec.clone(),
                    busy_since.clone(),
                    handled.clone(),
                    links.clone(),
                )
                .in_current_span(),
            );
            let channel = match channel
                .set_nonblocking(true)
                .and_then(|()| UnixStream::from_std(channel))
            {
                Ok(c) => c,
                Err(_) => return ExitCode::FAILURE,
            };
            talk_to_master(channel, &links, &events_tx, &link, &handled, &draining).await;
            // Drained: every gateway let this worker go (or the drain timeout kills it).
            let mut open = links.open.subscribe();
            let _ = open.wait_for(|n| *n == 0).await;
            drop(events_tx);
            let stop = tokio::task::spawn_blocking(move || (plugin.module.stop())());
            let _ = tokio::time::timeout(Duration::from_secs(5), stop).await;
            tracing::info!(
                "drained after {} events, exiting",
                handled.load(Ordering::Relaxed)
            );
            ExitCode::SUCCESS
        }
        .instrument(span),
    );
    runtime.shutdown_timeout(Duration::from_millis(100));
    code
}

fn ready(plugin: &WsPlugin, timings: StartTimings) -> FromWorker {
    FromWorker::Ready {
        plugin_name: plugin.module.name().to_string(),
        plugin_crate_version: plugin.module.version().to_string(),
        timings,
    }
}

/// Starts reading the link to `gateway`: answers go to the questions that wait for them,
/// events to the plugin thread.
fn open_link(
    links: &Arc<Links>,
    gateway: u32,
    stream: StdUnixStream,
    events: &std_mpsc::Sender<(u32, ToBusiness)>,
) {
    let stream = match stream
        .set_nonblocking(true)
        .and_then(|()| UnixStream::from_std(stream))
    {
        Ok(s) => s,
        Err(e) => return tracing::error!("could not use the link to gateway {gateway}: {e}"),
    };
    let (tx, mut frames) = wire::open::<_, ToBusiness>(stream, links.max_message_bytes);
    links.writers.lock().unwrap().insert(gateway, tx);
    links.open.send_modify(|n| *n += 1);
    let (links, events) = (links.clone(), events.clone());
    tokio::spawn(
        async move {
            while let Some(frame) = frames.next().await {
                match frame {
                    Ok(ToBusiness::Answer { id, answer }) => {
                        if let Some(tx) = links.asks.lock().unwrap().get(&id) {
                            let _ = tx.send(answer);
                        }
                    }
                    Ok(event) => {
                        if events.send((gateway, event)).is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!("gateway {gateway}: {e}");
                        break;
                    }
                }
            }
            links.writers.lock().unwrap().remove(&gateway);
            links.open.send_modify(|n| *n -= 1);
        }
        .in_current_span(),
    );
}

/// One event, on the plugin thread; then its `Done` to its gateway.
fn handle(plugin: WsPlugin, links: &Links, gateway: u32, event: ToBusiness) {
    let ctx = EventCtx { links };
    let ffi = |client: u64, session: &Session| FfiGateway {
        host: &ctx as *const EventCtx<'_> as *const c_void,
        call: host_call,
        client,
        session: ffi_session(session),
    };
    let (seq, client, refused) = match event {
        ToBusiness::Connect {
            seq,
            client,
            request,
        } => {
            let req = FfiConnect {
                path: request.path.into(),
                query: request.query.into(),
                peer: request.peer.into(),
                headers: request
                    .headers
                    .into_iter()
                    .map(|(name, value)| FfiHeader {
                        name: name.into(),
                        value: value.to_vec().into(),
                    })
                    .collect(),
                tls: request.tls,
            };
            let refused = match (plugin.module.connect())(&ffi(client, &Session::new()), &req) {
                ROk(RNone) => None,
                ROk(RSome(reason)) => Some(reason.to_string()),
                RErr(panic) => {
                    tracing::error!("client {}: {panic}; refusing it", show(client));
                    Some("the service failed to accept the connection".to_string())
                }
            };
            (seq, client, refused)
        }
        ToBusiness::Message {
            seq,
            client,
            text,
            data,
            session,
        } => {
            let handled =
                (plugin.module.message())(&ffi(client, &session), text, RSlice::from_slice(&data));
            if let RErr(panic) = handled {
                tracing::error!("client {}: {panic}; the message is dropped", show(client));
            }
            (seq, client, None)
        }
        ToBusiness::Close {
            seq,
            client,
            session,
        } => {
            if let RErr(panic) = (plugin.module.close())(&ffi(client, &session)) {
                tracing::error!("client {}: {panic}", show(client));
            }
            (seq, client, None)
        }
        ToBusiness::Answer { .. } => return,
    };
    links.send(
        gateway,
        &FromBusiness::Done {
            seq,
            client,
            refused,
        },
    );
}

fn show(client: u64) -> String {
    crate::gateway::router::show(client)
}

/// Heartbeats from the runtime, stopped while the plugin thread has been inside one event for
/// longer than `handler_timeout`.
async fn heartbeat(
    link: Arc<Link>,
    spec: WorkerSpec,
    busy_since: Arc<AtomicU64>,
    handled: Arc<AtomicU64>,
    links: Arc<Links>,
) {
    let every = Duration::from_millis(spec.heartbeat_ms.max(10));
    let limit = spec.handler_timeout_ms.saturating_mul(1_000_000);
    let mut warned = false;
    loop {
        tokio::time::sleep(every).await;
        let since = busy_since.load(Ordering::Relaxed);
        if since != 0 && monotonic_ns().saturating_sub(since) > limit {
            if !warned {
                warned = true;
                tracing::error!(
                    "an event has run for longer than handler_timeout ({} ms): no more \
                     heartbeats, so that the master replaces this worker",
                    spec.handler_timeout_ms
                );
            }
            continue;
        }
        link.send(&FromWorker::Heartbeat {
            requests: handled.load(Ordering::Relaxed),
            rss_bytes: super::rss_bytes(),
            connections: *links.open.borrow() as u64,
            stats: Default::default(),
        });
    }
}

/// Follows the master until it says `Drain` or goes away.
async fn talk_to_master(
    channel: UnixStream,
    links: &Arc<Links>,
    events: &std_mpsc::Sender<(u32, ToBusiness)>,
    link: &Arc<Link>,
    handled: &AtomicU64,
    draining: &AtomicBool,
) {
    let mut messages = super::MasterMessages::new(channel, link.clone());
    while let Some((message, mut fds)) = messages.next().await {
        match message {
            ToWorker::Drain => {
                tracing::info!("draining on the master's request");
                draining.store(true, Ordering::SeqCst);
                link.send(&FromWorker::StoppedAccepting);
                messages.keep_reading();
                return;
            }
            ToWorker::GatewayLink { gateway } => match fds.pop() {
                Some(fd) => open_link(links, gateway, StdUnixStream::from(fd), events),
                None => tracing::warn!("a link to gateway {gateway} came without its socket"),
            },
            ToWorker::Stats => {
                link.send(&FromWorker::Stats {
                    requests: handled.load(Ordering::Relaxed),
                });
            }
            other => tracing::debug!("business worker: ignoring {other:?}"),
        }
    }
}
