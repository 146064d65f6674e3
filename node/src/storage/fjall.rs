//! The production storage engine: a fjall (LSM-tree) database in the data
//! directory, with one keyspace for data and one for node metadata.
//!
//! It owns the mapping of [`Storage`] onto fjall's API and nothing else. fjall
//! starts OS threads (flushes, compaction), so it is compiled out of the madsim
//! simulator, which uses [`super::MemoryStorage`] as its disk.
//!
//! Durability: every batch commit hands its journal entry to the OS
//! (`PersistMode::Buffer`, fjall's default), so a process crash loses nothing
//! applied; only `Database::persist(PersistMode::SyncData)` (fdatasync of the
//! journal, shared by both keyspaces) survives a power failure. fjall does not
//! merge concurrent callers' syncs, which is why one worker batches them.

use std::path::Path;

use ::fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use dynamo_proto::DvvSet;

use super::{
    decode_set, encode_set, partition_range, split_storage_key, storage_key, Storage, StorageError,
    WriteOp,
};

const DATA_KEYSPACE: &str = "data";
const META_KEYSPACE: &str = "meta";

/// A [`Storage`] backed by fjall. Dropping it closes the database (fjall joins its
/// background threads when the last handle goes).
pub struct FjallStorage {
    db: Database,
    data: Keyspace,
    meta: Keyspace,
}

impl FjallStorage {
    /// Opens the database in `dir`, creating it (and `dir`) if it does not exist.
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
        let open_error = |e: ::fjall::Error| StorageError::Io {
            op: "open",
            detail: format!("cannot open the fjall database in {}: {e}", dir.display()),
        };
        let db = Database::builder(dir).open().map_err(open_error)?;
        let data = db
            .keyspace(DATA_KEYSPACE, KeyspaceCreateOptions::default)
            .map_err(open_error)?;
        let meta = db
            .keyspace(META_KEYSPACE, KeyspaceCreateOptions::default)
            .map_err(open_error)?;
        Ok(FjallStorage { db, data, meta })
    }
}

impl Storage for FjallStorage {
    fn get(&self, partition: u32, key: &[u8]) -> Result<Option<DvvSet>, StorageError> {
        let stored = self
            .data
            .get(storage_key(partition, key))
            .map_err(|e| StorageError::io("read", e))?;
        match stored {
            Some(bytes) => decode_set(partition, key, &bytes).map(Some),
            None => Ok(None),
        }
    }

    fn write_batch(&self, writes: &[WriteOp]) -> Result<(), StorageError> {
        // `Database::batch` commits with `PersistMode::Buffer`: atomic, in the OS's
        // buffers when `commit` returns, durable after `sync`.
        let mut batch = self.db.batch();
        for op in writes {
            let key = storage_key(op.partition, &op.key);
            match &op.set {
                Some(set) => batch.insert(&self.data, key, encode_set(op.partition, &op.key, set)?),
                None => batch.remove(&self.data, key),
            }
        }
        batch.commit().map_err(|e| StorageError::io("write", e))
    }

    fn sync(&self) -> Result<(), StorageError> {
        self.db
            .persist(PersistMode::SyncData)
            .map_err(|e| StorageError::io("sync", e))
    }

    fn scan_partition(
        &self,
        partition: u32,
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, DvvSet)>, StorageError> {
        let mut out = Vec::new();
        for guard in self
            .data
            .range(partition_range(partition, start_after))
            .take(limit)
        {
            let (stored, bytes) = guard
                .into_inner()
                .map_err(|e| StorageError::io("scan", e))?;
            let (_, key) = split_storage_key(&stored)?;
            out.push((key.to_vec(), decode_set(partition, key, &bytes)?));
        }
        Ok(out)
    }

    fn get_meta(&self, name: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let value = self
            .meta
            .get(name)
            .map_err(|e| StorageError::io("metadata read", e))?;
        Ok(value.map(|v| v.to_vec()))
    }

    fn put_meta(&self, name: &str, value: &[u8]) -> Result<(), StorageError> {
        // A batch with durability fdatasyncs the journal before `commit` returns
        // (and with it every data write applied before).
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncData));
        batch.insert(&self.meta, name, value);
        batch
            .commit()
            .map_err(|e| StorageError::io("metadata write", e))
    }
}
