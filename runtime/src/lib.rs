//! dsys-runtime: everything a plugin may use and nothing design-specific.
//!
//! Gossip membership ([`membership`]), a mutual-TLS QUIC transport with fault injection
//! ([`transport`]), typed RPC between plugin instances ([`rpc`]), the supervised plugin host
//! ([`plugin`]), the consistent-hash ring ([`ring`]), configuration ([`config`]), the client
//! used by the CLI and tests ([`client`]) and the HTTP gateway ([`gateway`]).
#![warn(missing_docs, unreachable_pub)]

mod client;
pub mod codec;
mod config;
mod dashboard;
mod faults;
mod gateway;
mod membership;
mod merkle;
mod metrics;
mod node;
mod plugin;
pub mod process;
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
pub use metrics::{percentile, Histogram, Metrics, RateMeter};
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

/// Test-only helpers (feature `testsuite`): an in-process cluster of real nodes running any
/// set of plugins, condition waits with deadlines, and raw access to the wire.
#[cfg(feature = "testsuite")]
pub mod testkit;
