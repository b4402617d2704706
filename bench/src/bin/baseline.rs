//! The baseline server: the `hello` plugin's handler compiled statically (as an rlib) into a
//! plain hyper HTTP/1.1 server, with the host's process model and none of its machinery: a
//! parent binds the listener (same backlog), N child processes (re-executed, as the host's
//! workers are) accept on it with a default multi-thread tokio runtime each, and call the
//! handler inline. It is the ceiling the host is measured against.
//!
//! `baseline --listen 127.0.0.1:PORT --workers N` (prints `ready` when every child listens).

use std::{
    convert::Infallible,
    net::{SocketAddr, TcpListener},
    os::fd::{FromRawFd, OwnedFd},
    process::Command,
    sync::Arc,
};

use bytes::Bytes;
use command_fds::{CommandFdExt, FdMapping};
use http_body_util::{BodyExt, Full};
use hyper::{server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use plugin_api::{Context, Plugin, Request};

fn main() {
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
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )
    .unwrap();
    socket.set_reuse_address(true).unwrap();
    socket.bind(&addr.into()).unwrap();
    socket.listen(1024).unwrap();
    let listener: TcpListener = socket.into();
    let mut children = Vec::new();
    for _ in 0..workers {
        let fd = OwnedFd::from(listener.try_clone().unwrap());
        let mut cmd = Command::new("/proc/self/exe");
        cmd.arg("--child")
            .fd_mappings(vec![FdMapping {
                parent_fd: fd,
                child_fd: 3,
            }])
            .unwrap();
        children.push(cmd.spawn().unwrap());
    }
    println!("ready");
    for mut c in children {
        let _ = c.wait();
    }
}

fn child() {
    // SAFETY: the parent maps the listening socket at fd 3 and nothing else in this process
    // owns that fd.
    let listener = unsafe { TcpListener::from_raw_fd(3) };
    listener.set_nonblocking(true).unwrap();
    let plugin = Arc::new(hello::Hello::on_start(&Context::for_tests("baseline")).unwrap());
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
                let plugin = plugin.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let plugin = plugin.clone();
                        async move {
                            let path = req.uri().path().to_string();
                            let _body = req.into_body().collect().await;
                            let resp = plugin.handle(&Request::new("GET", &path));
                            let mut out =
                                hyper::Response::new(Full::new(Bytes::from(resp.body().to_vec())));
                            *out.status_mut() = hyper::StatusCode::from_u16(resp.status()).unwrap();
                            for (name, value) in resp.headers() {
                                out.headers_mut().append(
                                    hyper::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                                    hyper::header::HeaderValue::from_bytes(value).unwrap(),
                                );
                            }
                            Ok::<_, Infallible>(out)
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
}
