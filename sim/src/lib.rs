//! `dynamo-sim`: a deterministic simulation of a dynamo cluster under madsim.
//!
//! Every node is a madsim host running the production runtime shell from
//! `dynamo-node` over a simulated disk; clients are hosts too. Faults are seeded,
//! histories are checked against the design's invariants, and the same seed
//! always gives the same trace hash. It builds only with `--cfg madsim`.
#![cfg(madsim)]

pub mod checkers;
pub mod cli;
pub mod history;
pub mod report;
pub mod run;
pub mod scenario;
pub mod trace;
pub mod workload;
pub mod world;
