//! TLS and mTLS on the service's listeners, from PEM files named by the
//! environment, and the client identity a certificate gives.
//!
//! - `TLS_CERT_FILE` + `TLS_KEY_FILE`: the server's certificate chain and
//!   private key. Set, every gRPC listener and the REST listener speak TLS
//!   only; unset, plaintext as before.
//! - `TLS_CLIENT_CA_FILE`: also require a client certificate signed by one of
//!   these CAs (mTLS), on gRPC and REST alike. A handshake without one, or
//!   with one from another CA, fails before any request is read.
//! - `HEALTH_ADDR`: an extra listener serving only `grpc.health.v1`, in
//!   plaintext, for Kubernetes' gRPC probes, which speak neither TLS nor
//!   mTLS. Off unless set.
//!
//! The files are read and checked once, when the configuration is read: a
//! missing file, a key that does not fit the certificate or a client CA
//! without a server certificate is a configuration error (exit status 2)
//! rather than a listener that fails later. The metrics listener stays
//! plaintext (Prometheus scrapes it inside the cluster; it carries no
//! order data).
//!
//! gRPC gets the PEM files through tonic's own rustls acceptor (so that
//! `Request::peer_certs` works); REST gets the same settings as a rustls
//! configuration for [`TlsListener`]. Both use the ring provider.

use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use sha2::{Digest, Sha256};
use tokio::{
    net::{TcpListener, TcpStream},
    task::JoinSet,
};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        self, RootCertStore, ServerConfig,
        crypto::CryptoProvider,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
        server::WebPkiClientVerifier,
    },
    server::TlsStream,
};

use crate::config::ConfigError;

/// How long a client may take to finish the TLS handshake; a stalled one
/// holds a task and a socket, never the accept loop.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The listeners' transport security: TLS (optionally mTLS) and the
/// plaintext health listener for probes.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    /// `TLS_CERT_FILE`, `TLS_KEY_FILE`, `TLS_CLIENT_CA_FILE` (default: all
    /// unset, plaintext).
    pub server: Option<ServerTls>,
    /// `HEALTH_ADDR` (default unset: no such listener): serves only
    /// `grpc.health.v1`, in plaintext, for probes that cannot speak TLS.
    pub health_addr: Option<SocketAddr>,
}

impl Settings {
    /// Reads the variables above and loads the files they name.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`Settings::from_env`] with the variables looked up by `lookup`.
    fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let var = |name: &str| {
            lookup(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        // Literal names, so that deploy/k8s/check_manifests.py sees them read.
        let (cert, key, client_ca) = (
            var("TLS_CERT_FILE"),
            var("TLS_KEY_FILE"),
            var("TLS_CLIENT_CA_FILE").map(PathBuf::from),
        );
        let server = match (cert, key) {
            (None, None) => match client_ca {
                Some(ca) => {
                    return Err(ConfigError::new(
                        CLIENT_CA_VAR,
                        &ca.display().to_string(),
                        "needs TLS_CERT_FILE and TLS_KEY_FILE: client certificates are \
                         asked for only in a TLS handshake",
                    ));
                }
                None => None,
            },
            (Some(cert), None) => {
                return Err(ConfigError::new(
                    CERT_VAR,
                    &cert,
                    "TLS_KEY_FILE must be set too",
                ));
            }
            (None, Some(key)) => {
                return Err(ConfigError::new(
                    KEY_VAR,
                    &key,
                    "TLS_CERT_FILE must be set too",
                ));
            }
            (Some(cert), Some(key)) => Some(
                ServerTls::load(Path::new(&cert), Path::new(&key), client_ca.as_deref())
                    .map_err(ConfigError::from)?,
            ),
        };
        let health_addr = match var("HEALTH_ADDR") {
            Some(addr) => Some(
                addr.parse()
                    .map_err(|e| ConfigError::new(HEALTH_VAR, &addr, e))?,
            ),
            None => None,
        };
        Ok(Self {
            server,
            health_addr,
        })
    }
}

const CERT_VAR: &str = "TLS_CERT_FILE";
const KEY_VAR: &str = "TLS_KEY_FILE";
const CLIENT_CA_VAR: &str = "TLS_CLIENT_CA_FILE";
const HEALTH_VAR: &str = "HEALTH_ADDR";

/// Why the TLS files cannot be used; each names the variable and the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        var: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} holds no PEM {what}", path.display())]
    NoPem {
        var: &'static str,
        path: PathBuf,
        what: &'static str,
    },
    #[error("{} is not valid PEM: {reason}", path.display())]
    BadPem {
        var: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{} cannot be used: {source}", path.display())]
    Rustls {
        var: &'static str,
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("{} cannot verify client certificates: {reason}", path.display())]
    ClientCa {
        var: &'static str,
        path: PathBuf,
        reason: String,
    },
}

impl From<TlsError> for ConfigError {
    fn from(e: TlsError) -> Self {
        let (TlsError::Read { var, path, .. }
        | TlsError::NoPem { var, path, .. }
        | TlsError::BadPem { var, path, .. }
        | TlsError::Rustls { var, path, .. }
        | TlsError::ClientCa { var, path, .. }) = &e;
        ConfigError::new(var, &path.display().to_string(), &e)
    }
}

/// The server side of TLS: certificate chain, key and, for mTLS, the CAs
/// client certificates must be signed by. `Debug` shows the file names,
/// never the key.
#[derive(Clone)]
pub struct ServerTls {
    files: Files,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    client_ca_pem: Option<Vec<u8>>,
    rest: Arc<ServerConfig>,
}

#[derive(Clone, Debug)]
struct Files {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("cert", &self.files.cert)
            .field("key", &self.files.key)
            .field("client_ca", &self.files.client_ca)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Reads and checks the PEM files: the chain and key must parse and
    /// belong together, the client CAs must be usable as trust anchors.
    pub fn load(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Self, TlsError> {
        let cert_pem = read(CERT_VAR, cert)?;
        let key_pem = read(KEY_VAR, key)?;
        let client_ca_pem = client_ca.map(|p| read(CLIENT_CA_VAR, p)).transpose()?;
        let chain = certificates(CERT_VAR, cert, &cert_pem)?;
        let private_key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| pem_error(KEY_VAR, key, "private key", &e))?;
        let provider = provider();
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsError::Rustls {
                var: CERT_VAR,
                path: cert.to_owned(),
                source,
            })?;
        let builder = match (&client_ca_pem, client_ca) {
            (Some(pem), Some(path)) => {
                let mut roots = RootCertStore::empty();
                for ca in certificates(CLIENT_CA_VAR, path, pem)? {
                    roots.add(ca).map_err(|e| TlsError::ClientCa {
                        var: CLIENT_CA_VAR,
                        path: path.to_owned(),
                        reason: e.to_string(),
                    })?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| TlsError::ClientCa {
                            var: CLIENT_CA_VAR,
                            path: path.to_owned(),
                            reason: e.to_string(),
                        })?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let mut rest = builder
            .with_single_cert(chain, private_key)
            .map_err(|source| TlsError::Rustls {
                var: KEY_VAR,
                path: key.to_owned(),
                source,
            })?;
        // The REST shim speaks HTTP/1.1 only (axum's http1 feature).
        rest.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            files: Files {
                cert: cert.to_owned(),
                key: key.to_owned(),
                client_ca: client_ca.map(Path::to_owned),
            },
            cert_pem,
            key_pem,
            client_ca_pem,
            rest: Arc::new(rest),
        })
    }

    /// Whether clients must present a certificate (`TLS_CLIENT_CA_FILE`).
    #[must_use]
    pub fn requires_client_cert(&self) -> bool {
        self.client_ca_pem.is_some()
    }

    /// tonic's server TLS settings from the same files.
    #[must_use]
    pub fn grpc(&self) -> tonic::transport::ServerTlsConfig {
        let identity = tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem);
        let config = tonic::transport::ServerTlsConfig::new()
            .identity(identity)
            .timeout(HANDSHAKE_TIMEOUT);
        match &self.client_ca_pem {
            Some(ca) => config.client_ca_root(tonic::transport::Certificate::from_pem(ca)),
            None => config,
        }
    }

    /// The REST listener's acceptor.
    #[must_use]
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.rest.clone())
    }
}

/// The crypto provider of every TLS configuration here: ring, which
/// tonic's `tls-ring` brings. It is also installed as the process default,
/// since tonic's server builds its rustls configuration from that default
/// and a binary that also links another provider would have none.
fn provider() -> Arc<CryptoProvider> {
    let ring = rustls::crypto::ring::default_provider();
    // Err only when a default is already installed, which is fine.
    let _ = ring.clone().install_default();
    Arc::new(ring)
}

fn read(var: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        var,
        path: path.to_owned(),
        source,
    })
}

fn certificates(
    var: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(var, path, "certificate", &e))?;
    if certs.is_empty() {
        return Err(TlsError::NoPem {
            var,
            path: path.to_owned(),
            what: "certificate",
        });
    }
    Ok(certs)
}

fn pem_error(
    var: &'static str,
    path: &Path,
    what: &'static str,
    e: &rustls::pki_types::pem::Error,
) -> TlsError {
    match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoPem {
            var,
            path: path.to_owned(),
            what,
        },
        other => TlsError::BadPem {
            var,
            path: path.to_owned(),
            reason: format!("{other:?}"),
        },
    }
}

/// The client identity a certificate gives: the SHA-256 fingerprint of the
/// leaf certificate (DER), as `sha256:<hex>`. A fingerprint needs no X.509
/// parsing, cannot be shared by two certificates and is what the CA
/// issued, not what the client says; a renewed certificate is a new
/// identity (for a rate limit that only means a full bucket).
#[must_use]
pub fn fingerprint(leaf_der: &[u8]) -> String {
    use std::fmt::Write as _;
    let digest = Sha256::digest(leaf_der);
    let mut hex = String::with_capacity(7 + 64);
    hex.push_str("sha256:");
    for byte in digest {
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

/// Who is on the other end of a REST connection: its address and, over
/// mTLS, the [`fingerprint`] of its certificate. Handlers get it as
/// `ConnectInfo<Peer>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub addr: SocketAddr,
    pub identity: Option<String>,
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, PlainListener>>
    for Peer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, PlainListener>) -> Self {
        Self {
            addr: *stream.remote_addr(),
            identity: None,
        }
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        let (_, session) = stream.io().get_ref();
        Self {
            addr: *stream.remote_addr(),
            identity: session
                .peer_certificates()
                .and_then(<[_]>::first)
                .map(|leaf| fingerprint(leaf)),
        }
    }
}

/// A TCP listener that hands axum connections only after their TLS
/// handshake. Handshakes run in their own tasks (at most
/// [`HANDSHAKE_TIMEOUT`] each), so a slow or silent client never holds up
/// the others; failed handshakes (plaintext, no or a wrong client
/// certificate) are logged at debug level and dropped.
pub struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    handshakes: JoinSet<Option<(TlsStream<TcpStream>, SocketAddr)>>,
}

impl TlsListener {
    #[must_use]
    pub fn new(tcp: TcpListener, tls: &ServerTls) -> Self {
        Self {
            tcp,
            acceptor: tls.acceptor(),
            handshakes: JoinSet::new(),
        }
    }

    fn start_handshake(&mut self, tcp: TcpStream, addr: SocketAddr) {
        // Small replies go out at once instead of waiting for Nagle.
        let _ = tcp.set_nodelay(true);
        let acceptor = self.acceptor.clone();
        self.handshakes.spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => Some((stream, addr)),
                Ok(Err(e)) => {
                    tracing::debug!(%addr, error = %e, "TLS handshake failed");
                    None
                }
                Err(_) => {
                    tracing::debug!(%addr, "TLS handshake timed out");
                    None
                }
            }
        });
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            tokio::select! {
                accepted = self.tcp.accept() => match accepted {
                    Ok((tcp, addr)) => self.start_handshake(tcp, addr),
                    Err(e) => accept_error(e).await,
                },
                Some(done) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    if let Ok(Some(ready)) = done {
                        return ready;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// The REST listener without TLS: axum's TCP listener with `TCP_NODELAY`
/// on every connection, so that small replies go out at once instead of
/// waiting for Nagle. (axum's `tap_io` does the same, but its connection
/// info can only be the bare address.)
pub struct PlainListener(pub TcpListener);

impl axum::serve::Listener for PlainListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok((tcp, addr)) => {
                    let _ = tcp.set_nodelay(true);
                    return (tcp, addr);
                }
                Err(e) => accept_error(e).await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// What axum's own TCP listener does on an accept error: a connection that
/// went away is nothing; anything else (such as running out of file
/// descriptors) is logged and waited out for a second.
async fn accept_error(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accept failed on the REST listener; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder of its own under the system's temp dir, removed on drop.
    struct Dir(PathBuf);

    impl Dir {
        fn new() -> Self {
            let dir = std::env::temp_dir().join(format!(
                "shop-tls-unit-{}-{}",
                std::process::id(),
                rand::random::<u64>()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn write(&self, name: &str, contents: &str) -> String {
            let path = self.0.join(name);
            std::fs::write(&path, contents).unwrap();
            path.display().to_string()
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn self_signed(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn settings(vars: &[(&str, &str)]) -> Result<Settings, String> {
        Settings::from_lookup(|name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).to_owned())
        })
        .map_err(|e| e.to_string())
    }

    #[test]
    fn nothing_set_is_plaintext() {
        let s = settings(&[("TLS_CERT_FILE", " ")]).unwrap();
        assert!(s.server.is_none() && s.health_addr.is_none());
    }

    #[test]
    fn incomplete_settings_are_refused_with_the_variable_named() {
        let err = settings(&[("TLS_CLIENT_CA_FILE", "/ca.pem")]).unwrap_err();
        assert!(
            err.starts_with("environment variable TLS_CLIENT_CA_FILE=\"/ca.pem\"")
                && err.contains("needs TLS_CERT_FILE"),
            "{err}"
        );
        let err = settings(&[("TLS_KEY_FILE", "/k.pem")]).unwrap_err();
        assert!(err.contains("TLS_KEY_FILE") && err.contains("TLS_CERT_FILE must be set"));
        let err = settings(&[("TLS_CERT_FILE", "/c.pem")]).unwrap_err();
        assert!(err.contains("TLS_CERT_FILE") && err.contains("TLS_KEY_FILE must be set"));
        let err = settings(&[("HEALTH_ADDR", "nowhere")]).unwrap_err();
        assert!(err.contains("HEALTH_ADDR=\"nowhere\""), "{err}");
    }

    #[test]
    fn unreadable_or_mismatched_files_are_refused() {
        let dir = Dir::new();
        let (cert, key) = self_signed("localhost");
        let (_, other_key) = self_signed("other");
        let cert = dir.write("cert.pem", &cert);
        let key = dir.write("key.pem", &key);
        let other_key = dir.write("other-key.pem", &other_key);
        let garbage = dir.write("garbage.pem", "not PEM at all");
        let missing = dir.0.join("missing.pem").display().to_string();

        let err = settings(&[("TLS_CERT_FILE", &missing), ("TLS_KEY_FILE", &key)]).unwrap_err();
        assert!(
            err.contains("TLS_CERT_FILE") && err.contains("cannot read"),
            "{err}"
        );
        let err = settings(&[("TLS_CERT_FILE", &garbage), ("TLS_KEY_FILE", &key)]).unwrap_err();
        assert!(err.contains("no PEM certificate"), "{err}");
        let err = settings(&[("TLS_CERT_FILE", &cert), ("TLS_KEY_FILE", &garbage)]).unwrap_err();
        assert!(
            err.contains("TLS_KEY_FILE") && err.contains("no PEM private key"),
            "{err}"
        );
        let err = settings(&[("TLS_CERT_FILE", &cert), ("TLS_KEY_FILE", &other_key)]).unwrap_err();
        assert!(err.contains("TLS_KEY_FILE"), "{err}");
        let err = settings(&[
            ("TLS_CERT_FILE", &cert),
            ("TLS_KEY_FILE", &key),
            ("TLS_CLIENT_CA_FILE", &garbage),
        ])
        .unwrap_err();
        assert!(err.contains("TLS_CLIENT_CA_FILE"), "{err}");
    }

    #[test]
    fn good_files_load_and_hide_the_key() {
        let dir = Dir::new();
        let (cert_pem, key_pem) = self_signed("localhost");
        let cert = dir.write("cert.pem", &cert_pem);
        let key = dir.write("key.pem", &key_pem);
        let tls = settings(&[("TLS_CERT_FILE", &cert), ("TLS_KEY_FILE", &key)])
            .unwrap()
            .server
            .expect("TLS on");
        assert!(!tls.requires_client_cert());
        assert!(!format!("{tls:?}").contains("PRIVATE KEY"));
        let s = settings(&[
            ("TLS_CERT_FILE", &cert),
            ("TLS_KEY_FILE", &key),
            ("TLS_CLIENT_CA_FILE", &cert),
            ("HEALTH_ADDR", "127.0.0.1:8086"),
        ])
        .unwrap();
        assert!(s.server.expect("TLS on").requires_client_cert());
        assert_eq!(s.health_addr, Some(([127, 0, 0, 1], 8086).into()));
    }

    #[test]
    fn fingerprint_is_sha256_of_the_der() {
        // SHA-256 of the empty input.
        assert_eq!(
            fingerprint(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_ne!(fingerprint(b"a"), fingerprint(b"b"));
    }
}
