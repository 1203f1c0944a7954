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

/// A loopback port free for both UDP and TCP now, for a child process to bind later.
///
/// Picked at random outside the kernel's ephemeral range (`ip_local_port_range`): outgoing
/// connections take their source ports from that range, so one of them could take a port
/// that the OS handed out with port 0 before the child binds it (a CI run lost a cluster to
/// exactly that: "cannot bind 127.0.0.1:42093: Address already in use"). A port is never
/// handed out twice by one process.
pub fn free_loopback_port() -> std::io::Result<u16> {
    use rand::Rng as _;
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let (lo, hi) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|x| x.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    // Below the ephemeral range if it leaves room there, else above it.
    let (from, to) = if lo > 11000 {
        (10000, lo - 1)
    } else {
        (hi.saturating_add(1).max(1024), 65535)
    };
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    let mut rng = rand::thread_rng();
    for _ in 0..1000 {
        let p = rng.gen_range(from..=to);
        if given.contains(&p) {
            continue;
        }
        if std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
        {
            given.push(p);
            return Ok(p);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!("no free loopback port in {from}..={to}"),
    ))
}

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
