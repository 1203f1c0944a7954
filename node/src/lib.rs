//! dsys-node: the `dsys` binary (agent and CLI). This is the one crate that lists every
//! plugin; tests use [`plugins`] to start in-process nodes identical to the real ones.
#![warn(missing_docs, unreachable_pub)]

pub mod bench;
pub mod check;

use dsys_runtime::{plugin_factory, PluginFactory};

/// Every plugin a node runs, in start order.
pub fn plugins() -> Vec<PluginFactory> {
    vec![
        plugin_factory::<dsys_plugin_ring::RingPlugin>(),
        plugin_factory::<dsys_plugin_ratelimit::RatelimitPlugin>(),
        plugin_factory::<dsys_plugin_wal::WalPlugin>(),
        plugin_factory::<dsys_plugin_kv::KvPlugin>(),
        plugin_factory::<dsys_plugin_cache::CachePlugin>(),
        plugin_factory::<dsys_plugin_consensus::ConsensusPlugin>(),
        // After consensus, which it is a client of; ratelimit (started earlier) follows its
        // rules and tolerates both not being up yet.
        plugin_factory::<dsys_plugin_config::ConfigPlugin>(),
        plugin_factory::<dsys_plugin_lock::LockPlugin>(),
        plugin_factory::<dsys_plugin_election::ElectionPlugin>(),
        plugin_factory::<dsys_plugin_idgen::IdgenPlugin>(),
    ]
}
