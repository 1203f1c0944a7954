//! What the CLI and tests use to reach the cluster: a list of node endpoints tried in turn
//! (a dead node is skipped), mutual TLS with the CLI certificate, typed calls.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use crate::codec;
use crate::plugin::Api;
use crate::rpc::{next_traceparent, RpcError, RpcRequest};
use crate::tls::{TlsError, TlsIdentity, ANY_NODE_NAME};
use crate::transport::{client_config, connect, roundtrip, TransportOptions};

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
    preferred: Mutex<usize>,
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
            preferred: Mutex::new(0),
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
    pub async fn call_raw(&self, plugin: &str, body: Vec<u8>) -> Result<Vec<u8>, ClientError> {
        let n = self.endpoints.len();
        let first = *self.preferred.lock().unwrap_or_else(|p| p.into_inner());
        let mut failures = Vec::new();
        for k in 0..n {
            let i = (first + k) % n;
            let addr = self.endpoints[i];
            match self.once(addr, plugin, &body).await {
                Err(RpcError::Unreachable(e)) => failures.push((addr, e)),
                Err(RpcError::Timeout(ms)) => {
                    failures.push((addr, format!("no answer within {ms} ms")))
                }
                other => {
                    *self.preferred.lock().unwrap_or_else(|p| p.into_inner()) = i;
                    return Ok(other?);
                }
            }
        }
        Err(ClientError::NoNode(failures))
    }

    async fn once(&self, addr: SocketAddr, plugin: &str, body: &[u8]) -> Result<Vec<u8>, RpcError> {
        let req = RpcRequest {
            plugin: plugin.to_string(),
            caller: "cli".into(),
            timeout_ms: self.timeout.as_millis() as u64,
            traceparent: next_traceparent(),
            body: body.to_vec(),
        };
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
            Duration::from_secs(2),
        )
        .await?;
        *g = Some((addr, c.clone()));
        Ok(c)
    }
}
