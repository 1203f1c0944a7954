//! `dsys`: `dsys agent --node n1` runs a node; every other command is a client of the cluster.
//! Exit codes: 0 ok, 1 refused request, 2 usage or configuration error, 3 no node reachable.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use dsys_node::{out, outln};

/// The process allocator (see node/Cargo.toml for why).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use dsys_plugin_cache::{CacheApi, CacheCommand};
use dsys_plugin_config::{ConfigApi, ConfigCommand};
use dsys_plugin_consensus::{ConsensusApi, ConsensusRequest, ConsensusResponse, RaftCommand};
use dsys_plugin_election::{ElectionApi, ElectionCommand};
use dsys_plugin_idgen::{IdCommand, IdgenApi};
use dsys_plugin_kv::{KvApi, KvCommand};
use dsys_plugin_lock::{LockApi, LockCommand, RunError};
use dsys_plugin_ratelimit::{RatelimitApi, RatelimitCommand};
use dsys_plugin_ring::{RingApi, RingCommand};
use dsys_plugin_wal::{WalApi, WalCommand};
use dsys_runtime::{
    Api, Client, ClientError, ClusterConfig, ClusterStatus, FaultCommand, MemberStatus, Node,
    NodeOptions, Render, RpcError, SysApi, SysRequest, SysResponse, TlsIdentity,
};

#[derive(Parser, Debug)]
#[command(
    name = "dsys",
    version,
    about = "A cluster of classic system designs",
    propagate_version = true
)]
struct Cli {
    /// Node RPC endpoints (host:port, comma-separated); default: $DSYS_ENDPOINTS, then the nodes of --config.
    #[arg(long, global = true, value_delimiter = ',')]
    endpoints: Vec<SocketAddr>,
    /// Cluster file.
    #[arg(long, global = true, default_value = "cluster.toml")]
    config: PathBuf,
    /// Folder with ca.pem and cli.pem/cli.key (default: the cluster file's certs_dir).
    #[arg(long, global = true, env = "DSYS_CERTS")]
    certs: Option<PathBuf>,
    /// Client certificate: `cli` (admin, may change state) or `reader` (read-only; refused
    /// everything but reads).
    #[arg(long, global = true, env = "DSYS_IDENTITY", default_value = "cli",
          value_parser = ["cli", "reader"])]
    identity: String,
    /// Print one JSON document instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// Deadline of each request.
    #[arg(long, global = true, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a node.
    Agent(AgentArgs),
    /// Cluster-wide commands.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Consistent hashing ring (design 45).
    #[command(subcommand)]
    Ring(RingCommand),
    /// Global rate limiter (design 7).
    #[command(subcommand)]
    Ratelimit(RatelimitCommand),
    /// Dynamo-style replicated key-value store (design 21).
    #[command(subcommand)]
    Kv(KvCommand),
    /// Write-ahead log of each node (design 40).
    #[command(subcommand)]
    Wal(WalCommand),
    /// Distributed cache speaking RESP (design 30).
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Raft consensus with an etcd-like store: keys with revisions, leases, watches, txn (design 27).
    #[command(subcommand)]
    Raft(RaftCommand),
    /// Distributed locks with fencing tokens, on consensus (design 26).
    #[command(subcommand)]
    Lock(LockCommand),
    /// Named leader elections, on consensus (design 35).
    #[command(subcommand)]
    Election(ElectionCommand),
    /// Unique ids: Snowflake layout, worker ids leased through consensus (design 25).
    #[command(subcommand)]
    Id(IdCommand),
    /// Distributed configuration: versioned, typed, watched keys on consensus (design 33).
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Inject faults into the transport and gossip of every node.
    #[command(subcommand)]
    Chaos(ChaosCmd),
    /// Benchmarks that print throughput and p50/p99.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Jepsen-style check on a fresh local cluster: workload, faults, history, checker verdict
    /// (exit 0 valid, 1 invalid, 2 usage error, 3 unknown or the cluster failed).
    Check(CheckArgs),
    /// (internal) One holder process of `dsys check lock`: SPEC is JSON from the check.
    #[command(hide = true)]
    LockHolder {
        /// The holder's spec (JSON).
        spec: String,
    },
}

#[derive(clap::Args, Debug)]
struct CheckArgs {
    /// Workload: register (consensus), set (kv), ratelimit, lock (holder processes, some
    /// SIGSTOPped, on the lock plugin), unique-ids (idgen).
    workload: String,
    /// Nodes of the fresh local cluster (3..=9).
    #[arg(long, default_value_t = 5)]
    nodes: usize,
    /// How long clients run (faults included).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Faults, comma-separated: kill, pause, partition, delay (or none).
    #[arg(long, default_value = "kill,pause,partition,delay")]
    faults: String,
    /// Seed of the fault schedule and of the clients' choices (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Client processes.
    #[arg(long, default_value_t = 5)]
    concurrency: usize,
    /// Run folder for the cluster, logs, history.json and report.json (default:
    /// target/dsys-check/WORKLOAD-TIME-PID, or under the temp dir without ./target).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Start no cluster: judge this saved history (a run's history.json or a hand-written
    /// one) with the workload's checker.
    #[arg(long)]
    history: Option<PathBuf>,
    /// Multi-host mode: run each node in its namespace from `scripts/netns-cluster.sh up N`
    /// and cut partitions with nft drop rules (run through `scripts/netns-cluster.sh check`).
    #[arg(long)]
    netns: bool,
}

#[derive(clap::Args, Debug)]
struct AgentArgs {
    /// Which node of the cluster file this is.
    #[arg(long)]
    node: String,
    /// Override this node's gossip port.
    #[arg(long)]
    gossip_port: Option<u16>,
    /// Override this node's RPC (QUIC) port.
    #[arg(long)]
    rpc_port: Option<u16>,
    /// Override this node's HTTP port.
    #[arg(long)]
    http_port: Option<u16>,
    /// Override this node's data folder.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Exit when the process that started this agent is gone (`dsys check` sets it, so a
    /// check that is itself killed leaves no agents behind).
    #[arg(long, hide = true)]
    exit_with_parent: bool,
    /// Run only these plugins (comma-separated names, or `none` for the runtime alone); list
    /// the plugins they call too. For measuring what each plugin costs
    /// (`scripts/bench-cluster.sh`); default: every plugin.
    #[arg(long, value_delimiter = ',')]
    plugins: Option<Vec<String>>,
}

#[derive(Subcommand, Debug)]
enum ClusterCmd {
    /// Create the cluster CA and a certificate for every node and for the CLI.
    Init {
        /// Replace existing certificates (every node must then be restarted).
        #[arg(long)]
        force: bool,
    },
    /// Members as seen by the first reachable node (or by --endpoints), with each alive
    /// node's memory and CPU (asked of the node itself, waiting at most 500 ms for each).
    Status {
        /// Members only: do not ask each node for its memory and CPU, so the answer never
        /// waits on a node that died a moment ago and is not yet known dead (for scripts
        /// that poll membership).
        #[arg(long)]
        no_usage: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ChaosCmd {
    /// Put a line on every reachable node's dashboard timeline, e.g. `note SIGKILL n3`.
    Note {
        /// Text (joined with spaces; at most 300 bytes).
        #[arg(required = true, num_args = 1..)]
        text: Vec<String>,
    },
    /// Cut the cluster into groups, e.g. `n1,n2 n3,n4,n5`.
    Partition {
        /// Comma-separated node ids per group.
        #[arg(required = true, num_args = 1..)]
        groups: Vec<String>,
    },
    /// Delay every message to or from NODE, e.g. `n1 200ms`.
    Delay {
        /// Node id.
        node: String,
        /// One-way delay (0 removes it).
        #[arg(value_parser = humantime::parse_duration)]
        delay: Duration,
    },
    /// Drop a share of the messages to or from NODE, e.g. `n2 0.3`.
    Drop {
        /// Node id.
        node: String,
        /// Probability 0..1.
        probability: f64,
    },
    /// Remove every fault rule.
    Heal,
    /// Show the rules in force on each node.
    Status,
}

#[derive(Subcommand, Debug)]
enum BenchCmd {
    /// RPC between two in-process nodes beside a plain TCP echo.
    Rpc {
        /// Time per measurement.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Payload bytes per request.
        #[arg(long, default_value_t = 64)]
        payload: usize,
    },
    /// The WAL's group commit beside a plain write+fdatasync loop, on this machine's disk.
    Wal {
        /// Time per measurement.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Folder on the disk to measure (a scratch subfolder is made and removed).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Concurrent writers, one case each.
        #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
        writers: Vec<usize>,
        /// Payload bytes per record, one case each.
        #[arg(long, value_delimiter = ',', default_value = "100,4096")]
        sizes: Vec<usize>,
    },
    /// Key-value gets and puts against the running cluster, spread over every endpoint.
    Kv {
        /// Requests in flight.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// READ:WRITE percentages, e.g. 50:50 or 0:100.
        #[arg(long, default_value = "50:50")]
        ratio: String,
        /// How long to run.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Distinct keys.
        #[arg(long, default_value_t = 10_000)]
        keys: u64,
        /// Value size in bytes.
        #[arg(long, default_value_t = 100)]
        value_size: usize,
        /// Write quorum.
        #[arg(long)]
        w: Option<u8>,
        /// Read quorum.
        #[arg(long)]
        r: Option<u8>,
    },
    /// Raft puts against the running cluster, as `etcdctl check perf --load=l` drives etcd
    /// (defaults: 500 in flight, 256-byte keys, 1024-byte values, 60 s; add --rate 8000 for
    /// its rate limit). Prints writes/s, p50/p99, errors, slowest and stddev.
    Raft {
        /// Requests in flight, spread over every endpoint.
        #[arg(long, default_value_t = 500)]
        concurrency: usize,
        /// How long to run.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Key bytes after the prefix (each put writes a fresh random key).
        #[arg(long, default_value_t = 256)]
        key_size: usize,
        /// Value bytes.
        #[arg(long, default_value_t = 1024)]
        value_size: usize,
        /// Most puts per second over all workers (0: no limit).
        #[arg(long, default_value_t = 0)]
        rate: u64,
        /// Key prefix; every key under it is deleted at the end.
        #[arg(long, default_value = "/dsys-bench-raft/")]
        prefix: String,
    },
    /// Id batches from every node at once through RPC: ids/s per node, p50/p99 per batch,
    /// ratio to the 4,096,000 ids/s one worker id allows.
    Id {
        /// How long to run.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Batch requests in flight per node.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Ids per request (1..=100000).
        #[arg(long, default_value_t = 10_000)]
        batch: u32,
    },
    /// Rate-limit decisions against the running cluster, spread over every endpoint.
    Ratelimit {
        /// Rule to check.
        #[arg(long, default_value = "search")]
        rule: String,
        /// Distinct keys.
        #[arg(long, default_value_t = 1000)]
        keys: u64,
        /// Requests in flight.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// How long to run.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
    },
}

/// An error with its exit code.
struct Fail(u8, String);

impl From<ClientError> for Fail {
    fn from(e: ClientError) -> Self {
        match &e {
            ClientError::NoNode(_) => Fail(
                3,
                format!("{e}\nhint: `scripts/cluster.sh up` starts the local cluster"),
            ),
            ClientError::Tls(_) => Fail(2, e.to_string()),
            ClientError::Rpc(_) => Fail(1, e.to_string()),
        }
    }
}

fn usage(msg: impl Into<String>) -> Fail {
    Fail(2, msg.into())
}

fn main() -> ExitCode {
    // First, before anything faults in heap pages: an idle node must not hold its heap 2 MiB
    // at a time (see dsys_runtime::process::allow_huge_pages). CLI runs are short either way.
    let huge = std::env::var("DSYS_HUGE_PAGES").is_ok_and(|v| v == "1");
    if let Err(e) = dsys_runtime::process::allow_huge_pages(huge) {
        let state = if huge { "on" } else { "off" };
        eprintln!("warning: could not turn transparent huge pages {state}: {e}");
    }
    let cli = Cli::parse();
    if matches!(cli.cmd, Cmd::Agent(_)) && !huge {
        mimalloc_without_thp();
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // An agent's config is read once, here: it sizes the runtime (a node's share of the
    // machine, see ClusterConfig::worker_threads) and then starts the node. A config that
    // does not load is reported by `agent` itself.
    let mut agent_cfg = None;
    if let Cmd::Agent(a) = &cli.cmd {
        let cfg = load_config(&cli.config);
        if let Ok(cfg) = &cfg {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            builder.worker_threads(cfg.worker_threads(&a.node, cpus));
        }
        agent_cfg = Some(cfg);
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: tokio runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli, agent_cfg)) {
        Ok(code) => ExitCode::from(code),
        Err(Fail(code, msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(code)
        }
    }
}

/// mimalloc reads its options from the environment at its first allocation, before `main`,
/// and by default asks for huge pages on its arena: the pages it touched before `main` turned
/// off huge pages are 2 MiB each (4 MiB of an idle node's 11). So an agent started without
/// `MIMALLOC_ALLOW_THP` replaces itself (same pid, same arguments) with one that has it set
/// to 0; if that fails it goes on as it is.
fn mimalloc_without_thp() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        return;
    }
    let (Ok(exe), mut args) = (std::env::current_exe(), std::env::args_os()) else {
        return;
    };
    args.next();
    let err = std::process::Command::new(exe)
        .args(args)
        .env("MIMALLOC_ALLOW_THP", "0")
        .exec();
    eprintln!("warning: could not restart with MIMALLOC_ALLOW_THP=0: {err}");
}

fn load_config(path: &Path) -> Result<ClusterConfig, Fail> {
    ClusterConfig::load(path).map_err(|e| usage(e.to_string()))
}

async fn run(cli: Cli, agent_cfg: Option<Result<ClusterConfig, Fail>>) -> Result<u8, Fail> {
    match &cli.cmd {
        Cmd::Agent(a) => {
            let cfg = agent_cfg.unwrap_or_else(|| load_config(&cli.config));
            agent(&cli, a, cfg).await
        }
        Cmd::Cluster(ClusterCmd::Init { force }) => {
            let cfg = load_config(&cli.config)?;
            let dir = cli.certs.clone().unwrap_or(cfg.cluster.certs_dir.clone());
            if dir.join("ca.pem").exists() && !force {
                outln!(
                    "certificates already in {} (use --force to replace them)",
                    dir.display()
                );
                return Ok(0);
            }
            let ids: Vec<String> = cfg.nodes.keys().cloned().collect();
            dsys_runtime::init_cluster_certs(&dir, &ids).map_err(|e| usage(e.to_string()))?;
            outln!(
                "created a cluster CA and certificates for {} and the CLI in {}",
                ids.join(", "),
                dir.display()
            );
            Ok(0)
        }
        Cmd::Cluster(ClusterCmd::Status { no_usage }) => {
            let client = client(&cli)?;
            let resp = client.call::<SysApi>(&SysRequest::Status).await?;
            let SysResponse::Status(mut st) = resp else {
                return Err(Fail(1, "unexpected answer to status".into()));
            };
            if !no_usage {
                ask_usage(&client, &mut st).await;
            }
            if cli.json {
                print_json(&st);
            } else {
                out!("{}", status_table(&st));
            }
            Ok(0)
        }
        Cmd::Ring(c) => call::<RingApi>(&cli, c.request()).await,
        Cmd::Ratelimit(c) => call::<RatelimitApi>(&cli, c.request()).await,
        Cmd::Kv(c) => call::<KvApi>(&cli, c.request()).await,
        Cmd::Wal(c) => call::<WalApi>(&cli, c.request()).await,
        Cmd::Cache(c) => call::<CacheApi>(&cli, c.request()).await,
        Cmd::Raft(c) => match c.watch_args() {
            Some((key, prefix, from)) => raft_watch(&cli, key, prefix, from).await,
            None => call::<ConsensusApi>(&cli, c.request().map_err(usage)?).await,
        },
        Cmd::Lock(c) => lock_cmd(&cli, c).await,
        Cmd::Election(c) => election_cmd(&cli, c).await,
        Cmd::Id(c) => id_cmd(&cli, c).await,
        Cmd::Bench(BenchCmd::Id {
            duration,
            concurrency,
            batch,
        }) => {
            let opts = dsys_plugin_idgen::bench::BenchOptions {
                duration: *duration,
                concurrency: *concurrency,
                batch: *batch,
            };
            opts.validate().map_err(usage)?;
            let figs = dsys_plugin_idgen::bench::bench(spread_clients(&cli)?, &opts)
                .await
                .map_err(|e| Fail(3, e))?;
            if cli.json {
                print_json(&figs);
            } else {
                out!("{}", dsys_plugin_idgen::bench::table(&figs, &opts));
            }
            Ok(0)
        }
        Cmd::Config(c) => config_cmd(&cli, c).await,
        Cmd::Bench(BenchCmd::Wal {
            duration,
            dir,
            writers,
            sizes,
        }) => {
            let scratch = tempfile::Builder::new()
                .prefix("wal-bench-")
                .tempdir_in(dir)
                .map_err(|e| usage(format!("--dir {}: {e}", dir.display())))?;
            let mut opts = dsys_plugin_wal::bench::BenchOptions::new(scratch.path());
            opts.duration = *duration;
            opts.writers = writers.clone();
            opts.record_sizes = sizes.clone();
            let figs = dsys_plugin_wal::bench::bench(&opts)
                .await
                .map_err(|e| Fail(1, e.to_string()))?;
            if cli.json {
                print_json(&figs);
            } else {
                out!("{}", dsys_plugin_wal::bench::table(&figs));
            }
            Ok(0)
        }
        Cmd::Chaos(c) => chaos(&cli, c).await,
        Cmd::Check(a) => check(&cli, a).await,
        Cmd::LockHolder { spec } => dsys_node::check::lock::holder_main(spec)
            .await
            .map_err(usage),
        Cmd::Bench(BenchCmd::Ratelimit {
            rule,
            keys,
            concurrency,
            duration,
        }) => {
            if *concurrency == 0 || *concurrency > 4096 {
                return Err(usage("--concurrency must be 1..=4096"));
            }
            let clients = spread_clients(&cli)?;
            let (f, allowed, limited) =
                dsys_node::bench::ratelimit(clients, rule.clone(), *keys, *concurrency, *duration)
                    .await
                    .map_err(|e| Fail(3, format!("{e:#}")))?;
            if cli.json {
                print_json(
                    &serde_json::json!({ "figures": f, "allowed": allowed, "limited": limited }),
                );
            } else {
                print_figures(std::slice::from_ref(&f));
                outln!("allowed {allowed}, limited {limited}");
            }
            Ok(0)
        }
        Cmd::Bench(BenchCmd::Kv {
            concurrency,
            ratio,
            duration,
            keys,
            value_size,
            w,
            r,
        }) => {
            let read_pct = parse_ratio(ratio)?;
            if *concurrency == 0 || *concurrency > 4096 {
                return Err(usage("--concurrency must be 1..=4096"));
            }
            if *value_size > dsys_plugin_kv::MAX_VALUE_BYTES {
                return Err(usage("--value-size is capped at 1 MiB"));
            }
            let clients = spread_clients(&cli)?;
            let settings = dsys_node::bench::KvBench {
                concurrency: *concurrency,
                read_pct,
                duration: *duration,
                keys: *keys,
                value_size: *value_size,
                w: *w,
                r: *r,
                progress: !cli.json,
            };
            let (reads, writes) = dsys_node::bench::kv(clients, settings)
                .await
                .map_err(|e| Fail(3, format!("{e:#}")))?;
            if cli.json {
                print_json(&serde_json::json!({ "reads": reads, "writes": writes }));
            } else {
                print_figures(&[reads.clone(), writes.clone()]);
                outln!("total {:.0} ops/s", reads.rps + writes.rps);
            }
            Ok(0)
        }
        Cmd::Bench(BenchCmd::Raft {
            concurrency,
            duration,
            key_size,
            value_size,
            rate,
            prefix,
        }) => {
            use dsys_plugin_consensus::{MAX_KEY_BYTES, MAX_VALUE_BYTES};
            if *concurrency == 0 || *concurrency > 4096 {
                return Err(usage("--concurrency must be 1..=4096"));
            }
            if *key_size < 16 || prefix.len() + key_size > MAX_KEY_BYTES {
                return Err(usage(format!(
                    "--key-size must be at least 16 and the prefix plus the key at most {MAX_KEY_BYTES} bytes"
                )));
            }
            if *value_size > MAX_VALUE_BYTES {
                return Err(usage("--value-size is capped at 1 MiB"));
            }
            if prefix.is_empty() {
                return Err(usage(
                    "--prefix must not be empty (its keys are deleted at the end)",
                ));
            }
            let clients = spread_clients(&cli)?;
            let settings = dsys_node::bench::RaftBench {
                concurrency: *concurrency,
                duration: *duration,
                key_size: *key_size,
                value_size: *value_size,
                rate: *rate,
                prefix: prefix.clone(),
                progress: !cli.json,
            };
            let r = dsys_node::bench::raft(clients, settings)
                .await
                .map_err(|e| Fail(3, format!("{e:#}")))?;
            if cli.json {
                print_json(&r);
            } else {
                print_figures(std::slice::from_ref(&r.writes));
                outln!(
                    "{:.0} writes/s, slowest {:.3} s, stddev {:.3} s{}",
                    r.writes.rps,
                    r.slowest_s,
                    r.stddev_s,
                    if r.rate > 0 {
                        format!(" (rate limit {}/s)", r.rate)
                    } else {
                        String::new()
                    }
                );
            }
            Ok(0)
        }
        Cmd::Bench(BenchCmd::Rpc { duration, payload }) => {
            if *payload > 1024 * 1024 {
                return Err(usage("--payload is capped at 1 MiB"));
            }
            let figs = dsys_node::bench::rpc(*duration, *payload)
                .await
                .map_err(|e| Fail(1, format!("{e:#}")))?;
            if cli.json {
                print_json(&figs);
            } else {
                outln!(
                    "{:<28} {:>5} {:>10} {:>12} {:>10} {:>10}",
                    "what",
                    "conc",
                    "requests",
                    "req/s",
                    "p50 µs",
                    "p99 µs"
                );
                for f in &figs {
                    outln!(
                        "{:<28} {:>5} {:>10} {:>12.0} {:>10.1} {:>10.1}",
                        f.name,
                        f.concurrency,
                        f.requests,
                        f.rps,
                        f.p50_us,
                        f.p99_us
                    );
                }
                for pair in figs.chunks(2) {
                    if let [r, t] = pair {
                        outln!(
                            "concurrency {:>2}: rpc p50 / tcp p50 = {:.2}x, rpc req/s / tcp req/s = {:.2}",
                            r.concurrency,
                            r.p50_us / t.p50_us,
                            r.rps / t.rps
                        );
                    }
                }
            }
            Ok(0)
        }
    }
}

async fn check(cli: &Cli, a: &CheckArgs) -> Result<u8, Fail> {
    use dsys_node::check;
    if let Some(h) = &a.history {
        if !check::REGISTRY.iter().any(|w| w.name == a.workload) {
            return Err(usage(format!("unknown workload `{}`", a.workload)));
        }
        return check::check_file(&a.workload, h, cli.json).map_err(|e| usage(format!("{e:#}")));
    }
    let faults = check::parse_faults(&a.faults).map_err(usage)?;
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64 % 1_000_000)
            .unwrap_or(1)
    });
    let opts = check::CheckOptions {
        workload: a.workload.clone(),
        nodes: a.nodes,
        duration: a.duration,
        faults,
        seed,
        concurrency: a.concurrency,
        out: a.out.clone(),
        timeout: cli.timeout,
        json: cli.json,
        netns: a.netns,
    };
    opts.validate().map_err(usage)?;
    check::run(opts)
        .await
        .map_err(|e| Fail(3, format!("{e:#}")))
}

fn parse_ratio(s: &str) -> Result<u32, Fail> {
    let bad = || {
        usage(format!(
            "--ratio `{s}`: expected READ:WRITE percentages adding up to 100, e.g. 50:50"
        ))
    };
    let (r, w) = s.split_once(':').ok_or_else(bad)?;
    let (r, w): (u32, u32) = (
        r.trim().parse().map_err(|_| bad())?,
        w.trim().parse().map_err(|_| bad())?,
    );
    if r + w != 100 {
        return Err(bad());
    }
    Ok(r)
}

fn print_figures(figs: &[dsys_node::bench::Figures]) {
    outln!(
        "{:<28} {:>5} {:>10} {:>12} {:>10} {:>10} {:>7}",
        "what",
        "conc",
        "requests",
        "req/s",
        "p50 µs",
        "p99 µs",
        "errors"
    );
    for f in figs {
        outln!(
            "{:<28} {:>5} {:>10} {:>12.0} {:>10.1} {:>10.1} {:>7}",
            f.name,
            f.concurrency,
            f.requests,
            f.rps,
            f.p50_us,
            f.p99_us,
            f.errors
        );
    }
}

fn print_json<T: serde::Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => outln!("{s}"),
        Err(e) => eprintln!("error: json: {e}"),
    }
}

async fn call<A: Api>(cli: &Cli, req: A::Request) -> Result<u8, Fail>
where
    A::Response: Render,
{
    call_with_timeout::<A>(cli, req, cli.timeout).await
}

async fn call_with_timeout<A: Api>(
    cli: &Cli,
    req: A::Request,
    timeout: Duration,
) -> Result<u8, Fail>
where
    A::Response: Render,
{
    let client = Client::new(&identity(cli)?, endpoints(cli)?, timeout)?;
    let resp = client.call::<A>(&req).await?;
    if cli.json {
        print_json(&resp);
    } else {
        outln!("{}", resp.human().trim_end());
    }
    Ok(resp.exit_code() as u8)
}

/// `dsys lock ...`; `lock run NAME -- CMD` holds the lock (with keep-alive) while CMD runs.
async fn lock_cmd(cli: &Cli, c: &LockCommand) -> Result<u8, Fail> {
    // The client's deadline must outlast --wait.
    let timeout = c.client_timeout(cli.timeout);
    if let Some(args) = c.run_args() {
        let client = Client::new(&identity(cli)?, endpoints(cli)?, timeout)?;
        return match dsys_plugin_lock::run_locked(&client, &args).await {
            Ok(code) => Ok(code.clamp(0, 255) as u8),
            Err(RunError::Usage(m)) => Err(usage(m)),
            Err(RunError::Client(e)) => Err(e.into()),
            Err(e) => Err(Fail(1, e.to_string())),
        };
    }
    call_with_timeout::<LockApi>(cli, c.request().map_err(usage)?, timeout).await
}

/// `dsys id ...`; `decode` works offline.
async fn id_cmd(cli: &Cli, c: &IdCommand) -> Result<u8, Fail> {
    if let Some(out) = c.offline(cli.json) {
        outln!("{}", out.map_err(usage)?);
        return Ok(0);
    }
    let resp = client(cli)?
        .call::<IdgenApi>(&c.request().map_err(usage)?)
        .await?;
    if cli.json {
        print_json(&dsys_plugin_idgen::response_json(&resp));
    } else {
        outln!("{}", resp.human().trim_end());
    }
    Ok(0)
}

/// `dsys election ...`; `observe` prints every leader change until Ctrl-C.
/// `dsys config ...`; `watch` prints every change until Ctrl-C.
async fn config_cmd(cli: &Cli, c: &ConfigCommand) -> Result<u8, Fail> {
    if let Some((prefix, from)) = c.watch_args() {
        let client = client(cli)?;
        let json = cli.json;
        let fut = dsys_plugin_config::watch(&client, &prefix, from, long_poll_ms(cli), |ch| {
            if json {
                outln!("{}", serde_json::to_string(ch).unwrap_or_default());
            } else {
                outln!("{}", dsys_plugin_config::change_line(ch));
            }
        });
        return tokio::select! {
            r = fut => { r?; Ok(0) }
            _ = tokio::signal::ctrl_c() => Ok(0),
        };
    }
    call::<ConfigApi>(cli, c.request()).await
}

async fn election_cmd(cli: &Cli, c: &ElectionCommand) -> Result<u8, Fail> {
    let req = c.request().map_err(usage)?;
    if let Some(name) = c.observe_name() {
        let client = client(cli)?;
        let wait_ms = long_poll_ms(cli);
        let json = cli.json;
        let fut = dsys_plugin_election::observe(&client, name, wait_ms, |l| {
            if json {
                outln!("{}", serde_json::to_string(l).unwrap_or_default());
            } else {
                outln!("{}", dsys_plugin_election::leader_line(name, l));
            }
        });
        return tokio::select! {
            r = fut => { r?; Ok(0) }
            _ = tokio::signal::ctrl_c() => Ok(0),
        };
    }
    call_with_timeout::<ElectionApi>(cli, req, c.client_timeout(cli.timeout)).await
}

/// How long one long poll (raft watch, election observe) may wait for an event: a second
/// less than the client's deadline, so the answer always arrives before it.
fn long_poll_ms(cli: &Cli) -> u64 {
    cli.timeout
        .as_millis()
        .saturating_sub(1000)
        .clamp(100, 30_000) as u64
}

/// `dsys raft watch`: long-poll for events from a revision on, printing each, until Ctrl-C.
async fn raft_watch(cli: &Cli, key: String, prefix: bool, mut from: u64) -> Result<u8, Fail> {
    let client = client(cli)?;
    let wait_ms = long_poll_ms(cli);
    loop {
        let req = ConsensusRequest::Watch {
            key: key.clone(),
            prefix,
            from_revision: from,
            wait_ms,
            limit: 1000,
        };
        let resp = tokio::select! {
            r = client.call::<ConsensusApi>(&req) => r?,
            _ = tokio::signal::ctrl_c() => return Ok(0),
        };
        let ConsensusResponse::Events {
            events,
            next_revision,
        } = resp
        else {
            return Err(Fail(1, "unexpected answer to watch".into()));
        };
        for e in &events {
            if cli.json {
                outln!("{}", serde_json::to_string(e).unwrap_or_default());
            } else {
                outln!("{}", dsys_plugin_consensus::event_line(e));
            }
        }
        from = next_revision;
    }
}

fn endpoints(cli: &Cli) -> Result<Vec<SocketAddr>, Fail> {
    if !cli.endpoints.is_empty() {
        return Ok(cli.endpoints.clone());
    }
    if let Ok(v) = std::env::var("DSYS_ENDPOINTS") {
        return v
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| {
                s.trim()
                    .parse::<SocketAddr>()
                    .map_err(|e| usage(format!("DSYS_ENDPOINTS: `{s}`: {e}")))
            })
            .collect();
    }
    let cfg = load_config(&cli.config)?;
    Ok(cfg.nodes.values().map(|n| n.rpc_addr()).collect())
}

fn identity(cli: &Cli) -> Result<TlsIdentity, Fail> {
    let certs = match &cli.certs {
        Some(c) => c.clone(),
        None if cli.config.exists() => load_config(&cli.config)?.cluster.certs_dir,
        None => PathBuf::from("run/certs"),
    };
    TlsIdentity::load(&certs, &cli.identity).map_err(|e| usage(e.to_string()))
}

/// One client per endpoint, each starting at its own endpoint and failing over to the others,
/// so load spreads over every node and a dead one is skipped.
fn spread_clients(cli: &Cli) -> Result<Vec<Client>, Fail> {
    let eps = endpoints(cli)?;
    let id = identity(cli)?;
    (0..eps.len())
        .map(|i| {
            let mut rotated = eps.clone();
            rotated.rotate_left(i);
            Client::new(&id, rotated, cli.timeout).map_err(Fail::from)
        })
        .collect()
}

fn client(cli: &Cli) -> Result<Client, Fail> {
    Client::new(&identity(cli)?, endpoints(cli)?, cli.timeout).map_err(Fail::from)
}

/// Fill in the resident memory and CPU time of every alive member that answers within the
/// client's deadline (the answering node filled in its own); the others stay blank.
async fn ask_usage(client: &Client, st: &mut ClusterStatus) {
    // A node killed a moment ago is still alive for gossip; its figures are left out
    // rather than holding up the whole answer until the connection attempt gives up.
    const USAGE_WAIT: Duration = Duration::from_millis(500);
    let asks = st.members.iter_mut().filter_map(|m| {
        let addr: std::net::SocketAddr = m.rpc_addr.as_deref()?.parse().ok()?;
        (m.state == "alive" && m.usage.is_none()).then_some(async move {
            let ask = client.call_at::<SysApi>(addr, &SysRequest::Usage);
            if let Ok(Ok(SysResponse::Usage(u))) = tokio::time::timeout(USAGE_WAIT, ask).await {
                m.usage = u;
            }
        })
    });
    futures_util::future::join_all(asks).await;
}

/// "24.8 MB" and "1.2 s (0.4%)": resident memory, CPU time and its average share of one core
/// since the node started (its generation is its start time in ms).
fn usage_cells(m: &MemberStatus) -> (String, String) {
    let Some(u) = m.usage else {
        return (String::new(), String::new());
    };
    let up_ms = dsys_runtime::process::now_ms()
        .saturating_sub(m.generation)
        .max(1);
    (
        format!("{:.1} MB", u.rss_bytes as f64 / 1e6),
        format!(
            "{:.1} s ({:.1}%)",
            u.cpu_ms as f64 / 1e3,
            u.cpu_ms as f64 * 100.0 / up_ms as f64
        ),
    )
}

fn status_table(st: &ClusterStatus) -> String {
    let mut t = comfy_table::Table::new();
    t.set_header([
        "node",
        "address",
        "region",
        "state",
        "generation",
        "plugins",
        "restarts",
        "rss",
        "cpu (avg)",
    ]);
    for m in &st.members {
        let restarts = if m.failed.is_empty() {
            m.restarts.to_string()
        } else {
            format!("{} (failed: {})", m.restarts, m.failed.join(","))
        };
        let (rss, cpu) = usage_cells(m);
        t.add_row([
            m.id.clone(),
            m.rpc_addr.clone().unwrap_or_default(),
            m.region.clone(),
            m.state.clone(),
            m.generation.to_string(),
            m.plugins.join(","),
            restarts,
            rss,
            cpu,
        ]);
    }
    let alive = st.members.iter().filter(|m| m.state == "alive").count();
    format!(
        "{t}\n{alive} of {} alive, as seen by {}\n",
        st.members.len(),
        st.node
    )
}

async fn chaos(cli: &Cli, c: &ChaosCmd) -> Result<u8, Fail> {
    let req = match c {
        ChaosCmd::Partition { groups } => SysRequest::Chaos(FaultCommand::Partition(
            groups
                .iter()
                .map(|g| {
                    g.split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .collect(),
        )),
        ChaosCmd::Delay { node, delay } => SysRequest::Chaos(FaultCommand::Delay {
            node: node.clone(),
            ms: delay.as_millis() as u64,
        }),
        ChaosCmd::Drop { node, probability } => SysRequest::Chaos(FaultCommand::Drop {
            node: node.clone(),
            probability: *probability,
        }),
        ChaosCmd::Heal => SysRequest::Chaos(FaultCommand::Heal),
        ChaosCmd::Status => SysRequest::ChaosRules,
        ChaosCmd::Note { text } => SysRequest::Note(text.join(" ")),
    };
    // Every node applies the same rules to its own traffic: send to each one directly.
    let client = client(cli)?;
    let mut report = Vec::new();
    let (mut ok, mut refused) = (0, 0);
    for addr in client.endpoints().to_vec() {
        match client.call_at::<SysApi>(addr, &req).await {
            Ok(SysResponse::Rules(r)) => {
                ok += 1;
                report.push(serde_json::json!({ "endpoint": addr.to_string(), "rules": r }));
            }
            Ok(SysResponse::Ok) => {
                ok += 1;
                report.push(serde_json::json!({ "endpoint": addr.to_string(), "noted": true }));
            }
            Ok(_) => {}
            Err(ClientError::Rpc(RpcError::Refused(msg))) => {
                refused += 1;
                report.push(serde_json::json!({ "endpoint": addr.to_string(), "error": msg }));
            }
            Err(e) => report
                .push(serde_json::json!({ "endpoint": addr.to_string(), "error": e.to_string() })),
        }
    }
    if cli.json {
        print_json(&report);
    } else {
        for r in &report {
            outln!("{r}");
        }
        outln!("applied on {ok} of {} nodes", client.endpoints().len());
    }
    Ok(if refused > 0 {
        1
    } else if ok == 0 {
        3
    } else {
        0
    })
}

async fn agent(cli: &Cli, a: &AgentArgs, cfg: Result<ClusterConfig, Fail>) -> Result<u8, Fail> {
    // Before anything slow: the starter may die while the node is still starting.
    let parent = std::os::unix::process::parent_id();
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("DSYS_LOG").unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let mut cfg = cfg?;
    let node = cfg.nodes.get_mut(&a.node).ok_or_else(|| {
        usage(format!(
            "config: field `--node`: unknown node `{}`; {} has {}",
            a.node,
            cli.config.display(),
            cfg_ids(&cli.config)
        ))
    })?;
    if let Some(p) = a.gossip_port {
        node.gossip_port = p;
    }
    if let Some(p) = a.rpc_port {
        node.rpc_port = p;
    }
    if let Some(p) = a.http_port {
        node.http_port = p;
    }
    if let Some(d) = &a.data_dir {
        node.data_dir = d.clone();
    }
    if let Some(c) = &cli.certs {
        cfg.cluster.certs_dir = c.clone();
    }
    cfg.validate().map_err(|e| usage(e.to_string()))?;
    tracing::info!(
        workers = tokio::runtime::Handle::current().metrics().num_workers(),
        "async worker threads (cluster.worker_threads; 0 shares the CPUs among the nodes of a host)"
    );
    let mut plugins = dsys_node::plugins();
    if let Some(only) = &a.plugins {
        let known: Vec<&str> = plugins.iter().map(|p| p.name()).collect();
        let only: Vec<&str> = only
            .iter()
            .map(|s| s.trim())
            .filter(|s| *s != "none")
            .collect();
        if let Some(bad) = only.iter().find(|n| !known.contains(n)) {
            return Err(usage(format!(
                "--plugins: no plugin `{bad}` (plugins: {})",
                known.join(", ")
            )));
        }
        plugins.retain(|p| only.contains(&p.name()));
    }
    let node = Node::start(NodeOptions {
        config: cfg,
        node_id: a.node.clone(),
        plugins,
        seed_addrs: vec![],
    })
    .await
    .map_err(|e| Fail(2, e))?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Fail(1, e.to_string()))?;
    let orphaned = async {
        if !a.exit_with_parent {
            return std::future::pending().await;
        }
        // Re-parented (to init or a subreaper) means the starter died without stopping us.
        while std::os::unix::process::parent_id() == parent {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        tracing::warn!("the process that started this agent is gone; stopping");
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        _ = orphaned => {}
    }
    tracing::info!("shutting down");
    node.shutdown().await;
    Ok(0)
}

fn cfg_ids(path: &Path) -> String {
    ClusterConfig::load(path)
        .map(|c| c.nodes.keys().cloned().collect::<Vec<_>>().join(", "))
        .unwrap_or_default()
}
