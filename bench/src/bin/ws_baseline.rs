//! The WebSocket baseline (docs/benchmarks.md, figure 13): a plain tokio-tungstenite echo
//! server with the process shape of `baseline` (`bench::prefork`): a parent binds the listener
//! (the host's backlog, 1024), N re-executed child processes accept on it, each with a default
//! multi-thread tokio runtime, and echo every text or binary message back on the connection it
//! came from. No plugin, no gateway, no second hop: the ceiling the gateway is measured against.
//!
//! `ws_baseline --listen 127.0.0.1:PORT --workers N` (prints `ready` once its children are
//! started; connections made before they accept wait in the listener's backlog).

use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::{protocol::WebSocketConfig, Message};

/// The gateway's default `max_message_bytes` (1 MiB), so that both refuse the same messages.
const MAX_MESSAGE_BYTES: usize = 1 << 20;

fn main() {
    // 10,000 idle connections in figure 13 are 10,000 files across the children.
    bench::prefork::raise_fd_limit();
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .map(|i| args[i + 1].clone())
    };
    if args.get(1).map(String::as_str) == Some("--child") {
        return child();
    }
    let addr: SocketAddr = arg("--listen").expect("--listen ADDR").parse().unwrap();
    let workers: usize = arg("--workers").map_or(2, |n| n.parse().unwrap());
    bench::prefork::parent(addr, workers, bench::prefork::Share::OneListener, &[]);
}

fn child() {
    let listener = bench::prefork::inherited_listener();
    // The host's gateway reads into 8 KiB per connection (tungstenite's default is 128 KiB,
    // allocated at once): the same here, so that figure 13's memory compares like with like.
    let config = WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .max_message_size(Some(MAX_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_MESSAGE_BYTES));
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let Ok(mut ws) =
                        tokio_tungstenite::accept_async_with_config(stream, Some(config)).await
                    else {
                        return;
                    };
                    // Pings are answered by tungstenite itself (the pong goes out with the next
                    // read or write); a close is answered the same way and ends the stream.
                    while let Some(Ok(msg)) = ws.next().await {
                        if matches!(msg, Message::Text(_) | Message::Binary(_))
                            && ws.send(msg).await.is_err()
                        {
                            break;
                        }
                    }
                });
            }
        });
}
