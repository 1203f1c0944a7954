//! The QUIC transport: one quinn endpoint per node with mutual TLS from the cluster CA, one
//! connection per peer, one bi-stream per request. A frame is a version byte, a big-endian
//! u32 length and a bincode body; frames over the cap are refused before anything of the
//! claimed size is allocated. Fault injection ([`crate::Faults`]) is applied here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::task::JoinHandle;

use crate::codec::{self, WIRE_VERSION};
use crate::faults::{Faults, Verdict};
use crate::metrics::Metrics;
use crate::rpc::{in_scope, Caller, Handler, RpcError, RpcRequest, Scope};
use crate::tls::{self, TlsError, TlsIdentity};

/// Transport settings.
#[derive(Debug, Clone)]
pub struct TransportOptions {
    /// Largest frame accepted or sent.
    pub max_frame_bytes: u32,
    /// Longest a connection may stay silent before it is considered dead.
    pub idle_timeout: Duration,
    /// Longest a new connection may take to be established.
    pub connect_timeout: Duration,
}

impl Default for TransportOptions {
    fn default() -> Self {
        TransportOptions {
            max_frame_bytes: 16 * 1024 * 1024,
            idle_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(3),
        }
    }
}

/// Write one frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    body: &[u8],
    max: u32,
) -> Result<(), RpcError> {
    if body.len() as u64 > max as u64 {
        return Err(RpcError::FrameTooLarge {
            len: body.len() as u64,
            max: max as u64,
        });
    }
    // One buffer, one write: on QUIC the frame then leaves in one STREAM frame (one packet
    // for small messages) instead of a header packet followed by a body packet.
    let mut buf = Vec::with_capacity(5 + body.len());
    buf.push(WIRE_VERSION);
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(body);
    w.write_all(&buf).await.map_err(io_err)?;
    Ok(())
}

/// Read one frame, refusing a wrong version or a length over `max` before allocating.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, max: u32) -> Result<Vec<u8>, RpcError> {
    let mut head = [0u8; 5];
    r.read_exact(&mut head).await.map_err(io_err)?;
    if head[0] != WIRE_VERSION {
        return Err(RpcError::Malformed(format!(
            "wire version {} (this node speaks {WIRE_VERSION})",
            head[0]
        )));
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    if len > max {
        return Err(RpcError::FrameTooLarge {
            len: len as u64,
            max: max as u64,
        });
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body).await.map_err(io_err)?;
    Ok(body)
}

/// Read the one frame a stream carries, and its end when that is already here (it almost
/// always arrives in the frame's last packet). Reading the end matters: a stream dropped
/// before its FIN was read makes quinn send STOP_SENDING, one more frame (often one more
/// packet) per request. A FIN still on its way is not waited for: the frame is complete,
/// and a peer that dies right after sending it must not turn an answer into a timeout.
async fn read_last_frame(recv: &mut quinn::RecvStream, max: u32) -> Result<Vec<u8>, RpcError> {
    use futures_util::FutureExt;
    let body = read_frame(recv, max).await?;
    match recv.read(&mut [0u8; 1]).now_or_never() {
        Some(Ok(Some(_))) => Err(RpcError::Malformed("data after the frame".into())),
        _ => Ok(body),
    }
}

fn io_err(e: std::io::Error) -> RpcError {
    // quinn surfaces TLS alerts (a refused certificate) as io errors on the first read/write.
    let s = e.to_string();
    if s.contains("certificate") || s.contains("crypto") || s.contains("TLS") {
        RpcError::Unauthorized(s)
    } else {
        RpcError::Unreachable(s)
    }
}

fn conn_err(e: quinn::ConnectionError) -> RpcError {
    match e {
        quinn::ConnectionError::TransportError(ref t) if t.code.to_string().contains("crypto") => {
            RpcError::Unauthorized(e.to_string())
        }
        quinn::ConnectionError::ConnectionClosed(ref c)
            if c.error_code.to_string().contains("crypto") =>
        {
            RpcError::Unauthorized(e.to_string())
        }
        e => RpcError::Unreachable(e.to_string()),
    }
}

fn transport_config(opts: &TransportOptions) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(4096u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    if let Ok(idle) = opts.idle_timeout.try_into() {
        t.max_idle_timeout(Some(idle));
    }
    // A ping every third of the idle timeout (10 s by default) keeps a quiet connection open
    // (a dead peer's connection is closed as soon as gossip declares it dead, not by this).
    t.keep_alive_interval(Some(opts.idle_timeout / 3));
    Arc::new(t)
}

pub(crate) fn client_config(
    id: &TlsIdentity,
    opts: &TransportOptions,
) -> Result<quinn::ClientConfig, TlsError> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(id.client_config()?)
        .map_err(|e| TlsError::Crypto(e.to_string()))?;
    let mut c = quinn::ClientConfig::new(Arc::new(crypto));
    c.transport_config(transport_config(opts));
    Ok(c)
}

/// Open a connection to `addr`, expecting a certificate valid for `server_name`.
pub(crate) async fn connect(
    endpoint: &quinn::Endpoint,
    cfg: quinn::ClientConfig,
    addr: SocketAddr,
    server_name: &str,
    timeout: Duration,
) -> Result<quinn::Connection, RpcError> {
    let connecting = endpoint
        .connect_with(cfg, addr, server_name)
        .map_err(|e| RpcError::Unreachable(format!("{addr}: {e}")))?;
    match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(conn_err(e)),
        Err(_) => Err(RpcError::Unreachable(format!(
            "{addr}: no handshake within {} ms",
            timeout.as_millis()
        ))),
    }
}

/// One request/response on a new bi-stream of `conn`.
pub(crate) async fn roundtrip(
    conn: &quinn::Connection,
    req: &RpcRequest,
    max: u32,
) -> Result<Vec<u8>, RpcError> {
    let body = codec::encode(req)?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(conn_err)?;
    write_frame(&mut send, &body, max).await?;
    let _ = send.finish();
    let resp = read_last_frame(&mut recv, max).await?;
    codec::decode::<Result<codec::ByteBuf, RpcError>>(&resp)?.map(|b| b.0)
}

/// A node's QUIC endpoint: serves requests and sends them to peers.
pub struct Transport {
    me: String,
    endpoint: quinn::Endpoint,
    client_cfg: quinn::ClientConfig,
    conns: DashMap<String, (SocketAddr, quinn::Connection)>,
    faults: Arc<Faults>,
    opts: TransportOptions,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Transport({} at {:?})",
            self.me,
            self.endpoint.local_addr()
        )
    }
}

impl Transport {
    /// Bind the endpoint of node `me` at `addr` (port 0 picks a free port).
    pub fn bind(
        me: &str,
        addr: SocketAddr,
        id: &TlsIdentity,
        faults: Arc<Faults>,
        opts: TransportOptions,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, TlsError> {
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(id.server_config()?)
            .map_err(|e| TlsError::Crypto(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(transport_config(&opts));
        let endpoint = quinn::Endpoint::server(server, addr).map_err(|e| TlsError::File {
            path: addr.to_string().into(),
            msg: format!("cannot bind QUIC endpoint: {e}"),
        })?;
        metrics.describe(
            "dsys_rpc_requests_total",
            "counter",
            "RPC requests served, by plugin, calling peer and outcome",
        );
        metrics.describe(
            "dsys_rpc_server_seconds",
            "histogram",
            "Time to serve an RPC, by plugin",
        );
        metrics.describe(
            "dsys_rpc_client_seconds",
            "histogram",
            "Round-trip time of outgoing RPCs, by plugin and peer",
        );
        metrics.describe(
            "dsys_rpc_client_requests_total",
            "counter",
            "Outgoing RPCs, by plugin, peer and outcome (ok, refused, timeout, unreachable, error)",
        );
        Ok(Arc::new(Transport {
            me: me.to_string(),
            client_cfg: client_config(id, &opts)?,
            endpoint,
            conns: DashMap::new(),
            faults,
            opts,
            metrics,
        }))
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Close every connection and stop accepting.
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"shutdown");
        self.conns.clear();
    }

    async fn conn_to(&self, peer: &str, addr: SocketAddr) -> Result<quinn::Connection, RpcError> {
        if let Some(e) = self.conns.get(peer) {
            let (a, c) = e.value();
            if *a == addr && c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let conn = connect(
            &self.endpoint,
            self.client_cfg.clone(),
            addr,
            &tls::node_name(peer),
            self.opts.connect_timeout,
        )
        .await?;
        self.conns.insert(peer.to_string(), (addr, conn.clone()));
        Ok(conn)
    }

    /// Stop reusing the cached connection to `peer` (it stopped answering); calls in flight
    /// on it go on.
    pub(crate) fn forget(&self, peer: &str) {
        self.conns.remove(peer);
    }

    /// `peer` died, left or restarted: close its connection so calls waiting on the dead
    /// process fail now instead of at their deadline.
    pub(crate) fn drop_peer(&self, peer: &str) {
        if let Some((_, (_, conn))) = self.conns.remove(peer) {
            conn.close(0u32.into(), b"peer is gone");
        }
    }

    /// Send `req` to node `peer` at `addr` and wait for the answer.
    pub(crate) async fn request(
        &self,
        peer: &str,
        addr: SocketAddr,
        req: RpcRequest,
        timeout: Duration,
    ) -> Result<Vec<u8>, RpcError> {
        let start = Instant::now();
        let plugin = req.plugin.clone();
        let fut = async {
            match self.faults.verdict(peer) {
                Verdict::Drop => {
                    return Err(RpcError::Unreachable(format!(
                        "{peer}: dropped by injected fault"
                    )))
                }
                Verdict::Pass(d) if !d.is_zero() => tokio::time::sleep(d).await,
                Verdict::Pass(_) => {}
            }
            let conn = self.conn_to(peer, addr).await?;
            roundtrip(&conn, &req, self.opts.max_frame_bytes).await
        };
        let r = match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(RpcError::Timeout(timeout.as_millis() as u64)),
        };
        if matches!(r, Err(RpcError::Unreachable(_) | RpcError::Timeout(_))) {
            // The cached connection may point at a dead process; the next call dials anew.
            self.forget(peer);
        }
        self.metrics.observe(
            "dsys_rpc_client_seconds",
            &[("plugin", &plugin), ("peer", peer)],
            start.elapsed().as_secs_f64(),
        );
        let outcome = match &r {
            Ok(_) => "ok",
            Err(RpcError::Refused(_)) => "refused",
            Err(RpcError::Timeout(_)) => "timeout",
            Err(RpcError::Unreachable(_)) => "unreachable",
            Err(_) => "error",
        };
        self.metrics.add(
            "dsys_rpc_client_requests_total",
            &[("plugin", &plugin), ("peer", peer), ("outcome", outcome)],
            1,
        );
        r
    }

    /// Accept connections and serve their requests with `handler` until closed.
    pub(crate) fn serve(self: &Arc<Self>, handler: Arc<dyn Handler>) -> JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            while let Some(incoming) = this.endpoint.accept().await {
                let this = this.clone();
                let handler = handler.clone();
                tokio::spawn(async move {
                    // A handshake that fails here is a refused certificate or a dead client.
                    let Ok(conn) = incoming.await else { return };
                    this.serve_conn(conn, handler).await;
                });
            }
        })
    }

    async fn serve_conn(self: Arc<Self>, conn: quinn::Connection, handler: Arc<dyn Handler>) {
        let leaf: Option<CertificateDer<'static>> = conn
            .peer_identity()
            .and_then(|a| a.downcast::<Vec<CertificateDer<'static>>>().ok())
            .and_then(|v| v.first().cloned());
        let Some(leaf) = leaf else {
            conn.close(1u32.into(), b"no client certificate");
            return;
        };
        let verified: Arc<std::sync::Mutex<Option<(String, Caller)>>> = Default::default();
        while let Ok((send, recv)) = conn.accept_bi().await {
            let this = self.clone();
            let (handler, leaf, verified) = (handler.clone(), leaf.clone(), verified.clone());
            tokio::spawn(async move {
                this.serve_stream(send, recv, handler, &leaf, &verified)
                    .await;
            });
        }
    }

    async fn serve_stream(
        &self,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        handler: Arc<dyn Handler>,
        leaf: &CertificateDer<'static>,
        verified: &std::sync::Mutex<Option<(String, Caller)>>,
    ) {
        let max = self.opts.max_frame_bytes;
        let start = Instant::now();
        let (plugin, result, peer) = match read_last_frame(&mut recv, max).await {
            Err(e) => ("-".to_string(), Err(e), None),
            Ok(buf) => match codec::decode::<RpcRequest>(&buf) {
                Err(e) => ("-".to_string(), Err(e.into()), None),
                Ok(req) => {
                    let plugin = req.plugin.clone();
                    match self.authenticate(&req.caller, leaf, verified) {
                        Err(e) => (plugin, Err(e), None),
                        Ok(caller) => {
                            let peer = match &caller {
                                Caller::Node(n) => Some(n.clone()),
                                Caller::Client | Caller::Reader => None,
                            };
                            if let Some(p) = &peer {
                                if self.faults.verdict(p) == Verdict::Drop {
                                    // Vanish, as a cut link would: no answer at all.
                                    let _ = send.reset(1u32.into());
                                    return;
                                }
                            }
                            let budget = Duration::from_millis(req.timeout_ms.max(1));
                            let scope = Scope::new(req.traceparent.clone(), budget);
                            let r = tokio::time::timeout(
                                budget,
                                in_scope(scope, handler.handle(caller, req)),
                            )
                            .await
                            .unwrap_or(Err(RpcError::Timeout(budget.as_millis() as u64)));
                            (plugin, r, peer)
                        }
                    }
                }
            },
        };
        let outcome = match &result {
            Ok(_) => "ok",
            Err(RpcError::Refused(_)) => "refused",
            Err(_) => "error",
        };
        self.metrics.add(
            "dsys_rpc_requests_total",
            &[
                ("plugin", &plugin),
                ("peer", peer.as_deref().unwrap_or("unknown")),
                ("outcome", outcome),
            ],
            1,
        );
        self.metrics.observe(
            "dsys_rpc_server_seconds",
            &[("plugin", &plugin)],
            start.elapsed().as_secs_f64(),
        );
        if let Some(p) = &peer {
            if let Verdict::Pass(d) = self.faults.verdict(p) {
                if !d.is_zero() {
                    tokio::time::sleep(d).await;
                }
            }
        }
        let result = match result {
            Ok(b) if b.len() as u64 + 16 > max as u64 => Err(RpcError::FrameTooLarge {
                len: b.len() as u64,
                max: max as u64,
            }),
            r => r,
        };
        if let Ok(bytes) = codec::encode(&result.map(codec::ByteBuf)) {
            let _ = write_frame(&mut send, &bytes, max).await;
        }
        let _ = send.finish();
    }

    /// Check that the claimed caller is the one the certificate names. A client claims `cli`;
    /// which client certificate it shows (admin or read-only) decides its [`Caller`].
    fn authenticate(
        &self,
        claimed: &str,
        leaf: &CertificateDer<'static>,
        verified: &std::sync::Mutex<Option<(String, Caller)>>,
    ) -> Result<Caller, RpcError> {
        let mut v = verified.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((c, caller)) = v.as_ref() {
            if c == claimed {
                return Ok(caller.clone());
            }
        }
        let caller = if claimed == "cli" {
            if tls::cert_names(leaf, tls::CLIENT_NAME) {
                Some(Caller::Client)
            } else if tls::cert_names(leaf, tls::READER_NAME) {
                Some(Caller::Reader)
            } else {
                None
            }
        } else if crate::config::valid_node_id(claimed)
            && tls::cert_names(leaf, &tls::node_name(claimed))
        {
            Some(Caller::Node(claimed.to_string()))
        } else {
            None
        };
        let Some(caller) = caller else {
            return Err(RpcError::Unauthorized(format!(
                "certificate does not belong to `{claimed}`"
            )));
        };
        *v = Some((claimed.to_string(), caller.clone()));
        Ok(caller)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_roundtrip_and_caps() {
        let mut buf = Vec::new();
        write_frame(&mut buf, b"hello", 1024).await.unwrap();
        let mut r = &buf[..];
        assert_eq!(read_frame(&mut r, 1024).await.unwrap(), b"hello");
        // A header claiming 4 GiB is refused without allocating it.
        let evil = [WIRE_VERSION, 0xff, 0xff, 0xff, 0xff];
        let mut r = &evil[..];
        assert!(matches!(
            read_frame(&mut r, 1024).await,
            Err(RpcError::FrameTooLarge { .. })
        ));
        let wrong = [9u8, 0, 0, 0, 1, 0];
        let mut r = &wrong[..];
        assert!(matches!(
            read_frame(&mut r, 1024).await,
            Err(RpcError::Malformed(_))
        ));
        let mut r = &buf[..3];
        assert!(read_frame(&mut r, 1024).await.is_err());
        assert!(matches!(
            write_frame(&mut Vec::new(), &[0u8; 2000], 1024).await,
            Err(RpcError::FrameTooLarge { .. })
        ));
    }
}
