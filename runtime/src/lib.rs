//! dsys-runtime: everything a plugin may use and nothing design-specific.
//!
//! Gossip membership ([`membership`]), a mutual-TLS QUIC transport with fault injection
//! ([`transport`]), typed RPC between plugin instances ([`rpc`]), the supervised plugin host
//! ([`plugin`]), the consistent-hash ring ([`ring`]), configuration ([`config`]), the client
//! used by the CLI and tests ([`client`]) and the HTTP gateway ([`gateway`]).
#![warn(missing_docs, unreachable_pub)]

mod client;
mod codec;
mod config;
mod dashboard;
mod faults;
mod gateway;
mod membership;
mod merkle;
mod metrics;
mod node;
mod plugin;
mod ring;
mod rpc;
pub mod storage;
mod sys;
mod timeline;
mod tls;
mod transport;

pub use client::{Client, ClientError};
pub use codec::{decode, encode, CodecError, WIRE_VERSION};
pub use config::{ClusterConfig, ClusterSection, ConfigError, NodeConfig};
pub use dashboard::{NodeDashboard, Panel, PanelTable, MAX_PANEL_ROWS};
pub use faults::{FaultCommand, FaultRules, Faults};
pub use membership::{ClusterEvent, ClusterView, Member, MemberState, MembershipHandle};
pub use merkle::MerkleTree;
pub use metrics::{Histogram, Metrics, RateMeter};
pub use node::{Node, NodeOptions};
pub use plugin::{
    plugin_factory, Api, LocalClient, Plugin, PluginContext, PluginFactory, PluginHost,
    PluginStatus, Render,
};
pub use ring::{hash_key, Ring, RingStats};
pub use rpc::{Caller, Rpc, RpcError, RpcRequest};
pub use sys::{ClusterStatus, MemberStatus, SysApi, SysRequest, SysResponse};
pub use timeline::{Timeline, TimelineEvent};
pub use tls::{init_cluster_certs, install_crypto_provider, TlsError, TlsIdentity};
pub use transport::{read_frame, write_frame, Transport, TransportOptions};

/// Re-exported so plugins build HTTP routes with the same axum version as the gateway.
pub use axum;

/// Test-only helpers (feature `testsuite`): raw access to the wire for bad-input tests.
#[cfg(feature = "testsuite")]
pub mod testkit {
    use std::net::SocketAddr;
    use std::time::Duration;

    use crate::{RpcError, TlsIdentity, TransportOptions};

    /// Open a raw bi-stream to the node at `addr` presenting `id`, to write arbitrary bytes.
    pub async fn raw_stream(
        addr: SocketAddr,
        id: &TlsIdentity,
    ) -> Result<(quinn::Endpoint, quinn::SendStream, quinn::RecvStream), RpcError> {
        crate::tls::install_crypto_provider();
        let cfg = crate::transport::client_config(id, &TransportOptions::default())
            .map_err(|e| RpcError::Internal(e.to_string()))?;
        let ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("literal"))
            .map_err(|e| RpcError::Internal(e.to_string()))?;
        let conn = crate::transport::connect(
            &ep,
            cfg,
            addr,
            crate::tls::ANY_NODE_NAME,
            Duration::from_secs(5),
        )
        .await?;
        let (s, r) = conn
            .open_bi()
            .await
            .map_err(|e| RpcError::Unreachable(e.to_string()))?;
        Ok((ep, s, r))
    }

    /// Decode a response frame body as the transport does.
    pub fn decode_response(buf: &[u8]) -> Result<Result<Vec<u8>, RpcError>, RpcError> {
        Ok(crate::codec::decode::<Result<Vec<u8>, RpcError>>(buf)?)
    }
}
