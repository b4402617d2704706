//! WebSocket services: the chat example through real WebSocket clients (tokio-tungstenite),
//! clients that stay connected and lose nothing while the plugin is reloaded again and again,
//! a handler that panics and a worker that crashes under connected clients, a gateway that
//! dies, and the close code of a stop.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt};
use tokio::runtime::Runtime;
use tokio_tungstenite::{
    connect_async,
    tungstenite::{client::IntoClientRequest, protocol::frame::coding::CloseCode, Message},
    MaybeTlsStream, WebSocketStream,
};

use crate::harness::{alive, dir_with_config, output_text, wait_until, Host};

type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

fn config(workers: usize, gateways: usize, extra: &str) -> String {
    format!(
        "[[service]]\nname = \"chat\"\nkind = \"websocket\"\nlisten = [\"127.0.0.1:0\"]\n\
         plugin = \"plugin.so\"\nworkers = {workers}\ngateways = {gateways}\n\
         canary_probation = \"0s\"\nprobation = \"0s\"\n{extra}\n"
    )
}

fn start(workers: usize, gateways: usize, extra: &str) -> Host {
    let dir = dir_with_config(&config(workers, gateways, extra), &[("plugin.so", "chat")]);
    Host::start(dir, &["--config", "host.toml"])
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn connect(addr: &str) -> Ws {
    connect_async(format!("ws://{addr}/chat"))
        .await
        .unwrap_or_else(|e| panic!("connect to ws://{addr}: {e}"))
        .0
}

async fn say(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
}

/// The next text message, within 10 s.
async fn hear(ws: &mut Ws) -> String {
    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => t.to_string(),
        other => panic!("expected a text message, got {other:?}"),
    }
}

#[test]
fn chat_rooms_nicknames_and_refused_origins() {
    let host = start(
        2,
        2,
        "[service.config]\nallowed_origin = \"http://good.example\"",
    );
    let addr = host.addr("chat");
    // The ready line names the service's scheme.
    assert!(
        host.logs().contains(&format!("chat on ws://{addr}")),
        "{}",
        host.logs()
    );
    // `host status` lists the gateways with the business workers, and their connections.
    let status = output_text(&host.cli(&["status"]));
    assert!(
        status.contains("CONNS") && status.contains("gw 1"),
        "{status}"
    );
    runtime().block_on(async {
        let mut alice = connect(&addr).await;
        let mut bob = connect(&addr).await;
        say(&mut alice, "/nick alice").await;
        assert_eq!(hear(&mut alice).await, "alice (v1)");
        say(&mut bob, "/nick bob").await;
        assert_eq!(hear(&mut bob).await, "bob (v1)");
        say(&mut alice, "/join lobby").await;
        assert_eq!(hear(&mut alice).await, "[lobby] * alice joined (v1)");
        say(&mut bob, "/join lobby").await;
        assert_eq!(hear(&mut bob).await, "[lobby] * bob joined (v1)");
        assert_eq!(hear(&mut alice).await, "[lobby] * bob joined (v1)");
        say(&mut alice, "hi").await;
        assert_eq!(hear(&mut alice).await, "[lobby] alice: hi (v1)");
        assert_eq!(hear(&mut bob).await, "[lobby] alice: hi (v1)");
        say(&mut bob, "/who").await;
        assert_eq!(hear(&mut bob).await, "[lobby] 2 here (v1)");
        // Bob leaves: the room hears it (on_close reads his session).
        bob.close(None).await.unwrap();
        assert_eq!(hear(&mut alice).await, "[lobby] * bob left (v1)");

        // The plugin refuses another origin with 403, in on_connect.
        let mut request = format!("ws://{addr}/chat").into_client_request().unwrap();
        request
            .headers_mut()
            .insert("origin", "http://evil.example".parse().unwrap());
        let Err(refused) = connect_async(request).await else {
            panic!("a client from another origin was accepted")
        };
        assert!(refused.to_string().contains("403"), "{refused}");
    });
    // A plain HTTP request is told this service speaks WebSocket.
    let resp = crate::http::get(&addr, "/");
    assert_eq!(resp.status, 426);
}

/// A client that sends its messages without waiting for answers: each is handled with the
/// session its earlier ones wrote (the nickname and room of the lines before it), as when it
/// waits between them.
#[test]
fn a_message_sees_the_session_its_clients_earlier_messages_wrote() {
    let host = start(1, 1, "");
    let addr = host.addr("chat");
    runtime().block_on(async {
        let mut ann = connect(&addr).await;
        for line in ["/nick ann", "/join lobby", "hello"] {
            ws_feed(&mut ann, line).await;
        }
        ann.flush().await.unwrap();
        assert_eq!(hear(&mut ann).await, "ann (v1)");
        assert_eq!(hear(&mut ann).await, "[lobby] * ann joined (v1)");
        assert_eq!(hear(&mut ann).await, "[lobby] ann: hello (v1)");
    });
}

/// Queues a text message without flushing it, so that several go out in one write.
async fn ws_feed(ws: &mut Ws, text: &str) {
    ws.feed(Message::text(text)).await.unwrap();
}

/// 100 clients each send a numbered message every 50 ms while the plugin is reloaded 20 times
/// between two builds: every client stays connected, every message is answered once, in order,
/// and after each reload the answers come from the new version.
#[test]
fn clients_stay_connected_and_lose_nothing_across_twenty_reloads() {
    const CLIENTS: usize = 100;
    const RELOADS: usize = 20;
    let host = start(2, 2, "");
    let addr = host.addr("chat");
    let rt = runtime();
    // (when the reload started, when it finished, the version it put live)
    type Reloads = Vec<(Instant, Instant, &'static str)>;
    let reloads: Arc<Mutex<Reloads>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (addr, stop) = (addr.clone(), stop.clone());
        clients.push(rt.spawn(async move {
            let ws = connect(&addr).await;
            let (mut tx, mut rx) = ws.split();
            // Sent: (n, when); heard: (n, version).
            let sent: Arc<Mutex<Vec<Instant>>> = Arc::default();
            let sender = {
                let sent = sent.clone();
                async move {
                    let mut n = 0;
                    let mut tick = tokio::time::interval(Duration::from_millis(50));
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        tick.tick().await;
                        sent.lock().unwrap().push(Instant::now());
                        tx.send(Message::text(format!("echo {c} {n}")))
                            .await
                            .map_err(|e| format!("client {c}: send {n}: {e}"))?;
                        n += 1;
                    }
                    Ok::<_, String>((n, tx))
                }
            };
            let sender = tokio::spawn(sender);
            let (n, mut tx) = sender.await.unwrap()?;
            // Every message answered, then close.
            let mut heard = Vec::new();
            while heard.len() < n {
                match tokio::time::timeout(Duration::from_secs(10), rx.next()).await {
                    Ok(Some(Ok(Message::Text(t)))) => {
                        // "v2 echo C N"
                        let mut parts = t.split(' ');
                        let version = parts.next().unwrap().to_string();
                        let number: usize = parts.nth(2).unwrap().parse().unwrap();
                        heard.push((number, version));
                    }
                    other => {
                        return Err(format!(
                            "client {c}: after {} answers of {n}: {other:?}",
                            heard.len()
                        ))
                    }
                }
            }
            let _ = tx.close().await;
            let sent = sent.lock().unwrap().clone();
            Ok((heard, sent))
        }));
    }
    // The clients are connected and talking: reload, alternating builds.
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..RELOADS {
        let (plugin, version) = if i % 2 == 0 {
            ("chat-v2", "v2")
        } else {
            ("chat", "v1")
        };
        let old: Vec<u64> = host.service("chat")["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["role"] == "worker")
            .map(|w| w["pid"].as_u64().unwrap())
            .collect();
        host.replace_plugin(plugin);
        let started = Instant::now();
        host.reload_ok();
        // The gateways hear of the new workers from the master, without an answer to it; an
        // old business worker exits once every gateway has moved its clients off it. From
        // then on no message can reach the old version, however late a gateway heard.
        wait_until("the old business workers are gone", || {
            old.iter().all(|pid| !alive(*pid as u32))
        });
        reloads
            .lock()
            .unwrap()
            .push((started, Instant::now(), version));
        std::thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reloads = reloads.lock().unwrap().clone();
    let mut failures = Vec::new();
    let mut answered = 0;
    for (c, client) in clients.into_iter().enumerate() {
        let (heard, sent) = match rt.block_on(client).unwrap() {
            Ok(result) => result,
            Err(e) => {
                failures.push(e);
                continue;
            }
        };
        answered += heard.len();
        // Once each, in order.
        let numbers: Vec<usize> = heard.iter().map(|(n, _)| *n).collect();
        let expected: Vec<usize> = (0..sent.len()).collect();
        if numbers != expected {
            failures.push(format!(
                "client {c}: answers out of order or missing: {numbers:?}"
            ));
            continue;
        }
        // After each reload (and a moment for the gateways to hear of it), the new version;
        // while a reload runs, either.
        let grace = Duration::from_millis(100);
        for (n, version) in &heard {
            let at = sent[*n];
            let live = reloads
                .iter()
                .rev()
                .find(|(_, done, _)| *done + grace < at)
                .map_or("v1", |(_, _, v)| *v);
            let settled = reloads
                .iter()
                .all(|(start, done, _)| at < *start || at > *done + grace);
            if settled && version != live {
                let t0 = sent[0];
                let marks: Vec<String> = reloads
                    .iter()
                    .map(|(_, d, v)| {
                        format!("{}ms:{v}", d.saturating_duration_since(t0).as_millis())
                    })
                    .collect();
                let seen: Vec<String> = heard
                    .iter()
                    .map(|(n, v)| format!("{n}@{}:{v}", sent[*n].duration_since(t0).as_millis()))
                    .collect();
                failures.push(format!(
                    "client {c}: message {n} sent with {live} live was answered by {version}\n  reloads {marks:?}\n  heard {seen:?}"
                ));
                break;
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{}\n--- host log ---\n{}",
        failures.join("\n"),
        host.logs()
    );
    assert!(answered > CLIENTS * 50, "only {answered} answers");
    // The gateways never restarted: the same two processes all along.
    let gateways: Vec<u64> = host.status()["services"][0]["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["role"] == "gateway")
        .map(|w| w["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(gateways.len(), 2);
    assert!(!host.logs().contains("event") || !host.logs().contains("is lost"));
}

#[test]
fn a_panicking_handler_and_a_crashing_worker_leave_clients_connected() {
    let host = start(1, 1, "");
    let addr = host.addr("chat");
    runtime().block_on(async {
        let mut ws = connect(&addr).await;
        say(&mut ws, "/panic").await;
        say(&mut ws, "echo 1").await;
        assert_eq!(hear(&mut ws).await, "v1 echo 1");
        say(&mut ws, "/crash").await;
        // The worker died with that event; the client is still connected and its next
        // message is answered by the replacement.
        say(&mut ws, "echo 2").await;
        assert_eq!(hear(&mut ws).await, "v1 echo 2");
    });
    host.wait_for_log("asked to panic");
    host.wait_for_log("is lost");
}

#[test]
fn a_stop_closes_clients_with_going_away_and_a_dead_gateway_is_replaced() {
    let mut host = start(1, 2, "");
    let addr = host.addr("chat");
    let rt = runtime();
    let gateway_pids = |host: &Host| -> Vec<u64> {
        host.status()["services"][0]["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["role"] == "gateway" && w["state"] == "ready")
            .map(|w| w["pid"].as_u64().unwrap())
            .collect()
    };
    let before = gateway_pids(&host);
    assert_eq!(before.len(), 2);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(before[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until("a new gateway replaced the dead one", || {
        let now = gateway_pids(&host);
        now.len() == 2 && !now.contains(&before[0])
    });
    let mut clients = rt.block_on(async {
        let mut clients = Vec::new();
        for _ in 0..4 {
            let mut ws = connect(&addr).await;
            say(&mut ws, "echo x").await;
            assert_eq!(hear(&mut ws).await, "v1 echo x");
            clients.push(ws);
        }
        clients
    });
    host.cli(&["stop"]);
    let codes: HashMap<usize, Option<CloseCode>> = rt.block_on(async {
        let mut codes = HashMap::new();
        for (i, ws) in clients.iter_mut().enumerate() {
            let code = loop {
                match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                    Ok(Some(Ok(Message::Close(frame)))) => break frame.map(|f| f.code),
                    Ok(Some(Ok(_))) => continue,
                    other => panic!("client {i}: expected a close frame, got {other:?}"),
                }
            };
            codes.insert(i, code);
        }
        codes
    });
    assert!(
        codes.values().all(|c| *c == Some(CloseCode::Away)),
        "{codes:?}"
    );
    assert!(host.wait_exit());
}

#[test]
fn wss_with_the_services_certificate() {
    let dir = dir_with_config(
        &config(1, 1, "tls = { cert = \"cert.pem\", key = \"key.pem\" }"),
        &[("plugin.so", "chat")],
    );
    let certs = crate::tls::Certs::new();
    certs.issue(dir.path());
    let host = Host::start(dir, &["--config", "host.toml"]);
    let addr = host.addr("chat");
    runtime().block_on(async {
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = tokio_rustls::TlsConnector::from(crate::http::tls_config(&certs.ca_pem, false))
            .connect(name, tcp)
            .await
            .unwrap();
        let (mut ws, _) = tokio_tungstenite::client_async(format!("wss://{addr}/chat"), tls)
            .await
            .unwrap();
        ws.send(Message::text("echo secure")).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => assert_eq!(t.as_str(), "v1 echo secure"),
            other => panic!("{other:?}"),
        }
    });
}

/// `host reopen-logs` reaches the gateways and the business workers too, and each answers
/// once its stderr is the new file.
#[test]
fn reopen_logs_is_answered_by_gateways_and_business_workers() {
    let dir = dir_with_config(&config(1, 1, ""), &[("plugin.so", "chat")]);
    let log = dir.path().join("host.log");
    let log_arg = log.to_str().unwrap().to_string();
    let host = Host::start(dir, &["--config", "host.toml", "--log-file", &log_arg]);
    std::fs::rename(&log, log.with_extension("log.1")).unwrap();
    let out = host.cli(&["reopen-logs"]);
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("(the master and its 2 workers)"), "{text}");
    let new = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        new.matches("log file reopened").count(),
        2,
        "the gateway's line and the business worker's, in the new file:\n{new}"
    );
}
