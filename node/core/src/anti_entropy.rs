//! Anti-entropy: what heals the replicas that hints and read repair missed.
//!
//! Each node keeps, per partition it is a primary of, a hash tree of what it
//! stores: [`SEGMENTS`] segment hashes, each the XOR of the hashes of the
//! (key, set) entries whose key falls in that segment. XOR makes the tree
//! incremental: a write replaces its key's old entry hash by the new one in
//! O(1), with no read of the rest of the partition. A tree is built from a
//! scan of the partition the first time an exchange needs it and is kept
//! current by every write after that; it lives in memory only (a restart
//! rebuilds it from the disk, which is also what a crash leaves behind).
//!
//! An exchange between two primaries X and Y of a partition, started by X on
//! its timer, takes at most three messages:
//! 1. X sends its segment hashes (`AntiEntropySegments`, 512 bytes);
//! 2. Y compares them with its own; if any differ, Y sends its entries in the
//!    first [`MAX_DIFF_SEGMENTS`] of those segments (`AntiEntropyEntries`, with
//!    `reply` set);
//! 3. X merges them (a merge persists only what changes), then sends back its
//!    own entries in those segments, which now cover Y's; Y merges those.
//!
//! Entries travel a whole segment at a time, as many segments as fit in
//! [`MAX_ENTRIES_BYTES`] (or half the peer frame limit, if smaller), so a
//! segment shipped is healed on both sides and stops differing; which
//! differing segments a node answers with rotates, so a partition that
//! differs in more than one message's worth (a replica that lost its disk)
//! heals over successive exchanges instead of shipping its first segments
//! again and again. Merges are the replicas' own (idempotent, commutative),
//! so a duplicated, late or lost message does no harm, and no exchange needs
//! state between its messages.
//!
//! Shipping a segment means scanning its partition, which also gives the
//! segment's true hashes: a tree found to disagree with them is corrected
//! there, so a tree cannot stay wrong past the next exchange of its segment.
//!
//! Nothing here reads a clock or draws randomness: the node passes `now`, and
//! the pairs are taken in a fixed round-robin order.

use std::collections::BTreeMap;

use dynamo_proto::{Dot, DvvSet, NodeId};

use crate::ring::Ring;

/// Segments per partition tree. 64 segment hashes of 8 bytes make the first
/// message of an exchange 512 bytes; with 100k keys on 256 partitions, a
/// segment holds about 6 keys, so a single differing key costs a handful of
/// entries to ship.
pub const SEGMENTS: usize = 64;

/// Differing segments one exchange ships at most: a partition that differs
/// everywhere (a replica that lost its disk) heals over several exchanges
/// instead of in one message the size of the partition.
pub const MAX_DIFF_SEGMENTS: usize = 16;

/// The estimated size of the entries one `AntiEntropyEntries` message carries
/// at most (well under the frame limit); entries past it wait for the next
/// exchange.
pub const MAX_ENTRIES_BYTES: usize = 4 << 20;

/// The default time between two exchanges this node starts
/// (`--anti-entropy-interval-ms`): one a second, so with 256 partitions on
/// three nodes each pair of replicas compares every partition about every
/// four minutes (both sides start exchanges), for about 600 bytes a second
/// per node when the replicas agree. Under a write load most exchanges find
/// segments differing only by writes still in flight and ship them for
/// nothing; at ten a second that cost 4-8% of puts' throughput on a 3-node
/// dev cluster.
pub const DEFAULT_INTERVAL_MS: u64 = 1_000;

/// The segment of a partition's tree that `key` falls in: the low bits of its
/// ring hash (the partition is taken from the high bits).
pub fn segment_of(key: &[u8]) -> usize {
    (Ring::key_hash(key) % SEGMENTS as u64) as usize
}

/// The hash of one stored entry: 0 for an empty set (so a key stored empty
/// and an absent key agree), else the first 8 bytes of blake3 over the key
/// and the set's causal history: its context, and each sibling's dot,
/// timestamp, kind and value length. Not the value bytes: a dot names one
/// write, minted once, so two replicas holding the same dots hold the same
/// values, and hashing 4 KiB values on every write would cost what the rest
/// of anti-entropy does. (A value damaged in place is the storage's checksums'
/// to catch, not this hash's.)
pub fn entry_hash(key: &[u8], set: &DvvSet) -> u64 {
    if holds_nothing(set) {
        return 0;
    }
    let mut hasher = blake3::Hasher::new();
    let dot = |hasher: &mut blake3::Hasher, d: &Dot| {
        hasher.update(&d.actor.incarnation.to_le_bytes());
        hasher.update(&d.actor.epoch.to_le_bytes());
        hasher.update(&d.counter.to_le_bytes());
    };
    hasher.update(&(key.len() as u64).to_le_bytes());
    hasher.update(key);
    hasher.update(&(set.context.vv.len() as u64).to_le_bytes());
    for (actor, counter) in &set.context.vv {
        dot(
            &mut hasher,
            &Dot {
                actor: *actor,
                counter: *counter,
            },
        );
    }
    hasher.update(&(set.context.dots.len() as u64).to_le_bytes());
    for d in &set.context.dots {
        dot(&mut hasher, d);
    }
    hasher.update(&(set.siblings.len() as u64).to_le_bytes());
    for (d, sibling) in &set.siblings {
        dot(&mut hasher, d);
        hasher.update(&sibling.timestamp.wall_ms.to_le_bytes());
        hasher.update(&sibling.timestamp.logical.to_le_bytes());
        match &sibling.value {
            Some(value) => hasher
                .update(&[1])
                .update(&(value.len() as u64).to_le_bytes()),
            None => hasher.update(&[0]),
        };
    }
    let mut first = [0u8; 8];
    first.copy_from_slice(&hasher.finalize().as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// Whether `set` is empty: no sibling and a context that covers nothing (what
/// an absent key reads as).
pub fn holds_nothing(set: &DvvSet) -> bool {
    set.siblings.is_empty() && set.context.vv.is_empty() && set.context.dots.is_empty()
}

/// The segment hashes of one partition.
pub type Segments = [u64; SEGMENTS];

/// The built trees of the partitions this node has exchanged.
#[derive(Debug, Default)]
pub struct HashTrees {
    trees: BTreeMap<u32, Box<Segments>>,
}

impl HashTrees {
    pub fn is_built(&self, partition: u32) -> bool {
        self.trees.contains_key(&partition)
    }

    /// Builds the tree of `partition` from every entry it stores.
    pub fn build<'a>(
        &mut self,
        partition: u32,
        entries: impl IntoIterator<Item = (&'a [u8], &'a DvvSet)>,
    ) -> &Segments {
        let mut segments = Box::new([0u64; SEGMENTS]);
        for (key, set) in entries {
            segments[segment_of(key)] ^= entry_hash(key, set);
        }
        self.trees.insert(partition, segments);
        &self.trees[&partition]
    }

    /// A write replaced `key`'s entry, whose hash was `old`, by one whose hash
    /// is `new`. Nothing to do while the partition's tree is not built: it
    /// will be built from the store, which will hold the write.
    pub fn update(&mut self, partition: u32, key: &[u8], old: u64, new: u64) {
        if let Some(segments) = self.trees.get_mut(&partition) {
            segments[segment_of(key)] ^= old ^ new;
        }
    }

    pub fn segments(&self, partition: u32) -> Option<&Segments> {
        self.trees.get(&partition).map(|s| &**s)
    }

    /// Sets segments of `partition`'s tree (if built) to the hashes a scan
    /// of them gave, which are the truth; returns how many were wrong.
    pub fn correct(&mut self, partition: u32, scanned: &[(u8, u64)]) -> usize {
        let Some(segments) = self.trees.get_mut(&partition) else {
            return 0;
        };
        let mut wrong = 0;
        for &(segment, hash) in scanned {
            let slot = &mut segments[usize::from(segment)];
            if *slot != hash {
                *slot = hash;
                wrong += 1;
            }
        }
        wrong
    }
}

/// The segments whose hashes differ between `ours` and `theirs`, at most
/// [`MAX_DIFF_SEGMENTS`] of them, the first at or after segment `from` and on
/// round the tree. `theirs` must hold [`SEGMENTS`] hashes.
pub fn differing(ours: &Segments, theirs: &[u64], from: usize) -> Vec<u8> {
    (0..SEGMENTS)
        .map(|i| (from + i) % SEGMENTS)
        .filter(|&i| ours[i] != theirs[i])
        .map(|i| i as u8)
        .take(MAX_DIFF_SEGMENTS)
        .collect()
}

/// Most pages a segment is split into (see [`shipment`]).
pub const MAX_PAGES: u32 = 1 << 16;

/// The page of a segment that `key` falls in when the segment is split into
/// `pages` (a power of two): bits of its ring hash above the segment's.
pub fn page_of(key: &[u8], pages: u32) -> u32 {
    ((Ring::key_hash(key) / SEGMENTS as u64) % u64::from(pages.max(1))) as u32
}

/// What one `AntiEntropyEntries` message carries: whole segments, or one page
/// of one segment (`pages` > 1).
#[derive(Debug, PartialEq)]
pub struct Shipment {
    pub segments: Vec<u8>,
    pub pages: u32,
    pub page: u32,
    pub entries: Vec<(Vec<u8>, DvvSet)>,
}

/// Picks what to ship of `entries` (every entry of `segments`): whole
/// segments, in the order of `segments`, while their estimated size fits in
/// `budget`; or, when the first alone does not fit, page `cursor % pages` of
/// it, with `pages` the power of two that brings an average page to half the
/// budget (pages vary with the keys' hashes; half leaves room).
pub fn shipment(
    segments: &[u8],
    entries: BTreeMap<Vec<u8>, DvvSet>,
    budget: usize,
    cursor: u32,
) -> Shipment {
    let (kept, shipped) = whole_segments(segments, entries, budget);
    let size: usize = shipped
        .iter()
        .map(|(key, set)| key.len() + set.estimated_bytes())
        .sum();
    if kept.len() != 1 || size <= budget {
        return Shipment {
            segments: kept,
            pages: 1,
            page: 0,
            entries: shipped,
        };
    }
    let wanted = (2 * size).div_ceil(budget.max(1));
    let pages = u32::try_from(wanted)
        .unwrap_or(MAX_PAGES)
        .next_power_of_two()
        .clamp(2, MAX_PAGES);
    let page = cursor % pages;
    Shipment {
        segments: kept,
        pages,
        page,
        entries: shipped
            .into_iter()
            .filter(|(key, _)| page_of(key, pages) == page)
            .collect(),
    }
}

/// Groups `entries` by segment and keeps whole segments, in the order of
/// `segments`, while their estimated size fits in `budget` (the first always
/// goes, however large). Returns the segments kept and their entries.
fn whole_segments(
    segments: &[u8],
    entries: BTreeMap<Vec<u8>, DvvSet>,
    budget: usize,
) -> (Vec<u8>, Vec<(Vec<u8>, DvvSet)>) {
    let mut by_segment: BTreeMap<u8, Vec<(Vec<u8>, DvvSet)>> = BTreeMap::new();
    for (key, set) in entries {
        by_segment
            .entry(segment_of(&key) as u8)
            .or_default()
            .push((key, set));
    }
    let (mut kept, mut shipped, mut used) = (Vec::new(), Vec::new(), 0usize);
    for &segment in segments {
        let group = by_segment.remove(&segment).unwrap_or_default();
        let size: usize = group
            .iter()
            .map(|(key, set)| key.len() + set.estimated_bytes())
            .sum();
        if !kept.is_empty() && used.saturating_add(size) > budget {
            break;
        }
        used = used.saturating_add(size);
        kept.push(segment);
        shipped.extend(group);
    }
    (kept, shipped)
}

/// The round robin of exchanges a node starts: pair number `cursor` is
/// partition `cursor / (n - 1)` of the partitions it is a primary of, with
/// the `cursor % (n - 1)`-th other primary, in a fixed order.
#[derive(Debug)]
pub struct Schedule {
    pub interval_ms: u64,
    /// When the next exchange starts (`None`: anti-entropy is off).
    pub next_at: Option<u64>,
    pub cursor: u64,
    /// Where this node's next answer starts looking for differing segments
    /// (see [`differing`]); it moves past the segments each answer ships.
    pub answer_from: usize,
    /// For each segment too large for one message, the page its next
    /// shipment takes (by partition and segment; dropped once it ships whole).
    pub next_page: BTreeMap<(u32, u8), u32>,
    /// The exchanges this node started and has not had answered, by peer
    /// and partition, with when they started.
    pub started: BTreeMap<(NodeId, u32), u64>,
    /// When this node last answered each peer's segment hashes: it answers a
    /// peer at most once per half interval, so a replica cannot make it scan
    /// partitions faster than its own schedule would.
    pub answered: BTreeMap<NodeId, u64>,
}

impl Schedule {
    /// A schedule whose first exchange is one interval after `now` (0: off).
    pub fn new(interval_ms: u64, now: u64) -> Schedule {
        Schedule {
            interval_ms,
            next_at: (interval_ms > 0).then(|| now + interval_ms),
            cursor: 0,
            answer_from: 0,
            next_page: BTreeMap::new(),
            started: BTreeMap::new(),
            answered: BTreeMap::new(),
        }
    }

    /// Whether anti-entropy runs on this node at all.
    pub fn is_on(&self) -> bool {
        self.interval_ms > 0
    }

    /// Notes an exchange started with `peer` on `partition` at `now`, and
    /// forgets those whose answers are overdue.
    pub fn note_started(&mut self, peer: &NodeId, partition: u32, now: u64) {
        self.started
            .retain(|_, at| now.saturating_sub(*at) <= EXCHANGE_TIMEOUT_MS);
        self.started.insert((peer.clone(), partition), now);
    }

    /// Whether an answer from `peer` on `partition` answers an exchange this
    /// node started (in time); the exchange is then done.
    pub fn take_started(&mut self, peer: &NodeId, partition: u32, now: u64) -> bool {
        self.started
            .remove(&(peer.clone(), partition))
            .is_some_and(|at| now.saturating_sub(at) <= EXCHANGE_TIMEOUT_MS)
    }

    /// Whether to answer `peer`'s segment hashes at `now` (at most once per
    /// half interval); if so, the answer is noted.
    pub fn may_answer(&mut self, peer: &NodeId, now: u64) -> bool {
        let gap = self.interval_ms / 2;
        match self.answered.get(peer) {
            // A clock that went back (`last` > `now`) does not silence a peer.
            Some(&last) if last <= now && now - last < gap => false,
            _ => {
                self.answered.insert(peer.clone(), now);
                true
            }
        }
    }

    /// Whether an exchange is due at `now`; if so, the next is armed one
    /// interval later.
    pub fn due(&mut self, now: u64) -> bool {
        match self.next_at {
            Some(at) if at <= now => {
                self.next_at = Some(now + self.interval_ms);
                true
            }
            // The clock went back: the next exchange is one interval away
            // again, not the size of the jump.
            Some(at) if at > now + self.interval_ms => {
                self.next_at = Some(now + self.interval_ms);
                false
            }
            _ => false,
        }
    }
}

/// How long an exchange this node started waits for its answer: an answer
/// later than this, or one for an exchange it never started, is merged but
/// not answered (answering costs a partition scan, which a peer must not be
/// able to ask for at will).
pub const EXCHANGE_TIMEOUT_MS: u64 = 10_000;

/// What anti-entropy has done on this node, for the shell's metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Exchanges this node started (segment hashes sent).
    pub exchanges: u64,
    /// Segments found to differ, on either side of an exchange.
    pub segments_differing: u64,
    /// Keys whose stored set an exchange changed here.
    pub keys_repaired: u64,
    /// Exchanges that could not run because this node could not read its
    /// store for the partition.
    pub read_failures: u64,
    /// Tree segments a scan found wrong and corrected (a bug if ever non-zero).
    pub segments_corrected: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use dynamo_proto::{Actor, Context, Hlc, Sibling};

    fn set(counter: u64, value: &str) -> DvvSet {
        let actor = Actor {
            incarnation: 7,
            epoch: 1,
        };
        let dot = Dot { actor, counter };
        let mut context = Context::default();
        context.vv.insert(actor, counter);
        let mut siblings = BTreeMap::new();
        siblings.insert(
            dot,
            Sibling {
                value: Some(value.as_bytes().to_vec()),
                timestamp: Hlc {
                    wall_ms: 1,
                    logical: 0,
                },
            },
        );
        DvvSet { context, siblings }
    }

    #[test]
    fn an_update_gives_the_tree_a_rebuild_would() {
        let a = set(1, "a");
        let b = set(2, "b");
        let mut trees = HashTrees::default();
        trees.build(3, [(&b"k1"[..], &a), (&b"k2"[..], &a)]);
        trees.update(3, b"k1", entry_hash(b"k1", &a), entry_hash(b"k1", &b));
        trees.update(3, b"k3", 0, entry_hash(b"k3", &b));
        let mut rebuilt = HashTrees::default();
        rebuilt.build(3, [(&b"k1"[..], &b), (&b"k2"[..], &a), (&b"k3"[..], &b)]);
        assert_eq!(trees.segments(3), rebuilt.segments(3));
        assert_ne!(trees.segments(3), Some(&[0u64; SEGMENTS]));
    }

    #[test]
    fn an_empty_set_hashes_as_an_absent_key_and_keys_dots_and_value_lengths_matter() {
        assert_eq!(entry_hash(b"k", &DvvSet::default()), 0);
        let base = entry_hash(b"k", &set(1, "a"));
        assert_ne!(base, 0);
        assert_eq!(base, entry_hash(b"k", &set(1, "a")));
        let others = [
            entry_hash(b"k", &set(2, "a")),
            entry_hash(b"k", &set(1, "ab")),
            entry_hash(b"j", &set(1, "a")),
        ];
        assert!(others.iter().all(|&h| h != base), "{others:?}");
    }

    #[test]
    fn whole_segments_go_while_they_fit_and_the_first_always_goes() {
        let keys: Vec<Vec<u8>> = (0..200).map(|i| format!("k{i}").into_bytes()).collect();
        let seg = |k: &[u8]| segment_of(k) as u8;
        let (a, b) = (
            seg(&keys[0]),
            (0..200)
                .map(|i| seg(&keys[i]))
                .find(|&s| s != seg(&keys[0]))
                .unwrap(),
        );
        let entries: BTreeMap<Vec<u8>, DvvSet> =
            keys.iter().map(|k| (k.clone(), set(1, "v"))).collect();
        let size_of = |s: u8| -> usize {
            entries
                .iter()
                .filter(|(k, _)| seg(k) == s)
                .map(|(k, set)| k.len() + set.estimated_bytes())
                .sum()
        };
        // Room for both: both go, whole.
        let (kept, shipped) = whole_segments(&[b, a], entries.clone(), usize::MAX);
        assert_eq!(kept, vec![b, a]);
        assert!(shipped.iter().all(|(k, _)| seg(k) == a || seg(k) == b));
        assert_eq!(
            shipped.len(),
            entries
                .keys()
                .filter(|k| seg(k) == a || seg(k) == b)
                .count()
        );
        // Room for the first only: the second waits, not half of it.
        let (kept, shipped) = whole_segments(&[b, a], entries.clone(), size_of(b) + size_of(a) - 1);
        assert_eq!(kept, vec![b]);
        assert!(shipped.iter().all(|(k, _)| seg(k) == b));
        // No room at all: whole_segments still takes the first, and a
        // shipment takes a page of it, each page in turn as the cursor moves.
        let (kept, shipped) = whole_segments(&[a], entries.clone(), 0);
        assert_eq!(kept, vec![a]);
        assert_eq!(
            shipped.len(),
            entries.keys().filter(|k| seg(k) == a).count()
        );
        assert_eq!(
            shipment(&[b, a], entries.clone(), usize::MAX, 7).pages,
            1,
            "what fits goes whole"
        );
        let budget = size_of(a) / 3;
        let mut seen = Vec::new();
        let first = shipment(&[a, b], entries.clone(), budget, 0);
        assert_eq!(first.segments, vec![a]);
        assert!(
            first.pages >= 6 && first.pages.is_power_of_two(),
            "{}",
            first.pages
        );
        for cursor in 0..first.pages {
            let s = shipment(&[a, b], entries.clone(), budget, cursor);
            assert_eq!(
                (s.segments.clone(), s.pages, s.page),
                (vec![a], first.pages, cursor)
            );
            assert!(s
                .entries
                .iter()
                .all(|(k, _)| seg(k) == a && page_of(k, s.pages) == cursor));
            seen.extend(s.entries.into_iter().map(|(k, _)| k));
        }
        seen.sort();
        let all_of_a: Vec<Vec<u8>> = entries.keys().filter(|k| seg(k) == a).cloned().collect();
        assert_eq!(seen, all_of_a, "the pages cover the segment once");
    }

    #[test]
    fn a_scan_corrects_a_wrong_segment() {
        let mut trees = HashTrees::default();
        trees.build(2, [(&b"k1"[..], &set(1, "a"))]);
        let truth = trees.segments(2).unwrap()[segment_of(b"k1")];
        trees.update(2, b"k1", 0, 99);
        let s = segment_of(b"k1") as u8;
        assert_eq!(trees.correct(2, &[(s, truth)]), 1);
        assert_eq!(trees.segments(2).unwrap()[usize::from(s)], truth);
        assert_eq!(trees.correct(2, &[(s, truth)]), 0);
        assert_eq!(trees.correct(7, &[(s, truth)]), 0);
    }

    #[test]
    fn answers_are_taken_only_for_exchanges_started_in_time_and_given_once_per_half_interval() {
        let mut s = Schedule::new(100, 0);
        let (a, b) = (NodeId::from("a"), NodeId::from("b"));
        s.note_started(&a, 3, 1_000);
        assert!(!s.take_started(&b, 3, 1_001));
        assert!(!s.take_started(&a, 4, 1_001));
        assert!(s.take_started(&a, 3, 1_001));
        assert!(!s.take_started(&a, 3, 1_002), "answered once");
        s.note_started(&a, 5, 2_000);
        assert!(!s.take_started(&a, 5, 2_000 + EXCHANGE_TIMEOUT_MS + 1));
        s.note_started(&a, 6, 3_000);
        s.note_started(&b, 6, 3_000 + EXCHANGE_TIMEOUT_MS + 1);
        assert_eq!(s.started.len(), 1, "the overdue one is forgotten");
        assert!(s.may_answer(&a, 5_000));
        assert!(!s.may_answer(&a, 5_049));
        assert!(s.may_answer(&b, 5_049));
        assert!(s.may_answer(&a, 5_050));
        assert!(s.may_answer(&a, 4_000), "a clock that went back");
    }

    #[test]
    fn updates_to_an_unbuilt_partition_are_ignored() {
        let mut trees = HashTrees::default();
        trees.update(1, b"k", 0, 42);
        assert!(!trees.is_built(1));
        assert_eq!(trees.segments(1), None);
    }

    #[test]
    fn differing_names_the_first_segments_that_differ_up_to_the_cap() {
        let ours = [0u64; SEGMENTS];
        let mut theirs = [0u64; SEGMENTS];
        assert!(differing(&ours, &theirs, 0).is_empty());
        theirs[5] = 1;
        theirs[63] = 9;
        assert_eq!(differing(&ours, &theirs, 0), vec![5, 63]);
        assert_eq!(differing(&ours, &theirs, 6), vec![63, 5]);
        let all = [1u64; SEGMENTS];
        let first: Vec<u8> = (0..MAX_DIFF_SEGMENTS as u8).collect();
        assert_eq!(differing(&ours, &all, 0), first);
        let wrapped: Vec<u8> = (60..64).chain(0..12).collect();
        assert_eq!(differing(&ours, &all, 60), wrapped);
    }

    #[test]
    fn the_schedule_fires_once_per_interval_and_never_when_off() {
        let mut s = Schedule::new(100, 1_000);
        assert!(!s.due(1_099));
        assert!(s.due(1_100));
        assert!(!s.due(1_150));
        assert!(s.due(1_250));
        assert_eq!(s.next_at, Some(1_350));
        assert!(!s.due(900), "the clock went back");
        assert_eq!(s.next_at, Some(1_000));
        let mut off = Schedule::new(0, 1_000);
        assert_eq!(off.next_at, None);
        assert!(!off.due(u64::MAX));
    }
}
