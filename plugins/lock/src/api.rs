//! Wire types of the `lock` plugin and the `dsys lock` subcommand.

use std::time::Duration;

use dsys_runtime::{Render, RpcError};
use serde::{Deserialize, Serialize};

dsys_runtime::plugin_api!(LockApi, "lock", LockRequest, LockResponse);

/// Longest lock name or holder id.
pub const MAX_NAME_BYTES: usize = 128;
/// Shortest lease TTL of a lock (a keep-alive goes every third of it).
pub const MIN_TTL_MS: u64 = 1_000;
/// Longest lease TTL of a lock.
pub const MAX_TTL_MS: u64 = 24 * 3600 * 1000;
/// Longest wait of one acquire.
pub const MAX_WAIT_MS: u64 = 600_000;

/// Requests (all from clients; any node serves them through its `consensus` plugin).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum LockRequest {
    /// Queue for lock `name` and wait up to `wait_ms` to hold it.
    Acquire {
        /// Lock name.
        name: String,
        /// TTL of the lease behind the grant.
        ttl_ms: u64,
        /// How long to wait behind other holders (0: only if free now).
        wait_ms: u64,
        /// Holder id: a holder that already holds the lock gets it again (reentrancy,
        /// counted); without one every acquire is a new contender.
        holder: Option<String>,
        /// The serving node keeps the lease alive until release (the lock then lives as long
        /// as that node). Otherwise the grant lasts one TTL unless the caller sends
        /// [`LockRequest::KeepAlive`].
        keepalive: bool,
    },
    /// Keep the grant with this token alive for another TTL.
    KeepAlive {
        /// Lock name.
        name: String,
        /// Fencing token of the grant.
        token: u64,
    },
    /// Release the grant with this token (one level, for a reentrant holder); also withdraws
    /// a waiter.
    Release {
        /// Lock name.
        name: String,
        /// Fencing token of the grant.
        token: u64,
    },
    /// Holder and waiters of a lock (linearizable read).
    Status {
        /// Lock name.
        name: String,
    },
}

/// One contender for a lock: the holder or a waiter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contender {
    /// Its key in the consensus store.
    pub key: String,
    /// Fencing token: the create revision of its key.
    pub token: u64,
    /// Holder id, if it gave one.
    pub holder: Option<String>,
    /// Node that queued it.
    pub node: String,
    /// Lease keeping it alive.
    pub lease: u64,
    /// Reentrant hold count (1 unless a holder id acquired again).
    pub count: u32,
}

/// A lock as read at one revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockStatus {
    /// Lock name.
    pub name: String,
    /// Who holds it.
    pub holder: Option<Contender>,
    /// Who waits, in grant order.
    pub waiters: Vec<Contender>,
    /// Revision of the read.
    pub revision: u64,
}

/// Answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum LockResponse {
    /// The lock is held.
    Granted {
        /// Lock name.
        name: String,
        /// Fencing token: strictly increasing from one grant of this lock to the next
        /// (a reentrant acquire returns the token it already holds).
        token: u64,
        /// Lease behind the grant.
        lease: u64,
        /// Reentrant hold count.
        count: u32,
        /// The lease TTL.
        ttl_ms: u64,
    },
    /// The wait ended before the lock was free; the contender left the queue.
    NotAcquired {
        /// Lock name.
        name: String,
        /// Who held it then.
        holder: Option<Contender>,
    },
    /// A grant kept alive.
    Kept {
        /// Fencing token.
        token: u64,
        /// It lives this long from now.
        ttl_ms: u64,
    },
    /// A grant released.
    Released {
        /// Fencing token.
        token: u64,
        /// Reentrant holds left (0: the lock is free for the next waiter).
        remaining: u32,
    },
    /// Status.
    Status(LockStatus),
}

fn name_ok(what: &str, s: &str) -> Result<(), RpcError> {
    if s.is_empty() || s.len() > MAX_NAME_BYTES {
        return Err(RpcError::refused(format!(
            "{what} must be 1..={MAX_NAME_BYTES} bytes"
        )));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
    {
        return Err(RpcError::refused(format!(
            "{what} `{s}` has `{c}`: only ASCII letters, digits, `-`, `_`, `.` and `:` are allowed"
        )));
    }
    Ok(())
}

/// Refuse a bad lock name.
pub fn check_name(name: &str) -> Result<(), RpcError> {
    name_ok("lock name", name)
}

/// Refuse a bad holder id.
pub fn check_holder(holder: &str) -> Result<(), RpcError> {
    name_ok("holder id", holder)
}

fn check_token(token: u64) -> Result<(), RpcError> {
    if token == 0 {
        return Err(RpcError::refused(
            "a fencing token is a revision, at least 1",
        ));
    }
    Ok(())
}

impl LockRequest {
    /// Refuse bad input before anything reaches consensus.
    pub fn validate(&self) -> Result<(), RpcError> {
        match self {
            LockRequest::Acquire {
                name,
                ttl_ms,
                wait_ms,
                holder,
                ..
            } => {
                check_name(name)?;
                if let Some(h) = holder {
                    check_holder(h)?;
                }
                if !(MIN_TTL_MS..=MAX_TTL_MS).contains(ttl_ms) {
                    return Err(RpcError::refused(format!(
                        "lock TTL must be {MIN_TTL_MS}..={MAX_TTL_MS} ms, got {ttl_ms}"
                    )));
                }
                if *wait_ms > MAX_WAIT_MS {
                    return Err(RpcError::refused(format!(
                        "wait must be at most {MAX_WAIT_MS} ms, got {wait_ms}"
                    )));
                }
                Ok(())
            }
            LockRequest::KeepAlive { name, token } | LockRequest::Release { name, token } => {
                check_name(name)?;
                check_token(*token)
            }
            LockRequest::Status { name } => check_name(name),
        }
    }
}

fn who(c: &Contender) -> String {
    format!(
        "{} (token {}, node {}, lease {}{})",
        c.holder.as_deref().unwrap_or("anonymous"),
        c.token,
        c.node,
        c.lease,
        if c.count > 1 {
            format!(", held {} times", c.count)
        } else {
            String::new()
        }
    )
}

impl Render for LockResponse {
    fn human(&self) -> String {
        match self {
            // The token alone on the first line, so scripts can `read` it.
            LockResponse::Granted {
                name,
                token,
                lease,
                count,
                ttl_ms,
            } => format!(
                "{token}\n(lock {name} granted: fencing token {token}, lease {lease}, TTL {ttl_ms} ms{})",
                if *count > 1 {
                    format!(", held {count} times")
                } else {
                    String::new()
                }
            ),
            LockResponse::NotAcquired { name, holder } => match holder {
                Some(h) => format!("lock {name} not acquired: held by {}", who(h)),
                None => format!("lock {name} not acquired"),
            },
            LockResponse::Kept { token, ttl_ms } => {
                format!("grant {token} kept alive for {ttl_ms} ms")
            }
            LockResponse::Released { token, remaining } => {
                if *remaining == 0 {
                    format!("grant {token} released")
                } else {
                    format!("grant {token} released once, still held {remaining} time(s)")
                }
            }
            LockResponse::Status(s) => {
                let mut out = format!("lock {} at revision {}\n", s.name, s.revision);
                match &s.holder {
                    Some(h) => out.push_str(&format!("holder   {}\n", who(h))),
                    None => out.push_str("holder   (free)\n"),
                }
                for (i, w) in s.waiters.iter().enumerate() {
                    out.push_str(&format!("waiter {} {}\n", i + 1, who(w)));
                }
                out
            }
        }
    }

    fn exit_code(&self) -> i32 {
        match self {
            LockResponse::NotAcquired { .. } => 1,
            _ => 0,
        }
    }
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("`{s}`: {e} (e.g. 10s, 500ms, 2m)"))
}

/// `dsys lock ...`
#[derive(clap::Subcommand, Debug, Clone)]
pub enum LockCommand {
    /// Wait for lock NAME and print its fencing token (exit 1 if --wait runs out).
    Acquire {
        /// Lock name.
        name: String,
        /// Lease TTL: the grant ends this long after the last keep-alive.
        #[arg(long, default_value = "10s", value_parser = parse_ttl)]
        ttl: Duration,
        /// How long to wait behind other holders (0: only if free now).
        #[arg(long, default_value = "0s", value_parser = parse_ttl)]
        wait: Duration,
        /// Holder id; the same holder acquiring again gets the same grant (reentrant).
        #[arg(long)]
        holder: Option<String>,
        /// Let the node that answers keep the lease alive until `release` (the lock then
        /// lives as long as that node); without it the grant lasts one TTL unless renewed
        /// with `dsys lock keepalive`.
        #[arg(long)]
        keepalive: bool,
    },
    /// Renew the grant with TOKEN for another TTL.
    Keepalive {
        /// Lock name.
        name: String,
        /// Fencing token printed by acquire.
        #[arg(long)]
        token: u64,
    },
    /// Release the grant with TOKEN.
    Release {
        /// Lock name.
        name: String,
        /// Fencing token printed by acquire.
        #[arg(long)]
        token: u64,
    },
    /// Holder, fencing token and waiters of lock NAME.
    Status {
        /// Lock name.
        name: String,
    },
    /// Hold lock NAME while CMD runs (keep-alive from this process), then release it; exits
    /// with CMD's exit code. CMD sees DSYS_LOCK_NAME and DSYS_LOCK_TOKEN.
    Run {
        /// Lock name.
        name: String,
        /// Lease TTL.
        #[arg(long, default_value = "10s", value_parser = parse_ttl)]
        ttl: Duration,
        /// How long to wait for the lock.
        #[arg(long, default_value = "60s", value_parser = parse_ttl)]
        wait: Duration,
        /// Holder id.
        #[arg(long)]
        holder: Option<String>,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true, num_args = 1..)]
        cmd: Vec<String>,
    },
}

/// What `dsys lock run` needs.
#[derive(Debug, Clone)]
pub struct RunArgs {
    /// Lock name.
    pub name: String,
    /// Lease TTL.
    pub ttl: Duration,
    /// Wait for the lock.
    pub wait: Duration,
    /// Holder id.
    pub holder: Option<String>,
    /// Program and arguments.
    pub cmd: Vec<String>,
}

impl LockCommand {
    /// The request this command sends (`run` sends several: see [`LockCommand::run_args`]).
    pub fn request(&self) -> Result<LockRequest, String> {
        let req = match self {
            LockCommand::Acquire {
                name,
                ttl,
                wait,
                holder,
                keepalive,
            } => LockRequest::Acquire {
                name: name.clone(),
                ttl_ms: ttl.as_millis() as u64,
                wait_ms: wait.as_millis() as u64,
                holder: holder.clone(),
                keepalive: *keepalive,
            },
            LockCommand::Keepalive { name, token } => LockRequest::KeepAlive {
                name: name.clone(),
                token: *token,
            },
            LockCommand::Release { name, token } => LockRequest::Release {
                name: name.clone(),
                token: *token,
            },
            LockCommand::Status { name } => LockRequest::Status { name: name.clone() },
            LockCommand::Run { .. } => {
                return Err("`lock run` is not a single request: use run_args()".into())
            }
        };
        req.validate().map_err(|e| e.to_string())?;
        Ok(req)
    }

    /// For `run`: its arguments.
    pub fn run_args(&self) -> Option<RunArgs> {
        match self {
            LockCommand::Run {
                name,
                ttl,
                wait,
                holder,
                cmd,
            } => Some(RunArgs {
                name: name.clone(),
                ttl: *ttl,
                wait: *wait,
                holder: holder.clone(),
                cmd: cmd.clone(),
            }),
            _ => None,
        }
    }

    /// The client deadline this command needs: an acquire may wait `--wait` before it
    /// answers, so the client must wait longer than that.
    pub fn client_timeout(&self, default: Duration) -> Duration {
        match self {
            LockCommand::Acquire { wait, .. } | LockCommand::Run { wait, .. } => {
                default.max(*wait + Duration::from_secs(10))
            }
            _ => default,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_holders_are_checked() {
        assert!(check_name("jobs.nightly-1:a_b").is_ok());
        for bad in ["", "a/b", "a b", "é", &"x".repeat(MAX_NAME_BYTES + 1)] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_holder("worker/1").is_err());
    }

    #[test]
    fn acquire_bounds_are_refused() {
        let acq = |ttl_ms, wait_ms| LockRequest::Acquire {
            name: "x".into(),
            ttl_ms,
            wait_ms,
            holder: None,
            keepalive: false,
        };
        assert!(acq(MIN_TTL_MS, 0).validate().is_ok());
        assert!(acq(MIN_TTL_MS - 1, 0).validate().is_err());
        assert!(acq(MAX_TTL_MS + 1, 0).validate().is_err());
        assert!(acq(MIN_TTL_MS, MAX_WAIT_MS + 1).validate().is_err());
        let rel = LockRequest::Release {
            name: "x".into(),
            token: 0,
        };
        assert!(rel.validate().is_err());
    }

    #[test]
    fn cli_parses_run_and_acquire() {
        use clap::Parser;
        #[derive(clap::Parser, Debug)]
        struct Cli {
            #[command(subcommand)]
            cmd: LockCommand,
        }
        let c = Cli::try_parse_from(["dsys", "acquire", "db", "--ttl", "5s", "--wait", "2s"])
            .expect("parse");
        match c.cmd.request().expect("request") {
            LockRequest::Acquire {
                ttl_ms, wait_ms, ..
            } => assert_eq!((ttl_ms, wait_ms), (5000, 2000)),
            other => panic!("{other:?}"),
        }
        assert!(c.cmd.client_timeout(Duration::from_secs(5)) >= Duration::from_secs(12));
        let c =
            Cli::try_parse_from(["dsys", "run", "db", "--", "sh", "-c", "echo hi"]).expect("parse");
        let r = c.cmd.run_args().expect("run args");
        assert_eq!(r.cmd, ["sh", "-c", "echo hi"]);
        assert!(Cli::try_parse_from(["dsys", "run", "db"]).is_err());
        let c = Cli::try_parse_from(["dsys", "acquire", "db", "--ttl", "10ms"]).expect("parse");
        assert!(
            c.cmd.request().is_err(),
            "a 10 ms TTL is refused at the edge"
        );
        assert!(Cli::try_parse_from(["dsys", "acquire", "db", "--ttl", "ten"]).is_err());
    }
}
