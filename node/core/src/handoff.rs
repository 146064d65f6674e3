//! Hinted handoff: the writes a fallback keeps for a primary that looked down.
//!
//! When a coordinator finds a primary of a key unreachable, it sends the write
//! to the next healthy node of the preference list instead, as a hint naming
//! the primary (the owner). The fallback merges it into its hint for (owner,
//! key), persists it, and acknowledges; under a sloppy quorum that
//! acknowledgement counts towards W. Hints live in storage under the reserved
//! partition [`HINT_PARTITION`] (the owner's name, then the key), so they
//! survive a crash like any write; this module keeps the index of which hints
//! exist and when to try handing them off. Every handoff interval a node sends
//! each reachable owner its hints as ordinary `Replicate`s, and removes a hint
//! once its owner has persisted what was sent (a hint that changed meanwhile
//! is kept and sent again). This module owns that bookkeeping; it never
//! decides who is a primary or reads storage.

use crate::node::Millis;
use dynamo_proto::NodeId;
use std::collections::{BTreeMap, BTreeSet};

/// The storage partition hints are kept under: past any ring's partitions
/// (Q is at most 2^31), so no scan, tree or transfer of data sees them.
pub const HINT_PARTITION: u32 = u32::MAX;

/// How often a node tries to hand its hints to their owners.
pub const DEFAULT_HANDOFF_INTERVAL_MS: Millis = 1_000;

/// Hints a node keeps at most (keys, over all owners): past it, it refuses
/// new ones (the coordinator counts the refusal as a failed replica), so a
/// long outage cannot fill a fallback's disk. Anti-entropy repairs what a
/// refused hint would have carried.
pub const DEFAULT_MAX_HINTS: usize = 100_000;

/// Hints in flight to one owner at once: a returning node is not flooded,
/// and the rest go at the next interval.
pub const MAX_IN_FLIGHT_PER_OWNER: usize = 128;

/// The storage key of the hint for `owner` of `key`: the owner's name, its
/// length first (two bytes, big-endian), then the key.
pub fn hint_key(owner: &NodeId, key: &[u8]) -> Vec<u8> {
    let name = owner.0.as_bytes();
    let len = u16::try_from(name.len()).unwrap_or(u16::MAX);
    let mut out = Vec::with_capacity(2 + name.len() + key.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&name[..usize::from(len)]);
    out.extend_from_slice(key);
    out
}

/// The owner and key of a hint's storage key; `None` when it is not one
/// [`hint_key`] makes.
pub fn split_hint_key(stored: &[u8]) -> Option<(NodeId, &[u8])> {
    let (len, rest) = stored.split_first_chunk::<2>()?;
    let len = usize::from(u16::from_be_bytes(*len));
    if rest.len() < len {
        return None;
    }
    let (name, key) = rest.split_at(len);
    let name = std::str::from_utf8(name).ok()?;
    if key.is_empty() {
        return None;
    }
    Some((NodeId::from(name), key))
}

/// What hinted handoff has done on this node (counters since it started, and
/// the hints it holds now).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Hints held now, over all owners.
    pub held: u64,
    /// Hints this node took as a fallback (handed to storage; the
    /// acknowledgement waits for the write to be durable).
    pub accepted: u64,
    /// Hints refused: the bound was reached, or the hint came from or named a
    /// node that is not a primary of the key here. (A hint whose set is
    /// malformed is refused before, like any replication, and not counted.)
    pub refused: u64,
    /// Hints handed off: their owner persisted them and they were removed.
    pub delivered: u64,
}

/// The index of the hints a node holds, by owner, and the handoff timer. The
/// timer runs only while a round has work: hints whose owner is connected.
#[derive(Debug)]
pub struct Hints {
    by_owner: BTreeMap<NodeId, BTreeSet<Vec<u8>>>,
    /// Keys sent to their owner and not yet acknowledged or timed out.
    in_flight: BTreeMap<NodeId, BTreeSet<Vec<u8>>>,
    count: usize,
    interval_ms: Millis,
    /// When the next handoff round is due (only while there are hints, or the
    /// stored ones could not be listed yet).
    next_at: Option<Millis>,
    /// The stored hints could not be listed at start: list them at the next
    /// round.
    pub unlisted: bool,
}

impl Hints {
    pub fn new(interval_ms: Millis) -> Hints {
        Hints {
            by_owner: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            count: 0,
            interval_ms: interval_ms.max(1),
            next_at: None,
            unlisted: false,
        }
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn has_owner(&self, owner: &NodeId) -> bool {
        self.by_owner.contains_key(owner)
    }

    pub fn contains(&self, owner: &NodeId, key: &[u8]) -> bool {
        self.by_owner
            .get(owner)
            .is_some_and(|keys| keys.contains(key))
    }

    /// Records a hint; true when it is new.
    pub fn insert(&mut self, owner: &NodeId, key: &[u8]) -> bool {
        let new = self
            .by_owner
            .entry(owner.clone())
            .or_default()
            .insert(key.to_vec());
        if new {
            self.count += 1;
        }
        new
    }

    /// Forgets a hint (handed off, or found missing in storage).
    pub fn remove(&mut self, owner: &NodeId, key: &[u8]) {
        self.landed(owner, key);
        if let Some(keys) = self.by_owner.get_mut(owner) {
            if keys.remove(key) {
                self.count -= 1;
            }
            if keys.is_empty() {
                self.by_owner.remove(owner);
            }
        }
    }

    /// The owner answered for (or never got) the hint sent for `key`.
    pub fn landed(&mut self, owner: &NodeId, key: &[u8]) {
        if let Some(keys) = self.in_flight.get_mut(owner) {
            keys.remove(key);
            if keys.is_empty() {
                self.in_flight.remove(owner);
            }
        }
    }

    /// Up to `limit` hints of `owner` not in flight, in key order, now
    /// marked in flight.
    pub fn take_to_send(&mut self, owner: &NodeId) -> Vec<Vec<u8>> {
        let Some(keys) = self.by_owner.get(owner) else {
            return Vec::new();
        };
        let flying = self.in_flight.entry(owner.clone()).or_default();
        let room = MAX_IN_FLIGHT_PER_OWNER.saturating_sub(flying.len());
        let picked: Vec<Vec<u8>> = keys
            .iter()
            .filter(|k| !flying.contains(*k))
            .take(room)
            .cloned()
            .collect();
        flying.extend(picked.iter().cloned());
        if flying.is_empty() {
            self.in_flight.remove(owner);
        }
        picked
    }

    /// The owners with hints, in name order.
    pub fn owners(&self) -> Vec<NodeId> {
        self.by_owner.keys().cloned().collect()
    }

    /// Arms the timer for a round one interval from `now`, unless one is due
    /// sooner.
    pub fn arm(&mut self, now: Millis) {
        let at = now.saturating_add(self.interval_ms);
        self.next_at = Some(self.next_at.map_or(at, |next| next.min(at)));
    }

    /// Arms the timer to fire at the next timeout, whatever the time.
    pub fn arm_now(&mut self) {
        self.next_at = Some(0);
    }

    pub fn next_at(&self) -> Option<Millis> {
        self.next_at
    }

    /// True when a round is due at `now`; the timer is then disarmed (the
    /// round re-arms it while hints remain). A clock that went back more than
    /// an interval does not hold the round back.
    pub fn due(&mut self, now: Millis) -> bool {
        match self.next_at {
            Some(at) if now >= at || at > now.saturating_add(self.interval_ms) => {
                self.next_at = None;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hint_keys_round_trip_and_refuse_garbage() {
        let owner = NodeId::from("n2");
        let stored = hint_key(&owner, b"k\x00ey");
        assert_eq!(split_hint_key(&stored), Some((owner, &b"k\x00ey"[..])));
        assert_eq!(split_hint_key(b""), None);
        assert_eq!(split_hint_key(&[0, 9, b'a']), None);
        // An owner with no key after it is not a hint.
        assert_eq!(split_hint_key(&hint_key(&NodeId::from("n2"), b"")), None);
        assert_eq!(split_hint_key(&[0, 1, 0xff, b'k']), None);
    }

    #[test]
    fn index_counts_and_limits_what_is_in_flight() {
        let mut hints = Hints::new(1_000);
        let owner = NodeId::from("n2");
        for i in 0..(MAX_IN_FLIGHT_PER_OWNER + 5) {
            assert!(hints.insert(&owner, format!("k{i:04}").as_bytes()));
        }
        assert!(!hints.insert(&owner, b"k0000"));
        assert_eq!(hints.len(), MAX_IN_FLIGHT_PER_OWNER + 5);
        let first = hints.take_to_send(&owner);
        assert_eq!(first.len(), MAX_IN_FLIGHT_PER_OWNER);
        assert!(hints.take_to_send(&owner).is_empty());
        hints.remove(&owner, &first[0]);
        hints.landed(&owner, &first[1]);
        // Two slots came free: the first five not yet sent fill them.
        let second = hints.take_to_send(&owner);
        assert_eq!(second.len(), 2);
        assert_eq!(second[0], first[1]);
        assert_eq!(hints.len(), MAX_IN_FLIGHT_PER_OWNER + 4);
    }

    #[test]
    fn timer_fires_once_per_arming_and_survives_a_clock_going_back() {
        let mut hints = Hints::new(1_000);
        assert!(!hints.due(5_000));
        hints.arm(5_000);
        assert!(!hints.due(5_999));
        assert!(hints.due(6_000));
        assert!(!hints.due(7_000));
        hints.arm(10_000);
        // The clock jumped back by far more than an interval.
        assert!(hints.due(2_000));
    }
}
