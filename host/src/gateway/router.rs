//! The gateway's routing table: which business worker handles each client's events, the
//! events in flight and those waiting, and the groups and sessions that outlive any worker.
//!
//! Each client belongs to a slot (its number modulo the service's workers) and its events go,
//! in order, to one worker at a time: its slot's holder when it connected. When the master
//! says another worker holds the slot (a reload), the client moves only once the old worker
//! has answered `Done` for every event of it in flight; events that arrive meanwhile wait
//! here, in order, then go to the new worker. So no event is handled twice or out of order,
//! and none is lost unless a worker dies with it (that one is logged with the client's id).
//!
//! Bounds, per client: [`MAX_QUEUED`] events or [`MAX_QUEUED_BYTES`] waiting or in flight;
//! past either, the client is closed with 1013 (try again later), logged and counted. Its send
//! buffer is bounded the same way (`gateway::client`).

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::{
    client::Client as Socket,
    wire::{self, Answer, ConnectInfo, FromBusiness, Question, Session, Target, ToBusiness},
};

/// Events waiting or in flight for one client, at most.
pub const MAX_QUEUED: usize = 1000;
pub const MAX_QUEUED_BYTES: usize = 1024 * 1024;
/// The most session data a client may have.
pub const MAX_SESSION_BYTES: usize = plugin_api::ws::MAX_SESSION_BYTES;

/// What the plugin said to a connecting client.
#[derive(Debug)]
pub enum Verdict {
    Accepted,
    Refused(String),
    /// No worker could say (one died with the event): the client may try again.
    Unavailable(String),
}

/// An event not yet sent to a worker.
enum Event {
    Connect(ConnectInfo),
    Message { text: bool, data: Bytes },
    Close,
}

impl Event {
    fn size(&self) -> usize {
        match self {
            Event::Message { data, .. } => data.len(),
            _ => 0,
        }
    }
}

struct Client {
    slot: usize,
    /// The worker its events go to (none while its slot has no worker).
    link: Option<u32>,
    /// Moving to its slot's new holder: waits for `inflight` to reach 0.
    moving: bool,
    inflight: usize,
    inflight_bytes: usize,
    pending: VecDeque<Event>,
    pending_bytes: usize,
    session: Session,
    groups: HashSet<String>,
    socket: Socket,
    verdict: Option<oneshot::Sender<Verdict>>,
    /// Its connection is gone; the `Close` event is on its way.
    gone: bool,
}

struct Link {
    slot: usize,
    /// Another worker holds its slot now: once nothing uses it, it is let go. (A new
    /// worker's link, not yet its slot's holder, must not be.)
    retired: bool,
    tx: mpsc::UnboundedSender<Bytes>,
    /// seq -> (client, bytes)
    inflight: HashMap<u64, (u64, usize)>,
}

#[derive(Default)]
struct State {
    clients: HashMap<u64, Client>,
    links: HashMap<u32, Link>,
    holders: HashMap<usize, u32>,
    groups: HashMap<String, HashSet<u64>>,
    seq: u64,
}

pub struct Router {
    index: u32,
    workers: usize,
    state: Mutex<State>,
    next_client: AtomicU64,
    /// Clients closed with 1013, events lost with a dead worker: counted for the logs.
    pub overflowed: AtomicU64,
    pub lost: AtomicU64,
}

impl Router {
    pub fn new(index: u32, workers: usize) -> Router {
        Router {
            index,
            workers: workers.max(1),
            state: Mutex::default(),
            next_client: AtomicU64::new(0),
            overflowed: AtomicU64::new(0),
            lost: AtomicU64::new(0),
        }
    }

    pub fn clients(&self) -> usize {
        self.state.lock().unwrap().clients.len()
    }

    /// A connecting client: its id, and where the plugin's verdict will come.
    pub fn connect(&self, info: ConnectInfo, socket: Socket) -> (u64, oneshot::Receiver<Verdict>) {
        let n = self.next_client.fetch_add(1, Ordering::Relaxed);
        let id = (u64::from(self.index) << 48) | n;
        let slot = (n % self.workers as u64) as usize;
        let (tx, rx) = oneshot::channel();
        let mut st = self.state.lock().unwrap();
        let link = st.holders.get(&slot).copied();
        st.clients.insert(
            id,
            Client {
                slot,
                link,
                moving: false,
                inflight: 0,
                inflight_bytes: 0,
                pending: VecDeque::new(),
                pending_bytes: 0,
                session: Session::new(),
                groups: HashSet::new(),
                socket,
                verdict: Some(tx),
                gone: false,
            },
        );
        self.push(&mut st, id, Event::Connect(info));
        (id, rx)
    }

    /// A message from a client.
    pub fn message(&self, id: u64, text: bool, data: Bytes) {
        let mut st = self.state.lock().unwrap();
        self.push(&mut st, id, Event::Message { text, data });
    }

    /// Forgets a client the plugin refused (it never connected; no `Close` follows).
    pub fn forget(&self, id: u64) {
        self.state.lock().unwrap().clients.remove(&id);
    }

    /// A client's connection ended (or was never upgraded): it leaves its groups, and the
    /// plugin hears of it (unless it was refused, or never heard of it).
    pub fn gone(&self, id: u64) {
        let mut st = self.state.lock().unwrap();
        let Some(client) = st.clients.get_mut(&id) else {
            return;
        };
        if client.gone {
            return;
        }
        client.gone = true;
        let groups: Vec<String> = client.groups.drain().collect();
        for group in groups {
            leave(&mut st, id, &group);
        }
        self.push(&mut st, id, Event::Close);
    }

    /// Queues an event of `id` and sends what can go.
    fn push(&self, st: &mut State, id: u64, event: Event) {
        let Some(client) = st.clients.get_mut(&id) else {
            return;
        };
        let queued = client.inflight + client.pending.len();
        let bytes = client.inflight_bytes + client.pending_bytes + event.size();
        if !matches!(event, Event::Close) && (queued >= MAX_QUEUED || bytes > MAX_QUEUED_BYTES) {
            self.overflowed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                "client {} closed with 1013: {queued} events and {bytes} bytes wait for its \
                 worker (at most {MAX_QUEUED} events or {MAX_QUEUED_BYTES} bytes); {} clients \
                 closed so far for this",
                show(id),
                self.overflowed.load(Ordering::Relaxed)
            );
            client
                .socket
                .close(1013, "too many messages waiting; try again later");
            return;
        }
        client.pending_bytes += event.size();
        client.pending.push_back(event);
        self.flush(st, id);
    }

    /// Sends the client's next waiting event to its worker, if it has one, is not moving, and
    /// has answered the client's event before. One event of a client is in flight at a time:
    /// an event carries the client's session as the gateway holds it when the event is sent,
    /// and the worker's session writes for an event arrive before its `Done`, so the next
    /// event sees them. Sent as they came, a client's second message would carry the session
    /// from before its first one's writes (a `/nick` and then a line in the chat example).
    fn flush(&self, st: &mut State, id: u64) {
        let State {
            clients,
            links,
            seq,
            ..
        } = st;
        let Some(client) = clients.get_mut(&id) else {
            return;
        };
        if client.moving || client.inflight > 0 {
            return;
        }
        let Some(link) = client.link.and_then(|pid| links.get_mut(&pid)) else {
            return;
        };
        if let Some(event) = client.pending.pop_front() {
            *seq += 1;
            let size = event.size();
            client.pending_bytes -= size;
            let frame = match event {
                Event::Connect(request) => ToBusiness::Connect {
                    seq: *seq,
                    client: id,
                    request,
                },
                Event::Message { text, data } => ToBusiness::Message {
                    seq: *seq,
                    client: id,
                    text,
                    data,
                    session: client.session.clone(),
                },
                Event::Close => ToBusiness::Close {
                    seq: *seq,
                    client: id,
                    session: client.session.clone(),
                },
            };
            if link.tx.send(wire::encode(&frame)).is_err() {
                // The link's writer is gone; its reader's end will move the client.
                return;
            }
            link.inflight.insert(*seq, (id, size));
            client.inflight += 1;
            client.inflight_bytes += size;
        }
    }

    /// A link to business worker `pid` (of `slot`) opened; `tx` writes frames to it.
    pub fn link_opened(&self, slot: usize, pid: u32, tx: mpsc::UnboundedSender<Bytes>) {
        let mut st = self.state.lock().unwrap();
        st.links.insert(
            pid,
            Link {
                slot,
                retired: false,
                tx,
                inflight: HashMap::new(),
            },
        );
    }

    /// `pid` serves `slot` from now on: the slot's clients move to it.
    pub fn set_holder(&self, slot: usize, pid: u32) {
        let mut st = self.state.lock().unwrap();
        st.holders.insert(slot, pid);
        for (other, link) in st.links.iter_mut() {
            if link.slot == slot && *other != pid {
                link.retired = true;
            }
        }
        let ids: Vec<u64> = st
            .clients
            .iter()
            .filter(|(_, c)| c.slot == slot && c.link != Some(pid))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            let client = st.clients.get_mut(&id).expect("listed above");
            if client.inflight == 0 {
                client.link = Some(pid);
                client.moving = false;
                self.flush(&mut st, id);
            } else {
                client.moving = true;
            }
        }
        self.release_idle_links(&mut st);
    }

    /// Closes retired links that no client uses and that have nothing in flight: their worker
    /// drains, and exits once every gateway let it go.
    fn release_idle_links(&self, st: &mut State) {
        let used: HashSet<u32> = st
            .clients
            .values()
            .filter_map(|c| c.link)
            .chain(st.holders.values().copied())
            .collect();
        st.links.retain(|pid, link| {
            let keep = !link.retired || used.contains(pid) || !link.inflight.is_empty();
            if !keep {
                tracing::debug!("released worker {pid} (slot {})", link.slot);
            }
            keep
        });
    }

    /// The link to `pid` ended: a worker that exited (or crashed) with events in flight
    /// loses them (logged); its clients wait for their slot's next worker.
    pub fn link_closed(&self, pid: u32) {
        let mut st = self.state.lock().unwrap();
        let Some(link) = st.links.remove(&pid) else {
            return;
        };
        for (seq, (id, size)) in link.inflight {
            let Some(client) = st.clients.get_mut(&id) else {
                continue;
            };
            client.inflight -= 1;
            client.inflight_bytes -= size;
            self.lost.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                "worker {pid} ended with event {seq} of client {} unhandled: that event is lost",
                show(id)
            );
            if let Some(verdict) = client.verdict.take() {
                let _ = verdict.send(Verdict::Unavailable(format!(
                    "the worker that was to accept the connection ended (pid {pid})"
                )));
            }
        }
        if st.holders.get(&link.slot) == Some(&pid) {
            st.holders.remove(&link.slot);
        }
        let ids: Vec<u64> = st
            .clients
            .iter()
            .filter(|(_, c)| c.link == Some(pid) || (c.moving && c.inflight == 0))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            let holder = st
                .clients
                .get(&id)
                .and_then(|c| st.holders.get(&c.slot))
                .copied();
            let client = st.clients.get_mut(&id).expect("listed above");
            client.link = holder;
            client.moving = false;
            self.flush(&mut st, id);
        }
        self.finish_gone(&mut st);
    }

    /// A frame from the worker at the other end of link `pid`.
    pub fn from_business(&self, pid: u32, frame: FromBusiness) {
        let mut st = self.state.lock().unwrap();
        match frame {
            FromBusiness::Done {
                seq,
                client: id,
                refused,
            } => {
                let Some((_, size)) = st.links.get_mut(&pid).and_then(|l| l.inflight.remove(&seq))
                else {
                    return;
                };
                let State {
                    clients, holders, ..
                } = &mut *st;
                let Some(client) = clients.get_mut(&id) else {
                    return;
                };
                client.inflight -= 1;
                client.inflight_bytes -= size;
                if let Some(verdict) = client.verdict.take() {
                    let _ = verdict.send(match refused {
                        None => Verdict::Accepted,
                        Some(reason) => Verdict::Refused(reason),
                    });
                }
                if client.moving && client.inflight == 0 {
                    client.moving = false;
                    client.link = holders.get(&client.slot).copied();
                }
                self.flush(&mut st, id);
                self.finish_gone(&mut st);
                self.release_idle_links(&mut st);
            }
            FromBusiness::Send { to, text, data } => {
                let ids: Vec<u64> = match to {
                    Target::Clients(ids) => ids,
                    Target::Group(group) => st
                        .groups
                        .get(&group)
                        .map(|m| m.iter().copied().collect())
                        .unwrap_or_default(),
                    Target::All => st.clients.keys().copied().collect(),
                };
                for id in ids {
                    if let Some(client) = st.clients.get(&id).filter(|c| !c.gone) {
                        client.socket.send(text, data.clone());
                    }
                }
            }
            FromBusiness::Join { client: id, group } => {
                if let Some(client) = st.clients.get_mut(&id).filter(|c| !c.gone) {
                    client.groups.insert(group.clone());
                    st.groups.entry(group).or_default().insert(id);
                }
            }
            FromBusiness::Leave { client: id, group } => {
                if let Some(client) = st.clients.get_mut(&id) {
                    client.groups.remove(&group);
                }
                leave(&mut st, id, &group);
            }
            FromBusiness::Close { client: id } => {
                if let Some(client) = st.clients.get(&id) {
                    client.socket.close(1000, "");
                }
            }
            FromBusiness::SetSession {
                client: id,
                key,
                value,
            } => {
                if let Some(client) = st.clients.get_mut(&id) {
                    let mut session = client.session.clone();
                    session.retain(|(k, _)| *k != key);
                    if let Some(value) = value {
                        session.push((key, value));
                    }
                    let size: usize = session.iter().map(|(k, v)| k.len() + v.len()).sum();
                    if size > MAX_SESSION_BYTES {
                        tracing::warn!(
                            "client {}: a session write refused: it would hold {size} bytes \
                             (at most {MAX_SESSION_BYTES})",
                            show(id)
                        );
                    } else {
                        client.session = session;
                    }
                }
            }
            FromBusiness::Ask { id, question } => {
                let answer = match question {
                    Question::GroupClients(group) => Answer::Clients(
                        st.groups
                            .get(&group)
                            .map(|m| m.iter().copied().collect())
                            .unwrap_or_default(),
                    ),
                    Question::Session(client) => {
                        Answer::Session(st.clients.get(&client).map(|c| c.session.clone()))
                    }
                };
                if let Some(link) = st.links.get(&pid) {
                    let _ = link
                        .tx
                        .send(wire::encode(&ToBusiness::Answer { id, answer }));
                }
            }
        }
    }

    /// Forgets clients that are gone and whose `Close` was handled (or can no longer be).
    fn finish_gone(&self, st: &mut State) {
        st.clients
            .retain(|_, c| !(c.gone && c.inflight == 0 && c.pending.is_empty()));
    }

    /// Every client, to close them all (stop, upgrade).
    pub fn close_all(&self, code: u16, reason: &str) {
        for client in self.state.lock().unwrap().clients.values() {
            client.socket.close(code, reason);
        }
    }

    /// Nothing waits and nothing is in flight (a drain may end).
    pub fn idle(&self) -> bool {
        let st = self.state.lock().unwrap();
        st.clients.is_empty()
            || (st.links.values().all(|l| l.inflight.is_empty())
                && st.clients.values().all(|c| c.pending.is_empty()))
    }

    /// Closes every link (the gateway exits).
    pub fn close_links(&self) {
        self.state.lock().unwrap().links.clear();
    }
}

fn leave(st: &mut State, id: u64, group: &str) {
    if let Some(members) = st.groups.get_mut(group) {
        members.remove(&id);
        if members.is_empty() {
            st.groups.remove(group);
        }
    }
}

/// A client id as the plugin API shows it: `gateway-number`.
pub fn show(id: u64) -> String {
    plugin_api::ws::ClientId(id).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::client::Client as Socket;

    fn info() -> ConnectInfo {
        ConnectInfo {
            path: "/".into(),
            query: String::new(),
            peer: "127.0.0.1:1".into(),
            headers: Vec::new(),
            tls: false,
        }
    }

    fn frames(rx: &mut mpsc::UnboundedReceiver<Bytes>) -> Vec<ToBusiness> {
        let mut out = Vec::new();
        while let Ok(b) = rx.try_recv() {
            out.push(postcard::from_bytes(&b).unwrap());
        }
        out
    }

    fn seq_of(frame: &ToBusiness) -> u64 {
        match frame {
            ToBusiness::Connect { seq, .. }
            | ToBusiness::Message { seq, .. }
            | ToBusiness::Close { seq, .. } => *seq,
            ToBusiness::Answer { .. } => 0,
        }
    }

    #[test]
    fn a_client_moves_to_the_new_worker_only_after_the_old_one_is_done() {
        let router = Router::new(0, 1);
        let (old_tx, mut old_rx) = mpsc::unbounded_channel();
        let (new_tx, mut new_rx) = mpsc::unbounded_channel();
        router.link_opened(0, 10, old_tx);
        router.set_holder(0, 10);
        let (socket, _out) = Socket::new();
        let (id, _verdict) = router.connect(info(), socket);
        router.message(id, true, Bytes::from_static(b"1"));
        // One event of a client in flight at a time: message 1 waits for the connect's Done.
        let connect = frames(&mut old_rx);
        assert_eq!(connect.len(), 1, "the connect went to the old worker");
        assert!(matches!(&connect[0], ToBusiness::Connect { .. }));
        router.from_business(
            10,
            FromBusiness::Done {
                seq: seq_of(&connect[0]),
                client: id,
                refused: None,
            },
        );
        let sent = frames(&mut old_rx);
        assert_eq!(sent.len(), 1, "then message 1 went to the old worker");
        assert!(matches!(&sent[0], ToBusiness::Message { data, .. } if &data[..] == b"1"));

        // A reload: the new worker holds the slot; message 2 waits for the old one's Done.
        router.link_opened(0, 20, new_tx);
        router.set_holder(0, 20);
        router.message(id, true, Bytes::from_static(b"2"));
        assert!(frames(&mut new_rx).is_empty());
        for frame in &sent {
            router.from_business(
                10,
                FromBusiness::Done {
                    seq: seq_of(frame),
                    client: id,
                    refused: None,
                },
            );
        }
        let moved = frames(&mut new_rx);
        assert_eq!(moved.len(), 1);
        assert!(matches!(&moved[0], ToBusiness::Message { data, .. } if &data[..] == b"2"));
        // The old link is released (closed) once nothing uses it.
        assert!(old_rx.try_recv().is_err());
        assert!(!router.state.lock().unwrap().links.contains_key(&10));
    }

    #[test]
    fn events_past_the_bound_close_the_client_with_1013() {
        let router = Router::new(0, 1);
        let (socket, out) = Socket::new();
        // No worker holds the slot: everything waits.
        let (id, _verdict) = router.connect(info(), socket);
        for _ in 0..MAX_QUEUED {
            router.message(id, true, Bytes::from_static(b"x"));
        }
        assert_eq!(router.overflowed.load(Ordering::Relaxed), 1);
        assert_eq!(out.closed_with(), Some(1013));
    }
}
