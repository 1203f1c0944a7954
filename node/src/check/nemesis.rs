//! The nemesis: a seeded schedule of faults, one at a time (quiet gap, fault, undo, wait
//! until every node sees every other alive again), recorded in the history. Partitions and
//! delays go to every node as `SysRequest::Chaos` (the transport's fault injection); in
//! multi-host mode (`--netns`) partitions are nft drop rules inside the node namespaces
//! instead. Kills are SIGKILL and a restart on the same ports and data (every other kill takes
//! the Raft leader, when one is known); pauses are SIGSTOP/SIGCONT.
//! Bridge partitions (one node seeing both sides) exist only in multi-host mode: the
//! runtime's fault rules express disjoint groups, nft rules per namespace can cut pairs.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::anyhow;
use dsys_plugin_consensus::{ConsensusApi, ConsensusRequest, ConsensusResponse};
use dsys_runtime::{Client, FaultCommand, SysApi, SysRequest, SysResponse};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use super::cluster::LocalCluster;
use super::{Ctx, FaultKind};

/// How long a fault holds.
const HOLD: (u64, u64) = (2000, 6000);
/// Longest wait for recovery after undoing a fault.
const RECOVERY: Duration = Duration::from_secs(30);

pub(crate) struct Nemesis {
    cluster: Arc<Mutex<LocalCluster>>,
    ctx: Arc<Ctx>,
    kinds: Vec<FaultKind>,
    rng: StdRng,
    sys: Client,
    quiet: (u64, u64),
    /// Partitions applied so far: the first is always majority/minority, the shape whose
    /// two sides both accept writes in a sloppy-quorum store.
    partitions: usize,
}

impl Nemesis {
    pub(crate) fn new(
        cluster: Arc<Mutex<LocalCluster>>,
        ctx: Arc<Ctx>,
        kinds: Vec<FaultKind>,
        seed: u64,
        quiet: (u64, u64),
    ) -> anyhow::Result<Self> {
        let sys = Client::new(&ctx.identity, vec![ctx.nodes[0].1], Duration::from_secs(1))
            .map_err(|e| anyhow!("client: {e}"))?;
        Ok(Nemesis {
            cluster,
            ctx,
            kinds,
            rng: StdRng::seed_from_u64(seed ^ 0x006e_656d_6573_6973),
            sys,
            quiet,
            partitions: 0,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LocalCluster> {
        self.cluster.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn n(&self) -> usize {
        self.ctx.nodes.len()
    }

    /// A random minority (1..=(n-1)/2 nodes).
    fn minority(&mut self) -> Vec<usize> {
        let n = self.n();
        let k = self.rng.gen_range(1..=((n - 1) / 2).max(1));
        let mut idx: Vec<usize> = (0..n).collect();
        idx.shuffle(&mut self.rng);
        idx.truncate(k);
        idx.sort();
        idx
    }

    fn names(&self, idx: &[usize]) -> Vec<String> {
        idx.iter().map(|i| self.ctx.nodes[*i].0.clone()).collect()
    }

    /// The Raft leader as a running node reports it, if one does within a second.
    async fn raft_leader(&self) -> Option<usize> {
        let up: Vec<usize> = {
            let c = self.lock();
            (0..self.n()).filter(|i| c.is_up(*i)).collect()
        };
        for i in up {
            if let Ok(ConsensusResponse::Status(st)) = self
                .sys
                .call_at::<ConsensusApi>(self.ctx.nodes[i].1, &ConsensusRequest::Status)
                .await
            {
                let leader = st.leader?;
                return self.ctx.nodes.iter().position(|(id, _)| *id == leader);
            }
        }
        None
    }

    /// Send a fault command to every running, unpaused node; how many applied it.
    async fn broadcast(&self, cmd: &FaultCommand) -> usize {
        let up: Vec<usize> = {
            let c = self.lock();
            (0..self.n()).filter(|i| c.is_up(*i)).collect()
        };
        let mut ok = 0;
        for i in up {
            if let Ok(SysResponse::Ok | SysResponse::Rules(_)) = self
                .sys
                .call_at::<SysApi>(self.ctx.nodes[i].1, &SysRequest::Chaos(cmd.clone()))
                .await
            {
                ok += 1;
            }
        }
        ok
    }

    /// Ok when every node answers and sees all nodes alive.
    async fn converged_once(&self) -> Result<(), String> {
        let n = self.n();
        for (id, addr) in &self.ctx.nodes {
            match self.sys.call_at::<SysApi>(*addr, &SysRequest::Status).await {
                Ok(SysResponse::Status(st)) => {
                    let alive = st.members.iter().filter(|m| m.state == "alive").count();
                    if alive != n {
                        return Err(format!("{id} sees {alive} of {n} alive"));
                    }
                }
                Ok(other) => return Err(format!("{id}: unexpected answer {other:?}")),
                Err(e) => return Err(format!("{id}: {e}")),
            }
        }
        Ok(())
    }

    pub(crate) async fn wait_converged(&self, deadline: Duration) -> Result<(), String> {
        super::wait_for(deadline, || self.converged_once()).await
    }

    /// Run the schedule until `end`; returns itself for the final heal.
    pub(crate) async fn run(mut self, end: Instant) -> Self {
        if self.kinds.is_empty() {
            return self;
        }
        loop {
            let quiet = Duration::from_millis(self.rng.gen_range(self.quiet.0..=self.quiet.1));
            let hold = Duration::from_millis(self.rng.gen_range(HOLD.0..=HOLD.1));
            if Instant::now() + quiet + hold >= end {
                return self;
            }
            tokio::time::sleep(quiet).await;
            let kind = self.kinds[self.rng.gen_range(0..self.kinds.len())];
            let Some(fault) = self.apply(kind).await else {
                continue;
            };
            tokio::time::sleep(hold).await;
            self.undo(kind, fault.1).await;
            self.ctx.rec.fault_ended(fault.0);
            if self.wait_converged(RECOVERY).await.is_ok() {
                self.ctx.rec.fault_recovered(fault.0);
            }
        }
    }

    /// Apply one fault: (history index, nodes hit).
    async fn apply(&mut self, kind: FaultKind) -> Option<(usize, Vec<usize>)> {
        match kind {
            FaultKind::Kill => {
                // Every other kill takes the Raft leader, the node whose death a CP design
                // must survive without losing an acknowledged write.
                let leader = if self.rng.gen_bool(0.5) {
                    self.raft_leader().await
                } else {
                    None
                };
                let idx = match leader {
                    Some(l) => vec![l],
                    None => self.minority(),
                };
                let names = self.names(&idx);
                {
                    let mut c = self.lock();
                    for i in &idx {
                        c.kill(*i);
                    }
                }
                let f = self.ctx.rec.fault(
                    "kill",
                    names.clone(),
                    format!(
                        "SIGKILL {}{}",
                        names.join(","),
                        if leader.is_some() {
                            " (the Raft leader)"
                        } else {
                            ""
                        }
                    ),
                );
                Some((f, idx))
            }
            FaultKind::Pause => {
                let idx = self.minority();
                let names = self.names(&idx);
                let mut done = Vec::new();
                {
                    let mut c = self.lock();
                    for i in &idx {
                        if c.pause(*i).is_ok() {
                            done.push(*i);
                        }
                    }
                }
                let f = self.ctx.rec.fault(
                    "pause",
                    names.clone(),
                    format!("SIGSTOP {}", names.join(",")),
                );
                Some((f, done))
            }
            FaultKind::Partition => {
                let n = self.n();
                let netns = self.lock().netns();
                let mut idx: Vec<usize> = (0..n).collect();
                idx.shuffle(&mut self.rng);
                // A bridge (one node that sees both sides) needs rules per pair of nodes:
                // nft in the namespaces can, the transport's disjoint groups cannot.
                let shapes = if netns { 4 } else { 3 };
                let pick = self.rng.gen_range(0..shapes);
                self.partitions += 1;
                let pick = if self.partitions == 1 { 0 } else { pick };
                let (shape, bridge, k) = match pick {
                    0 => ("majority/minority", None, (n - 1) / 2),
                    1 => ("one node isolated", None, 1),
                    2 => ("random halves", None, self.rng.gen_range(1..n)),
                    _ => ("bridge", Some(idx.remove(0)), (n - 1) / 2),
                };
                let mut a: Vec<usize> = idx[..k].to_vec();
                let mut b: Vec<usize> = idx[k..].to_vec();
                a.sort();
                b.sort();
                let groups = vec![self.names(&a), self.names(&b)];
                let detail = match bridge {
                    Some(x) => format!(
                        "{shape}: {} | {} with {} seeing both",
                        groups[0].join(","),
                        groups[1].join(","),
                        self.ctx.nodes[x].0
                    ),
                    None => format!("{shape}: {} | {}", groups[0].join(","), groups[1].join(",")),
                };
                let applied = if netns {
                    // Real packets dropped by nft inside the node namespaces.
                    match self.lock().nft_partition(&a, &b) {
                        Ok(()) => n,
                        Err(e) => {
                            eprintln!("nemesis: {e:#}");
                            0
                        }
                    }
                } else {
                    self.broadcast(&FaultCommand::Partition(groups)).await
                };
                let f = self.ctx.rec.fault(
                    "partition",
                    self.names(&a),
                    format!(
                        "{detail} ({} applied on {applied} of {n})",
                        if netns { "nft" } else { "transport" }
                    ),
                );
                Some((f, a))
            }
            FaultKind::Delay => {
                let i = self.rng.gen_range(0..self.n());
                let ms = self.rng.gen_range(50..=400);
                let id = self.ctx.nodes[i].0.clone();
                let applied = self
                    .broadcast(&FaultCommand::Delay {
                        node: id.clone(),
                        ms,
                    })
                    .await;
                let f = self.ctx.rec.fault(
                    "delay",
                    vec![id.clone()],
                    format!(
                        "{ms} ms on every message to or from {id} (applied on {applied} of {})",
                        self.n()
                    ),
                );
                Some((f, vec![i]))
            }
        }
    }

    async fn undo(&mut self, kind: FaultKind, idx: Vec<usize>) {
        match kind {
            FaultKind::Kill => {
                let mut c = self.lock();
                for i in &idx {
                    let _ = c.spawn(*i);
                }
            }
            FaultKind::Pause => {
                let mut c = self.lock();
                for i in &idx {
                    let _ = c.resume(*i);
                }
            }
            FaultKind::Partition if self.lock().netns() => {
                if let Err(e) = self.lock().nft_heal() {
                    eprintln!("nemesis: {e:#}");
                }
            }
            FaultKind::Partition | FaultKind::Delay => {
                self.broadcast(&FaultCommand::Heal).await;
            }
        }
    }

    /// Resume every paused node, restart every node that is not running (killed by us or
    /// crashed on its own), remove every fault rule. Returns the nodes that had exited
    /// without being killed: (id, exit status).
    pub(crate) async fn heal_all(&self) -> Vec<(String, String)> {
        let crashed = {
            let mut c = self.lock();
            let crashed: Vec<(String, String)> = c.exited();
            for i in 0..self.n() {
                let _ = c.resume(i);
                let _ = c.spawn(i);
            }
            if c.netns() {
                if let Err(e) = c.nft_heal() {
                    eprintln!("heal: {e:#}");
                }
            }
            crashed
        };
        // A restarted node starts without rules; send Heal until every node has it.
        let n = self.n();
        let _ = super::wait_for(Duration::from_secs(30), || async {
            if self.broadcast(&FaultCommand::Heal).await == n {
                Ok(())
            } else {
                Err("not every node took the heal".to_string())
            }
        })
        .await;
        crashed
    }
}
