//! The dashboard every node serves at `/`: one page (embedded in the binary, no assets from
//! the internet) fed by server-sent events from `/api/stream`. Each event is a [`PageState`]:
//! the members as this node sees them, the ring's virtual nodes, request and error counts of
//! every reachable node, the panels of the selected node's plugins and the new timeline
//! entries. Plugins contribute a [`Panel`] through [`crate::Plugin::panel`]; the page renders
//! every panel with one generic renderer (figures, then tables).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::faults::FaultRules;
use crate::process::Usage;
use crate::sys::{SysApi, SysRequest, SysResponse, SysService};
use crate::timeline::{now_ms, TimelineEvent};

/// The page itself.
pub(crate) const INDEX_HTML: &str = include_str!("dashboard/index.html");

/// Largest number of rows a panel table keeps (the rest are counted, not shown).
pub const MAX_PANEL_ROWS: usize = 50;

/// A plugin's contribution to the dashboard.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Panel {
    /// Set by the runtime: the plugin's name.
    pub plugin: String,
    /// Heading.
    pub title: String,
    /// Figures shown as label: value.
    pub stats: Vec<(String, String)>,
    /// Tables shown under the figures.
    pub tables: Vec<PanelTable>,
}

/// A table in a [`Panel`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PanelTable {
    /// Heading.
    pub title: String,
    /// Column names.
    pub columns: Vec<String>,
    /// Rows, each as many cells as columns.
    pub rows: Vec<Vec<String>>,
    /// Rows left out to keep the panel small.
    pub more: usize,
}

impl Panel {
    /// A panel with this heading.
    pub fn new(title: impl Into<String>) -> Self {
        Panel {
            title: title.into(),
            ..Panel::default()
        }
    }

    /// Add a figure.
    pub fn stat(mut self, label: impl Into<String>, value: impl ToString) -> Self {
        self.stats.push((label.into(), value.to_string()));
        self
    }

    /// Add a table; rows beyond [`MAX_PANEL_ROWS`] are counted in `more`.
    pub fn table(
        mut self,
        title: impl Into<String>,
        columns: &[&str],
        rows: impl IntoIterator<Item = Vec<String>>,
    ) -> Self {
        let mut t = PanelTable {
            title: title.into(),
            columns: columns.iter().map(|c| c.to_string()).collect(),
            ..PanelTable::default()
        };
        for r in rows {
            if t.rows.len() < MAX_PANEL_ROWS {
                t.rows.push(r);
            } else {
                t.more += 1;
            }
        }
        self.tables.push(t);
        self
    }
}

/// What one node tells the dashboard about itself (`SysRequest::Dashboard`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeDashboard {
    /// Node id.
    pub node: String,
    /// Requests its plugins served since it started.
    pub requests: u64,
    /// Of which failed (timeouts, unavailable plugins, internal errors; not refusals).
    pub errors: u64,
    /// Its plugins' panels.
    pub panels: Vec<Panel>,
    /// Fault rules in force on it.
    pub faults: FaultRules,
    /// Its resident memory and CPU time.
    #[serde(default)]
    pub usage: Option<Usage>,
}

/// One member as the page shows it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct MemberRow {
    id: String,
    /// alive, suspect, joining, dead, left, unseen.
    state: String,
    region: String,
    generation: u64,
    uptime_ms: u64,
    restarts: u32,
    failed: Vec<String>,
    plugins: Vec<String>,
    http_addr: Option<String>,
}

/// Request counts of one node at the time of the snapshot (the page turns them into rates).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Counts {
    requests: u64,
    errors: u64,
    /// Resident bytes and CPU milliseconds so far (the page turns the latter into a rate).
    rss_bytes: Option<u64>,
    cpu_ms: Option<u64>,
}

/// The ring as drawn: members and their virtual nodes.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RingView {
    nodes: Vec<String>,
    /// (position 0..1, index into `nodes`).
    points: Vec<(f64, u32)>,
}

/// One server-sent event of `/api/stream`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PageState {
    node: String,
    now_ms: u64,
    members: Vec<MemberRow>,
    ring: RingView,
    counts: BTreeMap<String, Counts>,
    panels_of: String,
    panels: Vec<Panel>,
    faults: BTreeMap<String, FaultRules>,
    pub(crate) timeline: Vec<TimelineEvent>,
}

/// How long the page waits for another node's figures before drawing without them.
const PEER_TIMEOUT: Duration = Duration::from_millis(400);

/// Build one snapshot: this node's view, plus every reachable member's counts, and the
/// panels of `panels_of` (default: this node). Timeline entries after `after`.
pub(crate) async fn snapshot(
    sys: &Arc<SysService>,
    panels_of: Option<&str>,
    after: u64,
) -> PageState {
    let status = sys.status();
    let view = sys.membership.view();
    let now = now_ms();
    let members = status
        .members
        .iter()
        .map(|m| {
            let suspect = view.members.get(&m.id).is_some_and(|v| v.suspect);
            MemberRow {
                id: m.id.clone(),
                state: if m.state == "alive" && suspect {
                    "suspect".into()
                } else {
                    m.state.clone()
                },
                region: m.region.clone(),
                generation: m.generation,
                uptime_ms: if m.generation > 0 && m.state == "alive" {
                    now.saturating_sub(m.generation)
                } else {
                    0
                },
                restarts: m.restarts,
                failed: m.failed.clone(),
                plugins: m.plugins.clone(),
                http_addr: m.http_addr.clone(),
            }
        })
        .collect();
    let ring = sys.membership.ring();
    let ring_view = RingView {
        nodes: ring.nodes().to_vec(),
        points: ring.points(),
    };
    let panels_of = panels_of
        .filter(|n| view.members.contains_key(*n))
        .unwrap_or(&sys.me)
        .to_string();
    let mut set = tokio::task::JoinSet::new();
    for m in status.members.iter().filter(|m| m.state == "alive") {
        let (rpc, id) = (sys.rpc.clone(), m.id.clone());
        set.spawn(async move {
            let r = rpc
                .call_with_timeout::<SysApi>(&id, &SysRequest::Dashboard, PEER_TIMEOUT)
                .await;
            (id, r)
        });
    }
    let mut counts = BTreeMap::new();
    let mut faults = BTreeMap::new();
    let mut panels = Vec::new();
    while let Some(Ok((id, r))) = set.join_next().await {
        if let Ok(SysResponse::Dashboard(d)) = r {
            counts.insert(
                id.clone(),
                Counts {
                    requests: d.requests,
                    errors: d.errors,
                    rss_bytes: d.usage.map(|u| u.rss_bytes),
                    cpu_ms: d.usage.map(|u| u.cpu_ms),
                },
            );
            if !d.faults.is_empty() {
                faults.insert(id.clone(), d.faults);
            }
            if id == panels_of {
                panels = d.panels;
            }
        }
    }
    PageState {
        node: sys.me.clone(),
        now_ms: now,
        members,
        ring: ring_view,
        counts,
        panels_of,
        panels,
        faults,
        timeline: sys.timeline.since(after),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panel_tables_keep_a_bounded_number_of_rows() {
        let p = Panel::new("t").stat("a", 1).table(
            "rows",
            &["k", "v"],
            (0..MAX_PANEL_ROWS + 7).map(|i| vec![i.to_string(), "x".into()]),
        );
        assert_eq!(p.stats, vec![("a".to_string(), "1".to_string())]);
        assert_eq!(p.tables[0].rows.len(), MAX_PANEL_ROWS);
        assert_eq!(p.tables[0].more, 7);
    }

    #[test]
    fn the_page_is_self_contained() {
        assert!(INDEX_HTML.contains("/api/stream"));
        for banned in ["http://", "https://", "//cdn", "<link"] {
            assert!(!INDEX_HTML.contains(banned), "page loads {banned}");
        }
    }
}
