//! Seeds the simulator once failed on, replayed as they were found. Each must
//! keep passing; add a seed here (with what it found) when a sweep turns up a
//! failure, next to any regression scenario file in `scenarios/`.
#![cfg(madsim)]

use dynamo_sim::scenario::Scenario;
use dynamo_sim::{report, run};

const SWARM: &str = include_str!("../../scenarios/swarm.toml");

/// (scenario text, seed, what the seed found).
const SEEDS: &[(&str, u64, &str)] = &[
    (
        SWARM,
        14000,
        "a node that had just restarted counted a frozen primary it had not yet \
         greeted as up, and forwarded a write to it instead of a connected primary",
    ),
    (
        SWARM,
        14182,
        "request ids started over at 1 after a restart, so a peer's late answer \
         to a read from before the restart was taken for the answer to a read of \
         another key (a sibling crossed keys)",
    ),
];

#[test]
fn every_regression_seed_passes() {
    let mut failed = Vec::new();
    for &(text, seed, found) in SEEDS {
        let scenario = Scenario::parse(text).unwrap().resolve(seed);
        let name = scenario.name.clone();
        let rt = madsim::runtime::Runtime::with_seed_and_config(seed, madsim::Config::default());
        let result = rt.block_on(run::run(scenario, seed)).unwrap();
        if report::exit_code(&result) != report::exit::PASS {
            failed.push(format!(
                "{name} seed {seed} (once found: {found}):\n{}",
                report::render(&result, None)
            ));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n\n"));
}
