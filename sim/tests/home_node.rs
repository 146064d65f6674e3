//! The workload's `home_node`: each client sends every request to its own node.
#![cfg(madsim)]

use dynamo_sim::run;
use dynamo_sim::scenario::Scenario;
use std::collections::BTreeSet;

const CLIENTS: usize = 5;

/// For each workload client, the nodes it sent requests to.
fn nodes_used(home_node: bool) -> Vec<BTreeSet<String>> {
    let text = format!(
        "name = \"home\"\n[cluster]\nnodes = 3\n[workload]\nclients = {CLIENTS}\n\
         duration = \"2s\"\nhome_node = {home_node}\n"
    );
    let seed = 1;
    let scenario = Scenario::parse(&text).unwrap().resolve(seed);
    let rt = madsim::runtime::Runtime::with_seed_and_config(seed, madsim::Config::default());
    let result = rt.block_on(run::run(scenario, seed)).unwrap();
    let mut used = vec![BTreeSet::new(); CLIENTS];
    // Clients past the workload's read everything at the end, from every node.
    for op in result.history.ops.iter().filter(|op| op.client < CLIENTS) {
        used[op.client].insert(op.node.clone());
    }
    used
}

#[test]
fn each_client_sends_every_request_to_its_home_node() {
    let used = nodes_used(true);
    for (client, nodes) in used.iter().enumerate() {
        let home = format!("n{}", client % 3 + 1);
        assert_eq!(nodes, &BTreeSet::from([home]), "client {client}");
    }
    // Without it, requests go to nodes drawn at random.
    let spread = nodes_used(false);
    assert!(spread.iter().all(|nodes| nodes.len() == 3), "{spread:?}");
}
