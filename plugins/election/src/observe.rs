//! Who leads an election, followed through watch events (pure). The candidates are the keys
//! under `election/NAME/`; the leader is the one with the lowest create revision. A new key
//! always has a higher create revision than every live one, so the leader changes only when
//! the leader's key goes or when a key appears in an empty election; replaying the events in
//! revision order from a known key set yields every leader in turn.

use std::collections::BTreeMap;

use dsys_plugin_consensus::state::{Event, EventKind, KeyValue};

/// The candidate keys of one election at some revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observer {
    /// Candidates by create revision.
    keys: BTreeMap<u64, KeyValue>,
}

impl Observer {
    /// The candidates read at some revision.
    pub fn new(kvs: Vec<KeyValue>) -> Self {
        Observer {
            keys: kvs.into_iter().map(|kv| (kv.create_revision, kv)).collect(),
        }
    }

    /// The leader: the candidate with the lowest create revision.
    pub fn leader(&self) -> Option<&KeyValue> {
        self.keys.values().next()
    }

    /// Candidates, leader first.
    pub fn candidates(&self) -> impl Iterator<Item = &KeyValue> {
        self.keys.values()
    }

    fn forward(&mut self, e: &Event) {
        match e.kind {
            EventKind::Put => {
                self.keys.insert(e.kv.create_revision, e.kv.clone());
            }
            EventKind::Delete => {
                self.keys.remove(&e.kv.create_revision);
            }
        }
    }

    /// Step back over `events` (in revision order, ending at the revision this key set was
    /// read at): the key set as it was just before the first of them. Election keys are
    /// created and deleted, never rewritten, so a put is undone by removing a created key.
    pub fn undo(&mut self, events: &[Event]) {
        for e in events.iter().rev() {
            match e.kind {
                EventKind::Put if e.kv.version == 1 => {
                    self.keys.remove(&e.kv.create_revision);
                }
                EventKind::Put => {}
                EventKind::Delete => {
                    self.keys.insert(e.kv.create_revision, e.kv.clone());
                }
            }
        }
    }

    /// Apply `events` (in revision order) and return each leader change: the new leader
    /// (`None`: nobody leads) after every revision at which it changed.
    pub fn apply(&mut self, events: &[Event]) -> Vec<Option<KeyValue>> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < events.len() {
            let before = self.leader().map(|kv| kv.create_revision);
            let rev = events[i].revision;
            // One revision may carry several events (a lease expiry deleting many keys).
            while i < events.len() && events[i].revision == rev {
                self.forward(&events[i]);
                i += 1;
            }
            let after = self.leader();
            if after.map(|kv| kv.create_revision) != before {
                out.push(after.cloned());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, create: u64) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: key.into(),
            create_revision: create,
            mod_revision: create,
            version: 1,
            lease: Some(create),
        }
    }

    fn put(k: &KeyValue) -> Event {
        Event {
            kind: EventKind::Put,
            revision: k.create_revision,
            kv: k.clone(),
        }
    }

    fn del(k: &KeyValue, rev: u64) -> Event {
        Event {
            kind: EventKind::Delete,
            revision: rev,
            kv: k.clone(),
        }
    }

    fn names(v: &[Option<KeyValue>]) -> Vec<String> {
        v.iter()
            .map(|l| l.as_ref().map_or("-".into(), |k| k.key.clone()))
            .collect()
    }

    #[test]
    fn each_leader_change_is_reported_once_in_order() {
        let (a, b, c) = (kv("a", 2), kv("b", 3), kv("c", 4));
        let events = vec![
            put(&a),
            put(&b),    // b queues behind a: no change
            del(&b, 5), // a waiter leaves: no change
            put(&c),
            del(&a, 6), // a goes: c leads
            del(&c, 7), // nobody
        ];
        let mut o = Observer::default();
        assert_eq!(names(&o.apply(&events)), ["a", "c", "-"]);
        assert!(o.leader().is_none());
    }

    #[test]
    fn several_deletes_at_one_revision_are_one_change() {
        let (a, b, c) = (kv("a", 2), kv("b", 3), kv("c", 4));
        let mut o = Observer::new(vec![a.clone(), b.clone(), c.clone()]);
        let changes = o.apply(&[del(&a, 9), del(&b, 9)]);
        assert_eq!(names(&changes), ["c"]);
    }

    #[test]
    fn undo_then_apply_replays_what_happened() {
        let (a, b, c) = (kv("a", 2), kv("b", 3), kv("c", 5));
        // Before: a and b. Then: a deleted (4), c created (5), b deleted (6).
        let events = vec![del(&a, 4), put(&c), del(&b, 6)];
        let mut now = Observer::new(vec![c.clone()]);
        now.undo(&events);
        assert_eq!(now, Observer::new(vec![a, b]));
        assert_eq!(names(&now.apply(&events)), ["b", "c"]);
        assert_eq!(now, Observer::new(vec![c]));
    }
}
