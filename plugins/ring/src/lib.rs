//! `ring` (design 45): the runtime's consistent-hash ring, served. Any node answers from its
//! own membership view; the ring itself lives in `dsys_runtime::Ring`, rebuilt by membership
//! whenever the set of alive, authenticated members changes.
#![warn(missing_docs, unreachable_pub)]

mod api;

pub use api::{RingApi, RingCommand, RingRequest, RingResponse, MAX_KEY_BYTES, MAX_SAMPLE};

use dsys_runtime::{Caller, Plugin, PluginContext, RpcError};

/// The plugin instance.
#[derive(Debug)]
pub struct RingPlugin {
    ctx: PluginContext,
}

#[async_trait::async_trait]
impl Plugin for RingPlugin {
    type Api = RingApi;

    /// Lookups and statistics only read the ring.
    fn read_only(_req: &RingRequest) -> bool {
        true
    }

    async fn start(ctx: PluginContext) -> Result<Self, String> {
        Ok(RingPlugin { ctx })
    }

    async fn handle(&self, _caller: Caller, req: RingRequest) -> Result<RingResponse, RpcError> {
        let ring = self.ctx.ring();
        let me = self.ctx.node_id.clone();
        match req {
            RingRequest::Lookup { key, replicas } => {
                if key.len() > MAX_KEY_BYTES {
                    return Err(RpcError::Refused(format!(
                        "key longer than {MAX_KEY_BYTES} bytes"
                    )));
                }
                if replicas == 0 || replicas > 64 {
                    return Err(RpcError::Refused("--replicas must be 1..=64".into()));
                }
                let preference = ring.preference_list(key.as_bytes(), replicas);
                let view = self.ctx.membership.view();
                let regions = preference
                    .iter()
                    .filter_map(|n| view.members.get(n).map(|m| (n.clone(), m.region.clone())))
                    .collect();
                Ok(RingResponse::Lookup {
                    hash: dsys_runtime::hash_key(key.as_bytes()),
                    key,
                    preference,
                    regions,
                    answered_by: me,
                })
            }
            RingRequest::Stats { sample } => {
                if sample == 0 || sample > MAX_SAMPLE {
                    return Err(RpcError::Refused(format!(
                        "--sample must be 1..={MAX_SAMPLE}"
                    )));
                }
                // CPU-bound: keep it off the async workers.
                let stats = tokio::task::spawn_blocking(move || ring.stats(sample))
                    .await
                    .map_err(|e| RpcError::Internal(e.to_string()))?;
                Ok(RingResponse::Stats {
                    stats,
                    answered_by: me,
                })
            }
        }
    }
}
