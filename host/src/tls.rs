//! TLS server configuration from a certificate and key the master read (`protocol::TlsPem`):
//! for a service's listeners, where the worker does every handshake itself (the master's
//! listeners stay plain TCP sockets), and for the admin listener, which the master serves.
//!
//! One crypto provider, chosen explicitly (ring); PEM parsed with rustls-pki-types. A service
//! offers `h2` then `http/1.1` by ALPN, so HTTP/2 clients get HTTP/2. A certificate that cannot be used (no
//! certificate, no key, a key that does not match the certificate) fails the worker's start
//! with the reason: in a reload, the canary fails and the old workers keep serving with the old
//! certificate.
//!
//! The consequence of terminating TLS in the workers: plugin code runs in the process that
//! holds the private key, so a plugin can read it. Run services whose plugins must not see a
//! key with another certificate, or terminate TLS in front of the host.

use std::sync::Arc;

use rustls::{
    crypto::ring,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    ServerConfig,
};
use tokio_rustls::TlsAcceptor;

use crate::protocol::TlsPem;

/// The acceptor for connections that may speak the `alpn` protocols (most preferred first),
/// or why the certificate cannot be used.
pub fn acceptor(pem: &TlsPem, alpn: &[&[u8]]) -> Result<TlsAcceptor, String> {
    let cert_file = pem.cert_file.display();
    let key_file = pem.key_file.display();
    let certs = CertificateDer::pem_slice_iter(pem.cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the TLS certificate file {cert_file} is not valid PEM: {e}"))?;
    if certs.is_empty() {
        return Err(format!(
            "the TLS certificate file {cert_file} holds no certificate (a PEM block \"BEGIN \
             CERTIFICATE\"); give the server certificate, then any intermediates"
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(pem.key.as_bytes()).map_err(|e| {
        format!(
            "the TLS key file {key_file} holds no private key this host can read ({e}); it \
             must be a PEM private key (PKCS#8, PKCS#1 or SEC1)"
        )
    })?;
    let provider = Arc::new(ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("could not set up TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            format!(
                "the TLS certificate {cert_file} and key {key_file} cannot be used together: \
                 {e}. Check that the key is the one the certificate was issued for."
            )
        })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(TlsAcceptor::from(Arc::new(config)))
}
