//! Property tests of the ring claim: balance, distinct primaries, target-N
//! violations, movement on join and leave, and determinism.
//!
//! The S x N grid at Q = 256 is checked exhaustively (it is small and the edge
//! cases live in it); random join/leave sequences come from proptest. Run with
//! `--nocapture` to see the movement and balance tables.

use std::collections::BTreeSet;

use dynamo_core::ring::{Ring, Role};
use dynamo_proto::NodeId;
use proptest::prelude::*;

const Q: u32 = 256;

fn node(i: usize) -> NodeId {
    NodeId::new(format!("n{i:03}"))
}

fn nodes(s: usize) -> Vec<NodeId> {
    (1..=s).map(node).collect()
}

/// (a): every partition's primaries, and every sampled key's preference list,
/// hold min(N, S) distinct nodes, all members.
fn check_primaries(ring: &Ring, n: usize) {
    let s = ring.members().len();
    let members = ring.members();
    for p in 0..ring.partition_count() {
        let primaries = ring.primaries(p, n);
        assert_eq!(primaries.len(), n.min(s), "partition {p}: {primaries:?}");
        let distinct: BTreeSet<&NodeId> = primaries.iter().collect();
        assert_eq!(
            distinct.len(),
            primaries.len(),
            "partition {p}: {primaries:?}"
        );
        assert!(primaries.iter().all(|x| members.contains(x)));
    }
    for k in 0..64u32 {
        let key = k.to_be_bytes();
        let list = ring.preference_list(&key, n, |_| true);
        let primaries: Vec<_> = list.iter().filter(|e| e.role == Role::Primary).collect();
        assert_eq!(primaries.len(), n.min(s));
        assert_eq!(list.len(), s, "every member appears once when all are up");
        let distinct: BTreeSet<&NodeId> = list.iter().map(|e| &e.node).collect();
        assert_eq!(distinct.len(), s);
    }
}

/// (c): every member owns floor(Q/S) or ceil(Q/S) partitions (S counting the
/// nodes that should own some), and replica load stays near its mean.
fn check_balance(ring: &Ring, s: usize, n: usize) -> (usize, f64) {
    let q = ring.partition_count() as usize;
    let (lo, hi) = (q / s, q.div_ceil(s));
    let members = ring.members();
    assert_eq!(members.len(), s.min(q), "members {members:?}");
    for m in &members {
        let c = ring.partitions_of(m).len();
        assert!(
            lo <= c && c <= hi,
            "{m} owns {c}, not in [{lo}, {hi}] (S = {s})"
        );
    }
    replica_bound(ring, n)
}

/// The replica load bound of (c): max <= 1.1 * mean + N. Returns (max, mean).
fn replica_bound(ring: &Ring, n: usize) -> (usize, f64) {
    let load = ring.replica_load(n);
    let max = *load.values().max().unwrap();
    let mean = load.values().sum::<usize>() as f64 / load.len() as f64;
    assert!(
        max as f64 <= 1.1 * mean + n as f64,
        "replica load max {max} > 1.1 * mean {mean:.1} + {n}: {load:?}"
    );
    (max, mean)
}

/// (d) for a join: the new node gets at least floor(Q/(S+1)) and no more than
/// 1.5 * ideal + N partitions move. Returns (moved, ideal).
fn check_join(before: &Ring, after: &Ring, new: &NodeId, n: usize) -> (usize, usize) {
    let q = before.partition_count() as usize;
    let s = before.members().len();
    let ideal = q / (s + 1);
    let moved = before.moved_partitions(after);
    assert!(after.partitions_of(new).len() >= ideal);
    assert!(moved >= ideal);
    assert!(
        moved as f64 <= 1.5 * ideal as f64 + n as f64,
        "join S {s} -> {}: moved {moved}, ideal {ideal}",
        s + 1
    );
    assert_eq!(after.version(), before.version() + 1);
    (moved, ideal)
}

/// (d) for a leave: every partition of the leaving node moves, and no more
/// than 1.5 * ideal + N in all. Returns (moved, ideal).
fn check_leave(before: &Ring, after: &Ring, gone: &NodeId, n: usize) -> (usize, usize) {
    let ideal = before.partitions_of(gone).len();
    let moved = before.moved_partitions(after);
    assert!(!after.members().contains(gone));
    assert!(moved >= ideal);
    assert!(
        moved as f64 <= 1.5 * ideal as f64 + n as f64,
        "leave: moved {moved}, ideal {ideal}"
    );
    assert_eq!(after.version(), before.version() + 1);
    (moved, ideal)
}

/// The claim does not depend on the order the nodes are given in.
fn check_order_independent(q: u32, ids: &[NodeId], n: usize, ring: &Ring) {
    let mut reversed = ids.to_vec();
    reversed.reverse();
    assert_eq!(&Ring::claim(q, &reversed, n).unwrap(), ring);
    let mut rotated = ids.to_vec();
    rotated.rotate_left(ids.len() / 2);
    assert_eq!(&Ring::claim(q, &rotated, n).unwrap(), ring);
}

#[test]
fn fresh_claims_over_the_s_by_n_grid() {
    println!("fresh claim, Q = {Q}: S N violations max/mean replica load");
    for n in 1..=5 {
        for s in 1..=64 {
            let ids = nodes(s);
            let ring = Ring::claim(Q, &ids, n).unwrap();
            check_primaries(&ring, n);
            let (max, mean) = check_balance(&ring, s, n);
            check_order_independent(Q, &ids, n, &ring);
            let violations = ring.target_n_violations(n);
            if s >= n && (Q as usize) / s * s == Q as usize {
                assert_eq!(violations, 0, "S {s} N {n}");
            }
            if s > n {
                // Not an acceptance criterion, but what the skip walk promises.
                assert_eq!(violations, 0, "S {s} N {n}");
            }
            if n == 3 && [3, 5, 7, 8, 9, 32, 33, 63].contains(&s) {
                println!(
                    "  S {s:2} N {n}: violations {violations:3}, replica load {max}/{mean:.1}"
                );
            }
        }
    }
}

#[test]
fn fresh_claims_at_other_partition_counts() {
    for q in [1u32, 2, 4, 8, 16, 64, 1024] {
        for s in [1usize, 2, 3, 5, 7, 8, 13, 16, 17, 40] {
            for n in 1..=5 {
                let ids = nodes(s);
                let ring = Ring::claim(q, &ids, n).unwrap();
                assert_eq!(ring.partition_count(), q);
                check_balance(&ring, s, n);
                check_primaries(&ring, n);
                check_order_independent(q, &ids, n, &ring);
                if s >= n && (q as usize) / s * s == q as usize {
                    assert_eq!(ring.target_n_violations(n), 0, "Q {q} S {s} N {n}");
                }
            }
        }
    }
}

#[test]
fn joins_over_the_s_by_n_grid() {
    println!("Q = {Q}: join, moved vs ideal, violations before -> after, max/mean replica load");
    for n in 1..=5 {
        for s in 1..=64 {
            let ring = Ring::claim(Q, &nodes(s), n).unwrap();
            let before_violations = ring.target_n_violations(n);
            let new = node(s + 1);
            let joined = ring.with_node_added(new.clone(), n).unwrap();
            assert_eq!(joined, ring.with_node_added(new.clone(), n).unwrap());
            check_primaries(&joined, n);
            let (max, mean) = check_balance(&joined, s + 1, n);
            let (moved, ideal) = check_join(&ring, &joined, &new, n);
            let violations = joined.target_n_violations(n);
            if n == 3 {
                println!(
                    "  N {n} join  {s:2} -> {:2}: moved {moved:3} (ideal {ideal:3}), violations {before_violations:3} -> {violations:3}, replica load {max}/{mean:.1}",
                    s + 1
                );
            }
        }
    }
}

#[test]
fn leaves_over_the_s_by_n_grid() {
    println!("Q = {Q}: leave, moved vs ideal, violations before -> after, max/mean replica load");
    for n in 1..=5 {
        for s in 2..=64 {
            let ring = Ring::claim(Q, &nodes(s), n).unwrap();
            let before_violations = ring.target_n_violations(n);
            // A node from the middle of the ring leaves.
            let gone = node(s / 2 + 1);
            let left = ring.with_node_removed(&gone, n).unwrap();
            assert_eq!(left, ring.with_node_removed(&gone, n).unwrap());
            check_primaries(&left, n);
            let (max, mean) = check_balance(&left, s - 1, n);
            let (moved, ideal) = check_leave(&ring, &left, &gone, n);
            let violations = left.target_n_violations(n);
            if n == 3 {
                println!(
                    "  N {n} leave {s:2} -> {:2}: moved {moved:3} (ideal {ideal:3}), violations {before_violations:3} -> {violations:3}, replica load {max}/{mean:.1}",
                    s - 1
                );
            }
        }
    }
}

#[derive(Clone, Debug)]
enum Change {
    Join,
    /// Leave of the member at this index (mod S) in id order.
    Leave(usize),
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![Just(Change::Join), any::<usize>().prop_map(Change::Leave)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random join/leave sequences keep (a), (c), (d) and (e) after every step.
    #[test]
    fn join_leave_sequences(
        q_bits in prop::sample::select(vec![4u32, 6, 8]),
        s in 1usize..24,
        n in 1usize..=5,
        changes in prop::collection::vec(change(), 1..8),
    ) {
        let q = 1u32 << q_bits;
        let mut ring = Ring::claim(q, &nodes(s), n).unwrap();
        let mut next_id = s + 1;
        // The nodes that should own partitions: with Q < S some own none and
        // are not members.
        let mut s = s;
        for change in changes {
            let members: Vec<NodeId> = ring.members().into_iter().collect();
            let next = match change {
                Change::Join => {
                    let new = node(next_id);
                    next_id += 1;
                    let next = ring.with_node_added(new.clone(), n).unwrap();
                    prop_assert_eq!(&next, &ring.with_node_added(new.clone(), n).unwrap());
                    s = s.min(q as usize) + 1;
                    if (q as usize) >= s {
                        check_join(&ring, &next, &new, n);
                    }
                    next
                }
                Change::Leave(i) => {
                    if members.len() == 1 {
                        continue;
                    }
                    let gone = &members[i % members.len()];
                    let next = ring.with_node_removed(gone, n).unwrap();
                    prop_assert_eq!(&next, &ring.with_node_removed(gone, n).unwrap());
                    check_leave(&ring, &next, gone, n);
                    s = members.len() - 1;
                    next
                }
            };
            check_primaries(&next, n);
            check_balance(&next, s, n);
            ring = next;
        }
    }
}
