//! The simulated world: one madsim host per node running the real runtime shell
//! over a simulated disk, one host per client, and the fault controls (crash,
//! restart, pause, partitions, loss, latency, clock skew).
//!
//! It keeps the timeline of fault states for the availability checker, and
//! reads every node's stored sets through the simulator-only storage hook.

use crate::checkers::FaultWindow;
use crate::history::{FinalState, Key};
use crate::scenario::{Action, LoseUnsynced, Scenario};
use crate::trace::Trace;
use dynamo_core::handoff::HINT_PARTITION;
use dynamo_core::ring::Ring;
use dynamo_node::config::{ServerArgs, ServerConfig};
use dynamo_node::runtime::{self, Clock, Environment};
use dynamo_node::storage::{MemoryStorage, Storage};
use madsim::net::NetSim;
use madsim::runtime::{Handle, NodeHandle};
use madsim::time::Duration;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

pub const PEER_PORT: u16 = 7000;
pub const CLIENT_PORT: u16 = 7100;
/// The simulated wall clock starts here (2026-01-01), the same on every run.
pub const EPOCH_MS: u64 = 1_767_225_600_000;

pub fn node_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, (i + 1) as u8))
}

pub fn client_ip(j: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 1, (j + 1) as u8))
}

pub struct SimNode {
    pub name: String,
    pub host: NodeHandle,
    pub storage: Arc<MemoryStorage>,
    pub clock: Clock,
    pub client_addr: String,
    pub crashed: bool,
    pub paused: bool,
    /// Its disk fails every write and sync (`disk_fail`) until a restart.
    pub disk_failed: bool,
}

pub struct World {
    pub scenario: Scenario,
    pub nodes: Vec<SimNode>,
    pub client_hosts: Vec<NodeHandle>,
    pub ring: Ring,
    rng: ChaCha8Rng,
    /// Host ids by node name: the node's own host and its attached clients.
    groups: BTreeMap<String, Vec<madsim::task::NodeId>>,
    clogged_links: BTreeSet<(madsim::task::NodeId, madsim::task::NodeId)>,
    clogged_nodes: BTreeSet<madsim::task::NodeId>,
    loss: f64,
    latency_max_ms: u64,
    partitioned: bool,
    windows: Vec<FaultWindow>,
    window_start_ms: u64,
    /// Timed disk faults (`disk_stall`, `read_fail`): the node's name,
    /// `[from_ms, to_ms)` and the action's name.
    timed_disk_faults: Vec<(String, u64, u64, &'static str)>,
    pub faults_injected: usize,
    start: madsim::time::Instant,
    /// Nodes (by index) whose disk failed, asking to be stopped.
    failed_disks: tokio::sync::mpsc::UnboundedReceiver<usize>,
}

impl World {
    /// Builds the cluster's hosts and starts every node.
    pub fn build(scenario: &Scenario, seed: u64, trace: &Trace) -> anyhow::Result<World> {
        let handle = Handle::current();
        let names = scenario.node_names();
        let peers: Vec<String> = names
            .iter()
            .enumerate()
            .map(|(i, n)| format!("{n}={}:{PEER_PORT}", node_ip(i)))
            .collect();
        let mut nodes = Vec::new();
        let (failed_disks, failed_disks_rx) = tokio::sync::mpsc::unbounded_channel();
        for (i, name) in names.iter().enumerate() {
            let args = ServerArgs {
                node_id: Some(name.clone()),
                peer_addr: Some(format!("{}:{PEER_PORT}", node_ip(i))),
                client_addr: Some(format!("{}:{CLIENT_PORT}", node_ip(i))),
                http_addr: Some("off".into()),
                data_dir: Some(format!("/sim/{name}").into()),
                peers: peers.clone(),
                n: Some(scenario.cluster.n),
                r: Some(scenario.cluster.r),
                w: Some(scenario.cluster.w),
                partitions: Some(scenario.cluster.q),
                sync: Some(scenario.disk.sync.clone()),
                request_timeout_ms: Some(scenario.cluster.request_timeout.0),
                max_siblings: Some(scenario.cluster.max_siblings),
                max_clock_drift_ms: Some(scenario.cluster.max_clock_drift.0),
                anti_entropy_interval_ms: Some(scenario.cluster.anti_entropy.0),
                sloppy_quorum: Some(scenario.cluster.sloppy_quorum),
                versioning: Some(scenario.cluster.versioning.clone()),
                // The row cache is off by default; the simulator runs every
                // node with it, so a cache that ever answered differently
                // from the disk would show in the checkers and the traces.
                cache_mb: Some(1),
                ..Default::default()
            };
            let config = ServerConfig::resolve(&args)?;
            let storage = Arc::new(MemoryStorage::new());
            let latency = scenario.disk.sync_latency;
            storage.set_sync_latency(latency[0].0, latency[1].0, seed ^ ((i as u64 + 1) << 48));
            let clock = Clock::starting_at(EPOCH_MS);
            let host = {
                let storage = storage.clone();
                let clock = clock.clone();
                let trace = trace.clone();
                let failed_disks = failed_disks.clone();
                let node_seed = seed ^ ((i as u64 + 1) << 32);
                handle
                    .create_node()
                    .name(name)
                    .ip(node_ip(i))
                    .init(move || {
                        let failed_disks = failed_disks.clone();
                        let config = config.clone();
                        let env = Environment {
                            storage: storage.clone() as Arc<dyn Storage>,
                            clock: clock.clone(),
                            rng: ChaCha8Rng::seed_from_u64(node_seed),
                            http_addr: None,
                            trace: Some(trace.peer_observer()),
                        };
                        async move {
                            let running = match runtime::start(&config, env).await {
                                Ok(running) => running,
                                Err(e) => panic!("node {} failed to start: {e:#}", config.node_id),
                            };
                            // It runs until the simulator kills it. When its
                            // disk fails it asks to be stopped, as `dynamo
                            // server` stops itself; the world kills it at
                            // once (a graceful drain would wake its tasks
                            // through tokio's watch channels, whose wake
                            // order is random, not the seed's).
                            let error = running.storage_failed().await;
                            tracing::warn!(node = %config.node_id, %error, "storage failed; stopping");
                            let _ = failed_disks.send(i);
                            std::future::pending::<()>().await
                        }
                    })
                    .build()
            };
            nodes.push(SimNode {
                name: name.clone(),
                host,
                storage,
                clock,
                client_addr: format!("{}:{CLIENT_PORT}", node_ip(i)),
                crashed: false,
                paused: false,
                disk_failed: false,
            });
        }
        let mut client_hosts = Vec::new();
        let mut groups: BTreeMap<String, Vec<madsim::task::NodeId>> = BTreeMap::new();
        for n in &nodes {
            groups.entry(n.name.clone()).or_default().push(n.host.id());
        }
        for j in 0..scenario.workload.clients {
            let host = handle
                .create_node()
                .name(format!("client{}", j + 1))
                .ip(client_ip(j))
                .build();
            let attached = &nodes[j % nodes.len()].name;
            groups.get_mut(attached).unwrap().push(host.id());
            client_hosts.push(host);
        }
        let ids: Vec<dynamo_proto::NodeId> = names.iter().map(|n| n.as_str().into()).collect();
        let ring = Ring::claim(scenario.cluster.q, &ids, usize::from(scenario.cluster.n))?;
        let net = NetSim::current();
        let latency = scenario.network.latency;
        let loss = scenario.network.loss;
        net.update_config(|c| {
            c.packet_loss_rate = loss;
            c.send_latency =
                Duration::from_millis(latency[0].0)..Duration::from_millis(latency[1].0 + 1);
        });
        Ok(World {
            scenario: scenario.clone(),
            nodes,
            client_hosts,
            ring,
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0xd15c),
            groups,
            clogged_links: BTreeSet::new(),
            clogged_nodes: BTreeSet::new(),
            loss,
            latency_max_ms: latency[1].0,
            partitioned: false,
            windows: Vec::new(),
            window_start_ms: 0,
            timed_disk_faults: Vec::new(),
            faults_injected: 0,
            start: madsim::time::Instant::now(),
            failed_disks: failed_disks_rx,
        })
    }

    pub fn elapsed_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn index(&self, name: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .unwrap_or_else(|| panic!("unknown node {name}"))
    }

    fn hosts_of(&self, names: &[String]) -> Vec<madsim::task::NodeId> {
        names.iter().flat_map(|n| self.groups[n].clone()).collect()
    }

    fn clog_between(&mut self, a: &[madsim::task::NodeId], b: &[madsim::task::NodeId], both: bool) {
        let net = NetSim::current();
        for &x in a {
            for &y in b {
                if x == y {
                    continue;
                }
                net.clog_link(x, y);
                self.clogged_links.insert((x, y));
                if both {
                    net.clog_link(y, x);
                    self.clogged_links.insert((y, x));
                }
            }
        }
    }

    /// Applies one scenario step.
    pub fn apply(&mut self, action: &Action) {
        let handle = Handle::current();
        let net = NetSim::current();
        self.mark_change();
        self.faults_injected += 1;
        tracing::info!(at_ms = self.elapsed_ms(), action = ?action, "fault");
        match action {
            Action::Crash { node } => {
                let i = self.index(node);
                if !self.nodes[i].crashed {
                    self.crash(i);
                }
            }
            Action::DiskFail { node } => {
                let i = self.index(node);
                if !self.nodes[i].crashed && !self.nodes[i].disk_failed {
                    self.nodes[i].storage.set_failing(true);
                    self.nodes[i].disk_failed = true;
                }
            }
            Action::DiskStall { node, duration } | Action::ReadFail { node, duration } => {
                let i = self.index(node);
                let now = self.elapsed_ms();
                let to = now.saturating_add(duration.0);
                self.timed_disk_faults
                    .push((node.clone(), now, to, action.name()));
                // The disk misbehaves whether or not its node is up; a node
                // restarted meanwhile finds it so.
                let storage = &self.nodes[i].storage;
                match action {
                    Action::DiskStall { .. } => {
                        storage.stall_syncs(Duration::from_millis(duration.0))
                    }
                    _ => storage.fail_reads(Duration::from_millis(duration.0)),
                }
            }
            Action::Restart { node } => {
                let i = self.index(node);
                if self.nodes[i].disk_failed {
                    self.crash(i);
                }
                if self.nodes[i].crashed {
                    handle.restart(self.nodes[i].host.id());
                    self.nodes[i].crashed = false;
                }
            }
            Action::Pause { node } => {
                let i = self.index(node);
                if !self.nodes[i].crashed && !self.nodes[i].paused {
                    handle.pause(self.nodes[i].host.id());
                    self.nodes[i].paused = true;
                }
            }
            Action::Resume { node } => {
                let i = self.index(node);
                if self.nodes[i].paused {
                    handle.resume(self.nodes[i].host.id());
                    self.nodes[i].paused = false;
                }
            }
            Action::Partition { groups } => {
                let hosts: Vec<Vec<_>> = groups.iter().map(|g| self.hosts_of(g)).collect();
                for a in 0..hosts.len() {
                    for b in a + 1..hosts.len() {
                        let (x, y) = (hosts[a].clone(), hosts[b].clone());
                        self.clog_between(&x, &y, true);
                    }
                }
                self.partitioned = true;
            }
            Action::OneWay { from, to } => {
                let (x, y) = (self.hosts_of(from), self.hosts_of(to));
                self.clog_between(&x, &y, false);
                self.partitioned = true;
            }
            Action::Isolate { node } => {
                let id = self.nodes[self.index(node)].host.id();
                net.clog_node(id);
                self.clogged_nodes.insert(id);
                self.partitioned = true;
            }
            Action::Bridge {
                left,
                via: _,
                right,
            } => {
                let (x, y) = (self.hosts_of(left), self.hosts_of(right));
                self.clog_between(&x, &y, true);
                self.partitioned = true;
            }
            Action::Heal => self.heal_network(),
            Action::Loss { rate } => {
                let rate = *rate;
                net.update_config(|c| c.packet_loss_rate = rate);
                self.loss = rate;
            }
            Action::Latency { min, max } => {
                let (lo, hi) = (min.0, max.0);
                net.update_config(|c| {
                    c.send_latency = Duration::from_millis(lo)..Duration::from_millis(hi + 1)
                });
                self.latency_max_ms = hi;
            }
            Action::Skew { node, ms } => {
                let i = self.index(node);
                self.nodes[i].clock.set_skew_ms(*ms);
            }
            Action::Join { .. } | Action::Leave { .. } | Action::Remove { .. } => {
                unreachable!("validated away: membership changes are not supported yet")
            }
        }
    }

    fn heal_network(&mut self) {
        let net = NetSim::current();
        for (a, b) in std::mem::take(&mut self.clogged_links) {
            net.unclog_link(a, b);
        }
        for id in std::mem::take(&mut self.clogged_nodes) {
            net.unclog_node(id);
        }
        self.partitioned = false;
    }

    /// Ends every fault: heal, calm the network, resume and restart every node.
    pub fn heal_everything(&mut self) {
        self.mark_change();
        self.heal_network();
        let latency = self.scenario.network.latency;
        NetSim::current().update_config(|c| {
            c.packet_loss_rate = 0.0;
            c.send_latency =
                Duration::from_millis(latency[0].0)..Duration::from_millis(latency[1].0 + 1);
        });
        self.loss = 0.0;
        self.latency_max_ms = latency[1].0;
        let handle = Handle::current();
        for i in 0..self.nodes.len() {
            if self.nodes[i].disk_failed {
                self.crash(i);
            }
        }
        for n in &mut self.nodes {
            if n.paused {
                handle.resume(n.host.id());
                n.paused = false;
            }
            if n.crashed {
                handle.restart(n.host.id());
                n.crashed = false;
            }
        }
    }

    /// Waits until `deadline`, meanwhile stopping every node whose disk
    /// failed (as `dynamo server` stops itself).
    pub async fn run_until(&mut self, deadline: madsim::time::Instant) {
        loop {
            tokio::select! {
                biased;
                Some(i) = self.failed_disks.recv() => {
                    if self.nodes[i].disk_failed {
                        tracing::info!(at_ms = self.elapsed_ms(), node = %self.nodes[i].name, "stopped: its disk failed");
                        self.mark_change();
                        self.crash(i);
                    }
                }
                _ = madsim::time::sleep_until(deadline) => return,
            }
        }
    }

    /// Kills node `i` and loses its unsynced writes (see `[disk]`). A failed
    /// disk is replaced: the node restarts from what it had synced.
    fn crash(&mut self, i: usize) {
        Handle::current().kill(self.nodes[i].host.id());
        match self.scenario.disk.lose_unsynced {
            LoseUnsynced::All => self.nodes[i].storage.crash(),
            LoseUnsynced::RandomSubset => {
                let storage = self.nodes[i].storage.clone();
                storage.crash_keep_random_subset(&mut self.rng);
            }
        }
        self.nodes[i].storage.set_failing(false);
        self.nodes[i].disk_failed = false;
        self.nodes[i].crashed = true;
        self.nodes[i].paused = false;
    }

    /// Closes the window of the fault state that held until now; call it just
    /// before the state changes.
    fn mark_change(&mut self) {
        let now = self.elapsed_ms();
        let closed = self.windows_until(now);
        self.windows.extend(closed);
        self.window_start_ms = now;
    }

    /// The windows of the fault state that holds since the last change, up to
    /// `to_ms`: one, or more where timed disk faults end meanwhile (they end
    /// without a step).
    fn windows_until(&self, to_ms: u64) -> Vec<FaultWindow> {
        let from_ms = self.window_start_ms;
        let mut cuts: Vec<u64> = self
            .timed_disk_faults
            .iter()
            .map(|&(_, _, end, _)| end)
            .filter(|&end| from_ms < end && end < to_ms)
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        let bounds: Vec<u64> = std::iter::once(from_ms)
            .chain(cuts)
            .chain(std::iter::once(to_ms))
            .collect();
        bounds
            .windows(2)
            .map(|w| self.current_window(w[0], w[1]))
            .collect()
    }

    /// The window `[from_ms, to_ms)` in the fault state that holds now.
    fn current_window(&self, from_ms: u64, to_ms: u64) -> FaultWindow {
        let timeout = self.scenario.cluster.request_timeout.0;
        FaultWindow {
            from_ms,
            to_ms,
            down: self
                .nodes
                .iter()
                .filter(|n| n.crashed || n.paused || n.disk_failed)
                .map(|n| n.name.clone())
                .collect(),
            stalled: self.disk_faulty("disk_stall", from_ms, to_ms),
            unreadable: self.disk_faulty("read_fail", from_ms, to_ms),
            network_clean: !self.partitioned
                && self.loss == 0.0
                && self.latency_max_ms * 4 < timeout,
        }
    }

    /// The nodes with a timed disk fault `kind` during `[from_ms, to_ms)`.
    fn disk_faulty(&self, kind: &str, from_ms: u64, to_ms: u64) -> BTreeSet<String> {
        self.timed_disk_faults
            .iter()
            .filter(|&&(_, from, to, k)| k == kind && from < to_ms && from_ms < to)
            .map(|(node, ..)| node.clone())
            .collect()
    }

    /// Every fault window, the last one open until `end_ms`.
    pub fn fault_windows(&self, end_ms: u64) -> Vec<FaultWindow> {
        let mut windows = self.windows.clone();
        windows.extend(self.windows_until(end_ms));
        windows
    }

    /// Every node's stored sets, read straight from its simulated disk, and each
    /// key's primaries.
    pub fn final_state(&self, keys: &[Key]) -> FinalState {
        let mut state = FinalState::default();
        let n = usize::from(self.scenario.cluster.n).min(self.nodes.len());
        for key in keys {
            let partition = self.ring.partition_for_key(key);
            let primaries = self
                .ring
                .primaries(partition, n)
                .into_iter()
                .map(|p| p.to_string())
                .collect();
            state.primaries.insert(key.clone(), primaries);
        }
        for node in &self.nodes {
            let mut stored = BTreeMap::new();
            for key in keys {
                let partition = self.ring.partition_for_key(key);
                if let Ok(Some(set)) = node.storage.get(partition, key) {
                    stored.insert(key.clone(), set);
                }
            }
            state.stored.insert(node.name.clone(), stored);
            let hints = node
                .storage
                .scan_partition(HINT_PARTITION, None, usize::MAX)
                .map(|hints| hints.into_iter().map(|(key, _)| key).collect())
                // A scan that fails shows as a hint the checker cannot read,
                // not as none.
                .unwrap_or_else(|e| vec![format!("(the hint scan failed: {e})").into_bytes()]);
            state.hints.insert(node.name.clone(), hints);
        }
        state
    }

    /// A random node name (for clients choosing where to send).
    pub fn random_node(&mut self) -> usize {
        self.rng.gen_range(0..self.nodes.len())
    }
}
