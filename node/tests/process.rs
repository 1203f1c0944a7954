//! Process-level tests of the real `dsys` binary: three agents started as child processes,
//! one SIGKILLed and restarted; and the CLI's exit codes and messages for bad input.

mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn sigkilled_agent_is_seen_dead_then_back() {
    let (mut agents, cfg, eps) = Agents::start(3);
    assert!(
        converged(&cfg, &eps, 3, Duration::from_secs(60)),
        "3 agents did not converge"
    );
    let old_gen = state_of(&status(&cfg, eps[0]).expect("status"), "n2")
        .expect("n2")
        .1;

    let t = Instant::now();
    agents.sigkill("n2");
    for ep in [eps[0], eps[2]] {
        let dead = wait(Duration::from_secs(20), || {
            status(&cfg, ep)
                .and_then(|s| state_of(&s, "n2"))
                .map(|s| s.0 == "dead")
                .unwrap_or(false)
        });
        assert!(dead, "node at {ep} did not see n2 dead");
    }
    eprintln!(
        "SIGKILLed n2 seen dead by n1 and n3 after {} ms",
        t.elapsed().as_millis()
    );

    agents.spawn(&cfg, "n2");
    let back = wait(Duration::from_secs(30), || {
        [eps[0], eps[2]].iter().all(|ep| {
            status(&cfg, *ep)
                .and_then(|s| state_of(&s, "n2"))
                .map(|(st, g)| st == "alive" && g > old_gen)
                .unwrap_or(false)
        })
    });
    assert!(back, "n2 did not come back with a new generation");
    // Until every node (n2 too) sees all three, two nodes may disagree on a key's owner.
    assert!(
        converged(&cfg, &eps, 3, Duration::from_secs(30)),
        "views did not converge"
    );

    // The global limit holds across processes: round-robin over the three agents.
    let mut allowed = 0;
    for i in 0..9 {
        let ep = eps[i % 3].to_string();
        let out = dsys(
            &cfg,
            &[
                "--endpoints",
                &ep,
                "ratelimit",
                "check",
                "dave",
                "--rule",
                "api",
            ],
        );
        match out.status.code() {
            Some(0) => allowed += 1,
            Some(1) => {}
            other => panic!(
                "unexpected exit {other:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }
    assert_eq!(allowed, 3);
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn cli_errors_have_clear_messages_and_exit_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cfg, _) = write_config(dir.path(), 2);

    // Usage errors: exit 2.
    let o = dsys(&cfg, &["ratelimit", "check"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = dsys(&cfg, &["chaos", "delay", "n1", "soon"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));

    // Unknown node, port clash, missing field: exit 2 naming the field.
    let o = dsys(&cfg, &["agent", "--node", "n7"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--node"), "{}", stderr(&o));
    let text = std::fs::read_to_string(&cfg).expect("read");
    let n2_rpc = text
        .split("[nodes.n2]")
        .nth(1)
        .and_then(|s| s.lines().find(|l| l.starts_with("rpc_port")))
        .expect("n2 rpc")
        .to_string();
    let n1_rpc = text
        .split("[nodes.n1]")
        .nth(1)
        .and_then(|s| s.lines().find(|l| l.starts_with("rpc_port")))
        .expect("n1 rpc")
        .to_string();
    let clash = dir.path().join("clash.toml");
    std::fs::write(&clash, text.replacen(&n2_rpc, &n1_rpc, 1)).expect("write");
    let o = dsys(&clash, &["agent", "--node", "n1"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("nodes.n2.rpc_port"), "{}", stderr(&o));
    let missing = dir.path().join("missing.toml");
    std::fs::write(&missing, text.replacen("region = \"us\"\n", "", 1)).expect("write");
    let o = dsys(&missing, &["agent", "--node", "n1"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("region"), "{}", stderr(&o));
    let o = dsys(&dir.path().join("nope.toml"), &["agent", "--node", "n1"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("not found"), "{}", stderr(&o));

    // No certificates yet: exit 2 and a hint.
    let o = dsys(&cfg, &["cluster", "status"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("dsys cluster init"), "{}", stderr(&o));

    // Certificates but no node running: exit 3.
    assert!(dsys(&cfg, &["cluster", "init"]).status.success());
    let o = dsys(&cfg, &["--timeout", "1s", "cluster", "status"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("no node reachable"), "{}", stderr(&o));
}
