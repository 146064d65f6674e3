//! Server configuration: defaults, a TOML file, `DYNAMO_*` environment variables
//! and command-line flags, in rising precedence (a flag beats the environment,
//! the environment beats the file, the file beats the defaults).
//!
//! It owns parsing and validation only; it never opens sockets or files other
//! than the config file itself.

use crate::storage::SyncPolicy;
use anyhow::{bail, Context as _};
use dynamo_core::version::Versioning;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The most runtime worker threads a node may ask for.
pub const MAX_WORKER_THREADS: usize = 1024;

/// The longest group-commit gather delay accepted (10 ms): past it the delay
/// costs more latency than any batch saves.
pub const MAX_COMMIT_DELAY_US: u64 = 10_000;

/// The memtable size when none is given, fjall's default.
pub const DEFAULT_MEMTABLE_MB: u64 = 64;
/// Bounds of `--memtable-mb`.
pub const MEMTABLE_MB_RANGE: std::ops::RangeInclusive<u64> = 4..=1024;

/// `dynamo server` flags. Each also reads a `DYNAMO_*` variable; unset ones fall
/// back to the config file, then to the defaults.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServerArgs {
    /// A TOML file with any of the settings below (flag names with `_` for `-`).
    #[arg(long, env = "DYNAMO_CONFIG")]
    pub config: Option<PathBuf>,
    /// This node's name, unique in the cluster. [default: n1]
    #[arg(long, env = "DYNAMO_NODE_ID")]
    pub node_id: Option<String>,
    /// The cluster's name; nodes refuse peers from another cluster. [default: dynamo]
    #[arg(long, env = "DYNAMO_CLUSTER_ID")]
    pub cluster_id: Option<String>,
    /// Address for internode traffic. [default: 127.0.0.1:7000]
    #[arg(long, env = "DYNAMO_PEER_ADDR")]
    pub peer_addr: Option<String>,
    /// Address for the binary client protocol. [default: 127.0.0.1:7100]
    #[arg(long, env = "DYNAMO_CLIENT_ADDR")]
    pub client_addr: Option<String>,
    /// Address for the HTTP API ("off" disables it). [default: 127.0.0.1:8080]
    #[arg(long, env = "DYNAMO_HTTP_ADDR")]
    pub http_addr: Option<String>,
    /// Address for the Redis protocol (RESP2), e.g. 127.0.0.1:6380. [default: off]
    #[arg(long, env = "DYNAMO_RESP_ADDR")]
    pub resp_addr: Option<String>,
    /// The host name or IP address peers and clients reach this node at, when
    /// it differs from the bound addresses (a node bound to 0.0.0.0, in a
    /// container, behind NAT). The node advertises its client and HTTP
    /// addresses (in `/cluster`, and to peers for clients' ring routing) as
    /// this host with the bound ports. [default: the bound addresses]
    #[arg(long, env = "DYNAMO_ADVERTISE_HOST")]
    pub advertise_host: Option<String>,
    /// Where this node keeps its data. [default: ./data/<node-id>]
    #[arg(long, env = "DYNAMO_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The other members as NAME=PEER_ADDR, repeated or comma-separated.
    #[arg(long = "peer", env = "DYNAMO_PEERS", value_delimiter = ',')]
    pub peers: Vec<String>,
    /// Replicas per key. [default: 3]
    #[arg(long, env = "DYNAMO_N")]
    pub n: Option<u8>,
    /// Default read quorum. [default: 2]
    #[arg(long, env = "DYNAMO_R")]
    pub r: Option<u8>,
    /// Default write quorum. [default: 2]
    #[arg(long, env = "DYNAMO_W")]
    pub w: Option<u8>,
    /// Ring partitions, a power of two, fixed at cluster creation. [default: 256]
    #[arg(long, env = "DYNAMO_PARTITIONS")]
    pub partitions: Option<u32>,
    /// always | interval:<ms> | none. [default: always]
    #[arg(long, env = "DYNAMO_SYNC")]
    pub sync: Option<String>,
    /// Under `--sync always`, how long at most a group commit waits for more
    /// writes before its fsync, in microseconds: 25 per write of the previous
    /// batch, none after a lone write; 0 turns it off. [default: 500]
    #[arg(long, env = "DYNAMO_COMMIT_DELAY_US")]
    pub commit_delay_us: Option<u64>,
    /// How long a coordinator waits for its quorum. [default: 2000]
    #[arg(long, env = "DYNAMO_REQUEST_TIMEOUT_MS")]
    pub request_timeout_ms: Option<u64>,
    /// Largest key accepted, in bytes. [default: 1024]
    #[arg(long, env = "DYNAMO_MAX_KEY_BYTES")]
    pub max_key_bytes: Option<usize>,
    /// Largest value accepted, in bytes. [default: 1048576]
    #[arg(long, env = "DYNAMO_MAX_VALUE_BYTES")]
    pub max_value_bytes: Option<usize>,
    /// Most siblings a key may hold before writes without a resolving context are refused. [default: 16]
    #[arg(long, env = "DYNAMO_MAX_SIBLINGS")]
    pub max_siblings: Option<usize>,
    /// dvv (siblings) | lww (last write wins; can drop concurrent writes). [default: dvv]
    #[arg(long, env = "DYNAMO_VERSIONING")]
    pub versioning: Option<String>,
    /// How far ahead of this node's clock a version's timestamp may be and
    /// still move the node's hybrid clock, in milliseconds; later ones are
    /// counted and logged (a clock set wrong). [default: 60000]
    #[arg(long, env = "DYNAMO_MAX_CLOCK_DRIFT_MS")]
    pub max_clock_drift_ms: Option<u64>,
    /// Time between two anti-entropy exchanges this node starts, in
    /// milliseconds: each compares one partition's hash tree with one other
    /// replica and repairs what differs; 0 turns anti-entropy off. [default: 1000]
    #[arg(long, env = "DYNAMO_ANTI_ENTROPY_INTERVAL_MS")]
    pub anti_entropy_interval_ms: Option<u64>,
    /// Sloppy quorum: when a primary of a key looks down, a write goes to the
    /// next healthy node as a hint for it, and that node's acknowledgement
    /// counts towards W (Dynamo's and Riak's behaviour). With false, hints
    /// are still kept and handed off, but W counts primaries only, which
    /// keeps read-your-writes under R + W > N. All nodes should agree.
    /// [default: true]
    #[arg(long, env = "DYNAMO_SLOPPY_QUORUM")]
    pub sloppy_quorum: Option<bool>,
    /// Memory for the row cache of recently read and written keys, in MiB;
    /// worth it for read-heavy loads on small values (see the README). [default: 0, off]
    #[arg(long, env = "DYNAMO_CACHE_MB")]
    pub cache_mb: Option<u64>,
    /// Size of the storage engine's in-memory write buffer, in MiB: when it is
    /// full it is flushed to a table. Replicas take the same writes, so with
    /// one size they flush in step; nodes sharing a machine do better with
    /// different sizes (`dynamo dev` spreads them). [default: 64]
    #[arg(long, env = "DYNAMO_MEMTABLE_MB")]
    pub memtable_mb: Option<u64>,
    /// Threads that run the node's tasks. Several nodes sharing one machine
    /// run better with a share of its cores each (`dynamo dev` does that).
    /// [default: one per core]
    #[arg(long, env = "DYNAMO_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// Client connections served at once, over the binary, RESP and HTTP
    /// ports; past it a new one is told so and closed. Lowered at start to
    /// fit the open-files limit. [default: 4096]
    #[arg(long, env = "DYNAMO_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
}

/// The same settings as they may appear in the TOML file.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    node_id: Option<String>,
    cluster_id: Option<String>,
    peer_addr: Option<String>,
    client_addr: Option<String>,
    http_addr: Option<String>,
    resp_addr: Option<String>,
    advertise_host: Option<String>,
    data_dir: Option<PathBuf>,
    peers: Option<Vec<String>>,
    n: Option<u8>,
    r: Option<u8>,
    w: Option<u8>,
    partitions: Option<u32>,
    sync: Option<String>,
    commit_delay_us: Option<u64>,
    request_timeout_ms: Option<u64>,
    max_key_bytes: Option<usize>,
    max_value_bytes: Option<usize>,
    max_siblings: Option<usize>,
    versioning: Option<String>,
    max_clock_drift_ms: Option<u64>,
    anti_entropy_interval_ms: Option<u64>,
    sloppy_quorum: Option<bool>,
    cache_mb: Option<u64>,
    memtable_mb: Option<u64>,
    worker_threads: Option<usize>,
    max_connections: Option<usize>,
}

/// A peer named on the command line or in the file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PeerSpec {
    pub id: String,
    pub peer_addr: String,
}

impl std::str::FromStr for PeerSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<PeerSpec> {
        let Some((id, addr)) = s.trim().split_once('=') else {
            bail!("peer {s:?} should look like NAME=HOST:PORT (for example n2=127.0.0.1:7001)");
        };
        if id.is_empty() || addr.is_empty() || !addr.contains(':') {
            bail!("peer {s:?} should look like NAME=HOST:PORT (for example n2=127.0.0.1:7001)");
        }
        Ok(PeerSpec {
            id: id.to_string(),
            peer_addr: addr.to_string(),
        })
    }
}

/// The effective configuration, every setting resolved and validated.
#[derive(Clone, Debug, Serialize)]
pub struct ServerConfig {
    pub node_id: String,
    pub cluster_id: String,
    pub peer_addr: String,
    pub client_addr: String,
    /// `None` when HTTP is off.
    pub http_addr: Option<String>,
    /// The Redis-protocol listener; `None` (the default) when it is off.
    pub resp_addr: Option<String>,
    /// The host others reach this node at; `None`: the bound addresses are.
    pub advertise_host: Option<String>,
    pub data_dir: PathBuf,
    pub peers: Vec<PeerSpec>,
    pub n: u8,
    pub r: u8,
    pub w: u8,
    pub partitions: u32,
    #[serde(serialize_with = "display")]
    pub sync: SyncPolicy,
    /// The bound on a group commit's gather delay, in microseconds.
    pub commit_delay_us: u64,
    pub request_timeout_ms: u64,
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    pub max_siblings: usize,
    #[serde(serialize_with = "debug_lower")]
    pub versioning: Versioning,
    pub max_clock_drift_ms: u64,
    /// Time between anti-entropy exchanges; 0: off.
    pub anti_entropy_interval_ms: u64,
    /// Whether fallbacks' hints count towards W.
    pub sloppy_quorum: bool,
    /// The row cache's bound in bytes; 0: no cache.
    pub cache_bytes: u64,
    /// The storage engine's memtable size in MiB.
    pub memtable_mb: u64,
    /// Runtime worker threads; `None`: one per core.
    pub worker_threads: Option<usize>,
    /// Client connections served at once (see [`crate::connection_limit`]).
    pub max_connections: usize,
}

fn display<S: serde::Serializer, T: std::fmt::Display>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn debug_lower<S: serde::Serializer, T: std::fmt::Debug>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{v:?}").to_lowercase())
}

impl ServerConfig {
    /// Resolves flags and environment (already merged by clap) over the file
    /// over the defaults, and validates the result.
    pub fn resolve(args: &ServerArgs) -> anyhow::Result<ServerConfig> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading config file {}", path.display()))?;
                toml::from_str::<FileConfig>(&text)
                    .with_context(|| format!("parsing config file {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        fn pick<T: Clone>(flag: &Option<T>, file: Option<T>, default: T) -> T {
            flag.clone().or(file).unwrap_or(default)
        }
        let node_id = pick(&args.node_id, file.node_id, "n1".into());
        let peers_raw = if args.peers.is_empty() {
            file.peers.unwrap_or_default()
        } else {
            args.peers.clone()
        };
        let mut peers = Vec::new();
        for raw in peers_raw.iter().filter(|p| !p.trim().is_empty()) {
            let spec: PeerSpec = raw.parse()?;
            if spec.id == node_id {
                continue; // A shared peer list may name this node too.
            }
            if peers.iter().any(|p: &PeerSpec| p.id == spec.id) {
                bail!("peer {} is listed twice", spec.id);
            }
            peers.push(spec);
        }
        let http_addr = pick(&args.http_addr, file.http_addr, "127.0.0.1:8080".into());
        let http_addr = match http_addr.as_str() {
            "" | "off" | "none" => None,
            _ => Some(http_addr),
        };
        let resp_addr = match args.resp_addr.clone().or(file.resp_addr) {
            Some(a) if !matches!(a.as_str(), "" | "off" | "none") => Some(a),
            _ => None,
        };
        let sync_raw = pick(&args.sync, file.sync, "always".into());
        let sync: SyncPolicy = sync_raw
            .parse()
            .map_err(|e| anyhow::anyhow!("--sync {sync_raw:?}: {e}"))?;
        let versioning = match pick(&args.versioning, file.versioning, "dvv".into()).as_str() {
            "dvv" => Versioning::Dvv,
            "lww" => Versioning::Lww,
            other => {
                bail!("--versioning {other:?}: choose dvv (siblings) or lww (last write wins)")
            }
        };
        let config = ServerConfig {
            data_dir: pick(
                &args.data_dir,
                file.data_dir,
                PathBuf::from("data").join(&node_id),
            ),
            node_id,
            cluster_id: pick(&args.cluster_id, file.cluster_id, "dynamo".into()),
            peer_addr: pick(&args.peer_addr, file.peer_addr, "127.0.0.1:7000".into()),
            client_addr: pick(&args.client_addr, file.client_addr, "127.0.0.1:7100".into()),
            http_addr,
            resp_addr,
            advertise_host: args.advertise_host.clone().or(file.advertise_host),
            peers,
            n: pick(&args.n, file.n, 3),
            r: pick(&args.r, file.r, 2),
            w: pick(&args.w, file.w, 2),
            partitions: pick(&args.partitions, file.partitions, 256),
            sync,
            commit_delay_us: pick(
                &args.commit_delay_us,
                file.commit_delay_us,
                crate::storage::DEFAULT_COMMIT_DELAY.as_micros() as u64,
            ),
            request_timeout_ms: pick(&args.request_timeout_ms, file.request_timeout_ms, 2_000),
            max_key_bytes: pick(&args.max_key_bytes, file.max_key_bytes, 1024),
            max_value_bytes: pick(&args.max_value_bytes, file.max_value_bytes, 1 << 20),
            max_siblings: pick(&args.max_siblings, file.max_siblings, 16),
            versioning,
            max_clock_drift_ms: pick(
                &args.max_clock_drift_ms,
                file.max_clock_drift_ms,
                dynamo_core::version::DEFAULT_MAX_CLOCK_DRIFT_MS,
            ),
            anti_entropy_interval_ms: pick(
                &args.anti_entropy_interval_ms,
                file.anti_entropy_interval_ms,
                dynamo_core::anti_entropy::DEFAULT_INTERVAL_MS,
            ),
            sloppy_quorum: pick(&args.sloppy_quorum, file.sloppy_quorum, true),
            cache_bytes: pick(&args.cache_mb, file.cache_mb, 0).saturating_mul(1 << 20),
            memtable_mb: pick(&args.memtable_mb, file.memtable_mb, DEFAULT_MEMTABLE_MB),
            worker_threads: args.worker_threads.or(file.worker_threads),
            max_connections: pick(
                &args.max_connections,
                file.max_connections,
                crate::connection_limit::DEFAULT_MAX_CONNECTIONS,
            ),
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.node_id.is_empty() || self.node_id.contains(['=', ',', ' ']) {
            bail!(
                "--node-id {:?} must be non-empty without '=', ',' or spaces",
                self.node_id
            );
        }
        if self.n == 0 {
            bail!("--n 0 would store nothing; use at least 1");
        }
        if self.r == 0 || self.w == 0 {
            bail!("--r and --w must be at least 1");
        }
        if self.r > self.n || self.w > self.n {
            bail!(
                "--r {} / --w {} cannot exceed --n {}: a quorum counts distinct replicas",
                self.r,
                self.w,
                self.n
            );
        }
        if !self.partitions.is_power_of_two() {
            bail!(
                "--partitions {} must be a power of two (for example 64, 256, 1024)",
                self.partitions
            );
        }
        if self.request_timeout_ms == 0 {
            bail!("--request-timeout-ms must be positive");
        }
        if self.commit_delay_us > MAX_COMMIT_DELAY_US {
            bail!(
                "--commit-delay-us {}: choose 0 (off) to {MAX_COMMIT_DELAY_US}; every write \
                 acknowledged under --sync always may wait this long",
                self.commit_delay_us
            );
        }
        if self.max_key_bytes == 0 || self.max_value_bytes == 0 {
            bail!("--max-key-bytes and --max-value-bytes must be positive");
        }
        if self.max_siblings == 0 {
            bail!("--max-siblings must be at least 1");
        }
        if self.max_clock_drift_ms == 0 {
            bail!(
                "--max-clock-drift-ms must be positive: it bounds how far ahead of this \
                 node's clock a peer's timestamp may move it"
            );
        }
        if let Some(host) = &self.advertise_host {
            // A colon only belongs in an IPv6 literal (bare or in brackets).
            let port_given = host.contains(':')
                && host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::Ipv6Addr>()
                    .is_err();
            if host.is_empty() || host.contains(['/', ' ', ',', '=']) || port_given {
                bail!(
                    "--advertise-host {host:?} must be a host name or IP address without a \
                     port (for example n1.example.com or 10.0.0.5)"
                );
            }
        }
        if let Some(n) = self.worker_threads {
            if !(1..=MAX_WORKER_THREADS).contains(&n) {
                bail!("--worker-threads {n}: choose 1 to {MAX_WORKER_THREADS}");
            }
        }
        if self.max_connections == 0 {
            bail!("--max-connections 0 would refuse every client; choose at least 1");
        }
        if !MEMTABLE_MB_RANGE.contains(&self.memtable_mb) {
            bail!(
                "--memtable-mb {}: choose {} to {}",
                self.memtable_mb,
                MEMTABLE_MB_RANGE.start(),
                MEMTABLE_MB_RANGE.end()
            );
        }
        Ok(())
    }

    /// The address others should use for a listener bound at `bound`: the
    /// advertised host with the bound port, or `bound` itself.
    pub fn advertised(&self, bound: std::net::SocketAddr) -> String {
        match &self.advertise_host {
            // An IPv6 literal needs brackets before the port.
            Some(host) if host.contains(':') && !host.starts_with('[') => {
                format!("[{host}]:{}", bound.port())
            }
            Some(host) => format!("{host}:{}", bound.port()),
            None => bound.to_string(),
        }
    }

    /// Why the advertised addresses may not reach this node, if they may not:
    /// a wildcard bind (0.0.0.0 or ::) without `--advertise-host`.
    pub fn advertise_warning(&self, bound: std::net::SocketAddr) -> Option<String> {
        (self.advertise_host.is_none() && bound.ip().is_unspecified()).then(|| {
            format!(
                "bound to {bound} without --advertise-host: peers and clients are told \
                 {bound}, which does not reach this node from elsewhere; set --advertise-host \
                 to the host name or IP address they should use"
            )
        })
    }

    /// The largest frame this node accepts: every sibling at the maximum value
    /// size, plus room for keys, contexts and envelopes.
    pub fn max_frame_bytes(&self) -> usize {
        self.max_siblings
            .saturating_mul(self.max_value_bytes + 256)
            .saturating_add(self.max_key_bytes)
            .saturating_add(1 << 20)
    }

    /// The core's view of these settings.
    pub fn core_config(&self) -> dynamo_core::Config {
        let mut c = dynamo_core::Config::new(&self.node_id);
        c.cluster_id = dynamo_proto::ClusterId(self.cluster_id.clone());
        c.n = self.n;
        c.r = self.r;
        c.w = self.w;
        c.q = self.partitions;
        c.request_timeout_ms = self.request_timeout_ms;
        c.max_siblings = self.max_siblings;
        c.versioning = self.versioning;
        c.max_key_bytes = self.max_key_bytes;
        c.max_value_bytes = self.max_value_bytes;
        c.max_clock_drift_ms = self.max_clock_drift_ms;
        c.anti_entropy_interval_ms = self.anti_entropy_interval_ms;
        c.sloppy_quorum = self.sloppy_quorum;
        c.max_peer_message_bytes = self.max_frame_bytes();
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_sane() {
        let c = ServerConfig::resolve(&ServerArgs::default()).unwrap();
        assert_eq!((c.n, c.r, c.w, c.partitions), (3, 2, 2, 256));
        assert_eq!(c.sync, SyncPolicy::Always);
        assert_eq!(c.data_dir, PathBuf::from("data/n1"));
        assert_eq!(c.http_addr.as_deref(), Some("127.0.0.1:8080"));
        assert_eq!(c.resp_addr, None, "the Redis protocol is off by default");
        assert_eq!(c.worker_threads, None, "one worker thread per core");
        assert_eq!(c.cache_bytes, 0, "the row cache is opt-in");
        assert_eq!(c.commit_delay_us, 500);
        assert_eq!(c.max_connections, 4096);
        assert_eq!(c.memtable_mb, 64);
        assert_eq!(c.max_clock_drift_ms, 60_000);
        assert_eq!(c.core_config().max_clock_drift_ms, 60_000);
        assert_eq!(c.core_config().anti_entropy_interval_ms, 1_000);
        assert!(c.core_config().sloppy_quorum);
        // Anti-entropy keeps its messages within the frame limit peers take.
        assert_eq!(c.core_config().max_peer_message_bytes, c.max_frame_bytes());
    }

    /// Resolves `args` with a config file holding `text`.
    fn with_file(text: &str, args: ServerArgs) -> anyhow::Result<ServerConfig> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dynamo.toml");
        std::fs::write(&path, text).unwrap();
        ServerConfig::resolve(&ServerArgs {
            config: Some(path),
            ..args
        })
    }

    #[test]
    fn resp_addr_from_file_or_flag() {
        let file = "resp_addr = \"127.0.0.1:6390\"\n";
        let from_file = with_file(file, ServerArgs::default()).unwrap();
        assert_eq!(from_file.resp_addr.as_deref(), Some("127.0.0.1:6390"));
        let off = with_file(
            file,
            ServerArgs {
                resp_addr: Some("off".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(off.resp_addr, None);
    }

    #[test]
    fn advertise_host_replaces_the_bound_host_and_keeps_the_port() {
        let c = with_file("advertise_host = \"n1.example\"\n", ServerArgs::default()).unwrap();
        let wildcard: std::net::SocketAddr = "0.0.0.0:7100".parse().unwrap();
        assert_eq!(c.advertised(wildcard), "n1.example:7100");
        assert_eq!(c.advertise_warning(wildcard), None);

        let v6 = ServerConfig::resolve(&ServerArgs {
            advertise_host: Some("fd00::5".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(v6.advertised(wildcard), "[fd00::5]:7100");

        let plain = ServerConfig::resolve(&ServerArgs::default()).unwrap();
        let local: std::net::SocketAddr = "127.0.0.1:7100".parse().unwrap();
        assert_eq!(plain.advertised(local), "127.0.0.1:7100");
        assert_eq!(plain.advertise_warning(local), None);
        let warning = plain
            .advertise_warning(wildcard)
            .expect("a wildcard bind warns");
        assert!(warning.contains("--advertise-host"), "{warning}");

        for bad in ["", "host:7100", "10.0.0.5:7100", "a b", "a/b"] {
            let err = ServerConfig::resolve(&ServerArgs {
                advertise_host: Some(bad.into()),
                ..Default::default()
            })
            .unwrap_err()
            .to_string();
            assert!(err.contains("without a port"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn flags_beat_the_file_which_beats_defaults() {
        let c = with_file(
            "node_id = \"a\"\nn = 5\nr = 3\nw = 3\npeers = [\"b=127.0.0.1:2\"]\nhttp_addr = \"off\"\nworker_threads = 3\ncache_mb = 8\nmax_connections = 100\ncommit_delay_us = 200\nmemtable_mb = 32\nmax_clock_drift_ms = 5000\nanti_entropy_interval_ms = 250\nsloppy_quorum = false\n",
            ServerArgs {
                r: Some(1),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(c.node_id, "a");
        assert_eq!((c.n, c.r, c.w), (5, 1, 3));
        assert_eq!(c.peers, vec!["b=127.0.0.1:2".parse::<PeerSpec>().unwrap()]);
        assert_eq!(c.http_addr, None);
        assert_eq!(c.worker_threads, Some(3));
        assert_eq!(c.cache_bytes, 8 << 20);
        assert_eq!(c.max_connections, 100);
        assert_eq!(c.commit_delay_us, 200);
        assert_eq!(c.memtable_mb, 32);
        assert_eq!(c.core_config().max_clock_drift_ms, 5_000);
        assert_eq!(c.core_config().anti_entropy_interval_ms, 250);
        assert!(!c.core_config().sloppy_quorum);
    }

    #[test]
    fn bad_settings_say_what_to_change() {
        let bad = |args: ServerArgs| ServerConfig::resolve(&args).unwrap_err().to_string();
        assert!(bad(ServerArgs {
            partitions: Some(100),
            ..Default::default()
        })
        .contains("power of two"));
        assert!(bad(ServerArgs {
            sync: Some("sometimes".into()),
            ..Default::default()
        })
        .contains("always"));
        assert!(bad(ServerArgs {
            peers: vec!["n2".into()],
            ..Default::default()
        })
        .contains("NAME=HOST:PORT"));
        assert!(bad(ServerArgs {
            r: Some(4),
            ..Default::default()
        })
        .contains("cannot exceed"));
        assert!(bad(ServerArgs {
            commit_delay_us: Some(MAX_COMMIT_DELAY_US + 1),
            ..Default::default()
        })
        .contains("--commit-delay-us"));
        assert!(bad(ServerArgs {
            versioning: Some("x".into()),
            ..Default::default()
        })
        .contains("lww"));
        assert!(bad(ServerArgs {
            max_clock_drift_ms: Some(0),
            ..Default::default()
        })
        .contains("--max-clock-drift-ms"));
        assert!(bad(ServerArgs {
            max_connections: Some(0),
            ..Default::default()
        })
        .contains("--max-connections 0"));
        for mb in [3, 1025] {
            assert!(bad(ServerArgs {
                memtable_mb: Some(mb),
                ..Default::default()
            })
            .contains("--memtable-mb"));
        }
        for threads in [0, MAX_WORKER_THREADS + 1] {
            assert!(bad(ServerArgs {
                worker_threads: Some(threads),
                ..Default::default()
            })
            .contains("--worker-threads"));
        }
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        let err = with_file("nodeid = \"a\"\n", ServerArgs::default()).unwrap_err();
        assert!(format!("{err:#}").contains("nodeid"), "{err:#}");
    }
}
