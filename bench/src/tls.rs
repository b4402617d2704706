//! HTTPS for the benchmarks: a certificate made at bench time (never committed), h2load (the
//! HTTP/2 load generator, Debian's `nghttp2-client`) and its report, and a client that opens a
//! new TLS connection for every request, to measure the handshake apart from keep-alive.

use std::{
    fs,
    io::{Read, Write},
    net::TcpStream,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use rustls::{
    client::Resumption,
    crypto::ring,
    pki_types::{pem::PemObject, CertificateDer, ServerName},
    ClientConfig, ClientConnection, RootCertStore, StreamOwned,
};

/// A CA and a server certificate for `localhost` and 127.0.0.1 signed by it (ECDSA P-256,
/// rcgen's default), written to `dir` as `cert.pem` (the server certificate), `key.pem` (its
/// key, mode 600 as the host requires of a secret) and `ca.pem`.
pub struct Certs {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca_pem: String,
}

impl Certs {
    pub fn make(dir: &Path) -> Certs {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "host bench CA");
        let ca = params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        let certs = Certs {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            ca_pem: ca.pem(),
        };
        fs::write(&certs.cert, cert.pem()).unwrap();
        fs::write(&certs.key, key.serialize_pem()).unwrap();
        fs::set_permissions(&certs.key, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(dir.join("ca.pem"), &certs.ca_pem).unwrap();
        certs
    }

    /// A client that trusts the CA, offers `http/1.1` by ALPN and never resumes a session:
    /// every connection is a full handshake.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let mut config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config.resumption = Resumption::disabled();
        Arc::new(config)
    }
}

/// What the new-connection-per-request clients did.
#[derive(Debug, Default, Clone)]
pub struct Handshakes {
    /// Connections that got a whole 200 response.
    pub done: u64,
    /// Connections that failed anywhere (connect, handshake, request, response).
    pub failed: u64,
    pub seconds: f64,
    /// What the last good connection negotiated, e.g. "TLSv1_3 TLS13_AES_256_GCM_SHA384 X25519".
    pub negotiated: String,
}

impl Handshakes {
    pub fn per_second(&self) -> f64 {
        self.done as f64 / self.seconds
    }
}

/// `clients` threads, each for `duration`: connect, full TLS handshake, `GET /` with
/// `Connection: close`, read the whole response, close. Each connection is closed with a reset
/// (SO_LINGER 0) once its response is read, so that hundreds of thousands of them leave no
/// TIME_WAIT behind on either side.
pub fn handshakes(
    addr: &str,
    config: &Arc<ClientConfig>,
    clients: usize,
    duration: Duration,
) -> Handshakes {
    let start = Instant::now();
    let runs: Vec<Handshakes> = thread::scope(|s| {
        let threads: Vec<_> = (0..clients)
            .map(|_| {
                s.spawn(|| {
                    let mut h = Handshakes::default();
                    while start.elapsed() < duration {
                        match one_connection(addr, config) {
                            Ok(negotiated) => {
                                h.done += 1;
                                h.negotiated = negotiated;
                            }
                            Err(_) => h.failed += 1,
                        }
                    }
                    h
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let seconds = start.elapsed().as_secs_f64();
    Handshakes {
        done: runs.iter().map(|h| h.done).sum(),
        failed: runs.iter().map(|h| h.failed).sum(),
        seconds,
        negotiated: runs
            .iter()
            .map(|h| h.negotiated.clone())
            .find(|n| !n.is_empty())
            .unwrap_or_default(),
    }
}

fn one_connection(addr: &str, config: &Arc<ClientConfig>) -> Result<String, String> {
    let tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").unwrap();
    let conn = ClientConnection::new(config.clone(), name).map_err(|e| e.to_string())?;
    let mut tls = StreamOwned::new(conn, tcp);
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    // The server closes after the response (with close_notify); a close without it after a
    // whole response is still a served request.
    let read = tls.read_to_end(&mut response);
    let whole = complete_response(&response);
    if let Err(e) = read {
        if !whole {
            return Err(e.to_string());
        }
    }
    if !whole || !response.starts_with(b"HTTP/1.1 200") {
        return Err(format!(
            "unexpected response: {:?}",
            String::from_utf8_lossy(&response[..response.len().min(64)])
        ));
    }
    let negotiated = format!(
        "{:?} {:?} {:?}",
        tls.conn.protocol_version(),
        tls.conn.negotiated_cipher_suite().map(|s| s.suite()),
        tls.conn.negotiated_key_exchange_group().map(|g| g.name()),
    )
    .replace("Some(", "")
    .replace(')', "");
    let _ = socket2::SockRef::from(&tls.sock).set_linger(Some(Duration::ZERO));
    Ok(negotiated)
}

/// Whether `r` holds a response head and as many body bytes as its Content-Length says.
fn complete_response(r: &[u8]) -> bool {
    let Some(end) = r.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&r[..end]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    match length {
        Some(n) => r.len() >= end + 4 + n,
        None => false,
    }
}

/// What one h2load run reported.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct H2Report {
    /// Requests that got a response with status 2xx.
    pub ok: u64,
    /// Failed, errored or timed-out requests, plus responses that were not 2xx.
    pub failed: u64,
    pub seconds: f64,
    pub rps: f64,
    /// Mean time for a request (h2load gives min, max, mean and sd, no percentiles).
    pub mean_ms: f64,
    /// What ALPN chose ("h2").
    pub protocol: String,
}

/// `h2load -t1 -cCONNS -mSTREAMS -DSECONDS URL`: HTTP/2 over TLS (ALPN h2), `conns` connections
/// with up to `streams` concurrent streams each, for `seconds` after a 1 s warm-up.
pub fn h2load(url: &str, conns: u32, streams: u32, seconds: u32) -> H2Report {
    let out = Command::new("h2load")
        .args([
            "-t1",
            &format!("-c{conns}"),
            &format!("-m{streams}"),
            &format!("-D{seconds}"),
            "--warm-up-time=1",
            url,
        ])
        .output()
        .expect("could not run h2load (bench/run.sh installs nghttp2-client)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "h2load failed:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = parse_h2load(&text);
    assert!(r.ok > 0, "h2load got no response:\n{text}");
    assert_eq!(r.protocol, "h2", "h2load did not speak HTTP/2:\n{text}");
    r
}

fn duration_ms(s: &str) -> f64 {
    let (n, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len()));
    let n: f64 = n.parse().unwrap_or(0.0);
    match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        _ => n,
    }
}

pub fn parse_h2load(text: &str) -> H2Report {
    let mut r = H2Report::default();
    let mut non_2xx = 0;
    let mut not_done = 0;
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            // "finished in 3.00s, 31234.33 req/s, 1.20MB/s"
            ["finished", "in", d, rps, "req/s,", ..] => {
                r.seconds = duration_ms(d.trim_end_matches(',')) / 1000.0;
                r.rps = rps.parse().unwrap_or(0.0);
            }
            // "requests: 93703 total, 93735 started, 93703 done, 93703 succeeded, 0 failed,
            // 0 errored, 0 timeout"
            ["requests:", rest @ ..] => {
                for pair in rest.chunks(2) {
                    if let [n, kind] = pair {
                        let n: u64 = n.parse().unwrap_or(0);
                        match kind.trim_end_matches(',') {
                            "failed" | "errored" | "timeout" => not_done += n,
                            _ => {}
                        }
                    }
                }
            }
            // "status codes: 93703 2xx, 0 3xx, 0 4xx, 0 5xx"
            ["status", "codes:", rest @ ..] => {
                for pair in rest.chunks(2) {
                    if let [n, class] = pair {
                        let n: u64 = n.parse().unwrap_or(0);
                        if class.trim_end_matches(',') == "2xx" {
                            r.ok = n;
                        } else {
                            non_2xx += n;
                        }
                    }
                }
            }
            // "time for request:   207us   12.77ms   1.00ms   1.01ms   77.48%"
            ["time", "for", "request:", _min, _max, mean, ..] => r.mean_ms = duration_ms(mean),
            ["Application", "protocol:", p] => r.protocol = p.to_string(),
            _ => {}
        }
    }
    r.failed = not_done + non_2xx;
    r
}

/// h2load's version line ("h2load nghttp2/1.52.0"), for the results header.
pub fn h2load_version() -> String {
    Command::new("h2load")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "h2load not found".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_an_h2load_report() {
        let r = parse_h2load(
            "starting benchmark...\nspawning thread #0: 8 total client(s). Timing-based test with 1s of warm-up time and 3s of main duration for measurements.\n\
             Warm-up started for thread #0.\nWarm-up phase is over for thread #0.\nMain benchmark duration is started for thread #0.\n\
             Main benchmark duration is over for thread #0. Stopping all clients.\nStopped all clients for thread #0\n\n\
             TLS Protocol: TLSv1.3\nCipher: TLS_AES_256_GCM_SHA384\nServer Temp Key: X25519 253 bits\nApplication protocol: h2\n\
             finished in 3.00s, 31234.33 req/s, 1.20MB/s\n\
             requests: 93703 total, 93735 started, 93700 done, 93698 succeeded, 2 failed, 1 errored, 0 timeout\n\
             status codes: 93698 2xx, 0 3xx, 0 4xx, 3 5xx\n\
             traffic: 3.61MB (3784331) total, 280.43KB (287161) headers (space savings 93.18%), 1.79MB (1873660) data\n\
             \t\t     min         max         mean         sd        +/- sd\n\
             time for request:      207us     12.77ms      1.02ms      1.01ms    77.48%\n\
             time for connect:     2.07ms      2.69ms      2.35ms       189us    62.50%\n",
        );
        assert_eq!((r.seconds, r.rps), (3.0, 31234.33));
        assert_eq!((r.ok, r.failed), (93698, 6));
        assert_eq!(r.mean_ms, 1.02);
        assert_eq!(r.protocol, "h2");
    }

    #[test]
    fn a_response_is_whole_when_its_body_is() {
        assert!(complete_response(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi"
        ));
        assert!(!complete_response(
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nhi"
        ));
        assert!(!complete_response(b"HTTP/1.1 200 OK\r\ncontent-"));
    }
}
