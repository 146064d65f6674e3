//! One simulated run: build the world, run the workload and the fault steps,
//! then the liveness phase (heal, restart, read everything with R = N unless
//! the scenario leaves that to anti-entropy, quiesce), then the checkers.

use crate::checkers::{check_all, CheckParams, CheckReport};
use crate::history::History;
use crate::scenario::Scenario;
use crate::trace::Trace;
use crate::workload::{self, key_name, Shared};
use crate::world::World;
use dynamo_core::version::Versioning;
use madsim::time::{sleep, Duration};

/// How long after a fault changes the cluster's shape requests must succeed
/// again: peers reconnect within their 2 s backoff cap.
pub const DETECTOR_TIMEOUT_MS: u64 = 3_000;

pub struct RunResult {
    pub seed: u64,
    pub scenario: Scenario,
    pub history: History,
    pub checks: Vec<CheckReport>,
    pub sim_ms: u64,
    pub faults: usize,
    pub trace_hash: String,
    pub messages: u64,
    pub unreadable_keys: usize,
}

pub async fn run(scenario: Scenario, seed: u64) -> anyhow::Result<RunResult> {
    let trace = Trace::new();
    let mut world = World::build(&scenario, seed, &trace)?;
    let shared = Shared::new();
    let addrs: Vec<(String, String)> = world
        .nodes
        .iter()
        .map(|n| (n.name.clone(), n.client_addr.clone()))
        .collect();
    let duration = scenario.workload.duration.0;

    let mut clients = Vec::new();
    for (j, host) in world.client_hosts.iter().enumerate() {
        let task = workload::client_loop(
            j,
            scenario.clone(),
            addrs.clone(),
            seed,
            shared.clone(),
            duration,
        );
        clients.push(host.spawn(task));
    }
    for step in &scenario.steps {
        world
            .run_until(shared.start + Duration::from_millis(step.at.0))
            .await;
        world.apply(&step.action);
    }
    world
        .run_until(shared.start + Duration::from_millis(duration))
        .await;
    for c in clients {
        // A client stops at the deadline, after at most one request timeout.
        let _ = c.await;
    }

    // Liveness phase.
    world.heal_everything();
    sleep(Duration::from_millis(DETECTOR_TIMEOUT_MS)).await;
    let n = scenario.cluster.n.min(scenario.cluster.nodes as u8);
    let reader = world.client_hosts.first().cloned().unwrap_or_else(|| {
        madsim::runtime::Handle::current()
            .create_node()
            .name("reader")
            .ip(crate::world::client_ip(200))
            .build()
    });
    let unreadable_keys = if scenario.liveness.read_all {
        reader
            .spawn(workload::read_everything(
                usize::MAX,
                scenario.workload.keys,
                n,
                addrs.clone(),
                scenario.cluster.request_timeout.0,
                shared.clone(),
            ))
            .await
            .unwrap_or(scenario.workload.keys)
    } else {
        0
    };
    sleep(Duration::from_millis(scenario.liveness.quiesce.0)).await;
    let sim_ms = shared.elapsed_ms();

    let keys: Vec<_> = (0..scenario.workload.keys).map(key_name).collect();
    let final_state = world.final_state(&keys);
    let history = shared.history.lock().unwrap().clone();
    let params = CheckParams {
        versioning: if scenario.cluster.versioning == "lww" {
            Versioning::Lww
        } else {
            Versioning::Dvv
        },
        n,
        r: scenario.cluster.r.min(n),
        w: scenario.cluster.w.min(n),
        sync_always: scenario.disk.sync == "always",
        sloppy_quorum: scenario.cluster.sloppy_quorum,
        request_timeout_ms: scenario.cluster.request_timeout.0,
        detector_timeout_ms: DETECTOR_TIMEOUT_MS,
        fault_windows: world.fault_windows(sim_ms),
    };
    let checks = check_all(&history, &final_state, &params);
    let (trace_hash, messages) = trace.finish();
    Ok(RunResult {
        seed,
        scenario,
        history,
        checks,
        sim_ms,
        faults: world.faults_injected,
        trace_hash,
        messages,
        unreadable_keys,
    })
}
