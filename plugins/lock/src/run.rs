//! `dsys lock run NAME -- CMD ARGS`: hold a lock while a command runs, like `etcdctl lock`.
//! This process (not a node) keeps the lease alive, so the lock lives exactly as long as the
//! command: if this process dies, the grant ends one TTL after its last keep-alive.

use std::time::Duration;

use dsys_runtime::{Client, ClientError};
use tokio::time::Instant;

use crate::api::{LockApi, LockRequest, LockResponse, RunArgs};

/// Why `run_locked` did not run the command to its end.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
    /// The wait ended before the lock was free.
    #[error("lock {0} not acquired within the wait")]
    NotAcquired(String),
    /// The cluster refused or could not be reached.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The command could not be started.
    #[error("cannot start `{0}`: {1}")]
    Spawn(String, std::io::Error),
    /// The lock was lost while the command ran (keep-alives refused or failing past the
    /// TTL); the command was killed.
    #[error("lock {name} lost while the command ran ({why}); the command was killed")]
    Lost {
        /// Lock name.
        name: String,
        /// What happened.
        why: String,
    },
}

/// Acquire `args.name` (waiting up to `args.wait`), run `args.cmd` with `DSYS_LOCK_NAME` and
/// `DSYS_LOCK_TOKEN` in its environment while keeping the lease alive every third of the
/// TTL, then release. Returns the command's exit code (128 + signal on Unix when it was
/// killed by one). `client` must have a deadline longer than `args.wait` (see
/// [`crate::LockCommand::client_timeout`]).
pub async fn run_locked(client: &Client, args: &RunArgs) -> Result<i32, RunError> {
    let Some((program, rest)) = args.cmd.split_first() else {
        return Err(RunError::Usage("no command to run".into()));
    };
    let req = LockRequest::Acquire {
        name: args.name.clone(),
        ttl_ms: args.ttl.as_millis() as u64,
        wait_ms: args.wait.as_millis() as u64,
        holder: args.holder.clone(),
        keepalive: false,
    };
    req.validate().map_err(|e| RunError::Usage(e.to_string()))?;
    let token = match client.call::<LockApi>(&req).await? {
        LockResponse::Granted { token, .. } => token,
        LockResponse::NotAcquired { .. } => return Err(RunError::NotAcquired(args.name.clone())),
        other => {
            return Err(RunError::Usage(format!(
                "unexpected answer to acquire: {other:?}"
            )))
        }
    };
    let release = LockRequest::Release {
        name: args.name.clone(),
        token,
    };
    let mut child = match tokio::process::Command::new(program)
        .args(rest)
        .env("DSYS_LOCK_NAME", &args.name)
        .env("DSYS_LOCK_TOKEN", token.to_string())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            let _ = client.call::<LockApi>(&release).await;
            return Err(RunError::Spawn(program.clone(), e));
        }
    };
    let every = args.ttl / 3;
    // The lease is certainly alive until one TTL after the last keep-alive that succeeded.
    let mut alive_until = Instant::now() + args.ttl;
    let mut next = Instant::now() + every;
    let keep = LockRequest::KeepAlive {
        name: args.name.clone(),
        token,
    };
    let lost = loop {
        tokio::select! {
            status = child.wait() => {
                let code = match status {
                    Ok(s) => exit_code(s),
                    Err(e) => return Err(RunError::Spawn(program.clone(), e)),
                };
                // Best effort: if this fails the lease still ends one TTL from now.
                if let Err(e) = client.call::<LockApi>(&release).await {
                    tracing::warn!("releasing lock {} failed: {e}", args.name);
                }
                return Ok(code);
            }
            _ = tokio::time::sleep_until(next) => {
                let sent = Instant::now();
                match client.call::<LockApi>(&keep).await {
                    Ok(LockResponse::Kept { .. }) => {
                        alive_until = sent + args.ttl;
                        next = Instant::now() + every;
                    }
                    Err(ClientError::Rpc(dsys_runtime::RpcError::Refused(m))) => break m,
                    Ok(other) => break format!("unexpected answer to keep-alive: {other:?}"),
                    Err(e) => {
                        if Instant::now() + Duration::from_millis(100) >= alive_until {
                            break format!("no keep-alive got through before the TTL ran out: {e}");
                        }
                        next = Instant::now() + every / 4;
                    }
                }
            }
        }
    };
    let _ = child.kill().await;
    Err(RunError::Lost {
        name: args.name.clone(),
        why: lost,
    })
}

#[cfg(unix)]
fn exit_code(s: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    s.code()
        .or_else(|| s.signal().map(|sig| 128 + sig))
        .unwrap_or(1)
}

#[cfg(not(unix))]
fn exit_code(s: std::process::ExitStatus) -> i32 {
    s.code().unwrap_or(1)
}
