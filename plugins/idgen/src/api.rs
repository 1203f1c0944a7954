//! Wire types of the `idgen` plugin and the `dsys id` subcommand.

use dsys_runtime::{Render, RpcError};
use serde::{Deserialize, Serialize};

use crate::generator::{GenStats, IdRun};
use crate::layout::{decode, Parts};
use crate::worker::LeaseInfo;

dsys_runtime::plugin_api!(IdgenApi, "idgen", IdRequest, IdResponse);

/// Most ids one request may ask for.
pub const MAX_BATCH: u32 = 100_000;

/// Requests. Every node serves them from its own generator (no forwarding): a node that holds
/// no worker id lease answers with a retryable error.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum IdRequest {
    /// `n` new ids (1..=[`MAX_BATCH`]).
    Next {
        /// How many.
        n: u32,
    },
    /// This node's worker id, lease and counts.
    Status,
}

/// A batch of ids from one node, in increasing order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdBatch {
    /// Node that made them.
    pub node: String,
    /// Runs of consecutive ids (one per millisecond the batch spans).
    pub runs: Vec<IdRun>,
}

impl IdBatch {
    /// Every id, in increasing order.
    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.runs.iter().flat_map(|r| r.ids())
    }

    /// How many ids.
    pub fn len(&self) -> u64 {
        self.runs.iter().map(|r| u64::from(r.count)).sum()
    }

    /// Whether it holds no id.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One node's generator, as `dsys id status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdStatus {
    /// Node.
    pub node: String,
    /// Its lease of a worker id.
    pub lease: LeaseInfo,
    /// Milliseconds until the lease must be renewed to keep issuing (0: not issuing).
    pub issuing_for_ms: u64,
    /// Generator counts.
    pub stats: GenStats,
}

/// Answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum IdResponse {
    /// New ids.
    Ids(IdBatch),
    /// Status.
    Status(IdStatus),
}

impl IdRequest {
    /// Refuse bad input before the generator sees it.
    pub fn validate(&self) -> Result<(), RpcError> {
        match self {
            IdRequest::Next { n } if *n == 0 || *n > MAX_BATCH => Err(RpcError::refused(format!(
                "ids per request must be 1..={MAX_BATCH}, got {n}"
            ))),
            _ => Ok(()),
        }
    }
}

/// RFC 3339 UTC with milliseconds.
pub fn rfc3339_ms(unix_ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms);
    humantime::format_rfc3339_millis(t).to_string()
}

fn status_text(s: &IdStatus) -> String {
    let l = &s.lease;
    let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
    format!(
        "node           {}\nstate          {}\nworker id      {}\nlease          {}\nclaim revision {}\nhigh-water     {}\nissuing for    {} ms\nids issued     {}\nclock back     {} (refused {})\nnext-ms waits  {}\nleases         {} acquired, {} lost\nlast problem   {}\n",
        s.node,
        l.state,
        l.worker.map(|w| w.to_string()).unwrap_or_else(|| "-".into()),
        opt(l.lease),
        opt(l.claim_revision),
        l.high_water_unix_ms
            .map(|m| format!("{} ({m})", rfc3339_ms(m)))
            .unwrap_or_else(|| "-".into()),
        s.issuing_for_ms,
        s.stats.issued,
        s.stats.clock_backwards,
        s.stats.clock_refusals,
        s.stats.overflow_waits,
        l.acquired,
        l.lost,
        l.last_error.as_deref().unwrap_or("-"),
    )
}

impl Render for IdResponse {
    fn human(&self) -> String {
        match self {
            IdResponse::Ids(b) => {
                let mut out = String::with_capacity(b.len() as usize * 20);
                for id in b.ids() {
                    out.push_str(&id.to_string());
                    out.push('\n');
                }
                out
            }
            IdResponse::Status(s) => status_text(s),
        }
    }
}

/// The JSON `dsys --json id ...` prints: ids as a list (not runs).
pub fn response_json(r: &IdResponse) -> serde_json::Value {
    match r {
        IdResponse::Ids(b) => serde_json::json!({
            "node": b.node,
            "ids": b.ids().collect::<Vec<u64>>(),
        }),
        IdResponse::Status(s) => serde_json::to_value(s).unwrap_or_default(),
    }
}

/// An id taken apart, as `dsys id decode` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decoded {
    /// The id.
    pub id: u64,
    /// Timestamp, RFC 3339 UTC.
    pub time: String,
    /// Timestamp, Unix ms.
    pub unix_ms: u64,
    /// Milliseconds since the custom epoch.
    pub epoch_ms: u64,
    /// Worker id.
    pub worker: u16,
    /// Sequence.
    pub sequence: u32,
}

/// Parse and take apart an id typed by a user (decimal); a clear error for anything else.
pub fn decode_arg(s: &str) -> Result<Decoded, String> {
    let t = s.trim();
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("`{s}` is not an id: expected a decimal number"));
    }
    let id: u64 = t
        .parse()
        .map_err(|_| format!("`{s}` is not an id: larger than 64 bits"))?;
    let Parts { time, worker, seq } = decode(id).map_err(|e| e.to_string())?;
    let unix_ms = time + crate::layout::EPOCH_UNIX_MS;
    Ok(Decoded {
        id,
        time: rfc3339_ms(unix_ms),
        unix_ms,
        epoch_ms: time,
        worker,
        sequence: seq,
    })
}

/// `dsys id ...`
#[derive(clap::Subcommand, Debug, Clone)]
pub enum IdCommand {
    /// New unique ids from the node that answers, one per line.
    Next {
        /// How many (1..=100000).
        #[arg(short = 'n', long = "count", default_value_t = 1,
              value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_BATCH)))]
        n: u32,
    },
    /// Take an id apart: timestamp (RFC 3339 UTC and ms), worker id, sequence. Offline.
    Decode {
        /// The id (decimal).
        id: String,
    },
    /// The answering node's worker id, lease, high-water mark and counts.
    Status,
}

impl IdCommand {
    /// For commands that need no cluster (`decode`): the text to print, or a usage error.
    pub fn offline(&self, json: bool) -> Option<Result<String, String>> {
        let IdCommand::Decode { id } = self else {
            return None;
        };
        Some(decode_arg(id).map(|d| {
            if json {
                serde_json::to_string_pretty(&d).unwrap_or_default()
            } else {
                format!(
                    "id        {}\ntime      {} ({} ms since the Unix epoch, {} since 2024-01-01)\nworker    {}\nsequence  {}",
                    d.id, d.time, d.unix_ms, d.epoch_ms, d.worker, d.sequence
                )
            }
        }))
    }

    /// The request this command sends.
    pub fn request(&self) -> Result<IdRequest, String> {
        let r = match self {
            IdCommand::Next { n } => IdRequest::Next { n: *n },
            IdCommand::Status => IdRequest::Status,
            IdCommand::Decode { .. } => return Err("`id decode` sends no request".into()),
        };
        r.validate().map_err(|e| e.to_string())?;
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{encode, EPOCH_UNIX_MS};
    use clap::Parser;

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        cmd: IdCommand,
    }

    #[test]
    fn decode_prints_parts_and_refuses_garbage() {
        let id = encode(Parts {
            time: 86_400_000,
            worker: 513,
            seq: 42,
        })
        .expect("id");
        let d = decode_arg(&id.to_string()).expect("decodes");
        assert_eq!(d.time, "2024-01-02T00:00:00.000Z");
        assert_eq!(d.unix_ms, EPOCH_UNIX_MS + 86_400_000);
        assert_eq!((d.worker, d.sequence), (513, 42));
        for bad in [
            "",
            "abc",
            "-5",
            "1.5",
            "0x10",
            "18446744073709551616",
            "9223372036854775808",
        ] {
            assert!(decode_arg(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn cli_bounds_the_batch() {
        let c = Cli::try_parse_from(["id", "next", "-n", "100000"]).expect("parse");
        assert!(matches!(
            c.cmd.request(),
            Ok(IdRequest::Next { n: 100_000 })
        ));
        assert!(Cli::try_parse_from(["id", "next", "-n", "100001"]).is_err());
        assert!(Cli::try_parse_from(["id", "next", "-n", "0"]).is_err());
        assert!(IdRequest::Next { n: 0 }.validate().is_err());
        assert!(IdRequest::Next { n: MAX_BATCH + 1 }.validate().is_err());
        let c = Cli::try_parse_from(["id", "decode", "nope"]).expect("parse");
        assert!(matches!(c.cmd.offline(false), Some(Err(_))));
    }
}
