//! `wal` (design 40): each node's own write-ahead log, served. The log itself is the runtime's
//! [`dsys_runtime::storage::Wal`] (segments, CRC32C records, group commit, checkpoints,
//! torn-tail recovery); this crate opens it under the plugin's data folder and answers
//! `dsys wal append/read/verify/checkpoint/stats` for it, forwarding to another node's log
//! when asked with `--node`. [`bench`] measures it beside a plain write + fdatasync loop.
#![warn(missing_docs, unreachable_pub)]

mod api;
pub mod bench;

use std::time::Duration;

use dsys_runtime::storage::{SyncPolicy, Wal, WalConfig, WalError, WalRecovery};
use dsys_runtime::{Caller, Plugin, PluginContext, RpcError};
use serde::{Deserialize, Serialize};

pub use api::{
    Entry, WalApi, WalCommand, WalRequest, WalResponse, KIND_TEXT, MAX_READ_LIMIT, MAX_TEXT_BYTES,
};

/// `[plugins.wal]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WalPluginConfig {
    /// Segment size in bytes (default 64 MiB).
    pub segment_bytes: u64,
    /// `batch` (group commit, the default), `always` or `interval`.
    pub sync: String,
    /// Fsync period for `sync = "interval"`, in milliseconds.
    pub sync_interval_ms: u64,
    /// Largest record accepted, in bytes (default 4 MiB).
    pub max_record_bytes: u32,
}

impl Default for WalPluginConfig {
    fn default() -> Self {
        WalPluginConfig {
            segment_bytes: dsys_runtime::storage::DEFAULT_SEGMENT_BYTES,
            sync: "batch".into(),
            sync_interval_ms: 10,
            max_record_bytes: dsys_runtime::storage::DEFAULT_MAX_RECORD_BYTES,
        }
    }
}

impl WalPluginConfig {
    /// The log configuration for folder `dir`.
    pub fn wal_config(&self, dir: std::path::PathBuf) -> Result<WalConfig, String> {
        let sync = match self.sync.as_str() {
            "batch" => SyncPolicy::Batch,
            "always" => SyncPolicy::Always,
            "interval" => SyncPolicy::Interval(Duration::from_millis(self.sync_interval_ms)),
            other => {
                return Err(format!(
                    "plugins.wal.sync: `{other}` is not one of batch, always, interval"
                ))
            }
        };
        Ok(WalConfig {
            dir,
            segment_bytes: self.segment_bytes,
            sync,
            max_record_bytes: self.max_record_bytes,
        })
    }
}

/// The plugin instance: this node's log.
#[derive(Debug)]
pub struct WalPlugin {
    ctx: PluginContext,
    wal: Wal,
    recovery: WalRecovery,
}

fn to_rpc(e: WalError) -> RpcError {
    match e {
        WalError::RecordTooLarge { .. }
        | WalError::InvalidArgument(_)
        | WalError::Truncated { .. } => RpcError::Refused(e.to_string()),
        other => RpcError::Internal(other.to_string()),
    }
}

#[async_trait::async_trait]
impl Plugin for WalPlugin {
    type Api = WalApi;

    async fn start(ctx: PluginContext) -> Result<Self, String> {
        let config: WalPluginConfig = ctx.plugin_config("wal").map_err(|e| e.to_string())?;
        let cfg = config.wal_config(ctx.data_dir.clone())?;
        let (wal, recovery) = Wal::open(cfg).await.map_err(|e| e.to_string())?;
        if recovery.truncated_bytes > 0 {
            tracing::warn!(cut = ?recovery.cut, bytes = recovery.truncated_bytes,
                dropped = ?recovery.dropped_segments, "wal: recovery cut a torn or corrupt tail");
        }
        tracing::info!(
            first = recovery.first_lsn,
            last = recovery.last_lsn,
            segments = recovery.segments,
            "wal: recovered"
        );
        ctx.metrics.describe(
            "dsys_wal_appends_total",
            "counter",
            "Records appended to the node's WAL through the wal plugin",
        );
        ctx.metrics.add("dsys_wal_appends_total", &[], 0);
        Ok(WalPlugin { ctx, wal, recovery })
    }

    async fn handle(&self, _caller: Caller, req: WalRequest) -> Result<WalResponse, RpcError> {
        let me = self.ctx.node_id.clone();
        if let Some(n) = req.node() {
            if n != me {
                if !self.ctx.config.nodes.contains_key(n) {
                    return Err(RpcError::Refused(format!("unknown node `{n}`")));
                }
                let n = n.to_string();
                return self.ctx.rpc.call::<WalApi>(&n, &req.local()).await;
            }
        }
        match req.local() {
            WalRequest::Append { text, .. } => {
                if text.len() > MAX_TEXT_BYTES {
                    return Err(RpcError::Refused(format!(
                        "text of {} bytes exceeds {MAX_TEXT_BYTES}",
                        text.len()
                    )));
                }
                let lsn = self
                    .wal
                    .append(KIND_TEXT, text.into_bytes())
                    .await
                    .map_err(to_rpc)?;
                self.ctx.metrics.add("dsys_wal_appends_total", &[], 1);
                Ok(WalResponse::Appended { node: me, lsn })
            }
            WalRequest::Read { from, limit, .. } => {
                if limit == 0 || limit > MAX_READ_LIMIT {
                    return Err(RpcError::Refused(format!(
                        "--limit must be 1..={MAX_READ_LIMIT}"
                    )));
                }
                let wal = self.wal.clone();
                let (entries, next) = tokio::task::spawn_blocking(move || {
                    let mut out = Vec::new();
                    for r in wal.read_from(from)?.take(limit as usize + 1) {
                        let r = r?;
                        out.push(Entry {
                            lsn: r.lsn,
                            kind: r.kind,
                            bytes: r.payload.len(),
                            text: String::from_utf8_lossy(&r.payload).into_owned(),
                        });
                    }
                    let next = if out.len() > limit as usize {
                        out.pop().map(|e| e.lsn)
                    } else {
                        None
                    };
                    Ok::<_, WalError>((out, next))
                })
                .await
                .map_err(|e| RpcError::Internal(e.to_string()))?
                .map_err(to_rpc)?;
                Ok(WalResponse::Records {
                    node: me,
                    entries,
                    next,
                })
            }
            WalRequest::Verify { .. } => {
                let wal = self.wal.clone();
                let report = tokio::task::spawn_blocking(move || wal.verify())
                    .await
                    .map_err(|e| RpcError::Internal(e.to_string()))?
                    .map_err(to_rpc)?;
                Ok(WalResponse::Verify { node: me, report })
            }
            WalRequest::Checkpoint { upto, .. } => {
                let upto = upto.unwrap_or_else(|| self.wal.next_lsn());
                let info = self.wal.checkpoint(upto).await.map_err(to_rpc)?;
                Ok(WalResponse::Checkpoint { node: me, info })
            }
            WalRequest::Stats { .. } => Ok(WalResponse::Stats {
                node: me,
                stats: self.wal.stats(),
                recovery: self.recovery.clone(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsys_runtime::Render;

    #[test]
    fn config_parses_policies_and_refuses_unknown_ones() {
        let mut c = WalPluginConfig::default();
        let d = std::path::PathBuf::from("/x");
        assert_eq!(
            c.wal_config(d.clone()).map(|w| w.sync),
            Ok(SyncPolicy::Batch)
        );
        c.sync = "interval".into();
        c.sync_interval_ms = 5;
        assert_eq!(
            c.wal_config(d.clone()).map(|w| w.sync),
            Ok(SyncPolicy::Interval(Duration::from_millis(5)))
        );
        c.sync = "sometimes".into();
        assert!(c.wal_config(d).is_err());
    }

    #[test]
    fn commands_build_requests_and_forwarding_strips_the_node() {
        let c = WalCommand::Read {
            from: 5,
            limit: 7,
            node: Some("n2".into()),
        };
        let r = c.request();
        assert_eq!(r.node(), Some("n2"));
        assert_eq!(
            r.local(),
            WalRequest::Read {
                node: None,
                from: 5,
                limit: 7
            }
        );
    }

    #[test]
    fn damaged_verify_exits_non_zero() {
        let ok = WalResponse::Verify {
            node: "n1".into(),
            report: dsys_runtime::storage::WalVerify {
                segments: 1,
                records: 3,
                payload_bytes: 9,
                first_lsn: 1,
                last_lsn: 3,
                error: None,
            },
        };
        assert_eq!(ok.exit_code(), 0);
        assert!(ok.human().starts_with("OK"));
        let WalResponse::Verify { node, mut report } = ok else {
            unreachable!()
        };
        report.error = Some("CRC mismatch".into());
        let bad = WalResponse::Verify { node, report };
        assert_eq!(bad.exit_code(), 1);
    }
}
