//! Fault injection for chaos tests, switchable at run time (`dsys chaos ...`). The kernel here
//! has no netem, so partitions, delays and drops are applied by the transport and the gossip
//! socket themselves. Every node holds the same rule set (the CLI sends it to every node) and
//! applies it to the traffic it sends and receives.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::RwLock;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A change of the fault rules.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub enum FaultCommand {
    /// Cut the cluster into groups; nodes in different groups cannot talk. Nodes not named in
    /// any group form one more group of their own.
    Partition(Vec<Vec<String>>),
    /// Delay every message to or from this node.
    Delay {
        /// The node.
        node: String,
        /// Added one-way delay in milliseconds.
        ms: u64,
    },
    /// Drop this share (0.0..=1.0) of messages to or from this node.
    Drop {
        /// The node.
        node: String,
        /// Probability of dropping a message.
        probability: f64,
    },
    /// Remove every rule.
    Heal,
}

/// The rules in force.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct FaultRules {
    /// Partition groups (empty: no partition).
    pub partition: Vec<Vec<String>>,
    /// Delay per node in ms.
    pub delay_ms: HashMap<String, u64>,
    /// Drop probability per node.
    pub drop: HashMap<String, f64>,
}

impl FaultRules {
    /// Apply a command, refusing nonsense.
    pub fn apply(&mut self, cmd: FaultCommand) -> Result<(), String> {
        match cmd {
            FaultCommand::Partition(groups) => {
                let mut seen = std::collections::HashSet::new();
                if groups.iter().all(|g| g.is_empty()) {
                    return Err("a partition needs at least one non-empty group".into());
                }
                for n in groups.iter().flatten() {
                    if !seen.insert(n.clone()) {
                        return Err(format!("node `{n}` is in two groups"));
                    }
                }
                self.partition = groups;
            }
            FaultCommand::Delay { node, ms } => {
                if ms > 60_000 {
                    return Err("delay is capped at 60000 ms".into());
                }
                if ms == 0 {
                    self.delay_ms.remove(&node);
                } else {
                    self.delay_ms.insert(node, ms);
                }
            }
            FaultCommand::Drop { node, probability } => {
                if !(0.0..=1.0).contains(&probability) {
                    return Err("drop probability must be within 0..=1".into());
                }
                if probability == 0.0 {
                    self.drop.remove(&node);
                } else {
                    self.drop.insert(node, probability);
                }
            }
            FaultCommand::Heal => *self = FaultRules::default(),
        }
        Ok(())
    }

    fn group_of(&self, node: &str) -> Option<usize> {
        self.partition
            .iter()
            .position(|g| g.iter().any(|n| n == node))
    }

    /// True when `a` and `b` are on different sides of the partition.
    pub fn cut(&self, a: &str, b: &str) -> bool {
        if self.partition.is_empty() || a == b {
            return false;
        }
        // Unnamed nodes share an implicit extra group (None == None).
        self.group_of(a) != self.group_of(b)
    }

    /// Delay to add to a message between `a` and `b`.
    pub fn delay(&self, a: &str, b: &str) -> Duration {
        let d = self.delay_ms.get(a).max(self.delay_ms.get(b)).copied();
        Duration::from_millis(d.unwrap_or(0))
    }

    fn drop_probability(&self, a: &str, b: &str) -> f64 {
        let pa = self.drop.get(a).copied().unwrap_or(0.0);
        let pb = self.drop.get(b).copied().unwrap_or(0.0);
        pa.max(pb)
    }

    /// True when no rule is in force.
    pub fn is_empty(&self) -> bool {
        *self == FaultRules::default()
    }
}

/// What to do with one message.
#[derive(Debug, PartialEq)]
pub(crate) enum Verdict {
    Pass(Duration),
    Drop,
}

/// The shared, switchable fault state of one node.
#[derive(Debug)]
pub struct Faults {
    me: String,
    rules: RwLock<FaultRules>,
    /// gossip address -> node id, filled from membership so the gossip socket can filter.
    gossip_peers: RwLock<HashMap<SocketAddr, String>>,
}

impl Faults {
    /// No faults, for node `me`.
    pub fn new(me: &str) -> Self {
        Faults {
            me: me.to_string(),
            rules: RwLock::new(FaultRules::default()),
            gossip_peers: RwLock::new(HashMap::new()),
        }
    }

    /// Apply a command.
    pub fn apply(&self, cmd: FaultCommand) -> Result<(), String> {
        self.rules
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .apply(cmd)
    }

    /// The rules in force.
    pub fn rules(&self) -> FaultRules {
        self.rules.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Verdict for a message between this node and `peer`.
    pub(crate) fn verdict(&self, peer: &str) -> Verdict {
        let r = self.rules.read().unwrap_or_else(|p| p.into_inner());
        if r.is_empty() {
            return Verdict::Pass(Duration::ZERO);
        }
        if r.cut(&self.me, peer) {
            return Verdict::Drop;
        }
        let p = r.drop_probability(&self.me, peer);
        if p > 0.0 && rand::random::<f64>() < p {
            return Verdict::Drop;
        }
        Verdict::Pass(r.delay(&self.me, peer))
    }

    /// Verdict for a gossip datagram to or from `addr`.
    pub(crate) fn gossip_verdict(&self, addr: &SocketAddr) -> Verdict {
        let peer = self
            .gossip_peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(addr)
            .cloned();
        match peer {
            Some(p) => self.verdict(&p),
            None => Verdict::Pass(Duration::ZERO),
        }
    }

    pub(crate) fn learn_gossip_peer(&self, addr: SocketAddr, id: &str) {
        let mut m = self.gossip_peers.write().unwrap_or_else(|p| p.into_inner());
        if m.get(&addr).map(String::as_str) != Some(id) {
            m.insert(addr, id.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_rules() {
        let mut r = FaultRules::default();
        r.apply(FaultCommand::Partition(vec![
            vec!["n1".into(), "n2".into()],
            vec!["n3".into()],
        ]))
        .unwrap();
        assert!(!r.cut("n1", "n2"));
        assert!(r.cut("n1", "n3"));
        assert!(r.cut("n1", "n4")); // unnamed nodes form their own group
        assert!(!r.cut("n4", "n5"));
        assert!(r
            .apply(FaultCommand::Partition(vec![
                vec!["n1".into()],
                vec!["n1".into()]
            ]))
            .is_err());
        r.apply(FaultCommand::Delay {
            node: "n2".into(),
            ms: 200,
        })
        .unwrap();
        assert_eq!(r.delay("n1", "n2"), Duration::from_millis(200));
        assert_eq!(r.delay("n1", "n3"), Duration::ZERO);
        assert!(r
            .apply(FaultCommand::Drop {
                node: "n1".into(),
                probability: 1.5
            })
            .is_err());
        r.apply(FaultCommand::Heal).unwrap();
        assert!(r.is_empty());
    }

    #[test]
    fn verdicts() {
        let f = Faults::new("n1");
        f.apply(FaultCommand::Partition(vec![vec!["n1".into()]]))
            .unwrap();
        assert_eq!(f.verdict("n2"), Verdict::Drop);
        f.apply(FaultCommand::Heal).unwrap();
        f.apply(FaultCommand::Drop {
            node: "n2".into(),
            probability: 1.0,
        })
        .unwrap();
        assert_eq!(f.verdict("n2"), Verdict::Drop);
        assert_eq!(f.verdict("n3"), Verdict::Pass(Duration::ZERO));
    }
}
