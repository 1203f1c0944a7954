//! The openraft type configuration, node ids, and the byte encoding of what goes to disk.

use std::io::Cursor;

use openraft::BasicNode;
use serde::{de::DeserializeOwned, Serialize};

use crate::state::{CmdResult, Command};

openraft::declare_raft_types!(
    /// openraft types of this plugin: commands in, results out, nodes named by their id.
    pub TypeConfig:
        D = Command,
        R = CmdResult,
        NodeId = u64,
        Node = BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The Raft instance.
pub(crate) type Raft = openraft::Raft<TypeConfig>;
/// A log entry.
pub(crate) type Entry = openraft::Entry<TypeConfig>;
/// A log id.
pub(crate) type LogId = openraft::LogId<u64>;
/// A vote.
pub(crate) type Vote = openraft::Vote<u64>;
/// A storage error.
pub(crate) type StorageError = openraft::StorageError<u64>;

/// The Raft id of a dsys node: FNV-1a (64 bit) of its name. Stable across versions and
/// platforms; collisions among a cluster's voters are refused at start.
pub fn raft_id(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Encode for disk (the runtime's codec: bincode with a version byte).
pub(crate) fn to_bytes<T: Serialize>(v: &T) -> Result<Vec<u8>, String> {
    dsys_runtime::encode(v).map_err(|e| e.to_string())
}

/// Decode what [`to_bytes`] wrote.
pub(crate) fn from_bytes<T: DeserializeOwned>(b: &[u8]) -> Result<T, String> {
    dsys_runtime::decode(b).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload, Membership};
    use std::collections::{BTreeMap, BTreeSet};

    #[test]
    fn ids_are_stable_and_distinct() {
        assert_eq!(raft_id("n1"), raft_id("n1"));
        let ids: BTreeSet<u64> = (1..=100).map(|i| raft_id(&format!("n{i}"))).collect();
        assert_eq!(ids.len(), 100);
    }

    /// openraft's serde types survive the runtime's bincode codec (no `deserialize_any`).
    #[test]
    fn openraft_types_roundtrip_through_the_codec() {
        let log_id = LogId::new(CommittedLeaderId::new(3, 7), 42);
        let e = Entry {
            log_id,
            payload: EntryPayload::Normal(Command::Put {
                key: "k".into(),
                value: "v".into(),
                lease: Some(1),
            }),
        };
        let back: Entry = from_bytes(&to_bytes(&e).expect("enc")).expect("dec");
        assert_eq!(back.log_id, e.log_id);
        let nodes: BTreeMap<u64, BasicNode> =
            [(1, BasicNode::new("n1")), (2, BasicNode::new("n2"))].into();
        let m = Membership::new(vec![[1u64, 2].into()], nodes);
        let e2 = Entry {
            log_id,
            payload: EntryPayload::Membership(m),
        };
        let back: Entry = from_bytes(&to_bytes(&e2).expect("enc")).expect("dec");
        assert!(matches!(back.payload, EntryPayload::Membership(_)));
        let v = Vote::new(4, 9);
        let back: Vote = from_bytes(&to_bytes(&v).expect("enc")).expect("dec");
        assert_eq!(back, v);
        let err: openraft::error::RaftError<u64> =
            openraft::error::RaftError::Fatal(openraft::error::Fatal::Stopped);
        let back: openraft::error::RaftError<u64> =
            from_bytes(&to_bytes(&err).expect("enc")).expect("dec");
        assert_eq!(back.to_string(), err.to_string());
    }

    /// A shared batch is encoded as the plain list it was before it was shared, so logs
    /// written before still replay: the bytes after the variant tag are the list's own.
    #[test]
    fn a_batch_encodes_as_a_plain_list() {
        let cmds = vec![
            Command::Put {
                key: "a".into(),
                value: "1".into(),
                lease: None,
            },
            Command::Delete {
                key: "b".into(),
                prefix: false,
            },
        ];
        let batch = to_bytes(&Command::Batch(std::sync::Arc::new(cmds.clone()))).expect("enc");
        let list = to_bytes(&cmds).expect("enc");
        assert!(batch.len() > list.len() && batch.ends_with(&list));
        let back: Command = from_bytes(&batch).expect("dec");
        assert_eq!(back, Command::Batch(std::sync::Arc::new(cmds)));
    }
}
