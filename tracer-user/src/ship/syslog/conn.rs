//! The connection under a syslog sink: TCP, or TLS over it (rustls, trusting `ca` or else the
//! system's roots, with an optional client certificate), and what the sink needs of it beyond
//! reading and writing: a read that does not wait, and errors worded with the timeout.

use std::{
    io::{self, Read, Write},
    net::TcpStream,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use rustls::pki_types::{
    pem::{self, PemObject},
    CertificateDer, PrivateKeyDer,
};

use crate::config::TlsClientConfig;

/// Largest DATA we accept in a frame from a RELP server (answers are a few bytes; the answer
/// to `open` lists offers): anything larger is garbage, not something to buffer. A kept
/// connection's read between batches stops at the same size.
pub(super) const MAX_ANSWER: usize = 64 << 10;

pub(super) enum Conn {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Conn {
    pub(super) fn socket(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(t) => t.get_ref(),
        }
    }

    /// Reads what is already there without waiting, into `got`. False when the peer closed the
    /// connection or it failed.
    pub(super) fn read_nonblocking(&mut self, got: &mut Vec<u8>) -> bool {
        if self.socket().set_nonblocking(true).is_err() {
            return false;
        }
        let mut buf = [0u8; 4096];
        let alive = loop {
            match self.read(&mut buf) {
                Ok(0) => break false,
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    if got.len() > MAX_ANSWER {
                        break false;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break true,
                Err(_) => break false,
            }
        };
        alive && self.socket().set_nonblocking(false).is_ok()
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(t) => t.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(t) => t.flush(),
        }
    }
}

pub(super) fn io_text(e: &io::Error, timeout: Duration) -> String {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            format!("timed out after {timeout:?}")
        }
        _ => e.to_string(),
    }
}

/// The host part of `host:port` (`[::1]:514` → `::1`).
pub(super) fn host_of(address: &str) -> String {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

/// Why the TLS material of a syslog sink cannot be used; each text names the file or setting.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading the CA file {}: {source}", .path.display())]
    ReadCa { path: PathBuf, source: pem::Error },
    #[error(
        "the CA file {} holds no PEM certificate; expected -----BEGIN CERTIFICATE-----",
        .path.display()
    )]
    NoCaCertificate { path: PathBuf },
    #[error("the CA file {}: {source}", .path.display())]
    BadCa {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error(
        "found no system CA certificates to trust{}; install ca-certificates or set ca",
        .source.as_ref().map_or(String::new(), |e| format!(" ({e})"))
    )]
    NoSystemCa {
        /// The first error met while loading them, if any.
        source: Option<rustls_native_certs::Error>,
    },
    #[error("TLS setup: {source}")]
    Setup { source: rustls::Error },
    #[error("reading the client certificate {}: {source}", .path.display())]
    ReadClientCert { path: PathBuf, source: pem::Error },
    #[error("the client certificate file {} holds no PEM certificate", .path.display())]
    NoClientCertificate { path: PathBuf },
    #[error("reading the client key {}: {source}", .path.display())]
    ReadClientKey { path: PathBuf, source: pem::Error },
    #[error("the client certificate and key: {source}")]
    ClientAuth { source: rustls::Error },
    #[error("client_cert and client_key go together; set both or neither")]
    CertWithoutKey,
}

pub(super) fn tls_config(t: &TlsClientConfig) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match &t.ca {
        Some(ca) => {
            let read_ca = |source| TlsError::ReadCa {
                path: ca.clone(),
                source,
            };
            let certs = CertificateDer::pem_file_iter(ca)
                .map_err(read_ca)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(read_ca)?;
            if certs.is_empty() {
                return Err(TlsError::NoCaCertificate { path: ca.clone() });
            }
            for c in certs {
                roots.add(c).map_err(|source| TlsError::BadCa {
                    path: ca.clone(),
                    source,
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(TlsError::NoSystemCa {
                    source: found.errors.into_iter().next(),
                });
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Setup { source })?
        .with_root_certificates(roots);
    let config = match (&t.cert, &t.key) {
        (Some(cert), Some(key)) => {
            let read_cert = |source| TlsError::ReadClientCert {
                path: cert.clone(),
                source,
            };
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(read_cert)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(read_cert)?;
            if chain.is_empty() {
                return Err(TlsError::NoClientCertificate { path: cert.clone() });
            }
            let key =
                PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::ReadClientKey {
                    path: key.clone(),
                    source,
                })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|source| TlsError::ClientAuth { source })?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => return Err(TlsError::CertWithoutKey),
    };
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_strips_the_port() {
        assert_eq!(host_of("[::1]:514"), "::1");
        assert_eq!(host_of("logs.example.org:6514"), "logs.example.org");
    }
}
