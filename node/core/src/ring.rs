//! The ring: how the key space is cut into partitions, which node claims which
//! partition, and the preference list of every key.
//!
//! This is the paper's strategy 3 as Riak does it: a fixed number Q of equal
//! partitions (a power of two, set at cluster creation) claimed by the S member
//! nodes, with replication factor N. A [`Ring`] is a plain value with a version;
//! gossip moves rings around and this module only computes them.
//!
//! This module must never do I/O, read a clock, draw randomness or iterate a
//! hash-ordered collection: every node computes the same ring from the same
//! inputs, so claims break every tie by node id and partition index.
//!
//! Membership is "owns at least one partition": when Q < S a fresh claim leaves
//! some nodes without a partition, and those nodes are not members of the ring.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use dynamo_proto::NodeId;
use serde::{Deserialize, Serialize};

/// The partition count a cluster gets unless its operator picks another.
pub const DEFAULT_PARTITIONS: u32 = 256;

/// The owner of every partition, plus a version that grows with every change.
///
/// Partition `p` covers the ring positions (64-bit key hashes) whose top
/// log2(Q) bits equal `p`; `owners[p]` owns it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ring {
    version: u64,
    owners: Vec<NodeId>,
}

/// Why a ring could not be built or changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error("partition count {0} is not a power of two >= 1; pick one such as 64, 256 or 1024")]
    BadPartitionCount(u64),
    #[error("a ring needs at least one node; pass the ids of the nodes that claim it")]
    NoNodes,
    #[error("node {0} is listed more than once; node ids must be unique in a cluster")]
    DuplicateNode(NodeId),
    #[error("node {0} is not a member of the ring; check the node id")]
    UnknownNode(NodeId),
    #[error("node {0} is the last member and cannot leave; add another node first")]
    LastNodeCannotLeave(NodeId),
    #[error("node {0} is already a member of the ring; it need not join again")]
    AlreadyMember(NodeId),
}

/// Whether a preference-list entry is one of the key's N primaries or a
/// fallback that stands in (sloppy quorum) for a primary that is down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Primary,
    Fallback,
}

/// One node of a key's preference list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrefEntry {
    pub node: NodeId,
    pub role: Role,
}

/// Marks a partition with no owner while a claim is being rebalanced (the
/// partitions of a leaving node). It counts as distinct from every node.
const UNOWNED: usize = usize::MAX;

impl Ring {
    /// Fresh claim for these nodes (any order; the result does not depend on the
    /// order given).
    ///
    /// Every node owns floor(Q/S) or ceil(Q/S) partitions. When S >= N and S
    /// divides Q, any N consecutive partitions have N distinct owners; otherwise
    /// the claim keeps the windows that do not as few as it can. The ring starts
    /// at version 1.
    pub fn claim(q: u32, nodes: &[NodeId], target_n: usize) -> Result<Ring, RingError> {
        check_partition_count(q as u64)?;
        if nodes.is_empty() {
            return Err(RingError::NoNodes);
        }
        let mut sorted: Vec<NodeId> = nodes.to_vec();
        sorted.sort();
        if let Some(pair) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(RingError::DuplicateNode(pair[0].clone()));
        }
        let layout = fresh_layout(q as usize, sorted.len(), target_n);
        let owners = layout.into_iter().map(|i| sorted[i].clone()).collect();
        Ok(Ring { version: 1, owners })
    }

    /// A new ring (version + 1) with `node` joined, moving close to the minimum
    /// number of partitions.
    ///
    /// The new node takes floor(Q/(S+1)) partitions (or one more when the
    /// balance needs it) from the nodes with the most, preferring partitions
    /// whose taking creates no target-N violation and that lie far from its other
    /// partitions.
    pub fn with_node_added(&self, node: NodeId, target_n: usize) -> Result<Ring, RingError> {
        let mut nodes: Vec<NodeId> = self.members().into_iter().collect();
        if nodes.binary_search(&node).is_ok() {
            return Err(RingError::AlreadyMember(node));
        }
        nodes.push(node);
        nodes.sort();
        let owner = self.indices_in(&nodes);
        let owner = rebalance(owner, nodes.len(), target_n);
        Ok(self.successor(&nodes, owner))
    }

    /// A new ring (version + 1) without `node`; its partitions go to the others
    /// (each to a node with the fewest that creates no target-N violation where
    /// one exists). No other partition moves unless the ring was out of balance.
    pub fn with_node_removed(&self, node: &NodeId, target_n: usize) -> Result<Ring, RingError> {
        let mut nodes: Vec<NodeId> = self.members().into_iter().collect();
        let Ok(leaving) = nodes.binary_search(node) else {
            return Err(RingError::UnknownNode(node.clone()));
        };
        if nodes.len() == 1 {
            return Err(RingError::LastNodeCannotLeave(node.clone()));
        }
        nodes.remove(leaving);
        let owner = self
            .owners
            .iter()
            .map(|o| nodes.binary_search(o).unwrap_or(UNOWNED))
            .collect();
        let owner = rebalance(owner, nodes.len(), target_n);
        Ok(self.successor(&nodes, owner))
    }

    /// A ring as stored or received: `owners[p]` owns partition `p`. The number
    /// of owners must be a power of two >= 1.
    pub fn from_parts(version: u64, owners: Vec<NodeId>) -> Result<Ring, RingError> {
        check_partition_count(owners.len() as u64)?;
        Ok(Ring { version, owners })
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// Q, the number of partitions.
    pub fn partition_count(&self) -> u32 {
        self.owners.len() as u32
    }

    /// The owner of every partition, indexed by partition.
    pub fn owners(&self) -> &[NodeId] {
        &self.owners
    }

    /// The owner of `partition`. Panics when `partition >= Q`.
    pub fn owner(&self, partition: u32) -> &NodeId {
        &self.owners[partition as usize]
    }

    /// The nodes that own at least one partition.
    pub fn members(&self) -> BTreeSet<NodeId> {
        self.owners.iter().cloned().collect()
    }

    /// The partitions `node` owns, ascending.
    pub fn partitions_of(&self, node: &NodeId) -> Vec<u32> {
        (0..self.partition_count())
            .filter(|&p| self.owner(p) == node)
            .collect()
    }

    /// blake3 of the key, first 8 bytes as a big-endian u64 (the ring position).
    pub fn key_hash(key: &[u8]) -> u64 {
        let hash = blake3::hash(key);
        let mut first = [0u8; 8];
        first.copy_from_slice(&hash.as_bytes()[..8]);
        u64::from_be_bytes(first)
    }

    /// Partition = the top log2(Q) bits of the hash.
    pub fn partition_of_hash(&self, hash: u64) -> u32 {
        let bits = self.partition_count().trailing_zeros();
        if bits == 0 {
            0
        } else {
            (hash >> (64 - bits)) as u32
        }
    }

    pub fn partition_for_key(&self, key: &[u8]) -> u32 {
        self.partition_of_hash(Self::key_hash(key))
    }

    /// The first min(n, S) distinct owners walking clockwise from `partition`
    /// (partitions whose owner is already listed are skipped).
    pub fn primaries(&self, partition: u32, n: usize) -> Vec<NodeId> {
        let mut found: Vec<NodeId> = Vec::with_capacity(n);
        if n == 0 {
            return found;
        }
        for owner in self.clockwise_from(partition) {
            if !found.contains(owner) {
                found.push(owner.clone());
                if found.len() == n {
                    break;
                }
            }
        }
        found
    }

    /// The primaries (all marked Primary, whether up or not), then every other
    /// member that `is_up` says is up, in clockwise ring order of first
    /// appearance, marked Fallback.
    pub fn preference_list(
        &self,
        key: &[u8],
        n: usize,
        is_up: impl Fn(&NodeId) -> bool,
    ) -> Vec<PrefEntry> {
        let partition = self.partition_for_key(key);
        let primaries = self.primaries(partition, n);
        let mut seen: BTreeSet<&NodeId> = primaries.iter().collect();
        let mut list: Vec<PrefEntry> = primaries
            .iter()
            .map(|node| PrefEntry {
                node: node.clone(),
                role: Role::Primary,
            })
            .collect();
        for owner in self.clockwise_from(partition) {
            if seen.insert(owner) && is_up(owner) {
                list.push(PrefEntry {
                    node: owner.clone(),
                    role: Role::Fallback,
                });
            }
        }
        list
    }

    /// Number of windows of n consecutive partitions (cyclically, Q windows in
    /// all) whose owners are not n distinct nodes (Riak's target_n_val
    /// violations). 0 when n <= 1; Q (every window) when the ring has fewer than
    /// n members.
    pub fn target_n_violations(&self, n: usize) -> usize {
        if n <= 1 {
            return 0;
        }
        let nodes: Vec<NodeId> = self.members().into_iter().collect();
        if nodes.len() < n {
            return self.owners.len();
        }
        count_violations(&self.indices_in(&nodes), n)
    }

    /// For each member: how many partitions' primaries (n of them) include it.
    pub fn replica_load(&self, n: usize) -> BTreeMap<NodeId, usize> {
        let mut load: BTreeMap<NodeId, usize> =
            self.members().into_iter().map(|node| (node, 0)).collect();
        for p in 0..self.partition_count() {
            for node in self.primaries(p, n) {
                *load.entry(node).or_default() += 1;
            }
        }
        load
    }

    /// How many partitions have a different owner in `other`. Rings of different
    /// partition counts share no partition, so then every partition counts.
    pub fn moved_partitions(&self, other: &Ring) -> usize {
        if self.owners.len() != other.owners.len() {
            return self.owners.len().max(other.owners.len());
        }
        self.owners
            .iter()
            .zip(&other.owners)
            .filter(|(a, b)| a != b)
            .count()
    }

    /// The owners of all Q partitions, starting at `partition` and going clockwise.
    fn clockwise_from(&self, partition: u32) -> impl Iterator<Item = &NodeId> {
        let start = partition as usize % self.owners.len();
        self.owners[start..].iter().chain(&self.owners[..start])
    }

    /// Each owner as an index into `nodes` (sorted), or UNOWNED when absent.
    fn indices_in(&self, nodes: &[NodeId]) -> Vec<usize> {
        self.owners
            .iter()
            .map(|o| nodes.binary_search(o).unwrap_or(UNOWNED))
            .collect()
    }

    /// The next version of this ring, with owners given as indices into `nodes`.
    fn successor(&self, nodes: &[NodeId], owner: Vec<usize>) -> Ring {
        Ring {
            version: self.version + 1,
            owners: owner.into_iter().map(|i| nodes[i].clone()).collect(),
        }
    }
}

fn check_partition_count(q: u64) -> Result<(), RingError> {
    if q.is_power_of_two() && q <= 1 << 31 {
        Ok(())
    } else {
        Err(RingError::BadPartitionCount(q))
    }
}

/// Whether the n partitions from `start` (cyclically) have n distinct owners.
/// Unowned partitions count as distinct from everything.
fn window_ok(owner: &[usize], start: usize, n: usize) -> bool {
    window_ok_patched(owner, start, n, None)
}

/// `window_ok` as if partition `patch.0` were owned by node `patch.1`.
fn window_ok_patched(
    owner: &[usize],
    start: usize,
    n: usize,
    patch: Option<(usize, usize)>,
) -> bool {
    let q = owner.len();
    if n > q {
        return false;
    }
    let at = |i: usize| {
        let p = (start + i) % q;
        match patch {
            Some((patched, x)) if patched == p => x,
            _ => owner[p],
        }
    };
    for i in 1..n {
        let a = at(i);
        if a == UNOWNED {
            continue;
        }
        if (0..i).any(|j| at(j) == a) {
            return false;
        }
    }
    true
}

fn count_violations(owner: &[usize], n: usize) -> usize {
    if n <= 1 {
        return 0;
    }
    (0..owner.len())
        .filter(|&s| !window_ok(owner, s, n))
        .count()
}

/// The layout of a fresh claim of q partitions by s nodes (indices 0..s in
/// sorted id order): the candidate with the fewest target-n violations, ties
/// going to the earlier candidate. Every candidate gives each node floor(q/s)
/// or ceil(q/s) partitions, the first q % s nodes the larger count.
fn fresh_layout(q: usize, s: usize, n: usize) -> Vec<usize> {
    let round_robin: Vec<usize> = (0..q).map(|p| p % s).collect();
    if q / s * s == q || s < n {
        // Round robin is perfect when s divides q; with s < n nothing helps.
        return round_robin;
    }
    let mut candidates = vec![round_robin];
    candidates.extend(skip_walk_structured(q, s));
    candidates.push(skip_walk_spread(q, s));
    let mut best = 0;
    let mut best_violations = usize::MAX;
    for (i, candidate) in candidates.iter().enumerate() {
        let violations = count_violations(candidate, n);
        if violations < best_violations {
            best = i;
            best_violations = violations;
        }
    }
    candidates.swap_remove(best)
}

/// The skip walk: go round the sorted nodes k + 1 times (k = q / s) and leave
/// out m = s - q % s of those k + 1 visits, each of a different node. A window
/// of n partitions then has n distinct owners as long as it spans fewer than
/// s - n + 1 left-out visits, so spreading them out avoids violations where
/// round robin (which has all its slack at the wrap) cannot.
fn walk_without(q: usize, s: usize, omitted: &BTreeSet<usize>) -> Vec<usize> {
    let walk_len = (q / s + 1) * s;
    let layout: Vec<usize> = (0..walk_len)
        .filter(|x| !omitted.contains(x))
        .map(|x| x % s)
        .collect();
    debug_assert_eq!(layout.len(), q);
    layout
}

/// The skip walk that leaves out nodes s-1, s-2, ... (the last m) in evenly
/// spread rounds; only defined when there are at least as many rounds as
/// left-out visits. Consecutive left-out visits are then at least s - 1 walk
/// steps apart, so with s > n no window of n partitions spans two of them: zero
/// violations.
fn skip_walk_structured(q: usize, s: usize) -> Option<Vec<usize>> {
    let rounds = q / s + 1;
    let m = s - q % s;
    if m > rounds {
        return None;
    }
    let omitted = (0..m).map(|j| (j * rounds / m) * s + (s - 1 - j)).collect();
    Some(walk_without(q, s, &omitted))
}

/// The skip walk whose left-out visits sit as near as possible to m evenly
/// spread walk positions, each of a node not yet left out.
fn skip_walk_spread(q: usize, s: usize) -> Vec<usize> {
    let walk_len = (q / s + 1) * s;
    let m = s - q % s;
    let mut omitted = BTreeSet::new();
    let mut node_used = vec![false; s];
    for j in 0..m {
        let ideal = (2 * j + 1) * walk_len / (2 * m);
        let free = |x: usize| !omitted.contains(&x) && !node_used[x % s];
        let chosen = (0..walk_len)
            .flat_map(|d| [ideal + d, ideal + walk_len - d])
            .map(|x| x % walk_len)
            .find(|&x| free(x))
            .expect("fewer left-out visits than nodes");
        omitted.insert(chosen);
        node_used[chosen % s] = true;
    }
    walk_without(q, s, &omitted)
}

/// Moves partitions until every one of the `s` nodes owns floor(q/s) or
/// ceil(q/s), moving as few as that allows: the nodes that own the most keep
/// the larger count, and only partitions above a node's target (or unowned
/// ones) move.
///
/// Each move is chosen greedily, like Riak's claim_v2: first the fewest new
/// target-n violations, then the partition farthest from the receiver's other
/// partitions (which spreads a new node's partitions round the ring and keeps
/// replica load even), then the receiver that lacks the most, the donor that
/// has the most extra, the lowest partition and the lowest node id.
fn rebalance(mut owner: Vec<usize>, s: usize, n: usize) -> Vec<usize> {
    let q = owner.len();
    let original = owner.clone();
    let mut count = vec![0usize; s];
    let mut positions: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); s];
    for (p, &o) in owner.iter().enumerate() {
        if o != UNOWNED {
            count[o] += 1;
            positions[o].insert(p);
        }
    }
    // The targets say who must give partitions up (the fewest moves); who
    // receives is left open: any node below floor(q/s), or at it while more
    // partitions are to be placed than the nodes below it need.
    let target = balanced_targets(&count, q);
    let floor = q / s;
    let mut give: Vec<usize> = (0..s).map(|x| count[x].saturating_sub(target[x])).collect();
    let surplus = |give: &[usize], o: usize| -> usize {
        if o == UNOWNED {
            usize::MAX
        } else {
            give[o]
        }
    };
    let mut to_place = owner.iter().filter(|&&o| o == UNOWNED).count() + give.iter().sum::<usize>();
    while to_place > 0 {
        let needed: usize = (0..s).map(|x| floor.saturating_sub(count[x])).sum();
        let receivers: Vec<usize> = (0..s)
            .filter(|&x| count[x] < floor || (count[x] == floor && to_place > needed))
            .filter(|&x| give[x] == 0)
            .collect();
        // (violation delta, Reverse(distance), Reverse(need), Reverse(surplus)),
        // then the lowest partition and node index.
        type Key = (isize, Reverse<usize>, Reverse<usize>, Reverse<usize>);
        let mut best: Option<(Key, usize, usize)> = None;
        for p in 0..q {
            let donor_surplus = surplus(&give, owner[p]);
            if donor_surplus == 0 {
                continue;
            }
            let before = violations_around(&owner, p, n, None);
            for &x in &receivers {
                let after = violations_around(&owner, p, n, Some((p, x)));
                let key = (
                    after as isize - before as isize,
                    Reverse(distance_to(&positions[x], p, q)),
                    Reverse(floor + 1 - count[x]),
                    Reverse(donor_surplus),
                );
                if best.as_ref().is_none_or(|(k, _, _)| key < *k) {
                    best = Some((key, p, x));
                }
            }
        }
        let (_, p, x) = best.expect("a receiver lacks partitions, so a donor has extra");
        let from = owner[p];
        if from != UNOWNED {
            give[from] -= 1;
            count[from] -= 1;
            positions[from].remove(&p);
        }
        owner[p] = x;
        count[x] += 1;
        positions[x].insert(p);
        to_place -= 1;
    }
    let moved = moved_count(&original, &owner);
    let max_moved = moved + moved / 2 + n;
    improve_by_swaps(&mut owner, &original, n, max_moved);
    spread_replica_load(&mut owner, &original, s, n, max_moved);
    owner
}

/// The primaries of partition p (pushed onto `found`) and how many partitions
/// the walk took to find them.
fn walk_primaries(owner: &[usize], p: usize, n: usize, found: &mut Vec<usize>) -> usize {
    let q = owner.len();
    found.clear();
    for i in 0..q {
        let o = owner[(p + i) % q];
        if o != UNOWNED && !found.contains(&o) {
            found.push(o);
            if found.len() == n {
                return i + 1;
            }
        }
    }
    q
}

/// While some node carries more than 1.1 times the mean replica load plus n
/// (balanced counts alone can make the largest load n more than the mean), swaps
/// one of its partitions with another node's, as long as that adds no
/// violation and keeps within `max_moved`. Violations left by a minimal leave
/// from a small cluster can otherwise pile load on the node that follows them.
fn spread_replica_load(
    owner: &mut [usize],
    original: &[usize],
    s: usize,
    n: usize,
    max_moved: usize,
) {
    let q = owner.len();
    if n <= 1 || n > q || s < 2 {
        return;
    }
    let mut moved = moved_count(original, owner);
    let score = |load: &[usize]| {
        let max = load.iter().copied().max().unwrap_or(0);
        (max, load.iter().filter(|&&l| l == max).count())
    };
    let mut found = Vec::with_capacity(n);
    loop {
        let mut load = vec![0usize; s];
        let mut walk_len = vec![0usize; q];
        for (p, len) in walk_len.iter_mut().enumerate() {
            *len = walk_primaries(owner, p, n, &mut found);
            for &o in &found {
                load[o] += 1;
            }
        }
        let longest = walk_len.iter().copied().max().unwrap_or(0);
        let total: usize = load.iter().sum();
        let current = score(&load);
        if current.0 * 10 * s <= 11 * total + 10 * n * s {
            return;
        }
        let heavy: Vec<usize> = (0..q).filter(|&a| load[owner[a]] == current.0).collect();
        // (max load and how many carry it, violation delta, cost)
        type Key = ((usize, usize), isize, isize);
        let mut best: Option<(Key, usize, usize)> = None;
        for a in heavy {
            for b in 0..q {
                if owner[a] == owner[b] {
                    continue;
                }
                let cost = swap_cost(original, owner, a, b);
                if moved as isize + cost > max_moved as isize {
                    continue;
                }
                let delta = swap_violation_delta(owner, a, b, n);
                if delta > 0 {
                    continue;
                }
                // Only partitions whose walk reaches a or b see their primaries change.
                let mut affected: Vec<usize> = (0..longest.min(q))
                    .flat_map(|back| [(a + q - back) % q, (b + q - back) % q])
                    .filter(|&p| (a + q - p) % q < walk_len[p] || (b + q - p) % q < walk_len[p])
                    .collect();
                affected.sort_unstable();
                affected.dedup();
                let mut new_load = load.clone();
                for &p in &affected {
                    walk_primaries(owner, p, n, &mut found);
                    for &o in &found {
                        new_load[o] -= 1;
                    }
                }
                owner.swap(a, b);
                for &p in &affected {
                    walk_primaries(owner, p, n, &mut found);
                    for &o in &found {
                        new_load[o] += 1;
                    }
                }
                owner.swap(a, b);
                let key = (score(&new_load), delta, cost);
                if key.0 < current && best.as_ref().is_none_or(|(k, _, _)| key < *k) {
                    best = Some((key, a, b));
                }
            }
        }
        let Some(((_, _, cost), a, b)) = best else {
            return;
        };
        owner.swap(a, b);
        moved = (moved as isize + cost) as usize;
    }
}

/// Whether node x owns a partition other than p and `except` within n - 1 of p.
fn near(owner: &[usize], p: usize, x: usize, n: usize, except: usize) -> bool {
    let q = owner.len();
    (1..n).any(|d| {
        let (after, before) = ((p + d) % q, (p + q - d) % q);
        (after != except && owner[after] == x) || (before != except && owner[before] == x)
    })
}

fn moved_count(original: &[usize], owner: &[usize]) -> usize {
    original.iter().zip(owner).filter(|(a, b)| a != b).count()
}

/// Swaps the owners of two partitions while that removes target-n violations
/// and no more than `max_moved` partitions differ from `original`. Counts stay
/// as they are. A minimal join or leave can leave a run of violations where the
/// partitions it moved sit between fixed neighbours (a leave from a small
/// cluster above all); a few swaps beyond the minimum clear most of them.
///
/// Each step takes the swap that removes the most violations, then the one
/// that moves the fewest partitions, then the lowest partition pair.
fn improve_by_swaps(owner: &mut [usize], original: &[usize], n: usize, max_moved: usize) {
    let q = owner.len();
    if n <= 1 || n > q {
        return;
    }
    let mut moved = moved_count(original, owner);
    loop {
        // Partitions in a violating window: one of each pair must be among them.
        let mut hot = BTreeSet::new();
        for start in 0..q {
            if !window_ok(owner, start, n) {
                hot.extend((0..n).map(|i| (start + i) % q));
            }
        }
        if hot.is_empty() {
            return;
        }
        let mut best: Option<((isize, isize), usize, usize)> = None;
        for &a in &hot {
            for b in 0..q {
                if owner[a] == owner[b] || (hot.contains(&b) && b < a) {
                    continue;
                }
                // Only swaps that put neither owner next to itself: cheap to
                // test, and the others rarely remove violations.
                if near(owner, a, owner[b], n, b) || near(owner, b, owner[a], n, a) {
                    continue;
                }
                let cost = swap_cost(original, owner, a, b);
                if moved as isize + cost > max_moved as isize {
                    continue;
                }
                let delta = swap_violation_delta(owner, a, b, n);
                if delta >= 0 {
                    continue;
                }
                let key = (delta, cost);
                if best.as_ref().is_none_or(|(k, _, _)| key < *k) {
                    best = Some((key, a.min(b), a.max(b)));
                }
            }
        }
        let Some(((_, cost), a, b)) = best else {
            return;
        };
        owner.swap(a, b);
        moved = (moved as isize + cost) as usize;
    }
}

/// How the number of partitions that differ from `original` changes when the
/// owners of a and b are swapped.
fn swap_cost(original: &[usize], owner: &[usize], a: usize, b: usize) -> isize {
    let differs = |p: usize, o: usize| isize::from(original[p] != o);
    differs(a, owner[b]) + differs(b, owner[a]) - differs(a, owner[a]) - differs(b, owner[b])
}

/// How many more windows of n violate after the owners of a and b are swapped.
fn swap_violation_delta(owner: &[usize], a: usize, b: usize, n: usize) -> isize {
    let q = owner.len();
    let mut starts: Vec<usize> = (0..n)
        .flat_map(|back| [(a + q - back) % q, (b + q - back) % q])
        .collect();
    starts.sort_unstable();
    starts.dedup();
    let ok_before = starts.iter().filter(|&&st| window_ok(owner, st, n)).count();
    let mut swapped = [0usize; 64];
    let ok_after = starts
        .iter()
        .filter(|&&st| {
            let len = n.min(swapped.len());
            for (i, slot) in swapped.iter_mut().take(len).enumerate() {
                let p = (st + i) % q;
                *slot = if p == a {
                    owner[b]
                } else if p == b {
                    owner[a]
                } else {
                    owner[p]
                };
            }
            window_ok(&swapped[..len], 0, len)
        })
        .count();
    ok_before as isize - ok_after as isize
}

/// floor(q/s) for every node, plus one for the q % s nodes that own the most now
/// (ties to the lower index), so that as few partitions as possible move.
fn balanced_targets(count: &[usize], q: usize) -> Vec<usize> {
    let s = count.len();
    let mut by_count: Vec<usize> = (0..s).collect();
    by_count.sort_by_key(|&x| (Reverse(count[x]), x));
    let mut target = vec![q / s; s];
    for &x in by_count.iter().take(q % s) {
        target[x] += 1;
    }
    target
}

/// How many of the windows of n that hold partition p violate, with the
/// ownership patch applied if any.
fn violations_around(owner: &[usize], p: usize, n: usize, patch: Option<(usize, usize)>) -> usize {
    let q = owner.len();
    if n <= 1 || n > q {
        return 0;
    }
    (0..n)
        .map(|back| (p + q - back) % q)
        .filter(|&start| !window_ok_patched(owner, start, n, patch))
        .count()
}

/// Cyclic distance from p to the nearest partition in `positions` (q if none).
fn distance_to(positions: &BTreeSet<usize>, p: usize, q: usize) -> usize {
    let (Some(&first), Some(&last)) = (positions.first(), positions.last()) else {
        return q;
    };
    let after = positions
        .range(p..)
        .next()
        .map_or(first + q - p, |&a| a - p);
    let before = positions
        .range(..=p)
        .next_back()
        .map_or(p + q - last, |&b| p - b);
    after.min(before)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fmt::Write as _;

    fn ids(names: &[&str]) -> Vec<NodeId> {
        names.iter().map(|&name| NodeId::from(name)).collect()
    }

    fn ring_of(names: &[&str]) -> Ring {
        Ring::from_parts(7, ids(names)).unwrap()
    }

    #[test]
    fn round_robin_when_s_divides_q() {
        let ring = Ring::claim(8, &ids(&["b", "a"]), 2).unwrap();
        assert_eq!(
            ring.owners(),
            ids(&["a", "b", "a", "b", "a", "b", "a", "b"])
        );
        assert_eq!(ring.version(), 1);
        assert_eq!(ring.partitions_of(&"b".into()), vec![1, 3, 5, 7]);
        assert_eq!(ring.target_n_violations(2), 0);
        assert_eq!(
            ring.target_n_violations(3),
            8,
            "two nodes cannot hold three replicas"
        );
    }

    #[test]
    fn uneven_claim_skips_a_node_instead_of_clashing_at_the_wrap() {
        // Q = 8, S = 3: round robin would end "b a" and wrap to "a b".
        let ring = Ring::claim(8, &ids(&["a", "b", "c"]), 2).unwrap();
        assert_eq!(ring.target_n_violations(2), 0);
        let counts: Vec<usize> = ["a", "b", "c"]
            .iter()
            .map(|&x| ring.partitions_of(&x.into()).len())
            .collect();
        assert_eq!(counts, vec![3, 3, 2]);
    }

    #[test]
    fn claim_errors() {
        let nodes = ids(&["a", "b"]);
        assert_eq!(
            Ring::claim(0, &nodes, 3),
            Err(RingError::BadPartitionCount(0))
        );
        assert_eq!(
            Ring::claim(12, &nodes, 3),
            Err(RingError::BadPartitionCount(12))
        );
        assert_eq!(Ring::claim(8, &[], 3), Err(RingError::NoNodes));
        assert_eq!(
            Ring::claim(8, &ids(&["a", "b", "a"]), 3),
            Err(RingError::DuplicateNode("a".into()))
        );
        assert_eq!(
            Ring::from_parts(1, ids(&["a", "b", "c"])),
            Err(RingError::BadPartitionCount(3))
        );
        assert_eq!(
            Ring::from_parts(1, vec![]),
            Err(RingError::BadPartitionCount(0))
        );
    }

    #[test]
    fn join_and_leave_errors() {
        let ring = Ring::claim(8, &ids(&["a", "b"]), 2).unwrap();
        assert_eq!(
            ring.with_node_added("a".into(), 2),
            Err(RingError::AlreadyMember("a".into()))
        );
        assert_eq!(
            ring.with_node_removed(&"z".into(), 2),
            Err(RingError::UnknownNode("z".into()))
        );
        let alone = ring.with_node_removed(&"a".into(), 2).unwrap();
        assert_eq!(alone.owners(), ids(&["b"; 8]));
        assert_eq!(alone.version(), 2);
        assert_eq!(
            alone.with_node_removed(&"b".into(), 2),
            Err(RingError::LastNodeCannotLeave("b".into()))
        );
    }

    #[test]
    fn join_takes_the_minimum_without_violations() {
        let ring = Ring::claim(16, &ids(&["a", "b", "c"]), 3).unwrap();
        let joined = ring.with_node_added("d".into(), 3).unwrap();
        assert_eq!(joined.version(), 2);
        assert_eq!(joined.partitions_of(&"d".into()).len(), 4);
        assert_eq!(ring.moved_partitions(&joined), 4);
        for x in ["a", "b", "c", "d"] {
            assert_eq!(joined.partitions_of(&x.into()).len(), 4, "{x}");
        }
        assert!(joined.target_n_violations(3) <= ring.target_n_violations(3));
    }

    #[test]
    fn fewer_partitions_than_nodes() {
        let ring = Ring::claim(2, &ids(&["a", "b", "c"]), 2).unwrap();
        assert_eq!(ring.members().len(), 2);
        assert_eq!(ring.target_n_violations(2), 0);
        let one = Ring::claim(1, &ids(&["a", "b"]), 2).unwrap();
        assert_eq!(one.owners(), ids(&["a"]));
        assert_eq!(one.partition_for_key(b"anything"), 0);
        assert_eq!(one.primaries(0, 3), ids(&["a"]));
    }

    #[test]
    fn key_hash_is_pinned() {
        // The ring position of a key must never change between releases.
        assert_eq!(Ring::key_hash(b"hello"), 0xea8f_163d_b386_8292);
        let ring = Ring::claim(256, &ids(&["a"]), 1).unwrap();
        assert_eq!(ring.partition_of_hash(0xea8f_163d_b386_8292), 0xea);
        assert_eq!(ring.partition_of_hash(u64::MAX), 255);
        assert_eq!(ring.partition_of_hash(0), 0);
        assert_eq!(ring.partition_for_key(b"hello"), 0xea);
    }

    #[test]
    fn primaries_skip_owners_already_listed() {
        let ring = ring_of(&["a", "a", "b", "a", "c", "b", "d", "d"]);
        assert_eq!(ring.primaries(0, 3), ids(&["a", "b", "c"]));
        assert_eq!(ring.primaries(5, 3), ids(&["b", "d", "a"]));
        assert_eq!(ring.primaries(6, 2), ids(&["d", "a"]));
        assert_eq!(ring.primaries(6, 9), ids(&["d", "a", "b", "c"]));
        assert_eq!(ring.primaries(2, 0), ids(&[]));
        assert_eq!(ring.target_n_violations(1), 0);
        // The windows from 0 (a a) and 6 (d d).
        assert_eq!(ring.target_n_violations(2), 2);
        let load = ring.replica_load(2);
        assert_eq!(load.values().sum::<usize>(), 16);
    }

    #[test]
    fn preference_list_marks_primaries_and_filters_fallbacks() {
        let ring = ring_of(&["a", "b", "c", "d", "e", "a", "b", "c"]);
        let key = b"hello"; // partition 0xea >> 5 = 7, owned by c
        assert_eq!(ring.partition_for_key(key), 7);
        let all = ring.preference_list(key, 3, |_| true);
        let roles: Vec<(&str, Role)> = all.iter().map(|e| (e.node.as_str(), e.role)).collect();
        assert_eq!(
            roles,
            vec![
                ("c", Role::Primary),
                ("a", Role::Primary),
                ("b", Role::Primary),
                ("d", Role::Fallback),
                ("e", Role::Fallback),
            ]
        );
        // A down primary stays listed (the coordinator skips it); down
        // fallbacks are left out.
        let down = ["a", "d"];
        let some = ring.preference_list(key, 3, |x| !down.contains(&x.as_str()));
        let roles: Vec<(&str, Role)> = some.iter().map(|e| (e.node.as_str(), e.role)).collect();
        assert_eq!(
            roles,
            vec![
                ("c", Role::Primary),
                ("a", Role::Primary),
                ("b", Role::Primary),
                ("e", Role::Fallback)
            ]
        );
    }

    #[test]
    fn moved_partitions_counts_changed_owners() {
        let a = ring_of(&["a", "b", "a", "b"]);
        let b = ring_of(&["a", "c", "a", "c"]);
        assert_eq!(a.moved_partitions(&b), 2);
        assert_eq!(a.moved_partitions(&a), 0);
        assert_eq!(a.moved_partitions(&ring_of(&["a", "b"])), 4);
    }

    #[test]
    fn ring_round_trips_through_postcard() {
        let ring = Ring::claim(16, &ids(&["a", "b", "c"]), 3).unwrap();
        let bytes = postcard::to_stdvec(&ring).unwrap();
        assert_eq!(postcard::from_bytes::<Ring>(&bytes).unwrap(), ring);
    }

    fn render(ring: &Ring, n: usize) -> String {
        let mut out = String::new();
        writeln!(
            out,
            "Q = {}, version {}",
            ring.partition_count(),
            ring.version()
        )
        .unwrap();
        for (p, owner) in ring.owners().iter().enumerate() {
            writeln!(out, "{p:3} -> {owner}").unwrap();
        }
        writeln!(
            out,
            "target_n_violations(N = {n}) = {}",
            ring.target_n_violations(n)
        )
        .unwrap();
        for (node, load) in ring.replica_load(n) {
            let owned = ring.partitions_of(&node).len();
            writeln!(out, "{node}: owns {owned}, replica load {load}").unwrap();
        }
        out
    }

    #[test]
    fn five_nodes_64_partitions_layout() {
        let nodes = ids(&["n1", "n2", "n3", "n4", "n5"]);
        let ring = Ring::claim(64, &nodes, 3).unwrap();
        insta::assert_snapshot!(render(&ring, 3));
    }
}
