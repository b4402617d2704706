//! Keep-alive load for the reload tests: client threads that send `GET /` in a loop on their own
//! keep-alive connections, never retry, and count every failed request.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread,
    time::Duration,
};

use crate::{
    harness::wait_until,
    http::{Conn, Transport},
};

/// What the clients saw, all together.
#[derive(Debug, Default)]
pub struct Seen {
    pub ok: usize,
    /// Every failed request: transport errors and non-2xx answers.
    pub errors: Vec<String>,
    /// How often each answer body came back.
    pub bodies: HashMap<String, usize>,
    pub connects: usize,
    /// HTTP/2 requests the server refused unprocessed and that were sent again.
    pub retried: usize,
}

pub struct Load {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicUsize>,
    seen: Arc<Mutex<Seen>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    /// `clients` threads, each pausing `pause` between its requests (zero: back to back).
    pub fn start(addr: &str, clients: usize, pause: Duration) -> Load {
        Load::start_path(addr, "/", clients, pause)
    }

    pub fn start_path(addr: &str, path: &str, clients: usize, pause: Duration) -> Load {
        Load::start_with(addr, path, clients, pause, Transport::Plain, false)
    }

    /// Clients over `transport`, speaking HTTP/2 (`h2`) or HTTP/1.1.
    pub fn start_with(
        addr: &str,
        path: &str,
        clients: usize,
        pause: Duration,
        transport: Transport,
        h2: bool,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let threads = (0..clients)
            .map(|_| {
                let (addr, path) = (addr.to_string(), path.to_string());
                let (stop, served, seen) = (stop.clone(), served.clone(), seen.clone());
                let transport = transport.clone();
                thread::spawn(move || {
                    let mut conn = Conn::with(&addr, transport, h2);
                    while !stop.load(Ordering::SeqCst) {
                        let result = conn.get(&path);
                        let mut seen = seen.lock().unwrap();
                        match result {
                            Ok(r) if (200..300).contains(&r.status) => {
                                seen.ok += 1;
                                *seen.bodies.entry(r.body).or_default() += 1;
                                served.fetch_add(1, Ordering::SeqCst);
                            }
                            Ok(r) => seen.errors.push(format!("status {}: {}", r.status, r.body)),
                            Err(e) => seen.errors.push(e),
                        }
                        drop(seen);
                        if !pause.is_zero() {
                            thread::sleep(pause);
                        }
                    }
                    let mut seen = seen.lock().unwrap();
                    seen.connects += conn.connects;
                    seen.retried += conn.retried;
                })
            })
            .collect();
        Load {
            stop,
            served,
            seen,
            threads,
        }
    }

    /// Requests answered so far.
    pub fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }

    /// Waits until `n` more requests were answered.
    pub fn wait_for_more(&self, n: usize) {
        let target = self.served() + n;
        wait_until("the clients are served", || self.served() >= target);
    }

    /// How many answers contained `text` so far.
    pub fn answers_with(&self, text: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .bodies
            .iter()
            .filter(|(b, _)| b.contains(text))
            .map(|(_, n)| n)
            .sum()
    }

    pub fn stop(mut self) -> Seen {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}
