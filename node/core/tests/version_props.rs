//! Property tests for the versioning rules in `dynamo_core::version`.
//!
//! Random histories run over a few coordinators (each minting dots with its own
//! actor, on top of its home replica's set) and a few replicas: coordinators
//! write with no context, with a context recorded from an earlier read or reply,
//! or in overwrite mode; replicas merge each other's sets; reads merge a subset
//! of replicas (optionally repairing them) and record their context for later
//! writes; client sessions chain writes with each reply's context; coordinators
//! restart with a new epoch. The test keeps its own record of every write (its
//! dot, the context it was written with, its unique value) and checks every state
//! the history produced against it.

use dynamo_core::version::{
    compact, context_insert, context_merge, covers, is_well_formed, merge, merge_into, write,
    HlcClock, Versioning,
};
use dynamo_proto::{Actor, Context, Dot, DvvSet, Hlc, WriteMode};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

/// Where a write's context comes from.
#[derive(Clone, Debug)]
enum ContextChoice {
    /// No context: the write covers nothing.
    None,
    /// One of the contexts recorded so far (reads and replies), by index modulo
    /// how many there are; no context when there are none yet.
    Recorded(usize),
}

#[derive(Clone, Debug)]
enum Op {
    Write {
        coordinator: usize,
        context: ContextChoice,
        delete: bool,
        overwrite: bool,
        jitter_ms: u64,
        observe_local: bool,
    },
    /// A client session writes with the reply context of its previous write.
    SessionWrite {
        session: usize,
        coordinator: usize,
        jitter_ms: u64,
    },
    Merge {
        from: usize,
        to: usize,
    },
    Read {
        replicas: u8,
        repair: bool,
    },
    Restart {
        coordinator: usize,
    },
}

const SESSIONS: usize = 2;

/// The coordinators' clock drift bound: below the skews drawn (0..100 ms plus
/// jitter), so histories mix observed and far-future timestamps.
const DRIFT_MS: u64 = 50;

fn op_strategy() -> impl Strategy<Value = Op> {
    let context = prop_oneof![
        1 => Just(ContextChoice::None),
        3 => any::<usize>().prop_map(ContextChoice::Recorded),
    ];
    prop_oneof![
        5 => (0..4usize, context, prop::bool::weighted(0.15), prop::bool::weighted(0.1), 0..40u64, prop::bool::weighted(0.8))
            .prop_map(|(coordinator, context, delete, overwrite, jitter_ms, observe_local)| Op::Write {
                coordinator,
                context,
                delete,
                overwrite,
                jitter_ms,
                observe_local,
            }),
        2 => (0..SESSIONS, 0..4usize, 0..40u64).prop_map(|(session, coordinator, jitter_ms)| {
            Op::SessionWrite { session, coordinator, jitter_ms }
        }),
        4 => (0..4usize, 0..4usize).prop_map(|(from, to)| Op::Merge { from, to }),
        2 => (1..16u8, any::<bool>()).prop_map(|(replicas, repair)| Op::Read { replicas, repair }),
        1 => (0..4usize).prop_map(|coordinator| Op::Restart { coordinator }),
    ]
}

#[derive(Clone, Debug)]
struct Scenario {
    coordinators: usize,
    replicas: usize,
    ops: Vec<Op>,
    /// Each coordinator's clock offset: skewed clocks make LWW drop writes.
    skews_ms: Vec<u64>,
    /// Index triples into the states the history produced, for the algebra checks.
    triples: Vec<(usize, usize, usize)>,
}

fn scenario_strategy() -> impl Strategy<Value = Scenario> {
    (
        2..=4usize,
        2..=4usize,
        prop::collection::vec(op_strategy(), 1..40),
        prop::collection::vec(0..100u64, 4),
        prop::collection::vec(any::<(usize, usize, usize)>(), 12),
    )
        .prop_map(
            |(coordinators, replicas, ops, skews_ms, triples)| Scenario {
                coordinators,
                replicas,
                ops,
                skews_ms,
                triples,
            },
        )
}

/// The test's own record of one accepted write.
#[derive(Clone, Debug)]
struct WriteRecord {
    dot: Dot,
    /// What the write superseded: the client's context, or for an overwrite the
    /// coordinator's stored context as well.
    request_context: Context,
    value: Option<Vec<u8>>,
    timestamp: Hlc,
}

struct Coordinator {
    actor: Actor,
    clock: HlcClock,
    skew_ms: u64,
}

struct History {
    mode: Versioning,
    replicas: Vec<DvvSet>,
    coordinators: Vec<Coordinator>,
    recorded: Vec<Context>,
    sessions: Vec<Option<Context>>,
    /// The dots each session wrote, in order.
    session_dots: Vec<Vec<Dot>>,
    writes: Vec<WriteRecord>,
    by_dot: BTreeMap<Dot, usize>,
    /// Every state the history produced: replicas after each change and reads.
    states: Vec<DvvSet>,
    tick_ms: u64,
}

impl History {
    fn new(mode: Versioning, skews_ms: &[u64], replicas: usize) -> Self {
        History {
            mode,
            replicas: vec![DvvSet::default(); replicas],
            coordinators: skews_ms
                .iter()
                .enumerate()
                .map(|(i, &skew_ms)| Coordinator {
                    actor: Actor {
                        incarnation: 0x1000 + i as u64,
                        epoch: 0,
                    },
                    clock: HlcClock::with_max_drift(DRIFT_MS),
                    skew_ms,
                })
                .collect(),
            recorded: Vec::new(),
            sessions: vec![None; SESSIONS],
            session_dots: vec![Vec::new(); SESSIONS],
            writes: Vec::new(),
            by_dot: BTreeMap::new(),
            states: vec![DvvSet::default()],
            tick_ms: 0,
        }
    }

    fn home(&self, coordinator: usize) -> usize {
        coordinator % self.replicas.len()
    }

    /// One coordinator's write on its home replica; returns the reply context.
    #[allow(clippy::too_many_arguments)]
    fn write(
        &mut self,
        coordinator: usize,
        context: Option<Context>,
        overwrite: bool,
        delete: bool,
        jitter_ms: u64,
        observe_local: bool,
    ) -> Context {
        let coordinator = coordinator % self.coordinators.len();
        let home = self.home(coordinator);
        let local = self.replicas[home].clone();
        let coord = &mut self.coordinators[coordinator];
        let wall_ms = self.tick_ms + coord.skew_ms + jitter_ms;
        let timestamp = if observe_local {
            let newest = local.siblings.values().map(|s| s.timestamp).max();
            coord.clock.stamp_after(wall_ms, newest)
        } else {
            coord.clock.now(wall_ms)
        };
        let value = (!delete).then(|| format!("write-{}", self.writes.len()).into_bytes());
        let mut request_context = context.clone().unwrap_or_default();
        if overwrite {
            dynamo_core::version::context_merge(&mut request_context, &local.context);
        }
        let mode = if overwrite {
            WriteMode::Overwrite
        } else {
            WriteMode::Context
        };
        let outcome = write(
            &local,
            context.as_ref(),
            mode,
            value.clone(),
            coord.actor,
            timestamp,
            self.mode,
            usize::MAX,
        )
        .expect("no sibling limit in this test");

        // The dot is new, and is the actor's next one.
        assert!(!self.by_dot.contains_key(&outcome.dot), "dot reused");
        assert_eq!(outcome.dot.actor, coord.actor);
        assert!(!covers(&local.context, &outcome.dot));
        assert!(!covers(&request_context, &outcome.dot));
        // The reply covers exactly the request context plus the new dot.
        let mut expected_reply = request_context.clone();
        dynamo_core::version::context_insert(&mut expected_reply, outcome.dot);
        assert_eq!(outcome.reply_context, expected_reply);
        for dot in local.siblings.keys() {
            assert_eq!(
                covers(&outcome.reply_context, dot),
                covers(&request_context, dot),
                "the reply context covers a sibling the writer did not see"
            );
        }

        self.by_dot.insert(outcome.dot, self.writes.len());
        self.writes.push(WriteRecord {
            dot: outcome.dot,
            request_context,
            value,
            timestamp,
        });
        self.replicas[home] = outcome.set.clone();
        self.states.push(outcome.set);
        outcome.reply_context
    }

    fn apply(&mut self, op: &Op) {
        self.tick_ms += 10;
        match op {
            Op::Write {
                coordinator,
                context,
                delete,
                overwrite,
                jitter_ms,
                observe_local,
            } => {
                let context = match context {
                    ContextChoice::None => None,
                    ContextChoice::Recorded(i) if !self.recorded.is_empty() => {
                        Some(self.recorded[i % self.recorded.len()].clone())
                    }
                    ContextChoice::Recorded(_) => None,
                };
                let reply = self.write(
                    *coordinator,
                    context,
                    *overwrite,
                    *delete,
                    *jitter_ms,
                    *observe_local,
                );
                self.recorded.push(reply);
            }
            Op::SessionWrite {
                session,
                coordinator,
                jitter_ms,
            } => {
                let context = self.sessions[*session].clone();
                let reply = self.write(*coordinator, context, false, false, *jitter_ms, true);
                let dot = self.writes.last().expect("just written").dot;
                self.session_dots[*session].push(dot);
                self.sessions[*session] = Some(reply);
            }
            Op::Merge { from, to } => {
                let from = from % self.replicas.len();
                let to = to % self.replicas.len();
                let other = self.replicas[from].clone();
                let before = self.replicas[to].clone();
                let changed = merge_into(&mut self.replicas[to], &other, self.mode);
                assert_eq!(
                    changed,
                    self.replicas[to] != before,
                    "merge_into's change flag"
                );
                assert_eq!(self.replicas[to], merge(&before, &other, self.mode));
                self.states.push(self.replicas[to].clone());
            }
            Op::Read { replicas, repair } => {
                let chosen: Vec<usize> = (0..self.replicas.len())
                    .filter(|i| replicas & (1 << i) != 0)
                    .collect();
                let mut read = DvvSet::default();
                for &i in &chosen {
                    merge_into(&mut read, &self.replicas[i], self.mode);
                }
                if *repair {
                    for &i in &chosen {
                        merge_into(&mut self.replicas[i], &read, self.mode);
                    }
                }
                self.recorded.push(read.context.clone());
                self.states.push(read);
            }
            Op::Restart { coordinator } => {
                let index = coordinator % self.coordinators.len();
                let coord = &mut self.coordinators[index];
                coord.actor.epoch += 1;
                coord.clock = HlcClock::with_max_drift(DRIFT_MS);
            }
        }
    }

    /// Every replica merged, in replica order.
    fn merged_all(&self) -> DvvSet {
        self.replicas
            .iter()
            .fold(DvvSet::default(), |acc, set| merge(&acc, set, self.mode))
    }

    fn is_known(&self, state: &DvvSet, write: &WriteRecord) -> bool {
        covers(&state.context, &write.dot)
    }

    /// Checks one state against the record of writes.
    fn check_state(&self, state: &DvvSet) {
        assert!(is_well_formed(state), "malformed state {state:?}");
        for (dot, sibling) in &state.siblings {
            let write = &self.writes[*self.by_dot.get(dot).expect("a sibling nobody wrote")];
            assert_eq!(
                sibling.value, write.value,
                "a value under another write's dot"
            );
            assert_eq!(sibling.timestamp, write.timestamp);
        }
        let values: Vec<&Vec<u8>> = state
            .siblings
            .values()
            .filter_map(|sibling| sibling.value.as_ref())
            .collect();
        let distinct: BTreeSet<&Vec<u8>> = values.iter().copied().collect();
        assert_eq!(values.len(), distinct.len(), "a value appears twice");

        match self.mode {
            Versioning::Dvv => self.check_dvv_state(state),
            Versioning::Lww => {
                let expected =
                    usize::from(!state.context.vv.is_empty() || !state.context.dots.is_empty());
                assert_eq!(
                    state.siblings.len(),
                    expected,
                    "LWW keeps exactly one winner"
                );
            }
        }
    }

    fn check_dvv_state(&self, state: &DvvSet) {
        let known: Vec<&WriteRecord> = self
            .writes
            .iter()
            .filter(|w| self.is_known(state, w))
            .collect();
        // No false siblings: no sibling is covered by the request context of a
        // write this state knows of.
        for dot in state.siblings.keys() {
            for w in &known {
                assert!(
                    !covers(&w.request_context, dot),
                    "false sibling {dot}: superseded by known write {}",
                    w.dot
                );
            }
        }
        // And no missing sibling: every known write that no known write
        // superseded is a sibling. Together: the siblings are exactly those.
        let expected: BTreeSet<Dot> = known
            .iter()
            .filter(|w| {
                !known
                    .iter()
                    .any(|other| covers(&other.request_context, &w.dot))
            })
            .map(|w| w.dot)
            .collect();
        let actual: BTreeSet<Dot> = state.siblings.keys().copied().collect();
        assert_eq!(
            actual, expected,
            "siblings differ from the known, unsuperseded writes"
        );
        // A chain of writes with reply contexts never makes siblings of itself.
        for chain in &self.session_dots {
            let live = chain
                .iter()
                .filter(|dot| state.siblings.contains_key(dot))
                .count();
            assert!(live <= 1, "a session's chained writes became siblings");
        }
    }

    /// The semilattice laws, and the merged state is itself a sound state.
    fn check_algebra(&self, a: &DvvSet, b: &DvvSet, c: &DvvSet) {
        check_semilattice(self.mode, a, b, c);
        let ab = merge(a, b, self.mode);
        self.check_state(&ab);
        self.check_state(&merge(&ab, c, self.mode));
    }

    fn check_final(&self, triples: &[(usize, usize, usize)]) {
        for state in self.states.iter().chain(&self.replicas) {
            self.check_state(state);
        }
        let n = self.states.len();
        for &(i, j, k) in triples {
            self.check_algebra(
                &self.states[i % n],
                &self.states[j % n],
                &self.states[k % n],
            );
        }
        // Every triple of the final replicas and the latest states: these are
        // where concurrent writes and stale contexts meet.
        let recent: Vec<&DvvSet> = self
            .replicas
            .iter()
            .chain(self.states.iter().rev().take(2))
            .collect();
        for a in &recent {
            for b in &recent {
                for c in &recent {
                    check_semilattice(self.mode, a, b, c);
                }
            }
        }

        // Convergence: every order of merging the replicas gives the same set.
        let full = self.merged_all();
        for order in permutations(self.replicas.len()) {
            let mut acc = DvvSet::default();
            for i in order {
                merge_into(&mut acc, &self.replicas[i], self.mode);
            }
            assert_eq!(acc, full, "merge order changed the result");
        }
        let right = self
            .replicas
            .iter()
            .rev()
            .fold(DvvSet::default(), |acc, set| merge(set, &acc, self.mode));
        assert_eq!(right, full);
        self.check_state(&full);

        // The fully merged state knows every write.
        for w in &self.writes {
            assert!(covers(&full.context, &w.dot), "write {} forgotten", w.dot);
        }
        match self.mode {
            // No acknowledged write lost: a write is a sibling, or another write
            // was made with a context covering it.
            Versioning::Dvv => {
                for w in &self.writes {
                    let superseded = self
                        .writes
                        .iter()
                        .any(|other| other.dot != w.dot && covers(&other.request_context, &w.dot));
                    assert!(
                        full.siblings.contains_key(&w.dot) || superseded,
                        "write {} lost",
                        w.dot
                    );
                }
            }
            // LWW: the survivor has the greatest (timestamp, actor, counter).
            Versioning::Lww => {
                let greatest = self.writes.iter().max_by_key(|w| (w.timestamp, w.dot));
                let survivor = full.siblings.keys().next();
                assert_eq!(survivor, greatest.map(|w| &w.dot));
            }
        }
    }
}

fn check_semilattice(mode: Versioning, a: &DvvSet, b: &DvvSet, c: &DvvSet) {
    let ab = merge(a, b, mode);
    assert_eq!(ab, merge(b, a, mode), "merge is not commutative");
    assert_eq!(
        merge(&ab, c, mode),
        merge(a, &merge(b, c, mode), mode),
        "merge is not associative"
    );
    assert_eq!(merge(a, a, mode), *a, "merge is not idempotent");
    assert_eq!(
        merge(&ab, a, mode),
        ab,
        "merging a state seen before changes the result"
    );
}

fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![Vec::new()];
    }
    let mut all = Vec::new();
    for rest in permutations(n - 1) {
        for at in 0..=rest.len() {
            let mut order = rest.clone();
            order.insert(at, n - 1);
            all.push(order);
        }
    }
    all
}

fn run(scenario: &Scenario, mode: Versioning) {
    let mut history = History::new(
        mode,
        &scenario.skews_ms[..scenario.coordinators],
        scenario.replicas,
    );
    for op in &scenario.ops {
        history.apply(op);
        for replica in &history.replicas {
            assert!(is_well_formed(replica));
        }
    }
    history.check_final(&scenario.triples);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn dvv_histories_keep_the_invariants(scenario in scenario_strategy()) {
        run(&scenario, Versioning::Dvv);
    }

    #[test]
    fn lww_histories_keep_the_invariants(scenario in scenario_strategy()) {
        run(&scenario, Versioning::Lww);
    }

    /// One client chains writes with each reply's context, through any
    /// coordinators, while replicas gossip in between: every state holds at most
    /// one value, and once all replicas are merged it is the last write's.
    #[test]
    fn a_chain_with_reply_contexts_leaves_one_value(
        steps in prop::collection::vec((0..3usize, 0..3usize, any::<bool>()), 1..30),
    ) {
        let mut history = History::new(Versioning::Dvv, &[0, 0, 0], 3);
        for (coordinator, other, gossip) in steps {
            if gossip {
                history.apply(&Op::Merge { from: coordinator, to: other });
            } else {
                history.apply(&Op::SessionWrite { session: 0, coordinator, jitter_ms: 0 });
            }
            for replica in &history.replicas {
                prop_assert!(replica.siblings.len() <= 1);
            }
        }
        history.check_final(&[]);
        let full = history.merged_all();
        match history.session_dots[0].last() {
            Some(last) => prop_assert_eq!(full.siblings.keys().collect::<Vec<_>>(), vec![last]),
            None => prop_assert!(full.siblings.is_empty()),
        }
    }

    /// Last-write-wins with clocks far apart (a whole minute, against a 1 s
    /// drift bound): one client writes through any coordinator, each holding
    /// the previous write. Every write supersedes the one before, so the last
    /// write survives, however far behind its coordinator's clock is; and no
    /// coordinator's clock ever runs past its wall clock by more than the bound.
    #[test]
    fn lww_keeps_the_last_of_a_chain_whatever_the_skew(
        skews_ms in prop::collection::vec(0..60_000u64, 3),
        steps in prop::collection::vec((0..3usize, 0..40u64), 1..20),
    ) {
        let mut history = History::new(Versioning::Lww, &skews_ms, 3);
        for coord in &mut history.coordinators {
            coord.clock = HlcClock::with_max_drift(1_000);
        }
        for (coordinator, jitter_ms) in steps {
            // The previous write reaches every replica first.
            for from in 0..3 {
                for to in 0..3 {
                    history.apply(&Op::Merge { from, to });
                }
            }
            history.apply(&Op::SessionWrite { session: 0, coordinator, jitter_ms });
            for coord in &history.coordinators {
                let wall_ms = history.tick_ms + coord.skew_ms + 40;
                prop_assert!(coord.clock.last().wall_ms <= wall_ms + 1_000);
            }
        }
        history.check_final(&[]);
        let full = history.merged_all();
        let last = history.session_dots[0].last().expect("at least one write");
        prop_assert_eq!(full.siblings.keys().collect::<Vec<_>>(), vec![last]);
    }

    /// Two puts at one coordinator, the second with the first's reply context,
    /// interleaved with the first's replication (and stale replicas merging
    /// back): never a sibling.
    #[test]
    fn interleaved_puts_at_one_coordinator_with_reply_contexts_never_make_siblings(
        puts in 2..6usize,
        gossip in prop::collection::vec((0..3usize, 0..3usize), 0..12),
    ) {
        let mut history = History::new(Versioning::Dvv, &[0], 3);
        let mut gossip = gossip.into_iter();
        for _ in 0..puts {
            history.apply(&Op::SessionWrite { session: 0, coordinator: 0, jitter_ms: 0 });
            for (from, to) in gossip.by_ref().take(2) {
                history.apply(&Op::Merge { from, to });
            }
            for state in history.replicas.iter().chain(&history.states) {
                prop_assert!(state.siblings.len() <= 1);
            }
        }
        history.check_final(&[]);
    }
}

/// A context as an altered token may carry: `actor` at `counter`.
fn claiming(actor: Actor, counter: u64) -> Context {
    let mut ctx = Context::default();
    ctx.vv.insert(actor, counter);
    ctx
}

fn put(local: &DvvSet, context: Option<&Context>, actor: Actor) -> Result<DvvSet, String> {
    write(
        local,
        context,
        WriteMode::Context,
        Some(b"v".to_vec()),
        actor,
        Hlc::default(),
        Versioning::Dvv,
        64,
    )
    .map(|outcome| outcome.set)
    .map_err(|e| e.to_string())
}

#[test]
fn a_context_naming_versions_the_coordinator_never_minted_is_refused() {
    let me = Actor {
        incarnation: 1,
        epoch: 1,
    };
    let local = put(&DvvSet::default(), None, me).unwrap();
    // Below MAX_COUNTER (past it, any actor's claim is refused: see below).
    for claimed in [2, dynamo_core::version::MAX_COUNTER] {
        let e = put(&local, Some(&claiming(me, claimed)), me).unwrap_err();
        assert!(e.contains(&format!("version {claimed}")), "{e}");
        assert!(e.contains("written only 1"), "{e}");
    }
    // What a read returned is fine.
    let next = put(&local, Some(&local.context), me).unwrap();
    assert_eq!(next.siblings.len(), 1);
}

/// Two actors: one coordinating, one another node's.
fn two_actors() -> (Actor, Actor) {
    let actor = |incarnation| Actor {
        incarnation,
        epoch: 1,
    };
    (actor(1), actor(2))
}

#[test]
fn an_exhausted_counter_is_an_error_not_an_overflow() {
    // A claim stored before contexts were bounded by MAX_COUNTER (it arrived
    // through replication, where nothing checks it): when that actor
    // coordinates a write of the key, it has no counter left.
    let (me, other) = two_actors();
    let poisoned = DvvSet {
        context: claiming(other, u64::MAX),
        siblings: Default::default(),
    };
    let e = put(&poisoned, None, other).unwrap_err();
    assert!(e.contains("exhausted"), "{e}");
    // The key stays writable through the other actor.
    put(&poisoned, None, me).unwrap();
}

#[test]
fn a_context_naming_a_counter_no_node_reaches_is_refused() {
    use dynamo_core::version::MAX_COUNTER;
    use dynamo_proto::Dot;
    // The coordinator cannot check another actor's counters, but none comes
    // near MAX_COUNTER: a claim past it would use up that actor's counters for
    // the key, and it could write the key no more.
    let (me, other) = two_actors();
    let mut as_dot = Context::default();
    as_dot.dots.insert(Dot {
        actor: other,
        counter: u64::MAX,
    });
    for (claim, claimed) in [
        (claiming(other, MAX_COUNTER + 1), MAX_COUNTER + 1),
        (claiming(other, u64::MAX), u64::MAX),
        (as_dot, u64::MAX),
    ] {
        let e = put(&DvvSet::default(), Some(&claim), me).unwrap_err();
        assert!(e.contains(&format!("version {claimed} of actor")), "{e}");
        assert!(e.contains("past any version a node writes"), "{e}");
    }
    // At the bound it is taken, and the other actor still has counters left.
    let taken = put(&DvvSet::default(), Some(&claiming(other, MAX_COUNTER)), me).unwrap();
    let next = put(&taken, Some(&taken.context), other).unwrap();
    assert!(next.context.vv[&other] == MAX_COUNTER + 1, "{next:?}");
}

#[test]
fn a_write_may_not_grow_a_context_past_the_limit() {
    use dynamo_core::version::{context_entries, MAX_CONTEXT_ENTRIES};
    let me = Actor {
        incarnation: 1,
        epoch: 1,
    };
    let fake = |from: u64, count: usize| {
        let mut ctx = Context::default();
        for i in 0..count as u64 {
            let actor = Actor {
                incarnation: from + i,
                epoch: 1,
            };
            ctx.vv.insert(actor, 1);
        }
        ctx
    };
    // Just under the limit is accepted (with the new dot, exactly at it).
    let full = put(
        &DvvSet::default(),
        Some(&fake(100, MAX_CONTEXT_ENTRIES - 1)),
        me,
    )
    .unwrap();
    assert_eq!(context_entries(&full.context), MAX_CONTEXT_ENTRIES);
    // One more actor is refused, a million is too.
    for count in [1, 1_000_000] {
        let Err(e) = put(&full, Some(&fake(10_000_000, count)), me) else {
            panic!("a context of {count} more actors past the limit was accepted");
        };
        assert!(e.contains("limit of 10000"), "{e}");
    }
    // Writes with the key's own context still go through.
    let next = put(&full, Some(&full.context), me).unwrap();
    assert_eq!(context_entries(&next.context), MAX_CONTEXT_ENTRIES);
}

/// A counter of a small window at the bottom of the range or at its top.
fn edge_counter() -> impl Strategy<Value = u64> {
    prop_oneof![0..6u64, (u64::MAX - 3)..=u64::MAX]
}

proptest! {
    /// A stored set or a peer's may name counters up to u64::MAX (only a
    /// client's context is bounded by MAX_COUNTER). Inserting dots up to the
    /// last counter, in any order, and merging with another such context
    /// never overflows, and the result covers exactly the union and stays
    /// compact.
    #[test]
    fn contexts_at_the_top_of_the_counter_range_cover_exactly_what_was_added(
        below_top in 0..10u64,
        offsets in prop::collection::vec(0..8u64, 0..12),
        other_below_top in 0..10u64,
    ) {
        let (actor, _) = two_actors();
        let dot = |counter| Dot { actor, counter };
        let mut ctx = claiming(actor, u64::MAX - below_top);
        for offset in &offsets {
            context_insert(&mut ctx, dot(u64::MAX - offset));
        }
        let inserted = |counter: u64| {
            counter <= u64::MAX - below_top || offsets.iter().any(|o| u64::MAX - o == counter)
        };
        let mut merged = ctx.clone();
        context_merge(&mut merged, &claiming(actor, u64::MAX - other_below_top));
        for counter in (u64::MAX - 12)..=u64::MAX {
            prop_assert_eq!(covers(&ctx, &dot(counter)), inserted(counter), "{}", counter);
            prop_assert_eq!(
                covers(&merged, &dot(counter)),
                inserted(counter) || counter <= u64::MAX - other_below_top,
                "{}",
                counter
            );
        }
        for context in [ctx, merged] {
            let set = DvvSet { context, siblings: Default::default() };
            prop_assert!(is_well_formed(&set), "{:?}", set);
        }
    }

    /// `is_well_formed` says exactly what its definition says: the context is
    /// what `compact` leaves unchanged, and it covers every sibling's dot. Any
    /// context, counters at both ends of the range included.
    #[test]
    fn is_well_formed_agrees_with_its_definition(
        vv in prop::collection::btree_map(0..3u64, edge_counter(), 0..3),
        dots in prop::collection::btree_set((0..3u64, edge_counter()), 0..5),
        siblings in prop::collection::btree_set((0..3u64, edge_counter()), 0..4),
    ) {
        let actor = |incarnation| Actor { incarnation, epoch: 1 };
        let dot = |(incarnation, counter)| Dot { actor: actor(incarnation), counter };
        let context = Context {
            vv: vv.into_iter().map(|(i, counter)| (actor(i), counter)).collect(),
            dots: dots.into_iter().map(dot).collect(),
        };
        let sibling = dynamo_proto::Sibling { value: None, timestamp: Hlc::default() };
        let set = DvvSet {
            context,
            siblings: siblings.into_iter().map(|d| (dot(d), sibling.clone())).collect(),
        };
        let mut compacted = set.context.clone();
        compact(&mut compacted);
        let defined = compacted == set.context
            && set.siblings.keys().all(|dot| covers(&set.context, dot));
        prop_assert_eq!(is_well_formed(&set), defined, "{:?}", set);
    }
}
