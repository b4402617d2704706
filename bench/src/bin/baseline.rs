//! The baseline server: the `hello` plugin's handler compiled statically (as an rlib) into a
//! plain hyper server, with the host's process model and none of its machinery: a parent binds
//! the listener (same backlog), N child processes (re-executed, as the host's workers are)
//! accept on it with a default multi-thread tokio runtime each, and call the handler inline.
//! It is the ceiling the host is measured against.
//!
//! `baseline --listen 127.0.0.1:PORT --workers N [--reuseport] [--tls-cert PEM --tls-key PEM]`
//! (prints `ready` when every child listens). `--reuseport` gives each child a listening socket
//! of its own with `SO_REUSEPORT`, so that the kernel splits the connections about evenly
//! (figure 18), where the one shared socket leaves the split to its accept wake-ups. Without TLS it speaks HTTP/1.1 only. With TLS it sets up
//! rustls as the host's workers do (`host::tls::acceptor`, repeated here so that the baseline
//! links none of the host): ring as the one crypto provider chosen explicitly, the safe default
//! protocol versions, one certificate chain and key read as PEM with rustls-pki-types, ALPN `h2`
//! then `http/1.1`; it then serves HTTP/2 or HTTP/1.1 by what ALPN chose, with hyper's
//! `http2::Builder` (tokio executor and timer, as the host) or `http1::Builder`.

use std::{convert::Infallible, net::SocketAddr, path::Path, sync::Arc};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{
    server::conn::{http1, http2},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use plugin_api::{Context, Plugin, Request};
use rustls::{
    crypto::ring,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    ServerConfig,
};
use tokio_rustls::TlsAcceptor;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .map(|i| args[i + 1].clone())
    };
    let tls = match (arg("--tls-cert"), arg("--tls-key")) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        _ => panic!("--tls-cert and --tls-key go together"),
    };
    if args.get(1).map(String::as_str) == Some("--child") {
        return child(tls);
    }
    let addr: SocketAddr = arg("--listen").expect("--listen ADDR").parse().unwrap();
    let workers: usize = arg("--workers").map_or(2, |n| n.parse().unwrap());
    let child_args = match &tls {
        Some((cert, key)) => vec![
            "--tls-cert".into(),
            cert.clone(),
            "--tls-key".into(),
            key.clone(),
        ],
        None => Vec::new(),
    };
    let share = if args.iter().any(|a| a == "--reuseport") {
        bench::prefork::Share::ReusePort
    } else {
        bench::prefork::Share::OneListener
    };
    bench::prefork::parent(addr, workers, share, &child_args);
}

/// The TLS acceptor as the host's workers set it up (host/src/tls.rs).
fn acceptor(cert: &Path, key: &Path) -> TlsAcceptor {
    let certs = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let mut config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    TlsAcceptor::from(Arc::new(config))
}

fn child(tls: Option<(String, String)>) {
    let listener = bench::prefork::inherited_listener();
    let plugin = Arc::new(hello::Hello::on_start(&Context::for_tests("baseline")).unwrap());
    let acceptor = tls.map(|(cert, key)| acceptor(Path::new(&cert), Path::new(&key)));
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
                let acceptor = acceptor.clone();
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
                    let Some(acceptor) = acceptor else {
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                        return;
                    };
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                        let _ = http2::Builder::new(TokioExecutor::new())
                            .timer(TokioTimer::new())
                            .serve_connection(TokioIo::new(tls), service)
                            .await;
                    } else {
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(tls), service)
                            .await;
                    }
                });
            }
        });
}
