//! The storage contract, run against every engine, plus the crash model, the
//! data-directory identity, the group-commit worker and the sync policy.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dynamo_core::store::LocalStore;
use dynamo_node::storage::{
    open_identity, spawn_storage_worker, spawn_storage_worker_with_delay, MemoryStorage,
    PersistRequest, Persisted, Storage, StorageError, StoreReader, SyncPolicy, WriteOp,
};
use dynamo_proto::{Actor, Dot, DvvSet, Hlc, Sibling};
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tokio::sync::mpsc::UnboundedReceiver;

/// A well-formed set with one sibling whose value and dot are derived from
/// `n` (counters start at 1: 0 is never minted, and a version vector holds no
/// zero entry).
fn set(n: u64) -> DvvSet {
    let actor = Actor {
        incarnation: 0xfeed,
        epoch: 1,
    };
    let dot = Dot {
        actor,
        counter: n + 1,
    };
    let mut s = DvvSet::default();
    s.context.vv.insert(actor, n + 1);
    s.siblings.insert(
        dot,
        Sibling {
            value: Some(n.to_be_bytes().to_vec()),
            timestamp: Hlc {
                wall_ms: n,
                logical: 0,
            },
        },
    );
    s
}

fn put(partition: u32, key: &[u8], n: u64) -> WriteOp {
    WriteOp {
        partition,
        key: key.to_vec(),
        set: Some(set(n)),
    }
}

fn remove(partition: u32, key: &[u8]) -> WriteOp {
    WriteOp {
        partition,
        key: key.to_vec(),
        set: None,
    }
}

fn keys(page: &[(Vec<u8>, DvvSet)]) -> Vec<&[u8]> {
    page.iter().map(|(k, _)| k.as_slice()).collect()
}

/// What every engine must do. Expects an empty store.
fn contract(s: &dyn Storage) {
    // Reads see a batch as soon as it is applied, before any sync.
    assert_eq!(s.get(1, b"a").unwrap(), None);
    s.write_batch(&[put(1, b"a", 1), put(1, b"b", 2)]).unwrap();
    assert_eq!(s.get(1, b"a").unwrap(), Some(set(1)));
    assert_eq!(s.get(1, b"b").unwrap(), Some(set(2)));
    assert_eq!(
        s.get(2, b"a").unwrap(),
        None,
        "partitions are separate namespaces"
    );

    // Within a batch, a later write to the same key wins; removal removes.
    s.write_batch(&[put(1, b"a", 3), put(1, b"a", 4), remove(1, b"b")])
        .unwrap();
    assert_eq!(s.get(1, b"a").unwrap(), Some(set(4)));
    assert_eq!(s.get(1, b"b").unwrap(), None);
    s.write_batch(&[remove(1, b"never-written")]).unwrap();
    s.write_batch(&[]).unwrap();
    s.sync().unwrap();

    // Empty keys, binary keys and the partitions at both ends.
    s.write_batch(&[
        put(0, b"", 10),
        put(u32::MAX, b"\xff\xff", 11),
        put(u32::MAX, b"", 12),
        put(7, b"\x00", 13),
    ])
    .unwrap();
    assert_eq!(s.get(0, b"").unwrap(), Some(set(10)));
    assert_eq!(s.get(u32::MAX, b"\xff\xff").unwrap(), Some(set(11)));

    // Scans: key order, paging, isolation from neighbouring partitions whose keys
    // share prefixes.
    let mut writes = Vec::new();
    for i in (0..50u64).rev() {
        writes.push(put(5, format!("k{i:03}").as_bytes(), i));
    }
    writes.push(put(4, b"k000", 100));
    writes.push(put(6, b"", 101));
    writes.push(put(6, b"k000", 102));
    s.write_batch(&writes).unwrap();

    let all = s.scan_partition(5, None, usize::MAX).unwrap();
    assert_eq!(all.len(), 50);
    for (i, (key, value)) in all.iter().enumerate() {
        assert_eq!(key, format!("k{i:03}").as_bytes());
        assert_eq!(value, &set(i as u64));
    }
    let mut paged = Vec::new();
    let mut cursor: Option<Vec<u8>> = None;
    loop {
        let page = s.scan_partition(5, cursor.as_deref(), 7).unwrap();
        assert!(page.len() <= 7);
        if page.is_empty() {
            break;
        }
        cursor = page.last().map(|(k, _)| k.clone());
        paged.extend(page);
    }
    assert_eq!(paged, all, "paging visits every key once, in order");
    assert_eq!(
        keys(&s.scan_partition(5, Some(b"k047"), 10).unwrap()),
        vec![&b"k048"[..], b"k049"]
    );
    assert_eq!(
        keys(&s.scan_partition(5, Some(b"k0305"), 2).unwrap()),
        vec![&b"k031"[..], b"k032"],
        "start_after need not be a stored key"
    );
    assert!(s.scan_partition(5, None, 0).unwrap().is_empty());
    assert!(s.scan_partition(3, None, 10).unwrap().is_empty());
    assert_eq!(
        keys(&s.scan_partition(6, None, 10).unwrap()),
        vec![&b""[..], b"k000"]
    );
    assert_eq!(
        keys(&s.scan_partition(u32::MAX, None, 10).unwrap()),
        vec![&b""[..], b"\xff\xff"]
    );
    assert_eq!(
        keys(&s.scan_partition(0, None, 10).unwrap()),
        vec![&b""[..]]
    );

    // Metadata.
    assert_eq!(s.get_meta("epoch").unwrap(), None);
    s.put_meta("epoch", &[0, 0, 0, 1]).unwrap();
    s.put_meta("cluster_id", b"prod").unwrap();
    assert_eq!(s.get_meta("epoch").unwrap(), Some(vec![0, 0, 0, 1]));
    s.put_meta("epoch", &[0, 0, 0, 2]).unwrap();
    assert_eq!(s.get_meta("epoch").unwrap(), Some(vec![0, 0, 0, 2]));
    assert_eq!(s.get_meta("cluster_id").unwrap(), Some(b"prod".to_vec()));
    assert!(
        s.scan_partition(0, None, 10).unwrap().len() == 1,
        "metadata never shows up among the data"
    );
}

#[test]
fn memory_engine_meets_the_contract() {
    contract(&MemoryStorage::new());
}

#[cfg(not(madsim))]
#[test]
fn fjall_engine_meets_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let s = dynamo_node::storage::FjallStorage::open(dir.path()).unwrap();
    contract(&s);
}

#[cfg(not(madsim))]
#[test]
fn fjall_keeps_synced_data_and_metadata_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = dynamo_node::storage::FjallStorage::open(dir.path()).unwrap();
        s.write_batch(&[put(3, b"x", 1), put(3, b"y", 2), put(9, b"z", 3)])
            .unwrap();
        s.write_batch(&[remove(3, b"y")]).unwrap();
        s.sync().unwrap();
        s.put_meta("epoch", &[0, 0, 0, 9]).unwrap();
    }
    let s = dynamo_node::storage::FjallStorage::open(dir.path()).unwrap();
    assert_eq!(s.get(3, b"x").unwrap(), Some(set(1)));
    assert_eq!(s.get(3, b"y").unwrap(), None);
    assert_eq!(s.get(9, b"z").unwrap(), Some(set(3)));
    assert_eq!(
        keys(&s.scan_partition(3, None, 10).unwrap()),
        vec![&b"x"[..]]
    );
    assert_eq!(s.get_meta("epoch").unwrap(), Some(vec![0, 0, 0, 9]));
}

#[cfg(not(madsim))]
#[test]
fn fjall_reports_a_corrupt_value_with_its_key() {
    // A value that is not a postcard DvvSet, planted through the raw engine, must
    // come back as an error naming the key, not as a panic or an empty set.
    let dir = tempfile::tempdir().unwrap();
    {
        let db = fjall::Database::builder(dir.path()).open().unwrap();
        let data = db
            .keyspace("data", fjall::KeyspaceCreateOptions::default)
            .unwrap();
        let mut stored = 4u32.to_be_bytes().to_vec();
        stored.extend_from_slice(b"bad");
        data.insert(stored, [0xffu8; 3]).unwrap();
        db.persist(fjall::PersistMode::SyncData).unwrap();
    }
    let s = dynamo_node::storage::FjallStorage::open(dir.path()).unwrap();
    let err = s.get(4, b"bad").unwrap_err();
    assert!(
        matches!(err, StorageError::CorruptValue { partition: 4, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("\"bad\""), "{err}");
    assert!(s.scan_partition(4, None, 10).is_err());
}

/// Stores two sets that decode but break a set's invariants, as a damaged
/// disk or a build with a versioning bug could have left them: one with a
/// sibling its context does not cover, one whose context is not compact.
/// Served, the first would show a sibling its own context does not account
/// for, and a coordinator minting past the context's counter would reuse the
/// sibling's dot. Both must read as corrupt, as undecodable bytes do.
fn malformed_sets_read_as_corrupt(s: &dyn Storage) {
    let mut uncovered = set(3);
    let actor = uncovered.siblings.keys().next().unwrap().actor;
    uncovered.context.vv.insert(actor, 3);
    let mut loose = set(3);
    loose.context.dots.insert(Dot { actor, counter: 5 });
    s.write_batch(&[
        WriteOp {
            partition: 5,
            key: b"uncovered".to_vec(),
            set: Some(uncovered),
        },
        WriteOp {
            partition: 5,
            key: b"loose".to_vec(),
            set: Some(loose),
        },
    ])
    .unwrap();
    // The error names the rule the set breaks, and the dot.
    for (key, why) in [
        (&b"uncovered"[..], "is not covered by its context"),
        (b"loose", "is not compact: exception dot"),
    ] {
        let got = s.get(5, key);
        assert!(
            matches!(&got, Err(e @ StorageError::CorruptValue { partition: 5, .. })
                if e.to_string().contains(why)),
            "{}: {got:?}",
            key.escape_ascii()
        );
    }
    assert!(s.scan_partition(5, None, 10).is_err());
    // A scan that leaves the corrupt keys out never decodes them (a corrupt
    // key must not stop anti-entropy for the rest of its partition).
    s.write_batch(&[put(5, b"good", 1)]).unwrap();
    assert_eq!(
        s.scan_partition_where(5, &|k| k == b"good").unwrap(),
        vec![(b"good".to_vec(), set(1))]
    );
    assert!(s.scan_partition_where(5, &|k| k != b"good").is_err());
}

#[test]
fn every_engine_reads_a_malformed_set_as_corrupt() {
    malformed_sets_read_as_corrupt(&MemoryStorage::new());
    // Through the row cache too, whose layer passes scans to the engine.
    let cached = dynamo_node::storage::CachedStorage::wrap(
        Arc::new(MemoryStorage::new()),
        1 << 20,
        Arc::default(),
    );
    malformed_sets_read_as_corrupt(cached.as_ref());
    #[cfg(not(madsim))]
    {
        let dir = tempfile::tempdir().unwrap();
        let s = dynamo_node::storage::FjallStorage::open(dir.path()).unwrap();
        malformed_sets_read_as_corrupt(&s);
    }
}

#[test]
fn memory_crash_drops_unsynced_writes_and_keeps_synced_ones() {
    let s = MemoryStorage::new();
    s.write_batch(&[put(1, b"synced", 1), put(1, b"overwritten", 2)])
        .unwrap();
    s.sync().unwrap();
    s.put_meta("epoch", b"e").unwrap();
    s.write_batch(&[
        put(1, b"unsynced", 3),
        put(1, b"overwritten", 4),
        remove(1, b"synced"),
    ])
    .unwrap();
    assert_eq!(s.unsynced_len(), 3);
    assert_eq!(s.get(1, b"synced").unwrap(), None);

    s.crash();
    assert_eq!(s.unsynced_len(), 0);
    assert_eq!(s.get(1, b"synced").unwrap(), Some(set(1)));
    assert_eq!(s.get(1, b"overwritten").unwrap(), Some(set(2)));
    assert_eq!(s.get(1, b"unsynced").unwrap(), None);
    assert_eq!(
        keys(&s.scan_partition(1, None, 10).unwrap()),
        vec![&b"overwritten"[..], b"synced"]
    );
    assert_eq!(
        s.get_meta("epoch").unwrap(),
        Some(b"e".to_vec()),
        "metadata is durable"
    );

    // The store keeps working after a crash.
    s.write_batch(&[put(1, b"after", 5)]).unwrap();
    s.sync().unwrap();
    s.crash();
    assert_eq!(s.get(1, b"after").unwrap(), Some(set(5)));
}

#[test]
fn memory_crash_keep_random_subset_keeps_some_unsynced_writes() {
    let s = MemoryStorage::new();
    let synced: Vec<WriteOp> = (0..20)
        .map(|i| put(2, format!("s{i:02}").as_bytes(), i))
        .collect();
    s.write_batch(&synced).unwrap();
    s.sync().unwrap();
    let unsynced: Vec<WriteOp> = (0..100)
        .map(|i| put(2, format!("u{i:03}").as_bytes(), i))
        .collect();
    s.write_batch(&unsynced).unwrap();

    s.crash_keep_random_subset(&mut ChaCha8Rng::seed_from_u64(42));
    let after = s.scan_partition(2, None, usize::MAX).unwrap();
    let kept = after.iter().filter(|(k, _)| k.starts_with(b"u")).count();
    assert!(kept > 0 && kept < 100, "kept {kept} of 100 unsynced writes");
    for i in 0..20u64 {
        assert_eq!(
            s.get(2, format!("s{i:02}").as_bytes()).unwrap(),
            Some(set(i))
        );
    }
    for (key, value) in &after {
        if key.starts_with(b"u") {
            let i: u64 = std::str::from_utf8(&key[1..]).unwrap().parse().unwrap();
            assert_eq!(value, &set(i), "a kept write is kept whole");
        }
    }
    assert_eq!(s.unsynced_len(), 0);
    // What survived is durable now: a second crash keeps it.
    s.crash();
    assert_eq!(s.scan_partition(2, None, usize::MAX).unwrap(), after);
}

#[test]
fn memory_crash_keep_random_subset_is_deterministic_per_seed() {
    let run = |seed| {
        let s = MemoryStorage::new();
        let writes: Vec<WriteOp> = (0..64).map(|i| put(0, &[i as u8], i)).collect();
        s.write_batch(&writes).unwrap();
        s.crash_keep_random_subset(&mut ChaCha8Rng::seed_from_u64(seed));
        s.scan_partition(0, None, usize::MAX).unwrap()
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7), run(8));
}

#[test]
fn store_reader_serves_the_core() {
    let storage = Arc::new(MemoryStorage::new());
    storage.write_batch(&[put(3, b"k", 1)]).unwrap();
    let reader: Box<dyn LocalStore> = Box::new(StoreReader(storage.clone()));
    assert_eq!(reader.load(3, b"k").unwrap(), Some(set(1)));
    assert_eq!(reader.load(3, b"other").unwrap(), None);
}

#[cfg(not(madsim))]
#[test]
fn identity_epoch_increments_across_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let first = {
        let s = dynamo_node::storage::FjallStorage::open(dir.path()).unwrap();
        open_identity(&s, "prod", &mut rng).unwrap()
    };
    assert!(first.fresh);
    assert_eq!(first.epoch, 1);
    for expected in 2..=4 {
        let s = dynamo_node::storage::FjallStorage::open(dir.path()).unwrap();
        let id = open_identity(&s, "prod", &mut rng).unwrap();
        assert!(!id.fresh);
        assert_eq!(id.epoch, expected);
        assert_eq!(id.incarnation, first.incarnation);
        assert_ne!(id.actor(), first.actor());
    }

    // A memory store that crashes right after open_identity keeps the bump.
    let s = MemoryStorage::new();
    let a = open_identity(&s, "prod", &mut rng).unwrap();
    s.crash();
    let b = open_identity(&s, "prod", &mut rng).unwrap();
    assert_eq!((a.epoch, b.epoch), (1, 2));
    assert_eq!(a.incarnation, b.incarnation);

    // A wiped store gets a new incarnation.
    let wiped = MemoryStorage::new();
    let c = open_identity(&wiped, "prod", &mut rng).unwrap();
    assert!(c.fresh);
    assert_ne!(c.incarnation, a.incarnation);
}

#[test]
fn identity_refuses_another_clusters_data_directory() {
    let s = MemoryStorage::new();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    open_identity(&s, "prod", &mut rng).unwrap();
    let err = open_identity(&s, "staging", &mut rng).unwrap_err();
    assert_eq!(
        err.to_string(),
        "data directory belongs to cluster \"prod\", this node is configured for \"staging\": \
         point --data-dir at an empty directory or fix --cluster-id"
    );
    // The refusal changed nothing: the right cluster still opens at epoch 2.
    assert_eq!(open_identity(&s, "prod", &mut rng).unwrap().epoch, 2);
}

/// Counts the batches and syncs that reach the inner engine; can be made to fail.
#[derive(Default)]
struct Instrumented {
    inner: MemoryStorage,
    batches: AtomicUsize,
    /// Writes handed to the engine, over all batches.
    writes: AtomicUsize,
    syncs: AtomicUsize,
    fail_writes: bool,
    fail_syncs: bool,
    /// The next write batch panics (once).
    panic_once: std::sync::atomic::AtomicBool,
}

impl dynamo_node::storage::StorageLayer for Instrumented {
    fn inner(&self) -> &dyn Storage {
        &self.inner
    }
    fn write_batch(&self, writes: &[WriteOp]) -> Result<(), StorageError> {
        self.batches.fetch_add(1, Ordering::SeqCst);
        self.writes.fetch_add(writes.len(), Ordering::SeqCst);
        if self.panic_once.swap(false, Ordering::SeqCst) {
            panic!("the engine blew up");
        }
        if self.fail_writes {
            return Err(StorageError::Io {
                op: "write",
                detail: "disk full".into(),
            });
        }
        self.inner.write_batch(writes)
    }
    fn sync(&self) -> Result<(), StorageError> {
        self.syncs.fetch_add(1, Ordering::SeqCst);
        if self.fail_syncs {
            return Err(StorageError::Io {
                op: "sync",
                detail: "EIO".into(),
            });
        }
        self.inner.sync()
    }
}

fn request(id: u64) -> PersistRequest {
    PersistRequest {
        id,
        partition: (id % 4) as u32,
        key: format!("key{id}").into_bytes(),
        set: Some(set(id)),
    }
}

/// Collects outcomes until `n` ids arrived; returns ok ids and failed ids.
async fn collect(
    rx: &mut UnboundedReceiver<Persisted>,
    n: usize,
) -> (Vec<u64>, Vec<(u64, String)>) {
    let mut ok = Vec::new();
    let mut failed = Vec::new();
    while ok.len() + failed.len() < n {
        let p = rx.recv().await.expect("the worker reports every request");
        match p.error {
            None => ok.extend(p.ids),
            Some(e) => failed.extend(p.ids.into_iter().map(|id| (id, e.clone()))),
        }
    }
    ok.sort_unstable();
    (ok, failed)
}

#[tokio::test]
async fn always_reports_every_request_and_groups_syncs() {
    let storage = Arc::new(Instrumented::default());
    let (worker, mut rx) = spawn_storage_worker(storage.clone(), SyncPolicy::Always);
    const N: u64 = 500;
    // A burst: every request is queued before the worker first runs.
    for id in 0..N {
        worker.submit(request(id));
    }
    let (ok, failed) = collect(&mut rx, N as usize).await;
    assert!(failed.is_empty());
    assert_eq!(ok, (0..N).collect::<Vec<_>>());
    let syncs = storage.syncs.load(Ordering::SeqCst);
    assert!(
        syncs >= 1 && syncs < N as usize / 10,
        "{syncs} syncs for {N} requests"
    );

    // Reported means durable: a crash now loses none of them.
    storage.inner.crash();
    for id in 0..N {
        let r = request(id);
        assert_eq!(storage.get(r.partition, &r.key).unwrap(), r.set);
    }
    worker.shutdown().await.unwrap();
}

/// After a batch of many requests the next batch gathers: a write that
/// arrives a millisecond after another joins its sync. (Without the delay the
/// first is synced alone, at once, on an idle machine; that is not asserted,
/// since a busy one may coalesce them anyway.)
#[tokio::test]
async fn a_busy_worker_lets_the_next_batch_gather_before_its_sync() {
    let storage = Arc::new(Instrumented::default());
    let delay = Duration::from_millis(10);
    let (worker, mut rx) =
        spawn_storage_worker_with_delay(storage.clone(), SyncPolicy::Always, delay);
    // A batch of 400 requests: the next one gathers 25 us x 400, up to 10 ms.
    worker.submit_all((0..400).map(request).collect());
    collect(&mut rx, 400).await;
    let before = storage.syncs.load(Ordering::SeqCst);
    worker.submit(request(400));
    tokio::time::sleep(Duration::from_millis(1)).await;
    worker.submit(request(401));
    let (ok, failed) = collect(&mut rx, 2).await;
    assert!(failed.is_empty());
    assert_eq!(ok, [400, 401]);
    assert_eq!(
        storage.syncs.load(Ordering::SeqCst) - before,
        1,
        "one sync for both"
    );
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn back_to_back_writes_of_one_key_reach_the_engine_once() {
    let storage = Arc::new(Instrumented::default());
    let (worker, mut rx) = spawn_storage_worker(storage.clone(), SyncPolicy::Always);
    // One burst (one core turn's writes, handed over together as the core
    // task does, so they are one batch: separate submissions could race the
    // worker's thread and split): a hot key written ten times, then another
    // key, then the hot key again (not adjacent to its earlier writes:
    // written separately).
    let hot = |id: u64| PersistRequest {
        id,
        partition: 1,
        key: b"hot".to_vec(),
        set: Some(set(id)),
    };
    let mut burst: Vec<PersistRequest> = (0..10).map(hot).collect();
    burst.push(PersistRequest {
        id: 10,
        partition: 1,
        key: b"cold".to_vec(),
        set: Some(set(10)),
    });
    burst.push(hot(11));
    worker.submit_all(burst);
    let (ok, failed) = collect(&mut rx, 12).await;
    assert!(failed.is_empty());
    assert_eq!(ok, (0..12).collect::<Vec<_>>(), "every write is reported");
    assert_eq!(storage.batches.load(Ordering::SeqCst), 1);
    assert_eq!(storage.writes.load(Ordering::SeqCst), 3);
    storage.inner.crash();
    assert_eq!(storage.get(1, b"hot").unwrap(), Some(set(11)));
    assert_eq!(storage.get(1, b"cold").unwrap(), Some(set(10)));
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn always_acks_only_synced_writes_under_concurrent_submitters() {
    let storage = Arc::new(MemoryStorage::new());
    let (worker, mut rx) = spawn_storage_worker(storage.clone(), SyncPolicy::Always);
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let worker = worker.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                worker.submit(request(t * 1000 + i));
                tokio::task::yield_now().await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (ok, failed) = collect(&mut rx, 400).await;
    assert!(failed.is_empty());
    assert_eq!(ok.len(), 400);
    storage.crash();
    for id in ok {
        let r = request(id);
        assert_eq!(
            storage.get(r.partition, &r.key).unwrap(),
            r.set,
            "acked {id} lost"
        );
    }
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn failed_writes_are_reported_not_acknowledged() {
    for (fail_writes, fail_syncs, what) in [(true, false, "disk full"), (false, true, "EIO")] {
        let storage = Arc::new(Instrumented {
            fail_writes,
            fail_syncs,
            ..Instrumented::default()
        });
        let (worker, mut rx) = spawn_storage_worker(storage.clone(), SyncPolicy::Always);
        for id in 0..10 {
            worker.submit(request(id));
        }
        let (ok, failed) = collect(&mut rx, 10).await;
        assert!(ok.is_empty(), "acknowledged {ok:?} although storage failed");
        assert_eq!(failed.len(), 10);
        assert!(failed.iter().all(|(_, e)| e.contains(what)), "{failed:?}");
        // A flush syncs; it fails where syncing fails (a failed write was never
        // applied, so there is nothing of it to sync).
        assert_eq!(worker.flush().await.is_err(), fail_syncs);
    }
}

#[tokio::test]
async fn memory_fault_injection_fails_the_batch() {
    let storage = Arc::new(MemoryStorage::new());
    let (worker, mut rx) = spawn_storage_worker(storage.clone(), SyncPolicy::Always);
    storage.set_failing(true);
    worker.submit(request(1));
    let p = rx.recv().await.unwrap();
    assert_eq!(p.ids, vec![1]);
    assert!(p.error.unwrap().contains("injected fault"));
    storage.set_failing(false);
    worker.submit(request(2));
    assert_eq!(
        rx.recv().await.unwrap(),
        Persisted {
            ids: vec![2],
            error: None
        }
    );
}

#[tokio::test]
async fn interval_acks_at_once_and_syncs_on_the_timer() {
    let storage = Arc::new(Instrumented::default());
    let (worker, mut rx) = spawn_storage_worker(storage.clone(), SyncPolicy::Interval { ms: 5 });
    for id in 0..20 {
        worker.submit(request(id));
    }
    let (ok, _) = collect(&mut rx, 20).await;
    assert_eq!(ok.len(), 20);
    // The timer makes them durable within a few intervals.
    let mut waited_ms = 0;
    while storage.inner.unsynced_len() > 0 {
        assert!(waited_ms < 2000, "no periodic sync after {waited_ms} ms");
        tokio::time::sleep(Duration::from_millis(5)).await;
        waited_ms += 5;
    }
    assert!(storage.syncs.load(Ordering::SeqCst) >= 1);
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn none_syncs_only_on_flush_and_shutdown() {
    let storage = Arc::new(Instrumented::default());
    let (worker, mut rx) = spawn_storage_worker(storage.clone(), SyncPolicy::None);
    for id in 0..20 {
        worker.submit(request(id));
    }
    let (ok, _) = collect(&mut rx, 20).await;
    assert_eq!(ok.len(), 20);
    assert_eq!(storage.syncs.load(Ordering::SeqCst), 0);
    assert_eq!(storage.inner.unsynced_len(), 20);

    worker.submit(request(20));
    worker.shutdown().await.unwrap();
    assert_eq!(
        rx.recv().await.unwrap().ids,
        vec![20],
        "reported before shutdown returns"
    );
    assert_eq!(storage.inner.unsynced_len(), 0, "shutdown syncs");
    storage.inner.crash();
    assert_eq!(storage.get(0, b"key20").unwrap(), Some(set(20)));

    // After shutdown, submissions are reported as failed, never lost: not
    // even one sent the moment shutdown returns, while the worker's thread
    // may still be winding down.
    worker.submit(request(21));
    let p = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
        .await
        .expect("a write submitted after shutdown was never reported")
        .unwrap();
    assert_eq!(p.ids, vec![21]);
    assert!(p.error.unwrap().contains("stopped"));
    assert_eq!(worker.flush().await, Err(StorageError::WorkerStopped));
}

/// The core hands over a turn's writes in one message: they go into one
/// batch, one engine write and one sync, whenever the worker's thread wakes.
#[tokio::test]
async fn a_turns_writes_share_one_batch() {
    let storage = Arc::new(Instrumented::default());
    let (worker, mut rx) = spawn_storage_worker(storage.clone(), SyncPolicy::Always);
    worker.submit_all((0..20).map(request).collect());
    let (ok, failed) = collect(&mut rx, 20).await;
    assert_eq!((ok.len(), failed.len()), (20, 0));
    assert_eq!(storage.batches.load(Ordering::SeqCst), 1);
    assert_eq!(storage.writes.load(Ordering::SeqCst), 20);
    assert_eq!(storage.syncs.load(Ordering::SeqCst), 1);
    worker.submit_all(Vec::new());
    worker.shutdown().await.unwrap();
    assert_eq!(
        storage.batches.load(Ordering::SeqCst),
        1,
        "nothing to write"
    );
}

/// A panic in the engine fails its batch, never acknowledged, and the worker
/// goes on with the next (in production; the simulator lets it propagate).
#[cfg(not(madsim))]
#[tokio::test]
async fn an_engine_panic_fails_its_batch_and_the_worker_goes_on() {
    let storage = Arc::new(Instrumented::default());
    storage.panic_once.store(true, Ordering::SeqCst);
    let (worker, mut rx) = spawn_storage_worker(storage.clone(), SyncPolicy::Always);
    worker.submit_all(vec![request(1), request(2)]);
    let (ok, failed) =
        tokio::time::timeout(std::time::Duration::from_secs(10), collect(&mut rx, 2))
            .await
            .expect("the panicked batch was never reported");
    assert!(ok.is_empty(), "{ok:?}");
    assert!(
        failed.iter().all(|(_, e)| e.contains("panicked")),
        "{failed:?}"
    );
    worker.submit(request(3));
    let (ok, failed) = collect(&mut rx, 1).await;
    assert_eq!((ok, failed.len()), (vec![3], 0));
    worker.shutdown().await.unwrap();
    assert_eq!(storage.get(3, b"key3").unwrap(), Some(set(3)));
}

/// The worker may stop on another thread than the caller's: a write
/// submitted the moment `shutdown` returns must still be reported as failed,
/// not vanish with the worker's queue. The race is narrow, so it is run many
/// times over.
#[tokio::test]
async fn a_write_right_after_shutdown_is_reported_failed() {
    for round in 0..200u64 {
        let storage = Arc::new(Instrumented::default());
        let (worker, mut rx) = spawn_storage_worker(storage, SyncPolicy::Always);
        worker.shutdown().await.unwrap();
        worker.submit(request(round));
        let p = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("round {round}: the write was never reported"))
            .unwrap();
        assert_eq!(p.ids, vec![round]);
        assert!(p.error.unwrap().contains("stopped"));
    }
}

#[cfg(not(madsim))]
#[tokio::test]
async fn worker_over_fjall_makes_acked_writes_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let storage = Arc::new(dynamo_node::storage::FjallStorage::open(dir.path()).unwrap());
        let (worker, mut rx) = spawn_storage_worker(storage, SyncPolicy::Always);
        for id in 0..100 {
            worker.submit(request(id));
        }
        let (ok, failed) = collect(&mut rx, 100).await;
        assert!(failed.is_empty());
        assert_eq!(ok.len(), 100);
        worker.shutdown().await.unwrap();
    }
    let s = dynamo_node::storage::FjallStorage::open(dir.path()).unwrap();
    for id in 0..100 {
        let r = request(id);
        assert_eq!(s.get(r.partition, &r.key).unwrap(), r.set);
    }
}

#[test]
fn sync_policy_parses_and_prints() {
    assert_eq!("always".parse(), Ok(SyncPolicy::Always));
    assert_eq!("none".parse(), Ok(SyncPolicy::None));
    assert_eq!("interval:100".parse(), Ok(SyncPolicy::Interval { ms: 100 }));
    assert_eq!(SyncPolicy::default(), SyncPolicy::Always);
    assert_eq!(SyncPolicy::Interval { ms: 250 }.to_string(), "interval:250");
    for bad in [
        "",
        "sometimes",
        "interval",
        "interval:",
        "interval:0",
        "interval:-5",
        "Always",
    ] {
        let err = bad.parse::<SyncPolicy>().unwrap_err().to_string();
        assert!(
            err.contains("always, interval:<ms>") && err.contains("none"),
            "error for {bad:?} lists the choices: {err}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any sequence of writes, syncs and crashes leaves the memory engine equal to
    /// a model that keeps exactly the synced writes, and its scans equal the
    /// model's, page by page.
    #[test]
    fn memory_engine_matches_a_model(
        steps in prop::collection::vec(
            prop_oneof![
                6 => (0u32..3, prop::collection::vec(0u8..4, 0..3), prop::option::of(0u64..50))
                    .prop_map(|(p, k, v)| Step::Write(p, k, v)),
                1 => Just(Step::Sync),
                1 => Just(Step::Crash),
            ],
            0..60,
        ),
        page in 1usize..5,
    ) {
        let s = MemoryStorage::new();
        let mut visible: BTreeMap<(u32, Vec<u8>), u64> = BTreeMap::new();
        let mut durable = visible.clone();
        for step in steps {
            match step {
                Step::Write(p, k, v) => {
                    s.write_batch(&[WriteOp { partition: p, key: k.clone(), set: v.map(set) }]).unwrap();
                    match v {
                        Some(v) => { visible.insert((p, k), v); }
                        None => { visible.remove(&(p, k)); }
                    }
                }
                Step::Sync => { s.sync().unwrap(); durable = visible.clone(); }
                Step::Crash => { s.crash(); visible = durable.clone(); }
            }
        }
        for p in 0..3u32 {
            let expected: Vec<(Vec<u8>, DvvSet)> = visible
                .iter()
                .filter(|((q, _), _)| *q == p)
                .map(|((_, k), v)| (k.clone(), set(*v)))
                .collect();
            let mut scanned = Vec::new();
            let mut cursor: Option<Vec<u8>> = None;
            loop {
                let got = s.scan_partition(p, cursor.as_deref(), page).unwrap();
                if got.is_empty() { break; }
                cursor = got.last().map(|(k, _)| k.clone());
                scanned.extend(got);
            }
            prop_assert_eq!(scanned, expected);
        }
    }
}

#[derive(Clone, Debug)]
enum Step {
    Write(u32, Vec<u8>, Option<u64>),
    Sync,
    Crash,
}

#[tokio::test]
async fn the_first_failed_write_or_sync_is_published_for_the_server_to_stop_on() {
    // Under `Always` a failed batch is the news; under `Interval` the periodic
    // sync of writes already acknowledged.
    for (policy, fail_writes, fail_syncs, what) in [
        (SyncPolicy::Always, true, false, "disk full"),
        (SyncPolicy::Interval { ms: 5 }, false, true, "EIO"),
    ] {
        let storage = Arc::new(Instrumented {
            fail_writes,
            fail_syncs,
            ..Instrumented::default()
        });
        let (worker, mut rx) = spawn_storage_worker(storage.clone(), policy);
        // Nothing has failed yet: it waits.
        let early = tokio::time::timeout(std::time::Duration::from_millis(50), worker.failed());
        assert!(
            early.await.is_err(),
            "{policy:?}: a failure before any write"
        );
        for id in 0..3 {
            worker.submit(request(id));
        }
        collect(&mut rx, 3).await;
        let error = tokio::time::timeout(std::time::Duration::from_secs(5), worker.failed())
            .await
            .unwrap_or_else(|_| panic!("{policy:?}: no failure published"));
        assert!(error.contains(what), "{policy:?}: {error}");
        // Later callers learn of the same first failure at once.
        assert_eq!(worker.failed().await, error);
    }
}

/// The system clock and real sockets: not under madsim.
#[cfg(not(madsim))]
#[tokio::test]
async fn a_node_whose_storage_fails_reports_it_to_the_server() {
    use dynamo_proto::{ClientReply, ClientRequest, WriteMode};

    let storage = Arc::new(MemoryStorage::new());
    let node = start_node(storage.clone(), 256).await.unwrap();
    let put = |value: &str| ClientRequest::Put {
        key: b"k".to_vec(),
        value: Some(value.as_bytes().to_vec()),
        context: None,
        w: None,
        mode: WriteMode::Overwrite,
    };
    let reply = node.handle.request(put("ok")).await;
    assert!(matches!(reply, ClientReply::Put { .. }), "{reply:?}");

    storage.set_failing(true);
    let reply = node.handle.request(put("lost")).await;
    assert!(
        matches!(reply, ClientReply::Error(_)),
        "acknowledged: {reply:?}"
    );
    let error = tokio::time::timeout(std::time::Duration::from_secs(5), node.storage_failed())
        .await
        .expect("the failure was not reported");
    assert!(error.contains("injected fault"), "{error}");
}

/// Plants raw bytes as the stored value of `key` in `partition`, through fjall
/// itself, as a damaged disk or another build could leave them.
#[cfg(not(madsim))]
fn plant_raw(dir: &std::path::Path, partition: u32, key: &[u8], bytes: &[u8]) {
    let db = fjall::Database::builder(dir).open().unwrap();
    let data = db
        .keyspace("data", fjall::KeyspaceCreateOptions::default)
        .unwrap();
    let mut stored = partition.to_be_bytes().to_vec();
    stored.extend_from_slice(key);
    data.insert(stored, bytes).unwrap();
    db.persist(fjall::PersistMode::SyncData).unwrap();
}

#[cfg(not(madsim))]
#[test]
fn fjall_reports_a_zero_filled_or_overlong_value_as_corrupt() {
    // A block of zeros (what a torn or lost page often reads back as) and a
    // good set followed by junk (an appended field of another encoding) must
    // be refused, not read as an empty set or as the set without its tail.
    let dir = tempfile::tempdir().unwrap();
    let mut overlong = postcard::to_allocvec(&set(1)).unwrap();
    overlong.extend_from_slice(b"junk");
    plant_raw(dir.path(), 4, b"zeros", &[0u8; 64]);
    plant_raw(dir.path(), 4, b"overlong", &overlong);
    let s = dynamo_node::storage::FjallStorage::open(dir.path()).unwrap();
    for key in [&b"zeros"[..], b"overlong"] {
        let got = s.get(4, key);
        assert!(
            matches!(got, Err(StorageError::CorruptValue { partition: 4, .. })),
            "{}: {got:?}",
            key.escape_ascii()
        );
    }
    assert!(s.scan_partition(4, None, 10).is_err());
}

#[cfg(not(madsim))]
#[test]
fn identity_refuses_another_clusters_directory_whose_format_version_is_lost() {
    // Only the format version entry is lost: the directory still names its
    // cluster (and holds its data). It must not be adopted by another cluster.
    let dir = tempfile::tempdir().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    {
        let s = dynamo_node::storage::FjallStorage::open(dir.path()).unwrap();
        open_identity(&s, "prod", &mut rng).unwrap();
        s.write_batch(&[put(3, b"k", 1)]).unwrap();
        s.sync().unwrap();
    }
    {
        let db = fjall::Database::builder(dir.path()).open().unwrap();
        let meta = db
            .keyspace("meta", fjall::KeyspaceCreateOptions::default)
            .unwrap();
        meta.remove("format_version").unwrap();
        db.persist(fjall::PersistMode::SyncData).unwrap();
    }
    let s = dynamo_node::storage::FjallStorage::open(dir.path()).unwrap();
    let got = open_identity(&s, "staging", &mut rng);
    assert!(
        matches!(&got, Err(StorageError::ClusterMismatch { stored, .. }) if stored == "prod"),
        "{got:?}"
    );
}

/// A node over `storage` with `partitions` ring partitions, N = R = W = 1.
#[cfg(not(madsim))]
async fn start_node(
    storage: Arc<MemoryStorage>,
    partitions: u32,
) -> anyhow::Result<dynamo_node::runtime::RunningNode> {
    use dynamo_node::config::{ServerArgs, ServerConfig};
    use dynamo_node::runtime::{self, Clock, Environment};
    let args = ServerArgs {
        node_id: Some("a".into()),
        peer_addr: Some("127.0.0.1:0".into()),
        client_addr: Some("127.0.0.1:0".into()),
        http_addr: Some("off".into()),
        data_dir: Some("/nonexistent/unused".into()),
        n: Some(1),
        r: Some(1),
        w: Some(1),
        partitions: Some(partitions),
        sync: Some("always".into()),
        ..Default::default()
    };
    let config = ServerConfig::resolve(&args).unwrap();
    runtime::start(
        &config,
        Environment {
            storage,
            clock: Clock::system(),
            rng: ChaCha8Rng::seed_from_u64(1),
            http_addr: None,
            trace: None,
        },
    )
    .await
}

/// The system clock and real sockets: not under madsim.
#[cfg(not(madsim))]
#[tokio::test]
async fn a_restart_with_another_partition_count_is_refused_not_a_silent_loss() {
    use dynamo_proto::{ClientReply, ClientRequest, WriteMode};
    // Stored keys carry the partition of the ring they were written under;
    // another Q puts most keys in other partitions, where nothing is stored.
    let storage = Arc::new(MemoryStorage::new());
    let node = start_node(storage.clone(), 256).await.unwrap();
    let keys: Vec<Vec<u8>> = (0..8).map(|i| format!("key-{i}").into_bytes()).collect();
    for key in &keys {
        let put = ClientRequest::Put {
            key: key.clone(),
            value: Some(b"v".to_vec()),
            context: None,
            w: None,
            mode: WriteMode::Overwrite,
        };
        let reply = node.handle.request(put).await;
        assert!(matches!(reply, ClientReply::Put { .. }), "{reply:?}");
    }
    node.shutdown().await.unwrap();

    match start_node(storage.clone(), 64).await {
        Err(e) => {
            let text = format!("{e:#}");
            assert!(text.contains("--partitions"), "{text}");
        }
        Ok(node) => {
            let mut missing = Vec::new();
            for key in &keys {
                let get = ClientRequest::Get {
                    key: key.clone(),
                    r: None,
                };
                match node.handle.request(get).await {
                    ClientReply::Get(reply) if !reply.siblings.is_empty() => {}
                    other => missing.push((key.escape_ascii().to_string(), other)),
                }
            }
            node.shutdown().await.unwrap();
            panic!("started with Q = 64 over a Q = 256 directory; keys read back: {missing:?}");
        }
    }
}
