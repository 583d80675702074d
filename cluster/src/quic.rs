//! The QUIC transport between nodes (quinn, rustls with the ring provider).
//!
//! One UDP endpoint per node is both server and client. Each call is one bidirectional
//! stream: the request frame, then the answer frame, each a big-endian u32 length and
//! that many bytes. Connections are cached per peer and made again when they break.
//!
//! Certificates are self-signed (generated at first start, [`TlsIdentity`]) and not
//! what proves membership: right after the handshake each side sends
//! HMAC-SHA256(cluster secret, ekm(role) || role) on the connection's first stream,
//! where ekm(role) is 32 bytes of keying material exported from this TLS session with
//! the label `shardmall cluster proof` and the role (`client` or `server`) as context.
//! The exported material is unique to the session, so a proof cannot be replayed on
//! another connection, and the role keeps one side's proof from being reflected as the
//! other's. The client proves first; the server answers with its own proof only once
//! the client's checks out. A peer without the secret is closed (application code 1,
//! reason "bad cluster secret") before any of its streams reaches the [`Service`], and
//! logged.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use quinn::{Connection, Endpoint, VarInt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::Sha256;

use crate::transport::{BoxFuture, Service, Transport, TransportError, MAX_FRAME};

const ALPN: &[u8] = b"shardmall/1";
/// The name every node's certificate carries and every client asks for.
const SERVER_NAME: &str = "shardmall-node";
const PROOF_LABEL: &[u8] = b"shardmall cluster proof";
const CLIENT_ROLE: &[u8] = b"client";
const SERVER_ROLE: &[u8] = b"server";
const PROOF_LEN: usize = 32;
/// Application close code: this endpoint is shutting down.
const SHUTDOWN: u32 = 0;
/// Application close code: the peer did not prove membership.
const REFUSED: u32 = 1;
/// Stream reset code: a frame (request or answer) over [`MAX_FRAME`].
const FRAME_TOO_LARGE: u32 = 2;
/// Stream reset code: the request frame was cut short or could not be read.
const BAD_REQUEST: u32 = 3;

/// This node's TLS certificate and key (DER).
pub struct TlsIdentity {
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("TlsIdentity")
            .field("cert_bytes", &self.cert.len())
            .finish_non_exhaustive()
    }
}

impl TlsIdentity {
    /// Loads `DIR/cluster.crt` and `DIR/cluster.key` (PEM), or, when either is missing,
    /// generates a self-signed certificate for `shardmall-node` and writes both (the key
    /// first, readable by its owner only). Creates `DIR` if missing. The key may be
    /// PKCS#8, PKCS#1 or SEC1; a file that holds none is an `InvalidData` error.
    pub fn load_or_create(dir: &Path) -> std::io::Result<TlsIdentity> {
        use rustls::pki_types::pem::PemObject;
        std::fs::create_dir_all(dir)?;
        let (crt, key) = (dir.join("cluster.crt"), dir.join("cluster.key"));
        if crt.exists() && key.exists() {
            let bad = |what: &Path, e: rustls::pki_types::pem::Error| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", what.display()),
                )
            };
            let cert = CertificateDer::from_pem_file(&crt).map_err(|e| bad(&crt, e))?;
            let key_der = PrivateKeyDer::from_pem_file(&key).map_err(|e| bad(&key, e))?;
            return Ok(TlsIdentity { cert, key: key_der });
        }
        let generated = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_owned()])
            .map_err(std::io::Error::other)?;
        write_private(&key, generated.key_pair.serialize_pem().as_bytes())?;
        std::fs::write(&crt, generated.cert.pem())?;
        Ok(TlsIdentity {
            cert: generated.cert.der().clone(),
            key: PrivateKeyDer::Pkcs8(generated.key_pair.serialize_der().into()),
        })
    }

    /// The certificate (DER), e.g. to log its fingerprint or to compare.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[derive(Debug, Clone)]
pub struct QuicConfig {
    /// Bound on one whole call: connecting if needed, the request and its answer.
    pub call_timeout: Duration,
    /// Bound on making a connection, proofs included.
    pub connect_timeout: Duration,
    /// A connection silent this long is closed.
    pub idle_timeout: Duration,
    /// Keep-alive pings on idle connections, well under `idle_timeout`.
    pub keep_alive: Duration,
    /// Calls one connection carries at once.
    pub max_streams: u32,
}

impl Default for QuicConfig {
    fn default() -> Self {
        QuicConfig {
            call_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(2),
            max_streams: 1024,
        }
    }
}

/// The transport of one node. See the module documentation.
pub struct QuicTransport {
    inner: Arc<Inner>,
}

struct Inner {
    endpoint: Endpoint,
    secret: Arc<Vec<u8>>,
    cfg: QuicConfig,
    /// One slot per peer address, so that connecting to one slow peer never holds up
    /// calls to the others.
    peers: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Connection>>>>>,
}

impl QuicTransport {
    /// Binds the endpoint at `addr` (port 0 picks one) and serves incoming calls with
    /// `service`. MUST be called inside a tokio runtime.
    pub async fn bind(
        addr: SocketAddr,
        identity: TlsIdentity,
        secret: Vec<u8>,
        service: Arc<dyn Service>,
        cfg: QuicConfig,
    ) -> Result<Arc<QuicTransport>, TransportError> {
        let setup = |e: &dyn std::fmt::Display| TransportError::Frame(format!("QUIC setup: {e}"));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut transport = quinn::TransportConfig::default();
        transport
            .max_concurrent_bidi_streams(VarInt::from_u32(cfg.max_streams))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .keep_alive_interval(Some(cfg.keep_alive))
            .max_idle_timeout(Some(
                quinn::IdleTimeout::try_from(cfg.idle_timeout).map_err(|e| setup(&e))?,
            ));
        let transport = Arc::new(transport);

        let verifier = Arc::new(AnyCertificate(provider.signature_verification_algorithms));
        let mut server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| setup(&e))?
            .with_client_cert_verifier(verifier.clone())
            .with_single_cert(vec![identity.cert.clone()], identity.key.clone_key())
            .map_err(|e| setup(&e))?;
        server_tls.alpn_protocols = vec![ALPN.to_vec()];
        let server_crypto =
            quinn::crypto::rustls::QuicServerConfig::try_from(server_tls).map_err(|e| setup(&e))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        server.transport_config(transport.clone());

        let mut client_tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| setup(&e))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(vec![identity.cert], identity.key)
            .map_err(|e| setup(&e))?;
        client_tls.alpn_protocols = vec![ALPN.to_vec()];
        let client_crypto =
            quinn::crypto::rustls::QuicClientConfig::try_from(client_tls).map_err(|e| setup(&e))?;
        let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
        client.transport_config(transport);

        let mut endpoint =
            Endpoint::server(server, addr).map_err(|e| TransportError::Unreachable {
                peer: addr.to_string(),
                why: format!("cannot bind: {e}"),
            })?;
        endpoint.set_default_client_config(client);
        let secret = Arc::new(secret);
        tokio::spawn(accept_loop(
            endpoint.clone(),
            secret.clone(),
            service,
            cfg.connect_timeout,
        ));
        Ok(Arc::new(QuicTransport {
            inner: Arc::new(Inner {
                endpoint,
                secret,
                cfg,
                peers: Mutex::new(HashMap::new()),
            }),
        }))
    }

    /// The address the endpoint is bound to (with the port picked, if 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner
            .endpoint
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Stops accepting, closes every connection, and waits (up to a second) for the
    /// peers to acknowledge.
    pub async fn close(&self) {
        let endpoint = &self.inner.endpoint;
        endpoint.close(VarInt::from_u32(SHUTDOWN), b"shutdown");
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    }
}

/// A transport dropped without [`QuicTransport::close`] still lets go of its socket:
/// otherwise the accept loop and the connections its peers keep alive would hold the
/// endpoint open for good. Runs once the last handle and the last call in flight are gone.
impl Drop for Inner {
    fn drop(&mut self) {
        self.endpoint.close(VarInt::from_u32(SHUTDOWN), b"shutdown");
    }
}

impl Inner {
    /// The cached connection to `to` (and `false`), or a new authenticated one (and
    /// `true`). Concurrent first calls to one peer wait for a single handshake: the
    /// peer's slot is a tokio mutex held across connecting, while the map of slots is a
    /// std mutex held only to find the slot, never across an await.
    async fn connection(&self, to: &str) -> Result<(Connection, bool), TransportError> {
        let slot = {
            let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
            peers.entry(to.to_owned()).or_default().clone()
        };
        let mut slot = slot.lock().await;
        if let Some(c) = slot.as_ref() {
            if c.close_reason().is_none() {
                return Ok((c.clone(), false));
            }
        }
        *slot = None;
        let conn = tokio::time::timeout(self.cfg.connect_timeout, self.connect(to))
            .await
            .map_err(|_| TransportError::Unreachable {
                peer: to.to_owned(),
                why: format!("no connection within {:?}", self.cfg.connect_timeout),
            })??;
        *slot = Some(conn.clone());
        Ok((conn, true))
    }

    /// A new connection to `to`, with the membership proofs exchanged (ours first).
    async fn connect(&self, to: &str) -> Result<Connection, TransportError> {
        let addr = resolve(to).await?;
        let conn = self
            .endpoint
            .connect(addr, SERVER_NAME)
            .map_err(|e| TransportError::peer_unreachable(to, e))?
            .await
            .map_err(|e| TransportError::peer_unreachable(to, e))?;
        // Any step of the exchange fails the same way when the peer closed the
        // connection because it did not accept our proof.
        let lost = |e: &dyn std::fmt::Display| match conn.close_reason() {
            Some(quinn::ConnectionError::ApplicationClosed(c))
                if c.error_code == VarInt::from_u32(REFUSED) =>
            {
                TransportError::Refused {
                    peer: to.to_owned(),
                    why: format!(
                        "refused our proof of membership ({}): the cluster secrets differ",
                        String::from_utf8_lossy(&c.reason)
                    ),
                }
            }
            _ => TransportError::peer_unreachable(to, e),
        };
        let mine = proof(&self.secret, &conn, CLIENT_ROLE).map_err(|e| lost(&e))?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| lost(&e))?;
        send.write_all(&mine).await.map_err(|e| lost(&e))?;
        let _ = send.finish();
        let mut theirs = [0u8; PROOF_LEN];
        recv.read_exact(&mut theirs).await.map_err(|e| lost(&e))?;
        if !verify(&self.secret, &conn, SERVER_ROLE, &theirs) {
            tracing::warn!(peer = %to, remote = %addr, "a peer failed to prove cluster membership (wrong cluster secret?); refused");
            conn.close(VarInt::from_u32(REFUSED), b"bad cluster secret");
            return Err(TransportError::Refused {
                peer: to.to_owned(),
                why: "it did not prove membership: the cluster secrets differ".into(),
            });
        }
        Ok(conn)
    }

    fn forget(&self, to: &str) {
        self.peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(to);
    }

    /// One call: the request on a new stream of the peer's connection, then its answer.
    async fn round_trip(&self, to: &str, frame: &[u8]) -> Result<Vec<u8>, TransportError> {
        check_len(frame.len())?;
        let (mut conn, fresh) = self.connection(to).await?;
        let (mut send, mut recv) = match conn.open_bi().await {
            Ok(stream) => stream,
            // The cached connection died since it was last checked. Nothing of this
            // call was sent, so it is safe to try once more on a new connection.
            Err(_) if !fresh => {
                self.forget(to);
                conn = self.connection(to).await?.0;
                conn.open_bi()
                    .await
                    .map_err(|e| TransportError::peer_unreachable(to, e))?
            }
            Err(e) => {
                self.forget(to);
                return Err(TransportError::peer_unreachable(to, e));
            }
        };
        let lost = |e: &dyn std::fmt::Display| {
            if conn.close_reason().is_some() {
                self.forget(to);
            }
            TransportError::peer_unreachable(to, e)
        };
        send.write_all(&(frame.len() as u32).to_be_bytes())
            .await
            .map_err(|e| lost(&e))?;
        send.write_all(frame).await.map_err(|e| lost(&e))?;
        let _ = send.finish();
        read_frame(&mut recv).await.map_err(|e| match e {
            FrameError::Lost(e) => lost(&e),
            FrameError::Reset(code) if code == VarInt::from_u32(FRAME_TOO_LARGE) => {
                TransportError::Frame(format!(
                    "{to} refused to send or receive a frame over the {MAX_FRAME}-byte limit"
                ))
            }
            FrameError::Reset(code) => TransportError::peer_unreachable(
                to,
                format!("the peer dropped the call (stream reset, code {code})"),
            ),
            FrameError::TooLarge(n) => TransportError::Frame(format!(
                "{to} answered {n} bytes, over the {MAX_FRAME}-byte limit"
            )),
        })
    }
}

impl Transport for QuicTransport {
    fn call(
        &self,
        to: &str,
        frame: Vec<u8>,
    ) -> BoxFuture<'static, Result<Vec<u8>, TransportError>> {
        self.call_for(to, frame, self.inner.cfg.call_timeout)
    }

    fn call_for(
        &self,
        to: &str,
        frame: Vec<u8>,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<Vec<u8>, TransportError>> {
        let inner = self.inner.clone();
        let to = to.to_owned();
        Box::pin(async move {
            match tokio::time::timeout(timeout, inner.round_trip(&to, &frame)).await {
                Ok(result) => result,
                Err(_) => Err(TransportError::Timeout { peer: to }),
            }
        })
    }
}

/// Serves every incoming connection until the endpoint closes.
async fn accept_loop(
    endpoint: Endpoint,
    secret: Arc<Vec<u8>>,
    service: Arc<dyn Service>,
    handshake_timeout: Duration,
) {
    while let Some(incoming) = endpoint.accept().await {
        let (secret, service) = (secret.clone(), service.clone());
        tokio::spawn(async move {
            let peer = incoming.remote_address();
            let conn =
                match tokio::time::timeout(handshake_timeout, async { incoming.accept()?.await })
                    .await
                {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "incoming cluster connection failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "incoming cluster handshake timed out");
                        return;
                    }
                };
            match tokio::time::timeout(handshake_timeout, prove(&secret, &conn)).await {
                Ok(Ok(())) => serve_connection(conn, service).await,
                Ok(Err(ProofError::Wrong)) => {
                    tracing::warn!(%peer, "refused a peer whose proof of cluster membership is wrong (another cluster secret?)");
                    conn.close(VarInt::from_u32(REFUSED), b"bad cluster secret");
                }
                Ok(Err(ProofError::Lost(why))) => {
                    // Gone before proving anything: not served, but no sign of an intruder.
                    tracing::debug!(%peer, why, "an incoming cluster connection broke before its proof");
                    conn.close(VarInt::from_u32(REFUSED), b"no proof of membership");
                }
                Err(_) => {
                    tracing::warn!(%peer, "refused a peer that sent no proof of cluster membership");
                    conn.close(VarInt::from_u32(REFUSED), b"no proof of membership");
                }
            }
        });
    }
}

enum ProofError {
    /// The peer's proof does not check out.
    Wrong,
    /// The connection broke before a whole proof arrived, or ours could not be sent.
    Lost(String),
}

/// Server side of the membership proof: the client's proof (the connection's first
/// stream) first, then ours. No other stream of the connection is accepted before this
/// returns `Ok`.
async fn prove(secret: &[u8], conn: &Connection) -> Result<(), ProofError> {
    let lost = |e: &dyn std::fmt::Display| ProofError::Lost(e.to_string());
    let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| lost(&e))?;
    let mut theirs = [0u8; PROOF_LEN];
    recv.read_exact(&mut theirs).await.map_err(|e| match e {
        // A stream finished short of a proof is a wrong one.
        quinn::ReadExactError::FinishedEarly(_) => ProofError::Wrong,
        e => lost(&e),
    })?;
    if !verify(secret, conn, CLIENT_ROLE, &theirs) {
        return Err(ProofError::Wrong);
    }
    let mine = proof(secret, conn, SERVER_ROLE).map_err(|e| lost(&e))?;
    send.write_all(&mine).await.map_err(|e| lost(&e))?;
    let _ = send.finish();
    Ok(())
}

/// Serves the calls of one authenticated connection, each stream in its own task, until
/// the connection closes.
async fn serve_connection(conn: Connection, service: Arc<dyn Service>) {
    let peer = conn.remote_address();
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => return, // closed by the peer, idle, or shutting down
        };
        let service = service.clone();
        tokio::spawn(async move {
            let frame = match read_frame(&mut recv).await {
                Ok(f) => f,
                Err(e) => {
                    let code = match e {
                        FrameError::TooLarge(n) => {
                            tracing::warn!(%peer, bytes = n, "refused a cluster frame over the size limit");
                            FRAME_TOO_LARGE
                        }
                        FrameError::Lost(why) => {
                            tracing::debug!(%peer, why, "a cluster request was not read");
                            BAD_REQUEST
                        }
                        FrameError::Reset(_) => BAD_REQUEST,
                    };
                    let _ = recv.stop(VarInt::from_u32(code));
                    let _ = send.reset(VarInt::from_u32(code));
                    return;
                }
            };
            let answer = service.serve(frame).await;
            if check_len(answer.len()).is_err() {
                tracing::error!(
                    %peer,
                    bytes = answer.len(),
                    "an answer over the frame limit was not sent"
                );
                let _ = send.reset(VarInt::from_u32(FRAME_TOO_LARGE));
                return;
            }
            if send
                .write_all(&(answer.len() as u32).to_be_bytes())
                .await
                .is_ok()
                && send.write_all(&answer).await.is_ok()
            {
                let _ = send.finish();
            }
        });
    }
}

enum FrameError {
    /// The stream or its connection broke, or the frame was cut short.
    Lost(String),
    /// The other side reset the stream with this code.
    Reset(VarInt),
    /// The length prefix announced more than [`MAX_FRAME`].
    TooLarge(usize),
}

impl From<quinn::ReadExactError> for FrameError {
    fn from(e: quinn::ReadExactError) -> Self {
        match e {
            quinn::ReadExactError::ReadError(quinn::ReadError::Reset(code)) => {
                FrameError::Reset(code)
            }
            e => FrameError::Lost(e.to_string()),
        }
    }
}

/// Reads one length-prefixed frame, refusing (before allocating) one over [`MAX_FRAME`].
async fn read_frame(recv: &mut quinn::RecvStream) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await?;
    Ok(body)
}

/// Refuses a frame over [`MAX_FRAME`] (or over what the length prefix can carry).
pub fn check_len(len: usize) -> Result<(), TransportError> {
    if len > MAX_FRAME {
        return Err(TransportError::Frame(format!(
            "a frame of {len} bytes is over the {MAX_FRAME}-byte limit"
        )));
    }
    Ok(())
}

async fn resolve(to: &str) -> Result<SocketAddr, TransportError> {
    if let Ok(a) = to.parse() {
        return Ok(a);
    }
    tokio::net::lookup_host(to)
        .await
        .map_err(|e| TransportError::peer_unreachable(to, e))?
        .next()
        .ok_or_else(|| TransportError::peer_unreachable(to, "the name has no address"))
}

type HmacSha256 = Hmac<Sha256>;

/// HMAC-SHA256(secret, ekm(role) || role), ekm being keying material exported from
/// this connection's TLS session with `role` as context. `None` if the session cannot
/// export (it is not established) or the secret cannot key an HMAC (any length can).
fn keyed_proof(secret: &[u8], conn: &Connection, role: &[u8]) -> Option<HmacSha256> {
    let mut ekm = [0u8; 32];
    conn.export_keying_material(&mut ekm, PROOF_LABEL, role)
        .ok()?;
    let mut mac = HmacSha256::new_from_slice(secret).ok()?;
    mac.update(&ekm);
    mac.update(role);
    Some(mac)
}

/// Our proof of membership on `conn`, in `role`.
fn proof(secret: &[u8], conn: &Connection, role: &[u8]) -> Result<[u8; PROOF_LEN], String> {
    keyed_proof(secret, conn, role)
        .map(|mac| mac.finalize().into_bytes().into())
        .ok_or_else(|| "cannot export keying material from the TLS session".to_owned())
}

/// Checks a peer's proof of membership in `role`, in constant time.
fn verify(secret: &[u8], conn: &Connection, role: &[u8], theirs: &[u8; PROOF_LEN]) -> bool {
    keyed_proof(secret, conn, role).is_some_and(|mac| mac.verify_slice(theirs).is_ok())
}

/// Accepts any certificate (membership is proven with the cluster secret), but checks
/// that the peer holds the key of the certificate it presents.
#[derive(Debug)]
struct AnyCertificate(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

impl ClientCertVerifier for AnyCertificate {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}
