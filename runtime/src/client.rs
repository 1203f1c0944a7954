//! What the CLI and tests use to reach the cluster: a list of node endpoints dialled at once
//! when there is no live connection (the first handshake wins, a dead node is skipped),
//! mutual TLS with the CLI certificate, typed calls.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};

use crate::codec;
use crate::plugin::Api;
use crate::rpc::{next_traceparent, RpcError, RpcRequest};
use crate::tls::{TlsError, TlsIdentity, ANY_NODE_NAME};
use crate::transport::{client_config, connect, roundtrip, TransportOptions};

/// How long one QUIC handshake may take before the endpoint counts as down.
const HANDSHAKE: Duration = Duration::from_secs(2);

/// `e` without a leading "`addr`: ", which the transport adds for node-to-node logs; the
/// client names each address once itself.
fn without_addr(addr: SocketAddr, e: String) -> String {
    match e.strip_prefix(&format!("{addr}: ")) {
        Some(rest) => rest.to_string(),
        None => e,
    }
}

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No endpoint could be reached; each attempt with its error.
    #[error("no node reachable: {}", .0.iter().map(|(a, e)| format!("{a}: {e}")).collect::<Vec<_>>().join("; "))]
    NoNode(Vec<(SocketAddr, String)>),
    /// A node answered with an error.
    #[error(transparent)]
    Rpc(#[from] RpcError),
    /// Local certificate problem.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// A client of the cluster.
#[derive(Debug)]
pub struct Client {
    endpoint: quinn::Endpoint,
    cfg: quinn::ClientConfig,
    endpoints: Vec<SocketAddr>,
    timeout: Duration,
    max_frame: u32,
    conn: tokio::sync::Mutex<Option<(SocketAddr, quinn::Connection)>>,
}

impl Client {
    /// A client presenting `identity` that tries `endpoints` in order.
    pub fn new(
        identity: &TlsIdentity,
        endpoints: Vec<SocketAddr>,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        crate::tls::install_crypto_provider();
        let opts = TransportOptions::default();
        let cfg = client_config(identity, &opts)?;
        let bind: SocketAddr = match endpoints.first() {
            Some(SocketAddr::V6(_)) => "[::]:0".parse().expect("literal address"),
            _ => "0.0.0.0:0".parse().expect("literal address"),
        };
        let endpoint = quinn::Endpoint::client(bind)
            .map_err(|e| TlsError::Crypto(format!("client endpoint: {e}")))?;
        Ok(Client {
            endpoint,
            cfg,
            endpoints,
            timeout,
            max_frame: opts.max_frame_bytes,
            conn: tokio::sync::Mutex::new(None),
        })
    }

    /// The endpoints, in the order tried.
    pub fn endpoints(&self) -> &[SocketAddr] {
        &self.endpoints
    }

    /// Call plugin `A` on the first reachable node.
    pub async fn call<A: Api>(&self, req: &A::Request) -> Result<A::Response, ClientError> {
        let body = codec::encode(req).map_err(RpcError::from)?;
        let out = self.call_raw(A::NAME, body).await?;
        Ok(codec::decode(&out).map_err(RpcError::from)?)
    }

    /// Call plugin `A` on the node at `addr` only.
    pub async fn call_at<A: Api>(
        &self,
        addr: SocketAddr,
        req: &A::Request,
    ) -> Result<A::Response, ClientError> {
        let body = codec::encode(req).map_err(RpcError::from)?;
        let out = self.once(addr, A::NAME, &body).await?;
        Ok(codec::decode(&out).map_err(RpcError::from)?)
    }

    /// Call a plugin by name with an encoded body on the first reachable node.
    ///
    /// A live connection is reused; without one, every endpoint not yet known to be down
    /// is dialled at once and the first handshake wins, so "no node reachable" takes one
    /// handshake timeout however many endpoints there are.
    pub async fn call_raw(&self, plugin: &str, body: Vec<u8>) -> Result<Vec<u8>, ClientError> {
        let mut failures: Vec<(SocketAddr, String)> = Vec::new();
        let live = self.conn.lock().await.clone();
        let mut next = live.filter(|(_, c)| c.close_reason().is_none());
        loop {
            let (addr, conn) = match next.take() {
                Some(found) => found,
                None => {
                    let left: Vec<SocketAddr> = self
                        .endpoints
                        .iter()
                        .copied()
                        .filter(|a| !failures.iter().any(|(f, _)| f == a))
                        .collect();
                    match self.race(&left).await {
                        Ok(found) => found,
                        Err(mut lost) => {
                            failures.append(&mut lost);
                            return Err(ClientError::NoNode(failures));
                        }
                    }
                }
            };
            match self.send(&conn, plugin, &body).await {
                Err(RpcError::Unreachable(e)) => failures.push((addr, without_addr(addr, e))),
                Err(RpcError::Timeout(ms)) => {
                    failures.push((addr, format!("no answer within {ms} ms")))
                }
                other => return Ok(other?),
            }
            *self.conn.lock().await = None;
        }
    }

    /// Dial every address in `addrs` concurrently; the first handshake is kept as the live
    /// connection and the rest are dropped. Every address's error if none answers.
    async fn race(
        &self,
        addrs: &[SocketAddr],
    ) -> Result<(SocketAddr, quinn::Connection), Vec<(SocketAddr, String)>> {
        let handshake = HANDSHAKE.min(self.timeout);
        let mut dials: FuturesUnordered<_> = addrs
            .iter()
            .map(|&addr| async move {
                let r = connect(
                    &self.endpoint,
                    self.cfg.clone(),
                    addr,
                    ANY_NODE_NAME,
                    handshake,
                );
                (addr, r.await)
            })
            .collect();
        let mut lost = Vec::new();
        while let Some((addr, r)) = dials.next().await {
            match r {
                Ok(c) => {
                    *self.conn.lock().await = Some((addr, c.clone()));
                    return Ok((addr, c));
                }
                Err(RpcError::Unreachable(e)) => lost.push((addr, without_addr(addr, e))),
                Err(e) => lost.push((addr, e.to_string())),
            }
        }
        Err(lost)
    }

    /// One request on `conn`, bounded by the client's timeout.
    async fn send(
        &self,
        conn: &quinn::Connection,
        plugin: &str,
        body: &[u8],
    ) -> Result<Vec<u8>, RpcError> {
        let req = self.request(plugin, body);
        match tokio::time::timeout(self.timeout, roundtrip(conn, &req, self.max_frame)).await {
            Ok(r) => r,
            Err(_) => Err(RpcError::Timeout(self.timeout.as_millis() as u64)),
        }
    }

    fn request(&self, plugin: &str, body: &[u8]) -> RpcRequest {
        RpcRequest {
            plugin: plugin.to_string(),
            caller: "cli".into(),
            timeout_ms: self.timeout.as_millis() as u64,
            traceparent: next_traceparent(),
            body: body.to_vec(),
        }
    }

    async fn once(&self, addr: SocketAddr, plugin: &str, body: &[u8]) -> Result<Vec<u8>, RpcError> {
        let req = self.request(plugin, body);
        let fut = async {
            let conn = self.conn_to(addr).await?;
            let r = roundtrip(&conn, &req, self.max_frame).await;
            if matches!(r, Err(RpcError::Unreachable(_))) {
                *self.conn.lock().await = None;
            }
            r
        };
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(RpcError::Timeout(self.timeout.as_millis() as u64)),
        }
    }

    async fn conn_to(&self, addr: SocketAddr) -> Result<quinn::Connection, RpcError> {
        let mut g = self.conn.lock().await;
        if let Some((a, c)) = g.as_ref() {
            if *a == addr && c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let c = connect(
            &self.endpoint,
            self.cfg.clone(),
            addr,
            ANY_NODE_NAME,
            HANDSHAKE.min(self.timeout),
        )
        .await?;
        *g = Some((addr, c.clone()));
        Ok(c)
    }
}
