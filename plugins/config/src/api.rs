//! Wire types of the `config` plugin and the `dsys config` subcommand.

use dsys_runtime::Render;
use serde::{Deserialize, Serialize};

use crate::layout::{Entry, Op};

dsys_runtime::plugin_api!(ConfigApi, "config", ConfigRequest, ConfigResponse);

/// Most keys one `list` returns.
pub const MAX_LIST: u32 = 10_000;
/// Longest wait of one watch poll.
pub const MAX_WATCH_WAIT_MS: u64 = 30_000;

/// Requests. Reads (get, list, history, watch, schema list) are served to the read-only
/// certificate too; writes only to the admin certificate and to nodes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ConfigRequest {
    /// A key's value: the current one, or the one it had at a revision.
    Get {
        /// Key.
        key: String,
        /// Read the value in force at this revision (from the key's history).
        revision: Option<u64>,
    },
    /// Current keys under a prefix.
    List {
        /// Prefix ("" for every key).
        prefix: String,
        /// Most keys returned.
        limit: u32,
    },
    /// A key's kept history, oldest first.
    History {
        /// Key.
        key: String,
        /// Most (latest) entries returned.
        limit: u32,
    },
    /// Changes under a prefix from a revision on; waits up to `wait_ms` for the first.
    Watch {
        /// Prefix ("" for every key).
        prefix: String,
        /// First revision wanted (0: from the next one).
        from_revision: u64,
        /// Long-poll wait.
        wait_ms: u64,
    },
    /// Declared types.
    SchemaList,
    /// Set a key (validated against its prefix's type).
    Put {
        /// Key.
        key: String,
        /// Value.
        value: String,
        /// Only if the key is still at this revision (0: only if it does not exist).
        if_revision: Option<u64>,
    },
    /// Delete a key (its history stays).
    Delete {
        /// Key.
        key: String,
        /// Only if the key is still at this revision.
        if_revision: Option<u64>,
    },
    /// Write the value a key had at an earlier revision as a new revision.
    Rollback {
        /// Key.
        key: String,
        /// The revision whose value to restore.
        to_revision: u64,
    },
    /// Declare the type of the values under a prefix.
    SchemaSet {
        /// Prefix.
        prefix: String,
        /// Type, e.g. `int:1..100` (see `dsys config schema set --help`).
        value_type: String,
    },
    /// Remove a prefix's declared type.
    SchemaDelete {
        /// Prefix.
        prefix: String,
    },
}

impl ConfigRequest {
    /// Whether this request only reads (the read-only certificate may send it).
    pub fn is_read(&self) -> bool {
        matches!(
            self,
            ConfigRequest::Get { .. }
                | ConfigRequest::List { .. }
                | ConfigRequest::History { .. }
                | ConfigRequest::Watch { .. }
                | ConfigRequest::SchemaList
        )
    }
}

/// A current key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// Key.
    pub key: String,
    /// Value.
    pub value: String,
    /// Revision of its last write.
    pub revision: u64,
}

/// One write of a key, from its history or a watch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// Revision of the write.
    pub revision: u64,
    /// Key.
    pub key: String,
    /// What was written, by whom and when (the stored history entry).
    pub entry: Entry,
}

/// A declared type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaEntry {
    /// Prefix.
    pub prefix: String,
    /// Type spec.
    pub value_type: String,
    /// Declared by the system (cannot be changed).
    pub builtin: bool,
}

/// Answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ConfigResponse {
    /// A key's value (`None`: absent).
    Value {
        /// Key.
        key: String,
        /// Value.
        value: Option<String>,
        /// Revision of its last write (current reads; 0 when absent).
        revision: u64,
        /// The revision asked for, for reads in the past.
        at: Option<u64>,
    },
    /// Keys under a prefix.
    List {
        /// Keys in key order.
        items: Vec<Item>,
        /// More keys matched than returned.
        more: bool,
        /// Revision read.
        revision: u64,
    },
    /// A key's history, oldest first.
    History {
        /// Key.
        key: String,
        /// Writes.
        changes: Vec<Change>,
        /// Whether older entries were trimmed (only the latest are kept).
        trimmed: bool,
    },
    /// Watch results.
    Changes {
        /// Writes in revision order.
        changes: Vec<Change>,
        /// Ask from this revision next.
        next_revision: u64,
    },
    /// A write committed.
    Written {
        /// Key.
        key: String,
        /// Put or delete.
        op: Op,
        /// Revision of the write.
        revision: u64,
        /// The value before.
        prev: Option<String>,
    },
    /// Declared types.
    Schemas(Vec<SchemaEntry>),
    /// A schema change committed.
    SchemaChanged {
        /// Prefix.
        prefix: String,
        /// New type (`None`: removed).
        value_type: Option<String>,
        /// Revision.
        revision: u64,
    },
}

/// A time in ms since the epoch, as RFC 3339 (UTC, seconds).
pub fn time_text(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn opt(v: &Option<String>) -> &str {
    v.as_deref().unwrap_or("(none)")
}

/// One change as a line: `[rev 12] 2026-01-01T00:00:00Z PUT key: old -> new (by n1/admin)`.
pub fn change_line(c: &Change) -> String {
    let e = &c.entry;
    let what = match e.op {
        Op::Put => format!("PUT {}: {} -> {}", c.key, opt(&e.prev), opt(&e.value)),
        Op::Delete => format!("DEL {}: {} -> (deleted)", c.key, opt(&e.prev)),
    };
    let rb = e
        .rollback_of
        .map(|r| format!(", rollback to rev {r}"))
        .unwrap_or_default();
    format!(
        "[rev {}] {} {what}  (by {}{rb})",
        c.revision,
        time_text(e.time_ms),
        e.by
    )
}

impl Render for ConfigResponse {
    fn human(&self) -> String {
        match self {
            ConfigResponse::Value {
                key,
                value: Some(v),
                revision,
                at: None,
            } => format!("{v}\n(key {key}, revision {revision})"),
            ConfigResponse::Value {
                key,
                value: Some(v),
                at: Some(at),
                ..
            } => format!("{v}\n(key {key} as of revision {at})"),
            ConfigResponse::Value { key, at, .. } => match at {
                Some(at) => format!("(not found: {key} did not exist at revision {at})"),
                None => format!("(not found: {key})"),
            },
            ConfigResponse::List {
                items,
                more,
                revision,
            } => {
                let mut s: String = items
                    .iter()
                    .map(|i| format!("{} = {}  (rev {})\n", i.key, i.value, i.revision))
                    .collect();
                if *more {
                    s.push_str("... more keys match (raise --limit)\n");
                }
                s.push_str(&format!("{} key(s) at revision {revision}", items.len()));
                s
            }
            ConfigResponse::History {
                key,
                changes,
                trimmed,
            } => {
                if changes.is_empty() {
                    return format!("(no history for {key})");
                }
                let mut s: String = changes.iter().map(|c| change_line(c) + "\n").collect();
                if *trimmed {
                    s.push_str("(older entries were trimmed: plugins.config.history)\n");
                }
                s
            }
            ConfigResponse::Changes { changes, .. } => {
                changes.iter().map(|c| change_line(c) + "\n").collect()
            }
            ConfigResponse::Written {
                key,
                op,
                revision,
                prev,
            } => match op {
                Op::Put => format!("OK {key} at revision {revision} (was {})", opt(prev)),
                Op::Delete => format!("deleted {key} at revision {revision} (was {})", opt(prev)),
            },
            ConfigResponse::Schemas(v) => {
                if v.is_empty() {
                    return "(no types declared: every value is a string)".into();
                }
                v.iter()
                    .map(|e| {
                        format!(
                            "{:<32} {}{}\n",
                            if e.prefix.is_empty() {
                                "(all keys)"
                            } else {
                                &e.prefix
                            },
                            e.value_type,
                            if e.builtin { "  (built in)" } else { "" }
                        )
                    })
                    .collect()
            }
            ConfigResponse::SchemaChanged {
                prefix,
                value_type,
                revision,
            } => match value_type {
                Some(t) => format!("values under `{prefix}` are now {t} (revision {revision})"),
                None => format!("`{prefix}` has no declared type any more (revision {revision})"),
            },
        }
    }

    fn exit_code(&self) -> i32 {
        match self {
            ConfigResponse::Value { value: None, .. } => 1,
            _ => 0,
        }
    }
}

/// `dsys config ...`
#[derive(Debug, Clone, clap::Subcommand)]
pub enum ConfigCommand {
    /// Print a key's value (exit 1 if it does not exist).
    Get {
        /// Key.
        key: String,
        /// The value it had at this revision.
        #[arg(long)]
        revision: Option<u64>,
    },
    /// Set a key; refused (exit 1, nothing stored) unless the type declared for its prefix
    /// accepts the value. Rate-limit rules: `ratelimit/rules/NAME
    /// '{"algorithm":"token_bucket","limit":10,"window_ms":60000}'`.
    Put {
        /// Key: `/`-separated segments of letters, digits, `_ . : -`.
        key: String,
        /// Value.
        value: String,
        /// Compare-and-set: only if the key is still at this revision (0: does not exist).
        #[arg(long)]
        if_revision: Option<u64>,
    },
    /// Delete a key (its history stays).
    Del {
        /// Key.
        key: String,
        /// Only if the key is still at this revision.
        #[arg(long)]
        if_revision: Option<u64>,
    },
    /// List the keys under a prefix.
    List {
        /// Prefix (default: every key).
        #[arg(default_value = "")]
        prefix: String,
        /// Most keys.
        #[arg(long, default_value_t = 1000)]
        limit: u32,
    },
    /// A key's revisions, with values and times.
    History {
        /// Key.
        key: String,
        /// Most (latest) entries.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Write the value KEY had at revision --to as a new revision.
    Rollback {
        /// Key.
        key: String,
        /// Revision to go back to (see `dsys config history KEY`).
        #[arg(long)]
        to: u64,
    },
    /// Stream changes under a prefix (revision, key, old -> new) until Ctrl-C.
    Watch {
        /// Prefix (default: every key).
        #[arg(default_value = "")]
        prefix: String,
        /// Start from this revision (default: from now).
        #[arg(long, default_value_t = 0)]
        from: u64,
    },
    /// Declared value types per prefix.
    #[command(subcommand)]
    Schema(SchemaCommand),
}

/// `dsys config schema ...`
#[derive(Debug, Clone, clap::Subcommand)]
pub enum SchemaCommand {
    /// Declare the type of values under PREFIX (the longest declared prefix of a key wins):
    /// string, int, int:MIN..MAX (either bound optional), bool, duration, json, enum:A,B,C,
    /// ratelimit-rule. Refused if a value already under PREFIX does not fit.
    Set {
        /// Prefix.
        prefix: String,
        /// Type.
        #[arg(value_name = "TYPE")]
        value_type: String,
    },
    /// List the declared types.
    List,
    /// Remove a prefix's declared type.
    Del {
        /// Prefix.
        prefix: String,
    },
}

impl ConfigCommand {
    /// The request this command sends (`watch` sends it repeatedly, see [`crate::watch`]).
    pub fn request(&self) -> ConfigRequest {
        match self.clone() {
            ConfigCommand::Get { key, revision } => ConfigRequest::Get { key, revision },
            ConfigCommand::Put {
                key,
                value,
                if_revision,
            } => ConfigRequest::Put {
                key,
                value,
                if_revision,
            },
            ConfigCommand::Del { key, if_revision } => ConfigRequest::Delete { key, if_revision },
            ConfigCommand::List { prefix, limit } => ConfigRequest::List { prefix, limit },
            ConfigCommand::History { key, limit } => ConfigRequest::History { key, limit },
            ConfigCommand::Rollback { key, to } => ConfigRequest::Rollback {
                key,
                to_revision: to,
            },
            ConfigCommand::Watch { prefix, from } => ConfigRequest::Watch {
                prefix,
                from_revision: from,
                wait_ms: 0,
            },
            ConfigCommand::Schema(SchemaCommand::Set { prefix, value_type }) => {
                ConfigRequest::SchemaSet { prefix, value_type }
            }
            ConfigCommand::Schema(SchemaCommand::List) => ConfigRequest::SchemaList,
            ConfigCommand::Schema(SchemaCommand::Del { prefix }) => {
                ConfigRequest::SchemaDelete { prefix }
            }
        }
    }

    /// For `watch`: the prefix and the starting revision.
    pub fn watch_args(&self) -> Option<(String, u64)> {
        match self {
            ConfigCommand::Watch { prefix, from } => Some((prefix.clone(), *from)),
            _ => None,
        }
    }
}
