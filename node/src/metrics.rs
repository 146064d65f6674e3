//! What a node counts about itself, served as Prometheus text on `GET /metrics`.
//!
//! Every figure is an atomic the runtime bumps where the thing happens: the
//! core task counts client requests by kind and outcome and times each from
//! its submission to its answer; the storage worker counts group commits,
//! their sizes and how long the write and the sync took; the peer transport
//! counts messages, socket writes and bytes. Nothing here takes a lock or
//! allocates on the hot path, and nothing feeds back into the core, so the
//! simulator's traces do not depend on it.
//!
//! Histograms have fixed buckets (Prometheus' cumulative `le` buckets are
//! summed at render time); a sum and a count go with each.

use crate::storage::CacheMetrics;
use dynamo_proto::{ClientError, ClientReply, ClientRequest};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Bucket bounds of every duration histogram, in seconds.
const SECONDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
/// Bucket bounds of every size histogram (items per batch).
const SIZES: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

/// A histogram with fixed buckets. Values are recorded in a base unit
/// (nanoseconds or items) and rendered scaled (to seconds or items).
pub struct Histogram {
    /// Upper bounds, in the rendered unit.
    bounds: &'static [f64],
    /// Multiplies a recorded value into the rendered unit.
    scale: f64,
    /// Observations per bucket (not cumulative); the last is above every bound.
    buckets: Box<[AtomicU64]>,
    sum: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64], scale: f64) -> Histogram {
        Histogram {
            bounds,
            scale,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
        }
    }

    /// A histogram of durations, rendered in seconds.
    pub fn seconds() -> Histogram {
        Histogram::new(SECONDS, 1e-9)
    }

    /// A histogram of item counts.
    pub fn sizes() -> Histogram {
        Histogram::new(SIZES, 1.0)
    }

    /// Records `value` in the base unit.
    fn record(&self, value: u64) {
        let scaled = value as f64 * self.scale;
        let i = self
            .bounds
            .iter()
            .position(|&b| scaled <= b)
            .unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(value, Ordering::Relaxed);
    }

    pub fn observe_duration(&self, d: Duration) {
        self.record(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    pub fn observe_count(&self, n: usize) {
        self.record(n as u64);
    }
}

/// What a client request asked for, as a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    Get,
    Put,
    Delete,
    LocalGet,
    ClusterInfo,
    Ping,
}

impl RequestKind {
    const ALL: [RequestKind; 6] = [
        RequestKind::Get,
        RequestKind::Put,
        RequestKind::Delete,
        RequestKind::LocalGet,
        RequestKind::ClusterInfo,
        RequestKind::Ping,
    ];

    pub fn of(request: &ClientRequest) -> RequestKind {
        match request {
            ClientRequest::Get { .. } => RequestKind::Get,
            ClientRequest::Put { value: Some(_), .. } => RequestKind::Put,
            ClientRequest::Put { value: None, .. } => RequestKind::Delete,
            ClientRequest::LocalGet { .. } => RequestKind::LocalGet,
            ClientRequest::ClusterInfo => RequestKind::ClusterInfo,
            ClientRequest::Ping => RequestKind::Ping,
        }
    }

    fn label(self) -> &'static str {
        match self {
            RequestKind::Get => "get",
            RequestKind::Put => "put",
            RequestKind::Delete => "delete",
            RequestKind::LocalGet => "local_get",
            RequestKind::ClusterInfo => "cluster_info",
            RequestKind::Ping => "ping",
        }
    }
}

/// How a client request ended, as a metric label: `ok` or the error's kind.
const OUTCOMES: [&str; 7] = [
    "ok",
    "quorum",
    "too_many_siblings",
    "invalid",
    "too_large",
    "unavailable",
    "internal",
];

fn outcome(reply: &ClientReply) -> usize {
    match reply {
        ClientReply::Error(e) => match e {
            ClientError::Quorum { .. } => 1,
            ClientError::TooManySiblings { .. } => 2,
            ClientError::Invalid(_) => 3,
            ClientError::KeyTooLarge { .. } | ClientError::ValueTooLarge { .. } => 4,
            ClientError::Unavailable(_) => 5,
            ClientError::Internal(_) => 6,
        },
        _ => 0,
    }
}

/// Client requests, counted and timed by the core task.
pub struct RequestMetrics {
    /// By kind, then outcome.
    answered: [[AtomicU64; OUTCOMES.len()]; RequestKind::ALL.len()],
    /// Submission to answer, by kind.
    duration: [Histogram; RequestKind::ALL.len()],
    in_flight: AtomicU64,
}

impl Default for RequestMetrics {
    fn default() -> Self {
        RequestMetrics {
            answered: Default::default(),
            duration: std::array::from_fn(|_| Histogram::seconds()),
            in_flight: AtomicU64::new(0),
        }
    }
}

impl RequestMetrics {
    /// A request reached the core.
    pub fn started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A request the core started was answered with `reply`, `took` after it
    /// was submitted.
    pub fn answered(&self, kind: RequestKind, reply: &ClientReply, took: Duration) {
        let k = kind as usize;
        self.answered[k][outcome(reply)].fetch_add(1, Ordering::Relaxed);
        self.duration[k].observe_duration(took);
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Requests of `kind` answered with `outcome` (`"ok"` or an error kind).
    #[cfg(test)]
    fn count(&self, kind: RequestKind, outcome: &str) -> u64 {
        OUTCOMES.iter().position(|o| *o == outcome).map_or(0, |o| {
            self.answered[kind as usize][o].load(Ordering::Relaxed)
        })
    }
}

/// The storage worker's group commits.
pub struct StorageMetrics {
    /// Persist requests the core submitted.
    pub requests: AtomicU64,
    /// Batches committed (one write and, under `always`, one sync each).
    pub batches: AtomicU64,
    /// Persist requests per batch.
    pub batch_requests: Histogram,
    /// Storage writes per batch, after back-to-back writes of one key collapse.
    pub batch_writes: Histogram,
    /// Applying one batch's writes.
    pub write_seconds: Histogram,
    /// One sync (fsync) of the engine.
    pub sync_seconds: Histogram,
    /// Batches and syncs that failed.
    pub failures: AtomicU64,
}

impl Default for StorageMetrics {
    fn default() -> Self {
        StorageMetrics {
            requests: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            batch_requests: Histogram::sizes(),
            batch_writes: Histogram::sizes(),
            write_seconds: Histogram::seconds(),
            sync_seconds: Histogram::seconds(),
            failures: AtomicU64::new(0),
        }
    }
}

/// Internode traffic, over every peer.
#[derive(Default)]
pub struct PeerMetrics {
    pub messages_sent: AtomicU64,
    /// Socket writes that carried them (the gathered batches).
    pub writes: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub messages_received: AtomicU64,
    /// Outbound connections established (first ones and reconnections).
    pub connects: AtomicU64,
    /// Outbound connections lost or attempts that failed.
    pub connect_failures: AtomicU64,
    /// Messages for peers never written: the peer was unreachable, its queue
    /// was full, or the connection failed with them in a write.
    pub messages_dropped: AtomicU64,
    /// Estimated bytes of messages waiting for peers: queued, or in a batch
    /// being written.
    pub queued_bytes: AtomicU64,
}

/// Everything one node counts.
pub struct Metrics {
    node: String,
    pub requests: RequestMetrics,
    pub storage: Arc<StorageMetrics>,
    /// The row cache in front of the storage engine.
    pub cache: Arc<CacheMetrics>,
    pub peers: PeerMetrics,
    /// Peers the core currently considers reachable, of `peers_known`.
    pub peers_reachable: AtomicU64,
    pub peers_known: AtomicU64,
    /// Wakeups of the core task, and the events they handled.
    pub core_turns: AtomicU64,
    pub core_events: AtomicU64,
    /// Timestamps seen beyond the clock drift bound (the core's count, copied
    /// after each turn).
    pub far_future_timestamps: AtomicU64,
    /// Anti-entropy's counters (the core's, copied after each turn).
    pub anti_entropy_exchanges: AtomicU64,
    pub anti_entropy_segments_differing: AtomicU64,
    pub anti_entropy_keys_repaired: AtomicU64,
    pub anti_entropy_read_failures: AtomicU64,
    pub anti_entropy_segments_corrected: AtomicU64,
    /// Hinted handoff's counters and the hints held (the core's, copied
    /// after each turn).
    pub hints_held: AtomicU64,
    pub hints_accepted: AtomicU64,
    pub hints_refused: AtomicU64,
    pub hints_delivered: AtomicU64,
    /// Client connections open (every front end), and those refused at the
    /// bound (see [`crate::connection_limit`]).
    pub client_connections: AtomicU64,
    pub client_connections_refused: AtomicU64,
}

impl Metrics {
    pub fn new(node: &str, storage: Arc<StorageMetrics>, cache: Arc<CacheMetrics>) -> Metrics {
        Metrics {
            node: node.to_string(),
            requests: RequestMetrics::default(),
            storage,
            cache,
            peers: PeerMetrics::default(),
            peers_reachable: AtomicU64::new(0),
            peers_known: AtomicU64::new(0),
            core_turns: AtomicU64::new(0),
            core_events: AtomicU64::new(0),
            far_future_timestamps: AtomicU64::new(0),
            anti_entropy_exchanges: AtomicU64::new(0),
            anti_entropy_segments_differing: AtomicU64::new(0),
            anti_entropy_keys_repaired: AtomicU64::new(0),
            anti_entropy_read_failures: AtomicU64::new(0),
            anti_entropy_segments_corrected: AtomicU64::new(0),
            hints_held: AtomicU64::new(0),
            hints_accepted: AtomicU64::new(0),
            hints_refused: AtomicU64::new(0),
            hints_delivered: AtomicU64::new(0),
            client_connections: AtomicU64::new(0),
            client_connections_refused: AtomicU64::new(0),
        }
    }

    /// Copies what the core counts itself (far-future timestamps,
    /// anti-entropy) after one of its turns.
    pub fn record_core(&self, node: &dynamo_core::Node) {
        self.far_future_timestamps
            .store(node.far_future_timestamps(), Ordering::Relaxed);
        let ae = node.anti_entropy_stats();
        self.anti_entropy_exchanges
            .store(ae.exchanges, Ordering::Relaxed);
        self.anti_entropy_segments_differing
            .store(ae.segments_differing, Ordering::Relaxed);
        self.anti_entropy_keys_repaired
            .store(ae.keys_repaired, Ordering::Relaxed);
        self.anti_entropy_read_failures
            .store(ae.read_failures, Ordering::Relaxed);
        self.anti_entropy_segments_corrected
            .store(ae.segments_corrected, Ordering::Relaxed);
        let hints = node.handoff_stats();
        self.hints_held.store(hints.held, Ordering::Relaxed);
        self.hints_accepted.store(hints.accepted, Ordering::Relaxed);
        self.hints_refused.store(hints.refused, Ordering::Relaxed);
        self.hints_delivered
            .store(hints.delivered, Ordering::Relaxed);
    }

    /// A node's metrics with a storage worker's counters of its own, for
    /// front-end tests that run without a storage worker.
    #[cfg(test)]
    pub(crate) fn for_tests(node: &str) -> Arc<Metrics> {
        Arc::new(Metrics::new(node, Arc::default(), Arc::default()))
    }

    /// The Prometheus text exposition (format 0.0.4) of every metric.
    pub fn render(&self) -> String {
        let mut out = Text::default();
        out.header(
            "dynamo_node_info",
            "gauge",
            "This node: its id and the build's version.",
        );
        out.sample(
            "dynamo_node_info",
            &[("node", &self.node), ("version", env!("CARGO_PKG_VERSION"))],
            1,
        );

        let r = &self.requests;
        out.header(
            "dynamo_client_requests_total",
            "counter",
            "Client requests answered (binary, HTTP and RESP front ends), by kind and outcome.",
        );
        for kind in RequestKind::ALL {
            for (o, name) in OUTCOMES.iter().enumerate() {
                let v = r.answered[kind as usize][o].load(Ordering::Relaxed);
                out.sample(
                    "dynamo_client_requests_total",
                    &[("kind", kind.label()), ("outcome", name)],
                    v,
                );
            }
        }
        out.header(
            "dynamo_client_request_duration_seconds",
            "histogram",
            "From a client request's submission to the core until its answer, by kind.",
        );
        for kind in RequestKind::ALL {
            out.histogram(
                "dynamo_client_request_duration_seconds",
                &[("kind", kind.label())],
                &r.duration[kind as usize],
            );
        }
        let s = &self.storage;
        let c = &self.cache;
        let p = &self.peers;
        let scalars: [(&str, &str, &str, &AtomicU64); 34] = [
            (
                "dynamo_client_requests_in_flight",
                "gauge",
                "Client requests the core has not answered yet.",
                &r.in_flight,
            ),
            (
                "dynamo_storage_persist_requests_total",
                "counter",
                "Writes the core asked the storage worker to make durable.",
                &s.requests,
            ),
            (
                "dynamo_storage_batches_total",
                "counter",
                "Group commits: one storage write and, with sync always, one sync each.",
                &s.batches,
            ),
            (
                "dynamo_storage_failures_total",
                "counter",
                "Storage batches or syncs that failed.",
                &s.failures,
            ),
            (
                "dynamo_storage_cache_hits_total",
                "counter",
                "Reads of a key's set answered by the row cache.",
                &c.hits,
            ),
            (
                "dynamo_storage_cache_misses_total",
                "counter",
                "Reads of a key's set that went to the storage engine.",
                &c.misses,
            ),
            (
                "dynamo_storage_cache_fills_skipped_total",
                "counter",
                "Missed reads not kept in the cache because a write to their stripe ran meanwhile.",
                &c.fills_skipped,
            ),
            (
                "dynamo_storage_cache_entries",
                "gauge",
                "Keys the row cache holds (absent keys included).",
                &c.entries,
            ),
            (
                "dynamo_storage_cache_bytes",
                "gauge",
                "Estimated memory of the row cache's entries.",
                &c.bytes,
            ),
            (
                "dynamo_storage_cache_capacity_bytes",
                "gauge",
                "The row cache's bound (--cache-mb); 0 when it is off.",
                &c.capacity_bytes,
            ),
            (
                "dynamo_peer_messages_sent_total",
                "counter",
                "Messages written to peers.",
                &p.messages_sent,
            ),
            (
                "dynamo_peer_writes_total",
                "counter",
                "Socket writes to peers (each carries a gathered batch of messages).",
                &p.writes,
            ),
            (
                "dynamo_peer_bytes_sent_total",
                "counter",
                "Bytes written to peers.",
                &p.bytes_sent,
            ),
            (
                "dynamo_peer_messages_received_total",
                "counter",
                "Messages received from peers (pings included).",
                &p.messages_received,
            ),
            (
                "dynamo_peer_connects_total",
                "counter",
                "Outbound peer connections established.",
                &p.connects,
            ),
            (
                "dynamo_peer_connect_failures_total",
                "counter",
                "Outbound peer connections that failed or were lost.",
                &p.connect_failures,
            ),
            (
                "dynamo_peer_messages_dropped_total",
                "counter",
                "Messages for peers dropped unwritten: the peer was unreachable, its queue full, or its connection failed.",
                &p.messages_dropped,
            ),
            (
                "dynamo_peer_queued_bytes",
                "gauge",
                "Estimated bytes of messages waiting for peers, queued or being written.",
                &p.queued_bytes,
            ),
            (
                "dynamo_peers_reachable",
                "gauge",
                "Peers the core considers reachable.",
                &self.peers_reachable,
            ),
            (
                "dynamo_peers",
                "gauge",
                "Peers this node knows.",
                &self.peers_known,
            ),
            (
                "dynamo_core_turns_total",
                "counter",
                "Wakeups of the core task.",
                &self.core_turns,
            ),
            (
                "dynamo_core_events_total",
                "counter",
                "Events the core handled (client requests, peer messages, durable writes, timers).",
                &self.core_events,
            ),
            (
                "dynamo_clock_far_future_timestamps_total",
                "counter",
                "Sightings of version timestamps more than --max-clock-drift-ms ahead of this node's clock, which did not move it: every replication, read and write of a key stamped by a clock set ahead counts, until this node's clock catches up.",
                &self.far_future_timestamps,
            ),
            (
                "dynamo_anti_entropy_exchanges_total",
                "counter",
                "Anti-entropy exchanges this node started: one partition's segment hashes sent to one other replica.",
                &self.anti_entropy_exchanges,
            ),
            (
                "dynamo_anti_entropy_segments_differing_total",
                "counter",
                "Hash-tree segments found to differ from a replica's, on either side of an exchange (in sync replicas add none).",
                &self.anti_entropy_segments_differing,
            ),
            (
                "dynamo_anti_entropy_keys_repaired_total",
                "counter",
                "Keys whose stored set an anti-entropy exchange changed on this node.",
                &self.anti_entropy_keys_repaired,
            ),
            (
                "dynamo_anti_entropy_read_failures_total",
                "counter",
                "Anti-entropy exchanges that could not run because this node could not read the partition from its store.",
                &self.anti_entropy_read_failures,
            ),
            (
                "dynamo_anti_entropy_segments_corrected_total",
                "counter",
                "Hash-tree segments a partition scan found wrong on this node and corrected (a bug if ever above 0; logged).",
                &self.anti_entropy_segments_corrected,
            ),
            (
                "dynamo_hints",
                "gauge",
                "Hints this node holds as a fallback for primaries that looked down, not yet handed off.",
                &self.hints_held,
            ),
            (
                "dynamo_hints_accepted_total",
                "counter",
                "Writes this node accepted as a hint for a primary that looked down to their coordinator.",
                &self.hints_accepted,
            ),
            (
                "dynamo_hints_refused_total",
                "counter",
                "Hints this node refused: it already held its bound of 100000, or the hint named a node that is not a primary of the key.",
                &self.hints_refused,
            ),
            (
                "dynamo_hints_delivered_total",
                "counter",
                "Hints handed off: their primary persisted them and this node removed them.",
                &self.hints_delivered,
            ),
            (
                "dynamo_client_connections",
                "gauge",
                "Client connections open, over the binary, RESP and HTTP front ends.",
                &self.client_connections,
            ),
            (
                "dynamo_client_connections_refused_total",
                "counter",
                "Client connections refused because --max-connections were open.",
                &self.client_connections_refused,
            ),
        ];
        for (name, kind, help, v) in scalars {
            out.header(name, kind, help);
            out.sample(name, &[], v.load(Ordering::Relaxed));
        }
        let histograms: [(&str, &str, &Histogram); 4] = [
            (
                "dynamo_storage_batch_requests",
                "Persist requests per group commit.",
                &s.batch_requests,
            ),
            (
                "dynamo_storage_batch_writes",
                "Storage writes per group commit, after back-to-back writes of one key collapse.",
                &s.batch_writes,
            ),
            (
                "dynamo_storage_write_seconds",
                "Applying one group commit's writes to the engine.",
                &s.write_seconds,
            ),
            (
                "dynamo_storage_sync_seconds",
                "One sync of the engine (fsync of its journal).",
                &s.sync_seconds,
            ),
        ];
        for (name, help, h) in histograms {
            out.header(name, "histogram", help);
            out.histogram(name, &[], h);
        }
        out.0
    }
}

/// Prometheus text being written.
#[derive(Default)]
struct Text(String);

impl Text {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"");
                escape_label(&mut self.0, v);
                self.0.push('"');
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &Histogram) {
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0;
        for (i, b) in h.buckets.iter().enumerate() {
            cumulative += b.load(Ordering::Relaxed);
            let le = match h.bounds.get(i) {
                Some(bound) => bound.to_string(),
                None => "+Inf".to_string(),
            };
            let mut with_le = labels.to_vec();
            with_le.push(("le", &le));
            self.sample(&bucket, &with_le, cumulative);
        }
        let sum = h.sum.load(Ordering::Relaxed) as f64 * h.scale;
        self.sample(&format!("{name}_sum"), labels, sum);
        // The count is the +Inf bucket, read once, so the two always agree.
        self.sample(&format!("{name}_count"), labels, cumulative);
    }
}

/// A label value as the text format wants it: backslash, quote and newline escaped.
fn escape_label(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starting {prefix:?} in:\n{text}"))
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_count_matches_the_inf_bucket() {
        let m = Metrics::for_tests("n1");
        for us in [50, 300, 300, 4_000, 7_000_000] {
            m.storage
                .sync_seconds
                .observe_duration(Duration::from_micros(us));
        }
        let text = m.render();
        let bucket = |le: &str| {
            let l = line(
                &text,
                &format!("dynamo_storage_sync_seconds_bucket{{le=\"{le}\"}}"),
            );
            l.rsplit(' ').next().unwrap().parse::<u64>().unwrap()
        };
        assert_eq!(bucket("0.0001"), 1);
        assert_eq!(bucket("0.00025"), 1);
        assert_eq!(bucket("0.0005"), 3);
        assert_eq!(bucket("0.005"), 4);
        assert_eq!(bucket("5"), 4, "7 s is above every bound");
        assert_eq!(bucket("+Inf"), 5);
        assert_eq!(
            line(&text, "dynamo_storage_sync_seconds_count "),
            "dynamo_storage_sync_seconds_count 5"
        );
        let sum: f64 = line(&text, "dynamo_storage_sync_seconds_sum ")
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!((sum - 7.00465).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn the_row_cache_reports_its_hits_misses_and_size() {
        use crate::storage::{CachedStorage, MemoryStorage, WriteOp};
        let cache = Arc::new(CacheMetrics::default());
        let m = Metrics::new("n1", Arc::default(), cache.clone());
        let storage = CachedStorage::wrap(Arc::new(MemoryStorage::new()), 1 << 20, cache);
        let write = WriteOp {
            partition: 0,
            key: b"k".to_vec(),
            set: Some(dynamo_proto::DvvSet::default()),
        };
        storage.write_batch(&[write]).unwrap();
        storage.get(0, b"k").unwrap();
        storage.get(0, b"absent").unwrap();
        let text = m.render();
        assert_eq!(
            line(&text, "dynamo_storage_cache_hits_total "),
            "dynamo_storage_cache_hits_total 1"
        );
        assert_eq!(
            line(&text, "dynamo_storage_cache_misses_total "),
            "dynamo_storage_cache_misses_total 1"
        );
        assert_eq!(
            line(&text, "dynamo_storage_cache_entries "),
            "dynamo_storage_cache_entries 1"
        );
        assert_eq!(
            line(&text, "dynamo_storage_cache_capacity_bytes "),
            "dynamo_storage_cache_capacity_bytes 1048576"
        );
        let bytes: u64 = line(&text, "dynamo_storage_cache_bytes ")
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(bytes > 0);
    }

    #[test]
    fn requests_are_counted_by_kind_and_outcome() {
        let m = Metrics::for_tests("n1");
        let quorum = ClientReply::Error(ClientError::Quorum {
            op: "put".into(),
            write: true,
            needed: 2,
            replied: 1,
            n: 3,
        });
        for _ in 0..3 {
            m.requests.started();
        }
        m.requests
            .answered(RequestKind::Put, &quorum, Duration::from_millis(3));
        m.requests
            .answered(RequestKind::Put, &quorum, Duration::from_millis(3));
        m.requests.answered(
            RequestKind::LocalGet,
            &ClientReply::LocalGet(None),
            Duration::ZERO,
        );
        assert_eq!(m.requests.count(RequestKind::Put, "quorum"), 2);
        assert_eq!(m.requests.count(RequestKind::LocalGet, "ok"), 1);
        assert_eq!(m.requests.count(RequestKind::Get, "ok"), 0);
        m.far_future_timestamps.store(3, Ordering::Relaxed);
        m.anti_entropy_keys_repaired.store(5, Ordering::Relaxed);
        let text = m.render();
        assert!(
            text.contains("dynamo_anti_entropy_keys_repaired_total 5\n"),
            "{text}"
        );
        assert!(
            text.contains("dynamo_clock_far_future_timestamps_total 3\n"),
            "{text}"
        );
        assert!(
            text.contains("dynamo_client_requests_total{kind=\"put\",outcome=\"quorum\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("dynamo_client_request_duration_seconds_count{kind=\"put\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "dynamo_client_request_duration_seconds_bucket{kind=\"put\",le=\"0.0025\"} 0\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "dynamo_client_request_duration_seconds_bucket{kind=\"put\",le=\"0.005\"} 2\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("dynamo_client_requests_in_flight 0\n"),
            "{text}"
        );
    }

    #[test]
    fn every_sample_follows_its_help_and_type_and_labels_are_escaped() {
        let m = Metrics::for_tests("a \"quoted\\\" id\n");
        let text = m.render();
        assert!(
            text.contains("dynamo_node_info{node=\"a \\\"quoted\\\\\\\" id\\n\",version="),
            "{text}"
        );
        let mut typed = std::collections::BTreeSet::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                typed.insert(rest.split(' ').next().unwrap().to_string());
            } else if !l.starts_with('#') {
                let name = l.split(['{', ' ']).next().unwrap();
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|b| typed.contains(*b)))
                    .unwrap_or(name);
                assert!(typed.contains(base), "{name} has no # TYPE before it");
                let value = l.rsplit(' ').next().unwrap();
                assert!(value.parse::<f64>().is_ok(), "{l}");
            }
        }
    }
}
