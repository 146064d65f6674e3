//! `dynamo server`: the production process. It resolves the configuration, opens
//! the fjall store, starts the runtime and the HTTP front end, and shuts all of
//! it down gracefully on SIGINT or SIGTERM. Nothing here runs in the simulator.

use crate::config::{ServerArgs, ServerConfig};
use crate::runtime::{self, Clock, Environment};
use crate::storage::FjallStorage;
use anyhow::Context as _;
use rand::SeedableRng;
use std::sync::Arc;

/// How long shutdown waits for the HTTP and RESP front ends to finish their
/// last requests and write their replies: a client that stalls mid-request or
/// stops reading must not hold the process up.
const FRONT_END_DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs a node until a signal asks it to stop; returns once everything is synced.
pub async fn run(args: &ServerArgs) -> anyhow::Result<()> {
    let mut config = ServerConfig::resolve(args)?;
    let (max_connections, warning) = fit_connections(config.max_connections);
    if let Some(warning) = warning {
        tracing::warn!("{warning}");
    }
    config.max_connections = max_connections;
    tracing::info!(
        config = %serde_json::to_string(&config).unwrap_or_default(),
        "starting dynamo node {}",
        config.node_id
    );
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating the data directory {}", config.data_dir.display()))?;
    let storage = FjallStorage::open_with_memtable(&config.data_dir, config.memtable_mb << 20)
        .with_context(|| format!("opening the store in {}", config.data_dir.display()))?;
    let http_listener = match &config.http_addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the HTTP address {addr} (--http-addr)"))?,
        ),
        None => None,
    };
    let resp_listener = match &config.resp_addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the RESP address {addr} (--resp-addr)"))?,
        ),
        None => None,
    };
    let resp_addr = match &resp_listener {
        Some(l) => Some(l.local_addr()?.to_string()),
        None => None,
    };
    // Advertised to peers (and through them to clients) as this host's address.
    let http_addr = match &http_listener {
        Some(l) => Some(config.advertised(l.local_addr()?)),
        None => None,
    };
    let node = runtime::start(
        &config,
        Environment {
            storage: Arc::new(storage),
            clock: Clock::system(),
            rng: rand_chacha::ChaCha8Rng::from_entropy(),
            http_addr: http_addr.clone(),
            trace: None,
        },
    )
    .await?;
    let (stop_http_tx, stop_http_rx) = tokio::sync::oneshot::channel::<()>();
    let http_task = http_listener.map(|listener| {
        let handle = node.handle.clone();
        tokio::spawn(async move {
            let stop = async {
                let _ = stop_http_rx.await;
            };
            if let Err(e) = crate::http::serve(listener, handle, stop).await {
                tracing::error!(error = %e, "the HTTP server failed");
            }
        })
    });
    let (stop_resp_tx, stop_resp_rx) = tokio::sync::oneshot::channel::<()>();
    let resp_task = resp_listener.map(|listener| {
        let handle = node.handle.clone();
        tokio::spawn(async move {
            let stop = async {
                let _ = stop_resp_rx.await;
            };
            if let Err(e) = crate::resp::serve(listener, handle, stop).await {
                tracing::error!(error = %e, "the RESP server failed");
            }
        })
    });
    tracing::info!(
        node = %config.node_id,
        actor = %node.actor,
        peer = %node.peer_addr,
        client = %node.client_addr,
        http = http_addr.as_deref().unwrap_or("off"),
        resp = resp_addr.as_deref().unwrap_or("off"),
        "ready"
    );

    // A node whose disk failed stops, as Cassandra's `disk_failure_policy:
    // stop` and PostgreSQL's panic on a failed fsync do: it can no longer make
    // a write durable (fjall refuses every write once poisoned), and its reads
    // would serve writes it never stored.
    let failure = tokio::select! {
        biased;
        signal = wait_for_signal() => {
            signal?;
            None
        }
        error = node.storage_failed() => Some(error),
    };
    match &failure {
        None => tracing::info!("shutting down: no new requests; finishing in-flight ones"),
        Some(error) => tracing::error!(
            %error,
            "storage failed; stopping the node: no new requests; finishing in-flight ones"
        ),
    }
    let _ = stop_http_tx.send(());
    let _ = stop_resp_tx.send(());
    let stopped = node.shutdown().await;
    // Replies to requests already read are written; a client that stalled
    // mid-request or stopped reading does not hold the shutdown up for long.
    for (task, what) in [(http_task, "HTTP"), (resp_task, "RESP")] {
        if let Some(task) = task {
            if tokio::time::timeout(FRONT_END_DRAIN, task).await.is_err() {
                tracing::warn!(
                    "{what} connections still open after {FRONT_END_DRAIN:?}; closing them"
                );
            }
        }
    }
    if let Some(error) = failure {
        // The final sync fails too, as a rule; the first failure is the news.
        if let Err(e) = &stopped {
            tracing::warn!(error = %format!("{e:#}"), "while stopping after the storage failure");
        }
        anyhow::bail!(
            "stopped because storage failed: {error}. Nothing written since the last \
             good sync is trusted; fix the disk (space, permissions, hardware) and \
             restart the node: it recovers from its journal, and its replicas hold \
             what it acknowledged"
        );
    }
    stopped?;
    tracing::info!("stopped cleanly");
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        biased;
        r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}

/// Descriptors kept for all but client connections (peer connections, the
/// store's files, listeners), or half the limit when it is smaller than twice
/// this.
const RESERVED_FDS: u64 = 1024;

/// Raises the soft open-files limit to the hard one, and returns the client
/// connections (at most `configured`) that leave [`RESERVED_FDS`] for the rest,
/// with a warning when that is fewer than configured: at the limit the node
/// could not reach its peers or open its store's files.
fn fit_connections(configured: usize) -> (usize, Option<String>) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if let (Some(soft), Some(hard)) = (limit.current, limit.maximum) {
        if soft < hard {
            let raised = Rlimit {
                current: Some(hard),
                maximum: Some(hard),
            };
            if setrlimit(Resource::Nofile, raised).is_ok() {
                limit = raised;
            }
        }
    }
    match limit.current {
        Some(files) => connections_room(configured, files),
        None => (configured, None),
    }
}

/// The client connections (at most `configured`) that an open-files limit of
/// `files` allows while keeping [`RESERVED_FDS`] (or half) for the rest.
fn connections_room(configured: usize, files: u64) -> (usize, Option<String>) {
    let room = files.saturating_sub(RESERVED_FDS.min(files / 2)).max(1);
    match usize::try_from(room) {
        Ok(room) if room < configured => (
            room,
            Some(format!(
                "--max-connections {configured} lowered to {room}: the open-files limit is \
                 {files} (ulimit -n) and the node keeps {} for peers and storage",
                files - room as u64
            )),
        ),
        _ => (configured, None),
    }
}

#[cfg(test)]
mod tests {
    use super::connections_room;

    #[test]
    fn the_connection_bound_leaves_descriptors_for_peers_and_storage() {
        // Room enough: the bound stands.
        assert_eq!(connections_room(4096, 20_000), (4096, None));
        assert_eq!(connections_room(4096, 5120), (4096, None));
        // 1024 kept: lowered, with a warning saying why.
        let (n, warning) = connections_room(4096, 4096);
        assert_eq!(n, 3072);
        let warning = warning.expect("a warning");
        assert!(warning.contains("lowered to 3072"), "{warning}");
        assert!(warning.contains("ulimit -n"), "{warning}");
        // A small limit keeps half.
        assert_eq!(connections_room(4096, 1024).0, 512);
        assert_eq!(connections_room(4096, 1).0, 1);
    }
}
