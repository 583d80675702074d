//! The QUIC transport between nodes (quinn, rustls with the ring provider).
//!
//! One UDP endpoint per node is both server and client. Connections are cached per peer
//! and made again when they break. A call travels on a bidirectional stream:
//!
//! - **Batched** (entity commands forwarded to their owner or their group's leader,
//!   [`Transport::call_batched`], frames up to [`BATCH_FRAME`]): the commands queued
//!   for one peer go together on one stream, so that under load many share a packet
//!   instead of each costing its own datagrams, acknowledgements and stream (the two
//!   other nodes of a cluster forwarding a flash sale to its group's leader). A batch
//!   takes what is queued once the runtime has run the tasks that were ready (a
//!   yield): unloaded, a batch is one command and nothing waits. The stream opens with
//!   the marker [`BATCH`] (a length no frame can have) and the number of calls, then
//!   each request frame (a big-endian u32 length and that many bytes). The server
//!   serves them side by side and writes each answer as `index, length, bytes` (u32s,
//!   big-endian) as soon as it is ready, the answers that are ready together in one
//!   write; a length of [`ANSWER_REFUSED`] says that answer could not be sent.
//! - **Alone** (every other call: consensus messages, whose deadlines are a fraction of
//!   an election timeout, pings, handoffs and snapshots): the request frame, then the
//!   answer frame, each a big-endian u32 length and that many bytes.
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
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use hmac::{Hmac, Mac};
use quinn::{Connection, Endpoint, VarInt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::Sha256;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;

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
/// First length prefix of a stream that carries a batch of calls: over [`MAX_FRAME`],
/// so no single frame is mistaken for it.
const BATCH: u32 = u32::MAX;
/// Calls one batch carries at most.
const MAX_BATCH_CALLS: usize = 256;
/// Entity commands up to this size are batched; larger ones get a stream of their own.
pub const BATCH_FRAME: usize = 64 * 1024;
/// Answer length in a batch: this call's answer could not be sent (over [`MAX_FRAME`],
/// or the service failed).
const ANSWER_REFUSED: u32 = u32::MAX;
const _: () = assert!(MAX_FRAME < ANSWER_REFUSED as usize && BATCH_FRAME <= MAX_FRAME);

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
    /// Per peer address, the queue of calls its batcher sends (see the module
    /// documentation).
    batchers: Mutex<HashMap<String, mpsc::UnboundedSender<Queued>>>,
}

/// Where a batched call's answer goes.
type Reply = oneshot::Sender<Result<Vec<u8>, TransportError>>;

/// A call waiting for its batch.
struct Queued {
    frame: Vec<u8>,
    reply: Reply,
    deadline: Instant,
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
                batchers: Mutex::new(HashMap::new()),
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

    /// A new stream to `to`. When the cached connection turns out to have died since it
    /// was last checked, nothing was sent on it, so one more try on a new connection is
    /// safe.
    async fn open(
        &self,
        to: &str,
    ) -> Result<(Connection, quinn::SendStream, quinn::RecvStream), TransportError> {
        let (mut conn, fresh) = self.connection(to).await?;
        let opened = match conn.open_bi().await {
            Err(_) if !fresh => {
                self.forget(to);
                conn = self.connection(to).await?.0;
                conn.open_bi().await
            }
            opened => opened,
        };
        match opened {
            Ok((send, recv)) => Ok((conn, send, recv)),
            Err(e) => {
                self.forget(to);
                Err(TransportError::peer_unreachable(to, e))
            }
        }
    }

    /// What a failure to read an answer from `to` on `conn` means to the caller; a
    /// connection found closed is forgotten, so the next call makes a new one.
    fn answer_error(&self, to: &str, conn: &Connection, e: FrameError) -> TransportError {
        let lost = |why: &dyn std::fmt::Display| {
            if conn.close_reason().is_some() {
                self.forget(to);
            }
            TransportError::peer_unreachable(to, why)
        };
        match e {
            FrameError::Lost(why) => lost(&why),
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
        }
    }

    /// One call on a stream of its own: the request, then its answer.
    async fn round_trip(&self, to: &str, frame: &[u8]) -> Result<Vec<u8>, TransportError> {
        check_len(frame.len())?;
        let (conn, mut send, mut recv) = self.open(to).await?;
        let lost = |e: &dyn std::fmt::Display| {
            self.answer_error(to, &conn, FrameError::Lost(e.to_string()))
        };
        send.write_all(&(frame.len() as u32).to_be_bytes())
            .await
            .map_err(|e| lost(&e))?;
        send.write_all(frame).await.map_err(|e| lost(&e))?;
        let _ = send.finish();
        read_frame(&mut recv)
            .await
            .map_err(|e| self.answer_error(to, &conn, e))
    }

    /// Queues a call for `to`'s batcher, starting one if there is none.
    fn enqueue(self: &Arc<Self>, to: &str, call: Queued) {
        let mut batchers = self.batchers.lock().unwrap_or_else(|e| e.into_inner());
        let call = match batchers.get(to) {
            Some(tx) => match tx.send(call) {
                Ok(()) => return,
                Err(mpsc::error::SendError(call)) => call,
            },
            None => call,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        // Cannot fail: the receiver is alive.
        let _ = tx.send(call);
        batchers.insert(to.to_owned(), tx);
        tokio::spawn(batcher(Arc::downgrade(self), to.to_owned(), rx));
    }

    /// Sends `calls` to `to` on one stream and leaves their answers to a reader task.
    async fn send_batch(self: &Arc<Self>, to: &str, calls: Vec<Queued>) {
        let deadline = calls
            .iter()
            .map(|c| c.deadline)
            .max()
            .unwrap_or_else(Instant::now);
        let size = calls.iter().map(|c| 4 + c.frame.len()).sum::<usize>();
        let mut request = Vec::with_capacity(8 + size);
        request.extend_from_slice(&BATCH.to_be_bytes());
        request.extend_from_slice(&(calls.len() as u32).to_be_bytes());
        let mut replies = Vec::with_capacity(calls.len());
        for call in calls {
            request.extend_from_slice(&(call.frame.len() as u32).to_be_bytes());
            request.extend_from_slice(&call.frame);
            replies.push(Some(call.reply));
        }
        let sent = tokio::time::timeout_at(deadline, async {
            let (conn, mut send, recv) = self.open(to).await?;
            if let Err(e) = send.write_all(&request).await {
                return Err(self.answer_error(to, &conn, FrameError::Lost(e.to_string())));
            }
            let _ = send.finish();
            Ok((conn, recv))
        })
        .await;
        match sent {
            Ok(Ok((conn, recv))) => {
                tokio::spawn(read_answers(
                    Arc::downgrade(self),
                    to.to_owned(),
                    conn,
                    recv,
                    replies,
                    deadline,
                ));
            }
            Ok(Err(e)) => fail_all(&mut replies, &e),
            Err(_) => fail_all(
                &mut replies,
                &TransportError::Timeout {
                    peer: to.to_owned(),
                },
            ),
        }
    }
}

/// Sends the calls queued for `to`, a batch at a time: whatever queued while the last
/// batch was being sent goes in the next. Ends with the transport.
async fn batcher(inner: Weak<Inner>, to: String, mut rx: mpsc::UnboundedReceiver<Queued>) {
    let mut calls = Vec::with_capacity(MAX_BATCH_CALLS);
    while rx.recv_many(&mut calls, MAX_BATCH_CALLS).await > 0 {
        // Once round the runtime first: under load the callers that are ready to run add
        // their calls to this batch (a flash sale forwarded to one leader comes in
        // bursts); unloaded nothing is added and the call goes at once.
        tokio::task::yield_now().await;
        while calls.len() < MAX_BATCH_CALLS {
            match rx.try_recv() {
                Ok(call) => calls.push(call),
                Err(_) => break,
            }
        }
        // Callers that gave up are not sent.
        calls.retain(|c| !c.reply.is_closed());
        if calls.is_empty() {
            continue;
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        inner.send_batch(&to, std::mem::take(&mut calls)).await;
    }
}

/// Reads the answers of one batch, in the order the peer finished them, and hands each
/// to its caller; what is left unanswered when the stream breaks or the batch's last
/// deadline passes fails.
async fn read_answers(
    inner: Weak<Inner>,
    to: String,
    conn: Connection,
    mut recv: quinn::RecvStream,
    mut replies: Vec<Option<Reply>>,
    deadline: Instant,
) {
    let mut left = replies.len();
    let read = tokio::time::timeout_at(deadline, async {
        while left > 0 {
            let mut head = [0u8; 8];
            recv.read_exact(&mut head).await?;
            let index = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
            let len = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
            let Some(reply) = replies.get_mut(index).and_then(Option::take) else {
                return Err(FrameError::Lost(format!(
                    "an answer to call {index} of a batch of {}, not asked or answered twice",
                    replies.len()
                )));
            };
            let answer = if len == ANSWER_REFUSED {
                Ok(Err(TransportError::Frame(format!(
                    "{to} could not answer: its answer was over the {MAX_FRAME}-byte limit or its service failed"
                ))))
            } else if len as usize > MAX_FRAME {
                Err(FrameError::TooLarge(len as usize))
            } else {
                let mut body = vec![0u8; len as usize];
                recv.read_exact(&mut body).await.map(|()| Ok(body)).map_err(FrameError::from)
            };
            match answer {
                Ok(answer) => {
                    let _ = reply.send(answer);
                    left -= 1;
                }
                Err(e) => {
                    // Failed with the rest, for the same reason.
                    replies[index] = Some(reply);
                    return Err(e);
                }
            }
        }
        Ok(())
    })
    .await;
    let error = match read {
        Ok(Ok(())) => return,
        Ok(Err(e)) => match inner.upgrade() {
            Some(inner) => inner.answer_error(&to, &conn, e),
            None => TransportError::peer_unreachable(&to, "the transport closed"),
        },
        Err(_) => {
            let _ = recv.stop(VarInt::from_u32(0));
            TransportError::Timeout { peer: to }
        }
    };
    fail_all(&mut replies, &error);
}

fn fail_all(replies: &mut [Option<Reply>], error: &TransportError) {
    for reply in replies.iter_mut().filter_map(Option::take) {
        let _ = reply.send(Err(error.clone()));
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

    fn call_batched(
        &self,
        to: &str,
        frame: Vec<u8>,
        timeout: Option<Duration>,
    ) -> BoxFuture<'static, Result<Vec<u8>, TransportError>> {
        let timeout = timeout.unwrap_or(self.inner.cfg.call_timeout);
        if frame.len() > BATCH_FRAME {
            return self.call_for(to, frame, timeout);
        }
        let inner = self.inner.clone();
        let to = to.to_owned();
        Box::pin(async move {
            let deadline = Instant::now() + timeout;
            let (reply, answer) = oneshot::channel();
            inner.enqueue(
                &to,
                Queued {
                    frame,
                    reply,
                    deadline,
                },
            );
            match tokio::time::timeout_at(deadline, answer).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(TransportError::peer_unreachable(
                    &to,
                    "the call was dropped: the transport is closing",
                )),
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
            let served = match read_u32(&mut recv).await {
                Ok(BATCH) => serve_batch(peer, &mut send, &mut recv, service).await,
                Ok(len) => serve_one(peer, &mut send, &mut recv, len, service).await,
                Err(e) => Err(e),
            };
            if let Err(e) = served {
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
            }
        });
    }
}

/// A call alone on its stream, its frame `len` bytes.
async fn serve_one(
    peer: SocketAddr,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    len: u32,
    service: Arc<dyn Service>,
) -> Result<(), FrameError> {
    let frame = read_body(recv, len as usize, MAX_FRAME).await?;
    let answer = service.serve(frame).await;
    if check_len(answer.len()).is_err() {
        tracing::error!(
            %peer,
            bytes = answer.len(),
            "an answer over the frame limit was not sent"
        );
        let _ = send.reset(VarInt::from_u32(FRAME_TOO_LARGE));
        return Ok(());
    }
    if send
        .write_all(&(answer.len() as u32).to_be_bytes())
        .await
        .is_ok()
        && send.write_all(&answer).await.is_ok()
    {
        let _ = send.finish();
    }
    Ok(())
}

/// A batch of calls (the stream's marker read): every request read first, then all
/// served side by side, each answer written as it is ready (see the module
/// documentation). A caller that goes away does not cut its calls short.
async fn serve_batch(
    peer: SocketAddr,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    service: Arc<dyn Service>,
) -> Result<(), FrameError> {
    let count = read_u32(recv).await? as usize;
    if count == 0 || count > MAX_BATCH_CALLS {
        return Err(FrameError::Lost(format!(
            "a batch of {count} calls (1 to {MAX_BATCH_CALLS} allowed)"
        )));
    }
    let mut frames = Vec::with_capacity(count);
    for _ in 0..count {
        let len = read_u32(recv).await? as usize;
        frames.push(read_body(recv, len, BATCH_FRAME).await?);
    }
    let mut calls = JoinSet::new();
    let mut index_of = HashMap::with_capacity(count);
    for (i, frame) in (0u32..).zip(frames) {
        let service = service.clone();
        let id = calls.spawn(async move { service.serve(frame).await }).id();
        index_of.insert(id, i);
    }
    let mut out = Vec::new();
    while let Some(done) = calls.join_next_with_id().await {
        put_answer(peer, &mut out, &index_of, done);
        while let Some(done) = calls.try_join_next_with_id() {
            put_answer(peer, &mut out, &index_of, done);
        }
        if send.write_all(&out).await.is_err() {
            // The caller is gone; what it asked still runs to its end.
            calls.detach_all();
            return Ok(());
        }
        out.clear();
    }
    let _ = send.finish();
    Ok(())
}

/// Appends one answer of a batch: `index, length, bytes`, or `index, ANSWER_REFUSED`.
fn put_answer(
    peer: SocketAddr,
    out: &mut Vec<u8>,
    index_of: &HashMap<tokio::task::Id, u32>,
    done: Result<(tokio::task::Id, Vec<u8>), tokio::task::JoinError>,
) {
    let (id, answer) = match done {
        Ok((id, answer)) => (id, Some(answer)),
        Err(e) => {
            tracing::error!(%peer, error = %e, "a cluster call failed without an answer");
            (e.id(), None)
        }
    };
    let Some(index) = index_of.get(&id) else {
        return;
    };
    out.extend_from_slice(&index.to_be_bytes());
    match answer {
        Some(answer) if answer.len() <= MAX_FRAME => {
            out.extend_from_slice(&(answer.len() as u32).to_be_bytes());
            out.extend_from_slice(&answer);
        }
        Some(answer) => {
            tracing::error!(
                %peer,
                bytes = answer.len(),
                "an answer over the frame limit was not sent"
            );
            out.extend_from_slice(&ANSWER_REFUSED.to_be_bytes());
        }
        None => out.extend_from_slice(&ANSWER_REFUSED.to_be_bytes()),
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
    let len = read_u32(recv).await? as usize;
    read_body(recv, len, MAX_FRAME).await
}

/// A big-endian u32 (a length prefix, a count).
async fn read_u32(recv: &mut quinn::RecvStream) -> Result<u32, FrameError> {
    let mut bytes = [0u8; 4];
    recv.read_exact(&mut bytes).await?;
    Ok(u32::from_be_bytes(bytes))
}

/// A frame of `len` bytes, refused (before allocating) when over `limit`.
async fn read_body(
    recv: &mut quinn::RecvStream,
    len: usize,
    limit: usize,
) -> Result<Vec<u8>, FrameError> {
    if len > limit {
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
