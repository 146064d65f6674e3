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
//!
//! Latency: fjall frees a flushed memtable (every skiplist node of up to
//! 64 MiB of writes) when it garbage-collects old tree versions during the
//! next memtable rotation, while it holds the tree's version lock that every
//! read and write takes. Measured on a loaded 3-node dev cluster, that stalled
//! each node's reads and writes for 65-140 ms at every rotation. So this
//! storage keeps its own reference to every memtable it sees active
//! (`MemtableKeeper`) and, once fjall has let go of one, drops it on a
//! reclaim thread of its own: fjall's collection under the lock then only
//! decrements a count. fjall's workers and that thread run at the lowest CPU
//! priority (`background`).
//!
//! Large values: the data keyspace separates stored sets of
//! [`BLOB_THRESHOLD`] bytes or more into fjall's blob files, so compactions
//! rewrite their keys and pointers, not the values. On 4 KiB values under a
//! 3-node dev cluster that gave 21% more throughput and half the p99 (57 vs
//! 112 ms), with a third fewer journal fsyncs over 25 ms: compaction writes are
//! what a sync waits behind. Blob compression stays off: values are the
//! client's bytes, often compressed already, and it keeps clear of
//! fjall-rs/lsm-tree#300 (relocated compressed blobs read back undecompressed
//! after a restart). The layout is fixed when the keyspace is created: data
//! directories made before keep theirs.

use std::any::Any;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use ::fjall::{
    AbstractTree, CompressionType, Database, Keyspace, KeyspaceCreateOptions, KvSeparationOptions,
    PersistMode,
};
use dynamo_proto::DvvSet;

use super::{
    decode_set, encode_set, partition_range, split_storage_key, storage_key, Storage, StorageError,
    WriteOp,
};

const DATA_KEYSPACE: &str = "data";
const META_KEYSPACE: &str = "meta";

/// Stored sets (value, dots and timestamps) this large or larger go to blob
/// files; smaller ones (a 100-byte value's set is about 150) stay in the tables.
pub const BLOB_THRESHOLD: u32 = 1024;

/// How the data keyspace is created: large values in blob files, uncompressed.
fn data_keyspace_options() -> KeyspaceCreateOptions {
    let blobs = KvSeparationOptions::default()
        .separation_threshold(BLOB_THRESHOLD)
        .compression(CompressionType::None);
    KeyspaceCreateOptions::default().with_kv_separation(Some(blobs))
}

/// A [`Storage`] backed by fjall. Dropping it closes the database (fjall joins its
/// background threads when the last handle goes).
pub struct FjallStorage {
    db: Database,
    data: Keyspace,
    meta: Keyspace,
    memtables: MemtableKeeper,
}

impl FjallStorage {
    /// Opens the database in `dir`, creating it (and `dir`) if it does not exist.
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
        Self::open_with(dir, data_keyspace_options())
    }

    /// As [`FjallStorage::open`], with the data keyspace's memtables flushed at
    /// `memtable_bytes` (`--memtable-mb`) instead of fjall's default 64 MiB.
    pub fn open_with_memtable(dir: &Path, memtable_bytes: u64) -> Result<Self, StorageError> {
        Self::open_with(
            dir,
            data_keyspace_options().max_memtable_size(memtable_bytes),
        )
    }

    fn open_with(dir: &Path, data_options: KeyspaceCreateOptions) -> Result<Self, StorageError> {
        let open_error = |e: ::fjall::Error| StorageError::Io {
            op: "open",
            detail: format!("cannot open the fjall database in {}: {e}", dir.display()),
        };
        let db = Database::builder(dir).open().map_err(open_error)?;
        let data = db
            .keyspace(DATA_KEYSPACE, || data_options)
            .map_err(open_error)?;
        let meta = db
            .keyspace(META_KEYSPACE, KeyspaceCreateOptions::default)
            .map_err(open_error)?;
        let memtables = MemtableKeeper::start().map_err(|e| StorageError::Io {
            op: "open",
            detail: format!("cannot start the memtable reclaim thread: {e}"),
        })?;
        background::lower_fjall_workers();
        Ok(FjallStorage {
            db,
            data,
            meta,
            memtables,
        })
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
        batch.commit().map_err(|e| StorageError::io("write", e))?;
        self.memtables.observe(self.data.tree.active_memtable());
        Ok(())
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

    fn scan_partition_where(
        &self,
        partition: u32,
        keep: &dyn Fn(&[u8]) -> bool,
    ) -> Result<Vec<(Vec<u8>, DvvSet)>, StorageError> {
        let mut out = Vec::new();
        for guard in self.data.range(partition_range(partition, None)) {
            let (stored, bytes) = guard
                .into_inner()
                .map_err(|e| StorageError::io("scan", e))?;
            let (_, key) = split_storage_key(&stored)?;
            if keep(key) {
                out.push((key.to_vec(), decode_set(partition, key, &bytes)?));
            }
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

/// A memtable, type-erased (lsm-tree's `Memtable` is not part of fjall's API).
type HeldMemtable = Arc<dyn Any + Send + Sync>;

/// Holds a reference to every memtable of the data keyspace seen active, and
/// hands each to the reclaim thread once it is the only holder left (fjall has
/// flushed the memtable and dropped its old versions), so the memtable is freed
/// there instead of under fjall's version lock.
struct MemtableKeeper {
    /// Oldest first; the last is the memtable most recently seen active.
    held: Mutex<Vec<HeldMemtable>>,
    reclaim: mpsc::Sender<HeldMemtable>,
    /// Memtables handed to the reclaim thread so far.
    reclaimed: AtomicU64,
}

impl MemtableKeeper {
    fn start() -> std::io::Result<MemtableKeeper> {
        let (reclaim, freed) = mpsc::channel::<HeldMemtable>();
        // The thread ends when the keeper (the only sender) is dropped.
        std::thread::Builder::new()
            .name("dynamo-reclaim".into())
            .spawn(move || {
                background::lower_current_thread();
                freed.iter().for_each(drop);
            })?;
        Ok(MemtableKeeper {
            held: Mutex::new(Vec::new()),
            reclaim,
            reclaimed: AtomicU64::new(0),
        })
    }

    /// Called after every write with the keyspace's active memtable: a few
    /// pointer comparisons and reference counts, no allocation unless the
    /// memtable is new.
    fn observe<M: Any + Send + Sync>(&self, active: Arc<M>) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let is_new = held
            .last()
            .is_none_or(|last| !std::ptr::addr_eq(Arc::as_ptr(last), Arc::as_ptr(&active)));
        if is_new {
            held.push(active);
        }
        // Every memtable but the newest (the active one, still fjall's).
        let mut i = 0;
        while i + 1 < held.len() {
            // Nobody else can take a new reference once fjall holds none.
            if Arc::strong_count(&held[i]) == 1 {
                let memtable = held.remove(i);
                // The reclaim thread only exits once the keeper is dropped; were
                // it gone, the memtable would be freed here, which is no worse
                // than keeping it.
                if self.reclaim.send(memtable).is_ok() {
                    self.reclaimed.fetch_add(1, Ordering::Relaxed);
                }
            } else {
                i += 1;
            }
        }
    }

    #[cfg(test)]
    fn held(&self) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// fjall's flushes and compactions, and the freeing of memtables, are
/// background work: on a busy machine they should take the CPU the request
/// path leaves idle, not slices of it. On a 2-core machine running a 3-node
/// cluster at 70% load, three nodes flushing at once (0.3-1 s of CPU each) at
/// normal priority held every node's request threads runnable but waiting, and
/// the open loop's per-second maximum latency reached 350 ms; at nice 10 they
/// still took a third of the CPU. At nice 19 they run in the gaps. On a
/// saturated machine they still get a share, and should flushes fall behind,
/// fjall's own write backpressure (it halts writes while 4 sealed memtables
/// wait) frees the CPU they need.
mod background {
    /// `nice` of the background threads, the lowest; RocksDB lowers its
    /// compaction pool to the same.
    pub const NICE: i32 = 19;

    #[cfg(target_os = "linux")]
    use rustix::process::Pid;

    /// Lowers every fjall worker thread of this process (fjall starts its
    /// pool, named `fjall:worker`, when the database opens).
    #[cfg(target_os = "linux")]
    pub fn lower_fjall_workers() {
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            tracing::warn!("cannot list /proc/self/task; fjall's workers keep normal priority");
            return;
        };
        let mut lowered = 0;
        for task in tasks.flatten() {
            let is_fjall = std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|comm| comm.starts_with("fjall:"));
            let tid = task
                .file_name()
                .to_str()
                .and_then(|t| t.parse::<i32>().ok())
                .and_then(Pid::from_raw);
            if let (true, Some(tid)) = (is_fjall, tid) {
                if lower(tid) {
                    lowered += 1;
                }
            }
        }
        tracing::debug!(lowered, nice = NICE, "fjall background threads lowered");
    }

    /// Lowers the calling thread.
    #[cfg(target_os = "linux")]
    pub fn lower_current_thread() {
        lower(rustix::thread::gettid());
    }

    /// On Linux, `setpriority(PRIO_PROCESS, tid)` sets that one thread's nice.
    #[cfg(target_os = "linux")]
    fn lower(tid: Pid) -> bool {
        match rustix::process::setpriority_process(Some(tid), NICE) {
            Ok(()) => true,
            Err(e) => {
                let tid = tid.as_raw_nonzero();
                tracing::warn!(tid, error = %e, "cannot lower a background thread's priority");
                false
            }
        }
    }

    #[cfg(not(target_os = "linux"))]
    pub fn lower_fjall_workers() {}

    #[cfg(not(target_os = "linux"))]
    pub fn lower_current_thread() {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use dynamo_core::version::{self, Versioning};
    use dynamo_proto::{Actor, Hlc, WriteMode};
    use std::time::{Duration, Instant};

    /// The set a blind write of `len` bytes leaves on an empty key.
    fn value_set(n: u64, len: usize) -> DvvSet {
        let actor = Actor {
            incarnation: 7,
            epoch: 1,
        };
        let timestamp = Hlc {
            wall_ms: n,
            logical: 0,
        };
        let value = Some(vec![(n % 251) as u8; len]);
        let mode = WriteMode::Overwrite;
        version::write(
            &DvvSet::default(),
            None,
            mode,
            value,
            actor,
            timestamp,
            Versioning::Dvv,
            1,
        )
        .unwrap()
        .set
    }

    #[test]
    fn flushed_memtables_are_freed_by_the_reclaim_thread_not_by_fjall() {
        // 1 MiB memtables and about 24 MiB of writes: fjall rotates, flushes and
        // collects many memtables. Each must end with the keeper as its last
        // holder (so fjall never frees one under its version lock), and the
        // keeper must let go of every one fjall is done with.
        // (`open_with_memtable` is what `--memtable-mb` sets: with fjall's
        // default of 64 MiB nothing here would rotate.)
        let dir = tempfile::tempdir().unwrap();
        let s = FjallStorage::open_with_memtable(dir.path(), 1 << 20).unwrap();
        let write_round = |round: u64| {
            let writes: Vec<WriteOp> = (0..100)
                .map(|i| WriteOp {
                    partition: (i % 8) as u32,
                    key: format!("key-{round}-{i}").into_bytes(),
                    set: Some(value_set(round * 100 + i, 1024)),
                })
                .collect();
            s.write_batch(&writes).unwrap();
        };
        for round in 0..240 {
            write_round(round);
        }
        // Flushes run on fjall's workers; keep writing a little until the
        // keeper has handed memtables over, or give up after a generous wait.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut round = 240;
        while s.memtables.reclaimed.load(Ordering::Relaxed) < 10 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            write_round(round);
            round += 1;
        }
        let reclaimed = s.memtables.reclaimed.load(Ordering::Relaxed);
        let held = s.memtables.held();
        assert!(
            reclaimed >= 10,
            "only {reclaimed} memtables reached the reclaim thread ({held} held)"
        );
        assert!(
            held <= 6,
            "the keeper holds {held} memtables; it should let go of flushed ones"
        );
        // Everything written is still readable, from tables and memtables alike.
        for r in [0, 120, round - 1] {
            for i in [0, 99] {
                let key = format!("key-{r}-{i}");
                let got = s.get((i % 8) as u32, key.as_bytes()).unwrap();
                assert_eq!(got, Some(value_set(r * 100 + i, 1024)), "{key}");
            }
        }
    }

    #[test]
    fn large_values_go_to_blob_files_and_survive_relocation_and_reopen() {
        // 4 KiB values go to blob files, 100-byte ones stay in the tables.
        // Eight flushes make eight blob files; overwriting half of every one
        // leaves each half stale, so compactions rewrite the oldest (fjall
        // relocates the oldest quarter of the stale ones) and move their live
        // half into a new blob file. Reopened through `open`, every key reads
        // back its newest set, relocated or not.
        let dir = tempfile::tempdir().unwrap();
        let large = |i: u64| format!("large-{i:04}").into_bytes();
        let small = |i: u64| format!("small-{i:04}").into_bytes();
        let op = |key: Vec<u8>, set: DvvSet| WriteOp {
            partition: 3,
            key,
            set: Some(set),
        };
        let newest = |i: u64| if i.is_multiple_of(2) { 10_000 + i } else { i };
        {
            let options = data_keyspace_options().max_memtable_size(1 << 20);
            let s = FjallStorage::open_with(dir.path(), options).unwrap();
            assert!(s.data.is_kv_separated());
            let write = |writes: Vec<WriteOp>| {
                s.write_batch(&writes).unwrap();
                s.sync().unwrap();
                s.data.rotate_memtable_and_wait().unwrap();
            };
            for round in 0..8 {
                write(
                    (round * 50..round * 50 + 50)
                        .map(|i| op(large(i), value_set(i, 4096)))
                        .collect(),
                );
            }
            write((0..400).map(|i| op(small(i), value_set(i, 100))).collect());
            assert!(
                s.data.blob_file_count() >= 8,
                "4 KiB values should be in blob files"
            );
            write(
                (0..400)
                    .step_by(2)
                    .map(|i| op(large(i), value_set(newest(i), 4096)))
                    .collect(),
            );
            // The first compaction counts what the overwrites left stale, the
            // second relocates.
            s.data.major_compact().unwrap();
            let stale = s.data.fragmented_blob_bytes();
            assert!(
                stale > 0,
                "the overwritten values should count as stale blob bytes"
            );
            s.data.major_compact().unwrap();
            let after = s.data.fragmented_blob_bytes();
            assert!(
                after < stale,
                "no blob file was relocated: {after} stale bytes, {stale} before"
            );
        }
        let s = FjallStorage::open(dir.path()).unwrap();
        assert!(s.data.is_kv_separated());
        for i in 0..400 {
            let got = s.get(3, &large(i)).unwrap();
            assert_eq!(got, Some(value_set(newest(i), 4096)), "large-{i}");
            assert_eq!(
                s.get(3, &small(i)).unwrap(),
                Some(value_set(i, 100)),
                "small-{i}"
            );
        }
        assert_eq!(s.scan_partition(3, None, 10_000).unwrap().len(), 800);
    }

    /// The nice value of every thread of this process whose name starts with
    /// `prefix` (field 19 of /proc/self/task/TID/stat, after the parenthesised name).
    #[cfg(target_os = "linux")]
    fn nice_of_threads(prefix: &str) -> Vec<i32> {
        let mut found = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if !comm.starts_with(prefix) {
                continue;
            }
            let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
                continue;
            };
            let after_name = &stat[stat.rfind(')').unwrap() + 2..];
            // Fields from 3 (state) on; nice is field 19.
            let nice = after_name.split(' ').nth(19 - 3).unwrap();
            found.push(nice.parse().unwrap());
        }
        found
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn background_threads_run_at_the_lowest_priority() {
        let dir = tempfile::tempdir().unwrap();
        let _s = FjallStorage::open(dir.path()).unwrap();
        // Other tests open databases concurrently, and a database's workers run
        // at normal priority until its open lowers them, so wait for every
        // thread to settle. The reclaim thread lowers itself as it starts.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let fjall = nice_of_threads("fjall:");
            let reclaim = nice_of_threads("dynamo-reclaim");
            let lowered =
                |nices: &[i32]| !nices.is_empty() && nices.iter().all(|&n| n == background::NICE);
            if lowered(&fjall) && lowered(&reclaim) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "nice values: fjall workers {fjall:?}, reclaim threads {reclaim:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
