//! Scenario files: the cluster, the workload, the network and disk models, and
//! timed fault steps, read from TOML. A `[swarm]` table instead draws the fault
//! mix and rates from the seed; [`Scenario::resolve`] turns either into the
//! fully explicit scenario a run executes (and prints, so a swarm run can be
//! saved as a file and replayed).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::fmt;

/// A duration in scenario files: `"250ms"`, `"5s"`, `"2m"`, or a number of ms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Millis(pub u64);

impl Serialize for Millis {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.is_multiple_of(1000) {
            s.serialize_str(&format!("{}s", self.0 / 1000))
        } else {
            s.serialize_str(&format!("{}ms", self.0))
        }
    }
}

impl<'de> Deserialize<'de> for Millis {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Millis, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(ms) => Ok(Millis(ms)),
            Raw::Text(t) => parse_duration(&t)
                .map(Millis)
                .map_err(serde::de::Error::custom),
        }
    }
}

fn parse_duration(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (num, unit) = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map(|i| t.split_at(i))
        .unwrap_or((t, "ms"));
    let value: f64 = num.parse().map_err(|_| {
        format!("duration {text:?}: expected a number and a unit, like 5s or 250ms")
    })?;
    let scale = match unit.trim() {
        "ms" => 1.0,
        "s" => 1000.0,
        "m" => 60_000.0,
        other => {
            return Err(format!(
                "duration {text:?}: unknown unit {other:?} (use ms, s or m)"
            ))
        }
    };
    Ok((value * scale).round() as u64)
}

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.0)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSpec {
    pub nodes: usize,
    pub n: u8,
    pub r: u8,
    pub w: u8,
    pub q: u32,
    /// "dvv" or "lww".
    pub versioning: String,
    pub request_timeout: Millis,
    pub max_siblings: usize,
    /// How far ahead of a node's clock a timestamp may move it
    /// (`--max-clock-drift-ms`).
    pub max_clock_drift: Millis,
    /// Time between the anti-entropy exchanges each node starts
    /// (`--anti-entropy-interval-ms`); 0, the default here, turns it off. The
    /// node's default is on; scenario files written before anti-entropy keep
    /// their traces (and their pinned seeds what they found) unless they ask.
    pub anti_entropy: Millis,
    /// Sloppy quorum (`--sloppy-quorum`): fallbacks' hints count towards W.
    /// Off, the default here, hints are still kept and handed off but only
    /// primaries count, so read-your-writes is checked; the node's default is
    /// on.
    pub sloppy_quorum: bool,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec {
            nodes: 5,
            n: 3,
            r: 2,
            w: 2,
            q: 64,
            versioning: "dvv".into(),
            request_timeout: Millis(1000),
            max_siblings: 64,
            max_clock_drift: Millis(dynamo_core::version::DEFAULT_MAX_CLOCK_DRIFT_MS),
            anti_entropy: Millis(0),
            sloppy_quorum: false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkloadSpec {
    pub clients: usize,
    pub keys: usize,
    /// How long clients issue operations (faults run in the same window).
    pub duration: Millis,
    /// Relative weights of the operation mix.
    pub put: u32,
    pub get: u32,
    pub delete: u32,
    /// Share (0..=1) of writes that send the context of the client's last read
    /// of the key (the rest are blind: no context).
    pub with_context: f64,
    /// Value sizes in bytes, inclusive range.
    pub value_size: [usize; 2],
    /// Pause between one client's operations, inclusive range.
    pub think_time: [Millis; 2],
    /// Each client sends every request to its home node (client `i` to node
    /// `i` modulo the node count), as an application beside one node does;
    /// otherwise each request goes to a node drawn at random.
    pub home_node: bool,
}

impl Default for WorkloadSpec {
    fn default() -> Self {
        WorkloadSpec {
            clients: 4,
            keys: 16,
            duration: Millis(20_000),
            put: 5,
            get: 4,
            delete: 1,
            with_context: 0.8,
            value_size: [8, 64],
            think_time: [Millis(5), Millis(50)],
            home_node: false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkSpec {
    /// One-way latency range, inclusive.
    pub latency: [Millis; 2],
    /// Packet loss rate (madsim's TCP retransmits: loss shows up as delay).
    pub loss: f64,
}

impl Default for NetworkSpec {
    fn default() -> Self {
        NetworkSpec {
            latency: [Millis(1), Millis(5)],
            loss: 0.0,
        }
    }
}

/// What a crash does to writes that were applied but not yet synced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LoseUnsynced {
    /// Every unsynced write is lost.
    #[default]
    All,
    /// A random subset survives (a disk that reorders writes).
    RandomSubset,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiskSpec {
    pub lose_unsynced: LoseUnsynced,
    /// The node's sync policy: "always", "interval:<ms>" or "none".
    pub sync: String,
    /// How long one fsync takes, inclusive range: writes sit applied but
    /// volatile for that long, and a crash in between loses them.
    pub sync_latency: [Millis; 2],
}

impl Default for DiskSpec {
    fn default() -> Self {
        DiskSpec {
            lose_unsynced: LoseUnsynced::All,
            sync: "always".into(),
            sync_latency: [Millis(1), Millis(4)],
        }
    }
}

/// The liveness phase after the workload: heal, restart, read everything with
/// R = N, then let the cluster quiesce.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LivenessSpec {
    /// How long the cluster gets, after the final reads, to converge.
    pub quiesce: Millis,
    /// Read every key with R = N after healing (read repair then converges
    /// the replicas). Off, only anti-entropy can, and the convergence checker
    /// tests it.
    pub read_all: bool,
}

impl Default for LivenessSpec {
    fn default() -> Self {
        LivenessSpec {
            quiesce: Millis(5_000),
            read_all: true,
        }
    }
}

/// One fault or repair, at a time from the start of the run. (serde cannot deny
/// unknown fields through `flatten`; `Action` denies them itself.)
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub at: Millis,
    #[serde(flatten)]
    pub action: Action,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// Kill the node; its unsynced writes are lost (see `[disk]`).
    Crash {
        node: String,
    },
    /// Start a crashed node again from its disk; a node whose disk failed is
    /// killed first and gets a working disk (what it had synced survives).
    Restart {
        node: String,
    },
    /// The node's disk fails every write, sync and metadata write from now on.
    /// The node stops itself at its first failure, as `dynamo server` does,
    /// and stays down until a `restart`.
    DiskFail {
        node: String,
    },
    /// The node's disk stalls for `duration`: every sync that starts meanwhile
    /// finishes only after the stall (a gray failure; writes, reads and the
    /// node itself go on). What the stall holds back is volatile until then.
    DiskStall {
        node: String,
        duration: Millis,
    },
    /// Every read of the node's stored data fails for `duration` (unreadable
    /// sectors); writes and syncs go on. The node stays up: it answers gets
    /// and replication with the read error.
    ReadFail {
        node: String,
        duration: Millis,
    },
    /// Freeze the node (its tasks stop; its sockets stay open).
    Pause {
        node: String,
    },
    Resume {
        node: String,
    },
    /// Cut the cluster (clients included, each with its node of the same
    /// index) into groups that cannot reach each other.
    Partition {
        groups: Vec<Vec<String>>,
    },
    /// Traffic from every node in `from` to every node in `to` is dropped.
    OneWay {
        from: Vec<String>,
        to: Vec<String>,
    },
    /// Cut `node` off from everyone.
    Isolate {
        node: String,
    },
    /// Two halves that reach each other only through `via`.
    Bridge {
        left: Vec<String>,
        via: String,
        right: Vec<String>,
    },
    /// Remove every partition and clog.
    Heal,
    Loss {
        rate: f64,
    },
    Latency {
        min: Millis,
        max: Millis,
    },
    /// Shift the node's clock by `ms` (negative: behind).
    Skew {
        node: String,
        ms: i64,
    },
    Join {
        node: String,
    },
    Leave {
        node: String,
    },
    Remove {
        node: String,
    },
}

impl Action {
    pub fn name(&self) -> &'static str {
        match self {
            Action::Crash { .. } => "crash",
            Action::Restart { .. } => "restart",
            Action::DiskFail { .. } => "disk_fail",
            Action::DiskStall { .. } => "disk_stall",
            Action::ReadFail { .. } => "read_fail",
            Action::Pause { .. } => "pause",
            Action::Resume { .. } => "resume",
            Action::Partition { .. } => "partition",
            Action::OneWay { .. } => "one_way",
            Action::Isolate { .. } => "isolate",
            Action::Bridge { .. } => "bridge",
            Action::Heal => "heal",
            Action::Loss { .. } => "loss",
            Action::Latency { .. } => "latency",
            Action::Skew { .. } => "skew",
            Action::Join { .. } => "join",
            Action::Leave { .. } => "leave",
            Action::Remove { .. } => "remove",
        }
    }
}

/// Ranges a swarm run draws from. Each fault kind is on or off per seed; the
/// number of faults and their rates come from the seed too.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SwarmSpec {
    pub faults: [usize; 2],
    pub crash: bool,
    pub pause: bool,
    pub partition: bool,
    pub loss: bool,
    pub latency: bool,
    pub skew: bool,
    /// Also fail disks (`disk_fail`, then a `restart`), drawn from a stream of
    /// their own so the other draws of a seed stay as they were without it.
    pub disk_fail: bool,
    /// Also stall disks (`disk_stall`), likewise from a stream of their own.
    pub disk_stall: bool,
    /// Also make disks' reads fail for a while (`read_fail`), likewise.
    pub read_fail: bool,
    /// Also run anti-entropy, likewise drawn from a stream of its own: in
    /// half the seeds, at 20-200 ms between exchanges, and in half of those
    /// without the final reads, so that only anti-entropy converges them.
    pub anti_entropy: bool,
    /// Also run with a sloppy quorum, likewise drawn from a stream of its
    /// own: in half the seeds.
    pub sloppy_quorum: bool,
    pub max_loss: f64,
    pub max_latency: Millis,
    pub max_skew: Millis,
    /// Also draw the cluster size (3..=nodes) and the op mix.
    pub vary_cluster: bool,
}

impl Default for SwarmSpec {
    fn default() -> Self {
        SwarmSpec {
            faults: [2, 10],
            crash: true,
            pause: true,
            partition: true,
            loss: true,
            latency: true,
            skew: true,
            // Off unless a file asks: a swarm file written before disk
            // failures keeps meaning what it did.
            disk_fail: false,
            disk_stall: false,
            read_fail: false,
            anti_entropy: false,
            sloppy_quorum: false,
            max_loss: 0.2,
            max_latency: Millis(100),
            max_skew: Millis(2_000),
            vary_cluster: true,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Scenario {
    pub name: String,
    pub cluster: ClusterSpec,
    pub workload: WorkloadSpec,
    pub network: NetworkSpec,
    pub disk: DiskSpec,
    pub liveness: LivenessSpec,
    #[serde(rename = "step", skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<Step>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swarm: Option<SwarmSpec>,
}

/// When a swarm fault starts and ends (in the first 90% of the run, lasting
/// half a second to a third of the run more) and the node it strikes.
fn draw_window(rng: &mut ChaCha8Rng, names: &[String], duration: u64) -> (u64, u64, String) {
    let at = rng.gen_range(0..duration * 9 / 10);
    let end = (at + rng.gen_range(500..=duration / 3 + 500)).min(duration);
    let node = names[rng.gen_range(0..names.len())].clone();
    (at, end, node)
}

/// A fault at `at`, and a restart of `node` at `end`.
fn fault_then_restart(at: u64, end: u64, fault: Action, node: String) -> [Step; 2] {
    [
        Step {
            at: Millis(at),
            action: fault,
        },
        Step {
            at: Millis(end),
            action: Action::Restart { node },
        },
    ]
}

/// A swarm seed's anti-entropy: on in one seed in two, at 20-200 ms between
/// exchanges; in half of those the final reads are skipped, so convergence is
/// anti-entropy's alone, and the quiesce is long enough for every node to go
/// through each of its (partition, replica) pairs twice.
fn draw_anti_entropy(seed: u64, s: &mut Scenario) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xa17e_e7a0);
    if !rng.gen_bool(0.5) {
        return;
    }
    let interval = rng.gen_range(20..=200u64);
    s.cluster.anti_entropy = Millis(interval);
    if rng.gen_bool(0.5) {
        s.liveness.read_all = false;
        // A node is a primary of at most every partition, with n - 1 others.
        let pairs = u64::from(s.cluster.q) * u64::from(s.cluster.n.saturating_sub(1)).max(1);
        s.liveness.quiesce = Millis(s.liveness.quiesce.0.max(2 * pairs * interval));
    }
}

/// A swarm seed's disk failures: in one seed in three, one or two nodes' disks
/// fail at a random time and the node is restarted on a working disk up to a
/// third of the run later. Drawn from their own stream, so turning them on adds
/// steps to a seed without changing its other draws.
fn disk_failures(seed: u64, names: &[String], duration: u64) -> Vec<Step> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xd15c_fa11);
    if !rng.gen_bool(1.0 / 3.0) {
        return Vec::new();
    }
    let mut steps = Vec::new();
    for _ in 0..rng.gen_range(1..=2) {
        let (at, end, node) = draw_window(&mut rng, names, duration);
        let fail = Action::DiskFail { node: node.clone() };
        steps.extend(fault_then_restart(at, end, fail, node));
    }
    steps
}

/// A swarm seed's timed disk faults of one kind (stalls, failing reads): in
/// one seed in three, one to three of them, each of half a second to a third
/// of the run, on random nodes at random times. Each kind draws from a stream
/// of its own (`salt`), as disk failures do.
fn timed_disk_faults(
    seed: u64,
    salt: u64,
    names: &[String],
    duration: u64,
    fault: fn(String, Millis) -> Action,
) -> Vec<Step> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ salt);
    if !rng.gen_bool(1.0 / 3.0) {
        return Vec::new();
    }
    (0..rng.gen_range(1..=3))
        .map(|_| {
            let (at, end, node) = draw_window(&mut rng, names, duration);
            Step {
                at: Millis(at),
                action: fault(node, Millis(end - at)),
            }
        })
        .collect()
}

/// The scenario used when none is given: five nodes, crashes, a partition.
pub const DEFAULT_SCENARIO: &str = include_str!("../../scenarios/default.toml");

impl Scenario {
    pub fn parse(text: &str) -> anyhow::Result<Scenario> {
        let scenario: Scenario = toml::from_str(text)?;
        scenario.validate()?;
        Ok(scenario)
    }

    pub fn node_names(&self) -> Vec<String> {
        (1..=self.cluster.nodes).map(|i| format!("n{i}")).collect()
    }

    /// Checks names and numbers, and rejects steps that need later issues.
    pub fn validate(&self) -> anyhow::Result<()> {
        let c = &self.cluster;
        anyhow::ensure!(c.nodes >= 1, "[cluster] nodes must be at least 1");
        anyhow::ensure!(
            c.n >= 1 && c.r >= 1 && c.w >= 1,
            "[cluster] n, r and w must be at least 1"
        );
        anyhow::ensure!(
            c.r <= c.n && c.w <= c.n,
            "[cluster] r and w cannot exceed n"
        );
        anyhow::ensure!(c.q.is_power_of_two(), "[cluster] q must be a power of two");
        anyhow::ensure!(
            matches!(c.versioning.as_str(), "dvv" | "lww"),
            "[cluster] versioning must be \"dvv\" or \"lww\""
        );
        let w = &self.workload;
        anyhow::ensure!(w.keys >= 1, "[workload] keys must be at least 1");
        anyhow::ensure!(
            w.put + w.get + w.delete > 0,
            "[workload] the op mix is all zero"
        );
        anyhow::ensure!(
            w.value_size[0] <= w.value_size[1],
            "[workload] value_size is [min, max]"
        );
        anyhow::ensure!(
            w.think_time[0] <= w.think_time[1],
            "[workload] think_time is [min, max]"
        );
        anyhow::ensure!(
            self.network.latency[0] <= self.network.latency[1] && self.network.latency[0].0 >= 1,
            "[network] latency is [min, max] with min at least 1ms"
        );
        anyhow::ensure!(
            (0.0..1.0).contains(&self.network.loss),
            "[network] loss is in [0, 1)"
        );
        self.disk
            .sync
            .parse::<dynamo_node::storage::SyncPolicy>()
            .map_err(|e| anyhow::anyhow!("[disk] sync: {e}"))?;
        let names = self.node_names();
        let known = |n: &String| -> anyhow::Result<()> {
            anyhow::ensure!(
                names.contains(n),
                "step names unknown node {n:?} (nodes are n1..n{})",
                c.nodes
            );
            Ok(())
        };
        for step in &self.steps {
            match &step.action {
                Action::Crash { node }
                | Action::Restart { node }
                | Action::DiskFail { node }
                | Action::Pause { node }
                | Action::Resume { node }
                | Action::Isolate { node }
                | Action::Skew { node, .. } => known(node)?,
                Action::Partition { groups } => {
                    for n in groups.iter().flatten() {
                        known(n)?;
                    }
                }
                Action::OneWay { from, to } => {
                    for n in from.iter().chain(to) {
                        known(n)?;
                    }
                }
                Action::Bridge { left, via, right } => {
                    for n in left.iter().chain(right).chain(std::iter::once(via)) {
                        known(n)?;
                    }
                }
                Action::Loss { rate } => {
                    anyhow::ensure!((0.0..1.0).contains(rate), "loss rate must be in [0, 1)")
                }
                Action::Latency { min, max } => {
                    anyhow::ensure!(min <= max && min.0 >= 1, "latency is min..max, min >= 1ms")
                }
                Action::DiskStall { node, duration } | Action::ReadFail { node, duration } => {
                    known(node)?;
                    anyhow::ensure!(
                        duration.0 >= 1,
                        "{} needs a duration of at least 1ms",
                        step.action.name()
                    );
                }
                Action::Heal => {}
                Action::Join { .. } | Action::Leave { .. } | Action::Remove { .. } => {
                    anyhow::bail!(
                        "step `{}` at {} is not supported yet: joins, leaves and removals \
                         land with the Membership issue",
                        step.action.name(),
                        step.at
                    )
                }
            }
        }
        Ok(())
    }

    /// The explicit scenario for `seed`: a swarm scenario draws its cluster,
    /// workload and fault steps from the seed; an explicit one is returned as is.
    pub fn resolve(&self, seed: u64) -> Scenario {
        let Some(swarm) = &self.swarm else {
            return self.clone();
        };
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_5a4d);
        let mut s = self.clone();
        s.swarm = None;
        if swarm.vary_cluster {
            s.cluster.nodes = rng.gen_range(3..=self.cluster.nodes.max(3));
            s.cluster.n = rng.gen_range(1..=3u8).min(s.cluster.nodes as u8).max(2);
            let strict = rng.gen_bool(0.7);
            s.cluster.r = if strict { s.cluster.n / 2 + 1 } else { 1 };
            s.cluster.w = s.cluster.n + 1 - s.cluster.r.min(s.cluster.n);
            if !strict {
                s.cluster.w = rng.gen_range(1..=s.cluster.n);
            }
            s.workload.put = rng.gen_range(1..=6);
            s.workload.get = rng.gen_range(1..=6);
            s.workload.delete = rng.gen_range(0..=2);
            s.workload.keys = rng.gen_range(2..=self.workload.keys.max(2));
            s.disk.lose_unsynced = if rng.gen_bool(0.5) {
                LoseUnsynced::All
            } else {
                LoseUnsynced::RandomSubset
            };
            // One cluster in five runs last-write-wins, where skew matters.
            if rng.gen_bool(0.2) {
                s.cluster.versioning = "lww".into();
            }
        }
        let names = s.node_names();
        let duration = s.workload.duration.0.max(1_000);
        let count = rng.gen_range(swarm.faults[0]..=swarm.faults[1].max(swarm.faults[0]));
        let mut kinds = Vec::new();
        for (on, kind) in [
            (swarm.crash, "crash"),
            (swarm.pause, "pause"),
            (swarm.partition, "partition"),
            (swarm.loss, "loss"),
            (swarm.latency, "latency"),
            (swarm.skew, "skew"),
        ] {
            // Each enabled kind is in this seed's mix with probability 2/3.
            if on && rng.gen_bool(2.0 / 3.0) {
                kinds.push(kind);
            }
        }
        let mut steps = Vec::new();
        if !kinds.is_empty() {
            for _ in 0..count {
                let (at, end, node) = draw_window(&mut rng, &names, duration);
                match kinds[rng.gen_range(0..kinds.len())] {
                    "crash" => {
                        let crash = Action::Crash { node: node.clone() };
                        steps.extend(fault_then_restart(at, end, crash, node));
                    }
                    "pause" => {
                        steps.push(Step {
                            at: Millis(at),
                            action: Action::Pause { node: node.clone() },
                        });
                        steps.push(Step {
                            at: Millis(end),
                            action: Action::Resume { node },
                        });
                    }
                    "partition" => {
                        let mut shuffled = names.clone();
                        for i in (1..shuffled.len()).rev() {
                            shuffled.swap(i, rng.gen_range(0..=i));
                        }
                        let cut = rng.gen_range(1..shuffled.len().max(2));
                        let (a, b) = shuffled.split_at(cut.min(shuffled.len()));
                        let action = if rng.gen_bool(0.25) {
                            Action::OneWay {
                                from: a.to_vec(),
                                to: b.to_vec(),
                            }
                        } else {
                            Action::Partition {
                                groups: vec![a.to_vec(), b.to_vec()],
                            }
                        };
                        steps.push(Step {
                            at: Millis(at),
                            action,
                        });
                        steps.push(Step {
                            at: Millis(end),
                            action: Action::Heal,
                        });
                    }
                    "loss" => {
                        let rate = (rng.gen_range(0.0..swarm.max_loss.max(0.001)) * 1000.0).round()
                            / 1000.0;
                        steps.push(Step {
                            at: Millis(at),
                            action: Action::Loss { rate },
                        });
                        steps.push(Step {
                            at: Millis(end),
                            action: Action::Loss { rate: 0.0 },
                        });
                    }
                    "latency" => {
                        let max = rng.gen_range(2..=swarm.max_latency.0.max(2));
                        steps.push(Step {
                            at: Millis(at),
                            action: Action::Latency {
                                min: Millis(1),
                                max: Millis(max),
                            },
                        });
                        steps.push(Step {
                            at: Millis(end),
                            action: Action::Latency {
                                min: s.network.latency[0],
                                max: s.network.latency[1],
                            },
                        });
                    }
                    _ => {
                        let max = swarm.max_skew.0 as i64;
                        let ms = rng.gen_range(-max..=max);
                        steps.push(Step {
                            at: Millis(at),
                            action: Action::Skew { node, ms },
                        });
                    }
                }
            }
        }
        if swarm.disk_fail {
            steps.extend(disk_failures(seed, &names, duration));
        }
        if swarm.disk_stall {
            steps.extend(timed_disk_faults(
                seed,
                0x5a11_ed15,
                &names,
                duration,
                |node, duration| Action::DiskStall { node, duration },
            ));
        }
        if swarm.read_fail {
            steps.extend(timed_disk_faults(
                seed,
                0xbad5_ec70,
                &names,
                duration,
                |node, duration| Action::ReadFail { node, duration },
            ));
        }
        if swarm.anti_entropy {
            draw_anti_entropy(seed, &mut s);
        }
        if swarm.sloppy_quorum {
            s.cluster.sloppy_quorum = ChaCha8Rng::seed_from_u64(seed ^ 0x5109_9e11).gen_bool(0.5);
        }
        steps.sort_by_key(|s| s.at);
        s.steps = steps;
        s
    }

    /// The scenario as TOML (what `sim run` prints at start).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot print the scenario: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("5s"), Ok(5000));
        assert_eq!(parse_duration("250ms"), Ok(250));
        assert_eq!(parse_duration("1.5s"), Ok(1500));
        assert_eq!(parse_duration("2m"), Ok(120_000));
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn every_shipped_scenario_parses_and_round_trips() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let s = Scenario::parse(&text).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            let resolved = s.resolve(7);
            let again = Scenario::parse(&resolved.to_toml()).unwrap();
            assert_eq!(again, resolved, "{}", path.display());
            seen += 1;
        }
        assert!(seen >= 6);
    }

    #[test]
    fn swarm_is_deterministic_per_seed_and_varies_across_seeds() {
        let s = Scenario::parse("name = \"swarm\"\n[swarm]\n").unwrap();
        assert_eq!(s.resolve(3), s.resolve(3));
        let distinct: std::collections::BTreeSet<String> =
            (0..20).map(|seed| s.resolve(seed).to_toml()).collect();
        assert!(distinct.len() > 15);
    }

    /// Resolves 60 seeds of the swarm with and without `flag` turned on,
    /// checks that turning it on changes no other draw (cluster, workload, the
    /// other steps) and returns, per seed, the steps it added.
    fn steps_added_by(flag: &str) -> Vec<(u64, Vec<Step>)> {
        let off = Scenario::parse("name = \"swarm\"\n[swarm]\n").unwrap();
        let on = Scenario::parse(&format!("name = \"swarm\"\n[swarm]\n{flag} = true\n")).unwrap();
        (0..60)
            .map(|seed| {
                let (a, b) = (off.resolve(seed), on.resolve(seed));
                assert_eq!(a.cluster, b.cluster, "seed {seed}");
                assert_eq!(a.workload, b.workload, "seed {seed}");
                let (added, rest): (Vec<Step>, Vec<Step>) =
                    b.steps.into_iter().partition(|s| !a.steps.contains(s));
                assert_eq!(rest, a.steps, "seed {seed}: a draw of the rest changed");
                (seed, added)
            })
            .collect()
    }

    #[test]
    fn swarm_disk_failures_add_steps_and_change_no_other_draw() {
        let added = steps_added_by("disk_fail");
        for (seed, failing) in &added {
            assert!(
                failing.len() % 2 == 0 && failing.len() <= 4,
                "seed {seed}: {failing:?}"
            );
            for fail in failing {
                let Action::DiskFail { node } = &fail.action else {
                    continue;
                };
                let replaced = failing
                    .iter()
                    .any(|s| s.at >= fail.at && s.action == Action::Restart { node: node.clone() });
                assert!(replaced, "seed {seed}: {node}'s disk is never replaced");
            }
        }
        let seeds_with_failures = added.iter().filter(|(_, a)| !a.is_empty()).count();
        assert!(
            (10..=35).contains(&seeds_with_failures),
            "{seeds_with_failures} of 60"
        );
    }

    #[test]
    fn swarm_anti_entropy_is_on_in_some_seeds_and_changes_no_other_draw() {
        let without = Scenario::parse("name = \"swarm\"\n[swarm]\n").unwrap();
        let with = Scenario::parse("name = \"swarm\"\n[swarm]\nanti_entropy = true\n").unwrap();
        let (mut on, mut reads_skipped) = (0, 0);
        for seed in 0..60 {
            let (a, b) = (without.resolve(seed), with.resolve(seed));
            assert_eq!(a.steps, b.steps, "seed {seed}");
            assert_eq!(a.workload, b.workload, "seed {seed}");
            assert_eq!(a.cluster.anti_entropy, Millis(0));
            assert!(a.liveness.read_all);
            let mut cluster = b.cluster.clone();
            cluster.anti_entropy = Millis(0);
            assert_eq!(a.cluster, cluster, "seed {seed}");
            if b.cluster.anti_entropy.0 > 0 {
                on += 1;
                assert!((20..=200).contains(&b.cluster.anti_entropy.0));
            }
            if !b.liveness.read_all {
                reads_skipped += 1;
                assert!(
                    b.cluster.anti_entropy.0 > 0,
                    "seed {seed}: no reads and no anti-entropy"
                );
                let sweep = u64::from(b.cluster.q) * u64::from(b.cluster.n - 1);
                assert!(b.liveness.quiesce.0 >= 2 * sweep * b.cluster.anti_entropy.0);
            }
        }
        assert!((20..=40).contains(&on), "{on} of 60");
        assert!((5..=25).contains(&reads_skipped), "{reads_skipped} of 60");
    }

    #[test]
    fn swarm_disk_stalls_and_read_failures_add_steps_and_change_no_other_draw() {
        for flag in ["disk_stall", "read_fail"] {
            let added = steps_added_by(flag);
            for (seed, faults) in &added {
                assert!(faults.len() <= 3, "{flag} seed {seed}: {faults:?}");
                for fault in faults {
                    let (Action::DiskStall { duration, .. } | Action::ReadFail { duration, .. }) =
                        &fault.action
                    else {
                        panic!("{flag} seed {seed}: not a timed disk fault: {fault:?}");
                    };
                    assert_eq!(fault.action.name(), flag);
                    assert!(duration.0 >= 1, "{flag} seed {seed}: {fault:?}");
                }
            }
            let seeds_with = added.iter().filter(|(_, a)| !a.is_empty()).count();
            assert!(
                (10..=35).contains(&seeds_with),
                "{flag}: {seeds_with} of 60"
            );
        }
        // The two kinds draw from streams of their own.
        let both =
            Scenario::parse("name = \"swarm\"\n[swarm]\ndisk_stall = true\nread_fail = true\n")
                .unwrap();
        let differ = (0..60)
            .filter(|&seed| {
                let steps = both.resolve(seed).steps;
                let stalls = steps.iter().filter(|s| s.action.name() == "disk_stall");
                let reads = steps.iter().filter(|s| s.action.name() == "read_fail");
                stalls.map(|s| s.at).collect::<Vec<_>>() != reads.map(|s| s.at).collect::<Vec<_>>()
            })
            .count();
        assert!(differ >= 20, "{differ} of 60");
    }

    #[test]
    fn later_issue_steps_are_refused_clearly() {
        let err = Scenario::parse("[[step]]\nat = \"1s\"\naction = \"join\"\nnode = \"n6\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not supported yet"), "{err}");
    }
}
