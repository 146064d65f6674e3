//! A bounded cache of what this node's store holds, so hot keys skip the
//! storage engine.
//!
//! It holds only values the store already has durably (a set reported by
//! `on_persisted`, or one just read from the store), including "absent"
//! (`None`). Every local write passes through the node's overlay of unpersisted
//! writes, which reads consult first, and replaces the cached entry once it is
//! durable; so the cache never serves anything older than the store.
//!
//! Eviction is a deterministic CLOCK (second chance) by estimated bytes: entries
//! are queued in insertion order by a counter; a hit marks its entry; the
//! eviction hand gives a marked entry one more round and drops an unmarked one.
//! Only ordered maps and counters, so two runs of the same inputs evict alike.

use dynamo_proto::DvvSet;
use std::collections::BTreeMap;

/// The default bound on the cache's estimated size: 64 MiB.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

/// Fixed per-entry overhead (map nodes, the queue entry, the set's header).
const ENTRY_OVERHEAD: usize = 128;
/// Per-sibling overhead besides the value itself (dot, timestamp, map node).
const SIBLING_OVERHEAD: usize = 64;
/// Per context entry (version-vector entry or dot, with its map node).
const CONTEXT_ENTRY: usize = 48;

struct Entry {
    set: Option<DvvSet>,
    bytes: usize,
    /// This entry's place in `queue`.
    tick: u64,
    /// Read since the eviction hand last passed it.
    referenced: bool,
}

pub(crate) struct ReadCache {
    max_bytes: usize,
    bytes: usize,
    next_tick: u64,
    entries: BTreeMap<u32, BTreeMap<Vec<u8>, Entry>>,
    /// Entries in the order the eviction hand visits them.
    queue: BTreeMap<u64, (u32, Vec<u8>)>,
}

impl ReadCache {
    pub fn new(max_bytes: usize) -> ReadCache {
        ReadCache {
            max_bytes,
            bytes: 0,
            next_tick: 0,
            entries: BTreeMap::new(),
            queue: BTreeMap::new(),
        }
    }

    /// The cached copy of a key (`Some(None)`: the store has no such key).
    pub fn get(&mut self, partition: u32, key: &[u8]) -> Option<&Option<DvvSet>> {
        let entry = self.entries.get_mut(&partition)?.get_mut(key)?;
        entry.referenced = true;
        Some(&entry.set)
    }

    /// Records what the store now holds for a key.
    pub fn insert(&mut self, partition: u32, key: Vec<u8>, set: Option<DvvSet>) {
        let bytes = estimate(&key, set.as_ref());
        // An entry that would take more than an eighth of the cache is not kept.
        if bytes > self.max_bytes / 8 {
            self.remove(partition, &key);
            return;
        }
        let slot = self.entries.entry(partition).or_default();
        if let Some(entry) = slot.get_mut(&key) {
            self.bytes = self.bytes - entry.bytes + bytes;
            entry.bytes = bytes;
            entry.set = set;
            entry.referenced = true;
        } else {
            let tick = self.next_tick;
            self.next_tick += 1;
            self.queue.insert(tick, (partition, key.clone()));
            slot.insert(
                key,
                Entry {
                    set,
                    bytes,
                    tick,
                    referenced: false,
                },
            );
            self.bytes += bytes;
        }
        self.evict();
    }

    /// Forgets a key.
    pub fn remove(&mut self, partition: u32, key: &[u8]) {
        let Some(slot) = self.entries.get_mut(&partition) else {
            return;
        };
        if let Some(entry) = slot.remove(key) {
            self.bytes -= entry.bytes;
            self.queue.remove(&entry.tick);
        }
        if slot.is_empty() {
            self.entries.remove(&partition);
        }
    }

    fn evict(&mut self) {
        while self.bytes > self.max_bytes {
            let Some((_, (partition, key))) = self.queue.pop_first() else {
                return;
            };
            let slot = self
                .entries
                .get_mut(&partition)
                .expect("every queued key is cached");
            let entry = slot.get_mut(&key).expect("every queued key is cached");
            if entry.referenced {
                entry.referenced = false;
                entry.tick = self.next_tick;
                self.next_tick += 1;
                self.queue.insert(entry.tick, (partition, key));
            } else {
                self.bytes -= entry.bytes;
                slot.remove(&key);
                if slot.is_empty() {
                    self.entries.remove(&partition);
                }
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.queue.len()
    }
}

fn estimate(key: &[u8], set: Option<&DvvSet>) -> usize {
    let set_bytes = set.map_or(0, |s| {
        let siblings: usize = s
            .siblings
            .values()
            .map(|sib| SIBLING_OVERHEAD + sib.value.as_ref().map_or(0, Vec::len))
            .sum();
        siblings + CONTEXT_ENTRY * (s.context.vv.len() + s.context.dots.len())
    });
    ENTRY_OVERHEAD + key.len() + set_bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use dynamo_proto::{Actor, Dot, Hlc, Sibling};

    fn set(value: &[u8]) -> DvvSet {
        let mut s = DvvSet::default();
        s.siblings.insert(
            Dot {
                actor: Actor {
                    incarnation: 1,
                    epoch: 1,
                },
                counter: 1,
            },
            Sibling {
                value: Some(value.to_vec()),
                timestamp: Hlc {
                    wall_ms: 1,
                    logical: 0,
                },
            },
        );
        s
    }

    #[test]
    fn hits_misses_and_updates() {
        let mut c = ReadCache::new(1 << 20);
        assert!(c.get(1, b"a").is_none());
        c.insert(1, b"a".to_vec(), None);
        assert_eq!(c.get(1, b"a"), Some(&None));
        c.insert(1, b"a".to_vec(), Some(set(b"x")));
        assert_eq!(c.get(1, b"a"), Some(&Some(set(b"x"))));
        assert!(c.get(2, b"a").is_none());
        c.remove(1, b"a");
        assert!(c.get(1, b"a").is_none());
        assert_eq!(c.bytes, 0);
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn stays_within_its_bound_and_keeps_what_is_read() {
        let per = estimate(b"k000", Some(&set(&[0; 100])));
        let mut c = ReadCache::new(per * 10);
        for i in 0..10u32 {
            c.insert(0, format!("k{i:03}").into_bytes(), Some(set(&[0; 100])));
        }
        assert_eq!(c.len(), 10);
        // k000 is read, so the next insert evicts k001 instead.
        assert!(c.get(0, b"k000").is_some());
        c.insert(0, b"k010".to_vec(), Some(set(&[0; 100])));
        assert!(c.bytes <= per * 10);
        assert!(c.get(0, b"k000").is_some());
        assert!(c.get(0, b"k001").is_none());
        for i in 11..100u32 {
            c.insert(0, format!("k{i:03}").into_bytes(), Some(set(&[0; 100])));
            assert!(c.bytes <= per * 10);
        }
        assert_eq!(c.len(), 10);
    }

    #[test]
    fn oversize_entries_are_not_kept() {
        let mut c = ReadCache::new(1024);
        c.insert(0, b"big".to_vec(), Some(set(&[0; 512])));
        assert!(c.get(0, b"big").is_none());
        assert_eq!(c.bytes, 0);
        let mut off = ReadCache::new(0);
        off.insert(0, b"a".to_vec(), None);
        assert!(off.get(0, b"a").is_none());
    }
}
