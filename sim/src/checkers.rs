//! The correctness checkers: pure functions of what the clients did and saw (the
//! [`History`]), what every node durably stores at the end ([`FinalState`]), and
//! the run's parameters. They hold no simulator state and use no madsim API, so
//! they are unit-tested here on hand-built histories.
//!
//! Each checker reports its first violation only (in history order, then in key
//! and node order), naming the key, the versions involved and the ops that made
//! them. The rules follow "Invariants the simulator checks" in the design:
//!
//! - a write that failed (indeterminately) or timed out, or never completed, may
//!   or may not have been applied: it may appear, it is never required; a write
//!   that failed *definitely* (a refused request, too many siblings) was never
//!   applied and must not appear;
//! - every value written is unique, so a live sibling names the put that wrote it;
//!   a tombstone is named by its dot when its delete was acknowledged;
//! - dots are unique per key (a coordinator mints them from the key's stored set),
//!   so every lookup by dot is by `(key, dot)`.

use crate::history::{FinalState, History, Key, Op, OpKind, Outcome};
use dynamo_core::version::{self, covers, Versioning};
use dynamo_proto::{Context, Dot, DvvSet, Sibling};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// What the checkers need to know about the run.
#[derive(Clone, Debug)]
pub struct CheckParams {
    pub versioning: Versioning,
    /// Effective N (min(N, nodes)), and the cluster's default R and W.
    pub n: u8,
    pub r: u8,
    pub w: u8,
    /// Acknowledged writes are durable with sync = always; otherwise only while
    /// no node was ever down (see [`no_lost_writes`]).
    pub sync_always: bool,
    /// Fallbacks' hints counted towards W (see [`read_your_writes`]).
    pub sloppy_quorum: bool,
    pub request_timeout_ms: u64,
    /// Availability grace after the last fault change.
    pub detector_timeout_ms: u64,
    /// The fault state over the run, in order (see [`availability`]).
    pub fault_windows: Vec<FaultWindow>,
}

/// The cluster's fault state over `[from_ms, to_ms)`: which nodes are down
/// (crashed, paused or with a failed disk), which have a stalled disk (up,
/// but they can make no write durable), which cannot read their disk (up, but
/// they can neither answer a read nor merge a write), and whether the network
/// was clean (no partition, no loss, latency under a quarter of the request
/// timeout).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultWindow {
    pub from_ms: u64,
    pub to_ms: u64,
    pub down: BTreeSet<String>,
    pub stalled: BTreeSet<String>,
    pub unreadable: BTreeSet<String>,
    pub network_clean: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ViolationKind {
    Safety,
    Liveness,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub kind: ViolationKind,
    /// The key, the versions involved and the ops that made them.
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail(Violation),
    /// The checker does not apply to this run; the string says why.
    Skipped(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckReport {
    pub name: &'static str,
    pub verdict: Verdict,
}

impl CheckReport {
    pub fn failed(&self) -> bool {
        matches!(self.verdict, Verdict::Fail(_))
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} violation: {}", self.kind, self.message)
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.verdict {
            Verdict::Pass => write!(f, "{}: pass", self.name),
            Verdict::Skipped(why) => write!(f, "{}: skipped ({why})", self.name),
            Verdict::Fail(v) => write!(f, "{}: FAIL {v}", self.name),
        }
    }
}

type Checker = fn(&Index) -> Verdict;

/// Runs every checker, in a fixed order.
pub fn check_all(
    history: &History,
    final_state: &FinalState,
    params: &CheckParams,
) -> Vec<CheckReport> {
    let index = Index::new(history, final_state, params);
    let checks: [(&'static str, Checker); 8] = [
        ("no_lost_writes", no_lost_writes_in),
        ("reply_contexts", reply_contexts_in),
        ("read_your_writes", read_your_writes_in),
        ("convergence", convergence_in),
        ("no_false_siblings", no_false_siblings_in),
        ("no_resurrection", no_resurrection_in),
        ("availability", availability_in),
        ("hint_drain", hint_drain_in),
    ];
    checks
        .into_iter()
        .map(|(name, check)| CheckReport {
            name,
            verdict: check(&index),
        })
        .collect()
}

/// Invariant 1. Runs when acknowledged writes are durable: with sync = always,
/// or with another sync policy when no node was ever down (only a crash loses
/// unsynced writes, and a paused node cannot be told from a crashed one). After
/// the liveness phase, for every key with
/// an acknowledged write, take the merge of the primaries' stored sets (a
/// missing set is empty; [`convergence`] checks that they are equal):
///
/// - DVV: every acknowledged put is present (a sibling with the acknowledged dot
///   and the put's value), and every acknowledged delete is present (a tombstone
///   with its dot), unless the dot is covered by the request context of another
///   write of the key that may have been applied (acknowledged, indeterminately
///   failed, timed out or pending).
/// - LWW (weaker, as LWW does not know causality and the history does not carry
///   the timestamps of acknowledged writes): the merged set has a survivor; the
///   survivor is a write of the key that may have been applied (no phantom, no
///   definitely failed write, not an acknowledged dot holding another value); and
///   it is the greatest by `(timestamp, actor, counter)` among every sibling in
///   any node's stored set for the key and every acknowledged write whose sibling
///   (hence timestamp) was seen in a get reply. An acknowledged write never read
///   and no longer stored anywhere is not checked.
///
/// Keys whose primaries the final state does not list are checked against the
/// merge of every node's set.
pub fn no_lost_writes(
    history: &History,
    final_state: &FinalState,
    params: &CheckParams,
) -> Verdict {
    no_lost_writes_in(&Index::new(history, final_state, params))
}

/// The write API's contract: an acknowledged put's or delete's reply context
/// covers exactly the new dot and what the request's context covered (nothing
/// at all besides the dot for a blind write). A broader reply context would let
/// the client's next write silently supersede siblings it never saw, which the
/// other checkers would take for a legitimate overwrite.
pub fn reply_contexts(
    history: &History,
    final_state: &FinalState,
    params: &CheckParams,
) -> Verdict {
    reply_contexts_in(&Index::new(history, final_state, params))
}

/// Invariant 2, under strict quorums. Writes whose reply says fallbacks' hints
/// made up W (a sloppy quorum) are left out: until the hints are handed off
/// such a write need not be on R primaries (Dynamo's trade of consistency for
/// write availability). Skipped unless R + W > N and acknowledged writes are
/// durable (as for [`no_lost_writes`]: a crash that loses an
/// acknowledged write on W nodes breaks the quorum intersection). For every get
/// with a reply whose effective R (its own, or the default) satisfies R + W > N,
/// and every write (put or delete) of the same key acknowledged strictly before
/// the get was invoked: the reply holds the write's dot as a sibling, or its
/// context covers that dot (a later write superseded it).
pub fn read_your_writes(
    history: &History,
    final_state: &FinalState,
    params: &CheckParams,
) -> Verdict {
    read_your_writes_in(&Index::new(history, final_state, params))
}

/// Invariant 3. For every key of the history or of the final state's primaries
/// map, every primary stores the same set (siblings and context; a missing set is
/// empty). Keys whose primaries are unknown are not checked.
pub fn convergence(history: &History, final_state: &FinalState, params: &CheckParams) -> Verdict {
    convergence_in(&Index::new(history, final_state, params))
}

/// Invariant 4. In every get reply of the history and in every node's final
/// stored set:
///
/// - every sibling is a write of the key that may have been applied: a live
///   value belongs to a put of that key that did not fail definitely; a sibling
///   with an acknowledged write's dot holds that write's value (a tombstone for a
///   delete); a tombstone with any other dot needs an indeterminate delete of the
///   key;
/// - one value lives under one dot only, everywhere (one op, one write);
/// - no dot appears twice in one reply;
/// - no sibling's dot is covered by the request context of the op that wrote
///   another sibling of the same set (a false sibling: that write superseded it);
/// - in LWW mode, no set holds more than one sibling.
pub fn no_false_siblings(
    history: &History,
    final_state: &FinalState,
    params: &CheckParams,
) -> Verdict {
    no_false_siblings_in(&Index::new(history, final_state, params))
}

/// Invariant 7. For every acknowledged write (delete or put) with a request
/// context C, no sibling whose dot C covers is in the merged final state of the
/// key's primaries, nor in the reply of a get invoked after the write completed
/// (gets are checked only when their effective R satisfies R + W > N, and
/// only against writes acknowledged by W primaries: otherwise a get may
/// legitimately read a stale replica). Skipped in LWW mode,
/// where a write with a smaller timestamp loses even to what its context covers
/// (clock skew; documented in `Versioning::Lww`), and unless acknowledged writes
/// are durable (as for [`no_lost_writes`]: a lost delete lets what it deleted
/// come back).
pub fn no_resurrection(
    history: &History,
    final_state: &FinalState,
    params: &CheckParams,
) -> Verdict {
    no_resurrection_in(&Index::new(history, final_state, params))
}

/// Invariant 8. Skipped when there are no fault windows. An op must not fail
/// (an indeterminate `Failed` or `TimedOut`; a definite failure is the client's
/// problem, and a pending op is not counted) when its whole lifetime
/// `[invoked, invoked + request_timeout]` lies in one window with a clean
/// network, it was invoked at least `detector_timeout_ms` after that window
/// started, the node it was sent to is up, and at most N - W (puts, deletes) or
/// N - R (gets, with their effective R) of its key's primaries are down. Under
/// a sloppy quorum a write may also have as many more primaries down (crashed,
/// paused, or with a failed disk) as there are other nodes up with working
/// disks to stand in for them.
pub fn availability(history: &History, final_state: &FinalState, params: &CheckParams) -> Verdict {
    availability_in(&Index::new(history, final_state, params))
}

// ---------------------------------------------------------------------------
// The shared index.

struct Index<'a> {
    history: &'a History,
    final_state: &'a FinalState,
    params: &'a CheckParams,
    /// Every op of each key, in history order.
    by_key: BTreeMap<&'a Key, Vec<&'a Op>>,
    /// Acknowledged writes by the dot they minted.
    acked: BTreeMap<(&'a Key, Dot), &'a Op>,
    /// Puts by the value they wrote (the first one, should two share a value).
    put_by_value: BTreeMap<&'a [u8], &'a Op>,
}

impl<'a> Index<'a> {
    fn new(history: &'a History, final_state: &'a FinalState, params: &'a CheckParams) -> Self {
        let mut by_key: BTreeMap<&Key, Vec<&Op>> = BTreeMap::new();
        let mut acked = BTreeMap::new();
        let mut put_by_value = BTreeMap::new();
        for op in &history.ops {
            let key = op.kind.key();
            by_key.entry(key).or_default().push(op);
            if let Some(dot) = written_dot(op) {
                acked.entry((key, dot)).or_insert(op);
            }
            if let OpKind::Put { value, .. } = &op.kind {
                put_by_value.entry(value.as_slice()).or_insert(op);
            }
        }
        Index {
            history,
            final_state,
            params,
            by_key,
            acked,
            put_by_value,
        }
    }

    fn ops_of(&self, key: &Key) -> &[&'a Op] {
        self.by_key.get(key).map_or(&[], |ops| ops.as_slice())
    }

    /// The key's primaries, or every node with stored data when the final state
    /// does not list them (`false` in the second place).
    fn primaries_of(&self, key: &Key) -> (Vec<&'a str>, bool) {
        match self.final_state.primaries.get(key) {
            Some(primaries) => (primaries.iter().map(String::as_str).collect(), true),
            None => (
                self.final_state.stored.keys().map(String::as_str).collect(),
                false,
            ),
        }
    }

    fn stored(&self, node: &str, key: &Key) -> Option<&'a DvvSet> {
        self.final_state.stored.get(node)?.get(key)
    }

    /// The merge of the key's primaries' stored sets.
    fn merged_final(&self, key: &Key) -> (DvvSet, Vec<&'a str>) {
        let (primaries, _) = self.primaries_of(key);
        let mut merged = DvvSet::default();
        for node in &primaries {
            if let Some(set) = self.stored(node, key) {
                version::merge_into(&mut merged, set, self.params.versioning);
            }
        }
        (merged, primaries)
    }

    /// Every key the history or the final state's primaries map names.
    fn keys(&self) -> BTreeSet<&'a Key> {
        self.by_key
            .keys()
            .copied()
            .chain(self.final_state.primaries.keys())
            .collect()
    }

    fn effective_r(&self, op: &Op) -> u8 {
        match &op.kind {
            OpKind::Get { r, .. } => r.unwrap_or(self.params.r),
            _ => self.params.r,
        }
    }

    /// Whether `get`'s quorum must intersect that of every write acknowledged
    /// by W primaries (see [`on_w_primaries`]): R + W > N.
    fn strict_read(&self, get: &Op) -> bool {
        u16::from(self.effective_r(get)) + u16::from(self.params.w) > u16::from(self.params.n)
    }
}

/// Why an acknowledged write may legitimately have been lost, if it may: only a
/// crash loses writes, and only unsynced ones. The fault windows cannot tell a
/// crashed node from a paused one, so any node down counts as a possible crash.
fn acks_may_be_lost(p: &CheckParams) -> Option<String> {
    if p.sync_always {
        return None;
    }
    if p.fault_windows.is_empty() {
        return Some("sync is not always and the fault windows are unknown".into());
    }
    let crashed = p.fault_windows.iter().any(|w| !w.down.is_empty());
    crashed.then(|| {
        "sync is not always and a node was down (crashed or paused): a crash may lose \
         acknowledged writes"
            .into()
    })
}

fn written_dot(op: &Op) -> Option<Dot> {
    match (&op.kind, &op.outcome) {
        (OpKind::Put { .. } | OpKind::Delete { .. }, Outcome::Written { dot, .. }) => Some(*dot),
        _ => None,
    }
}

/// A write that may have been applied: acknowledged or indeterminate.
fn may_apply(op: &Op) -> bool {
    op.kind.is_write() && (op.acknowledged() || op.indeterminate())
}

/// The value a write stores (`None` for a delete's tombstone).
/// Whether an acknowledged write was on W primaries when it was acknowledged:
/// under a sloppy quorum fallbacks' hints may have made up W (the reply says
/// so), and until they are handed off a quorum of primaries may miss it.
fn on_w_primaries(op: &Op) -> bool {
    !matches!(op.outcome, Outcome::Written { sloppy: true, .. })
}

fn written_value(op: &Op) -> Option<&[u8]> {
    match &op.kind {
        OpKind::Put { value, .. } => Some(value),
        _ => None,
    }
}

fn completed_before(write: &Op, invoked_ms: u64) -> bool {
    write.completed_ms.is_some_and(|done| done < invoked_ms)
}

fn safety(message: String) -> Verdict {
    Verdict::Fail(Violation {
        kind: ViolationKind::Safety,
        message,
    })
}

fn liveness(message: String) -> Verdict {
    Verdict::Fail(Violation {
        kind: ViolationKind::Liveness,
        message,
    })
}

// ---------------------------------------------------------------------------
// Formatting.

const SHOWN_BYTES: usize = 40;

fn show_bytes(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    if text.chars().count() > SHOWN_BYTES {
        let cut: String = text.chars().take(SHOWN_BYTES).collect();
        format!("{cut:?}...({} bytes)", bytes.len())
    } else {
        format!("{text:?}")
    }
}

fn show_key(key: &[u8]) -> String {
    format!("key {}", show_bytes(key))
}

fn show_value(value: Option<&[u8]>) -> String {
    value.map_or_else(|| "tombstone".to_string(), show_bytes)
}

fn show_ctx(ctx: &Context) -> String {
    let mut parts: Vec<String> = ctx
        .vv
        .iter()
        .map(|(actor, counter)| format!("{actor}:..{counter}"))
        .collect();
    parts.extend(ctx.dots.iter().map(|dot| format!("{dot}")));
    format!("{{{}}}", parts.join(", "))
}

fn show_sibling(dot: &Dot, sibling: &Sibling) -> String {
    format!(
        "{dot}={} @{}.{}",
        show_value(sibling.value.as_deref()),
        sibling.timestamp.wall_ms,
        sibling.timestamp.logical
    )
}

fn show_siblings<'s>(siblings: impl IntoIterator<Item = (&'s Dot, &'s Sibling)>) -> String {
    let shown: Vec<String> = siblings
        .into_iter()
        .map(|(dot, sibling)| show_sibling(dot, sibling))
        .collect();
    format!("[{}]", shown.join(", "))
}

fn show_set(set: &DvvSet) -> String {
    format!(
        "siblings {} ctx {}",
        show_siblings(&set.siblings),
        show_ctx(&set.context)
    )
}

fn show_op(op: &Op) -> String {
    let what = match &op.kind {
        OpKind::Put { value, context, .. } => format!(
            "put {} ctx {}",
            show_bytes(value),
            context.as_ref().map_or("none".to_string(), show_ctx)
        ),
        OpKind::Delete { context, .. } => format!(
            "delete ctx {}",
            context.as_ref().map_or("none".to_string(), show_ctx)
        ),
        OpKind::Get { r: Some(r), .. } => format!("get r={r}"),
        OpKind::Get { r: None, .. } => "get".to_string(),
    };
    let outcome = match &op.outcome {
        Outcome::Pending => "pending".to_string(),
        Outcome::Written { dot, .. } => format!("acked as {dot}"),
        Outcome::Read(reply) => format!(
            "read {} ctx {}",
            show_siblings(reply.siblings.iter().map(|(d, s)| (d, s))),
            show_ctx(&reply.context)
        ),
        Outcome::Failed { message, definite } => format!(
            "failed ({}): {message}",
            if *definite {
                "definite"
            } else {
                "indeterminate"
            }
        ),
        Outcome::TimedOut => "timed out".to_string(),
    };
    let completed = op
        .completed_ms
        .map_or("never".to_string(), |ms| format!("{ms}ms"));
    format!(
        "op #{} (client {} via {}: {what}; invoked {}ms, completed {completed}; {outcome})",
        op.id, op.client, op.node, op.invoked_ms
    )
}

fn show_primaries(primaries: &[&str], listed: bool) -> String {
    if listed {
        format!("primaries [{}]", primaries.join(", "))
    } else {
        format!("all nodes [{}] (primaries unknown)", primaries.join(", "))
    }
}

// ---------------------------------------------------------------------------
// 1. No lost writes.

fn no_lost_writes_in(ix: &Index) -> Verdict {
    if let Some(why) = acks_may_be_lost(ix.params) {
        return Verdict::Skipped(why);
    }
    match ix.params.versioning {
        Versioning::Dvv => no_lost_writes_dvv(ix),
        Versioning::Lww => no_lost_writes_lww(ix),
    }
}

fn no_lost_writes_dvv(ix: &Index) -> Verdict {
    for (key, ops) in &ix.by_key {
        let acked: Vec<&Op> = ops.iter().copied().filter(|op| op.acknowledged()).collect();
        if acked.is_empty() {
            continue;
        }
        let (merged, primaries) = ix.merged_final(key);
        for write in acked {
            let Some(dot) = written_dot(write) else {
                continue;
            };
            let expected = written_value(write);
            let held = merged.siblings.get(&dot);
            if held.is_some_and(|s| s.value.as_deref() == expected) {
                continue;
            }
            let superseded = ops.iter().any(|other| {
                other.id != write.id
                    && may_apply(other)
                    && other.kind.context().is_some_and(|ctx| covers(ctx, &dot))
            });
            if superseded {
                continue;
            }
            let (_, listed) = ix.primaries_of(key);
            let instead = held.map_or(String::new(), |s| {
                format!(
                    "; dot {dot} holds {} instead",
                    show_value(s.value.as_deref())
                )
            });
            return safety(format!(
                "{}: acknowledged write {} is missing from the merged final state of \
                 {} and no write's context covers it{instead}; merged final state: {}",
                show_key(key),
                show_op(write),
                show_primaries(&primaries, listed),
                show_set(&merged)
            ));
        }
    }
    Verdict::Pass
}

/// Why a sibling cannot be the write it claims to be, if it cannot.
fn attribute<'a>(
    ix: &Index<'a>,
    key: &Key,
    dot: &Dot,
    sibling: &Sibling,
) -> Result<Option<&'a Op>, String> {
    if let Some(op) = ix.acked.get(&(key, *dot)) {
        let expected = written_value(op);
        if sibling.value.as_deref() != expected {
            return Err(format!(
                "dot {dot} holds {} but was acknowledged to {}",
                show_value(sibling.value.as_deref()),
                show_op(op)
            ));
        }
        return Ok(Some(op));
    }
    match sibling.value.as_deref() {
        Some(value) => {
            let Some(op) = ix.put_by_value.get(value) else {
                return Err(format!(
                    "phantom sibling {}: no put in the history wrote this value",
                    show_sibling(dot, sibling)
                ));
            };
            if op.kind.key() != key {
                return Err(format!(
                    "sibling {} was written to {} by {}",
                    show_sibling(dot, sibling),
                    show_key(op.kind.key()),
                    show_op(op)
                ));
            }
            if let Some(acked_dot) = written_dot(op) {
                return Err(format!(
                    "sibling {} has the value of {}, acknowledged with dot {acked_dot}: one write \
                     under two dots",
                    show_sibling(dot, sibling),
                    show_op(op)
                ));
            }
            if !may_apply(op) {
                return Err(format!(
                    "sibling {} was written by {}, which failed definitely (never applied)",
                    show_sibling(dot, sibling),
                    show_op(op)
                ));
            }
            Ok(Some(op))
        }
        None => {
            let unacked_delete = ix
                .ops_of(key)
                .iter()
                .any(|op| matches!(op.kind, OpKind::Delete { .. }) && op.indeterminate());
            if unacked_delete {
                Ok(None)
            } else {
                Err(format!(
                    "phantom tombstone {}: no acknowledged delete of the key has this dot and no \
                     delete of it is indeterminate",
                    show_sibling(dot, sibling)
                ))
            }
        }
    }
}

fn no_lost_writes_lww(ix: &Index) -> Verdict {
    for (key, ops) in &ix.by_key {
        let acked: Vec<&Op> = ops.iter().copied().filter(|op| op.acknowledged()).collect();
        if acked.is_empty() {
            continue;
        }
        let (merged, primaries) = ix.merged_final(key);
        let (_, listed) = ix.primaries_of(key);
        let Some((dot, survivor)) = version::winner(&merged) else {
            return safety(format!(
                "{}: no survivor in the final state of {} although {} was acknowledged",
                show_key(key),
                show_primaries(&primaries, listed),
                show_op(acked[0])
            ));
        };
        if let Err(why) = attribute(ix, key, dot, survivor) {
            return safety(format!(
                "{}: the LWW survivor of {} is not a write of the key: {why}",
                show_key(key),
                show_primaries(&primaries, listed)
            ));
        }
        let beats =
            |other: (&Dot, &Sibling)| (other.1.timestamp, *other.0) > (survivor.timestamp, *dot);
        for (node, sets) in &ix.final_state.stored {
            let Some(set) = sets.get(*key) else {
                continue;
            };
            if let Some((other_dot, other)) = set.siblings.iter().find(|s| beats(*s)) {
                return safety(format!(
                    "{}: the LWW survivor {} of {} is not the greatest: node {node} stores {}{}",
                    show_key(key),
                    show_sibling(dot, survivor),
                    show_primaries(&primaries, listed),
                    show_sibling(other_dot, other),
                    writer_note(ix, key, other_dot, other)
                ));
            }
        }
        for get in ops.iter() {
            let Outcome::Read(reply) = &get.outcome else {
                continue;
            };
            for (other_dot, other) in &reply.siblings {
                let Some(write) = ix.acked.get(&(*key, *other_dot)) else {
                    continue;
                };
                if beats((other_dot, other)) {
                    return safety(format!(
                        "{}: the LWW survivor {} of {} is not the greatest: acknowledged {} was \
                         read as {} by {}",
                        show_key(key),
                        show_sibling(dot, survivor),
                        show_primaries(&primaries, listed),
                        show_op(write),
                        show_sibling(other_dot, other),
                        show_op(get)
                    ));
                }
            }
        }
    }
    Verdict::Pass
}

/// ", written by op ..." when the sibling can be attributed.
fn writer_note(ix: &Index, key: &Key, dot: &Dot, sibling: &Sibling) -> String {
    match attribute(ix, key, dot, sibling) {
        Ok(Some(op)) => format!(", written by {}", show_op(op)),
        Ok(None) => String::new(),
        Err(why) => format!(" ({why})"),
    }
}

// ---------------------------------------------------------------------------
// 2. Read your writes.

fn reply_contexts_in(ix: &Index) -> Verdict {
    for op in &ix.history.ops {
        let Outcome::Written { dot, context, .. } = &op.outcome else {
            continue;
        };
        let mut expected = op.kind.context().cloned().unwrap_or_default();
        version::context_insert(&mut expected, *dot);
        version::compact(&mut expected);
        let mut got = context.clone();
        version::compact(&mut got);
        if got != expected {
            return safety(format!(
                "{}: {} was answered with context {}, but a write's reply must cover \
                 exactly its request context plus its own dot: {}",
                show_key(op.kind.key()),
                show_op(op),
                show_ctx(&got),
                show_ctx(&expected)
            ));
        }
    }
    Verdict::Pass
}

fn read_your_writes_in(ix: &Index) -> Verdict {
    let p = ix.params;
    if u16::from(p.r) + u16::from(p.w) <= u16::from(p.n) {
        return Verdict::Skipped(format!(
            "R + W = {} + {} <= N = {}: quorums need not intersect",
            p.r, p.w, p.n
        ));
    }
    if let Some(why) = acks_may_be_lost(p) {
        return Verdict::Skipped(why);
    }
    for get in &ix.history.ops {
        let Outcome::Read(reply) = &get.outcome else {
            continue;
        };
        if !ix.strict_read(get) {
            continue;
        }
        let key = get.kind.key();
        for write in ix.ops_of(key) {
            let Some(dot) = written_dot(write) else {
                continue;
            };
            if !completed_before(write, get.invoked_ms) || !on_w_primaries(write) {
                continue;
            }
            let held = reply.siblings.iter().any(|(d, _)| *d == dot);
            if held || covers(&reply.context, &dot) {
                continue;
            }
            return safety(format!(
                "{}: {} was invoked after {} was acknowledged, but its reply neither holds dot \
                 {dot} nor has a context covering it",
                show_key(key),
                show_op(get),
                show_op(write)
            ));
        }
    }
    Verdict::Pass
}

// ---------------------------------------------------------------------------
// 3. Convergence.

fn convergence_in(ix: &Index) -> Verdict {
    let empty = DvvSet::default();
    for key in ix.keys() {
        let Some(primaries) = ix.final_state.primaries.get(key) else {
            continue;
        };
        let sets: Vec<(&str, &DvvSet)> = primaries
            .iter()
            .map(|node| (node.as_str(), ix.stored(node, key).unwrap_or(&empty)))
            .collect();
        let Some((_, first)) = sets.first() else {
            continue;
        };
        if sets.iter().all(|(_, set)| set == first) {
            continue;
        }
        let shown: Vec<String> = sets
            .iter()
            .map(|(node, set)| format!("{node}: {}", show_set(set)))
            .collect();
        return liveness(format!(
            "{}: the primaries store different sets after healing: {}",
            show_key(key),
            shown.join("; ")
        ));
    }
    Verdict::Pass
}

// ---------------------------------------------------------------------------
// 4. No false siblings.

fn no_false_siblings_in(ix: &Index) -> Verdict {
    // value -> (dot, where it was seen), to catch one value under two dots.
    let mut seen: BTreeMap<&[u8], (Dot, String)> = BTreeMap::new();
    for op in &ix.history.ops {
        let Outcome::Read(reply) = &op.outcome else {
            continue;
        };
        let key = op.kind.key();
        let place = format!("the reply to {}", show_op(op));
        let mut dots = BTreeSet::new();
        for (dot, _) in &reply.siblings {
            if !dots.insert(*dot) {
                return safety(format!(
                    "{}: dot {dot} appears twice in {place}",
                    show_key(key)
                ));
            }
        }
        let siblings: Vec<(&Dot, &Sibling)> = reply.siblings.iter().map(|(d, s)| (d, s)).collect();
        if let Some(message) = false_sibling_in(ix, key, &siblings, &place, &mut seen) {
            return safety(message);
        }
    }
    for (node, sets) in &ix.final_state.stored {
        for (key, set) in sets {
            let place = format!("node {node}'s final stored set ({})", show_set(set));
            let siblings: Vec<(&Dot, &Sibling)> = set.siblings.iter().collect();
            if let Some(message) = false_sibling_in(ix, key, &siblings, &place, &mut seen) {
                return safety(message);
            }
        }
    }
    Verdict::Pass
}

fn false_sibling_in<'a>(
    ix: &Index<'a>,
    key: &Key,
    siblings: &[(&Dot, &'a Sibling)],
    place: &str,
    seen: &mut BTreeMap<&'a [u8], (Dot, String)>,
) -> Option<String> {
    let key_shown = show_key(key);
    if ix.params.versioning == Versioning::Lww && siblings.len() > 1 {
        return Some(format!(
            "{key_shown}: {} siblings {} in {place}, but LWW keeps one",
            siblings.len(),
            show_siblings(siblings.iter().copied())
        ));
    }
    let mut writers = Vec::with_capacity(siblings.len());
    for &(dot, sibling) in siblings {
        match attribute(ix, key, dot, sibling) {
            Ok(writer) => writers.push(writer),
            Err(why) => return Some(format!("{key_shown}: {why}, in {place}")),
        }
        if let Some(value) = sibling.value.as_deref() {
            match seen.get(value) {
                Some((other_dot, other_place)) if other_dot != dot => {
                    return Some(format!(
                        "{key_shown}: value {} is under dot {dot} in {place} but under dot \
                         {other_dot} in {other_place}: one write under two dots",
                        show_bytes(value)
                    ));
                }
                Some(_) => {}
                None => {
                    seen.insert(value, (*dot, place.to_string()));
                }
            }
        }
    }
    for (i, &(t_dot, t)) in siblings.iter().enumerate() {
        let Some(writer) = writers[i] else {
            continue;
        };
        let Some(ctx) = writer.kind.context() else {
            continue;
        };
        for (j, &(s_dot, s)) in siblings.iter().enumerate() {
            if i == j || s_dot == t_dot || !covers(ctx, s_dot) {
                continue;
            }
            let s_writer =
                writers[j].map_or(String::new(), |op| format!(" (written by {})", show_op(op)));
            return Some(format!(
                "{key_shown}: false sibling {}{s_writer} is covered by the request context of {}, \
                 which wrote sibling {}, yet both are in {place}",
                show_sibling(s_dot, s),
                show_op(writer),
                show_sibling(t_dot, t)
            ));
        }
    }
    None
}

// ---------------------------------------------------------------------------
// 5. No resurrection.

fn no_resurrection_in(ix: &Index) -> Verdict {
    if ix.params.versioning == Versioning::Lww {
        return Verdict::Skipped(
            "LWW may keep a version a later write's context covers (clock skew)".into(),
        );
    }
    if let Some(why) = acks_may_be_lost(ix.params) {
        return Verdict::Skipped(why);
    }
    for get in &ix.history.ops {
        let Outcome::Read(reply) = &get.outcome else {
            continue;
        };
        if !ix.strict_read(get) {
            continue;
        }
        let key = get.kind.key();
        for write in ix.ops_of(key) {
            if !write.acknowledged()
                || !completed_before(write, get.invoked_ms)
                || !on_w_primaries(write)
            {
                continue;
            }
            let Some(ctx) = write.kind.context() else {
                continue;
            };
            let own = written_dot(write);
            if let Some((dot, sibling)) = reply
                .siblings
                .iter()
                .find(|(dot, _)| Some(*dot) != own && covers(ctx, dot))
            {
                return safety(format!(
                    "{}: {} returned {}{}, which {} superseded (its context covers {dot})",
                    show_key(key),
                    show_op(get),
                    show_sibling(dot, sibling),
                    writer_note(ix, key, dot, sibling),
                    show_op(write)
                ));
            }
        }
    }
    for (key, ops) in &ix.by_key {
        let (merged, primaries) = ix.merged_final(key);
        for write in ops.iter().filter(|op| op.acknowledged()) {
            let Some(ctx) = write.kind.context() else {
                continue;
            };
            let own = written_dot(write);
            if let Some((dot, sibling)) = merged
                .siblings
                .iter()
                .find(|(dot, _)| Some(**dot) != own && covers(ctx, dot))
            {
                let (_, listed) = ix.primaries_of(key);
                return safety(format!(
                    "{}: the merged final state of {} holds {}{}, which {} superseded (its \
                     context covers {dot}); merged final state: {}",
                    show_key(key),
                    show_primaries(&primaries, listed),
                    show_sibling(dot, sibling),
                    writer_note(ix, key, dot, sibling),
                    show_op(write),
                    show_set(&merged)
                ));
            }
        }
    }
    Verdict::Pass
}

// ---------------------------------------------------------------------------
// 6. Availability.

fn availability_in(ix: &Index) -> Verdict {
    let p = ix.params;
    if p.fault_windows.is_empty() {
        return Verdict::Skipped("no fault windows were recorded".into());
    }
    for op in &ix.history.ops {
        let failed = matches!(
            op.outcome,
            Outcome::TimedOut
                | Outcome::Failed {
                    definite: false,
                    ..
                }
        );
        if !failed {
            continue;
        }
        let Some(window) = p
            .fault_windows
            .iter()
            .find(|w| w.from_ms <= op.invoked_ms && op.invoked_ms < w.to_ms)
        else {
            continue;
        };
        if !window.network_clean
            || op.invoked_ms < window.from_ms.saturating_add(p.detector_timeout_ms)
            || op.invoked_ms.saturating_add(p.request_timeout_ms) > window.to_ms
            || window.down.contains(&op.node)
        {
            continue;
        }
        let key = op.kind.key();
        let Some(primaries) = ix.final_state.primaries.get(key) else {
            continue;
        };
        // A primary whose disk stalls makes no write durable, so it cannot
        // count towards W (reads it answers as ever); one that cannot read its
        // disk counts towards neither (a write merges into what it reads).
        let unable = |node: &String| {
            window.down.contains(node)
                || window.unreadable.contains(node)
                || (op.kind.is_write() && window.stalled.contains(node))
        };
        let down: Vec<&str> = primaries
            .iter()
            .filter(|node| unable(node))
            .map(String::as_str)
            .collect();
        let (quorum, name) = if op.kind.is_write() {
            (p.w, "W")
        } else {
            (ix.effective_r(op), "R")
        };
        let tolerated = usize::from(p.n.saturating_sub(quorum));
        // Under a sloppy quorum a primary that is down (a stalled or
        // unreadable one looks up, so nothing stands in for it) is replaced by
        // a node outside the key's primaries that is up and can persist.
        let spares = if op.kind.is_write() && p.sloppy_quorum {
            let replaceable = primaries
                .iter()
                .filter(|node| window.down.contains(*node))
                .count();
            let spare = ix
                .final_state
                .stored
                .keys()
                .filter(|node| !primaries.contains(node) && !unable(node))
                .count();
            replaceable.min(spare)
        } else {
            0
        };
        if down.len() > tolerated + spares {
            continue;
        }
        let names = |set: &BTreeSet<String>| set.iter().cloned().collect::<Vec<_>>().join(", ");
        return liveness(format!(
            "{}: {} failed although invoked {}ms into a clean fault window [{}ms, {}ms) with \
             nodes down [{}], disks stalled [{}] and unreadable [{}], its node up, and {} of \
             its primaries [{}] unable to take part (N - {name} = {} - {} = {tolerated} \
             tolerated, plus {spares} fallback(s) able to stand in under a sloppy quorum)",
            show_key(key),
            show_op(op),
            op.invoked_ms - window.from_ms,
            window.from_ms,
            window.to_ms,
            names(&window.down),
            names(&window.stalled),
            names(&window.unreadable),
            down.len(),
            primaries.join(", "),
            p.n,
            quorum
        ));
    }
    Verdict::Pass
}

// ---------------------------------------------------------------------------
// 5. Hint drain.

/// Invariant 5. After the liveness phase (every node restarted, the network
/// healed, then the quiesce) no node holds a hint: each was handed to its
/// owner, which persisted it, and removed.
fn hint_drain_in(ix: &Index) -> Verdict {
    for (node, hints) in &ix.final_state.hints {
        let Some(first) = hints.first() else {
            continue;
        };
        let shown = match dynamo_core::handoff::split_hint_key(first) {
            Some((owner, key)) => format!("for {owner} of {}", show_key(key)),
            None => format!("under the unreadable storage key {}", show_bytes(first)),
        };
        return liveness(format!(
            "{node} still holds {} hint(s) after healing and quiescence, the first {shown}",
            hints.len()
        ));
    }
    Verdict::Pass
}

#[cfg(test)]
mod tests {
    use super::*;
    use dynamo_core::version::{context_insert, write, DEFAULT_MAX_SIBLINGS};
    use dynamo_proto::{Actor, GetReply, Hlc, WriteMode};

    const A: Actor = Actor {
        incarnation: 0xa,
        epoch: 0,
    };
    const B: Actor = Actor {
        incarnation: 0xb,
        epoch: 0,
    };
    const NODES: [&str; 3] = ["n1", "n2", "n3"];
    const KEY: &str = "k1";

    fn dot(actor: Actor, counter: u64) -> Dot {
        Dot { actor, counter }
    }

    fn ctx(dots: &[Dot]) -> Context {
        let mut ctx = Context::default();
        for dot in dots {
            context_insert(&mut ctx, *dot);
        }
        ctx
    }

    fn sib(value: Option<&str>, wall_ms: u64) -> Sibling {
        Sibling {
            value: value.map(|v| v.as_bytes().to_vec()),
            timestamp: Hlc {
                wall_ms,
                logical: 0,
            },
        }
    }

    /// A set with these siblings (timestamp = counter) and a context covering
    /// them and `extra`.
    fn set(siblings: &[(Dot, Option<&str>)], extra: &[Dot]) -> DvvSet {
        let mut all: Vec<Dot> = siblings.iter().map(|(d, _)| *d).collect();
        all.extend_from_slice(extra);
        DvvSet {
            context: ctx(&all),
            siblings: siblings
                .iter()
                .map(|(d, v)| (*d, sib(*v, d.counter)))
                .collect(),
        }
    }

    fn reply(set: &DvvSet) -> Outcome {
        Outcome::Read(GetReply {
            siblings: set.siblings.iter().map(|(d, s)| (*d, s.clone())).collect(),
            context: set.context.clone(),
        })
    }

    fn written(d: Dot, request: Option<&Context>) -> Outcome {
        let mut context = request.cloned().unwrap_or_default();
        context_insert(&mut context, d);
        Outcome::Written {
            dot: d,
            context,
            sloppy: false,
        }
    }

    struct Builder {
        ops: Vec<Op>,
    }

    impl Builder {
        fn new() -> Self {
            Builder { ops: Vec::new() }
        }

        fn op(&mut self, kind: OpKind, at: (u64, Option<u64>), outcome: Outcome) -> &mut Self {
            let id = self.ops.len() as u64 + 1;
            self.ops.push(Op {
                id,
                client: id as usize % 2,
                node: NODES[id as usize % 3].to_string(),
                kind,
                invoked_ms: at.0,
                completed_ms: at.1,
                outcome,
            });
            self
        }

        fn put(
            &mut self,
            value: &str,
            context: Option<&Context>,
            at: (u64, Option<u64>),
            outcome: Outcome,
        ) -> &mut Self {
            self.op(
                OpKind::Put {
                    key: KEY.as_bytes().to_vec(),
                    value: value.as_bytes().to_vec(),
                    context: context.cloned(),
                },
                at,
                outcome,
            )
        }

        fn delete(
            &mut self,
            context: Option<&Context>,
            at: (u64, Option<u64>),
            outcome: Outcome,
        ) -> &mut Self {
            self.op(
                OpKind::Delete {
                    key: KEY.as_bytes().to_vec(),
                    context: context.cloned(),
                },
                at,
                outcome,
            )
        }

        fn get(&mut self, at: (u64, Option<u64>), outcome: Outcome) -> &mut Self {
            self.op(
                OpKind::Get {
                    key: KEY.as_bytes().to_vec(),
                    r: None,
                },
                at,
                outcome,
            )
        }

        /// Sends the last op to `node`.
        fn to(&mut self, node: &str) -> &mut Self {
            self.ops.last_mut().unwrap().node = node.to_string();
            self
        }

        fn history(&self) -> History {
            History {
                ops: self.ops.clone(),
            }
        }
    }

    /// Every primary of KEY stores `set`.
    fn converged(set: &DvvSet) -> FinalState {
        stored(&[set.clone(), set.clone(), set.clone()])
    }

    fn stored(sets: &[DvvSet]) -> FinalState {
        let mut state = FinalState::default();
        for (node, set) in NODES.iter().zip(sets) {
            state
                .stored
                .entry(node.to_string())
                .or_default()
                .insert(KEY.as_bytes().to_vec(), set.clone());
        }
        state.primaries.insert(
            KEY.as_bytes().to_vec(),
            NODES.iter().map(|n| n.to_string()).collect(),
        );
        state
    }

    fn params() -> CheckParams {
        CheckParams {
            versioning: Versioning::Dvv,
            n: 3,
            r: 2,
            w: 2,
            sync_always: true,
            sloppy_quorum: false,
            request_timeout_ms: 1_000,
            detector_timeout_ms: 3_000,
            fault_windows: Vec::new(),
        }
    }

    fn lww() -> CheckParams {
        CheckParams {
            versioning: Versioning::Lww,
            ..params()
        }
    }

    #[track_caller]
    fn assert_fails(verdict: Verdict, kind: ViolationKind, needles: &[&str]) -> String {
        let Verdict::Fail(violation) = verdict else {
            panic!("expected a violation, got {verdict:?}");
        };
        eprintln!("{}", violation.message);
        assert_eq!(violation.kind, kind, "{}", violation.message);
        assert!(
            violation.message.contains("key \"k1\""),
            "{}",
            violation.message
        );
        for needle in needles {
            assert!(
                violation.message.contains(needle),
                "{needle:?} not in: {}",
                violation.message
            );
        }
        violation.message
    }

    // -- no_lost_writes ---------------------------------------------------

    #[test]
    fn lost_writes_pass_when_present_or_covered() {
        let (a1, a2, b1) = (dot(A, 1), dot(A, 2), dot(B, 1));
        let mut h = Builder::new();
        h.put("v1", None, (0, Some(10)), written(a1, None))
            // Timed out, but its context supersedes v1.
            .put("v2", Some(&ctx(&[a1])), (20, None), Outcome::TimedOut)
            .put("v3", None, (30, Some(40)), written(b1, None));
        let state = converged(&set(&[(a2, Some("v2")), (b1, Some("v3"))], &[a1]));
        assert_eq!(
            no_lost_writes(&h.history(), &state, &params()),
            Verdict::Pass
        );
    }

    #[test]
    fn lost_writes_detects_a_missing_acknowledged_put() {
        let (a1, b1) = (dot(A, 1), dot(B, 1));
        let mut h = Builder::new();
        h.put("v1", None, (0, Some(10)), written(a1, None))
            .put("v2", None, (20, Some(30)), written(b1, None))
            // A definite failure supersedes nothing.
            .put(
                "v3",
                Some(&ctx(&[a1])),
                (40, Some(41)),
                Outcome::Failed {
                    message: "too many siblings".into(),
                    definite: true,
                },
            );
        let state = converged(&set(&[(b1, Some("v2"))], &[]));
        let message = assert_fails(
            no_lost_writes(&h.history(), &state, &params()),
            ViolationKind::Safety,
            &[
                "op #1",
                "\"v1\"",
                "000000000000000a.0:1",
                "primaries [n1, n2, n3]",
            ],
        );
        assert!(message.contains("missing"), "{message}");
    }

    #[test]
    fn lost_writes_uses_the_merge_of_the_primaries() {
        let (a1, b1) = (dot(A, 1), dot(B, 1));
        let mut h = Builder::new();
        h.put("v1", None, (0, Some(10)), written(a1, None)).put(
            "v2",
            None,
            (20, Some(30)),
            written(b1, None),
        );
        let state = stored(&[
            set(&[(a1, Some("v1"))], &[]),
            set(&[(b1, Some("v2"))], &[]),
            DvvSet::default(),
        ]);
        assert_eq!(
            no_lost_writes(&h.history(), &state, &params()),
            Verdict::Pass
        );
    }

    #[test]
    fn lost_writes_checks_tombstones_and_is_skipped_without_sync_always() {
        let (a1, a2) = (dot(A, 1), dot(A, 2));
        let mut h = Builder::new();
        h.put("v1", None, (0, Some(10)), written(a1, None)).delete(
            Some(&ctx(&[a1])),
            (20, Some(30)),
            written(a2, Some(&ctx(&[a1]))),
        );
        let tombstone = set(&[(a2, None)], &[a1]);
        assert_eq!(
            no_lost_writes(&h.history(), &converged(&tombstone), &params()),
            Verdict::Pass
        );
        // The tombstone is gone (and v1 with it, covered by the delete).
        let gone = set(&[], &[a1, a2]);
        assert_fails(
            no_lost_writes(&h.history(), &converged(&gone), &params()),
            ViolationKind::Safety,
            &["op #2", "delete", "000000000000000a.0:2"],
        );
        let relaxed = CheckParams {
            sync_always: false,
            ..params()
        };
        assert!(matches!(
            no_lost_writes(&h.history(), &converged(&gone), &relaxed),
            Verdict::Skipped(_)
        ));
        // Without sync = always, acknowledged writes are still durable while no
        // node was ever down; a node down may have been a crash.
        let mut window = FaultWindow {
            from_ms: 0,
            to_ms: 100,
            down: BTreeSet::new(),
            stalled: BTreeSet::new(),
            unreadable: BTreeSet::new(),
            network_clean: true,
        };
        let no_crash = CheckParams {
            fault_windows: vec![window.clone()],
            ..relaxed.clone()
        };
        assert!(matches!(
            no_lost_writes(&h.history(), &converged(&gone), &no_crash),
            Verdict::Fail(_)
        ));
        window.down.insert("n2".into());
        let crash = CheckParams {
            fault_windows: vec![window],
            ..relaxed
        };
        for verdict in [
            no_lost_writes(&h.history(), &converged(&gone), &crash),
            read_your_writes(&h.history(), &converged(&gone), &crash),
            no_resurrection(&h.history(), &converged(&gone), &crash),
        ] {
            assert!(matches!(verdict, Verdict::Skipped(_)), "{verdict:?}");
        }
    }

    #[test]
    fn lost_writes_lww_passes_with_the_greatest_survivor() {
        let (a1, b1) = (dot(A, 1), dot(B, 1));
        let mut h = Builder::new();
        h.put("v1", None, (0, Some(10)), written(a1, None)).put(
            "v2",
            None,
            (0, Some(10)),
            written(b1, None),
        );
        // v1 (timestamp 1) lost to v2 (timestamp 1, greater actor): allowed in LWW.
        let state = converged(&set(&[(b1, Some("v2"))], &[a1]));
        assert_eq!(no_lost_writes(&h.history(), &state, &lww()), Verdict::Pass);
    }

    #[test]
    fn lost_writes_lww_detects_a_phantom_or_smaller_survivor() {
        let (a1, b1) = (dot(A, 1), dot(B, 1));
        let mut h = Builder::new();
        h.put("v1", None, (0, Some(10)), written(a1, None));
        let phantom = converged(&set(&[(b1, Some("nobody wrote this"))], &[a1]));
        assert_fails(
            no_lost_writes(&h.history(), &phantom, &lww()),
            ViolationKind::Safety,
            &["phantom", "nobody wrote this"],
        );

        // v2 (b1, timestamp 1) was acknowledged and read, yet v1 survives although
        // v2 is greater.
        h.put("v2", None, (20, Some(30)), written(b1, None))
            .get((40, Some(50)), reply(&set(&[(b1, Some("v2"))], &[])));
        let smaller = converged(&set(&[(a1, Some("v1"))], &[]));
        assert_fails(
            no_lost_writes(&h.history(), &smaller, &lww()),
            ViolationKind::Safety,
            &["op #2", "op #3", "not the greatest"],
        );
    }

    // -- read_your_writes -------------------------------------------------

    #[test]
    fn read_your_writes_passes_when_the_write_or_its_successor_is_read() {
        let (a1, a2) = (dot(A, 1), dot(A, 2));
        let mut h = Builder::new();
        h.put("v1", None, (0, Some(10)), written(a1, None))
            // Concurrent with the put: may miss it.
            .get((5, Some(15)), reply(&DvvSet::default()))
            .get((20, Some(30)), reply(&set(&[(a1, Some("v1"))], &[])))
            .put(
                "v2",
                Some(&ctx(&[a1])),
                (40, Some(50)),
                written(a2, Some(&ctx(&[a1]))),
            )
            .get((60, Some(70)), reply(&set(&[(a2, Some("v2"))], &[a1])));
        assert_eq!(
            read_your_writes(&h.history(), &FinalState::default(), &params()),
            Verdict::Pass
        );
    }

    #[test]
    fn read_your_writes_detects_a_stale_read() {
        let a1 = dot(A, 1);
        let mut h = Builder::new();
        h.put("v1", None, (0, Some(10)), written(a1, None))
            .get((20, Some(30)), reply(&DvvSet::default()));
        assert_fails(
            read_your_writes(&h.history(), &FinalState::default(), &params()),
            ViolationKind::Safety,
            &["op #1", "op #2", "000000000000000a.0:1"],
        );
        let weak = CheckParams {
            r: 1,
            w: 1,
            ..params()
        };
        assert!(matches!(
            read_your_writes(&h.history(), &FinalState::default(), &weak),
            Verdict::Skipped(_)
        ));
        // A write whose reply says fallbacks' hints made up W need not be on
        // a quorum of primaries yet: it is left out.
        let mut sloppy = Builder::new();
        sloppy
            .put(
                "v1",
                None,
                (0, Some(10)),
                Outcome::Written {
                    dot: a1,
                    context: ctx(&[a1]),
                    sloppy: true,
                },
            )
            .get((20, Some(30)), reply(&DvvSet::default()));
        assert_eq!(
            read_your_writes(&sloppy.history(), &FinalState::default(), &params()),
            Verdict::Pass
        );
    }

    // -- hint drain -------------------------------------------------------

    #[test]
    fn a_hint_left_after_quiescence_fails_hint_drain() {
        let history = History::default();
        let mut state = FinalState::default();
        state.hints.insert("n1".into(), Vec::new());
        let p = params();
        let check = |state: &FinalState| hint_drain_in(&Index::new(&history, state, &p));
        assert_eq!(check(&state), Verdict::Pass);
        let owner = dynamo_proto::NodeId::from("n3");
        state.hints.insert(
            "n2".into(),
            vec![dynamo_core::handoff::hint_key(&owner, KEY.as_bytes())],
        );
        assert_fails(
            check(&state),
            ViolationKind::Liveness,
            &["n2 still holds 1 hint", "for n3"],
        );
    }

    // -- convergence ------------------------------------------------------

    #[test]
    fn convergence_passes_when_primaries_agree() {
        let a1 = dot(A, 1);
        let mut h = Builder::new();
        h.put("v1", None, (0, Some(10)), written(a1, None));
        let state = converged(&set(&[(a1, Some("v1"))], &[]));
        assert_eq!(convergence(&h.history(), &state, &params()), Verdict::Pass);
        // A key nobody wrote may be absent everywhere.
        let mut untouched = FinalState::default();
        untouched.primaries.insert(
            b"k9".to_vec(),
            NODES.iter().map(|n| n.to_string()).collect(),
        );
        assert_eq!(
            convergence(&History::default(), &untouched, &params()),
            Verdict::Pass
        );
    }

    #[test]
    fn convergence_detects_a_missing_replica() {
        let a1 = dot(A, 1);
        let mut h = Builder::new();
        h.put("v1", None, (0, Some(10)), written(a1, None));
        let v1 = set(&[(a1, Some("v1"))], &[]);
        let state = stored(&[v1.clone(), v1, DvvSet::default()]);
        assert_fails(
            convergence(&h.history(), &state, &params()),
            ViolationKind::Liveness,
            &[
                "n1: siblings [000000000000000a.0:1=\"v1\"",
                "n3: siblings []",
            ],
        );
    }

    // -- no_false_siblings ------------------------------------------------

    #[test]
    fn false_siblings_pass_for_concurrent_writes() {
        let (a1, a2, b1) = (dot(A, 1), dot(A, 2), dot(B, 1));
        let mut h = Builder::new();
        h.put("v1", None, (0, Some(10)), written(a1, None))
            .put("v2", None, (0, Some(10)), written(b1, None))
            .get(
                (20, Some(30)),
                reply(&set(&[(a1, Some("v1")), (b1, Some("v2"))], &[])),
            )
            // Indeterminate, applied: its sibling is attributed by value.
            .put("v3", Some(&ctx(&[a1])), (40, None), Outcome::TimedOut);
        let state = converged(&set(&[(a2, Some("v3")), (b1, Some("v2"))], &[a1]));
        assert_eq!(
            no_false_siblings(&h.history(), &state, &params()),
            Verdict::Pass
        );
    }

    #[test]
    fn false_siblings_detects_a_superseded_sibling() {
        let (a1, a2) = (dot(A, 1), dot(A, 2));
        let mut h = Builder::new();
        h.put("v1", None, (0, Some(10)), written(a1, None)).put(
            "v2",
            Some(&ctx(&[a1])),
            (20, Some(30)),
            written(a2, Some(&ctx(&[a1]))),
        );
        let state = converged(&set(&[(a1, Some("v1")), (a2, Some("v2"))], &[]));
        assert_fails(
            no_false_siblings(&h.history(), &state, &params()),
            ViolationKind::Safety,
            &["false sibling", "op #1", "op #2", "node n1"],
        );
    }

    #[test]
    fn false_siblings_detects_phantoms_and_double_dots() {
        let (a1, b1) = (dot(A, 1), dot(B, 1));
        let mut h = Builder::new();
        h.put("v1", None, (0, Some(10)), written(a1, None));
        let phantom = converged(&set(&[(b1, Some("ghost"))], &[]));
        assert_fails(
            no_false_siblings(&h.history(), &phantom, &params()),
            ViolationKind::Safety,
            &["phantom", "ghost"],
        );
        let tombstone = converged(&set(&[(b1, None)], &[]));
        assert_fails(
            no_false_siblings(&h.history(), &tombstone, &params()),
            ViolationKind::Safety,
            &["phantom tombstone"],
        );
        // v1 acknowledged as a1, stored under b1.
        let twice = converged(&set(&[(b1, Some("v1"))], &[]));
        assert_fails(
            no_false_siblings(&h.history(), &twice, &params()),
            ViolationKind::Safety,
            &["two dots", "op #1"],
        );
        // An indeterminate put stored under two dots on two nodes.
        let mut h = Builder::new();
        h.put("v9", None, (0, None), Outcome::Pending);
        let state = stored(&[
            set(&[(a1, Some("v9"))], &[]),
            set(&[(b1, Some("v9"))], &[]),
            DvvSet::default(),
        ]);
        assert_fails(
            no_false_siblings(&h.history(), &state, &params()),
            ViolationKind::Safety,
            &["two dots", "node n1", "node n2"],
        );
    }

    #[test]
    fn false_siblings_lww_keeps_one() {
        let (a1, b1) = (dot(A, 1), dot(B, 1));
        let mut h = Builder::new();
        h.put("v1", None, (0, Some(10)), written(a1, None))
            .put("v2", None, (0, Some(10)), written(b1, None))
            .get(
                (20, Some(30)),
                reply(&set(&[(a1, Some("v1")), (b1, Some("v2"))], &[])),
            );
        let state = converged(&set(&[(b1, Some("v2"))], &[a1]));
        assert_fails(
            no_false_siblings(&h.history(), &state, &lww()),
            ViolationKind::Safety,
            &["LWW keeps one", "op #3"],
        );
        assert_eq!(
            no_false_siblings(&h.history(), &state, &params()),
            Verdict::Pass
        );
    }

    // -- reply_contexts ---------------------------------------------------

    #[test]
    fn reply_contexts_pass_when_exact() {
        let (a1, b1, a2) = (dot(A, 1), dot(B, 1), dot(A, 2));
        let mut h = Builder::new();
        h.put("v1", None, (0, Some(10)), written(a1, None))
            .put("v2", None, (0, Some(10)), written(b1, None))
            .put(
                "v3",
                Some(&ctx(&[a1])),
                (20, Some(30)),
                written(a2, Some(&ctx(&[a1]))),
            );
        let state = converged(&set(&[(b1, Some("v2")), (a2, Some("v3"))], &[a1]));
        assert_eq!(
            reply_contexts(&h.history(), &state, &params()),
            Verdict::Pass
        );
    }

    #[test]
    fn reply_contexts_detect_a_context_covering_unseen_siblings() {
        let (a1, b1, a2) = (dot(A, 1), dot(B, 1), dot(A, 2));
        let mut h = Builder::new();
        // The third write saw only a1, but its reply also covers b1.
        h.put("v1", None, (0, Some(10)), written(a1, None))
            .put("v2", None, (0, Some(10)), written(b1, None))
            .put(
                "v3",
                Some(&ctx(&[a1])),
                (20, Some(30)),
                written(a2, Some(&ctx(&[a1, b1]))),
            );
        let state = converged(&set(&[(b1, Some("v2")), (a2, Some("v3"))], &[a1]));
        assert_fails(
            reply_contexts(&h.history(), &state, &params()),
            ViolationKind::Safety,
            &["k1", "op #3", "exactly its request context"],
        );
    }

    // -- no_resurrection --------------------------------------------------

    #[test]
    fn resurrection_passes_when_deleted_stays_deleted() {
        let (a1, a2) = (dot(A, 1), dot(A, 2));
        let mut h = Builder::new();
        h.put("v1", None, (0, Some(10)), written(a1, None))
            .delete(
                Some(&ctx(&[a1])),
                (20, Some(30)),
                written(a2, Some(&ctx(&[a1]))),
            )
            // Concurrent with the delete: may still see v1.
            .get((25, Some(35)), reply(&set(&[(a1, Some("v1"))], &[])))
            .get((40, Some(50)), reply(&set(&[(a2, None)], &[a1])));
        let state = converged(&set(&[(a2, None)], &[a1]));
        assert_eq!(
            no_resurrection(&h.history(), &state, &params()),
            Verdict::Pass
        );
    }

    #[test]
    fn resurrection_detects_a_deleted_value_read_again() {
        let (a1, a2) = (dot(A, 1), dot(A, 2));
        let mut h = Builder::new();
        h.put("v1", None, (0, Some(10)), written(a1, None))
            .delete(
                Some(&ctx(&[a1])),
                (20, Some(30)),
                written(a2, Some(&ctx(&[a1]))),
            )
            .get((40, Some(50)), reply(&set(&[(a1, Some("v1"))], &[])));
        let state = converged(&set(&[(a2, None)], &[a1]));
        assert_fails(
            no_resurrection(&h.history(), &state, &params()),
            ViolationKind::Safety,
            &["op #1", "op #2", "op #3", "superseded"],
        );
        // Under weak quorums the stale read is allowed.
        let weak = CheckParams {
            r: 1,
            w: 1,
            ..params()
        };
        assert_eq!(no_resurrection(&h.history(), &state, &weak), Verdict::Pass);
        assert!(matches!(
            no_resurrection(&h.history(), &state, &lww()),
            Verdict::Skipped(_)
        ));
    }

    #[test]
    fn resurrection_detects_a_deleted_value_in_the_final_state() {
        let (a1, a2) = (dot(A, 1), dot(A, 2));
        let mut h = Builder::new();
        h.put("v1", None, (0, Some(10)), written(a1, None)).delete(
            Some(&ctx(&[a1])),
            (20, Some(30)),
            written(a2, Some(&ctx(&[a1]))),
        );
        // One primary resurrected v1 with a fresh context.
        let state = stored(&[
            set(&[(a2, None)], &[a1]),
            set(&[(a2, None)], &[a1]),
            set(&[(a1, Some("v1"))], &[]),
        ]);
        // Merged, the two tombstoned replicas drop v1...
        assert_eq!(
            no_resurrection(&h.history(), &state, &params()),
            Verdict::Pass
        );
        // ...but not when every primary holds it next to the tombstone.
        let both = converged(&set(&[(a1, Some("v1")), (a2, None)], &[]));
        assert_fails(
            no_resurrection(&h.history(), &both, &params()),
            ViolationKind::Safety,
            &["merged final state", "op #1", "op #2"],
        );
    }

    // -- availability -----------------------------------------------------

    fn windows() -> Vec<FaultWindow> {
        vec![
            FaultWindow {
                from_ms: 0,
                to_ms: 10_000,
                down: ["n1".to_string(), "n2".to_string()].into(),
                stalled: BTreeSet::new(),
                unreadable: BTreeSet::new(),
                network_clean: true,
            },
            FaultWindow {
                from_ms: 10_000,
                to_ms: 30_000,
                down: ["n3".to_string()].into(),
                stalled: BTreeSet::new(),
                unreadable: BTreeSet::new(),
                network_clean: true,
            },
        ]
    }

    /// The availability verdict on a history of the one op `make` adds.
    fn judge(make: impl FnOnce(&mut Builder), windows: Vec<FaultWindow>) -> Verdict {
        let mut h = Builder::new();
        make(&mut h);
        let p = CheckParams {
            fault_windows: windows,
            ..params()
        };
        availability(&h.history(), &converged(&DvvSet::default()), &p)
    }

    fn timed_out_put(invoked: u64, node: &'static str) -> impl FnOnce(&mut Builder) {
        move |h| {
            h.put(
                "v",
                None,
                (invoked, Some(invoked + 1_000)),
                Outcome::TimedOut,
            )
            .to(node);
        }
    }

    fn is_failure(verdict: Verdict) -> bool {
        matches!(verdict, Verdict::Fail(_))
    }

    /// Each excuse, and the same op without it.
    #[test]
    fn availability_blames_only_ops_without_an_excuse() {
        // Two of three primaries down: W = 2 cannot be met, but R = 1 can.
        assert_eq!(judge(timed_out_put(5_000, "n3"), windows()), Verdict::Pass);
        let weak_get = |h: &mut Builder| {
            h.op(
                OpKind::Get {
                    key: KEY.as_bytes().to_vec(),
                    r: Some(1),
                },
                (5_000, Some(6_000)),
                Outcome::TimedOut,
            )
            .to("n3");
        };
        assert!(is_failure(judge(weak_get, windows())));
        // Within the detector grace of the second window, then just after it.
        assert_eq!(judge(timed_out_put(12_999, "n1"), windows()), Verdict::Pass);
        assert!(is_failure(judge(timed_out_put(13_000, "n1"), windows())));
        // Its lifetime runs past the window's end, then just fits.
        assert_eq!(judge(timed_out_put(29_001, "n1"), windows()), Verdict::Pass);
        assert!(is_failure(judge(timed_out_put(29_000, "n1"), windows())));
        // Sent to a node that is down, then to one that is up.
        assert_eq!(judge(timed_out_put(20_000, "n3"), windows()), Verdict::Pass);
        // A lossy network.
        let mut lossy = windows();
        lossy[1].network_clean = false;
        assert_eq!(judge(timed_out_put(20_000, "n1"), lossy), Verdict::Pass);
        // A definite failure is the client's problem; a pending op is not judged.
        let failed = |definite| {
            move |h: &mut Builder| {
                h.put(
                    "v",
                    None,
                    (20_000, Some(20_001)),
                    Outcome::Failed {
                        message: "too many siblings".into(),
                        definite,
                    },
                )
                .to("n1");
            }
        };
        assert_eq!(judge(failed(true), windows()), Verdict::Pass);
        assert!(is_failure(judge(failed(false), windows())));
        let pending = |h: &mut Builder| {
            h.put("v", None, (20_000, None), Outcome::Pending).to("n1");
        };
        assert_eq!(judge(pending, windows()), Verdict::Pass);
        // In the second window n3 is down; with n2's disk stalled too, W = 2
        // cannot be met, but a read with R = 2 still can.
        let mut stalled = windows();
        stalled[1].stalled.insert("n2".into());
        assert_eq!(
            judge(timed_out_put(20_000, "n1"), stalled.clone()),
            Verdict::Pass
        );
        let get = |h: &mut Builder| {
            h.get((20_000, Some(21_000)), Outcome::TimedOut).to("n1");
        };
        assert!(is_failure(judge(get, stalled)));
        // With n2 unable to read its disk instead, neither can be met.
        let mut unreadable = windows();
        unreadable[1].unreadable.insert("n2".into());
        assert_eq!(
            judge(timed_out_put(20_000, "n1"), unreadable.clone()),
            Verdict::Pass
        );
        assert_eq!(judge(get, unreadable), Verdict::Pass);
        // Without fault windows the checker does not run.
        assert!(matches!(
            judge(timed_out_put(20_000, "n1"), Vec::new()),
            Verdict::Skipped(_)
        ));
        // Unknown primaries: not judged.
        let mut h = Builder::new();
        timed_out_put(20_000, "n1")(&mut h);
        let p = CheckParams {
            fault_windows: windows(),
            ..params()
        };
        let mut state = converged(&DvvSet::default());
        assert!(is_failure(availability(&h.history(), &state, &p)));
        state.primaries.clear();
        assert_eq!(availability(&h.history(), &state, &p), Verdict::Pass);
    }

    #[test]
    fn under_a_sloppy_quorum_writes_must_succeed_while_fallbacks_can_stand_in() {
        // Window one: n1 and n2, two of the three primaries, are down; a put
        // (W = 2) sent to n3 is excused with no other node, and not with n4
        // up beside the primaries to stand in for one of them.
        let mut h = Builder::new();
        timed_out_put(5_000, "n3")(&mut h);
        let sloppy = CheckParams {
            fault_windows: windows(),
            sloppy_quorum: true,
            ..params()
        };
        let mut state = converged(&DvvSet::default());
        assert_eq!(availability(&h.history(), &state, &sloppy), Verdict::Pass);
        state.stored.insert("n4".into(), BTreeMap::new());
        assert_fails(
            availability(&h.history(), &state, &sloppy),
            ViolationKind::Liveness,
            &["op #1", "1 fallback(s) able to stand in"],
        );
        // Not with a strict quorum, nor with the spare node's disk stalled.
        let strict = CheckParams {
            sloppy_quorum: false,
            ..sloppy.clone()
        };
        assert_eq!(availability(&h.history(), &state, &strict), Verdict::Pass);
        let mut stalled = sloppy.clone();
        stalled.fault_windows[0].stalled.insert("n4".into());
        assert_eq!(availability(&h.history(), &state, &stalled), Verdict::Pass);
        // A get gets no fallbacks: R = 2 with two primaries down is excused.
        let mut h = Builder::new();
        h.get((5_000, Some(6_000)), Outcome::TimedOut).to("n3");
        assert_eq!(availability(&h.history(), &state, &sloppy), Verdict::Pass);
    }

    #[test]
    fn availability_detects_a_failure_with_a_quorum_up() {
        let mut h = Builder::new();
        h.get(
            (20_000, Some(20_500)),
            Outcome::Failed {
                message: "quorum: 1 of 2 replied".into(),
                definite: false,
            },
        );
        let p = CheckParams {
            fault_windows: windows(),
            ..params()
        };
        assert_fails(
            availability(&h.history(), &converged(&DvvSet::default()), &p),
            ViolationKind::Liveness,
            &[
                "op #1",
                "quorum: 1 of 2 replied",
                "1 of its primaries",
                "N - R",
            ],
        );
    }

    // -- all together -----------------------------------------------------

    /// A realistic run built with the core's own write and merge: a chain of
    /// puts with reply contexts, a concurrent blind put, a resolving put and a
    /// delete, replicated to every primary. Every checker passes.
    #[test]
    fn check_all_passes_on_a_history_made_by_the_core() {
        let mut h = Builder::new();
        let mut stored_set = DvvSet::default();
        let mut now = 0;
        let mut apply = |h: &mut Builder,
                         stored_set: &mut DvvSet,
                         value: Option<&str>,
                         context: Option<&Context>,
                         actor: Actor| {
            now += 100;
            let out = write(
                stored_set,
                context,
                WriteMode::Context,
                value.map(|v| v.as_bytes().to_vec()),
                actor,
                Hlc {
                    wall_ms: now,
                    logical: 0,
                },
                Versioning::Dvv,
                DEFAULT_MAX_SIBLINGS,
            )
            .unwrap();
            *stored_set = out.set.clone();
            let outcome = Outcome::Written {
                dot: out.dot,
                context: out.reply_context.clone(),
                sloppy: false,
            };
            match value {
                Some(v) => h.put(v, context, (now, Some(now + 10)), outcome),
                None => h.delete(context, (now, Some(now + 10)), outcome),
            };
            h.get((now + 20, Some(now + 30)), reply(stored_set));
            out.reply_context
        };
        let c1 = apply(&mut h, &mut stored_set, Some("x1"), None, A);
        let _ = apply(&mut h, &mut stored_set, Some("x2"), Some(&c1), B);
        let _ = apply(&mut h, &mut stored_set, Some("y"), None, A);
        let read = stored_set.context.clone();
        let c4 = apply(&mut h, &mut stored_set, Some("xy"), Some(&read), B);
        let _ = apply(&mut h, &mut stored_set, None, Some(&c4), A);
        let state = converged(&stored_set);
        let p = CheckParams {
            fault_windows: vec![FaultWindow {
                from_ms: 0,
                to_ms: 100_000,
                down: BTreeSet::new(),
                stalled: BTreeSet::new(),
                unreadable: BTreeSet::new(),
                network_clean: true,
            }],
            ..params()
        };
        let reports = check_all(&h.history(), &state, &p);
        let names: Vec<&str> = reports.iter().map(|r| r.name).collect();
        assert_eq!(
            names,
            [
                "no_lost_writes",
                "reply_contexts",
                "read_your_writes",
                "convergence",
                "no_false_siblings",
                "no_resurrection",
                "availability",
                "hint_drain"
            ]
        );
        for report in &reports {
            assert_eq!(report.verdict, Verdict::Pass, "{report}");
        }
        assert_eq!(stored_set.siblings.len(), 1);
    }
}
