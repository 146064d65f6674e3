//! Durable storage of each key's versions, node metadata, and group commit.
//!
//! This module owns the bytes on disk: the [`Storage`] trait and its engines (an
//! in-memory model that can lose unsynced writes, for tests and the simulator, and
//! fjall in production), the [`SyncPolicy`] that says when writes are made durable,
//! the group-commit worker that turns the core's `Persist` requests into batched
//! writes and fsyncs, and the data-directory identity (format version, cluster id,
//! incarnation and epoch). It must never hold protocol logic: it stores whatever
//! `DvvSet` it is handed and never merges, compares or interprets versions; it
//! only refuses, as corrupt, a stored set that decodes but is not well formed
//! (`dynamo_core::version::is_well_formed`, the core's own rule).
//!
//! Key layout: a stored key is the partition as 4 big-endian bytes followed by the
//! user's key bytes, so the keys of one partition are contiguous and in key order
//! (transfers and anti-entropy scan a partition page by page).

use std::ops::Bound;
use std::sync::Arc;

use dynamo_core::store::{LocalStore, StoreError};
use dynamo_core::version;
use dynamo_proto::DvvSet;

pub mod cache;
pub mod datadir;
#[cfg(not(madsim))]
pub mod fjall;
pub mod memory;
pub mod sync_policy;
pub mod worker;

#[cfg(not(madsim))]
pub use self::fjall::FjallStorage;
pub use cache::{CacheMetrics, CachedStorage};
pub use datadir::{check_partitions, open_identity, NodeIdentity, STORAGE_FORMAT_VERSION};
pub use memory::MemoryStorage;
pub use sync_policy::{ParseSyncPolicyError, SyncPolicy};
pub use worker::{
    gather_delay, spawn_storage_worker, spawn_storage_worker_with_delay, PersistRequest, Persisted,
    StorageWorker, DEFAULT_COMMIT_DELAY,
};

/// A storage engine: versions per key, grouped by partition, plus small metadata.
///
/// Writes become visible to [`Storage::get`] as soon as [`Storage::write_batch`]
/// returns, and durable (they survive a power failure) only once a later
/// [`Storage::sync`] returns. [`Storage::put_meta`] is durable on its own.
pub trait Storage: Send + Sync + 'static {
    /// The stored set of `key` in `partition`, or `None` if there is none.
    fn get(&self, partition: u32, key: &[u8]) -> Result<Option<DvvSet>, StorageError>;

    /// Applies the writes in order (set `None` = remove the key): visible to `get`
    /// at once, durable only after `sync`. A later write to the same key wins.
    fn write_batch(&self, writes: &[WriteOp]) -> Result<(), StorageError>;

    /// [`Storage::write_batch`], handing the writes over: a layer that keeps
    /// the written sets (the row cache) takes them instead of cloning them.
    fn write_batch_owned(&self, writes: Vec<WriteOp>) -> Result<(), StorageError> {
        self.write_batch(&writes)
    }

    /// Makes every applied write durable (fsync).
    fn sync(&self) -> Result<(), StorageError>;

    /// Keys of one partition in key order, after `start_after`, at most `limit`
    /// (transfers and anti-entropy page through it).
    fn scan_partition(
        &self,
        partition: u32,
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, DvvSet)>, StorageError>;

    /// Every key of one partition that `keep` accepts, in key order, with
    /// its set; keys it refuses are not decoded (anti-entropy wants a few
    /// segments of a partition). The default decodes everything and filters.
    fn scan_partition_where(
        &self,
        partition: u32,
        keep: &dyn Fn(&[u8]) -> bool,
    ) -> Result<Vec<(Vec<u8>, DvvSet)>, StorageError> {
        let mut all = self.scan_partition(partition, None, usize::MAX)?;
        all.retain(|(key, _)| keep(key));
        Ok(all)
    }

    /// Small node metadata (format version, cluster id, incarnation, epoch).
    fn get_meta(&self, name: &str) -> Result<Option<Vec<u8>>, StorageError>;

    /// Stores one metadata value; it is durable when this returns.
    fn put_meta(&self, name: &str, value: &[u8]) -> Result<(), StorageError>;

    /// How long the next sync takes on a simulated disk. Real engines spend real
    /// time in `sync` and return zero here; the simulator's disk returns a drawn
    /// delay, which the storage worker sleeps (in simulated time) between
    /// applying a batch and syncing it, so a crash can land in that gap.
    fn simulated_sync_latency(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
}

/// A storage engine that wraps another (the row cache, tests' fault
/// injectors): reads, writes and syncs pass through to
/// [`StorageLayer::inner`] unless the layer overrides them; scans, metadata
/// and the simulated sync latency always do. Implementing it gives [`Storage`]; a layer's
/// callers go through `dyn Storage` (or name the trait), since a concrete
/// layer has both traits' methods.
pub trait StorageLayer: Send + Sync + 'static {
    /// The engine beneath.
    fn inner(&self) -> &dyn Storage;

    fn get(&self, partition: u32, key: &[u8]) -> Result<Option<DvvSet>, StorageError> {
        self.inner().get(partition, key)
    }

    fn write_batch(&self, writes: &[WriteOp]) -> Result<(), StorageError> {
        self.inner().write_batch(writes)
    }

    /// Goes through this layer's own `write_batch` unless overridden, so a
    /// layer that only changes `write_batch` sees every batch.
    fn write_batch_owned(&self, writes: Vec<WriteOp>) -> Result<(), StorageError> {
        StorageLayer::write_batch(self, &writes)
    }

    fn sync(&self) -> Result<(), StorageError> {
        self.inner().sync()
    }
}

impl<L: StorageLayer> Storage for L {
    fn get(&self, partition: u32, key: &[u8]) -> Result<Option<DvvSet>, StorageError> {
        StorageLayer::get(self, partition, key)
    }

    fn write_batch(&self, writes: &[WriteOp]) -> Result<(), StorageError> {
        StorageLayer::write_batch(self, writes)
    }

    fn write_batch_owned(&self, writes: Vec<WriteOp>) -> Result<(), StorageError> {
        StorageLayer::write_batch_owned(self, writes)
    }

    fn sync(&self) -> Result<(), StorageError> {
        StorageLayer::sync(self)
    }

    fn scan_partition(
        &self,
        partition: u32,
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, DvvSet)>, StorageError> {
        self.inner().scan_partition(partition, start_after, limit)
    }

    fn scan_partition_where(
        &self,
        partition: u32,
        keep: &dyn Fn(&[u8]) -> bool,
    ) -> Result<Vec<(Vec<u8>, DvvSet)>, StorageError> {
        self.inner().scan_partition_where(partition, keep)
    }

    fn get_meta(&self, name: &str) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner().get_meta(name)
    }

    fn put_meta(&self, name: &str, value: &[u8]) -> Result<(), StorageError> {
        self.inner().put_meta(name, value)
    }

    fn simulated_sync_latency(&self) -> std::time::Duration {
        self.inner().simulated_sync_latency()
    }
}

/// One write of a batch: store `set` under `key` in `partition`, or remove the key
/// when `set` is `None`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteOp {
    pub partition: u32,
    pub key: Vec<u8>,
    pub set: Option<DvvSet>,
}

/// A storage operation failed. Every message says what failed, and for corrupt
/// data, which key or metadata entry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StorageError {
    /// The engine failed (an I/O error, a full disk, a poisoned database).
    #[error("storage {op} failed: {detail}")]
    Io { op: &'static str, detail: String },

    /// A stored value does not decode as a `DvvSet`.
    #[error(
        "stored value of key {key} in partition {partition} is corrupt ({detail}); \
         remove the key or restore the data directory from a replica"
    )]
    CorruptValue {
        partition: u32,
        /// The user key, with non-printable bytes escaped.
        key: String,
        detail: String,
    },

    /// A stored key is not a partition prefix followed by a key.
    #[error("stored key {key} is corrupt: {detail}")]
    CorruptKey { key: String, detail: String },

    /// A value could not be encoded (postcard); nothing was written.
    #[error("cannot encode the value of key {key} in partition {partition}: {detail}")]
    Encode {
        partition: u32,
        key: String,
        detail: String,
    },

    /// A metadata entry is missing or does not decode.
    #[error(
        "node metadata {name:?} in the data directory is corrupt ({detail}); \
         point --data-dir at an empty directory to start this node afresh"
    )]
    CorruptMeta { name: String, detail: String },

    /// The data directory was written by a storage format this build cannot read.
    #[error(
        "data directory has storage format version {found}, this build reads version \
         {supported}: run a build that supports version {found} or point --data-dir at \
         an empty directory"
    )]
    FormatVersion { found: u32, supported: u32 },

    /// The data directory belongs to another cluster.
    #[error(
        "data directory belongs to cluster {stored:?}, this node is configured for \
         {configured:?}: point --data-dir at an empty directory or fix --cluster-id"
    )]
    ClusterMismatch { stored: String, configured: String },

    /// The data directory was written under another ring partition count.
    #[error(
        "data directory was written with --partitions {stored}, this node is configured \
         with {configured}: the partition count is fixed when a cluster is created; set \
         --partitions {stored} or point --data-dir at an empty directory"
    )]
    PartitionsMismatch { stored: u32, configured: u32 },

    /// The group-commit worker has stopped; the write was not applied.
    #[error("storage worker has stopped; the write was not applied")]
    WorkerStopped,
}

impl StorageError {
    pub(crate) fn io(op: &'static str, err: impl std::fmt::Display) -> Self {
        StorageError::Io {
            op,
            detail: err.to_string(),
        }
    }
}

impl From<StorageError> for StoreError {
    fn from(e: StorageError) -> Self {
        StoreError(e.to_string())
    }
}

/// Adapts any [`Storage`] to the core's read interface; the core takes it as a
/// `Box<dyn LocalStore>`.
#[derive(Clone)]
pub struct StoreReader(pub Arc<dyn Storage>);

impl StoreReader {
    pub fn new(storage: Arc<dyn Storage>) -> Self {
        StoreReader(storage)
    }
}

impl LocalStore for StoreReader {
    fn load(&self, partition: u32, key: &[u8]) -> Result<Option<DvvSet>, StoreError> {
        Ok(self.0.get(partition, key)?)
    }

    fn scan(
        &self,
        partition: u32,
        keep: &dyn Fn(&[u8]) -> bool,
    ) -> Result<Vec<(Vec<u8>, DvvSet)>, StoreError> {
        Ok(self.0.scan_partition_where(partition, keep)?)
    }
}

/// Length of the partition prefix of a stored key.
const PARTITION_PREFIX_LEN: usize = 4;

/// The stored key: `partition` as 4 big-endian bytes, then `key`.
pub fn storage_key(partition: u32, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(PARTITION_PREFIX_LEN + key.len());
    out.extend_from_slice(&partition.to_be_bytes());
    out.extend_from_slice(key);
    out
}

/// Splits a stored key into its partition and user key.
pub fn split_storage_key(stored: &[u8]) -> Result<(u32, &[u8]), StorageError> {
    match stored.split_first_chunk::<PARTITION_PREFIX_LEN>() {
        Some((prefix, key)) => Ok((u32::from_be_bytes(*prefix), key)),
        None => Err(StorageError::CorruptKey {
            key: display_key(stored),
            detail: format!("shorter than the {PARTITION_PREFIX_LEN}-byte partition prefix"),
        }),
    }
}

/// The range of stored keys of `partition` strictly after `start_after`.
pub(crate) fn partition_range(
    partition: u32,
    start_after: Option<&[u8]>,
) -> (Bound<Vec<u8>>, Bound<Vec<u8>>) {
    let start = match start_after {
        Some(key) => Bound::Excluded(storage_key(partition, key)),
        None => Bound::Included(storage_key(partition, &[])),
    };
    let end = match partition.checked_add(1) {
        Some(next) => Bound::Excluded(storage_key(next, &[])),
        None => Bound::Unbounded,
    };
    (start, end)
}

/// A key for error messages: printable ASCII as is, other bytes escaped.
pub(crate) fn display_key(key: &[u8]) -> String {
    format!("\"{}\"", key.escape_ascii())
}

pub(crate) fn encode_set(
    partition: u32,
    key: &[u8],
    set: &DvvSet,
) -> Result<Vec<u8>, StorageError> {
    postcard::to_allocvec(set).map_err(|e| StorageError::Encode {
        partition,
        key: display_key(key),
        detail: e.to_string(),
    })
}

/// Decodes a stored set. Bytes left over after it are corruption too (as on
/// the wire): a zero-filled block would otherwise read as an empty set, and a
/// value of another encoding as a set missing its tail. So is a set that
/// decodes but is not well formed: served, it could show a sibling its context
/// does not account for, and a coordinator writing on top of it could reuse
/// that sibling's dot.
pub(crate) fn decode_set(partition: u32, key: &[u8], bytes: &[u8]) -> Result<DvvSet, StorageError> {
    let corrupt = |detail: String| StorageError::CorruptValue {
        partition,
        key: display_key(key),
        detail,
    };
    let (set, rest) = postcard::take_from_bytes(bytes).map_err(|e| corrupt(e.to_string()))?;
    if !rest.is_empty() {
        return Err(corrupt(format!(
            "{} unused bytes after the set's {}",
            rest.len(),
            bytes.len() - rest.len()
        )));
    }
    if let Some(why) = version::malformation(&set) {
        return Err(corrupt(format!("the set is malformed: {why}")));
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_key_round_trips_and_orders_by_partition_first() {
        let a = storage_key(1, b"zzz");
        let b = storage_key(2, b"");
        assert!(a < b, "every key of partition 1 sorts before partition 2");
        assert_eq!(split_storage_key(&a).unwrap(), (1, &b"zzz"[..]));
        assert_eq!(split_storage_key(&b).unwrap(), (2, &b""[..]));
        assert!(split_storage_key(&[0, 1]).is_err());
    }

    #[test]
    fn last_partition_range_is_unbounded_above() {
        let (_, end) = partition_range(u32::MAX, None);
        assert_eq!(end, Bound::Unbounded);
    }

    #[test]
    fn corrupt_value_error_names_the_key() {
        let err = decode_set(7, b"user\x01", b"\xff\xff\xff").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("\"user\\x01\""), "{text}");
        assert!(text.contains("partition 7"), "{text}");
    }
}
