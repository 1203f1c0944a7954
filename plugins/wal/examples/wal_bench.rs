//! `cargo run --release -p dsys-plugin-wal --example wal_bench [-- SECONDS [DIR]]`: the WAL
//! benchmark (100 B and 4 KiB records, 1/8/64 writers, beside a plain write + fdatasync loop
//! with the same batch size), printed as a table and as JSON.

use std::time::Duration;

use dsys_plugin_wal::bench::{bench, table, BenchOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let secs: f64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(3.0);
    let parent = args.next().unwrap_or_else(|| ".".into());
    let scratch = tempfile::Builder::new()
        .prefix("wal-bench-")
        .tempdir_in(&parent)?;
    let mut opts = BenchOptions::new(scratch.path());
    opts.duration = Duration::from_secs_f64(secs);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let figs = rt.block_on(bench(&opts))?;
    println!("WAL group commit vs plain write+fdatasync, {secs} s per case, in {parent}");
    print!("{}", table(&figs));
    println!("{}", serde_json::to_string(&figs)?);
    Ok(())
}
