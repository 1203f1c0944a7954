//! The dashboard in a real browser: three `dsys` agents, the page loaded in headless Chromium
//! (through chromedriver) from one of them; the three nodes render alive; one is SIGKILLed and
//! the page shows it dead within 5 s; a screenshot is saved under
//! `target/test-output/dashboard/`. Needs the Debian packages chromium and chromium-driver
//! (`.ci/run` installs them).

mod common;
#[path = "common/webdriver.rs"]
mod webdriver;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use webdriver::Browser;

/// The node states the page shows, by node id (from the cards' `data-state`).
fn page_states(b: &Browser) -> BTreeMap<String, String> {
    let v = b
        .eval(
            "return Array.from(document.querySelectorAll('.node'))\
             .map(e => [e.dataset.node, e.dataset.state]);",
        )
        .unwrap_or_default();
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| Some((p[0].as_str()?.to_string(), p[1].as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

fn output_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-output/dashboard");
    std::fs::create_dir_all(&d).expect("output folder");
    d
}

fn http_addr(cfg: &std::path::Path, ep: std::net::SocketAddr, id: &str) -> String {
    let out = dsys(
        cfg,
        &[
            "--json",
            "--endpoints",
            &ep.to_string(),
            "cluster",
            "status",
        ],
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
    v["members"]
        .as_array()
        .and_then(|a| a.iter().find(|m| m["id"] == id))
        .and_then(|m| m["http_addr"].as_str())
        .expect("http address")
        .to_string()
}

#[test]
fn dashboard_shows_a_sigkilled_node_dead_within_5s() {
    let (mut agents, cfg, eps) = Agents::start(3);
    assert!(
        converged(&cfg, &eps, 3, Duration::from_secs(60)),
        "3 agents did not converge"
    );
    let browser = Browser::start().expect("headless Chromium through chromedriver");
    let url = format!("http://{}/", http_addr(&cfg, eps[0], "n1"));
    browser.goto(&url).expect("load the dashboard");

    let all_alive = wait(Duration::from_secs(30), || {
        let s = page_states(&browser);
        ["n1", "n2", "n3"]
            .iter()
            .all(|n| s.get(*n).map(String::as_str) == Some("alive"))
    });
    assert!(all_alive, "page shows {:?}", page_states(&browser));
    // The ring is drawn and the plugins' panels are there.
    let drawn = browser
        .eval("return document.querySelectorAll('#ring-svg line').length;")
        .expect("eval");
    assert!(drawn.as_u64().unwrap_or(0) >= 3, "ring lines: {drawn}");
    let panels = wait(Duration::from_secs(10), || {
        browser
            .eval("return Array.from(document.querySelectorAll('.panel')).map(p => p.dataset.plugin);")
            .ok()
            .and_then(|v| v.as_array().cloned())
            .is_some_and(|a| a.iter().any(|p| p == "kv") && a.iter().any(|p| p == "ratelimit"))
    });
    assert!(panels, "kv and ratelimit panels missing");

    let t = Instant::now();
    agents.sigkill("n3");
    let dead = wait(Duration::from_secs(5), || {
        page_states(&browser).get("n3").map(String::as_str) == Some("dead")
    });
    let took = t.elapsed();
    let shot = browser.screenshot().expect("screenshot");
    let path = output_dir().join("n3-killed.png");
    std::fs::write(&path, &shot).expect("save screenshot");
    assert!(
        shot.starts_with(b"\x89PNG"),
        "screenshot is not a PNG ({} bytes)",
        shot.len()
    );
    assert!(
        dead,
        "n3 not dead on the page 5 s after SIGKILL: {:?}",
        page_states(&browser)
    );
    // The timeline says so too.
    let timeline = browser
        .eval("return document.getElementById('timeline').innerText;")
        .expect("eval");
    assert!(
        timeline
            .as_str()
            .is_some_and(|t| t.contains("n3") && t.contains("dead")),
        "timeline: {timeline}"
    );
    eprintln!(
        "n3 shown dead {} ms after SIGKILL; screenshot {}",
        took.as_millis(),
        path.display()
    );
    assert_eq!(
        page_states(&browser).get("n1").map(String::as_str),
        Some("alive")
    );
}
