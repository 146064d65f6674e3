//! The runtime shell: everything that turns a `dynamo_core::Node` into a server.
//!
//! One task owns the core ([`core_task`]); connection tasks move frames
//! ([`peers`], [`client_port`]); the storage worker makes writes durable. Only
//! `tokio::net`, `tokio::time`, `tokio::spawn` and `tokio::sync` are used here, so
//! the simulator runs this same code over simulated sockets, time and disk. The
//! HTTP front end, the fjall engine and signal handling live outside (in
//! `server`), because they cannot run under madsim.

mod client_port;
pub mod clock;
mod core_task;
pub mod handle;
mod peers;

pub use clock::Clock;
pub use handle::{CoreHandle, NodeInfo};

use crate::config::ServerConfig;
use crate::metrics::Metrics;
use crate::storage::{
    check_partitions, open_identity, spawn_storage_worker_with_delay, CacheMetrics, CachedStorage,
    Storage, StorageWorker, StoreReader,
};
use anyhow::Context as _;
use dynamo_core::{Member, Node};
use dynamo_proto::{FrameCodec, NodeId};
use handle::Event;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// A node that is up: its handle, the addresses it bound, and what it takes to
/// stop it cleanly.
pub struct RunningNode {
    pub handle: CoreHandle,
    pub peer_addr: SocketAddr,
    pub client_addr: SocketAddr,
    pub actor: dynamo_proto::Actor,
    /// Warnings about the configuration, already logged.
    pub warnings: Vec<String>,
    shutdown: watch::Sender<bool>,
    stop_peers: watch::Sender<bool>,
    core: JoinHandle<Node>,
    storage: StorageWorker,
}

/// What the caller provides besides the configuration: the storage engine, the
/// clock, the randomness for a fresh data directory's incarnation, and the HTTP
/// address to advertise (bound by the caller, if any).
pub struct Environment {
    pub storage: Arc<dyn Storage>,
    pub clock: Clock,
    pub rng: rand_chacha::ChaCha8Rng,
    pub http_addr: Option<String>,
    /// Called with every peer message this node's core receives, in the order it
    /// receives them (the simulator hashes them into its trace).
    pub trace: Option<PeerTrace>,
}

/// Observer of delivered peer messages: `(from, to, message)`.
pub type PeerTrace = Arc<dyn Fn(&NodeId, &NodeId, &dynamo_proto::PeerMessage) + Send + Sync>;

/// Opens the node's identity, binds its listeners and starts every task.
pub async fn start(config: &ServerConfig, mut env: Environment) -> anyhow::Result<RunningNode> {
    let identity = open_identity(env.storage.as_ref(), &config.cluster_id, &mut env.rng)
        .with_context(|| format!("opening the data directory {}", config.data_dir.display()))?;
    check_partitions(env.storage.as_ref(), config.partitions)
        .with_context(|| format!("opening the data directory {}", config.data_dir.display()))?;
    let actor = identity.actor();
    // The row cache sits between the engine and both the core's reads and the
    // storage worker's writes; it lives and dies with this run of the node.
    let cache_metrics = Arc::new(CacheMetrics::default());
    let storage = CachedStorage::wrap(
        env.storage.clone(),
        config.cache_bytes,
        cache_metrics.clone(),
    );

    let peer_listener = TcpListener::bind(&config.peer_addr)
        .await
        .with_context(|| {
            format!(
                "binding the peer address {} (--peer-addr)",
                config.peer_addr
            )
        })?;
    let client_listener = TcpListener::bind(&config.client_addr)
        .await
        .with_context(|| {
            format!(
                "binding the client address {} (--client-addr)",
                config.client_addr
            )
        })?;
    let peer_addr = peer_listener.local_addr()?;
    let client_addr = client_listener.local_addr()?;

    let mut members = vec![Member {
        id: NodeId::from(config.node_id.as_str()),
        peer_addr: config.advertised(peer_addr),
        client_addr: config.advertised(client_addr),
        http_addr: env.http_addr.clone().unwrap_or_default(),
    }];
    for p in &config.peers {
        members.push(Member {
            id: NodeId::from(p.id.as_str()),
            peer_addr: p.peer_addr.clone(),
            client_addr: String::new(),
            http_addr: String::new(),
        });
    }
    let node = Node::new(
        config.core_config(),
        members,
        actor,
        Box::new(StoreReader::new(storage.clone())),
    )?;
    let mut warnings = node.warnings().to_vec();
    warnings.extend(config.advertise_warning(client_addr));
    for w in &warnings {
        tracing::warn!("{w}");
    }

    // Two stages: `shutdown` stops the listeners and starts the core's drain;
    // `stop_peers` closes internode connections once the core has drained, so
    // in-flight requests can still reach their replicas.
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (stop_peers_tx, stop_peers_rx) = watch::channel(false);
    let (events_tx, events_rx) = mpsc::unbounded_channel::<Event>();
    let (storage, persisted) = spawn_storage_worker_with_delay(
        storage,
        config.sync,
        std::time::Duration::from_micros(config.commit_delay_us),
    );
    let metrics = Arc::new(Metrics::new(
        &config.node_id,
        storage.metrics(),
        cache_metrics,
    ));
    metrics.peers_known.store(
        config.peers.len() as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
    let codec = FrameCodec::new(config.max_frame_bytes());
    let peer_ctx = peers::PeerContext {
        hello: node.hello(),
        check: node.hello_check(),
        codec,
        events: events_tx.clone(),
        shutdown: stop_peers_rx,
        metrics: metrics.clone(),
    };
    let peer_list: Vec<(NodeId, String)> = config
        .peers
        .iter()
        .map(|p| (NodeId::from(p.id.as_str()), p.peer_addr.clone()))
        .collect();
    let senders = peers::spawn_outbound(&peer_ctx, &peer_list);
    tokio::spawn(peers::accept_loop(
        peer_ctx,
        peer_listener,
        shutdown_rx.clone(),
    ));

    let handle = CoreHandle::new(
        events_tx,
        NodeInfo {
            node_id: config.node_id.clone(),
            max_key_bytes: config.max_key_bytes,
            max_value_bytes: config.max_value_bytes,
            max_frame_bytes: config.max_frame_bytes(),
        },
        metrics.clone(),
        config.max_connections,
    );
    tokio::spawn(client_port::accept_loop(
        client_listener,
        handle.clone(),
        shutdown_rx.clone(),
    ));
    let core = tokio::spawn(
        core_task::CoreTask {
            node,
            clock: env.clock,
            events: events_rx,
            persisted,
            peers: senders,
            storage: storage.clone(),
            shutdown: shutdown_rx,
            trace: env.trace,
            metrics,
        }
        .run(),
    );
    Ok(RunningNode {
        handle,
        peer_addr,
        client_addr,
        actor,
        warnings,
        shutdown: shutdown_tx,
        stop_peers: stop_peers_tx,
        core,
        storage,
    })
}

impl RunningNode {
    /// Waits for the node's storage to fail a write or a sync, and returns the
    /// error. The node cannot keep its promises after that (see
    /// [`StorageWorker::failed`]); the server stops it.
    pub async fn storage_failed(&self) -> String {
        self.storage.failed().await
    }

    /// Graceful stop: stop accepting, let in-flight requests finish (or time
    /// out), then apply and sync every queued write.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        let node = self.core.await.context("the core task panicked")?;
        let _ = self.stop_peers.send(true);
        tracing::info!(node = %node.id(), "core stopped; syncing storage");
        self.storage
            .shutdown()
            .await
            .context("syncing storage at shutdown")?;
        Ok(())
    }
}
