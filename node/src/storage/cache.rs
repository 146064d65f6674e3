//! A row cache in front of a storage engine: the decoded set of keys recently
//! read or written, so that the read every write starts with (the core loads a
//! key's set before merging a new version into it) rarely reaches the engine.
//!
//! Profiled on a 3-node dev cluster under `dynamo bench` puts, fjall's point
//! lookups took 18% of each node's CPU and two thirds of its core task's: a key
//! not in the active memtable is searched in every sealed memtable (skiplists,
//! a cache miss per level) before the tables' filters are asked.
//!
//! The cache answers exactly what the engine would: it holds, per key, what
//! the engine's `get` returns (a set, or `None` for a key a write removed),
//! never anything else. A read that finds nothing is not kept: the key is
//! nearly always about to be written (a put of a new key reads it first).
//! Two rules keep it so while reads (the core task) and writes (the storage
//! worker's thread) run at once:
//! - a write batch first marks its keys as changing (it bumps the epoch of
//!   each key's shard), then applies the batch to the engine, then bumps the
//!   epoch again and puts what it wrote in the cache; if the batch failed it
//!   may or may not have been applied, so its keys leave the cache instead;
//! - a read that misses notes its key's shard epoch before asking the engine
//!   and fills the cache only if the epoch is unchanged afterwards (checked
//!   and filled under the shard's lock), so a value read before a write
//!   cannot land after that write's own entry.
//!
//! Eviction (quick_cache's S3-FIFO, per shard) is bounded by an estimate of
//! each entry's bytes. Scans (transfers, anti-entropy) bypass the cache and do not fill it.

use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use dynamo_proto::DvvSet;

use super::{storage_key, Storage, StorageError, WriteOp};

/// Shards, each with its own lock, cache and epoch: the core task's reads and
/// the storage worker's inserts rarely wait for each other, and a write batch
/// delays the fills of keys in its shards only.
const SHARDS: usize = 16;

/// Rough per-entry overhead beyond the key and value bytes (the map slot, the
/// set's maps and vectors), for the weight estimate.
const ENTRY_OVERHEAD: u64 = 96;

/// The cache's counters, rendered with the node's metrics.
#[derive(Debug, Default)]
pub struct CacheMetrics {
    /// Reads answered from the cache.
    pub hits: AtomicU64,
    /// Reads that went to the engine.
    pub misses: AtomicU64,
    /// Reads not kept because a write to their shard ran meanwhile.
    pub fills_skipped: AtomicU64,
    /// Entries held, and the estimate of their bytes (gauges).
    pub entries: AtomicU64,
    pub bytes: AtomicU64,
    /// The configured bound, in bytes (a gauge; 0 when the cache is off).
    pub capacity_bytes: AtomicU64,
}

/// A [`Storage`] that keeps a bounded cache of decoded sets in front of `inner`.
/// Reads may run on any thread; write batches must come one at a time (the
/// storage worker's), or two batches could install their sets out of order.
pub struct CachedStorage {
    inner: Arc<dyn Storage>,
    shards: Vec<Mutex<Shard>>,
    hasher: Hasher,
    metrics: Arc<CacheMetrics>,
}

type Hasher = BuildHasherDefault<DefaultHasher>;

type Cache = quick_cache::unsync::Cache<
    Vec<u8>,
    Option<DvvSet>,
    Weight,
    Hasher,
    quick_cache::unsync::DefaultLifecycle<Vec<u8>, Option<DvvSet>>,
>;

struct Shard {
    cache: Cache,
    /// Bumped by every write batch that touches the shard, before it applies.
    epoch: u64,
}

#[derive(Clone, Copy)]
struct Weight;

impl quick_cache::Weighter<Vec<u8>, Option<DvvSet>> for Weight {
    fn weight(&self, key: &Vec<u8>, set: &Option<DvvSet>) -> u64 {
        key.len() as u64 + set.as_ref().map_or(0, |s| s.estimated_bytes() as u64) + ENTRY_OVERHEAD
    }
}

impl CachedStorage {
    /// Wraps `inner` with a cache of at most about `capacity_bytes`; with 0 it
    /// returns `inner` itself.
    pub fn wrap(
        inner: Arc<dyn Storage>,
        capacity_bytes: u64,
        metrics: Arc<CacheMetrics>,
    ) -> Arc<dyn Storage> {
        if capacity_bytes == 0 {
            return inner;
        }
        metrics
            .capacity_bytes
            .store(capacity_bytes, Ordering::Relaxed);
        let per_shard = (capacity_bytes / SHARDS as u64).max(1);
        let estimated_items = (per_shard / 256).clamp(16, 1 << 20) as usize;
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    cache: Cache::with(
                        estimated_items,
                        per_shard,
                        Weight,
                        Hasher::default(),
                        Default::default(),
                    ),
                    epoch: 0,
                })
            })
            .collect();
        Arc::new(CachedStorage {
            inner,
            shards,
            hasher: Hasher::default(),
            metrics,
        })
    }

    /// The shard of a stored key, locked. The lock is only held by this
    /// module's short, panic-free sections; if a panic poisoned it anyway, the
    /// shard is still consistent.
    fn shard(&self, stored_key: &[u8]) -> MutexGuard<'_, Shard> {
        let i = (self.hasher.hash_one(stored_key) % SHARDS as u64) as usize;
        self.shards[i]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `change` on a locked shard and moves the gauges by what it did.
    fn change(&self, shard: &mut Shard, change: impl FnOnce(&mut Cache)) {
        let (len, weight) = (shard.cache.len() as u64, shard.cache.weight());
        change(&mut shard.cache);
        let m = &self.metrics;
        let grew = (shard.cache.len() as u64).wrapping_sub(len);
        m.entries.fetch_add(grew, Ordering::Relaxed);
        let grew = shard.cache.weight().wrapping_sub(weight);
        m.bytes.fetch_add(grew, Ordering::Relaxed);
    }
}

impl super::StorageLayer for CachedStorage {
    fn inner(&self) -> &dyn Storage {
        &*self.inner
    }

    fn get(&self, partition: u32, key: &[u8]) -> Result<Option<DvvSet>, StorageError> {
        let stored = storage_key(partition, key);
        let epoch = {
            let shard = self.shard(&stored);
            if let Some(set) = shard.cache.get(&stored) {
                self.metrics.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(set.clone());
            }
            shard.epoch
        };
        self.metrics.misses.fetch_add(1, Ordering::Relaxed);
        let set = self.inner.get(partition, key)?;
        if set.is_none() {
            // An absent key is nearly always about to be written (a put of a
            // new key reads it first), and the write fills the cache itself.
            return Ok(set);
        }
        let mut shard = self.shard(&stored);
        if shard.epoch == epoch {
            let fill = set.clone();
            self.change(&mut shard, |cache| cache.insert(stored, fill));
        } else {
            self.metrics.fills_skipped.fetch_add(1, Ordering::Relaxed);
        }
        Ok(set)
    }

    fn write_batch(&self, writes: &[WriteOp]) -> Result<(), StorageError> {
        super::StorageLayer::write_batch_owned(self, writes.to_vec())
    }

    fn write_batch_owned(&self, writes: Vec<WriteOp>) -> Result<(), StorageError> {
        let keys: Vec<Vec<u8>> = writes
            .iter()
            .map(|w| storage_key(w.partition, &w.key))
            .collect();
        for stored in &keys {
            let mut shard = self.shard(stored);
            shard.epoch = shard.epoch.wrapping_add(1);
        }
        let result = self.inner.write_batch(&writes);
        for (stored, write) in keys.into_iter().zip(writes) {
            let mut shard = self.shard(&stored);
            // Again after applying: a read that missed after the first bump
            // may have read the engine before the batch applied, and must not
            // fill its older set over this one.
            shard.epoch = shard.epoch.wrapping_add(1);
            // A set the engine would read back as corrupt (one that breaks a
            // set's invariants, which only a bug could write) is not kept:
            // reads must go to the engine and see the error, as without a
            // cache.
            let malformed = write
                .set
                .as_ref()
                .is_some_and(|set| dynamo_core::version::malformation(set).is_some());
            match &result {
                // In batch order, so a later write of a key wins, as in the engine.
                Ok(()) if !malformed => {
                    self.change(&mut shard, |cache| cache.insert(stored, write.set))
                }
                _ => self.change(&mut shard, |cache| {
                    cache.remove(&stored);
                }),
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryStorage;
    use dynamo_proto::{Actor, Dot, Hlc, Sibling};
    use proptest::prelude::*;
    use std::sync::OnceLock;

    fn set_of(value: &[u8]) -> DvvSet {
        let mut set = DvvSet::default();
        let actor = Actor {
            incarnation: 7,
            epoch: 1,
        };
        let dot = Dot { actor, counter: 1 };
        set.context.vv.insert(actor, 1);
        set.siblings.insert(
            dot,
            Sibling {
                value: Some(value.to_vec()),
                timestamp: Hlc::default(),
            },
        );
        set
    }

    fn write(key: &[u8], set: Option<DvvSet>) -> WriteOp {
        WriteOp {
            partition: 3,
            key: key.to_vec(),
            set,
        }
    }

    /// An engine that runs `before_apply` inside a write batch (after the
    /// cache marked its keys as changing, before the engine applies it) and
    /// `after_read` inside a read (after the engine answered, before the
    /// cache fills), as the storage worker's thread and the core task may
    /// interleave.
    struct Stalling {
        engine: MemoryStorage,
        before_apply: Mutex<Option<Box<dyn FnOnce() + Send>>>,
        after_read: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    }

    impl Stalling {
        fn new() -> Stalling {
            Stalling {
                engine: MemoryStorage::new(),
                before_apply: Mutex::new(None),
                after_read: Mutex::new(None),
            }
        }
    }

    impl crate::storage::StorageLayer for Stalling {
        fn inner(&self) -> &dyn Storage {
            &self.engine
        }
        fn get(&self, partition: u32, key: &[u8]) -> Result<Option<DvvSet>, StorageError> {
            let read = self.engine.get(partition, key);
            let hook = self.after_read.lock().unwrap().take();
            if let Some(hook) = hook {
                hook();
            }
            read
        }
        fn write_batch(&self, writes: &[WriteOp]) -> Result<(), StorageError> {
            let hook = self.before_apply.lock().unwrap().take();
            if let Some(hook) = hook {
                hook();
            }
            self.engine.write_batch(writes)
        }
    }

    /// A [`Stalling`] engine holding "old" for `k`, behind a 1 MiB cache.
    fn stalling_cache_holding_old() -> (Arc<Stalling>, Arc<CacheMetrics>, Arc<dyn Storage>) {
        let inner = Arc::new(Stalling::new());
        inner
            .engine
            .write_batch(&[write(b"k", Some(set_of(b"old")))])
            .unwrap();
        let metrics = Arc::new(CacheMetrics::default());
        let cached = CachedStorage::wrap(inner.clone(), 1 << 20, metrics.clone());
        (inner, metrics, cached)
    }

    #[test]
    fn a_read_that_raced_a_write_does_not_fill_the_cache_with_the_older_set() {
        let (inner, metrics, cached) = stalling_cache_holding_old();
        let writer: Arc<OnceLock<Arc<dyn Storage>>> = Arc::new(OnceLock::new());
        writer.set(cached.clone()).ok().unwrap();
        let hook_writer = writer.clone();
        *inner.after_read.lock().unwrap() = Some(Box::new(move || {
            let cached = hook_writer.get().unwrap();
            cached
                .write_batch(&[write(b"k", Some(set_of(b"new")))])
                .unwrap();
        }));

        // The miss read "old"; the write ran before the fill and won.
        assert_eq!(cached.get(3, b"k").unwrap(), Some(set_of(b"old")));
        assert_eq!(metrics.fills_skipped.load(Ordering::Relaxed), 1);
        assert_eq!(cached.get(3, b"k").unwrap(), Some(set_of(b"new")));
        assert_eq!(
            metrics.hits.load(Ordering::Relaxed),
            1,
            "the write filled it"
        );
    }

    #[test]
    fn a_read_that_started_while_a_write_was_applying_does_not_fill_the_older_set() {
        use std::sync::mpsc;
        let (inner, _, cached) = stalling_cache_holding_old();
        let (read_done, wait_read) = mpsc::channel::<()>();
        let (write_done, wait_write) = mpsc::channel::<()>();
        let (reader_tx, reader_rx) = mpsc::channel();
        // The reader misses (noting the epoch the write already bumped), reads
        // "old" from the engine, and fills only after the write has finished.
        *inner.after_read.lock().unwrap() = Some(Box::new(move || {
            read_done.send(()).unwrap();
            wait_write.recv().unwrap();
        }));
        let reader_cache = cached.clone();
        *inner.before_apply.lock().unwrap() = Some(Box::new(move || {
            let reader = std::thread::spawn(move || reader_cache.get(3, b"k").unwrap());
            wait_read.recv().unwrap();
            reader_tx.send(reader).unwrap();
        }));

        cached
            .write_batch(&[write(b"k", Some(set_of(b"new")))])
            .unwrap();
        write_done.send(()).unwrap();
        let reader = reader_rx.recv().unwrap();
        // The read ran before the write applied: "old" was the right answer then.
        assert_eq!(reader.join().unwrap(), Some(set_of(b"old")));
        assert_eq!(
            cached.get(3, b"k").unwrap(),
            Some(set_of(b"new")),
            "the cache kept the set the write replaced"
        );
        assert_eq!(inner.engine.get(3, b"k").unwrap(), Some(set_of(b"new")));
    }

    /// A memory engine behind a 1 MiB cache, "a" written through the cache.
    fn cache_holding_a() -> (Arc<MemoryStorage>, Arc<CacheMetrics>, Arc<dyn Storage>) {
        let inner = Arc::new(MemoryStorage::new());
        let metrics = Arc::new(CacheMetrics::default());
        let cached = CachedStorage::wrap(inner.clone(), 1 << 20, metrics.clone());
        cached
            .write_batch(&[write(b"a", Some(set_of(b"1")))])
            .unwrap();
        (inner, metrics, cached)
    }

    #[test]
    fn reads_are_served_from_writes_and_fills_but_not_for_absent_keys() {
        let (inner, metrics, cached) = cache_holding_a();
        inner
            .write_batch(&[write(b"c", Some(set_of(b"3")))])
            .unwrap();
        assert_eq!(cached.get(3, b"a").unwrap(), Some(set_of(b"1")));
        assert_eq!(cached.get(3, b"b").unwrap(), None);
        assert_eq!(cached.get(3, b"b").unwrap(), None);
        assert_eq!(cached.get(3, b"c").unwrap(), Some(set_of(b"3")));
        assert_eq!(cached.get(3, b"c").unwrap(), Some(set_of(b"3")));
        let hits = metrics.hits.load(Ordering::Relaxed);
        let misses = metrics.misses.load(Ordering::Relaxed);
        assert_eq!((hits, misses), (2, 3));
        assert_eq!(metrics.entries.load(Ordering::Relaxed), 2);
        // The cache answered from memory: the engine alone still agrees.
        assert_eq!(inner.get(3, b"a").unwrap(), Some(set_of(b"1")));
    }

    #[test]
    fn a_failed_batch_drops_its_keys_so_the_next_read_asks_the_engine() {
        let (inner, metrics, cached) = cache_holding_a();
        inner.set_failing(true);
        assert!(cached
            .write_batch(&[write(b"a", Some(set_of(b"2")))])
            .is_err());
        inner.set_failing(false);
        assert_eq!(metrics.entries.load(Ordering::Relaxed), 0);
        assert_eq!(cached.get(3, b"a").unwrap(), Some(set_of(b"1")));
        assert_eq!(metrics.misses.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn the_cache_stays_within_its_bound_and_evicted_keys_read_from_the_engine() {
        let inner = Arc::new(MemoryStorage::new());
        let metrics = Arc::new(CacheMetrics::default());
        let cached = CachedStorage::wrap(inner.clone(), 8 << 10, metrics.clone());
        for i in 0..1000u32 {
            let key = i.to_be_bytes();
            cached
                .write_batch(&[write(&key, Some(set_of(&key)))])
                .unwrap();
        }
        let entries = metrics.entries.load(Ordering::Relaxed);
        assert!((1..100).contains(&entries), "{entries} entries");
        assert!(metrics.bytes.load(Ordering::Relaxed) <= 8 << 10);
        for i in 0..1000u32 {
            let key = i.to_be_bytes();
            assert_eq!(cached.get(3, &key).unwrap(), Some(set_of(&key)));
        }
        assert!(metrics.misses.load(Ordering::Relaxed) >= 900);
    }

    #[test]
    fn zero_capacity_is_no_cache() {
        let inner: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
        let wrapped = CachedStorage::wrap(inner.clone(), 0, Arc::default());
        assert!(Arc::ptr_eq(&inner, &wrapped));
    }

    #[derive(Clone, Debug)]
    enum Op {
        Write(Vec<(u8, Option<u8>)>),
        Get(u8),
        Failing(bool),
    }

    fn op() -> impl Strategy<Value = Op> {
        let key = 0u8..24;
        prop_oneof![
            proptest::collection::vec((key.clone(), proptest::option::of(any::<u8>())), 1..5)
                .prop_map(Op::Write),
            key.prop_map(Op::Get),
            any::<bool>().prop_map(Op::Failing),
        ]
    }

    proptest! {
        /// Every read through a small (evicting) cache equals a read of an
        /// engine that saw the same writes and failures with no cache.
        #[test]
        fn the_cache_answers_what_the_engine_would(ops in proptest::collection::vec(op(), 1..200)) {
            let inner = Arc::new(MemoryStorage::new());
            let plain = MemoryStorage::new();
            let cached = CachedStorage::wrap(inner.clone(), 8 << 10, Arc::default());
            for op in ops {
                match op {
                    Op::Write(writes) => {
                        let writes: Vec<WriteOp> = writes
                            .into_iter()
                            .map(|(k, v)| write(&[k], v.map(|v| set_of(&vec![v; usize::from(v) % 40]))))
                            .collect();
                        prop_assert_eq!(
                            cached.write_batch(&writes).is_ok(),
                            plain.write_batch(&writes).is_ok()
                        );
                    }
                    Op::Get(k) => prop_assert_eq!(cached.get(3, &[k]).unwrap(), plain.get(3, &[k]).unwrap()),
                    Op::Failing(f) => {
                        inner.set_failing(f);
                        plain.set_failing(f);
                    }
                }
            }
        }
    }
}
