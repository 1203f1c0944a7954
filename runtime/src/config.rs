//! Cluster configuration: `cluster.toml`, then `DSYS__SECTION__KEY` environment variables,
//! then CLI flags (applied by the caller through [`NodeConfig`] fields). Validated once at
//! start; every error names the field it is about.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A configuration problem; the message names the offending field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or parsed, or a field is missing or has the wrong type.
    #[error("config: {0}")]
    Load(String),
    /// A field has a value that is not allowed.
    #[error("config: field `{field}`: {msg}")]
    Invalid {
        /// Dotted path of the field, e.g. `nodes.n3.rpc_port`.
        field: String,
        /// What is wrong with it.
        msg: String,
    },
}

fn invalid(field: impl Into<String>, msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        msg: msg.into(),
    }
}

/// The whole cluster: one `[cluster]` section, one `[nodes.ID]` table per node, and a free-form
/// `[plugins.NAME]` table per plugin that each plugin reads for itself.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Cluster-wide settings.
    pub cluster: ClusterSection,
    /// Nodes by id.
    pub nodes: BTreeMap<String, NodeConfig>,
    /// Per-plugin settings, read by each plugin with [`ClusterConfig::plugin_section`].
    #[serde(default)]
    pub plugins: BTreeMap<String, serde_json::Value>,
}

/// `[cluster]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// Cluster name; gossip from another cluster name is ignored.
    pub name: String,
    /// Node ids used as gossip seeds.
    pub seeds: Vec<String>,
    /// Folder with `ca.pem` and the per-node certificates made by `dsys cluster init`.
    #[serde(default = "default_certs_dir")]
    pub certs_dir: PathBuf,
    /// Gossip round interval.
    #[serde(default = "default_gossip_ms")]
    pub gossip_interval_ms: u64,
    /// Phi-accrual threshold above which a silent node is declared dead.
    #[serde(default = "default_phi")]
    pub phi_threshold: f64,
    /// Default deadline of an RPC.
    #[serde(default = "default_rpc_timeout")]
    pub rpc_timeout_ms: u64,
    /// Largest frame accepted on the transport.
    #[serde(default = "default_max_frame")]
    pub max_frame_bytes: u32,
    /// Virtual nodes per member on the ring.
    #[serde(default = "default_vnodes")]
    pub vnodes: u32,
    /// How long a member may be dead before it stops owning its ring ranges (the owner
    /// ring, [`crate::MembershipHandle::owners`]): until then its keys' writes go to
    /// fallback nodes as hints instead of moving; a member that leaves (SIGTERM) stops
    /// owning at once, one that joins owns at once.
    #[serde(default = "default_owner_timeout")]
    pub owner_timeout_ms: u64,
    /// Async worker threads of each node process; 0 (the default) divides the machine's
    /// CPUs among the nodes configured at the same host (see
    /// [`ClusterConfig::worker_threads`]).
    #[serde(default)]
    pub worker_threads: usize,
}

fn default_certs_dir() -> PathBuf {
    PathBuf::from("run/certs")
}
fn default_gossip_ms() -> u64 {
    200
}
fn default_phi() -> f64 {
    8.0
}
fn default_rpc_timeout() -> u64 {
    5_000
}
fn default_max_frame() -> u32 {
    16 * 1024 * 1024
}
fn default_vnodes() -> u32 {
    128
}
fn default_owner_timeout() -> u64 {
    300_000
}
fn default_host() -> IpAddr {
    IpAddr::from([127, 0, 0, 1])
}

/// `[nodes.ID]`: where one node listens. Port 0 asks the OS for a free port (tests).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Address all three listeners bind to.
    #[serde(default = "default_host")]
    pub host: IpAddr,
    /// UDP port of chitchat gossip.
    pub gossip_port: u16,
    /// UDP port of the QUIC transport.
    pub rpc_port: u16,
    /// TCP port of the HTTP gateway.
    pub http_port: u16,
    /// Region label (used by region-aware designs).
    pub region: String,
    /// Per-node data folder.
    pub data_dir: PathBuf,
}

impl NodeConfig {
    /// Gossip socket address.
    pub fn gossip_addr(&self) -> SocketAddr {
        SocketAddr::new(self.host, self.gossip_port)
    }
    /// QUIC socket address.
    pub fn rpc_addr(&self) -> SocketAddr {
        SocketAddr::new(self.host, self.rpc_port)
    }
    /// HTTP socket address.
    pub fn http_addr(&self) -> SocketAddr {
        SocketAddr::new(self.host, self.http_port)
    }
}

/// A node id must be usable as a DNS label inside certificate names.
pub(crate) fn valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 32
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-')
}

impl ClusterConfig {
    /// Load `path`, then apply `DSYS__...` environment overrides, then validate.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_with_env(path, std::env::vars().collect())
    }

    /// Like [`ClusterConfig::load`] with an explicit environment (for tests).
    pub fn load_with_env(path: &Path, env: HashMap<String, String>) -> Result<Self, ConfigError> {
        if !path.exists() {
            return Err(ConfigError::Load(format!(
                "file {} not found (pass --config FILE)",
                path.display()
            )));
        }
        let built = ::config::Config::builder()
            .add_source(::config::File::from(path).format(::config::FileFormat::Toml))
            .add_source(
                ::config::Environment::with_prefix("DSYS")
                    .separator("__")
                    .try_parsing(true)
                    .source(Some(env)),
            )
            .build()
            .map_err(|e| ConfigError::Load(e.to_string()))?;
        let cfg: ClusterConfig = built
            .try_deserialize()
            .map_err(|e| ConfigError::Load(format!("{}: {e}", path.display())))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Check cross-field rules: ids, seeds, port clashes, ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let c = &self.cluster;
        if c.name.trim().is_empty() {
            return Err(invalid("cluster.name", "must not be empty"));
        }
        if self.nodes.is_empty() {
            return Err(invalid("nodes", "at least one node is required"));
        }
        if c.seeds.is_empty() {
            return Err(invalid("cluster.seeds", "at least one seed is required"));
        }
        for s in &c.seeds {
            if !self.nodes.contains_key(s) {
                return Err(invalid("cluster.seeds", format!("unknown node `{s}`")));
            }
        }
        if !(10..=10_000).contains(&c.gossip_interval_ms) {
            return Err(invalid("cluster.gossip_interval_ms", "must be 10..=10000"));
        }
        if !(1.0..=100.0).contains(&c.phi_threshold) {
            return Err(invalid("cluster.phi_threshold", "must be 1..=100"));
        }
        if !(10..=600_000).contains(&c.rpc_timeout_ms) {
            return Err(invalid("cluster.rpc_timeout_ms", "must be 10..=600000"));
        }
        if !(1024..=1024 * 1024 * 1024).contains(&c.max_frame_bytes) {
            return Err(invalid("cluster.max_frame_bytes", "must be 1 KiB..=1 GiB"));
        }
        if !(1..=4096).contains(&c.vnodes) {
            return Err(invalid("cluster.vnodes", "must be 1..=4096"));
        }
        if c.worker_threads > 1024 {
            return Err(invalid(
                "cluster.worker_threads",
                "must be 0..=1024 (0: share the host's CPUs)",
            ));
        }
        let mut used: HashMap<(IpAddr, &str, u16), String> = HashMap::new();
        for (id, n) in &self.nodes {
            if !valid_node_id(id) {
                return Err(invalid(
                    format!("nodes.{id}"),
                    "node ids are 1-32 chars of a-z, 0-9 and '-'",
                ));
            }
            if n.region.trim().is_empty() {
                return Err(invalid(format!("nodes.{id}.region"), "must not be empty"));
            }
            // gossip and QUIC are both UDP, so they share one port space per host.
            for (field, proto, port) in [
                ("gossip_port", "udp", n.gossip_port),
                ("rpc_port", "udp", n.rpc_port),
                ("http_port", "tcp", n.http_port),
            ] {
                if port == 0 {
                    continue;
                }
                let here = format!("nodes.{id}.{field}");
                if let Some(other) = used.insert((n.host, proto, port), here.clone()) {
                    return Err(invalid(
                        here,
                        format!("port {port} is already used by `{other}`"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The configuration of node `id`, or an error naming it.
    pub fn node(&self, id: &str) -> Result<&NodeConfig, ConfigError> {
        self.nodes.get(id).ok_or_else(|| {
            invalid(
                "--node",
                format!(
                    "unknown node `{id}`; the config has {}",
                    self.nodes.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            )
        })
    }

    /// The `[plugins.NAME]` table deserialized into `T` (defaults when absent).
    pub fn plugin_section<T: serde::de::DeserializeOwned + Default>(
        &self,
        name: &str,
    ) -> Result<T, ConfigError> {
        match self.plugins.get(name) {
            None => Ok(T::default()),
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|e| invalid(format!("plugins.{name}"), e.to_string())),
        }
    }

    /// Async worker threads for node `node` on a machine with `cpus` CPUs: the configured
    /// number, or else the CPUs divided among the nodes configured at its host (at least
    /// one). Five nodes of a local cluster on a 2-CPU machine each running two workers would
    /// spend much of their time waking and parking threads for one another: measured on the
    /// 3-node cache benchmark, one worker each used 23% less CPU per request.
    pub fn worker_threads(&self, node: &str, cpus: usize) -> usize {
        if self.cluster.worker_threads > 0 {
            return self.cluster.worker_threads;
        }
        let sharing = match self.nodes.get(node) {
            Some(me) => self.nodes.values().filter(|n| n.host == me.host).count(),
            None => 1,
        };
        (cpus / sharing.max(1)).max(1)
    }

    /// A config for `n` nodes on 127.0.0.1 with OS-chosen ports (tests and benchmarks).
    pub fn local_ephemeral(n: usize, certs_dir: &Path, data_root: &Path) -> Self {
        let nodes = (1..=n)
            .map(|i| {
                (
                    format!("n{i}"),
                    NodeConfig {
                        host: default_host(),
                        gossip_port: 0,
                        rpc_port: 0,
                        http_port: 0,
                        region: if i % 2 == 1 { "eu" } else { "us" }.to_string(),
                        data_dir: data_root.join(format!("n{i}")),
                    },
                )
            })
            .collect();
        ClusterConfig {
            cluster: ClusterSection {
                name: "dsys-test".into(),
                seeds: vec!["n1".into()],
                certs_dir: certs_dir.to_path_buf(),
                gossip_interval_ms: default_gossip_ms(),
                phi_threshold: default_phi(),
                rpc_timeout_ms: default_rpc_timeout(),
                max_frame_bytes: default_max_frame(),
                vnodes: default_vnodes(),
                owner_timeout_ms: default_owner_timeout(),
                worker_threads: 0,
            },
            nodes,
            plugins: BTreeMap::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const GOOD: &str = r#"
[cluster]
name = "t"
seeds = ["n1"]
[nodes.n1]
gossip_port = 7001
rpc_port = 7002
http_port = 7003
region = "eu"
data_dir = "run/n1"
[nodes.n2]
gossip_port = 7011
rpc_port = 7012
http_port = 7013
region = "us"
data_dir = "run/n2"
[plugins.ratelimit.rules.api]
algorithm = "token_bucket"
limit = 10
window_ms = 1000
"#;

    fn write(s: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        f.write_all(s.as_bytes()).unwrap();
        f
    }

    fn load(s: &str, env: &[(&str, &str)]) -> Result<ClusterConfig, ConfigError> {
        let f = write(s);
        ClusterConfig::load_with_env(
            f.path(),
            env.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn loads_and_env_overrides() {
        let c = load(GOOD, &[]).unwrap();
        assert_eq!(c.nodes.len(), 2);
        assert_eq!(c.cluster.gossip_interval_ms, 200);
        assert!(c.plugins.contains_key("ratelimit"));
        let c = load(
            GOOD,
            &[
                ("DSYS__NODES__N2__RPC_PORT", "9999"),
                ("DSYS__CLUSTER__NAME", "x"),
            ],
        )
        .unwrap();
        assert_eq!(c.nodes["n2"].rpc_port, 9999);
        assert_eq!(c.cluster.name, "x");
    }

    #[test]
    fn errors_name_the_field() {
        let e = load(&GOOD.replace("rpc_port = 7012", "rpc_port = 7001"), &[]).unwrap_err();
        assert!(e.to_string().contains("nodes.n2.rpc_port"), "{e}");
        let e = load(&GOOD.replace("region = \"us\"\n", ""), &[]).unwrap_err();
        assert!(e.to_string().contains("region"), "{e}");
        let e = load(&GOOD.replace("seeds = [\"n1\"]", "seeds = [\"n7\"]"), &[]).unwrap_err();
        assert!(e.to_string().contains("cluster.seeds"), "{e}");
        let e = load(&GOOD.replace("[nodes.n2]", "[nodes.N2]"), &[]).unwrap_err();
        assert!(e.to_string().contains("nodes."), "{e}");
        let c = load(GOOD, &[]).unwrap();
        assert!(c.node("n9").unwrap_err().to_string().contains("--node"));
        let e = load("not toml [", &[]).unwrap_err();
        assert!(matches!(e, ConfigError::Load(_)));
    }

    #[test]
    fn worker_threads_share_the_host_cpus() {
        // Both nodes of GOOD are on 127.0.0.1.
        let c = load(GOOD, &[]).unwrap();
        assert_eq!(c.worker_threads("n1", 2), 1);
        assert_eq!(c.worker_threads("n1", 8), 4);
        assert_eq!(c.worker_threads("n1", 1), 1);
        // A node alone on its host gets every CPU.
        let apart = GOOD.replace("[nodes.n2]\n", "[nodes.n2]\nhost = \"127.0.0.2\"\n");
        let c = load(&apart, &[]).unwrap();
        assert_eq!(c.worker_threads("n1", 8), 8);
        // The configured number wins.
        let c = load(GOOD, &[("DSYS__CLUSTER__WORKER_THREADS", "3")]).unwrap();
        assert_eq!(c.worker_threads("n2", 2), 3);
        let e = load(GOOD, &[("DSYS__CLUSTER__WORKER_THREADS", "5000")]).unwrap_err();
        assert!(e.to_string().contains("cluster.worker_threads"), "{e}");
    }
}
