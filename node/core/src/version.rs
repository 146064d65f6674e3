//! The versioning rules: how a key's [`DvvSet`] is merged, how a coordinator
//! writes into it with a client's causal context, and how last-write-wins prunes it.
//!
//! The types live in `dynamo_proto::version` as plain data; this module is the one
//! place that may change what they mean. Everything here is a pure function of its
//! arguments (the hybrid clock is fed an injected wall clock), so replicas, the
//! simulator and the production node all compute the same versions.
//!
//! # The model
//!
//! A [`DvvSet`] is a dot store with a causal context (Almeida et al.'s causal
//! CRDTs, with the semantics of Riak 2.0's dvvset). Every write is named by a
//! [`Dot`]; the context is the set of dots the holder knows of, live or
//! superseded; the siblings are the known writes that nothing known supersedes.
//! A [`Context`] may carry exception dots besides its version vector, so a put's
//! reply can say "the new dot and exactly what the client saw" without covering a
//! sibling the client never saw.
//!
//! - [`merge`] is the join of a semilattice (commutative, associative,
//!   idempotent): replicas may exchange and re-exchange sets in any order and
//!   converge. A dot survives a merge when both sides hold it, or when the other
//!   side has never heard of it.
//! - [`write`] supersedes exactly the dots its request context covers. A write
//!   without a context covers nothing and adds a sibling; `WriteMode::Overwrite`
//!   (the Redis `SET`) also supersedes everything the coordinator holds.
//! - [`Versioning::Lww`] keeps a single winner per key, the greatest by
//!   `(timestamp, actor, counter)`. It can drop concurrent writes, and under
//!   clock skew it can drop a write that causally followed the winner.
//!
//! # Why the version vector never lies
//!
//! Only a coordinator mints dots for its actor, always on top of its own stored
//! set, and its actor changes (an epoch bump) on every restart. So a context whose
//! version vector says `vv[a] = n` really has accounted for every dot `(a, 1..=n)`:
//! no replica can later produce a dot of `a` at or below `n` that the context
//! has not seen, and a dot a crash lost is simply never reused.
//!
//! # What this module must never do
//!
//! - Read a clock, draw randomness, or iterate in a randomly seeded order: the
//!   same inputs must give the same versions on every node and in every run.
//! - Let a merge resurrect a dot that one side's context covers and has dropped,
//!   or drop a dot the other side has never heard of (that would lose a write).
//! - Return a reply context that covers a sibling the writer's context did not
//!   cover: a client holding it would silently supersede a write it never saw.

use dynamo_proto::{Actor, Context, Dot, DvvSet, Hlc, Sibling, WriteMode};
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::collections::BTreeMap;

/// How a cluster resolves concurrent writes to a key. Chosen at cluster creation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Versioning {
    /// Keep every concurrent write as a sibling until a client resolves them by
    /// writing back with the context of a read. Never drops an acknowledged write.
    #[default]
    Dvv,
    /// Keep only the write with the greatest `(timestamp, actor, counter)`.
    ///
    /// This drops concurrent writes silently, and because timestamps come from
    /// node clocks it can also drop a later write whose coordinator's clock runs
    /// behind (a delete can lose to the value it meant to delete). The context is
    /// still tracked: it covers every write the holder knows of, dropped or not.
    Lww,
}

/// The default bound on the siblings (tombstones included) a key may hold.
pub const DEFAULT_MAX_SIBLINGS: usize = 16;

/// Why a write was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    /// The write would leave more concurrent versions than the cluster allows.
    #[error(
        "the key would have {count} concurrent versions (siblings), more than the limit of \
         {limit}: read the key, resolve the siblings into one value and write it back with \
         the read's context"
    )]
    TooManySiblings { count: usize, limit: usize },

    /// The request's context names a version of the coordinator's own actor
    /// that it never minted (only it mints them, on top of its local set, which
    /// holds every one): the context was altered or is from elsewhere.
    #[error(
        "the context names version {claimed} of this node's current actor {actor}, which has \
         written only {minted} versions of this key: pass the context exactly as a read returned it"
    )]
    UnknownVersion {
        actor: Actor,
        claimed: u64,
        minted: u64,
    },

    /// The request's context names a version counter past [`MAX_COUNTER`],
    /// which no node reaches: the context was altered. Taken, it would use up
    /// the counters of that actor (another node's, which this one cannot check)
    /// for the key, and that node could write the key no more.
    #[error(
        "the context names version {claimed} of actor {actor}, past any version a node writes          (at most {limit}): pass the context exactly as a read returned it"
    )]
    ImplausibleCounter {
        actor: Actor,
        claimed: u64,
        limit: u64,
    },

    /// The coordinator's actor has no counter left for this key (a context
    /// stored before contexts were bounded by [`MAX_COUNTER`] can claim one near
    /// `u64::MAX`); a restart of the node gives it a new actor.
    #[error(
        "the key's version counter of this node's actor {actor} is exhausted; write through \
         another node, or restart this one (it then writes as a new actor)"
    )]
    CounterExhausted { actor: Actor },

    /// The write would grow the key's causal context past the limit.
    #[error(
        "the key's context would name {entries} versions, more than the limit of {limit}: pass \
         the context exactly as a read of this key returned it"
    )]
    ContextTooLarge { entries: usize, limit: usize },
}

/// The most entries (version-vector actors plus exceptional dots) a write may
/// grow a key's context to. A real context names a few actors per node that
/// ever coordinated a write of the key (a node takes a new actor each start);
/// the bound keeps a stored set, and every reply and replication carrying it,
/// far inside a frame (about 14 bytes an entry, against the frame's 1 MiB of
/// room beyond the values) whatever contexts clients send.
pub const MAX_CONTEXT_ENTRIES: usize = 10_000;

/// The largest version counter a client's context may name. A node mints one
/// counter per write of a key as one actor (a new actor each start), so no
/// counter comes near it (2^62 writes of one key at a million a second take
/// 146,000 years); past it, a context was altered. It leaves 2^62 counters
/// above any claim, so no claim can exhaust another node's actor.
pub const MAX_COUNTER: u64 = 1 << 62;

/// The first entry of `ctx` (by actor, then dot) that names a counter past
/// [`MAX_COUNTER`].
fn check_counters(ctx: &Context) -> Result<(), VersionError> {
    let named = ctx.vv.iter().map(|(actor, counter)| (*actor, *counter));
    let dots = ctx.dots.iter().map(|dot| (dot.actor, dot.counter));
    let past = named
        .chain(dots)
        .find(|&(_, counter)| counter > MAX_COUNTER);
    match past {
        Some((actor, claimed)) => Err(VersionError::ImplausibleCounter {
            actor,
            claimed,
            limit: MAX_COUNTER,
        }),
        None => Ok(()),
    }
}

/// Entries in a context: its version-vector actors and its exceptional dots.
pub fn context_entries(ctx: &Context) -> usize {
    ctx.vv.len() + ctx.dots.len()
}

/// What a coordinator's [`write`] produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteOutcome {
    /// The coordinator's new stored set, to persist and send to the replicas.
    pub set: DvvSet,
    /// The dot minted for this write.
    pub dot: Dot,
    /// The context to return to the client: the request's context plus the new
    /// dot. It covers no sibling the request's context did not cover, so a client
    /// chaining writes with it supersedes only its own earlier writes.
    pub reply_context: Context,
}

/// True when `ctx` covers `dot`: its counter is within the version vector's entry
/// for the actor, or the dot is one of the exceptions. Counter 0 is never minted
/// and counts as covered.
pub fn covers(ctx: &Context, dot: &Dot) -> bool {
    dot.counter <= vv_entry(ctx, &dot.actor) || ctx.dots.contains(dot)
}

/// Adds `dot` to a compact context and keeps it compact: a dot already covered
/// changes nothing; a dot contiguous with the version vector is absorbed into it,
/// together with any exception dots that then become contiguous; any other dot
/// becomes an exception.
///
/// Counters may reach `u64::MAX` (a stored set or a peer's is not bounded by
/// [`MAX_COUNTER`]): the absorbed run stops there, since no dot lies past it.
pub fn context_insert(ctx: &mut Context, dot: Dot) {
    let seen = vv_entry(ctx, &dot.actor);
    if dot.counter <= seen {
        return;
    }
    if dot.counter - seen > 1 {
        ctx.dots.insert(dot);
        return;
    }
    let mut top = dot.counter;
    while let Some(next) = top.checked_add(1) {
        let absorbed = ctx.dots.remove(&Dot {
            actor: dot.actor,
            counter: next,
        });
        if !absorbed {
            break;
        }
        top = next;
    }
    ctx.vv.insert(dot.actor, top);
}

/// Makes `into` cover the union of what it and `other` cover, compacted.
pub fn context_merge(into: &mut Context, other: &Context) {
    for (actor, &counter) in &other.vv {
        let entry = into.vv.entry(*actor).or_insert(0);
        *entry = (*entry).max(counter);
    }
    into.dots.extend(other.dots.iter().copied());
    compact(into);
}

/// Brings a context to its canonical form: no zero entries in the version vector,
/// no exception dot the version vector already covers, no exception dot
/// contiguous with it. Two contexts cover the same dots exactly when their
/// compact forms are equal. Contexts received from clients should be compacted.
pub fn compact(ctx: &mut Context) {
    ctx.vv.retain(|_, counter| *counter > 0);
    if ctx.dots.is_empty() {
        return;
    }
    let dots = std::mem::take(&mut ctx.dots);
    // Dots sort by actor then counter, so one pass absorbs every run that becomes
    // contiguous with the version vector.
    for dot in dots {
        let seen = vv_entry(ctx, &dot.actor);
        if dot.counter <= seen {
            continue;
        }
        if dot.counter - seen == 1 {
            ctx.vv.insert(dot.actor, dot.counter);
        } else {
            ctx.dots.insert(dot);
        }
    }
}

/// The highest counter of `actor` that `ctx` covers (0 when none).
pub fn max_counter(ctx: &Context, actor: &Actor) -> u64 {
    let exceptions = ctx
        .dots
        .range(
            Dot {
                actor: *actor,
                counter: 0,
            }..=Dot {
                actor: *actor,
                counter: u64::MAX,
            },
        )
        .next_back()
        .map_or(0, |dot| dot.counter);
    vv_entry(ctx, actor).max(exceptions)
}

/// True when the set keeps its invariants: every sibling's dot is covered by the
/// set's context, and the context is compact (what [`compact`] leaves as it is:
/// no zero entry in the version vector, no exception dot that the version vector
/// covers or that is contiguous with it). A set that breaks them could be served
/// with a sibling its own context does not account for, and a coordinator that
/// mints past its context's counter would reuse such a sibling's dot; so every
/// set read from the disk or received from a peer is checked with this. One map
/// lookup per entry, no allocation.
///
/// Counters are not bounded here: a client's context may name any counter up to
/// [`MAX_COUNTER`] of another actor, which that actor then mints past, and a set
/// stored before contexts were bounded may name `u64::MAX`. Refusing either
/// would make the key unreadable; the arithmetic on them cannot overflow, and a
/// write that finds its actor's counters used up is refused with
/// [`VersionError::CounterExhausted`].
pub fn is_well_formed(set: &DvvSet) -> bool {
    malformation(set).is_none()
}

/// What breaks [`is_well_formed`] in `set`, if anything: the first broken rule,
/// naming the actor or dot, for an operator reading the error.
pub fn malformation(set: &DvvSet) -> Option<String> {
    let ctx = &set.context;
    if let Some((actor, _)) = ctx.vv.iter().find(|&(_, &counter)| counter == 0) {
        return Some(format!(
            "its context's version vector holds counter 0 for {actor}"
        ));
    }
    if let Some(dot) = ctx
        .dots
        .iter()
        .find(|dot| dot.counter.saturating_sub(vv_entry(ctx, &dot.actor)) <= 1)
    {
        return Some(format!(
            "its context is not compact: exception dot {dot} is covered by or next to its \
             version vector"
        ));
    }
    set.siblings
        .keys()
        .find(|dot| !covers(ctx, dot))
        .map(|dot| format!("sibling {dot} is not covered by its context"))
}

/// The replication and read-repair merge of two sets (see [`merge_into`]).
pub fn merge(a: &DvvSet, b: &DvvSet, mode: Versioning) -> DvvSet {
    let mut merged = a.clone();
    merge_into(&mut merged, b, mode);
    merged
}

/// Merges `other` into `into`; returns true when `into` changed.
///
/// The siblings kept are those both sides hold, plus those one side holds that
/// the other side's context does not cover (it has never heard of them). A
/// sibling one side's context covers but that side no longer holds was
/// superseded there, and stays superseded. The contexts are united.
///
/// In LWW mode only the greatest sibling by `(timestamp, actor, counter)` among
/// both sides' siblings is kept, whatever the contexts say (see below); the
/// context keeps covering the dropped ones.
pub fn merge_into(into: &mut DvvSet, other: &DvvSet, mode: Versioning) -> bool {
    let mut changed = false;
    match mode {
        Versioning::Dvv => {
            let before = into.siblings.len();
            into.siblings
                .retain(|dot, _| other.siblings.contains_key(dot) || !covers(&other.context, dot));
            changed |= into.siblings.len() != before;
            for (dot, theirs) in &other.siblings {
                match into.siblings.get_mut(dot) {
                    Some(ours) => {
                        // One dot is one write, so both sides hold the same
                        // sibling. Should they ever differ, pick one
                        // deterministically so the merge still commutes.
                        if sibling_order(theirs, ours) == Ordering::Greater {
                            *ours = theirs.clone();
                            changed = true;
                        }
                    }
                    None => {
                        if !covers(&into.context, dot) {
                            into.siblings.insert(*dot, theirs.clone());
                            changed = true;
                        }
                    }
                }
            }
        }
        // LWW keeps the greatest sibling of the union rather than of the causal
        // merge. The causal merge followed by "keep the winner" is not
        // associative: a write may supersede (by context) a winner whose
        // timestamp it cannot know, and then which of the two survives, or
        // whether either does, would depend on the order replicas merged in.
        // The plain maximum is a semilattice, and it is exactly the rule
        // "the survivor has the greatest timestamp of all writes".
        Versioning::Lww => {
            changed |= keep_only_winner(into);
            if let Some((dot, sibling)) = winner(other) {
                let beats_ours = match winner(into) {
                    None => true,
                    Some(ours) => lww_order((dot, sibling), ours) == Ordering::Greater,
                };
                if beats_ours {
                    into.siblings.clear();
                    into.siblings.insert(*dot, sibling.clone());
                    changed = true;
                }
            }
        }
    }
    if !context_includes(&into.context, &other.context) {
        context_merge(&mut into.context, &other.context);
        changed = true;
    }
    changed
}

/// A coordinator's write.
///
/// `context` is the client's causal context; `None` covers nothing (adds a
/// sibling). `WriteMode::Overwrite` supersedes everything the coordinator holds,
/// as a Redis `SET` does: the request context becomes the local set's context
/// (united with the client's context if one was given). A delete is a write with
/// `value == None`; it leaves a tombstone that carries the context.
///
/// The new dot is `actor`'s next counter after every dot of `actor` known to the
/// local set or to the request context. Only this coordinator mints dots for
/// `actor`, on top of its own stored set, so the dot is new.
///
/// In DVV mode, the new siblings are the local siblings the request context does
/// not cover, plus the new write. If that is more than `max_siblings` the write is
/// refused with [`VersionError::TooManySiblings`] and nothing changes.
///
/// In LWW mode the set keeps only the winner of the local siblings and the new
/// write: the new write loses, and is dropped although acknowledged, to a local
/// sibling with a greater timestamp, even one its context covers (clock skew).
/// The shell should take `timestamp` from [`HlcClock::stamp_after`] with the
/// newest local sibling's timestamp, so that a coordinator never loses to what
/// it already holds.
#[allow(clippy::too_many_arguments)]
pub fn write(
    local: &DvvSet,
    context: Option<&Context>,
    write_mode: WriteMode,
    value: Option<Vec<u8>>,
    actor: Actor,
    timestamp: Hlc,
    versioning: Versioning,
    max_siblings: usize,
) -> Result<WriteOutcome, VersionError> {
    if let Some(context) = context {
        check_counters(context)?;
    }
    let request_context = match write_mode {
        WriteMode::Context => {
            let mut request = context.cloned().unwrap_or_default();
            // A client's context arrives from the wire; the reply must be canonical.
            compact(&mut request);
            request
        }
        WriteMode::Overwrite => {
            let mut request = local.context.clone();
            if let Some(context) = context {
                context_merge(&mut request, context);
            }
            compact(&mut request);
            request
        }
    };
    let minted = max_counter(&local.context, &actor);
    let claimed = max_counter(&request_context, &actor);
    if claimed > minted {
        return Err(VersionError::UnknownVersion {
            actor,
            claimed,
            minted,
        });
    }
    let counter = minted
        .checked_add(1)
        .ok_or(VersionError::CounterExhausted { actor })?;
    let dot = Dot { actor, counter };
    let new_sibling = Sibling { value, timestamp };

    let mut siblings: BTreeMap<Dot, Sibling> = match versioning {
        Versioning::Dvv => local
            .siblings
            .iter()
            .filter(|(dot, _)| !covers(&request_context, dot))
            .map(|(dot, sibling)| (*dot, sibling.clone()))
            .collect(),
        Versioning::Lww => local
            .siblings
            .iter()
            .max_by(|x, y| lww_order(*x, *y))
            .map(|(dot, sibling)| (*dot, sibling.clone()))
            .into_iter()
            .collect(),
    };
    siblings.insert(dot, new_sibling);
    let mut set = DvvSet {
        context: local.context.clone(),
        siblings,
    };
    if versioning == Versioning::Lww {
        keep_only_winner(&mut set);
    }
    if set.siblings.len() > max_siblings {
        return Err(VersionError::TooManySiblings {
            count: set.siblings.len(),
            limit: max_siblings,
        });
    }

    context_merge(&mut set.context, &request_context);
    context_insert(&mut set.context, dot);
    // Only a context that grows is refused: a key whose context passed the
    // limit (merged from several coordinators' writes) stays writable with
    // the context a read of it returns.
    let entries = context_entries(&set.context);
    if entries > MAX_CONTEXT_ENTRIES && entries > own_growth(&local.context, dot) {
        return Err(VersionError::ContextTooLarge {
            entries,
            limit: MAX_CONTEXT_ENTRIES,
        });
    }
    let mut reply_context = request_context;
    context_insert(&mut reply_context, dot);
    Ok(WriteOutcome {
        set,
        dot,
        reply_context,
    })
}

/// Entries in `ctx` once it also covers `dot`: what a write grows a context to
/// when its request context adds nothing.
fn own_growth(ctx: &Context, dot: Dot) -> usize {
    let mut ctx = ctx.clone();
    context_insert(&mut ctx, dot);
    context_entries(&ctx)
}

/// The deterministic winner among the siblings: the greatest by
/// `(timestamp, actor, counter)`. Tombstones can win. `None` when there are none.
pub fn winner(set: &DvvSet) -> Option<(&Dot, &Sibling)> {
    set.siblings.iter().max_by(|x, y| lww_order(*x, *y))
}

/// True when every sibling is a tombstone, or there is none: a read finds nothing.
pub fn is_deleted(set: &DvvSet) -> bool {
    set.siblings.values().all(|sibling| sibling.value.is_none())
}

/// How far ahead of this node's own wall clock a timestamp seen from a peer or
/// the disk may move its [`HlcClock`] (`--max-clock-drift-ms`). One minute:
/// far above the skew of clocks kept by NTP, far below a clock set wrong.
pub const DEFAULT_MAX_CLOCK_DRIFT_MS: u64 = 60_000;

/// A hybrid logical clock fed by an injected wall clock (milliseconds).
///
/// Timestamps it hands out strictly increase even when the wall clock stalls or
/// goes backwards, and never fall behind a timestamp it has observed, so a
/// write coordinated after seeing another's version within the drift bound is
/// stamped later than it (beyond the bound, see below).
///
/// The bound keeps one bad clock from moving every clock for good: a timestamp
/// more than `max_drift_ms` ahead of this node's wall clock (a peer whose clock
/// was set a year ahead, a damaged or hostile set) is not observed, and counted
/// instead. Without it, a single such sibling would stamp every later write of
/// this node, and of every node that saw those, at that far-off time. A write
/// that supersedes such a sibling is still stamped after it ([`stamp_after`]),
/// so last-write-wins keeps the newer write on that key; only that key's
/// timestamps carry the far-off time.
///
/// [`stamp_after`]: HlcClock::stamp_after
#[derive(Clone, Debug)]
pub struct HlcClock {
    last: Hlc,
    max_drift_ms: u64,
    far_future: u64,
}

impl Default for HlcClock {
    fn default() -> Self {
        Self::new()
    }
}

impl HlcClock {
    /// A clock that has handed out nothing and observed nothing, with the
    /// default drift bound.
    pub fn new() -> Self {
        Self::with_max_drift(DEFAULT_MAX_CLOCK_DRIFT_MS)
    }

    /// As [`HlcClock::new`], with observed timestamps bounded to `max_drift_ms`
    /// ahead of the wall clock.
    pub fn with_max_drift(max_drift_ms: u64) -> Self {
        HlcClock {
            last: Hlc::default(),
            max_drift_ms,
            far_future: 0,
        }
    }

    /// The next timestamp, given the wall clock's reading: strictly greater than
    /// every timestamp this method returned or the clock observed before (a
    /// far-future [`stamp_after`] is neither), except past the
    /// greatest timestamp there is, which it keeps handing out. Only a hostile
    /// or damaged timestamp could take it there, and the drift bound keeps those
    /// out; wrapping round instead would stamp every later write as older than
    /// what it replaces.
    ///
    /// [`stamp_after`]: HlcClock::stamp_after
    pub fn now(&mut self, wall_ms: u64) -> Hlc {
        let next = if wall_ms > self.last.wall_ms {
            Hlc {
                wall_ms,
                logical: 0,
            }
        } else {
            successor(self.last)
        };
        self.last = next;
        next
    }

    /// Takes note of a timestamp seen from another node or the disk, so the
    /// next [`now`] is later than it, unless it is more than the drift bound
    /// ahead of `wall_ms`: then the clock does not move, the timestamp is
    /// counted ([`far_future`]) and this returns false.
    ///
    /// [`now`]: HlcClock::now
    /// [`far_future`]: HlcClock::far_future
    pub fn observe(&mut self, seen: Hlc, wall_ms: u64) -> bool {
        if seen.wall_ms > wall_ms.saturating_add(self.max_drift_ms) {
            self.far_future += 1;
            return false;
        }
        self.last = self.last.max(seen);
        true
    }

    /// The timestamp for a write that supersedes versions stamped up to
    /// `floor` (the newest sibling the writer holds): [`now`] after observing
    /// `floor`, or, when `floor` lies beyond the drift bound, the timestamp
    /// just after it. Either way the write sorts after what it replaces (but
    /// for a hostile `floor` at the greatest timestamp there is, which it
    /// ties: the dot decides), and a far-future `floor` does not move the
    /// clock.
    ///
    /// [`now`]: HlcClock::now
    pub fn stamp_after(&mut self, wall_ms: u64, floor: Option<Hlc>) -> Hlc {
        if let Some(floor) = floor {
            if !self.observe(floor, wall_ms) {
                let own = self.now(wall_ms);
                return own.max(successor(floor));
            }
        }
        self.now(wall_ms)
    }

    /// The greatest timestamp handed out or observed so far.
    pub fn last(&self) -> Hlc {
        self.last
    }

    /// How many timestamps were not observed for lying beyond the drift bound.
    pub fn far_future(&self) -> u64 {
        self.far_future
    }
}

/// The least timestamp after `t`; past the greatest there is, `t` itself.
fn successor(t: Hlc) -> Hlc {
    if t.logical < u32::MAX {
        Hlc {
            wall_ms: t.wall_ms,
            logical: t.logical + 1,
        }
    } else {
        // Four billion events in one millisecond: borrow the next one.
        match t.wall_ms.checked_add(1) {
            Some(wall_ms) => Hlc {
                wall_ms,
                logical: 0,
            },
            None => t,
        }
    }
}

fn vv_entry(ctx: &Context, actor: &Actor) -> u64 {
    ctx.vv.get(actor).copied().unwrap_or(0)
}

/// True when `ctx` covers every dot `other` covers.
fn context_includes(ctx: &Context, other: &Context) -> bool {
    other
        .vv
        .iter()
        .all(|(actor, &counter)| counter <= vv_entry(ctx, actor) || covers_run(ctx, actor, counter))
        && other.dots.iter().all(|dot| covers(ctx, dot))
}

/// True when `ctx` covers every dot `(actor, 1..=counter)`.
fn covers_run(ctx: &Context, actor: &Actor, counter: u64) -> bool {
    let seen = vv_entry(ctx, actor);
    if counter <= seen {
        return true;
    }
    // The exceptions are distinct dots, so the run is covered exactly when all
    // `counter - seen` of its dots are among them.
    let run = Dot {
        actor: *actor,
        counter: seen + 1,
    }..=Dot {
        actor: *actor,
        counter,
    };
    ctx.dots.range(run).count() as u64 == counter - seen
}

/// The LWW order: timestamp, then actor, then counter (the dot's own order).
fn lww_order(x: (&Dot, &Sibling), y: (&Dot, &Sibling)) -> Ordering {
    x.1.timestamp.cmp(&y.1.timestamp).then_with(|| x.0.cmp(y.0))
}

/// A total order on siblings with the same dot, used only to stay deterministic
/// if two replicas ever disagree about one write.
fn sibling_order(x: &Sibling, y: &Sibling) -> Ordering {
    x.timestamp
        .cmp(&y.timestamp)
        .then_with(|| x.value.cmp(&y.value))
}

/// Drops every sibling but the winner; true when something was dropped.
fn keep_only_winner(set: &mut DvvSet) -> bool {
    if set.siblings.len() <= 1 {
        return false;
    }
    let Some((dot, sibling)) = winner(set).map(|(dot, sibling)| (*dot, sibling.clone())) else {
        return false;
    };
    set.siblings.clear();
    set.siblings.insert(dot, sibling);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Actor = Actor {
        incarnation: 1,
        epoch: 0,
    };
    const B: Actor = Actor {
        incarnation: 2,
        epoch: 0,
    };

    fn ts(wall_ms: u64) -> Hlc {
        Hlc {
            wall_ms,
            logical: 0,
        }
    }

    fn put(
        local: &DvvSet,
        context: Option<&Context>,
        value: &str,
        actor: Actor,
        wall_ms: u64,
    ) -> WriteOutcome {
        write(
            local,
            context,
            WriteMode::Context,
            Some(value.as_bytes().to_vec()),
            actor,
            ts(wall_ms),
            Versioning::Dvv,
            DEFAULT_MAX_SIBLINGS,
        )
        .unwrap()
    }

    fn values(set: &DvvSet) -> Vec<Option<&[u8]>> {
        set.siblings
            .values()
            .map(|sibling| sibling.value.as_deref())
            .collect()
    }

    fn dot(actor: Actor, counter: u64) -> Dot {
        Dot { actor, counter }
    }

    #[test]
    fn context_insert_compacts() {
        let mut ctx = Context::default();
        context_insert(&mut ctx, dot(A, 3));
        context_insert(&mut ctx, dot(A, 5));
        assert_eq!(ctx.vv.get(&A), None);
        assert_eq!(ctx.dots.len(), 2);
        assert!(!covers(&ctx, &dot(A, 1)));
        assert!(covers(&ctx, &dot(A, 3)));
        context_insert(&mut ctx, dot(A, 1));
        context_insert(&mut ctx, dot(A, 2));
        // 1, 2 and then 3 are contiguous; 5 stays an exception.
        assert_eq!(ctx.vv.get(&A), Some(&3));
        assert_eq!(
            ctx.dots.iter().copied().collect::<Vec<_>>(),
            vec![dot(A, 5)]
        );
        context_insert(&mut ctx, dot(A, 4));
        assert_eq!(ctx.vv.get(&A), Some(&5));
        assert!(ctx.dots.is_empty());
        context_insert(&mut ctx, dot(A, 2));
        assert_eq!(ctx.vv.get(&A), Some(&5));
        assert_eq!(max_counter(&ctx, &A), 5);
        assert_eq!(max_counter(&ctx, &B), 0);
    }

    #[test]
    fn context_insert_at_the_top_of_the_counter_range_does_not_overflow() {
        // A stored set or a peer's may name counters up to u64::MAX (only a
        // client's context is bounded by MAX_COUNTER); absorbing the last
        // counter into the version vector must stop there, not look past it.
        let mut ctx = Context::default();
        ctx.vv.insert(A, u64::MAX - 2);
        context_insert(&mut ctx, dot(A, u64::MAX));
        assert_eq!(
            ctx.dots.iter().copied().collect::<Vec<_>>(),
            vec![dot(A, u64::MAX)]
        );
        context_insert(&mut ctx, dot(A, u64::MAX - 1));
        assert_eq!(ctx.vv.get(&A), Some(&u64::MAX));
        assert!(ctx.dots.is_empty());
        context_insert(&mut ctx, dot(A, u64::MAX));
        assert_eq!(ctx.vv.get(&A), Some(&u64::MAX));

        let mut ctx = Context::default();
        ctx.vv.insert(B, u64::MAX - 1);
        context_insert(&mut ctx, dot(B, u64::MAX));
        assert_eq!(ctx.vv.get(&B), Some(&u64::MAX));
        assert!(ctx.dots.is_empty());
    }

    #[test]
    fn context_merge_is_a_compacted_union() {
        let mut x = Context::default();
        x.vv.insert(A, 2);
        x.dots.insert(dot(B, 2));
        let mut y = Context::default();
        y.vv.insert(B, 1);
        y.dots.insert(dot(A, 3));
        y.dots.insert(dot(A, 7));
        context_merge(&mut x, &y);
        assert_eq!(x.vv.get(&A), Some(&3));
        assert_eq!(x.vv.get(&B), Some(&2));
        assert_eq!(x.dots.iter().copied().collect::<Vec<_>>(), vec![dot(A, 7)]);
        assert_eq!(max_counter(&x, &A), 7);
    }

    #[test]
    fn a_chain_of_writes_with_reply_contexts_leaves_one_value() {
        let mut set = DvvSet::default();
        let mut ctx: Option<Context> = None;
        for (i, actor) in [A, B, A, A, B].into_iter().enumerate() {
            let out = put(&set, ctx.as_ref(), &format!("v{i}"), actor, i as u64);
            set = out.set;
            ctx = Some(out.reply_context);
            assert_eq!(set.siblings.len(), 1);
            assert!(is_well_formed(&set));
        }
        assert_eq!(values(&set), vec![Some(&b"v4"[..])]);
    }

    #[test]
    fn a_write_without_context_adds_a_sibling() {
        let first = put(&DvvSet::default(), None, "x", A, 1);
        let second = put(&first.set, None, "y", A, 2);
        assert_eq!(second.dot, dot(A, 2));
        assert_eq!(values(&second.set), vec![Some(&b"x"[..]), Some(&b"y"[..])]);
        // The reply covers only the new write, not the sibling it did not see.
        assert!(!covers(&second.reply_context, &first.dot));
        assert!(covers(&second.reply_context, &second.dot));
    }

    #[test]
    fn concurrent_writes_become_siblings_and_a_read_context_resolves_them() {
        let base = put(&DvvSet::default(), None, "base", A, 1);
        let read = base.set.context.clone();
        let x = put(&base.set, Some(&read), "x", A, 2);
        let y = put(&x.set, Some(&read), "y", A, 3);
        assert_eq!(values(&y.set), vec![Some(&b"x"[..]), Some(&b"y"[..])]);
        // The second writer's reply context must not cover the first's write.
        assert!(!covers(&y.reply_context, &x.dot));
        assert!(covers(&y.reply_context, &base.dot));

        // A read that merges replicas returns both siblings; writing back with
        // its context resolves them.
        let replica = merge(&base.set, &y.set, Versioning::Dvv);
        assert_eq!(replica, y.set);
        let resolved = put(&y.set, Some(&replica.context), "xy", B, 4);
        assert_eq!(values(&resolved.set), vec![Some(&b"xy"[..])]);
        // The resolution wins over a stale replica that still holds both.
        let healed = merge(&x.set, &resolved.set, Versioning::Dvv);
        assert_eq!(healed, resolved.set);
    }

    #[test]
    fn a_write_supersedes_dots_the_coordinator_has_not_seen() {
        // The client read n1's version and writes through n2, which lags.
        let at_n1 = put(&DvvSet::default(), None, "old", A, 1);
        let at_n2 = put(&DvvSet::default(), Some(&at_n1.set.context), "new", B, 2);
        assert_eq!(values(&at_n2.set), vec![Some(&b"new"[..])]);
        assert!(covers(&at_n2.set.context, &at_n1.dot));
        let merged = merge(&at_n1.set, &at_n2.set, Versioning::Dvv);
        assert_eq!(values(&merged), vec![Some(&b"new"[..])]);
        assert_eq!(merged, merge(&at_n2.set, &at_n1.set, Versioning::Dvv));
    }

    #[test]
    fn a_delete_with_context_leaves_only_a_tombstone() {
        let x = put(&DvvSet::default(), None, "x", A, 1);
        let y = put(&x.set, None, "y", A, 2);
        assert!(!is_deleted(&y.set));
        let deleted = write(
            &y.set,
            Some(&y.set.context),
            WriteMode::Context,
            None,
            B,
            ts(3),
            Versioning::Dvv,
            DEFAULT_MAX_SIBLINGS,
        )
        .unwrap();
        assert_eq!(deleted.set.siblings.len(), 1);
        assert!(is_deleted(&deleted.set));
        assert!(winner(&deleted.set).unwrap().1.value.is_none());
        // A replica that only saw `x` does not bring it back.
        assert_eq!(merge(&x.set, &deleted.set, Versioning::Dvv), deleted.set);
        assert!(is_deleted(&DvvSet::default()));
    }

    #[test]
    fn overwrite_mode_replaces_everything_local() {
        let x = put(&DvvSet::default(), None, "x", A, 1);
        let y = put(&x.set, None, "y", B, 2);
        let set = write(
            &y.set,
            None,
            WriteMode::Overwrite,
            Some(b"z".to_vec()),
            A,
            ts(3),
            Versioning::Dvv,
            DEFAULT_MAX_SIBLINGS,
        )
        .unwrap();
        assert_eq!(values(&set.set), vec![Some(&b"z"[..])]);
        assert_eq!(set.dot, dot(A, 2));
        assert!(covers(&set.reply_context, &x.dot));
        assert!(covers(&set.reply_context, &y.dot));
    }

    #[test]
    fn too_many_siblings_is_refused() {
        let mut set = DvvSet::default();
        for i in 0..3 {
            set = put(&set, None, &format!("v{i}"), A, i).set;
        }
        let refused = write(
            &set,
            None,
            WriteMode::Context,
            Some(b"one too many".to_vec()),
            A,
            ts(9),
            Versioning::Dvv,
            3,
        );
        assert_eq!(
            refused,
            Err(VersionError::TooManySiblings { count: 4, limit: 3 })
        );
        assert!(refused.unwrap_err().to_string().contains("context"));
        // Resolving with the read's context is always accepted.
        let resolved = write(
            &set,
            Some(&set.context),
            WriteMode::Context,
            Some(b"resolved".to_vec()),
            A,
            ts(9),
            Versioning::Dvv,
            3,
        )
        .unwrap();
        assert_eq!(resolved.set.siblings.len(), 1);
    }

    #[test]
    fn lww_keeps_the_greatest_timestamp() {
        let lww = |local: &DvvSet, ctx: Option<&Context>, value: &str, actor, wall_ms| {
            write(
                local,
                ctx,
                WriteMode::Context,
                Some(value.as_bytes().to_vec()),
                actor,
                ts(wall_ms),
                Versioning::Lww,
                DEFAULT_MAX_SIBLINGS,
            )
            .unwrap()
        };
        let early = lww(&DvvSet::default(), None, "early", A, 10);
        let late = lww(&DvvSet::default(), None, "late", B, 20);
        let merged = merge(&early.set, &late.set, Versioning::Lww);
        assert_eq!(values(&merged), vec![Some(&b"late"[..])]);
        assert_eq!(merged, merge(&late.set, &early.set, Versioning::Lww));
        // The loser stays covered by the context, so it never comes back.
        assert!(covers(&merged.context, &early.dot));

        // A write with a lower timestamp (clock skew) loses, even with a context
        // that covers the winner: LWW drops it.
        let skewed = lww(&merged, Some(&merged.context), "skewed", A, 15);
        assert_eq!(values(&skewed.set), vec![Some(&b"late"[..])]);
        assert!(covers(&skewed.set.context, &skewed.dot));

        // Equal timestamps: the greater actor wins.
        let tie_a = lww(&DvvSet::default(), None, "a", A, 30);
        let tie_b = lww(&DvvSet::default(), None, "b", B, 30);
        let tied = merge(&tie_a.set, &tie_b.set, Versioning::Lww);
        assert_eq!(values(&tied), vec![Some(&b"b"[..])]);
    }

    /// Why LWW keeps the greatest sibling of the union rather than the winner of
    /// the causal merge: `c` was written with a context covering `b` by a
    /// coordinator that never saw `b` (nor its timestamp) and whose clock lags.
    /// Keeping the causal winner would make the result depend on merge order.
    #[test]
    fn lww_merge_is_associative_when_a_context_covers_an_unseen_winner() {
        const C: Actor = Actor {
            incarnation: 3,
            epoch: 0,
        };
        let lww = |ctx: Option<&Context>, value: &str, actor, wall_ms| {
            write(
                &DvvSet::default(),
                ctx,
                WriteMode::Context,
                Some(value.as_bytes().to_vec()),
                actor,
                ts(wall_ms),
                Versioning::Lww,
                DEFAULT_MAX_SIBLINGS,
            )
            .unwrap()
            .set
        };
        let a = lww(None, "a", A, 5);
        let b = lww(None, "b", B, 10);
        let c = lww(Some(&b.context), "c", C, 1);
        let left = merge(&merge(&a, &b, Versioning::Lww), &c, Versioning::Lww);
        let right = merge(&a, &merge(&b, &c, Versioning::Lww), Versioning::Lww);
        assert_eq!(left, right);
        assert_eq!(values(&left), vec![Some(&b"b"[..])]);
        for dot in [dot(A, 1), dot(B, 1), dot(C, 1)] {
            assert!(covers(&left.context, &dot));
        }
    }

    #[test]
    fn merge_into_reports_changes() {
        let x = put(&DvvSet::default(), None, "x", A, 1);
        let mut into = x.set.clone();
        assert!(!merge_into(&mut into, &x.set, Versioning::Dvv));
        assert!(!merge_into(&mut into, &DvvSet::default(), Versioning::Dvv));
        let y = put(&DvvSet::default(), None, "y", B, 2);
        assert!(merge_into(&mut into, &y.set, Versioning::Dvv));
        assert!(!merge_into(&mut into, &y.set, Versioning::Dvv));
        assert_eq!(into.siblings.len(), 2);
        let mut lww = x.set.clone();
        assert!(merge_into(&mut lww, &y.set, Versioning::Lww));
        assert!(!merge_into(&mut lww, &x.set, Versioning::Lww));
        assert_eq!(values(&lww), vec![Some(&b"y"[..])]);
    }

    #[test]
    fn hlc_is_monotonic_under_a_clock_that_goes_backwards() {
        let mut clock = HlcClock::new();
        let mut last = clock.now(100);
        assert_eq!(last, ts(100));
        for wall_ms in [100, 99, 50, 100, 101, 101, 0, 200] {
            let next = clock.now(wall_ms);
            assert!(next > last, "{next:?} after {last:?}");
            last = next;
        }
        assert_eq!(last, ts(200));
        assert_eq!(
            clock.now(150),
            Hlc {
                wall_ms: 200,
                logical: 1
            }
        );
    }

    #[test]
    fn hlc_never_falls_behind_what_it_observed() {
        let mut clock = HlcClock::new();
        clock.now(10);
        let seen = Hlc {
            wall_ms: 500,
            logical: 7,
        };
        assert!(clock.observe(seen, 20));
        assert!(clock.now(20) > seen);
        // Observing the past changes nothing.
        assert!(clock.observe(ts(1), 20));
        assert_eq!(
            clock.now(20),
            Hlc {
                wall_ms: 500,
                logical: 9
            }
        );
        let mut saturated = HlcClock::new();
        saturated.observe(
            Hlc {
                wall_ms: 5,
                logical: u32::MAX,
            },
            0,
        );
        assert_eq!(saturated.now(0), ts(6));
        assert_eq!(clock.far_future(), 0);
    }

    #[test]
    fn a_timestamp_beyond_the_drift_bound_does_not_move_the_clock() {
        let mut clock = HlcClock::with_max_drift(1_000);
        assert_eq!(clock.now(5_000), ts(5_000));
        // Exactly at the bound: observed.
        assert!(clock.observe(ts(6_000), 5_000));
        assert_eq!(clock.now(5_001), ts_l(6_000, 1));
        // The bound runs from the wall clock, not from the clock's own value,
        // so the clock cannot creep ahead one bound at a time.
        assert!(!clock.observe(ts(7_000), 5_001));
        assert_eq!(clock.far_future(), 1);
        // A clock set a year ahead: refused and counted.
        let year_ahead = ts(5_000 + 365 * 24 * 3_600_000);
        assert!(!clock.observe(year_ahead, 5_002));
        assert_eq!(clock.far_future(), 2);
        assert_eq!(clock.now(5_002), ts_l(6_000, 2));
        assert!(clock.last() < year_ahead);
        // Once the wall clock has caught up to within the bound, it is observed.
        assert!(clock.observe(year_ahead, year_ahead.wall_ms - 1_000));
        assert!(clock.now(0) > year_ahead);
        assert_eq!(clock.far_future(), 2);
    }

    #[test]
    fn a_write_over_a_far_future_sibling_sorts_after_it_without_moving_the_clock() {
        let mut clock = HlcClock::with_max_drift(1_000);
        let ahead = ts_l(90_000, 4);
        // The newest local sibling is far ahead: the write is stamped just
        // after it, and the clock stays with the wall clock.
        assert_eq!(clock.stamp_after(10_000, Some(ahead)), ts_l(90_000, 5));
        assert_eq!(clock.last(), ts(10_000));
        assert_eq!(clock.far_future(), 1);
        // The next write on that key (holding the first) sorts after both.
        assert_eq!(
            clock.stamp_after(10_000, Some(ts_l(90_000, 5))),
            ts_l(90_000, 6)
        );
        // Other keys are stamped from the wall clock.
        assert_eq!(clock.stamp_after(10_001, None), ts(10_001));
        // Within the bound, the floor is observed as before.
        assert_eq!(clock.stamp_after(10_002, Some(ts(10_500))), ts_l(10_500, 1));
        assert_eq!(clock.last(), ts_l(10_500, 1));
        // A floor behind the clock changes nothing.
        assert_eq!(clock.stamp_after(10_003, Some(ts(3))), ts_l(10_500, 2));
    }

    #[test]
    fn hlc_at_the_end_of_time_does_not_overflow() {
        // A peer's sibling (or a damaged stored one) can carry any timestamp;
        // neither observing the greatest nor writing over it may overflow.
        let end = Hlc {
            wall_ms: u64::MAX,
            logical: u32::MAX,
        };
        let mut clock = HlcClock::new();
        assert!(!clock.observe(end, 0));
        assert_eq!(clock.stamp_after(0, Some(end)), end);
        assert_eq!(clock.now(0), ts_l(0, 2));
        // A wall clock at the end of time observes it, and keeps handing it out.
        assert!(clock.observe(end, u64::MAX));
        assert_eq!(clock.now(0), end);
        assert_eq!(clock.now(u64::MAX), end);
        assert_eq!(clock.last(), end);
    }

    fn ts_l(wall_ms: u64, logical: u32) -> Hlc {
        Hlc { wall_ms, logical }
    }
}
