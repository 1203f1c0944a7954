//! Multi-node tests on the in-process `TestCluster`: one binary, one module per concern.

mod bad_input;
mod client;
mod kv;
mod kv_partition;
mod membership;
mod metrics;
mod ratelimit;
mod security;
mod supervision;
