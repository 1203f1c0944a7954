//! This process's own footprint: resident memory and CPU time (read from `/proc/self` on
//! demand, no sampling task), and whether its heap may use transparent huge pages.

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch (a node's generation is its start time in these).
pub use crate::timeline::now_ms;

/// Resident memory and CPU time of this process, read when asked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// Resident set size in bytes (`VmRSS`: heap, stacks and the mapped binary).
    pub rss_bytes: u64,
    /// Private anonymous resident bytes (`RssAnon`): what this process alone costs, the
    /// binary's shared pages left out.
    pub anon_bytes: u64,
    /// User plus system CPU time since the process started, in milliseconds.
    pub cpu_ms: u64,
}

/// Read [`Usage`] from `/proc/self`; `None` where there is no procfs (not Linux).
pub fn usage() -> Option<Usage> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib = |field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map(|k| k * 1024)
    };
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    Some(Usage {
        rss_bytes: kib("VmRSS:")?,
        anon_bytes: kib("RssAnon:").unwrap_or(0),
        cpu_ms: cpu_ms(&stat)?,
    })
}

/// utime + stime (fields 14 and 15 of `/proc/PID/stat`, in clock ticks) in milliseconds.
/// The command name (field 2) may hold spaces, so fields are counted after its `)`.
fn cpu_ms(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut f = after.split_whitespace().skip(11);
    let ticks = f.next()?.parse::<u64>().ok()? + f.next()?.parse::<u64>().ok()?;
    let hz = rustix::param::clock_ticks_per_second().max(1);
    Some(ticks * 1000 / hz)
}

/// Allow or forbid transparent huge pages for this process's future page faults.
///
/// mimalloc asks for huge pages on its arena (`madvise`), so an idle node's heap became
/// resident 2 MiB at a time: five idle nodes held 49-70 MB each instead of about 25.
/// Nodes therefore start with huge pages off; `DSYS_HUGE_PAGES=1` keeps them on.
pub fn allow_huge_pages(allow: bool) -> std::io::Result<()> {
    rustix::thread::disable_transparent_huge_pages(!allow).map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_counted_after_the_command_name() {
        // pid (comm with ") (" in it) state ppid ... utime=250 stime=50 at fields 14, 15.
        let stat = "42 (a) (b) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0 100 0 0";
        let hz = rustix::param::clock_ticks_per_second();
        assert_eq!(cpu_ms(stat), Some(300 * 1000 / hz));
        assert_eq!(cpu_ms("garbage"), None);
    }

    #[test]
    fn own_usage_is_read() {
        let u = usage().expect("procfs");
        assert!(u.rss_bytes > 0 && u.anon_bytes <= u.rss_bytes, "{u:?}");
    }
}
