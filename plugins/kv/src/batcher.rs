//! Coalesces concurrent replica writes bound for the same node into one `Replicate` request
//! (and so one WAL append and one fsync there): group commit at the RPC level. Each target
//! has a few workers; each takes whatever is queued (up to a batch), sends it, and answers
//! every waiting write with the outcome. Under light load a batch is a single write.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use dsys_runtime::Rpc;
use tokio::sync::{mpsc, oneshot};

use crate::api::{KvApi, KvRequest, MAX_BATCH};
use crate::version::Version;

/// Requests in flight per target.
const WORKERS: usize = 4;
/// Most items per coalesced request.
const BATCH: usize = 512;

type Job = (Vec<(String, Version)>, oneshot::Sender<bool>);

/// Per-target queues.
#[derive(Debug)]
pub(crate) struct Batcher {
    rpc: Rpc,
    queues: Mutex<HashMap<String, mpsc::Sender<Job>>>,
}

impl Batcher {
    pub(crate) fn new(rpc: Rpc) -> Self {
        Batcher {
            rpc,
            queues: Mutex::new(HashMap::new()),
        }
    }

    fn queue(&self, target: &str) -> mpsc::Sender<Job> {
        let mut q = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = q.get(target) {
            if !tx.is_closed() {
                return tx.clone();
            }
        }
        let (tx, rx) = mpsc::channel::<Job>(8192);
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        for _ in 0..WORKERS {
            let (rx, rpc, target) = (rx.clone(), self.rpc.clone(), target.to_string());
            tokio::spawn(async move {
                loop {
                    let (items, waiters) = {
                        let mut rx = rx.lock().await;
                        let Some((mut items, w)) = rx.recv().await else {
                            return;
                        };
                        let mut waiters = vec![w];
                        while items.len() < BATCH.min(MAX_BATCH) {
                            match rx.try_recv() {
                                Ok((more, w)) => {
                                    items.extend(more);
                                    waiters.push(w);
                                }
                                Err(_) => break,
                            }
                        }
                        (items, waiters)
                    };
                    let ok = rpc
                        .call::<KvApi>(&target, &KvRequest::Replicate(items))
                        .await
                        .is_ok();
                    for w in waiters {
                        let _ = w.send(ok);
                    }
                }
            });
        }
        q.insert(target.to_string(), tx.clone());
        tx
    }

    /// Store `items` on `target`; true once it acknowledged them (fsynced).
    pub(crate) async fn replicate(&self, target: &str, items: Vec<(String, Version)>) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.queue(target).send((items, tx)).await.is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }
}
