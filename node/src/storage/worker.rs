//! The group-commit worker: one task that applies the core's `Persist` requests to
//! a [`Storage`] in batches and reports which of them are durable (or failed).
//!
//! It owns batching and the timing of syncs under the [`SyncPolicy`]; it must never
//! hold protocol logic, and it never reports a request as persisted unless its write
//! was applied (and, under `Always`, synced). Under `Always` every request queued
//! while a sync runs joins the next batch, so a burst of concurrent writes shares
//! one fsync (fjall does not merge concurrent callers' syncs; this worker does).
//! When the last batch held several requests (a busy node), the worker also lets
//! the next one gather for a moment before it writes and syncs
//! ([`gather_delay`]): each fsync costs the machine far more than the writes it
//! covers, so fewer, larger batches are cheaper.
//!
//! It is written as async code so that it runs inside the madsim simulator, which
//! replaces `tokio::spawn` and `tokio::time`: there it is a task like any other,
//! where the memory engine does not block. In production the same code runs on a
//! thread of its own (a single-threaded runtime), where the blocking write and
//! fsync hold up nothing else.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use super::{Storage, StorageError, SyncPolicy, WriteOp};
use crate::metrics::StorageMetrics;

/// At most this many requests go into one batch, so that one batch's write stays
/// short and its acknowledgements are not held back by an endless queue.
const MAX_BATCH_REQUESTS: usize = 4096;

/// The default bound on how long a batch gathers before its sync
/// (`--commit-delay-us`).
pub const DEFAULT_COMMIT_DELAY: Duration = Duration::from_micros(500);

/// How long a batch gathers per request the previous batch held.
const GATHER_PER_REQUEST: Duration = Duration::from_micros(25);

/// How long to let the next batch gather, under `sync always`, after one of
/// `last_batch` requests: nothing after a batch of one (a lone writer never
/// waits), then 25 us per request of the last batch, up to `max`. A busy node's
/// batches grow until the delay reaches `max`; once the load falls, so does the
/// delay. On a 3-node dev cluster on 2 cores under `dynamo bench` puts (50
/// clients), a 500 us bound tripled the requests per fsync (10 to 30) and cut
/// the machine's CPU per put by a fifth; the p99 did not rise.
pub fn gather_delay(last_batch: usize, max: Duration) -> Duration {
    if last_batch <= 1 {
        return Duration::ZERO;
    }
    GATHER_PER_REQUEST
        .saturating_mul(u32::try_from(last_batch).unwrap_or(u32::MAX))
        .min(max)
}

/// Waits out a gather delay. In production the worker has a thread of its
/// own, which this blocks (tokio's timer rounds up to whole milliseconds); in
/// the simulator, where the worker is a task, it sleeps in simulated time.
async fn gather(delay: Duration) {
    #[cfg(not(madsim))]
    std::thread::sleep(delay);
    #[cfg(madsim)]
    tokio::time::sleep(delay).await;
}

/// The core's write request: store `set` under `key` in `partition`, report
/// `id` once durable.
pub use dynamo_core::PersistRequest;

/// The outcome of a batch: with `error == None` every id in `ids` is persisted
/// under the sync policy and may be acknowledged; with an error none of them may
/// be (the write may or may not have been applied).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Persisted {
    pub ids: Vec<u64>,
    pub error: Option<String>,
}

enum Command {
    /// The writes one turn of the core asked for, in order.
    Persist(Vec<PersistRequest>),
    /// Apply and sync everything queued before, then answer.
    Flush(oneshot::Sender<Result<(), StorageError>>),
    /// As `Flush`, then stop the worker.
    Shutdown(oneshot::Sender<Result<(), StorageError>>),
}

/// The handle to a running storage worker. Cloning it gives another handle to the
/// same worker; the worker stops on [`StorageWorker::shutdown`] or once every
/// handle is dropped (after applying what was queued).
#[derive(Clone)]
pub struct StorageWorker {
    commands: mpsc::UnboundedSender<Command>,
    /// Reports requests submitted after the worker stopped as failed.
    persisted: mpsc::UnboundedSender<Persisted>,
    metrics: Arc<StorageMetrics>,
    failure: watch::Receiver<Option<String>>,
}

/// Starts the worker with the default commit delay (see
/// [`spawn_storage_worker_with_delay`]).
pub fn spawn_storage_worker(
    storage: Arc<dyn Storage>,
    policy: SyncPolicy,
) -> (StorageWorker, mpsc::UnboundedReceiver<Persisted>) {
    spawn_storage_worker_with_delay(storage, policy, DEFAULT_COMMIT_DELAY)
}

/// Starts the worker: on a thread of its own in production, as a task in the
/// simulator. Under `sync always` a batch gathers for at most `commit_delay`
/// before its sync ([`gather_delay`]; zero turns it off). Outcomes arrive on
/// the returned receiver in the order the batches completed.
pub fn spawn_storage_worker_with_delay(
    storage: Arc<dyn Storage>,
    policy: SyncPolicy,
    commit_delay: Duration,
) -> (StorageWorker, mpsc::UnboundedReceiver<Persisted>) {
    let (commands, commands_rx) = mpsc::unbounded_channel();
    let (persisted, persisted_rx) = mpsc::unbounded_channel();
    let metrics = Arc::new(StorageMetrics::default());
    let (failure_tx, failure) = watch::channel(None);
    let worker = Worker {
        storage,
        policy,
        commands: commands_rx,
        persisted: persisted.clone(),
        commit_delay,
        last_batch: 0,
        dirty: false,
        metrics: metrics.clone(),
        failure: failure_tx,
    };
    run_worker(worker);
    (
        StorageWorker {
            commands,
            persisted,
            metrics,
            failure,
        },
        persisted_rx,
    )
}

/// Runs the worker on a thread of its own, with a single-threaded runtime for
/// its queue and the `Interval` ticker: the engine's writes and fsyncs block
/// that thread and no other. Handing each batch to tokio's blocking pool
/// instead cost two more cross-thread wakeups per batch (and the pool's
/// spawn), about a tenth of a node's CPU under `redis-benchmark` SETs.
#[cfg(not(madsim))]
fn run_worker(worker: Worker) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build();
    let spawned = match runtime {
        Ok(runtime) => std::thread::Builder::new()
            .name("dynamo-storage".into())
            .spawn(move || runtime.block_on(worker.run())),
        Err(e) => Err(e),
    };
    // Without its thread every write is reported as failed (the queue's
    // receiver is gone), never acknowledged.
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the storage worker's thread");
    }
}

/// The simulator has no OS threads: the worker is a task like any other, and
/// the memory engine never blocks.
#[cfg(madsim)]
fn run_worker(worker: Worker) {
    tokio::spawn(worker.run());
}

impl StorageWorker {
    /// Queues a write. Its id is reported on the `Persisted` channel once the write
    /// is persisted, or with an error if it failed (including when the worker has
    /// stopped).
    pub fn submit(&self, request: PersistRequest) {
        self.submit_all(vec![request]);
    }

    /// Queues writes, in order, as [`StorageWorker::submit`] does for one. The
    /// core task hands over all of a turn's writes at once, so the worker (on
    /// another thread) wakes once for them and puts them in one batch.
    pub fn submit_all(&self, requests: Vec<PersistRequest>) {
        if requests.is_empty() {
            return;
        }
        self.metrics
            .requests
            .fetch_add(requests.len() as u64, Ordering::Relaxed);
        if let Err(mpsc::error::SendError(Command::Persist(requests))) =
            self.commands.send(Command::Persist(requests))
        {
            tracing::warn!(
                writes = requests.len(),
                "writes submitted after the storage worker stopped"
            );
            // The receiver may be gone too; then no one waits for the outcome.
            let _ = self.persisted.send(Persisted {
                ids: requests.iter().map(|r| r.id).collect(),
                error: Some(StorageError::WorkerStopped.to_string()),
            });
        }
    }

    /// The worker's counters: group commits, their sizes, write and sync times.
    pub fn metrics(&self) -> Arc<StorageMetrics> {
        self.metrics.clone()
    }

    /// Waits for the engine's first failed write or sync and returns its error.
    /// Never returns while the engine works. After a failure the worker carries
    /// on (each later batch fails or succeeds on its own), but nothing the
    /// engine acknowledged since its last good sync can be trusted any more: a
    /// failed fsync may have dropped dirty pages that a later, successful one
    /// does not bring back, and fjall refuses every write once poisoned. The
    /// server stops the node on it.
    pub async fn failed(&self) -> String {
        let mut failure = self.failure.clone();
        let first = match failure.wait_for(Option::is_some).await {
            Ok(error) => error.clone(),
            // The worker is gone without a failure: there is none to report.
            Err(_) => None,
        };
        match first {
            Some(error) => error,
            None => std::future::pending().await,
        }
    }

    /// Applies and syncs every write submitted before this call, whatever the
    /// policy. Their outcomes are on the `Persisted` channel when this returns.
    pub async fn flush(&self) -> Result<(), StorageError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Flush(tx))
            .map_err(|_| StorageError::WorkerStopped)?;
        rx.await.map_err(|_| StorageError::WorkerStopped)?
    }

    /// Flushes as [`StorageWorker::flush`] does, then stops the worker (graceful
    /// shutdown). Writes submitted later are reported as failed.
    pub async fn shutdown(&self) -> Result<(), StorageError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Shutdown(tx))
            .map_err(|_| StorageError::WorkerStopped)?;
        rx.await.map_err(|_| StorageError::WorkerStopped)?
    }
}

struct Worker {
    storage: Arc<dyn Storage>,
    policy: SyncPolicy,
    commands: mpsc::UnboundedReceiver<Command>,
    persisted: mpsc::UnboundedSender<Persisted>,
    /// The bound on a batch's gather delay (`sync always` only).
    commit_delay: Duration,
    /// Requests in the last batch, which sets the next one's gather delay.
    last_batch: usize,
    /// Writes were applied since the last successful sync.
    dirty: bool,
    metrics: Arc<StorageMetrics>,
    /// The first failure, for [`StorageWorker::failed`].
    failure: watch::Sender<Option<String>>,
}

/// What one turn of the worker drained from its queue.
#[derive(Default)]
struct Batch {
    ids: Vec<u64>,
    writes: Vec<WriteOp>,
    waiters: Vec<oneshot::Sender<Result<(), StorageError>>>,
    shutdown: bool,
}

impl Batch {
    fn add(&mut self, command: Command) {
        match command {
            Command::Persist(requests) => {
                for r in requests {
                    self.add_write(r);
                }
            }
            Command::Flush(waiter) => self.waiters.push(waiter),
            Command::Shutdown(waiter) => {
                self.waiters.push(waiter);
                self.shutdown = true;
            }
        }
    }

    fn add_write(&mut self, r: PersistRequest) {
        self.ids.push(r.id);
        // Back-to-back writes of one key (a hot key under concurrent writers)
        // collapse into the last: the batch is applied and synced as one, so
        // the earlier ones would be overwritten before anyone could read them,
        // and never seen after a crash.
        if let Some(last) = self.writes.last_mut() {
            if last.partition == r.partition && last.key == r.key {
                last.set = r.set;
                return;
            }
        }
        self.writes.push(WriteOp {
            partition: r.partition,
            key: r.key,
            set: r.set,
        });
    }

    /// A flush or shutdown asks for a sync; stop draining there so that it
    /// answers as soon as what was queued before it is durable.
    fn wants_sync(&self) -> bool {
        !self.waiters.is_empty()
    }
}

impl Worker {
    async fn run(mut self) {
        let mut ticker = match self.policy {
            SyncPolicy::Interval { ms } => {
                let mut ticker = tokio::time::interval(Duration::from_millis(ms.max(1)));
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                Some(ticker)
            }
            SyncPolicy::Always | SyncPolicy::None => None,
        };
        loop {
            let first = match ticker.as_mut() {
                Some(ticker) => {
                    tokio::select! {
                        // The tick comes first: it is ready once per interval, so it
                        // cannot starve the queue, while a busy queue could starve it.
                        biased;
                        _ = ticker.tick() => {
                            self.sync_if_dirty().await;
                            continue;
                        }
                        command = self.commands.recv() => command,
                    }
                }
                None => self.commands.recv().await,
            };
            let Some(first) = first else {
                // Every handle is gone: make what was applied durable and stop.
                self.sync_if_dirty().await;
                return;
            };
            let mut batch = Batch::default();
            batch.add(first);
            if self.policy == SyncPolicy::Always && !batch.wants_sync() {
                let delay = gather_delay(self.last_batch, self.commit_delay);
                if !delay.is_zero() {
                    gather(delay).await;
                }
            }
            while batch.ids.len() < MAX_BATCH_REQUESTS && !batch.wants_sync() {
                match self.commands.try_recv() {
                    Ok(command) => batch.add(command),
                    Err(_) => break,
                }
            }
            self.last_batch = batch.ids.len();
            if self.commit(batch).await {
                return;
            }
        }
    }

    /// Applies one batch, syncs it if the policy or a waiter asks, reports the
    /// outcome and answers the waiters. Returns whether to stop.
    async fn commit(&mut self, batch: Batch) -> bool {
        let Batch {
            ids,
            writes,
            waiters,
            shutdown,
        } = batch;
        let sync = self.policy == SyncPolicy::Always || !waiters.is_empty();
        if !writes.is_empty() {
            self.dirty = true;
        }
        let result = if writes.is_empty() && !sync {
            Ok(())
        } else {
            let m = &self.metrics;
            m.batches.fetch_add(1, Ordering::Relaxed);
            m.batch_requests.observe_count(ids.len());
            m.batch_writes.observe_count(writes.len());
            apply(&self.storage, writes, sync, m).await
        };
        if sync && result.is_ok() {
            self.dirty = false;
        }
        if let Err(e) = &result {
            tracing::error!(error = %e, requests = ids.len(), "storage batch failed");
            self.failed(e);
        }
        if !ids.is_empty() {
            // The receiver may be gone (the node is stopping); nothing waits then.
            let _ = self.persisted.send(Persisted {
                ids,
                error: result.as_ref().err().map(ToString::to_string),
            });
        }
        if shutdown {
            // Refuse everything from here on before the shutdown is answered:
            // the worker may run on another thread, and a write submitted
            // between the answer and the queue's drop must still be
            // reported, not lost in the dropped queue.
            self.refuse_the_rest();
        }
        for waiter in waiters {
            let _ = waiter.send(result.clone());
        }
        shutdown
    }

    /// Closes the queue and fails what was queued behind the shutdown; later
    /// submissions fail at once (see [`StorageWorker::submit`]).
    fn refuse_the_rest(&mut self) {
        self.commands.close();
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::Persist(requests) => {
                    let _ = self.persisted.send(Persisted {
                        ids: requests.iter().map(|r| r.id).collect(),
                        error: Some(StorageError::WorkerStopped.to_string()),
                    });
                }
                Command::Flush(waiter) | Command::Shutdown(waiter) => {
                    let _ = waiter.send(Err(StorageError::WorkerStopped));
                }
            }
        }
    }

    async fn sync_if_dirty(&mut self) {
        if !self.dirty {
            return;
        }
        match apply(&self.storage, Vec::new(), true, &self.metrics).await {
            Ok(()) => self.dirty = false,
            // The writes were acknowledged already (that is what `Interval`
            // trades); the failure stops the node.
            Err(e) => {
                tracing::error!(error = %e, "periodic storage sync failed");
                self.failed(&e);
            }
        }
    }

    /// Counts a failed write or sync and publishes the first one.
    fn failed(&self, e: &StorageError) {
        self.metrics.failures.fetch_add(1, Ordering::Relaxed);
        self.failure.send_if_modified(|first| {
            let new = first.is_none();
            if new {
                *first = Some(e.to_string());
            }
            new
        });
    }
}

/// Writes `writes` as one batch, then syncs if `sync`. It blocks: in
/// production it runs on the worker's own thread; in the simulator the memory
/// engine never blocks, and the simulated disk's sync latency is slept in
/// simulated time between applying and syncing, so a crash can land there.
async fn apply(
    storage: &Arc<dyn Storage>,
    writes: Vec<WriteOp>,
    sync: bool,
    metrics: &StorageMetrics,
) -> Result<(), StorageError> {
    if !writes.is_empty() {
        let started = tokio::time::Instant::now();
        guarded("write", || storage.write_batch_owned(writes))?;
        metrics.write_seconds.observe_duration(started.elapsed());
    }
    if sync {
        let started = tokio::time::Instant::now();
        let latency = storage.simulated_sync_latency();
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        guarded("sync", || storage.sync())?;
        metrics.sync_seconds.observe_duration(started.elapsed());
    }
    Ok(())
}

/// Runs one engine call. In production a panic in it becomes an error for the
/// batch, so the worker (and every write queued behind it) carries on; in the
/// simulator it propagates, so the run fails where the bug is.
fn guarded(
    op: &'static str,
    call: impl FnOnce() -> Result<(), StorageError>,
) -> Result<(), StorageError> {
    #[cfg(madsim)]
    {
        let _ = op;
        call()
    }
    #[cfg(not(madsim))]
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(call))
        .unwrap_or_else(|_| Err(StorageError::io(op, "the storage engine panicked")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_gathers_by_the_size_of_the_last_up_to_the_bound() {
        let max = DEFAULT_COMMIT_DELAY;
        // A lone writer (or the first batch) never waits.
        assert_eq!(gather_delay(0, max), Duration::ZERO);
        assert_eq!(gather_delay(1, max), Duration::ZERO);
        assert_eq!(gather_delay(2, max), Duration::from_micros(50));
        assert_eq!(gather_delay(12, max), Duration::from_micros(300));
        assert_eq!(gather_delay(20, max), max);
        assert_eq!(gather_delay(usize::MAX, max), max);
        // A bound of zero turns it off.
        assert_eq!(gather_delay(100, Duration::ZERO), Duration::ZERO);
    }
}
