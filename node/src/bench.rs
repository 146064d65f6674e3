//! `dynamo bench`: a load generator for a running cluster over the binary client
//! protocol.
//!
//! `--concurrency` workers send every request straight to the first (up)
//! primary of its key, found from the ring the cluster reports once at start
//! ([`Router`]), over `--connections` pipelined connections per node that all
//! workers share ([`ConnPool`], [`SharedConnection`]). Keys are `bench:<index>`, drawn
//! uniformly or from a Zipfian distribution ([`Zipfian`], theta 0.99) by a seeded
//! rng per worker.
//!
//! Writes are blind `SET`s: `ClientRequest::Put` with no context and
//! [`WriteMode::Overwrite`], which supersedes every version the coordinating
//! primary holds. A context-less put in the default mode would add a sibling on
//! every write, so hot keys would soon hit `max_siblings`.
//!
//! Two ways to pace the load:
//! - closed loop (the default): each worker sends its next request as soon as the
//!   previous one is answered; latency is measured from the send.
//! - open loop (`--rate`): operations are scheduled at fixed intervals
//!   ([`OpenLoop`]) whatever the answers do, and latency is measured from the
//!   *scheduled* start, so a stall shows up as queueing in the percentiles rather
//!   than being hidden by the workers' pause (coordinated omission). An
//!   operation the runtime's 1 ms timer lets go up to a tick early counts from
//!   its send instead ([`wait_for_slot`]).
//!
//! Only the measured phase (after `--warmup`, after `--prefill`) is recorded.
//! Latency percentiles cover successful operations; failures are counted by kind.
//! Results: a human table and `name: value` lines on stdout ([`Summary`]), the
//! same fields plus a per-second series as JSON (`--json`), and a hand-written
//! SVG plot of p50/p99 and throughput over time (`--svg`).

use crate::cli::EXIT_OK;
use crate::client::{Client, ClientIoError, ClientOptions, RingRoute, SharedConnection};
use anyhow::{bail, Context as _};
use dynamo_core::ring::Ring;
use dynamo_proto::{ClientError, ClientReply, ClientRequest, WriteMode};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// Zipfian skew, as YCSB's default.
pub const ZIPF_THETA: f64 = 0.99;
/// The run length when neither `--duration` nor `--requests` is given.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(10);
/// Largest latency the histograms hold (larger values are clamped), in µs.
const HIST_MAX_US: u64 = 600_000_000;
/// Significant digits of the whole-run histograms (0.1% resolution).
const HIST_SIGFIG: u8 = 3;
/// Significant digits of the per-second histograms (1% resolution, small).
const SERIES_SIGFIG: u8 = 2;
/// A worker whose every node refused a connection waits this long before the
/// next operation, rather than spinning.
const CONNECT_FAIL_PAUSE: Duration = Duration::from_millis(20);
/// How often the progress bar is updated.
const PROGRESS_TICK: Duration = Duration::from_millis(200);

// ---------------------------------------------------------------------------
// Arguments

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Distribution {
    /// Every key equally likely.
    Uniform,
    /// A few hot keys (theta 0.99, as YCSB): key 0 hottest, then key 1, ...
    Zipfian,
}

impl Distribution {
    fn name(self) -> &'static str {
        match self {
            Distribution::Uniform => "uniform",
            Distribution::Zipfian => "zipfian",
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// A node's client address (host:port). Repeat, or comma-separate, to give
    /// several; the first that answers tells the ring, and every request goes to
    /// a primary of its key.
    #[arg(
        long = "node",
        value_name = "ADDR",
        env = "DYNAMO_NODES",
        value_delimiter = ',',
        default_value = "127.0.0.1:7100"
    )]
    pub nodes: Vec<String>,
    /// Concurrent workers (operations in flight).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub concurrency: u32,
    /// Connections to each node, shared by the workers: each request is
    /// pipelined on one of them and its reply matched by id, as drivers that
    /// multiplex (gRPC, Cassandra's) do. Set it to the concurrency for one
    /// connection per worker, as a client without pipelining has.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub connections: u32,
    /// Size of the key space (keys bench:0000000000 ...).
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub keys: u64,
    /// How keys are drawn.
    #[arg(long, value_enum, default_value_t = Distribution::Uniform)]
    pub distribution: Distribution,
    /// Bytes per written value.
    #[arg(long, value_name = "BYTES", default_value_t = 100)]
    pub value_size: usize,
    /// Fraction of operations that are reads (0..1); the rest are writes.
    #[arg(long, value_name = "RATIO", default_value_t = 0.5, value_parser = parse_ratio)]
    pub read_ratio: f64,
    /// How long to measure (e.g. 10s, 500ms, 2m). Default 10s unless --requests.
    #[arg(long, value_name = "TIME", value_parser = parse_duration, conflicts_with = "requests")]
    pub duration: Option<Duration>,
    /// Measure exactly this many operations instead of a duration.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub requests: Option<u64>,
    /// Open loop: schedule this many operations per second in total, and measure
    /// latency from each one's scheduled start (or from its send, when the
    /// runtime's 1 ms timer let it go up to a tick early). Without it: closed loop, as fast
    /// as the workers go. Each worker has one operation in flight and owns every
    /// `--concurrency`-th slot, so give it workers enough for a slow answer not to
    /// delay the schedule: rate x 0.05 allows 50 ms per answer.
    #[arg(long, value_name = "OPS_PER_SEC", value_parser = parse_rate)]
    pub rate: Option<f64>,
    /// Write quorum per write (default: the cluster's W).
    #[arg(long)]
    pub w: Option<u8>,
    /// Read quorum per read (default: the cluster's R).
    #[arg(long)]
    pub r: Option<u8>,
    /// Run the load this long before measuring (not recorded).
    #[arg(long, value_name = "TIME", value_parser = parse_duration, default_value = "1s")]
    pub warmup: Duration,
    /// Write every key once before the warmup, so reads find a value.
    #[arg(long)]
    pub prefill: bool,
    /// Seed of the key, operation and value generators.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Write every result (percentiles, errors, per-second series) as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write an SVG plot of p50/p99 latency and throughput per second here.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
    /// No progress bar (it is also hidden when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,
    /// Give up on one request after this long (counted as an io/timeout error).
    #[arg(long, value_name = "MS", default_value_t = 5_000)]
    pub timeout_ms: u64,
    /// Threads that run the workers [default: one per core]. The generator
    /// shares the machine with what it measures: on a small machine running
    /// the cluster too, one thread (no wakeups across threads) leaves the
    /// nodes more of it.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: Option<u16>,
}

/// Parses `10s`, `500ms`, `2m`, `1h`, `250us` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (try 10s, 500ms, 2m)"))?;
    let scale = match unit.trim() {
        "" | "s" | "sec" | "secs" => 1.0,
        "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?} (use us, ms, s, m, h)"
            ))
        }
    };
    let secs = value * scale;
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("{text:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_ratio(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("{text:?}: give a fraction between 0 and 1")),
    }
}

fn parse_rate(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!(
            "{text:?}: give a positive number of operations per second"
        )),
    }
}

// ---------------------------------------------------------------------------
// Key distributions

/// YCSB's Zipfian generator (Gray et al., "Quickly generating billion-record
/// synthetic databases"): item `i` of `n` is drawn with probability proportional
/// to `1 / (i + 1)^theta`, so item 0 is the hottest.
#[derive(Clone, Debug)]
pub struct Zipfian {
    n: u64,
    theta: f64,
    alpha: f64,
    zetan: f64,
    eta: f64,
    half_pow_theta: f64,
}

/// `sum_{i=1..n} 1 / i^theta`: exact up to ten million terms, then the
/// Euler-Maclaurin estimate of the rest (its error is far below 1e-9).
fn zeta(n: u64, theta: f64) -> f64 {
    zeta_exact_up_to(n, theta, 10_000_000)
}

fn zeta_exact_up_to(n: u64, theta: f64, exact: u64) -> f64 {
    let m = n.min(exact).max(1);
    let mut sum = 0.0;
    for i in 1..=m {
        sum += 1.0 / (i as f64).powf(theta);
    }
    if n > m {
        let (nf, mf) = (n as f64, m as f64);
        sum += (nf.powf(1.0 - theta) - mf.powf(1.0 - theta)) / (1.0 - theta)
            + (nf.powf(-theta) - mf.powf(-theta)) / 2.0;
    }
    sum
}

impl Zipfian {
    /// Items `0..n`; `theta` in (0, 1).
    pub fn new(n: u64, theta: f64) -> Zipfian {
        let n = n.max(1);
        let zetan = zeta(n, theta);
        let zeta2 = zeta(2.min(n), theta);
        let eta = (1.0 - (2.0 / n as f64).powf(1.0 - theta)) / (1.0 - zeta2 / zetan);
        Zipfian {
            n,
            theta,
            alpha: 1.0 / (1.0 - theta),
            zetan,
            eta,
            half_pow_theta: 0.5f64.powf(theta),
        }
    }

    pub fn n(&self) -> u64 {
        self.n
    }

    pub fn theta(&self) -> f64 {
        self.theta
    }

    /// The probability of item 0, the hottest.
    pub fn top_probability(&self) -> f64 {
        1.0 / self.zetan
    }

    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> u64 {
        let u: f64 = rng.gen();
        let uz = u * self.zetan;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + self.half_pow_theta {
            return 1.min(self.n - 1);
        }
        let v = self.n as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha);
        (v as u64).min(self.n - 1)
    }
}

/// Draws key indexes.
#[derive(Clone, Debug)]
pub enum KeyChooser {
    Uniform(u64),
    Zipfian(Arc<Zipfian>),
}

impl KeyChooser {
    pub fn new(distribution: Distribution, keys: u64) -> KeyChooser {
        match distribution {
            Distribution::Uniform => KeyChooser::Uniform(keys.max(1)),
            Distribution::Zipfian => KeyChooser::Zipfian(Arc::new(Zipfian::new(keys, ZIPF_THETA))),
        }
    }

    pub fn keys(&self) -> u64 {
        match self {
            KeyChooser::Uniform(n) => *n,
            KeyChooser::Zipfian(z) => z.n(),
        }
    }

    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> u64 {
        match self {
            KeyChooser::Uniform(n) => rng.gen_range(0..*n),
            KeyChooser::Zipfian(z) => z.sample(rng),
        }
    }
}

/// The key bytes of key index `i`.
pub fn key_bytes(i: u64) -> Vec<u8> {
    format!("bench:{i:010}").into_bytes()
}

/// Worker `w`'s rng seed: distinct streams from one `--seed`.
fn worker_seed(seed: u64, worker: u32) -> u64 {
    seed ^ (u64::from(worker) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

// ---------------------------------------------------------------------------
// Open-loop schedule

/// The fixed schedule of one worker under `--rate`: global operation slot `i`
/// is due at `start + i / rate`, and worker `w` of `C` owns slots `w, w + C,
/// w + 2C, ...`. The latency of a slot is measured from when it was due, so a
/// worker stuck behind a slow answer charges the wait to the operations that
/// queued behind it.
#[derive(Clone, Debug)]
pub struct OpenLoop {
    start: Instant,
    rate: f64,
    workers: u64,
    worker: u64,
    k: u64,
}

impl OpenLoop {
    pub fn new(start: Instant, rate: f64, workers: u32, worker: u32) -> OpenLoop {
        OpenLoop {
            start,
            rate,
            workers: u64::from(workers.max(1)),
            worker: u64::from(worker),
            k: 0,
        }
    }

    fn slot_time(&self, slot: u64) -> Instant {
        self.start + Duration::from_secs_f64(slot as f64 / self.rate)
    }

    /// The next slot (its global index) and when it is due; advances.
    pub fn next_slot(&mut self) -> (u64, Instant) {
        let slot = self.k * self.workers + self.worker;
        self.k += 1;
        (slot, self.slot_time(slot))
    }

    /// How many of this worker's slots are due before `end`.
    pub fn slots_before(&self, end: Instant) -> u64 {
        let e = end.saturating_duration_since(self.start).as_secs_f64() * self.rate;
        let first = self.worker as f64;
        if e <= first {
            return 0;
        }
        ((e - first) / self.workers as f64).ceil() as u64
    }

    /// Slots handed out so far.
    pub fn issued(&self) -> u64 {
        self.k
    }
}

// ---------------------------------------------------------------------------
// Operations and their outcomes

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    Read,
    Write,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Op {
    pub kind: OpKind,
    pub key: u64,
}

/// Failure classes, as reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The coordinator did not get R or W replies in time.
    Quorum,
    /// The node refused the request (not enough live replicas, shutting down).
    Unavailable,
    /// No answer: connect failure, timeout, broken connection.
    Io,
    /// Any other server error (too many siblings, invalid, internal...).
    Other,
}

impl ErrorKind {
    const ALL: [ErrorKind; 4] = [
        ErrorKind::Quorum,
        ErrorKind::Unavailable,
        ErrorKind::Io,
        ErrorKind::Other,
    ];

    fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Quorum => "quorum",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Io => "io",
            ErrorKind::Other => "other",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A read answered; `live` values (0: not found, 2+: siblings).
    Read {
        live: usize,
    },
    Written,
    Failed {
        kind: ErrorKind,
        message: String,
    },
}

/// Classifies a server's reply.
pub fn classify_reply(reply: ClientReply) -> Outcome {
    match reply {
        ClientReply::Get(get) => Outcome::Read {
            live: get.values().count(),
        },
        ClientReply::Put { .. } => Outcome::Written,
        ClientReply::Error(error) => {
            let kind = match &error {
                ClientError::Quorum { .. } => ErrorKind::Quorum,
                ClientError::Unavailable(_) => ErrorKind::Unavailable,
                _ => ErrorKind::Other,
            };
            Outcome::Failed {
                kind,
                message: error.to_string(),
            }
        }
        other => Outcome::Failed {
            kind: ErrorKind::Other,
            message: format!("unexpected reply {other:?}"),
        },
    }
}

/// What the workers send operations to: the cluster, or a fake in tests.
pub trait Target: Send + 'static {
    fn execute(&mut self, op: Op) -> impl Future<Output = Outcome> + Send;
}

// ---------------------------------------------------------------------------
// Routing and the cluster target

/// Which node's client address serves each key: the first up primary of the
/// key's partition, from the ring the cluster reported at start. Without ring
/// information, keys are spread over the given addresses by hash.
#[derive(Clone, Debug)]
pub struct Router {
    addrs: Vec<String>,
    ring: Option<Ring>,
    /// Index into `addrs` for each partition.
    by_partition: Vec<usize>,
    /// "N=3 R=2 W=2 Q=256" when known.
    quorums: Option<String>,
}

impl Router {
    pub fn from_route(route: &RingRoute) -> Router {
        let info = route.info();
        let addrs = route.all_addrs();
        let ring = route.ring().clone();
        let is_up = |id: &dynamo_proto::NodeId| {
            info.members.iter().any(|m| &m.id == id && m.status == "up")
        };
        let by_partition = (0..ring.partition_count())
            .map(|p| {
                let primaries = ring.primaries(p, info.n.max(1) as usize);
                let pick = primaries
                    .iter()
                    .filter(|id| is_up(id))
                    .chain(primaries.iter())
                    .find_map(|id| route.client_addr(id));
                pick.and_then(|a| addrs.iter().position(|x| x == a))
                    .unwrap_or(0)
            })
            .collect();
        Router {
            addrs,
            ring: Some(ring),
            by_partition,
            quorums: Some(format!(
                "N={} R={} W={} Q={}",
                info.n, info.r, info.w, info.q
            )),
        }
    }

    pub fn by_hash(addrs: Vec<String>) -> Router {
        Router {
            addrs,
            ring: None,
            by_partition: Vec::new(),
            quorums: None,
        }
    }

    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    pub fn routes_by_ring(&self) -> bool {
        self.ring.is_some()
    }

    /// The index (into [`Router::addrs`]) of the node to send `key` to.
    pub fn route(&self, key: &[u8]) -> usize {
        match &self.ring {
            Some(ring) => self.by_partition[ring.partition_for_key(key) as usize],
            None => (Ring::key_hash(key) % self.addrs.len().max(1) as u64) as usize,
        }
    }
}

/// The connections every worker shares: `per_node` pipelined connections to
/// each node, opened on demand and reopened once broken. Worker `w` uses slot
/// `w % per_node` on every node.
pub struct ConnPool {
    addrs: Vec<String>,
    slots: Vec<Vec<tokio::sync::Mutex<Slot>>>,
    connect_timeout: Duration,
    request_timeout: Duration,
}

/// One pooled connection, or the last failure to open it.
#[derive(Default)]
enum Slot {
    #[default]
    Empty,
    Open(SharedConnection),
    /// Connecting failed at `at`; until [`RECONNECT_PAUSE`] has passed, the
    /// workers sharing the slot get this error at once (and go to another
    /// node) instead of each waiting out its own connect timeout in turn.
    Failed {
        at: Instant,
        error: String,
    },
}

/// How long a slot whose connect failed answers with that failure.
const RECONNECT_PAUSE: Duration = Duration::from_millis(500);

impl ConnPool {
    pub fn new(addrs: &[String], per_node: usize, request_timeout: Duration) -> ConnPool {
        ConnPool {
            addrs: addrs.to_vec(),
            slots: addrs
                .iter()
                .map(|_| (0..per_node.max(1)).map(|_| Default::default()).collect())
                .collect(),
            connect_timeout: request_timeout.min(Duration::from_secs(1)),
            request_timeout,
        }
    }

    /// Connections per node.
    pub fn per_node(&self) -> usize {
        self.slots.first().map_or(1, Vec::len)
    }

    /// The connection in `slot` to node `node`, opening it if needed.
    async fn get(&self, node: usize, slot: usize) -> Result<SharedConnection, ClientIoError> {
        let slots = &self.slots[node];
        let mut held = slots[slot % slots.len()].lock().await;
        match &*held {
            Slot::Open(conn) if !conn.is_broken() => return Ok(conn.clone()),
            Slot::Failed { at, error } if at.elapsed() < RECONNECT_PAUSE => {
                return Err(ClientIoError::Connect {
                    addr: self.addrs[node].clone(),
                    source: std::io::Error::other(error.clone()),
                });
            }
            _ => {}
        }
        match SharedConnection::connect(
            &self.addrs[node],
            self.connect_timeout,
            self.request_timeout,
        )
        .await
        {
            Ok(conn) => {
                *held = Slot::Open(conn.clone());
                Ok(conn)
            }
            Err(e) => {
                *held = Slot::Failed {
                    at: Instant::now(),
                    error: e.to_string(),
                };
                Err(e)
            }
        }
    }
}

/// One worker's view of the cluster: its slot in the shared [`ConnPool`].
pub struct ClusterTarget {
    router: Arc<Router>,
    pool: Arc<ConnPool>,
    slot: usize,
    value: Vec<u8>,
    r: Option<u8>,
    w: Option<u8>,
}

impl ClusterTarget {
    pub fn new(
        router: Arc<Router>,
        pool: Arc<ConnPool>,
        slot: usize,
        value: Vec<u8>,
        r: Option<u8>,
        w: Option<u8>,
    ) -> ClusterTarget {
        ClusterTarget {
            router,
            pool,
            slot,
            value,
            r,
            w,
        }
    }

    /// Opens this worker's connection to every node; the number that opened.
    pub async fn connect_all(&mut self) -> usize {
        let mut ok = 0;
        for node in 0..self.router.addrs().len() {
            if self.pool.get(node, self.slot).await.is_ok() {
                ok += 1;
            }
        }
        ok
    }

    async fn run(&mut self, op: Op) -> Outcome {
        let key = key_bytes(op.key);
        let n = self.router.addrs().len();
        let first = self.router.route(&key);
        let request = match op.kind {
            OpKind::Read => ClientRequest::Get { key, r: self.r },
            OpKind::Write => ClientRequest::Put {
                key,
                value: Some(self.value.clone()),
                context: None,
                w: self.w,
                mode: WriteMode::Overwrite,
            },
        };
        // The key's node first; when it cannot even be connected to (nothing
        // sent), any other member coordinates or forwards.
        let mut last_error = None;
        for step in 0..n {
            let i = (first + step) % n;
            let conn = match self.pool.get(i, self.slot).await {
                Ok(conn) => conn,
                Err(e) => {
                    last_error = Some(e);
                    continue;
                }
            };
            return match conn.call(request).await {
                Ok(reply) => classify_reply(reply),
                // A broken connection is reopened by the next request.
                Err(e) => Outcome::Failed {
                    kind: ErrorKind::Io,
                    message: e.to_string(),
                },
            };
        }
        tokio::time::sleep(CONNECT_FAIL_PAUSE).await;
        Outcome::Failed {
            kind: ErrorKind::Io,
            message: last_error
                .map(|e| e.to_string())
                .unwrap_or_else(|| "no node addresses".into()),
        }
    }
}

impl Target for ClusterTarget {
    fn execute(&mut self, op: Op) -> impl Future<Output = Outcome> + Send {
        self.run(op)
    }
}

// ---------------------------------------------------------------------------
// The load engine

/// When the measured phase ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    Duration(Duration),
    Requests(u64),
}

/// What to run, independent of the target.
#[derive(Clone, Debug)]
pub struct Plan {
    pub concurrency: u32,
    pub read_ratio: f64,
    pub keys: KeyChooser,
    pub rate: Option<f64>,
    pub warmup: Duration,
    pub stop: Stop,
    pub seed: u64,
}

fn new_hist(sigfig: u8) -> Histogram<u64> {
    Histogram::new_with_max(HIST_MAX_US, sigfig).expect("valid histogram bounds")
}

/// One second of the measured phase, summed over workers.
#[derive(Clone, Debug)]
struct SecondAgg {
    hist: Histogram<u64>,
    reads: u64,
    writes: u64,
    errors: u64,
}

impl SecondAgg {
    fn new() -> SecondAgg {
        SecondAgg {
            hist: new_hist(SERIES_SIGFIG),
            reads: 0,
            writes: 0,
            errors: 0,
        }
    }
}

/// Every latency the workers measured, in one place: the whole run's
/// histograms and one per second.
struct Latencies {
    reads: Histogram<u64>,
    writes: Histogram<u64>,
    seconds: BTreeMap<u64, SecondAgg>,
}

impl Latencies {
    fn new() -> Latencies {
        Latencies {
            reads: new_hist(HIST_SIGFIG),
            writes: new_hist(HIST_SIGFIG),
            seconds: BTreeMap::new(),
        }
    }

    fn add(&mut self, sample: &Sample) {
        let sec = self
            .seconds
            .entry(sample.second)
            .or_insert_with(SecondAgg::new);
        match sample.kind {
            SampleKind::Read => {
                self.reads.saturating_record(sample.micros);
                sec.hist.saturating_record(sample.micros);
                sec.reads += 1;
            }
            SampleKind::Write => {
                self.writes.saturating_record(sample.micros);
                sec.hist.saturating_record(sample.micros);
                sec.writes += 1;
            }
            SampleKind::Failed => sec.errors += 1,
        }
    }
}

/// State the workers share.
struct Shared {
    measure_start: Instant,
    /// Closed loop with `--requests`: the next operation number to claim.
    tickets: AtomicU64,
    /// Measured operations finished (any outcome) and failed, for the progress bar.
    done: AtomicU64,
    failed: AtomicU64,
    latencies: Mutex<Latencies>,
    /// Every worker is done: the progress ticker stops.
    finished: AtomicBool,
}

/// A worker records this many operations before it adds them to the shared
/// [`Latencies`] (under its lock).
const SAMPLES_PER_FLUSH: usize = 64;

#[derive(Clone, Copy, Debug)]
enum SampleKind {
    Read,
    Write,
    Failed,
}

/// One measured operation, waiting in its worker to be added to [`Latencies`].
#[derive(Clone, Copy, Debug)]
struct Sample {
    /// The second of the measured phase it finished in.
    second: u64,
    micros: u64,
    kind: SampleKind,
}

/// What one worker measured besides latencies. Latencies go to the shared
/// [`Latencies`] a few dozen at a time: an open loop runs a thousand workers
/// and more, and histograms of their own (170 KiB each at 0.1% resolution)
/// made the load generator spend a quarter of its CPU zeroing fresh pages.
struct WorkerStats {
    pending: Vec<Sample>,
    read_misses: u64,
    read_siblings: u64,
    errors: [u64; 4],
    first_errors: [Option<String>; 4],
    unsent: u64,
    last_done: Option<Instant>,
}

impl WorkerStats {
    fn new() -> WorkerStats {
        WorkerStats {
            pending: Vec::with_capacity(SAMPLES_PER_FLUSH),
            read_misses: 0,
            read_siblings: 0,
            errors: [0; 4],
            first_errors: Default::default(),
            unsent: 0,
            last_done: None,
        }
    }

    /// Adds the pending samples to the shared latencies.
    fn flush(&mut self, shared: &Shared) {
        if self.pending.is_empty() {
            return;
        }
        let mut latencies = shared.latencies.lock().unwrap_or_else(|e| e.into_inner());
        for sample in self.pending.drain(..) {
            latencies.add(&sample);
        }
    }

    fn record(&mut self, shared: &Shared, started: Instant, done: Instant, outcome: Outcome) {
        let micros = (done.saturating_duration_since(started).as_micros() as u64).max(1);
        let second = done
            .saturating_duration_since(shared.measure_start)
            .as_secs();
        let kind = match outcome {
            Outcome::Read { live } => {
                if live == 0 {
                    self.read_misses += 1;
                } else if live > 1 {
                    self.read_siblings += 1;
                }
                SampleKind::Read
            }
            Outcome::Written => SampleKind::Write,
            Outcome::Failed { kind, message } => {
                self.errors[kind.index()] += 1;
                self.first_errors[kind.index()].get_or_insert(message);
                shared.failed.fetch_add(1, Ordering::Relaxed);
                SampleKind::Failed
            }
        };
        self.pending.push(Sample {
            second,
            micros,
            kind,
        });
        if self.pending.len() >= SAMPLES_PER_FLUSH {
            self.flush(shared);
        }
        self.last_done = Some(self.last_done.map_or(done, |d| d.max(done)));
        shared.done.fetch_add(1, Ordering::Relaxed);
    }
}

fn next_op(plan: &Plan, rng: &mut ChaCha8Rng) -> Op {
    let kind = if rng.gen::<f64>() < plan.read_ratio {
        OpKind::Read
    } else {
        OpKind::Write
    };
    Op {
        kind,
        key: plan.keys.sample(rng),
    }
}

/// tokio's timer runs in ticks of this length and fires a sleep at the first
/// tick at or after its deadline.
const TIMER_TICK: Duration = Duration::from_millis(1);

/// Waits for an open-loop slot due at `due` and returns the instant its
/// latency counts from. Sleeping until `due` itself would send at the tick
/// after it, on average 0.7 ms late at 18.8k ops/s in a run that measured
/// it, all of it charged to the cluster. So the worker wakes at the tick at
/// or before `due` (never more than one tick early) and counts from the
/// moment it sends, or, when the worker was late (behind an answer slower
/// than its slots, or a busy generator), from `due`: that wait is queueing
/// the cluster caused, not hidden (coordinated omission).
async fn wait_for_slot(due: Instant) -> Instant {
    let wake = due.checked_sub(TIMER_TICK).unwrap_or(due);
    if wake > Instant::now() {
        tokio::time::sleep_until(wake).await;
    }
    Instant::now().min(due)
}

async fn run_worker<T: Target>(
    worker: u32,
    plan: Arc<Plan>,
    shared: Arc<Shared>,
    start: Instant,
    mut target: T,
) -> (WorkerStats, T) {
    let mut rng = ChaCha8Rng::seed_from_u64(worker_seed(plan.seed, worker));
    let mut stats = WorkerStats::new();
    let measure_start = shared.measure_start;

    // Warmup: the same load, not recorded.
    if let Some(rate) = plan.rate {
        let mut sched = OpenLoop::new(start, rate, plan.concurrency, worker);
        loop {
            let (_, due) = sched.next_slot();
            if due >= measure_start {
                break;
            }
            wait_for_slot(due).await;
            target.execute(next_op(&plan, &mut rng)).await;
        }
    } else {
        while Instant::now() < measure_start {
            target.execute(next_op(&plan, &mut rng)).await;
        }
    }

    // Measured phase.
    let mut sched = plan
        .rate
        .map(|rate| OpenLoop::new(measure_start, rate, plan.concurrency, worker));
    loop {
        let intended = match (&mut sched, plan.stop) {
            (Some(s), Stop::Requests(n)) => {
                let (slot, due) = s.next_slot();
                if slot >= n {
                    break;
                }
                wait_for_slot(due).await
            }
            (Some(s), Stop::Duration(d)) => {
                let end = measure_start + d;
                let (_, due) = s.next_slot();
                if due >= end {
                    break;
                }
                let started = wait_for_slot(due).await;
                if Instant::now() >= end {
                    // Behind schedule at the end: the due slots not sent are
                    // reported, not silently dropped.
                    stats.unsent = s.slots_before(end).saturating_sub(s.issued() - 1);
                    break;
                }
                started
            }
            (None, Stop::Requests(n)) => {
                if shared.tickets.fetch_add(1, Ordering::Relaxed) >= n {
                    break;
                }
                Instant::now()
            }
            (None, Stop::Duration(d)) => {
                let now = Instant::now();
                if now >= measure_start + d {
                    break;
                }
                now
            }
        };
        let outcome = target.execute(next_op(&plan, &mut rng)).await;
        stats.record(&shared, intended, Instant::now(), outcome);
    }
    stats.flush(&shared);
    (stats, target)
}

/// Latency percentiles of one histogram, in µs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Latency {
    pub count: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            count: h.len(),
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: h.mean(),
        }
    }
}

/// One second of the measured phase.
#[derive(Clone, Debug, PartialEq)]
pub struct SecondPoint {
    /// Seconds since the measured phase started (this bucket covers
    /// `second..second + length_s`).
    pub second: u64,
    pub length_s: f64,
    pub reads: u64,
    pub writes: u64,
    pub errors: u64,
    pub ops_per_s: f64,
    /// `None` when no operation succeeded in this second.
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

/// The prefill pass.
#[derive(Clone, Debug, PartialEq)]
pub struct PrefillResult {
    pub keys: u64,
    pub errors: u64,
    pub seconds: f64,
}

/// Everything a run measured.
#[derive(Clone, Debug)]
pub struct Summary {
    /// Successful reads and writes.
    pub reads: u64,
    pub writes: u64,
    /// Reads that found no live value / more than one (siblings).
    pub read_misses: u64,
    pub read_siblings: u64,
    pub errors: [u64; 4],
    pub first_errors: [Option<String>; 4],
    /// Open loop: slots due before the end that were never sent (behind schedule).
    pub unsent: u64,
    pub duration_s: f64,
    pub all: Latency,
    pub read: Latency,
    pub write: Latency,
    pub series: Vec<SecondPoint>,
    pub prefill: Option<PrefillResult>,
}

/// One `name: value` field of the summary (also a top-level JSON field).
#[derive(Clone, Debug, PartialEq)]
pub enum Field {
    Int(u64),
    /// A value printed with the given number of decimals.
    Float(f64, usize),
}

impl Field {
    fn text(&self) -> String {
        match self {
            Field::Int(v) => v.to_string(),
            Field::Float(v, d) => format!("{v:.*}", d),
        }
    }

    fn json(&self) -> Value {
        match self {
            Field::Int(v) => json!(v),
            Field::Float(v, d) => {
                let scale = 10f64.powi(*d as i32);
                json!((v * scale).round() / scale)
            }
        }
    }
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

impl Summary {
    pub fn ok(&self) -> u64 {
        self.reads + self.writes
    }

    pub fn error_total(&self) -> u64 {
        self.errors.iter().sum()
    }

    /// Measured operations, successful or not.
    pub fn ops(&self) -> u64 {
        self.ok() + self.error_total()
    }

    fn per_s(&self, n: u64) -> f64 {
        if self.duration_s > 0.0 {
            n as f64 / self.duration_s
        } else {
            0.0
        }
    }

    /// Successful operations per second.
    pub fn throughput(&self) -> f64 {
        self.per_s(self.ok())
    }

    /// The stable machine-readable fields, in print order.
    pub fn fields(&self) -> Vec<(&'static str, Field)> {
        let lat = |us: u64| Field::Float(ms(us), 3);
        let mut out = vec![
            ("ops", Field::Int(self.ops())),
            ("ok", Field::Int(self.ok())),
            ("reads", Field::Int(self.reads)),
            ("writes", Field::Int(self.writes)),
            ("read_misses", Field::Int(self.read_misses)),
            ("read_siblings", Field::Int(self.read_siblings)),
            ("duration_s", Field::Float(self.duration_s, 3)),
            ("throughput_ops_per_s", Field::Float(self.throughput(), 1)),
            ("read_ops_per_s", Field::Float(self.per_s(self.reads), 1)),
            ("write_ops_per_s", Field::Float(self.per_s(self.writes), 1)),
            ("p50_ms", lat(self.all.p50_us)),
            ("p90_ms", lat(self.all.p90_us)),
            ("p99_ms", lat(self.all.p99_us)),
            ("p999_ms", lat(self.all.p999_us)),
            ("max_ms", lat(self.all.max_us)),
            ("mean_ms", Field::Float(self.all.mean_us / 1000.0, 3)),
        ];
        for (prefix, l) in [("read", &self.read), ("write", &self.write)] {
            let names: [&'static str; 5] = if prefix == "read" {
                [
                    "read_p50_ms",
                    "read_p90_ms",
                    "read_p99_ms",
                    "read_p999_ms",
                    "read_max_ms",
                ]
            } else {
                [
                    "write_p50_ms",
                    "write_p90_ms",
                    "write_p99_ms",
                    "write_p999_ms",
                    "write_max_ms",
                ]
            };
            let values = [l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us];
            out.extend(names.into_iter().zip(values.map(lat)));
        }
        out.push(("errors", Field::Int(self.error_total())));
        let names = [
            "errors_quorum",
            "errors_unavailable",
            "errors_io",
            "errors_other",
        ];
        for (name, kind) in names.into_iter().zip(ErrorKind::ALL) {
            out.push((name, Field::Int(self.errors[kind.index()])));
        }
        out.push(("unsent", Field::Int(self.unsent)));
        out
    }

    /// `name: value` lines, one per [`Summary::fields`].
    pub fn machine_lines(&self) -> String {
        let mut s = String::new();
        for (name, field) in self.fields() {
            let _ = writeln!(s, "{name}: {}", field.text());
        }
        s
    }

    /// An aligned table for people.
    pub fn human_table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<6} {:>10} {:>12} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "", "ops", "ops/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"
        );
        for (name, n, l) in [
            ("total", self.ok(), &self.all),
            ("read", self.reads, &self.read),
            ("write", self.writes, &self.write),
        ] {
            let _ = writeln!(
                s,
                "{:<6} {:>10} {:>12.1} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                name,
                n,
                self.per_s(n),
                ms(l.p50_us),
                ms(l.p90_us),
                ms(l.p99_us),
                ms(l.p999_us),
                ms(l.max_us)
            );
        }
        let e = &self.errors;
        let _ = writeln!(
            s,
            "errors: {} (quorum {}, unavailable {}, io/timeout {}, other {})",
            self.error_total(),
            e[0],
            e[1],
            e[2],
            e[3]
        );
        for kind in ErrorKind::ALL {
            if let Some(msg) = &self.first_errors[kind.index()] {
                let _ = writeln!(s, "  first {} error: {msg}", kind.name());
            }
        }
        if self.read_misses > 0 {
            let _ = writeln!(
                s,
                "reads that found no value: {} (use --prefill to write every key first)",
                self.read_misses
            );
        }
        if self.read_siblings > 0 {
            let _ = writeln!(
                s,
                "reads that found siblings: {} (overwrites through different coordinators)",
                self.read_siblings
            );
        }
        // A few slots due in the last moments are always unsent (their worker is
        // still busy); more than 1% means the rate was not sustained.
        if self.unsent * 100 > self.ops() {
            let _ = writeln!(
                s,
                "open loop fell behind: {} scheduled operations were never sent before the end; \
                 the target rate was not sustained (raise --concurrency or lower --rate)",
                self.unsent
            );
        }
        s
    }

    /// The JSON document `--json` writes: every [`Summary::fields`] at the top
    /// level, then `config`, per-kind latency objects, errors and the series.
    pub fn to_json(&self, config: Value) -> Value {
        let mut map = serde_json::Map::new();
        for (name, field) in self.fields() {
            map.insert(name.to_string(), field.json());
        }
        let lat = |l: &Latency| {
            json!({
                "count": l.count,
                "p50_ms": Field::Float(ms(l.p50_us), 3).json(),
                "p90_ms": Field::Float(ms(l.p90_us), 3).json(),
                "p99_ms": Field::Float(ms(l.p99_us), 3).json(),
                "p999_ms": Field::Float(ms(l.p999_us), 3).json(),
                "max_ms": Field::Float(ms(l.max_us), 3).json(),
                "mean_ms": Field::Float(l.mean_us / 1000.0, 3).json(),
            })
        };
        map.insert("config".into(), config);
        map.insert(
            "latency".into(),
            json!({"all": lat(&self.all), "read": lat(&self.read), "write": lat(&self.write)}),
        );
        let mut errors = serde_json::Map::new();
        errors.insert("total".into(), json!(self.error_total()));
        for kind in ErrorKind::ALL {
            errors.insert(kind.name().into(), json!(self.errors[kind.index()]));
        }
        let first: serde_json::Map<String, Value> = ErrorKind::ALL
            .iter()
            .filter_map(|k| {
                self.first_errors[k.index()]
                    .as_ref()
                    .map(|m| (k.name().to_string(), json!(m)))
            })
            .collect();
        errors.insert("first".into(), Value::Object(first));
        map.insert("error_counts".into(), Value::Object(errors));
        map.insert(
            "prefill".into(),
            match &self.prefill {
                Some(p) => json!({"keys": p.keys, "errors": p.errors, "seconds": p.seconds}),
                None => Value::Null,
            },
        );
        let opt = |v: Option<f64>| v.map(|v| Field::Float(v, 3).json());
        let series: Vec<Value> = self
            .series
            .iter()
            .map(|p| {
                json!({
                    "second": p.second,
                    "length_s": Field::Float(p.length_s, 3).json(),
                    "reads": p.reads,
                    "writes": p.writes,
                    "errors": p.errors,
                    "ops_per_s": Field::Float(p.ops_per_s, 1).json(),
                    "p50_ms": opt(p.p50_ms),
                    "p90_ms": opt(p.p90_ms),
                    "p99_ms": opt(p.p99_ms),
                    "max_ms": opt(p.max_ms),
                })
            })
            .collect();
        map.insert("timeseries".into(), Value::Array(series));
        Value::Object(map)
    }
}

/// Progress bars on stderr, one per phase (or none).
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    show: bool,
}

impl Progress {
    pub fn new(show: bool) -> Progress {
        Progress { show }
    }

    pub fn hidden() -> Progress {
        Progress::new(false)
    }

    fn bar(&self, template: &str, len: u64) -> ProgressBar {
        if !self.show {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    }
}

/// Runs the measured load: warmup, then the measured phase, with one task per
/// target. Returns the summary and the targets.
pub async fn run_load<T: Target>(
    plan: Plan,
    targets: Vec<T>,
    progress: &Progress,
) -> (Summary, Vec<T>) {
    assert_eq!(
        targets.len(),
        plan.concurrency as usize,
        "one target per worker"
    );
    let start = Instant::now();
    let shared = Arc::new(Shared {
        measure_start: start + plan.warmup,
        tickets: AtomicU64::new(0),
        done: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        latencies: Mutex::new(Latencies::new()),
        finished: AtomicBool::new(false),
    });
    let plan = Arc::new(plan);
    let mut tasks = Vec::new();
    for (w, target) in targets.into_iter().enumerate() {
        tasks.push(tokio::spawn(run_worker(
            w as u32,
            plan.clone(),
            shared.clone(),
            start,
            target,
        )));
    }
    let ticker = tokio::spawn(tick_progress(
        *progress,
        shared.clone(),
        plan.stop,
        plan.warmup,
    ));
    let mut stats = Vec::new();
    let mut targets = Vec::new();
    for task in tasks {
        let (s, t) = task.await.expect("a bench worker panicked");
        stats.push(s);
        targets.push(t);
    }
    shared.finished.store(true, Ordering::Relaxed);
    let _ = ticker.await;
    (summarize(&plan, &shared, stats), targets)
}

async fn tick_progress(progress: Progress, shared: Arc<Shared>, stop: Stop, warmup: Duration) {
    let finished = || shared.finished.load(Ordering::Relaxed);
    if !warmup.is_zero() {
        let bar = progress.bar(
            "warmup  [{elapsed_precise}] [{bar:40}]",
            warmup.as_millis() as u64,
        );
        while Instant::now() < shared.measure_start && !finished() {
            let left = shared
                .measure_start
                .saturating_duration_since(Instant::now());
            bar.set_position(warmup.saturating_sub(left).as_millis() as u64);
            tokio::time::sleep(PROGRESS_TICK.min(left)).await;
        }
        bar.finish_and_clear();
    }
    let bar = match stop {
        Stop::Duration(d) => progress.bar(
            "measure [{elapsed_precise}] [{bar:40}] {percent:>3}% {msg}",
            d.as_millis() as u64,
        ),
        Stop::Requests(n) => progress.bar(
            "measure [{elapsed_precise}] [{bar:40}] {pos}/{len} {msg}",
            n,
        ),
    };
    let mut last = (Instant::now(), 0u64);
    while !finished() {
        tokio::time::sleep(PROGRESS_TICK).await;
        let now = Instant::now();
        let done = shared.done.load(Ordering::Relaxed);
        let failed = shared.failed.load(Ordering::Relaxed);
        match stop {
            Stop::Duration(_) => bar.set_position(
                now.saturating_duration_since(shared.measure_start)
                    .as_millis() as u64,
            ),
            Stop::Requests(_) => bar.set_position(done),
        }
        let dt = now.saturating_duration_since(last.0).as_secs_f64();
        if dt > 0.0 {
            let rate = done.saturating_sub(last.1) as f64 / dt;
            bar.set_message(format!("{done} ops, {rate:.0} ops/s, {failed} errors"));
        }
        last = (now, done);
    }
    bar.finish_and_clear();
}

fn summarize(plan: &Plan, shared: &Shared, stats: Vec<WorkerStats>) -> Summary {
    let mut errors = [0u64; 4];
    let mut first_errors: [Option<String>; 4] = Default::default();
    let (mut read_misses, mut read_siblings, mut unsent) = (0, 0, 0);
    let mut last_done: Option<Instant> = None;
    for s in stats {
        for k in 0..4 {
            errors[k] += s.errors[k];
            if first_errors[k].is_none() {
                first_errors[k] = s.first_errors[k].clone();
            }
        }
        read_misses += s.read_misses;
        read_siblings += s.read_siblings;
        unsent += s.unsent;
        if let Some(d) = s.last_done {
            last_done = Some(last_done.map_or(d, |l| l.max(d)));
        }
    }
    let latencies = shared.latencies.lock().unwrap_or_else(|e| e.into_inner());
    let (reads, writes, seconds) = (&latencies.reads, &latencies.writes, &latencies.seconds);
    let measured = last_done
        .map(|d| d.saturating_duration_since(shared.measure_start))
        .unwrap_or_default();
    // A timed open-loop run lasts its duration even if the last slot finished early.
    let duration_s = match (plan.rate, plan.stop) {
        (Some(_), Stop::Duration(d)) => measured.max(d),
        _ => measured,
    }
    .as_secs_f64();
    let mut all = new_hist(HIST_SIGFIG);
    let _ = all.add(reads);
    let _ = all.add(writes);
    let last_second = seconds.keys().next_back().copied();
    let mut series = Vec::new();
    if let Some(last_second) = last_second {
        let empty = SecondAgg::new();
        for s in 0..=last_second {
            let agg = seconds.get(&s).unwrap_or(&empty);
            let length_s = (duration_s - s as f64).clamp(0.001, 1.0);
            let q = |quantile: f64| {
                (!agg.hist.is_empty()).then(|| ms(agg.hist.value_at_quantile(quantile)))
            };
            series.push(SecondPoint {
                second: s,
                length_s,
                reads: agg.reads,
                writes: agg.writes,
                errors: agg.errors,
                ops_per_s: (agg.reads + agg.writes) as f64 / length_s,
                p50_ms: q(0.5),
                p90_ms: q(0.9),
                p99_ms: q(0.99),
                max_ms: (!agg.hist.is_empty()).then(|| ms(agg.hist.max())),
            });
        }
    }
    Summary {
        reads: reads.len(),
        writes: writes.len(),
        read_misses,
        read_siblings,
        errors,
        first_errors,
        unsent,
        duration_s,
        all: Latency::of(&all),
        read: Latency::of(reads),
        write: Latency::of(writes),
        series,
        prefill: None,
    }
}

/// Writes every key once (closed loop, all workers sharing one cursor).
pub async fn run_prefill<T: Target>(
    keys: u64,
    targets: Vec<T>,
    progress: &Progress,
) -> (PrefillResult, Vec<T>) {
    let bar = progress.bar("prefill [{elapsed_precise}] [{bar:40}] {pos}/{len}", keys);
    let start = Instant::now();
    let cursor = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for mut target in targets {
        let cursor = cursor.clone();
        let errors = errors.clone();
        let bar = bar.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let key = cursor.fetch_add(1, Ordering::Relaxed);
                if key >= keys {
                    break;
                }
                let op = Op {
                    kind: OpKind::Write,
                    key,
                };
                if matches!(target.execute(op).await, Outcome::Failed { .. }) {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                bar.inc(1);
            }
            target
        }));
    }
    let mut targets = Vec::new();
    for task in tasks {
        targets.push(task.await.expect("a prefill worker panicked"));
    }
    bar.finish_and_clear();
    let result = PrefillResult {
        keys,
        errors: errors.load(Ordering::Relaxed),
        seconds: start.elapsed().as_secs_f64(),
    };
    (result, targets)
}

// ---------------------------------------------------------------------------
// SVG

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A "nice" axis maximum at or above `v`: 1, 2 or 5 times a power of ten.
fn nice_ceiling(v: f64) -> f64 {
    if !v.is_finite() || v <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if m * p >= v {
            return m * p;
        }
    }
    10.0 * p
}

fn fmt_tick(v: f64) -> String {
    if v >= 100.0 || v == 0.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// A two-panel SVG: p50 and p99 latency (ms) above, throughput (ops/s) below,
/// both against seconds since the measured phase started. Lines are polylines
/// with ids `p50`, `p99` and `throughput`; a second without a successful
/// operation has no latency point.
pub fn render_svg(title: &str, series: &[SecondPoint]) -> String {
    const W: f64 = 900.0;
    const H: f64 = 640.0;
    const LEFT: f64 = 80.0;
    const RIGHT: f64 = 30.0;
    const PANEL_H: f64 = 210.0;
    let tops = [90.0, 370.0];
    let plot_w = W - LEFT - RIGHT;
    let t_end = series
        .iter()
        .map(|p| p.second as f64 + p.length_s)
        .fold(1.0f64, f64::max);
    let x = |t: f64| LEFT + plot_w * (t / t_end);
    let lat_max = nice_ceiling(
        series
            .iter()
            .filter_map(|p| p.p99_ms)
            .fold(0.0f64, f64::max),
    );
    let ops_max = nice_ceiling(series.iter().map(|p| p.ops_per_s).fold(0.0f64, f64::max));
    let mut s = String::new();
    let _ = writeln!(s, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<rect x="0" y="0" width="{W}" height="{H}" fill="white"/>"#
    );
    // The title, then the details after its first ": " in small type, wrapped.
    let (head, details) = title.split_once(": ").unwrap_or((title, ""));
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" font-size="16" text-anchor="middle">{}</text>"#,
        W / 2.0,
        xml_escape(head)
    );
    let mut lines: Vec<String> = vec![String::new()];
    for word in details.split(' ') {
        let last = lines.last_mut().expect("one line");
        if !last.is_empty() && last.len() + word.len() > 130 {
            lines.push(word.to_string());
        } else {
            if !last.is_empty() {
                last.push(' ');
            }
            last.push_str(word);
        }
    }
    for (i, line) in lines.iter().take(2).enumerate() {
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" font-size="11" fill="#444" text-anchor="middle">{}</text>"##,
            W / 2.0,
            38 + 13 * i,
            xml_escape(line)
        );
    }
    let panels = [
        ("latency (ms)", lat_max, tops[0]),
        ("throughput (ops/s)", ops_max, tops[1]),
    ];
    for (label, max, top) in panels {
        let bottom = top + PANEL_H;
        let _ = writeln!(
            s,
            r##"<rect x="{LEFT}" y="{top}" width="{plot_w}" height="{PANEL_H}" fill="none" stroke="#888"/>"##
        );
        for i in 0..=4 {
            let v = max * i as f64 / 4.0;
            let y = bottom - PANEL_H * i as f64 / 4.0;
            let _ = writeln!(
                s,
                r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#eee"/>"##,
                LEFT + plot_w
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
                LEFT - 6.0,
                y + 4.0,
                fmt_tick(v)
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="20" y="{:.1}" transform="rotate(-90 20 {:.1})" text-anchor="middle">{label}</text>"#,
            top + PANEL_H / 2.0,
            top + PANEL_H / 2.0
        );
        let step = nice_ceiling(t_end / 10.0).max(1.0);
        let mut t = 0.0;
        while t <= t_end + 1e-9 {
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                x(t),
                bottom + 16.0,
                fmt_tick(t)
            );
            t += step;
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">seconds</text>"#,
            LEFT + plot_w / 2.0,
            bottom + 34.0
        );
    }
    let y_of = |v: f64, max: f64, top: f64| top + PANEL_H - PANEL_H * (v / max).min(1.0);
    let mid = |p: &SecondPoint| p.second as f64 + p.length_s / 2.0;
    let line = |id: &str, color: &str, pts: Vec<(f64, f64)>| {
        let points: Vec<String> = pts.iter().map(|(a, b)| format!("{a:.1},{b:.1}")).collect();
        format!(
            r#"<polyline id="{id}" fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            points.join(" ")
        )
    };
    let lat_points = |f: fn(&SecondPoint) -> Option<f64>| -> Vec<(f64, f64)> {
        series
            .iter()
            .filter_map(|p| f(p).map(|v| (x(mid(p)), y_of(v, lat_max, tops[0]))))
            .collect()
    };
    let _ = writeln!(s, "{}", line("p50", "#1f77b4", lat_points(|p| p.p50_ms)));
    let _ = writeln!(s, "{}", line("p99", "#d62728", lat_points(|p| p.p99_ms)));
    let ops: Vec<(f64, f64)> = series
        .iter()
        .map(|p| (x(mid(p)), y_of(p.ops_per_s, ops_max, tops[1])))
        .collect();
    let _ = writeln!(s, "{}", line("throughput", "#2ca02c", ops));
    // Legend.
    for (i, (name, color)) in [("p50", "#1f77b4"), ("p99", "#d62728"), ("ops/s", "#2ca02c")]
        .iter()
        .enumerate()
    {
        let lx = LEFT + 10.0 + 90.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="78" x2="{}" y2="78" stroke="{color}" stroke-width="3"/>"#,
            lx + 20.0
        );
        let _ = writeln!(s, r#"<text x="{}" y="82">{name}</text>"#, lx + 26.0);
    }
    s.push_str("</svg>\n");
    s
}

// ---------------------------------------------------------------------------
// The command

impl BenchArgs {
    pub fn stop(&self) -> Stop {
        match (self.requests, self.duration) {
            (Some(n), _) => Stop::Requests(n),
            (None, Some(d)) => Stop::Duration(d),
            (None, None) => Stop::Duration(DEFAULT_DURATION),
        }
    }

    pub fn plan(&self) -> Plan {
        Plan {
            concurrency: self.concurrency,
            read_ratio: self.read_ratio,
            keys: KeyChooser::new(self.distribution, self.keys),
            rate: self.rate,
            warmup: self.warmup,
            stop: self.stop(),
            seed: self.seed,
        }
    }

    fn describe(&self) -> String {
        let pacing = match self.rate {
            Some(r) => format!("open loop at {r} ops/s (latency from the scheduled start)"),
            None => "closed loop".into(),
        };
        let length = match self.stop() {
            Stop::Duration(d) => format!("{:.3}s", d.as_secs_f64()),
            Stop::Requests(n) => format!("{n} requests"),
        };
        format!(
            "{} workers on {} shared connections per node, {pacing}, {} keys {}, {}-byte values, read ratio {}, {length} after {:.3}s warmup{}, seed {}",
            self.concurrency,
            self.connections.min(self.concurrency),
            self.keys,
            self.distribution.name(),
            self.value_size,
            self.read_ratio,
            self.warmup.as_secs_f64(),
            if self.prefill { " and a prefill" } else { "" },
            self.seed
        )
    }

    fn config_json(&self, router: &Router) -> Value {
        json!({
            "nodes": router.addrs(),
            "routing": if router.routes_by_ring() { "ring" } else { "hash" },
            "cluster": router.quorums,
            "concurrency": self.concurrency,
            "connections_per_node": self.connections.min(self.concurrency),
            "keys": self.keys,
            "distribution": self.distribution.name(),
            "zipf_theta": (self.distribution == Distribution::Zipfian).then_some(ZIPF_THETA),
            "value_size": self.value_size,
            "read_ratio": self.read_ratio,
            "duration_s": match self.stop() { Stop::Duration(d) => Some(d.as_secs_f64()), _ => None },
            "requests": self.requests,
            "rate": self.rate,
            "mode": if self.rate.is_some() { "open" } else { "closed" },
            "r": self.r,
            "w": self.w,
            "warmup_s": self.warmup.as_secs_f64(),
            "prefill": self.prefill,
            "seed": self.seed,
            "write_mode": "overwrite",
            "timeout_ms": self.timeout_ms,
        })
    }
}

/// `dynamo bench`.
pub async fn run(args: BenchArgs) -> anyhow::Result<u8> {
    use std::io::IsTerminal as _;
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    let options = ClientOptions {
        connect_timeout: timeout.min(Duration::from_secs(1)),
        request_timeout: timeout,
        ..ClientOptions::default()
    };
    let client = Client::connect_with(&args.nodes, options)
        .await
        .with_context(|| {
            format!(
                "cannot reach the cluster at {} (pass --node ADDR or set DYNAMO_NODES)",
                args.nodes.join(", ")
            )
        })?;
    let router = match client.cached_cluster_info().and_then(RingRoute::new) {
        Some(route) => Router::from_route(&route),
        None => Router::by_hash(client.seeds().to_vec()),
    };
    drop(client);
    if router.addrs().is_empty() {
        bail!("the cluster reported no client addresses");
    }
    let router = Arc::new(router);

    let mut value = vec![0u8; args.value_size];
    ChaCha8Rng::seed_from_u64(args.seed).fill(&mut value[..]);
    let per_node = args.connections.min(args.concurrency) as usize;
    let pool = Arc::new(ConnPool::new(router.addrs(), per_node, timeout));
    let mut tasks = Vec::new();
    for worker in 0..args.concurrency as usize {
        let mut target = ClusterTarget::new(
            router.clone(),
            pool.clone(),
            worker,
            value.clone(),
            args.r,
            args.w,
        );
        tasks.push(tokio::spawn(async move {
            let n = target.connect_all().await;
            (n, target)
        }));
    }
    let mut targets = Vec::new();
    let mut connected = 0;
    for task in tasks {
        let (n, target) = task.await.context("connecting")?;
        connected += n;
        targets.push(target);
    }
    if connected == 0 {
        bail!(
            "no connection could be opened to any of {}",
            router.addrs().join(", ")
        );
    }

    println!(
        "dynamo bench: {} nodes ({}), routing by {}{}",
        router.addrs().len(),
        router.addrs().join(", "),
        if router.routes_by_ring() {
            "ring to each key's first primary"
        } else {
            "key hash (no ring information)"
        },
        router
            .quorums
            .as_deref()
            .map(|q| format!(", {q}"))
            .unwrap_or_default()
    );
    println!("workload: {}", args.describe());
    println!(
        "writes: blind overwrites (WriteMode::Overwrite, no context: SET semantics, no read first){}{}",
        args.w.map(|w| format!(", W={w}")).unwrap_or_default(),
        args.r.map(|r| format!("; reads R={r}")).unwrap_or_default()
    );

    let show = !args.no_progress && std::io::stderr().is_terminal();
    let progress = Progress::new(show);
    let mut prefill = None;
    if args.prefill {
        let (result, t) = run_prefill(args.keys, targets, &progress).await;
        targets = t;
        println!(
            "prefill: {} keys in {:.2}s ({:.0} puts/s), {} errors",
            result.keys,
            result.seconds,
            result.keys as f64 / result.seconds.max(1e-9),
            result.errors
        );
        prefill = Some(result);
    }
    let (mut summary, _targets) = run_load(args.plan(), targets, &progress).await;
    summary.prefill = prefill;

    println!();
    print!("{}", summary.human_table());
    println!();
    print!("{}", summary.machine_lines());
    if let Some(rate) = args.rate {
        if summary.throughput() < 0.95 * rate {
            eprintln!(
                "warning: achieved {:.1} ops/s, below the target {rate} ops/s",
                summary.throughput()
            );
        }
    }

    if let Some(path) = &args.json {
        let doc = summary.to_json(args.config_json(&router));
        let text = serde_json::to_string_pretty(&doc)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("writing --json {}", path.display()))?;
    }
    if let Some(path) = &args.svg {
        let title = format!("dynamo bench: {}", args.describe());
        std::fs::write(path, render_svg(&title, &summary.series))
            .with_context(|| format!("writing --svg {}", path.display()))?;
    }
    if summary.ops() > 0 && summary.ok() == 0 {
        bail!("every operation failed; see the errors above");
    }
    Ok(EXIT_OK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser as _;

    #[test]
    fn zipfian_is_skewed_toward_the_first_keys() {
        let n = 1_000;
        let z = Zipfian::new(n, ZIPF_THETA);
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let samples = 200_000;
        let mut counts = vec![0u64; n as usize];
        for _ in 0..samples {
            let k = z.sample(&mut rng);
            assert!(k < n);
            counts[k as usize] += 1;
        }
        let uniform = samples as f64 / n as f64;
        let top = counts[0] as f64;
        // p(0) = 1/zeta(1000, 0.99), about 13%, against 0.1% for uniform.
        assert!(top > 50.0 * uniform, "top {top} vs uniform {uniform}");
        let expected = z.top_probability() * samples as f64;
        assert!(
            (top - expected).abs() < 0.05 * expected,
            "top {top}, expected {expected}"
        );
        assert!(counts[0] > counts[1] && counts[1] > counts[10] && counts[10] > counts[500]);
        // The hottest 10% of keys take most of the traffic.
        let hot: u64 = counts[..100].iter().sum();
        assert!(hot as f64 > 0.6 * samples as f64, "hot {hot}");
        // Every key is still reachable.
        assert!(counts.iter().filter(|&&c| c > 0).count() > 900);
    }

    #[test]
    fn zipfian_and_uniform_are_deterministic_with_a_seed() {
        for chooser in [
            KeyChooser::new(Distribution::Zipfian, 100_000),
            KeyChooser::new(Distribution::Uniform, 100_000),
        ] {
            let draw = |seed| {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                (0..1000)
                    .map(|_| chooser.sample(&mut rng))
                    .collect::<Vec<_>>()
            };
            assert_eq!(draw(42), draw(42));
            assert_ne!(draw(42), draw(43));
        }
        // Edge cases: one and two keys.
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let one = Zipfian::new(1, ZIPF_THETA);
        assert!((0..100).all(|_| one.sample(&mut rng) == 0));
        let two = Zipfian::new(2, ZIPF_THETA);
        let ones = (0..1000).filter(|_| two.sample(&mut rng) == 1).count();
        assert!((300..700).contains(&ones), "{ones}");
        // The tail estimate matches the exact sum.
        let exact = zeta_exact_up_to(1_000_000, ZIPF_THETA, u64::MAX);
        let estimated = zeta_exact_up_to(1_000_000, ZIPF_THETA, 1_000);
        assert!((exact - estimated).abs() < 1e-6, "{exact} vs {estimated}");
    }

    #[tokio::test]
    async fn a_slot_counts_from_its_send_when_early_and_from_its_due_time_when_late() {
        // Due later: the worker wakes at most one timer tick before it, and
        // counts from no later than the due time.
        let due = Instant::now() + Duration::from_millis(20);
        let started = wait_for_slot(due).await;
        let woke = Instant::now();
        assert!(woke + TIMER_TICK >= due, "woke {:?} early", due - woke);
        assert!(started <= due);
        assert!(started + TIMER_TICK >= due);
        // Overdue (the worker was behind): no wait, and the lateness counts.
        let due = Instant::now() - Duration::from_millis(5);
        assert_eq!(wait_for_slot(due).await, due);
    }

    #[test]
    fn open_loop_slots_are_evenly_spread_over_workers() {
        let start = Instant::now();
        let mut a = OpenLoop::new(start, 100.0, 4, 1);
        let (slot, due) = a.next_slot();
        assert_eq!(slot, 1);
        assert_eq!(due - start, Duration::from_millis(10));
        let (slot, due) = a.next_slot();
        assert_eq!(slot, 5);
        assert_eq!(due - start, Duration::from_millis(50));
        // Slots 1, 5, 9 fall before 100 ms; 13 does not.
        assert_eq!(a.slots_before(start + Duration::from_millis(100)), 3);
        assert_eq!(a.slots_before(start), 0);
        assert_eq!(a.issued(), 2);
    }

    /// Answers after scripted delays (then instantly), reads found.
    struct FakeTarget {
        delays: Vec<Duration>,
        calls: usize,
    }

    impl Target for FakeTarget {
        fn execute(&mut self, op: Op) -> impl Future<Output = Outcome> + Send {
            let delay = self.delays.get(self.calls).copied().unwrap_or_default();
            self.calls += 1;
            async move {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                match op.kind {
                    OpKind::Read => Outcome::Read { live: 1 },
                    OpKind::Write => Outcome::Written,
                }
            }
        }
    }

    fn plan(concurrency: u32, rate: Option<f64>, stop: Stop) -> Plan {
        Plan {
            concurrency,
            read_ratio: 0.5,
            keys: KeyChooser::new(Distribution::Uniform, 100),
            rate,
            warmup: Duration::ZERO,
            stop,
            seed: 3,
        }
    }

    #[tokio::test]
    async fn an_instant_answer_on_time_measures_near_zero_not_the_timer_rounding() {
        // 400 slots at 2000/s, answered at once. Sleeping until each slot
        // sends at the 1 ms timer tick after it: a median near 0.5 ms of
        // nothing but rounding (1.1 ms measured with the old sleep). Waking at
        // the tick before it measures the answer itself; a send the machine
        // delayed past its slot still counts from the slot, which under a
        // full parallel test run put the median at 0.28 ms once, hence the
        // margin.
        let targets = (0..4)
            .map(|_| FakeTarget {
                delays: Vec::new(),
                calls: 0,
            })
            .collect();
        let (s, _) = run_load(
            plan(4, Some(2000.0), Stop::Requests(400)),
            targets,
            &Progress::hidden(),
        )
        .await;
        assert_eq!(s.ops(), 400);
        assert!(s.all.p50_us < 600, "{:?}", s.all);
    }

    #[tokio::test]
    async fn open_loop_measures_latency_from_the_scheduled_start() {
        // One worker, one slot every 10 ms; the first answer takes 100 ms, the
        // rest are instant. Slots 1..4 were due at 10..40 ms but could only be
        // sent at 100 ms: their latencies are about 90, 80, 70, 60 ms.
        let stall = vec![Duration::from_millis(100)];
        let (open, _) = run_load(
            plan(1, Some(100.0), Stop::Requests(5)),
            vec![FakeTarget {
                delays: stall.clone(),
                calls: 0,
            }],
            &Progress::hidden(),
        )
        .await;
        assert_eq!(open.ops(), 5);
        assert!(open.all.max_us >= 100_000, "{:?}", open.all);
        assert!(open.all.p50_us >= 69_000, "{:?}", open.all);
        // The same stall in a closed loop hides the queueing: only one slow op.
        let (closed, _) = run_load(
            plan(1, None, Stop::Requests(5)),
            vec![FakeTarget {
                delays: stall,
                calls: 0,
            }],
            &Progress::hidden(),
        )
        .await;
        assert_eq!(closed.ops(), 5);
        assert!(closed.all.max_us >= 100_000);
        assert!(closed.all.p50_us < 20_000, "{:?}", closed.all);
    }

    #[tokio::test]
    async fn a_pool_slot_remembers_a_failed_connect_for_a_moment() {
        let probe = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let pool = ConnPool::new(&[addr.to_string()], 1, Duration::from_secs(1));
        let err = pool.get(0, 0).await.unwrap_err();
        assert!(err.nothing_sent(), "{err}");
        // The node comes up, but the slot answers with the failure until the
        // pause has passed, rather than every worker retrying in turn.
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let err = pool.get(0, 0).await.unwrap_err();
        assert!(err.nothing_sent(), "{err}");
        tokio::time::sleep(RECONNECT_PAUSE).await;
        let conn = pool.get(0, 0).await.unwrap();
        assert_eq!(conn.addr(), addr.to_string());
        let (_accepted, _) = listener.accept().await.unwrap();
        // Every worker of the slot shares that one connection.
        assert!(!pool.get(0, 7).await.unwrap().is_broken());
        assert_eq!(pool.per_node(), 1);
    }

    #[tokio::test]
    async fn requests_mode_measures_exactly_n_operations() {
        let targets = (0..4)
            .map(|_| FakeTarget {
                delays: vec![],
                calls: 0,
            })
            .collect();
        let (s, targets) = run_load(
            plan(4, None, Stop::Requests(1000)),
            targets,
            &Progress::hidden(),
        )
        .await;
        assert_eq!(s.ops(), 1000);
        assert_eq!(s.reads + s.writes, 1000);
        assert!(s.reads > 350 && s.writes > 350, "{} {}", s.reads, s.writes);
        assert_eq!(targets.iter().map(|t| t.calls).sum::<usize>(), 1000);
        assert_eq!(s.error_total(), 0);
        let per_second: u64 = s.series.iter().map(|p| p.reads + p.writes).sum();
        assert_eq!(per_second, 1000);
        // Prefill writes every key once.
        let (p, targets) = run_prefill(250, targets, &Progress::hidden()).await;
        assert_eq!((p.keys, p.errors), (250, 0));
        assert_eq!(targets.iter().map(|t| t.calls).sum::<usize>(), 1250);
    }

    #[tokio::test]
    async fn an_open_loop_run_reports_slots_it_could_not_send() {
        // 1 worker at 1000/s for 200 ms, but every answer takes 20 ms: it can
        // send about 10 of the 200 slots.
        let slow = FakeTarget {
            delays: vec![Duration::from_millis(20); 1000],
            calls: 0,
        };
        let (s, _) = run_load(
            plan(1, Some(1000.0), Stop::Duration(Duration::from_millis(200))),
            vec![slow],
            &Progress::hidden(),
        )
        .await;
        assert!(s.ops() <= 12, "{}", s.ops());
        assert!(s.ops() + s.unsent >= 195, "{} + {}", s.ops(), s.unsent);
        assert!(s.human_table().contains("open loop fell behind"));
    }

    fn sample_summary() -> Summary {
        let mut h = new_hist(3);
        for v in [1_000, 2_000, 3_000, 50_000] {
            h.record(v).unwrap();
        }
        Summary {
            reads: 3,
            writes: 1,
            read_misses: 0,
            read_siblings: 0,
            errors: [1, 0, 2, 0],
            first_errors: [
                Some("quorum not met".into()),
                None,
                Some("timeout".into()),
                None,
            ],
            unsent: 0,
            duration_s: 2.0,
            all: Latency::of(&h),
            read: Latency::of(&h),
            write: Latency::of(&h),
            series: vec![
                SecondPoint {
                    second: 0,
                    length_s: 1.0,
                    reads: 2,
                    writes: 0,
                    errors: 1,
                    ops_per_s: 2.0,
                    p50_ms: Some(1.0),
                    p90_ms: Some(2.0),
                    p99_ms: Some(2.0),
                    max_ms: Some(2.0),
                },
                SecondPoint {
                    second: 1,
                    length_s: 1.0,
                    reads: 1,
                    writes: 1,
                    errors: 2,
                    ops_per_s: 2.0,
                    p50_ms: Some(3.0),
                    p90_ms: Some(50.0),
                    p99_ms: Some(50.0),
                    max_ms: Some(50.0),
                },
                SecondPoint {
                    second: 2,
                    length_s: 0.5,
                    reads: 0,
                    writes: 0,
                    errors: 0,
                    ops_per_s: 0.0,
                    p50_ms: None,
                    p90_ms: None,
                    p99_ms: None,
                    max_ms: None,
                },
            ],
            prefill: None,
        }
    }

    #[test]
    fn summary_lines_and_json_carry_the_same_fields() {
        let s = sample_summary();
        let lines = s.machine_lines();
        assert!(lines.contains("ops: 7\n"), "{lines}");
        assert!(lines.contains("throughput_ops_per_s: 2.0\n"), "{lines}");
        assert!(lines.contains("p50_ms: 2.000\n"), "{lines}");
        assert!(
            lines.contains("max_ms: 50.015\n") || lines.contains("max_ms: 50.047\n"),
            "{lines}"
        );
        assert!(
            lines.contains(
                "errors_quorum: 1\nerrors_unavailable: 0\nerrors_io: 2\nerrors_other: 0\n"
            ),
            "{lines}"
        );
        let doc = s.to_json(json!({"seed": 1}));
        for line in lines.lines() {
            let (name, value) = line.split_once(": ").unwrap();
            let v: f64 = value.parse().unwrap();
            let j = doc[name]
                .as_f64()
                .unwrap_or_else(|| panic!("{name} missing"));
            assert!((v - j).abs() < 1e-9, "{name}: {v} vs {j}");
        }
        assert_eq!(doc["timeseries"].as_array().unwrap().len(), 3);
        assert_eq!(doc["timeseries"][2]["p99_ms"], Value::Null);
        assert_eq!(doc["error_counts"]["io"], 2);
        assert_eq!(doc["error_counts"]["first"]["quorum"], "quorum not met");
        let table = s.human_table();
        assert!(table.contains("io/timeout 2"), "{table}");
    }

    /// A minimal XML well-formedness check: tags nest and close, attributes are
    /// quoted, text has no bare `<` or `&`.
    fn check_well_formed(xml: &str) -> Vec<String> {
        let mut stack: Vec<String> = Vec::new();
        let mut seen = Vec::new();
        let mut rest = xml;
        while let Some(open) = rest.find('<') {
            let text = &rest[..open];
            assert!(
                !text.contains('>')
                    && text.split('&').skip(1).all(|t| t.starts_with("amp;")
                        || t.starts_with("lt;")
                        || t.starts_with("gt;")
                        || t.starts_with("quot;")),
                "bad text {text:?}"
            );
            let close = rest[open..].find('>').expect("unclosed tag") + open;
            let tag = &rest[open + 1..close];
            assert_eq!(
                tag.matches('"').count() % 2,
                0,
                "unbalanced quotes in <{tag}>"
            );
            assert!(!tag.contains('<'), "nested < in <{tag}>");
            if tag.starts_with('?') {
                assert!(tag.ends_with('?'));
            } else if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(
                    stack.pop().as_deref(),
                    Some(name.trim()),
                    "mismatched </{name}>"
                );
            } else {
                let name = tag
                    .split(|c: char| c.is_whitespace() || c == '/')
                    .next()
                    .unwrap()
                    .to_string();
                seen.push(name.clone());
                if !tag.ends_with('/') {
                    stack.push(name);
                }
            }
            rest = &rest[close + 1..];
        }
        assert!(rest.trim().is_empty());
        assert!(stack.is_empty(), "unclosed {stack:?}");
        seen
    }

    #[test]
    fn svg_is_well_formed_and_holds_the_series() {
        let s = sample_summary();
        let svg = render_svg("bench: <a & b>", &s.series);
        let tags = check_well_formed(&svg);
        assert_eq!(tags.first().map(String::as_str), Some("svg"));
        assert!(svg.contains(">&lt;a &amp; b&gt;</text>"), "{svg}");
        let points = |id: &str| {
            let at = svg.find(&format!(r#"id="{id}""#)).expect(id);
            let p = &svg[at..];
            let p = &p[p.find("points=\"").unwrap() + 8..];
            p[..p.find('"').unwrap()].split_whitespace().count()
        };
        // Latency lines skip the second without successful operations.
        assert_eq!(points("p50"), 2);
        assert_eq!(points("p99"), 2);
        assert_eq!(points("throughput"), 3);
        // An empty series still renders.
        check_well_formed(&render_svg("empty", &[]));
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("").is_err());
    }

    fn bench(args: &[&str]) -> Result<BenchArgs, clap::Error> {
        let cli = Cli::try_parse_from(["dynamo", "bench"].iter().chain(args))?;
        match cli.command {
            Command::Bench(b) => Ok(b),
            other => panic!("not a bench: {other:?}"),
        }
    }

    #[test]
    fn bench_flags_parse() {
        let b = bench(&[]).unwrap();
        if std::env::var_os("DYNAMO_NODES").is_none() {
            assert_eq!(b.nodes, ["127.0.0.1:7100"]);
        }
        assert_eq!(
            (
                b.concurrency,
                b.connections,
                b.keys,
                b.value_size,
                b.read_ratio
            ),
            (50, 2, 100_000, 100, 0.5)
        );
        assert_eq!(b.distribution, Distribution::Uniform);
        assert_eq!(b.stop(), Stop::Duration(Duration::from_secs(10)));
        assert_eq!(b.warmup, Duration::from_secs(1));
        assert!(b.rate.is_none() && !b.prefill && !b.no_progress);

        let b = bench(&[
            "--node",
            "a:1,b:2",
            "--node",
            "c:3",
            "--concurrency",
            "8",
            "--connections",
            "8",
            "--keys",
            "1000",
            "--distribution",
            "zipfian",
            "--value-size",
            "4096",
            "--read-ratio",
            "0.9",
            "--requests",
            "2000",
            "--rate",
            "5000",
            "--w",
            "3",
            "--r",
            "1",
            "--warmup",
            "0s",
            "--prefill",
            "--seed",
            "9",
            "--json",
            "out.json",
            "--svg",
            "out.svg",
            "--no-progress",
        ])
        .unwrap();
        assert_eq!(b.nodes, ["a:1", "b:2", "c:3"]);
        assert_eq!(b.connections, 8, "one connection per worker");
        assert_eq!(b.stop(), Stop::Requests(2000));
        assert_eq!(
            (b.rate, b.w, b.r, b.seed),
            (Some(5000.0), Some(3), Some(1), 9)
        );
        assert_eq!(b.distribution, Distribution::Zipfian);
        assert_eq!(b.json.as_deref(), Some(std::path::Path::new("out.json")));
        assert!(b.prefill && b.no_progress && b.warmup.is_zero());
        let p = b.plan();
        assert_eq!((p.keys.keys(), p.read_ratio, p.concurrency), (1000, 0.9, 8));

        assert_eq!(
            bench(&["--duration", "30s"]).unwrap().stop(),
            Stop::Duration(Duration::from_secs(30))
        );
        assert!(bench(&["--duration", "1s", "--requests", "5"]).is_err());
        assert!(bench(&["--read-ratio", "1.5"]).is_err());
        assert!(bench(&["--rate", "0"]).is_err());
        assert!(bench(&["--concurrency", "0"]).is_err());
        assert!(bench(&["--keys", "0"]).is_err());
        assert!(bench(&["--distribution", "pareto"]).is_err());
        // The runtime's threads: one per core unless --threads says.
        let threads = |args: &[&str]| {
            Cli::try_parse_from(["dynamo", "bench"].iter().chain(args))
                .map(|cli| cli.command.worker_threads())
        };
        assert_eq!(threads(&[]).unwrap(), None);
        assert_eq!(threads(&["--threads", "1"]).unwrap(), Some(1));
        assert!(threads(&["--threads", "0"]).is_err());
    }

    #[test]
    fn replies_are_classified() {
        use dynamo_proto::GetReply;
        assert_eq!(
            classify_reply(ClientReply::Get(GetReply {
                siblings: vec![],
                context: Default::default()
            })),
            Outcome::Read { live: 0 }
        );
        let kind = |e: ClientError| match classify_reply(ClientReply::Error(e)) {
            Outcome::Failed { kind, .. } => kind,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            kind(ClientError::Quorum {
                op: "put".into(),
                write: true,
                needed: 2,
                replied: 1,
                n: 3
            }),
            ErrorKind::Quorum
        );
        assert_eq!(
            kind(ClientError::Unavailable("x".into())),
            ErrorKind::Unavailable
        );
        assert_eq!(
            kind(ClientError::TooManySiblings {
                count: 17,
                limit: 16
            }),
            ErrorKind::Other
        );
    }
}
