//! Typed request/response between plugin instances on any two nodes. Calls to the local node
//! skip the network. Every call carries a W3C `traceparent`: a call made while handling
//! another one continues its trace with a new span id.

use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::codec;
use crate::membership::MembershipHandle;
use crate::plugin::Api;
use crate::transport::Transport;

/// What went wrong with a call. Travels over the wire, so it is plain data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RpcError {
    /// The peer could not be reached (down, partitioned, connection lost).
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// No answer within the deadline.
    #[error("deadline of {0} ms exceeded")]
    Timeout(u64),
    /// The peer refused our certificate or we refused its.
    #[error("not authorized: {0}")]
    Unauthorized(String),
    /// No plugin by that name runs on the node.
    #[error("unknown plugin `{0}`")]
    UnknownPlugin(String),
    /// The plugin is restarting or has failed.
    #[error("plugin `{0}` is not running (restarting or failed)")]
    PluginUnavailable(String),
    /// A frame exceeded the size cap.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// Claimed length.
        len: u64,
        /// The cap.
        max: u64,
    },
    /// Bytes that do not decode as the expected message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The plugin refused the request (bad input, precondition failed).
    #[error("{0}")]
    Refused(String),
    /// A bug or an unexpected failure on the peer.
    #[error("internal error: {0}")]
    Internal(String),
}

impl RpcError {
    /// A refusal of bad input, with a message for the user.
    pub fn refused(msg: impl Into<String>) -> Self {
        RpcError::Refused(msg.into())
    }

    /// Refuse a key that is empty or longer than `max` bytes.
    pub fn check_key(key: &str, max: usize) -> Result<(), RpcError> {
        if key.is_empty() || key.len() > max {
            return Err(RpcError::refused(format!("key must be 1..={max} bytes")));
        }
        Ok(())
    }
}

impl From<codec::CodecError> for RpcError {
    fn from(e: codec::CodecError) -> Self {
        RpcError::Malformed(e.0)
    }
}

/// One request on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RpcRequest {
    /// Target plugin (`sys` for the runtime's own service).
    pub plugin: String,
    /// Who the sender claims to be: a node id, or `cli`. Checked against its certificate.
    pub caller: String,
    /// Remaining time budget.
    pub timeout_ms: u64,
    /// W3C trace context.
    pub traceparent: String,
    /// The plugin's encoded request.
    #[serde(with = "crate::codec::bytes")]
    pub body: Vec<u8>,
}

/// The authenticated sender of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Another node (or this one), by id.
    Node(String),
    /// A CLI or test client with the admin certificate (`cli.pem`).
    Client,
    /// A client with the read-only certificate (`reader.pem`): plugins serve it only the
    /// requests they declare read-only ([`crate::Plugin::read_only`]).
    Reader,
}

impl Caller {
    /// Whether this caller may change state (everyone but a read-only client).
    pub fn may_write(&self) -> bool {
        !matches!(self, Caller::Reader)
    }
}

/// Something that answers requests: the node's dispatcher.
#[async_trait::async_trait]
pub(crate) trait Handler: Send + Sync {
    async fn handle(&self, caller: Caller, req: RpcRequest) -> Result<Vec<u8>, RpcError>;
}

/// What a request being handled carries into the calls it makes: its trace and its deadline.
#[derive(Clone, Debug)]
pub(crate) struct Scope {
    traceparent: String,
    deadline: tokio::time::Instant,
}

impl Scope {
    pub(crate) fn new(traceparent: String, budget: Duration) -> Self {
        Scope {
            traceparent,
            deadline: tokio::time::Instant::now() + budget,
        }
    }

    /// The scope of the request being handled by this task, if any.
    pub(crate) fn current() -> Option<Scope> {
        SCOPE.try_with(Clone::clone).ok()
    }
}

tokio::task_local! {
    static SCOPE: Scope;
}

/// Append `bytes` in lowercase hex to `out`.
fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
}

/// A traceparent for a new call: continues the current trace if there is one. Built in
/// one allocation (every RPC makes one).
pub(crate) fn next_traceparent() -> String {
    let mut out = String::with_capacity(55);
    out.push_str("00-");
    let continued = SCOPE
        .try_with(|s| match s.traceparent.get(3..35) {
            Some(t) => {
                out.push_str(t);
                true
            }
            None => false,
        })
        .unwrap_or(false);
    if !continued {
        push_hex(&mut out, &rand::random::<[u8; 16]>());
    }
    out.push('-');
    push_hex(&mut out, &rand::random::<[u8; 8]>());
    out.push_str("-01");
    out
}

/// Run `fut` as the handling of a request: calls it makes continue its trace and never wait
/// past its deadline.
pub(crate) async fn in_scope<F: std::future::Future>(scope: Scope, fut: F) -> F::Output {
    SCOPE.scope(scope, fut).await
}

/// The time left to the current request's deadline, capped by `timeout`.
fn budget(timeout: Duration) -> Duration {
    SCOPE
        .try_with(|s| {
            s.deadline
                .saturating_duration_since(tokio::time::Instant::now())
        })
        .map(|left| left.min(timeout))
        .unwrap_or(timeout)
}

struct RpcInner {
    me: String,
    transport: Arc<Transport>,
    membership: MembershipHandle,
    local: OnceLock<Weak<dyn Handler>>,
    timeout: Duration,
}

/// Typed calls to plugins on any node. Cheap to clone.
#[derive(Clone)]
pub struct Rpc {
    inner: Arc<RpcInner>,
}

impl std::fmt::Debug for Rpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Rpc({})", self.inner.me)
    }
}

impl Rpc {
    pub(crate) fn new(
        me: &str,
        transport: Arc<Transport>,
        membership: MembershipHandle,
        timeout: Duration,
    ) -> Self {
        Rpc {
            inner: Arc::new(RpcInner {
                me: me.to_string(),
                transport,
                membership,
                local: OnceLock::new(),
                timeout,
            }),
        }
    }

    pub(crate) fn set_local(&self, h: Weak<dyn Handler>) {
        let _ = self.inner.local.set(h);
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.inner.me
    }

    /// The default deadline of a call.
    pub fn default_timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// Call plugin `A` on `node` with the default deadline.
    pub async fn call<A: Api>(
        &self,
        node: &str,
        req: &A::Request,
    ) -> Result<A::Response, RpcError> {
        self.call_with_timeout::<A>(node, req, self.inner.timeout)
            .await
    }

    /// Call plugin `A` on `node` with an explicit deadline.
    pub async fn call_with_timeout<A: Api>(
        &self,
        node: &str,
        req: &A::Request,
        timeout: Duration,
    ) -> Result<A::Response, RpcError> {
        let body = codec::encode(req)?;
        let out = self.call_raw(node, A::NAME, body, timeout).await?;
        Ok(codec::decode(&out)?)
    }

    /// Call a plugin by name with an encoded body.
    pub async fn call_raw(
        &self,
        node: &str,
        plugin: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, RpcError> {
        let timeout = budget(timeout);
        if timeout.is_zero() {
            return Err(RpcError::Timeout(0));
        }
        let req = RpcRequest {
            plugin: plugin.to_string(),
            caller: self.inner.me.clone(),
            timeout_ms: timeout.as_millis() as u64,
            traceparent: next_traceparent(),
            body,
        };
        if node == self.inner.me {
            let h = self
                .inner
                .local
                .get()
                .and_then(Weak::upgrade)
                .ok_or_else(|| RpcError::Unreachable("local node is shutting down".into()))?;
            let caller = Caller::Node(self.inner.me.clone());
            return match tokio::time::timeout(timeout, h.handle(caller, req)).await {
                Ok(r) => r,
                Err(_) => Err(RpcError::Timeout(timeout.as_millis() as u64)),
            };
        }
        let addr =
            self.inner.membership.rpc_addr(node).ok_or_else(|| {
                RpcError::Unreachable(format!("node `{node}` is not a known member"))
            })?;
        self.inner.transport.request(node, addr, req, timeout).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_are_w3c_and_continue_the_current_trace() {
        let well_formed = |t: &str| {
            let parts: Vec<&str> = t.split('-').collect();
            parts.len() == 4
                && parts[0] == "00"
                && parts[1].len() == 32
                && parts[2].len() == 16
                && parts[3] == "01"
                && parts[1..3].iter().all(|p| {
                    p.bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                })
        };
        let fresh = next_traceparent();
        assert!(well_formed(&fresh), "{fresh}");
        assert_ne!(fresh, next_traceparent());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        let scope = Scope::new(fresh.clone(), Duration::from_secs(1));
        let child = rt.block_on(in_scope(scope, async { next_traceparent() }));
        assert!(well_formed(&child), "{child}");
        assert_eq!(child[3..35], fresh[3..35], "same trace id");
        assert_ne!(child[36..52], fresh[36..52], "new span id");
    }
}
