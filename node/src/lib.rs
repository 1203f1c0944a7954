//! dsys-node: the `dsys` binary (agent and CLI). This is the one crate that lists every
//! plugin; tests use [`plugins`] to start in-process nodes identical to the real ones.
#![warn(missing_docs, unreachable_pub)]

/// `print!` for the CLI's output: when stdout is a pipe whose reader has gone (`dsys ... |
/// head`), the process ends quietly with 141 (as if killed by SIGPIPE, like other Unix
/// tools) instead of panicking in `print!`.
#[macro_export]
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = write!(std::io::stdout().lock(), $($t)*) {
            $crate::stdout_failed(e)
        }
    }};
}

/// `println!` for the CLI's output; see [`out!`].
#[macro_export]
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($t)*) {
            $crate::stdout_failed(e)
        }
    }};
}

/// Where [`out!`] goes when stdout cannot be written.
pub fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(141)
    }
    eprintln!("error: writing to stdout: {e}");
    std::process::exit(1)
}

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
