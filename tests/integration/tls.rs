//! HTTPS and HTTP/2 on the same smooth-reload path: TLS keep-alive clients and an HTTP/2 client
//! with many streams see no failed request across reloads; a renewed certificate rolls out with
//! a reload; a bad one fails the canary while the old one keeps serving; curl gets HTTP/2 by
//! ALPN and by prior knowledge. Certificates come from a CA made for each test (rcgen).

use std::{fs, path::Path, process::Command, time::Duration};

use hyper::Version;

use crate::{
    harness::{dir_with_config, output_text, run, Host},
    http::{tls_config, Conn, Transport},
    load::Load,
};

/// A CA, and a server certificate for `localhost` and 127.0.0.1 signed by it.
pub struct Certs {
    pub ca_pem: String,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl Certs {
    pub fn new() -> Certs {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "host tests CA");
        let ca = params.self_signed(&ca_key).unwrap();
        Certs {
            ca_pem: ca.pem(),
            ca,
            ca_key,
        }
    }

    /// Writes a new server certificate and its key to `cert.pem` and `key.pem` in `dir`.
    pub fn issue(&self, dir: &Path) -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .unwrap();
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
        fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
        fs::write(dir.join("ca.pem"), &self.ca_pem).unwrap();
        cert.pem()
    }
}

fn config(workers: usize, tls: bool) -> String {
    format!(
        "[[service]]\nname = \"web\"\nlisten = [\"127.0.0.1:0\"]\nplugin = \"plugin.so\"\n\
         workers = {workers}\ncanary_probation = \"300ms\"\nprobation = \"0s\"\n{}\n",
        if tls {
            "tls = { cert = \"cert.pem\", key = \"key.pem\" }"
        } else {
            ""
        }
    )
}

fn start_tls(certs: &Certs, workers: usize) -> Host {
    let dir = dir_with_config(&config(workers, true), &[("plugin.so", "versioned")]);
    certs.issue(dir.path());
    Host::start(dir, &["--config", "host.toml"])
}

fn der_of(pem: &str) -> Vec<u8> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

#[test]
fn https_clients_lose_nothing_across_a_reload_and_a_renewed_certificate_rolls_out() {
    let certs = Certs::new();
    let host = start_tls(&certs, 2);
    let addr = host.addr("web");
    let tls = Transport::Tls(tls_config(&certs.ca_pem, false));
    let mut probe = Conn::with(&addr, tls.clone(), false);
    let resp = probe.get("/").unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.version, Version::HTTP_11);
    let first_cert = probe.server_cert.clone().unwrap();

    let load = Load::start_with(&addr, "/", 4, Duration::ZERO, tls.clone(), false);
    load.wait_for_more(200);
    // A renewed certificate at the same paths: the reload rolls it out, canary first.
    let renewed = certs.issue(host.dir.path());
    host.replace_plugin("versioned-v2");
    let out = host.reload_ok();
    assert!(
        out.contains("TLS certificate or key changed") || out.contains("plugin"),
        "{out}"
    );
    load.wait_for_more(200);
    let seen = load.stop();
    assert!(seen.errors.is_empty(), "failed requests: {:?}", seen.errors);
    assert!(seen.bodies.keys().any(|b| b.contains("versioned v2")));

    let mut fresh = Conn::with(&addr, tls, false);
    assert!(fresh.get("/").unwrap().body.contains("versioned v2"));
    let served = fresh.server_cert.unwrap();
    assert_ne!(served, first_cert, "the renewed certificate is served");
    assert_eq!(served, der_of(&renewed));
}

#[test]
fn http2_clients_lose_nothing_across_reloads() {
    let certs = Certs::new();
    let host = start_tls(&certs, 2);
    let addr = host.addr("web");
    let h2 = Transport::Tls(tls_config(&certs.ca_pem, true));
    let mut probe = Conn::with(&addr, h2.clone(), true);
    assert_eq!(probe.get("/").unwrap().version, Version::HTTP_2);
    // Eight clients, each an HTTP/2 connection whose streams follow one another.
    let load = Load::start_with(&addr, "/", 8, Duration::ZERO, h2, true);
    load.wait_for_more(200);
    for round in 0..3 {
        host.replace_plugin(if round % 2 == 0 {
            "versioned-v2"
        } else {
            "versioned"
        });
        host.reload_ok();
        load.wait_for_more(100);
    }
    let seen = load.stop();
    assert!(seen.errors.is_empty(), "failed requests: {:?}", seen.errors);
    assert!(
        seen.connects > 8,
        "the draining workers' GOAWAY moved the clients"
    );
}

/// One HTTP/2 connection at a time carrying 32 concurrent streams, until `stop`; when the
/// server sends GOAWAY, the next connection takes over. Returns (answered, failed, retried).
fn many_streams(
    addr: String,
    config: std::sync::Arc<rustls::ClientConfig>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    answered: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> (usize, Vec<String>, usize) {
    use std::sync::{atomic::Ordering, Arc, Mutex};

    use http_body_util::{BodyExt, Full};
    use hyper::client::conn::http2;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    type Sender = http2::SendRequest<Full<bytes::Bytes>>;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let current: Arc<tokio::sync::Mutex<Option<Sender>>> = Arc::default();
        let failed = Arc::new(Mutex::new(Vec::new()));
        let retried = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let (current, failed, retried) = (current.clone(), failed.clone(), retried.clone());
            let (addr, config, stop, answered) =
                (addr.clone(), config.clone(), stop.clone(), answered.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let mut sender = {
                        let mut slot = current.lock().await;
                        if slot.as_ref().is_none_or(|s| s.is_closed()) {
                            let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
                            let name =
                                rustls::pki_types::ServerName::try_from("localhost").unwrap();
                            let tls = tokio_rustls::TlsConnector::from(config.clone())
                                .connect(name, tcp)
                                .await
                                .unwrap();
                            let (s, conn) =
                                http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                                    .await
                                    .unwrap();
                            tokio::spawn(conn);
                            *slot = Some(s);
                        }
                        slot.clone().unwrap()
                    };
                    let req = hyper::Request::get(format!("https://{addr}/"))
                        .body(Full::new(bytes::Bytes::new()))
                        .unwrap();
                    match sender.send_request(req).await {
                        Ok(resp) if resp.status() == 200 => {
                            let _ = resp.into_body().collect().await;
                            answered.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(resp) => failed
                            .lock()
                            .unwrap()
                            .push(format!("status {}", resp.status())),
                        // Refused before processing (GOAWAY): sent again on the next connection.
                        Err(e) if crate::http::refused_unprocessed(&format!("{e:?}")) => {
                            retried.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => failed.lock().unwrap().push(format!("{e:?}")),
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let failed = failed.lock().unwrap().clone();
        (
            answered.load(Ordering::SeqCst),
            failed,
            retried.load(Ordering::SeqCst),
        )
    })
}

#[test]
fn one_http2_connection_with_32_concurrent_streams_loses_nothing_across_reloads() {
    use std::sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    };
    let certs = Certs::new();
    let host = start_tls(&certs, 2);
    let addr = host.addr("web");
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let client = {
        let (addr, stop, answered) = (addr.clone(), stop.clone(), answered.clone());
        let config = tls_config(&certs.ca_pem, true);
        std::thread::spawn(move || many_streams(addr, config, stop, answered))
    };
    let wait_more = |n: usize| {
        let target = answered.load(Ordering::SeqCst) + n;
        crate::harness::wait_until("the streams are answered", || {
            answered.load(Ordering::SeqCst) >= target
        });
    };
    wait_more(500);
    for round in 0..3 {
        host.replace_plugin(if round % 2 == 0 {
            "versioned-v2"
        } else {
            "versioned"
        });
        host.reload_ok();
        wait_more(300);
    }
    stop.store(true, Ordering::SeqCst);
    let (done, failed, _retried) = client.join().unwrap();
    assert!(done > 1000, "{done} answered");
    assert!(failed.is_empty(), "failed streams: {failed:?}");
}

#[test]
fn a_bad_certificate_fails_the_canary_and_the_old_one_keeps_serving() {
    let certs = Certs::new();
    let host = start_tls(&certs, 2);
    let addr = host.addr("web");
    let tls = Transport::Tls(tls_config(&certs.ca_pem, false));
    let before = Conn::with(&addr, tls.clone(), false);
    let mut before = before;
    before.get("/").unwrap();
    let old_cert = before.server_cert.clone().unwrap();

    // A key that is not the certificate's.
    let cert_only = fs::read_to_string(host.dir.path().join("cert.pem")).unwrap();
    certs.issue(host.dir.path());
    fs::write(host.dir.path().join("cert.pem"), &cert_only).unwrap();
    let out = host.cli(&["reload"]);
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("cannot be used together"), "{text}");
    assert!(text.contains("nothing changed"), "{text}");

    // Not a certificate at all.
    fs::write(host.dir.path().join("cert.pem"), "not a certificate\n").unwrap();
    let text = output_text(&host.cli(&["reload"]));
    assert!(text.contains("holds no certificate"), "{text}");

    let mut after = Conn::with(&addr, tls, false);
    assert_eq!(after.get("/").unwrap().status, 200);
    assert_eq!(
        after.server_cert.unwrap(),
        old_cert,
        "the old certificate still serves"
    );
}

#[test]
fn curl_gets_http2_by_alpn_and_by_prior_knowledge() {
    let certs = Certs::new();
    let host = start_tls(&certs, 1);
    let addr = host.addr("web");
    let curl = |args: &[&str]| {
        let mut cmd = Command::new("curl");
        cmd.args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code}",
        ])
        .args(args);
        output_text(&run(cmd))
    };
    let ca = host.dir.path().join("ca.pem");
    let url = format!("https://localhost:{}/", addr.rsplit(':').next().unwrap());
    let resolve = format!("localhost:{}:127.0.0.1", addr.rsplit(':').next().unwrap());
    assert_eq!(
        curl(&[
            "--http2",
            "--cacert",
            ca.to_str().unwrap(),
            "--resolve",
            &resolve,
            &url
        ]),
        "2 200"
    );
    assert_eq!(
        curl(&[
            "--http1.1",
            "--cacert",
            ca.to_str().unwrap(),
            "--resolve",
            &resolve,
            &url
        ]),
        "1.1 200"
    );

    let plain = Host::start(
        dir_with_config(&config(1, false), &[("plugin.so", "versioned")]),
        &["--config", "host.toml"],
    );
    let url = format!("http://{}/", plain.addr("web"));
    assert_eq!(curl(&["--http2-prior-knowledge", &url]), "2 200");
    assert_eq!(curl(&[&url]), "1.1 200");
}
