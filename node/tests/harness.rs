//! The test harness's own promises (tests/common).

mod common;

use std::collections::BTreeSet;

/// A stopped node restarts on its old ports, so no later call in the same
/// test process may hand one of them to anyone else (a parallel test once
/// took a stopped node's HTTP port and its restart failed).
#[test]
fn free_ports_never_hands_out_a_port_twice_in_one_process() {
    let mut seen = BTreeSet::new();
    for _ in 0..250 {
        for port in common::free_ports(4) {
            assert!(seen.insert(port), "port {port} handed out twice");
        }
    }
}
