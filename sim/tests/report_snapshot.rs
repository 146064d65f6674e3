//! Pins one fixed seed's report (wall time and the time ratio left out), so a
//! change in behaviour shows up as a snapshot diff. Update it deliberately with
//! `INSTA_UPDATE=always just sim-test` when behaviour is meant to change.
#![cfg(madsim)]

use dynamo_sim::scenario::{Scenario, DEFAULT_SCENARIO};
use dynamo_sim::{report, run};

#[test]
fn default_scenario_seed_7_report() {
    let seed = 7;
    let scenario = Scenario::parse(DEFAULT_SCENARIO).unwrap().resolve(seed);
    let rt = madsim::runtime::Runtime::with_seed_and_config(seed, madsim::Config::default());
    let result = rt.block_on(run::run(scenario, seed)).unwrap();
    assert_eq!(report::exit_code(&result), report::exit::PASS);
    insta::assert_snapshot!(report::render(&result, None));
}
