//! An in-memory storage engine that models a disk which loses unsynced writes.
//!
//! It owns two images of the data: the durable one (what a crash leaves) and the
//! visible one (what reads see), plus the log of writes applied since the last
//! sync. [`MemoryStorage::crash`] throws the unsynced writes away;
//! [`MemoryStorage::crash_keep_random_subset`] keeps a random subset of them, as a
//! disk that reorders its writes may. Tests and the simulator use it as their disk;
//! it must never hold protocol logic.
//!
//! Values are stored postcard-encoded, exactly as the fjall engine stores them, so
//! an encoding bug shows up in the simulator too.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use dynamo_proto::DvvSet;
use rand::{Rng, RngCore};

use super::{
    decode_set, encode_set, partition_range, split_storage_key, storage_key, Storage, StorageError,
    WriteOp,
};

/// An in-memory [`Storage`] with a crash model.
///
/// Metadata ([`Storage::put_meta`]) is durable at once and survives every crash.
/// Unlike fjall, whose metadata write also syncs the data written before it,
/// `put_meta` here leaves unsynced data unsynced: the model never makes more
/// durable than the contract promises.
#[derive(Debug, Default)]
pub struct MemoryStorage {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// What reads see: `durable` with `unsynced` applied.
    visible: BTreeMap<Vec<u8>, Vec<u8>>,
    /// What survives a crash.
    durable: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Writes applied since the last sync, oldest first (`None` = removal).
    unsynced: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    meta: BTreeMap<String, Vec<u8>>,
    /// While set, every write, sync and metadata write fails (fault injection).
    failing: bool,
    syncs: u64,
    /// How long a sync takes, drawn per sync from `[min, max]` ms (simulation).
    sync_latency_ms: (u64, u64),
    latency_rng: Option<rand_chacha::ChaCha8Rng>,
    /// A sync that starts before this instant waits for it first (a stalled
    /// disk, fault injection).
    stalled_until: Option<tokio::time::Instant>,
    /// Until this instant every read of stored data fails (unreadable sectors,
    /// fault injection).
    unreadable_until: Option<tokio::time::Instant>,
}

impl MemoryStorage {
    pub fn new() -> Self {
        Self::default()
    }

    /// Drops every write not yet synced, as a power failure does.
    pub fn crash(&self) {
        let mut inner = self.lock();
        inner.unsynced.clear();
        inner.visible = inner.durable.clone();
    }

    /// Keeps a random subset of the unsynced writes (each with probability 1/2,
    /// applied in their original order) and drops the rest, as a disk that
    /// reorders writes and loses power may. Synced writes always survive.
    pub fn crash_keep_random_subset<R: RngCore + ?Sized>(&self, rng: &mut R) {
        let mut inner = self.lock();
        let unsynced = std::mem::take(&mut inner.unsynced);
        for (key, value) in unsynced {
            if rng.gen_bool(0.5) {
                apply(&mut inner.durable, key, value);
            }
        }
        inner.visible = inner.durable.clone();
    }

    /// Makes every later write, sync and metadata write fail with an I/O error
    /// (`true`) or succeed again (`false`). Reads keep working.
    pub fn set_failing(&self, failing: bool) {
        self.lock().failing = failing;
    }

    /// Makes every sync take between `min_ms` and `max_ms` of (simulated) time,
    /// drawn from a generator seeded with `seed`.
    pub fn set_sync_latency(&self, min_ms: u64, max_ms: u64, seed: u64) {
        use rand::SeedableRng;
        let mut inner = self.lock();
        inner.sync_latency_ms = (min_ms, max_ms.max(min_ms));
        inner.latency_rng = Some(rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    }

    /// Stalls the disk for `duration` from now: a sync that starts meanwhile
    /// finishes its usual latency after the stall ends. Writes and reads are
    /// not slowed (they reach the page cache); a crash during the stall loses
    /// what was not synced, as ever. A later stall that ends sooner does not
    /// shorten an earlier one.
    pub fn stall_syncs(&self, duration: std::time::Duration) {
        extend(&mut self.lock().stalled_until, duration);
    }

    /// Makes every read of stored data (`get`, `scan_partition`) fail with an
    /// I/O error for `duration` from now, as unreadable sectors do; writes,
    /// syncs and metadata keep working. A later window that ends sooner does
    /// not shorten an earlier one.
    pub fn fail_reads(&self, duration: std::time::Duration) {
        extend(&mut self.lock().unreadable_until, duration);
    }

    /// How many writes were applied since the last sync (and a crash would lose).
    pub fn unsynced_len(&self) -> usize {
        self.lock().unsynced.len()
    }

    /// How many times `sync` succeeded.
    pub fn sync_count(&self) -> u64 {
        self.lock().syncs
    }

    /// The lock is only held by this module's short, panic-free sections; if a
    /// caller's panic poisoned it anyway, the data is still consistent.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn apply(map: &mut BTreeMap<Vec<u8>, Vec<u8>>, key: Vec<u8>, value: Option<Vec<u8>>) {
    match value {
        Some(v) => {
            map.insert(key, v);
        }
        None => {
            map.remove(&key);
        }
    }
}

/// Moves a fault window's end to `duration` from now, unless it already ends later.
fn extend(until: &mut Option<tokio::time::Instant>, duration: std::time::Duration) {
    let end = tokio::time::Instant::now() + duration;
    *until = Some(until.map_or(end, |t| t.max(end)));
}

fn injected(op: &'static str) -> StorageError {
    StorageError::io(op, "injected fault (MemoryStorage::set_failing)")
}

impl Inner {
    /// Fails while reads are made to fail ([`MemoryStorage::fail_reads`]).
    fn check_readable(&self) -> Result<(), StorageError> {
        match self.unreadable_until {
            Some(until) if tokio::time::Instant::now() < until => Err(StorageError::io(
                "read",
                "injected fault (MemoryStorage::fail_reads)",
            )),
            _ => Ok(()),
        }
    }
}

impl Storage for MemoryStorage {
    fn get(&self, partition: u32, key: &[u8]) -> Result<Option<DvvSet>, StorageError> {
        let inner = self.lock();
        inner.check_readable()?;
        match inner.visible.get(&storage_key(partition, key)) {
            Some(bytes) => decode_set(partition, key, bytes).map(Some),
            None => Ok(None),
        }
    }

    fn write_batch(&self, writes: &[WriteOp]) -> Result<(), StorageError> {
        // Encode everything first so that a failure applies nothing, as fjall's
        // atomic batch does.
        let mut encoded = Vec::with_capacity(writes.len());
        for op in writes {
            let value = match &op.set {
                Some(set) => Some(encode_set(op.partition, &op.key, set)?),
                None => None,
            };
            encoded.push((storage_key(op.partition, &op.key), value));
        }
        let mut inner = self.lock();
        if inner.failing {
            return Err(injected("write"));
        }
        for (key, value) in encoded {
            apply(&mut inner.visible, key.clone(), value.clone());
            inner.unsynced.push((key, value));
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), StorageError> {
        let mut inner = self.lock();
        if inner.failing {
            return Err(injected("sync"));
        }
        let unsynced = std::mem::take(&mut inner.unsynced);
        for (key, value) in unsynced {
            apply(&mut inner.durable, key, value);
        }
        inner.syncs += 1;
        Ok(())
    }

    fn scan_partition(
        &self,
        partition: u32,
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, DvvSet)>, StorageError> {
        let inner = self.lock();
        inner.check_readable()?;
        inner
            .visible
            .range(partition_range(partition, start_after))
            .take(limit)
            .map(|(stored, bytes)| {
                let (_, key) = split_storage_key(stored)?;
                Ok((key.to_vec(), decode_set(partition, key, bytes)?))
            })
            .collect()
    }

    fn scan_partition_where(
        &self,
        partition: u32,
        keep: &dyn Fn(&[u8]) -> bool,
    ) -> Result<Vec<(Vec<u8>, DvvSet)>, StorageError> {
        let inner = self.lock();
        inner.check_readable()?;
        let mut out = Vec::new();
        for (stored, bytes) in inner.visible.range(partition_range(partition, None)) {
            let (_, key) = split_storage_key(stored)?;
            if keep(key) {
                out.push((key.to_vec(), decode_set(partition, key, bytes)?));
            }
        }
        Ok(out)
    }

    fn get_meta(&self, name: &str) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.lock().meta.get(name).cloned())
    }

    fn put_meta(&self, name: &str, value: &[u8]) -> Result<(), StorageError> {
        let mut inner = self.lock();
        if inner.failing {
            return Err(injected("metadata write"));
        }
        inner.meta.insert(name.to_string(), value.to_vec());
        Ok(())
    }

    fn simulated_sync_latency(&self) -> std::time::Duration {
        let mut inner = self.lock();
        let (min, max) = inner.sync_latency_ms;
        let ms = match inner.latency_rng.as_mut() {
            Some(rng) if max > 0 => rng.gen_range(min..=max),
            _ => 0,
        };
        let stalled = inner
            .stalled_until
            .map_or(std::time::Duration::ZERO, |until| {
                until.saturating_duration_since(tokio::time::Instant::now())
            });
        stalled + std::time::Duration::from_millis(ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn put(s: &MemoryStorage, key: &[u8]) {
        let op = WriteOp {
            partition: 0,
            key: key.to_vec(),
            set: Some(DvvSet::default()),
        };
        s.write_batch(&[op]).unwrap();
    }

    #[test]
    fn removal_is_unsynced_until_sync() {
        let s = MemoryStorage::new();
        put(&s, b"k");
        s.sync().unwrap();
        let remove = WriteOp {
            partition: 0,
            key: b"k".to_vec(),
            set: None,
        };
        s.write_batch(&[remove]).unwrap();
        assert_eq!(s.get(0, b"k").unwrap(), None);
        s.crash();
        assert!(
            s.get(0, b"k").unwrap().is_some(),
            "the removal was never synced"
        );
    }

    #[tokio::test]
    async fn a_stall_delays_the_syncs_that_start_before_it_ends() {
        let s = MemoryStorage::new();
        s.set_sync_latency(1, 4, 7);
        assert!(s.simulated_sync_latency() <= Duration::from_millis(4));
        s.stall_syncs(Duration::from_secs(60));
        // A shorter stall on top does not end the first one sooner.
        s.stall_syncs(Duration::from_millis(1));
        let during = s.simulated_sync_latency();
        assert!(
            during > Duration::from_secs(59) && during <= Duration::from_millis(60_004),
            "{during:?}"
        );
        let s = MemoryStorage::new();
        s.set_sync_latency(1, 4, 7);
        s.stall_syncs(Duration::from_millis(20));
        tokio::time::sleep(Duration::from_millis(30)).await;
        let after = s.simulated_sync_latency();
        assert!(after <= Duration::from_millis(4), "{after:?}");
    }

    #[tokio::test]
    async fn reads_fail_for_their_window_and_nothing_else_does() {
        let s = MemoryStorage::new();
        put(&s, b"k");
        s.fail_reads(Duration::from_secs(60));
        s.fail_reads(Duration::from_millis(1));
        assert!(s.get(0, b"k").is_err());
        assert!(s.scan_partition(0, None, 10).is_err());
        put(&s, b"j");
        s.sync().unwrap();
        s.put_meta("m", b"v").unwrap();
        assert_eq!(s.get_meta("m").unwrap(), Some(b"v".to_vec()));
        let s = MemoryStorage::new();
        put(&s, b"k");
        s.fail_reads(Duration::from_millis(20));
        assert!(s.get(0, b"k").is_err());
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(s.get(0, b"k").unwrap().is_some());
    }

    #[test]
    fn failing_storage_applies_nothing() {
        let s = MemoryStorage::new();
        s.set_failing(true);
        let op = WriteOp {
            partition: 0,
            key: b"k".to_vec(),
            set: Some(DvvSet::default()),
        };
        assert!(s.write_batch(&[op]).is_err());
        assert!(s.sync().is_err());
        assert!(s.put_meta("m", b"v").is_err());
        assert_eq!(s.get(0, b"k").unwrap(), None);
        s.set_failing(false);
        put(&s, b"k");
        assert!(s.get(0, b"k").unwrap().is_some());
    }
}
