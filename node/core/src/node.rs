//! The `Node` state machine: one cluster member's coordinator and replica roles.
//!
//! It owns request coordination (quorums, forwarding, read repair), the replica
//! side of replication, and the overlay of writes handed to the shell but not yet
//! durable. Inputs are pushed with `now` (milliseconds from the shell's clock);
//! outputs are pulled with [`Node::poll_output`] and [`Node::poll_timeout`]. It
//! never does I/O, reads a clock or draws OS randomness.
//!
//! Durability: every write this node stores is emitted as [`Output::Persist`]; a
//! replica acknowledges, and a coordinator counts its own copy, only once the
//! shell calls [`Node::on_persisted`] for it.

use crate::anti_entropy::{self, HashTrees, Schedule};
use crate::handoff::{self, Hints, HINT_PARTITION};
use crate::membership::{HelloCheck, Member, Membership, Reachability};
use crate::quorum;
use crate::ring::{RingError, Role};
use crate::store::LocalStore;
use crate::version::{self, HlcClock, Versioning};
use dynamo_proto::{
    Actor, AntiEntropyEntry, ClientEnvelope, ClientError, ClientReply, ClientRequest, ClusterId,
    ClusterInfo, Context, Dot, DvvSet, GetReply, Hello, Hlc, MemberInfo, NodeId, PeerMessage,
    WriteMode,
};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Milliseconds on the shell's clock (wall-clock-like; the simulator may skew it).
pub type Millis = u64;

/// A client connection, numbered by the shell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClientId(pub u64);

/// Cluster-wide and node settings the core needs.
#[derive(Clone, Debug)]
pub struct Config {
    pub node: NodeId,
    pub cluster_id: ClusterId,
    /// Replicas per key.
    pub n: u8,
    /// Default read quorum.
    pub r: u8,
    /// Default write quorum.
    pub w: u8,
    /// Ring partitions (a power of two).
    pub q: u32,
    pub request_timeout_ms: Millis,
    pub max_siblings: usize,
    pub versioning: Versioning,
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    /// How far ahead of this node's wall clock a timestamp it sees may move
    /// its hybrid clock (see [`HlcClock`]).
    pub max_clock_drift_ms: Millis,
    /// Time between two anti-entropy exchanges this node starts (0: none;
    /// see [`anti_entropy`]).
    pub anti_entropy_interval_ms: Millis,
    /// The largest peer message payload the peers accept (the frame limit):
    /// anti-entropy keeps each message of entries to half of it.
    pub max_peer_message_bytes: usize,
    /// Sloppy quorum: a fallback's hint for a primary that looked down counts
    /// towards W, as in Dynamo and Riak. Off, hints are still kept and handed
    /// off, but only primaries count (see [`handoff`]).
    pub sloppy_quorum: bool,
    /// Time between two rounds of handing hints to their owners.
    pub handoff_interval_ms: Millis,
    /// Hints this node keeps at most as a fallback.
    pub max_hints: usize,
}

impl Config {
    /// The documented defaults for a node named `node`.
    pub fn new(node: &str) -> Config {
        Config {
            node: NodeId::from(node),
            cluster_id: ClusterId("dynamo".into()),
            n: 3,
            r: 2,
            w: 2,
            q: crate::ring::DEFAULT_PARTITIONS,
            request_timeout_ms: 2_000,
            max_siblings: version::DEFAULT_MAX_SIBLINGS,
            versioning: Versioning::Dvv,
            max_key_bytes: 1024,
            max_value_bytes: 1 << 20,
            max_clock_drift_ms: version::DEFAULT_MAX_CLOCK_DRIFT_MS,
            anti_entropy_interval_ms: anti_entropy::DEFAULT_INTERVAL_MS,
            max_peer_message_bytes: dynamo_proto::frame::DEFAULT_MAX_PAYLOAD,
            sloppy_quorum: true,
            handoff_interval_ms: handoff::DEFAULT_HANDOFF_INTERVAL_MS,
            max_hints: handoff::DEFAULT_MAX_HINTS,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("this node ({0}) is not in the member list; add it or fix --node-id")]
    NotAMember(NodeId),
    #[error("N = 0 stores nothing; set N to at least 1")]
    ZeroN,
    #[error("invalid ring: {0}")]
    Ring(#[from] RingError),
}

/// A write the shell must make durable, then report with [`Node::on_persisted`]:
/// store `set` under `key`, or remove the key when `set` is `None` (a hint
/// handed off).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PersistRequest {
    pub id: u64,
    pub partition: u32,
    pub key: Vec<u8>,
    pub set: Option<DvvSet>,
}

/// What the node asks the shell to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Send `msg` to peer `to` (dropped by the shell if it cannot).
    Peer { to: NodeId, msg: PeerMessage },
    /// Answer request `id` on client connection `client`.
    Reply {
        client: ClientId,
        id: u64,
        reply: ClientReply,
    },
    /// Store this set durably; acknowledgements wait for `on_persisted`.
    Persist(PersistRequest),
}

/// Who is waiting for a coordinated request's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Origin {
    Client { client: ClientId, id: u64 },
    Forwarded { from: NodeId, req: u64 },
}

#[derive(Debug)]
struct PendingPut {
    origin: Origin,
    /// The nodes whose acknowledgements count towards W: primaries, and under
    /// a sloppy quorum the fallbacks standing in for primaries that look down.
    primaries: Vec<NodeId>,
    /// The fallbacks among them.
    fallbacks: BTreeSet<NodeId>,
    needed: u8,
    acked: BTreeSet<NodeId>,
    failed: BTreeSet<NodeId>,
    dot: Dot,
    reply_context: Context,
    deadline: Millis,
    answered: bool,
    is_delete: bool,
}

#[derive(Debug)]
struct PendingGet {
    origin: Origin,
    key: Vec<u8>,
    primaries: Vec<NodeId>,
    needed: u8,
    replies: BTreeMap<NodeId, Option<DvvSet>>,
    /// The primaries that could not read their copy (this node included), and
    /// why: the client learns it should the get fail (a corrupt stored value
    /// names its key and what to do). They are neither replies nor repaired.
    failed: BTreeMap<NodeId, String>,
    merged: DvvSet,
    deadline: Millis,
    answered: bool,
}

#[derive(Debug)]
struct PendingForward {
    origin: Origin,
    to: NodeId,
    deadline: Millis,
    /// The write, for the next primary should `to` say it cannot coordinate it.
    request: ClientRequest,
    /// Primaries not tried yet, best first.
    untried: Vec<NodeId>,
}

/// A hint sent to its owner, awaiting the owner's acknowledgement.
#[derive(Debug)]
struct PendingHandoff {
    owner: NodeId,
    key: Vec<u8>,
    /// What was sent: the hint is removed only if it is still this.
    sent: DvvSet,
    deadline: Millis,
}

#[derive(Debug)]
enum Pending {
    Put(PendingPut),
    Get(PendingGet),
    Forward(PendingForward),
    Handoff(PendingHandoff),
}

impl Pending {
    fn deadline(&self) -> Millis {
        match self {
            Pending::Put(p) => p.deadline,
            Pending::Get(g) => g.deadline,
            Pending::Forward(f) => f.deadline,
            Pending::Handoff(h) => h.deadline,
        }
    }
}

/// What a persisted write releases.
#[derive(Debug, Clone)]
enum PersistWaiter {
    /// The coordinator's own copy of put `req`.
    Coordinator { req: u64 },
    /// A replica's acknowledgement owed to `to` for its requests `reqs`.
    ReplicaAck { to: NodeId, reqs: Vec<u64> },
    /// Read repair, or anything else no one waits for.
    Nobody,
}

/// Bits of a request id left for the per-start counter: 2^40 requests (about
/// 127 days at 100,000 a second) before one start's ids run into the next's.
const REQUEST_COUNTER_BITS: u32 = 40;

/// The first request id of a start of the node with `actor`. Replies
/// (`ReadReply`, `ReplicateAck`, `ForwardReply`) name only the request id, and a
/// peer's reply to a request of an earlier start can arrive after a restart
/// (it was queued while the connection was re-established, or the peer was
/// frozen): were ids to start over at 1, it would be taken for the reply to a
/// new request, and a read would merge in another key's versions and a write
/// count an acknowledgement its replica never gave. So each start draws its ids
/// from its own range: the high 24 bits come from the epoch, which is bumped on
/// every start, mixed with the incarnation, so that a wiped data directory (a new
/// incarnation at epoch 1) does not start over either.
pub fn first_request_id(actor: Actor) -> u64 {
    let start = actor
        .incarnation
        .rotate_left(23)
        .wrapping_add(u64::from(actor.epoch));
    (start << REQUEST_COUNTER_BITS) | 1
}

/// A write handed to the shell and not yet durable: the set (`None`: the key's
/// removal) and its persist id.
type Unsynced = (Option<DvvSet>, u64);

/// One cluster member's coordinator and replica roles.
pub struct Node {
    config: Config,
    /// Effective N (min of N and the member count) and the default R and W
    /// clamped to it.
    n: u8,
    r: u8,
    w: u8,
    actor: Actor,
    membership: Membership,
    store: Box<dyn LocalStore + Send>,
    hlc: HlcClock,
    /// Writes handed to the shell and not yet reported durable, by partition
    /// and key, with the newest persist id: reads see them first (`None`: a
    /// removal).
    unsynced: BTreeMap<u32, BTreeMap<Vec<u8>, Unsynced>>,
    persist_waiters: BTreeMap<u64, (u32, Vec<u8>, PersistWaiter)>,
    next_persist: u64,
    next_req: u64,
    pending: BTreeMap<u64, Pending>,
    /// (deadline, request) for every pending request.
    timers: BTreeSet<(Millis, u64)>,
    outputs: VecDeque<Output>,
    /// Outputs ever queued and ever collected: output number `i` (counting
    /// from 0) sits at `outputs[i - popped]` until collected.
    pushed: u64,
    popped: u64,
    /// The number of the last output queued for each peer.
    last_to_peer: BTreeMap<NodeId, u64>,
    warnings: Vec<String>,
    /// The far-future timestamp count last warned about.
    warned_far_future: u64,
    /// Timestamps beyond the drift bound that this node's reads saw, by key
    /// (at most [`MAX_FAR_FUTURE_FLOORS`]): a write it coordinates on such a
    /// key before the read's repair reaches its own copy is still stamped
    /// after them, as it was when the clock took every timestamp.
    far_future_floors: BTreeMap<Vec<u8>, Hlc>,
    /// Anti-entropy: the hash trees of the partitions exchanged so far, when
    /// the next exchange starts and with whom, and what it has done.
    trees: HashTrees,
    exchanges: Schedule,
    anti_entropy: anti_entropy::Stats,
    /// Hinted handoff: the hints this node holds as a fallback, and what it
    /// has done with them.
    hints: Hints,
    handoff: handoff::Stats,
}

/// Keys whose far-future read timestamps a node keeps (see
/// `Node::far_future_floors`); past it the least key goes. A far-future
/// timestamp is a wrong clock's, so this is for a few keys, not for all.
const MAX_FAR_FUTURE_FLOORS: usize = 1024;

impl Node {
    /// A node of a fixed cluster. `actor` must be fresh for this start (its epoch
    /// persisted and bumped by the shell before calling this).
    pub fn new(
        config: Config,
        members: Vec<Member>,
        actor: Actor,
        store: Box<dyn LocalStore + Send>,
    ) -> Result<Node, ConfigError> {
        if config.n == 0 {
            return Err(ConfigError::ZeroN);
        }
        if !members.iter().any(|m| m.id == config.node) {
            return Err(ConfigError::NotAMember(config.node.clone()));
        }
        let membership = Membership::fixed(members, config.q, usize::from(config.n))?;
        let mut warnings = Vec::new();
        let n = quorum::effective_n(config.n, membership.len());
        if n < config.n {
            warnings.push(format!(
                "the cluster has {} nodes, fewer than N = {}: every key is stored on all {} \
                 nodes",
                membership.len(),
                config.n,
                n
            ));
        }
        let (r, warn_r) = quorum::clamp_default("R", config.r, n);
        let (w, warn_w) = quorum::clamp_default("W", config.w, n);
        warnings.extend(warn_r);
        warnings.extend(warn_w);
        let max_clock_drift_ms = config.max_clock_drift_ms;
        let exchanges = Schedule::new(config.anti_entropy_interval_ms, 0);
        let hints = Hints::new(config.handoff_interval_ms);
        let mut node = Node {
            config,
            n,
            r,
            w,
            actor,
            membership,
            store,
            hlc: HlcClock::with_max_drift(max_clock_drift_ms),
            unsynced: BTreeMap::new(),
            persist_waiters: BTreeMap::new(),
            next_persist: 1,
            next_req: first_request_id(actor),
            pending: BTreeMap::new(),
            timers: BTreeSet::new(),
            outputs: VecDeque::new(),
            pushed: 0,
            popped: 0,
            last_to_peer: BTreeMap::new(),
            warnings,
            warned_far_future: 0,
            far_future_floors: BTreeMap::new(),
            trees: HashTrees::default(),
            exchanges,
            anti_entropy: anti_entropy::Stats::default(),
            hints,
            handoff: handoff::Stats::default(),
        };
        node.list_hints(0);
        Ok(node)
    }

    pub fn id(&self) -> &NodeId {
        &self.config.node
    }

    pub fn actor(&self) -> Actor {
        self.actor
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// Effective (N, R, W) after clamping to the member count.
    pub fn quorum(&self) -> (u8, u8, u8) {
        (self.n, self.r, self.w)
    }

    /// Configuration warnings to log at start (for example N larger than the cluster).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The greeting this node sends first on every internode connection.
    pub fn hello(&self) -> Hello {
        let me = self.membership.member(&self.config.node);
        Hello {
            cluster_id: self.config.cluster_id.clone(),
            node: self.config.node.clone(),
            q: self.config.q,
            n: self.config.n,
            client_addr: me.map(|m| m.client_addr.clone()).unwrap_or_default(),
            http_addr: me.map(|m| m.http_addr.clone()).unwrap_or_default(),
        }
    }

    /// The rules a peer's greeting must pass, as a value the shell's connection
    /// tasks can hold without asking this node.
    pub fn hello_check(&self) -> HelloCheck {
        HelloCheck {
            cluster_id: self.config.cluster_id.clone(),
            node: self.config.node.clone(),
            q: self.config.q,
            n: self.config.n,
            members: self.membership.members().map(|m| m.id.clone()).collect(),
        }
    }

    /// Whether a peer's greeting is acceptable: same cluster, Q and N, and a member.
    pub fn check_hello(&self, hello: &Hello) -> Result<(), String> {
        self.hello_check().check(hello)
    }

    /// A peer greeted us with the addresses it serves clients on.
    pub fn learn_addresses(&mut self, peer: &NodeId, client_addr: &str, http_addr: &str) {
        self.membership.set_addresses(peer, client_addr, http_addr);
    }

    /// The shell learned whether `peer` is reachable (a connection made or lost).
    pub fn set_reachable(&mut self, peer: &NodeId, up: bool) {
        self.membership.set_reachable(peer, up);
        if up && self.hints.has_owner(peer) {
            // Its hints go at the next timeout, not an interval later.
            self.hints.arm_now();
        }
    }

    /// True when no request is in flight and no write awaits persistence, so a
    /// node shutting down loses nothing by stopping now. Hints being handed
    /// off do not count: each stays stored until its owner acknowledged it,
    /// and goes again after a restart.
    pub fn is_idle(&self) -> bool {
        self.pending
            .values()
            .all(|p| matches!(p, Pending::Handoff(_)))
            && self.persist_waiters.is_empty()
            && self.outputs.is_empty()
    }

    /// The next thing for the shell to do, if any.
    #[must_use]
    pub fn poll_output(&mut self) -> Option<Output> {
        let output = self.outputs.pop_front()?;
        self.popped += 1;
        Some(output)
    }

    /// When [`Node::handle_timeout`] should next be called.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Millis> {
        let deadline = self.timers.first().map(|&(at, _)| at);
        [deadline, self.exchanges.next_at, self.hints.next_at()]
            .into_iter()
            .flatten()
            .min()
    }

    /// Expires every request whose deadline has passed.
    pub fn handle_timeout(&mut self, now: Millis) {
        while let Some(&(at, req)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.remove(&(at, req));
            if let Some(pending) = self.pending.remove(&req) {
                self.expire(req, pending);
            }
        }
        if self.exchanges.due(now) {
            self.start_exchange(now);
        }
        if self.hints.due(now) {
            self.hand_off(now);
        }
    }

    /// A client request arrived on connection `client`.
    pub fn handle_client(&mut self, now: Millis, client: ClientId, envelope: ClientEnvelope) {
        let origin = Origin::Client {
            client,
            id: envelope.id,
        };
        self.handle_request(now, origin, envelope.request);
    }

    /// A message from peer `from` (already past the `Hello` handshake).
    pub fn handle_peer(&mut self, now: Millis, from: &NodeId, msg: PeerMessage) {
        if !self.membership.contains(from) {
            tracing::warn!(peer = %from, "message from a node that is not a member; dropped");
            return;
        }
        let Some(msg) = self.refuse_malformed_set(from, msg) else {
            return;
        };
        match msg {
            // Handshakes and keepalives belong to the transport.
            PeerMessage::Hello(_)
            | PeerMessage::HelloRejected { .. }
            | PeerMessage::Ping { .. }
            | PeerMessage::Pong { .. } => {}
            PeerMessage::Replicate { reqs, key, set } => {
                self.on_replicate(now, from, reqs, &key, &set);
            }
            PeerMessage::Hint {
                reqs,
                owner,
                key,
                set,
            } => self.on_hint(now, from, reqs, owner, key, set),
            PeerMessage::ReplicateAck { reqs, error } => {
                for req in reqs {
                    if matches!(self.pending.get(&req), Some(Pending::Handoff(h)) if &h.owner == from)
                    {
                        if let Some(Pending::Handoff(handoff)) = self.remove_pending(req) {
                            self.on_handed_off(now, handoff, error.clone());
                        }
                        continue;
                    }
                    self.on_replicate_ack(from, req, error.clone());
                }
            }
            PeerMessage::Read { req, key } => {
                let partition = self.membership.ring().partition_for_key(&key);
                let result = self.load(partition, &key);
                if let Err(e) = &result {
                    tracing::error!(error = %e, "read for a peer failed");
                }
                self.send(from, PeerMessage::ReadReply { req, result });
            }
            PeerMessage::ReadReply { req, result } => self.on_read_reply(now, from, req, result),
            PeerMessage::Repair { key, set } => {
                self.hlc_observe(now, from, &set);
                if let Err((e, _)) = self.merge_local(&key, &set, PersistWaiter::Nobody, false) {
                    tracing::error!(error = %e, "read repair could not be applied");
                }
            }
            PeerMessage::AntiEntropySegments {
                partition,
                segments,
            } => self.on_exchange_segments(now, from, partition, &segments),
            PeerMessage::AntiEntropyEntries {
                partition,
                segments,
                pages,
                page,
                entries,
                reply,
            } => self.on_exchange_entries(
                now,
                from,
                partition,
                (&segments, pages, page),
                entries,
                reply,
            ),
            PeerMessage::Forward { req, request } => {
                let origin = Origin::Forwarded {
                    from: from.clone(),
                    req,
                };
                self.handle_request(now, origin, request);
            }
            PeerMessage::ForwardReply { req, reply } => {
                let Some(Pending::Forward(f)) = self.pending.get_mut(&req) else {
                    return;
                };
                if &f.to != from {
                    return;
                }
                // A primary that cannot coordinate the write (it cannot read
                // its copy, or its ring disagrees) says so with Unavailable
                // before doing anything: the next primary may.
                if matches!(reply, ClientReply::Error(ClientError::Unavailable(_)))
                    && !f.untried.is_empty()
                {
                    f.to = f.untried.remove(0);
                    let (to, request) = (f.to.clone(), f.request.clone());
                    self.send(&to, PeerMessage::Forward { req, request });
                    return;
                }
                let Some(Pending::Forward(f)) = self.remove_pending(req) else {
                    unreachable!("checked above");
                };
                self.answer(f.origin, reply);
            }
        }
    }

    /// Checks the set a peer's message hands this node to merge or to answer a
    /// client with, at the one place every peer message enters: a set that is
    /// not well formed ([`version::is_well_formed`]) would be stored, served
    /// and spread, and a coordinator minting on top of it could reuse a dot. A
    /// malformed `Replicate` is acknowledged with an error, a malformed
    /// `ReadReply` becomes a failed read, and a malformed `Repair` is dropped;
    /// each is logged. Other messages carry no set: a `Forward`ed request's
    /// context is a client's, which the write checks and compacts as it does
    /// any client's, and a `ForwardReply` goes back to the client as it came.
    /// Returns the message to handle, if any.
    fn refuse_malformed_set(&mut self, from: &NodeId, msg: PeerMessage) -> Option<PeerMessage> {
        let set = match &msg {
            PeerMessage::Replicate { set, .. }
            | PeerMessage::Hint { set, .. }
            | PeerMessage::Repair { set, .. }
            | PeerMessage::ReadReply {
                result: Ok(Some(set)),
                ..
            } => set,
            _ => return Some(msg),
        };
        let Some(why) = version::malformation(set) else {
            return Some(msg);
        };
        let error = format!("malformed version set from {from} refused: {why}");
        tracing::error!(peer = %from, "{error}");
        match msg {
            PeerMessage::Replicate { reqs, .. } | PeerMessage::Hint { reqs, .. } => {
                let ack = PeerMessage::ReplicateAck {
                    reqs,
                    error: Some(error),
                };
                self.send(from, ack);
                None
            }
            PeerMessage::ReadReply { req, .. } => Some(PeerMessage::ReadReply {
                req,
                result: Err(error),
            }),
            _ => None,
        }
    }

    /// The shell made persist request `id` durable (`error` is `None`), or failed to.
    pub fn on_persisted(&mut self, id: u64, error: Option<String>) {
        let Some((partition, key, waiter)) = self.persist_waiters.remove(&id) else {
            return;
        };
        if error.is_none() {
            // The newest write of the key is durable: the store now has it.
            if let Some(slot) = self.unsynced.get_mut(&partition) {
                if slot.get(&key).is_some_and(|(_, latest)| *latest == id) {
                    slot.remove(&key);
                    if slot.is_empty() {
                        self.unsynced.remove(&partition);
                    }
                }
            }
        } else {
            tracing::error!(id, error = ?error, "persist failed");
        }
        match waiter {
            PersistWaiter::Coordinator { req } => {
                let me = self.config.node.clone();
                self.on_replicate_ack(&me, req, error);
            }
            PersistWaiter::ReplicaAck { to, reqs } => {
                self.send(&to, PeerMessage::ReplicateAck { reqs, error });
            }
            PersistWaiter::Nobody => {}
        }
    }

    // ---- coordination -------------------------------------------------------

    fn handle_request(&mut self, now: Millis, origin: Origin, request: ClientRequest) {
        match request {
            ClientRequest::Ping => {
                let node = self.config.node.clone();
                self.answer(origin, ClientReply::Pong { node });
            }
            ClientRequest::ClusterInfo => {
                let info = self.cluster_info();
                self.answer(origin, ClientReply::ClusterInfo(info));
            }
            ClientRequest::LocalGet { key } => {
                let partition = self.membership.ring().partition_for_key(&key);
                let reply = match self.load(partition, &key) {
                    Ok(set) => ClientReply::LocalGet(set),
                    Err(e) => ClientReply::Error(ClientError::Internal(e)),
                };
                self.answer(origin, reply);
            }
            ClientRequest::Get { key, r } => self.start_get(now, origin, key, r),
            ClientRequest::Put {
                key,
                value,
                context,
                w,
                mode,
            } => self.start_put(now, origin, key, value, context, w, mode),
        }
    }

    fn check_key(&self, key: &[u8]) -> Result<(), ClientError> {
        if key.is_empty() {
            return Err(ClientError::Invalid("the key is empty".into()));
        }
        if key.len() > self.config.max_key_bytes {
            return Err(ClientError::KeyTooLarge {
                len: key.len() as u64,
                max: self.config.max_key_bytes as u64,
            });
        }
        Ok(())
    }

    fn start_get(&mut self, now: Millis, origin: Origin, key: Vec<u8>, r: Option<u8>) {
        if let Err(e) = self.check_key(&key) {
            return self.answer(origin, ClientReply::Error(e));
        }
        let needed = match quorum::resolve("R", r, self.r, self.n) {
            Ok(v) => v,
            Err(e) => return self.answer(origin, ClientReply::Error(ClientError::Invalid(e))),
        };
        let ring = self.membership.ring();
        let partition = ring.partition_for_key(&key);
        let primaries = ring.primaries(partition, usize::from(self.n));
        let req = self.next_request();
        let deadline = now + self.config.request_timeout_ms;
        let mut get = PendingGet {
            origin,
            key,
            primaries,
            needed,
            replies: BTreeMap::new(),
            failed: BTreeMap::new(),
            merged: DvvSet::default(),
            deadline,
            answered: false,
        };
        for p in get.primaries.clone() {
            if p == self.config.node {
                match self.load(partition, &get.key) {
                    Ok(set) => record_read(&mut get, p, set, self.config.versioning),
                    Err(e) => {
                        tracing::error!(error = %e, "local read failed");
                        get.failed.insert(p, e);
                    }
                }
            } else {
                let msg = PeerMessage::Read {
                    req,
                    key: get.key.clone(),
                };
                self.send(&p, msg);
            }
        }
        self.insert_pending(req, Pending::Get(get));
        self.progress_get(req);
    }

    fn on_read_reply(
        &mut self,
        now: Millis,
        from: &NodeId,
        req: u64,
        result: Result<Option<DvvSet>, String>,
    ) {
        let Some(Pending::Get(get)) = self.pending.get_mut(&req) else {
            return;
        };
        if !get.primaries.contains(from)
            || get.replies.contains_key(from)
            || get.failed.contains_key(from)
        {
            return;
        }
        match result {
            Ok(set) => {
                if let Some(set) = &set {
                    if !self.hlc_observe(now, from, set) {
                        self.keep_far_future_floor(req, set);
                    }
                }
                let mode = self.config.versioning;
                let Some(Pending::Get(get)) = self.pending.get_mut(&req) else {
                    unreachable!("checked above");
                };
                record_read(get, from.clone(), set, mode);
            }
            Err(e) => {
                tracing::warn!(replica = %from, error = %e, "replica failed to read a key");
                get.failed.insert(from.clone(), e);
            }
        }
        self.progress_get(req);
    }

    /// Answers a get once R primaries replied, or with an error once too many
    /// failed for R to be met; repairs once all have answered (or at the
    /// deadline, see `expire`).
    fn progress_get(&mut self, req: u64) {
        let Some(Pending::Get(get)) = self.pending.get_mut(&req) else {
            return;
        };
        let n = get.primaries.len() as u8;
        if !get.answered && get.replies.len() >= usize::from(get.needed) {
            get.answered = true;
            let reply = get_reply(&get.merged);
            let origin = get.origin.clone();
            self.answer(origin, reply);
        } else if !get.answered && !quorum::still_reachable(get.needed, get.failed.len(), n) {
            get.answered = true;
            let reply = ClientReply::Error(get_failure(get));
            let origin = get.origin.clone();
            self.answer(origin, reply);
        }
        let Some(Pending::Get(get)) = self.pending.get(&req) else {
            return;
        };
        if get.replies.len() + get.failed.len() >= get.primaries.len() {
            let Some(Pending::Get(get)) = self.remove_pending(req) else {
                unreachable!("checked above");
            };
            self.finish_get(get);
        }
    }

    /// Read repair: every primary that answered with less than the merged set
    /// gets the merged set.
    fn finish_get(&mut self, get: PendingGet) {
        if !get.answered {
            let error = get_failure(&get);
            self.answer(get.origin.clone(), ClientReply::Error(error));
        }
        if get.merged == DvvSet::default() {
            return;
        }
        for (node, reply) in &get.replies {
            if reply.as_ref() == Some(&get.merged) {
                continue;
            }
            if *node == self.config.node {
                if let Err((e, _)) =
                    self.merge_local(&get.key, &get.merged, PersistWaiter::Nobody, false)
                {
                    tracing::error!(error = %e, "local read repair failed");
                }
            } else {
                let msg = PeerMessage::Repair {
                    key: get.key.clone(),
                    set: get.merged.clone(),
                };
                self.send(node, msg);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn start_put(
        &mut self,
        now: Millis,
        origin: Origin,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
        context: Option<Context>,
        w: Option<u8>,
        mode: WriteMode,
    ) {
        if let Err(e) = self.check_key(&key) {
            return self.answer(origin, ClientReply::Error(e));
        }
        if let Some(v) = &value {
            if v.len() > self.config.max_value_bytes {
                let e = ClientError::ValueTooLarge {
                    len: v.len() as u64,
                    max: self.config.max_value_bytes as u64,
                };
                return self.answer(origin, ClientReply::Error(e));
            }
        }
        // Checked before anything walks it (or a forward carries it on).
        if let Some(entries) = context
            .as_ref()
            .map(version::context_entries)
            .filter(|&n| n > version::MAX_CONTEXT_ENTRIES)
        {
            let e = version::VersionError::ContextTooLarge {
                entries,
                limit: version::MAX_CONTEXT_ENTRIES,
            };
            return self.answer(
                origin,
                ClientReply::Error(ClientError::Invalid(e.to_string())),
            );
        }
        let needed = match quorum::resolve("W", w, self.w, self.n) {
            Ok(v) => v,
            Err(e) => return self.answer(origin, ClientReply::Error(ClientError::Invalid(e))),
        };
        let ring = self.membership.ring();
        let partition = ring.partition_for_key(&key);
        let primaries = ring.primaries(partition, usize::from(self.n));
        if !primaries.contains(&self.config.node) {
            return self.forward(now, origin, primaries, key, value, context, w, mode);
        }
        let local = match self.load(partition, &key) {
            Ok(set) => set.unwrap_or_default(),
            Err(e) => {
                // Without its own copy this node cannot mint on top of it, but
                // another primary can coordinate the write, as for a node
                // outside the preference list. Once only: a forwarded write
                // that meets an unreadable copy fails here.
                let others: Vec<NodeId> = primaries
                    .iter()
                    .filter(|p| **p != self.config.node)
                    .cloned()
                    .collect();
                if matches!(origin, Origin::Client { .. }) && !others.is_empty() {
                    tracing::warn!(error = %e, "cannot read the local copy; another primary coordinates the write");
                    return self.forward(now, origin, others, key, value, context, w, mode);
                }
                // A forwarder tries the next primary on Unavailable.
                let e = match origin {
                    Origin::Forwarded { .. } => ClientError::Unavailable(format!(
                        "{} cannot read its copy of the key to coordinate the write: {e}",
                        self.config.node
                    )),
                    Origin::Client { .. } => ClientError::Internal(e),
                };
                return self.answer(origin, ClientReply::Error(e));
            }
        };
        // In LWW mode the new write must sort after what it replaces here,
        // even a sibling stamped beyond the drift bound, and after what a
        // read through this node saw that its own copy may not hold yet.
        let floor = newest_timestamp(&local).max(self.far_future_floors.remove(&key));
        let timestamp = self.hlc.stamp_after(now, floor);
        self.warn_if_far_future();
        let is_delete = value.is_none();
        let outcome = match version::write(
            &local,
            context.as_ref(),
            mode,
            value,
            self.actor,
            timestamp,
            self.config.versioning,
            self.config.max_siblings,
        ) {
            Ok(outcome) => outcome,
            Err(version::VersionError::TooManySiblings { count, limit }) => {
                let e = ClientError::TooManySiblings {
                    count: count as u32,
                    limit: limit as u32,
                };
                return self.answer(origin, ClientReply::Error(e));
            }
            Err(e) => {
                let e = ClientError::Invalid(e.to_string());
                return self.answer(origin, ClientReply::Error(e));
            }
        };
        if self.trees.is_built(partition) {
            let old = anti_entropy::entry_hash(&key, &local);
            let new = anti_entropy::entry_hash(&key, &outcome.set);
            self.trees.update(partition, &key, old, new);
        }
        let req = self.next_request();
        let mut voters = vec![self.config.node.clone()];
        let mut fallbacks = BTreeSet::new();
        for (to, owner) in self.write_targets(&key, &primaries) {
            match owner {
                None => self.replicate(&to, req, &key, &outcome.set),
                Some(owner) => {
                    let msg = PeerMessage::Hint {
                        reqs: vec![req],
                        owner: owner.clone(),
                        key: key.clone(),
                        set: outcome.set.clone(),
                    };
                    self.send(&to, msg);
                    if !self.config.sloppy_quorum {
                        // The hint is kept and handed off, but only primaries
                        // count: the one that looks down still gets the write
                        // (it may be back before the timeout).
                        self.replicate(&owner, req, &key, &outcome.set);
                        voters.push(owner);
                        continue;
                    }
                    fallbacks.insert(to.clone());
                }
            }
            voters.push(to);
        }
        self.persist(
            partition,
            key,
            outcome.set,
            PersistWaiter::Coordinator { req },
        );
        let put = PendingPut {
            origin,
            primaries: voters,
            fallbacks,
            needed,
            acked: BTreeSet::new(),
            failed: BTreeSet::new(),
            dot: outcome.dot,
            reply_context: outcome.reply_context,
            deadline: now + self.config.request_timeout_ms,
            answered: false,
            is_delete,
        };
        self.insert_pending(req, Pending::Put(put));
    }

    #[allow(clippy::too_many_arguments)]
    fn forward(
        &mut self,
        now: Millis,
        origin: Origin,
        primaries: Vec<NodeId>,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
        context: Option<Context>,
        w: Option<u8>,
        mode: WriteMode,
    ) {
        if matches!(origin, Origin::Forwarded { .. }) {
            // The forwarding node's ring named us a primary and ours does not:
            // refuse rather than bounce the write around.
            let e = ClientError::Unavailable(format!(
                "{} received a forwarded write for a key it is not a primary of; the rings \
                 disagree, retry shortly",
                self.config.node
            ));
            return self.answer(origin, ClientReply::Error(e));
        }
        // A primary known to be connected first, then one not yet reached (a
        // node that just restarted has not finished greeting everyone, and an
        // attempt at a frozen peer can take seconds to fail), then one whose
        // connection failed; in preference-list order among equals. Should
        // one answer that it cannot coordinate the write, the next is tried.
        let mut untried = primaries;
        untried.sort_by_key(|p| self.membership.reachability(p));
        let to = untried.remove(0);
        let req = self.next_request();
        let request = ClientRequest::Put {
            key,
            value,
            context,
            w,
            mode,
        };
        self.send(
            &to,
            PeerMessage::Forward {
                req,
                request: request.clone(),
            },
        );
        let deadline = now + self.config.request_timeout_ms;
        self.insert_pending(
            req,
            Pending::Forward(PendingForward {
                origin,
                to,
                deadline,
                request,
                untried,
            }),
        );
    }

    fn on_replicate_ack(&mut self, from: &NodeId, req: u64, error: Option<String>) {
        let Some(Pending::Put(put)) = self.pending.get_mut(&req) else {
            return;
        };
        if !put.primaries.contains(from) {
            return;
        }
        match error {
            None => {
                put.acked.insert(from.clone());
            }
            Some(e) => {
                tracing::warn!(replica = %from, error = %e, "replica failed to persist a write");
                put.failed.insert(from.clone());
            }
        }
        let n = put.primaries.len() as u8;
        if !put.answered && put.acked.len() >= usize::from(put.needed) {
            put.answered = true;
            let from_primaries = put.acked.difference(&put.fallbacks).count();
            let reply = ClientReply::Put {
                dot: put.dot,
                context: put.reply_context.clone(),
                sloppy: from_primaries < usize::from(put.needed),
            };
            let origin = put.origin.clone();
            self.answer(origin, reply);
        } else if !put.answered && !quorum::still_reachable(put.needed, put.failed.len(), n) {
            put.answered = true;
            let e = put_quorum_error(put);
            let origin = put.origin.clone();
            self.answer(origin, ClientReply::Error(e));
        }
        let Some(Pending::Put(put)) = self.pending.get(&req) else {
            return;
        };
        if put.acked.len() + put.failed.len() >= put.primaries.len() {
            self.remove_pending(req);
        }
    }

    fn expire(&mut self, _req: u64, pending: Pending) {
        match pending {
            Pending::Put(put) => {
                if !put.answered {
                    let e = put_quorum_error(&put);
                    self.answer(put.origin, ClientReply::Error(e));
                }
            }
            Pending::Get(get) => self.finish_get(get),
            Pending::Forward(f) => {
                let e = ClientError::Unavailable(format!(
                    "forwarded the write to primary {}, which did not answer in time; the \
                     write may still have been applied",
                    f.to
                ));
                self.answer(f.origin, ClientReply::Error(e));
            }
            // Sent again at a later round.
            Pending::Handoff(h) => self.hints.landed(&h.owner, &h.key),
        }
    }

    // ---- replica side -------------------------------------------------------

    /// Merges `incoming` into the local copy of `key` and persists the result.
    /// With `always_persist`, persists even when nothing changed (a replica must
    /// still acknowledge a duplicate replication once it is durable). When the
    /// local copy cannot be read, the error comes back with `waiter`.
    fn merge_local(
        &mut self,
        key: &[u8],
        incoming: &DvvSet,
        waiter: PersistWaiter,
        always_persist: bool,
    ) -> Result<bool, (String, PersistWaiter)> {
        let partition = self.membership.ring().partition_for_key(key);
        let mut local = match self.load(partition, key) {
            Ok(set) => set.unwrap_or_default(),
            // The waiter comes back so its owner can be told.
            Err(e) => return Err((e, waiter)),
        };
        let old_hash = self
            .trees
            .is_built(partition)
            .then(|| anti_entropy::entry_hash(key, &local));
        let changed = version::merge_into(&mut local, incoming, self.config.versioning);
        if changed || always_persist {
            if let Some(old) = old_hash {
                let new = anti_entropy::entry_hash(key, &local);
                self.trees.update(partition, key, old, new);
            }
            self.persist(partition, key.to_vec(), local, waiter);
        }
        Ok(changed)
    }

    fn persist(&mut self, partition: u32, key: Vec<u8>, set: DvvSet, waiter: PersistWaiter) {
        self.persist_or_remove(partition, key, Some(set), waiter);
    }

    /// As [`Node::persist`]; `None` removes the key.
    fn persist_or_remove(
        &mut self,
        partition: u32,
        key: Vec<u8>,
        set: Option<DvvSet>,
        waiter: PersistWaiter,
    ) {
        let id = self.next_persist;
        self.next_persist += 1;
        self.unsynced
            .entry(partition)
            .or_default()
            .insert(key.clone(), (set.clone(), id));
        self.persist_waiters
            .insert(id, (partition, key.clone(), waiter));
        self.push_output(Output::Persist(PersistRequest {
            id,
            partition,
            key,
            set,
        }));
    }

    /// The local copy of a key: the newest unpersisted write, else the store's.
    fn load(&self, partition: u32, key: &[u8]) -> Result<Option<DvvSet>, String> {
        if let Some((set, _)) = self.unsynced.get(&partition).and_then(|s| s.get(key)) {
            return Ok(set.clone());
        }
        self.store.load(partition, key).map_err(|e| e.to_string())
    }

    /// A replica's part of a write: merge, persist, then acknowledge.
    fn on_replicate(
        &mut self,
        now: Millis,
        from: &NodeId,
        reqs: Vec<u64>,
        key: &[u8],
        set: &DvvSet,
    ) {
        self.hlc_observe(now, from, set);
        let waiter = PersistWaiter::ReplicaAck {
            to: from.clone(),
            reqs,
        };
        if let Err((error, PersistWaiter::ReplicaAck { reqs, .. })) =
            self.merge_local(key, set, waiter, true)
        {
            self.send(
                from,
                PeerMessage::ReplicateAck {
                    reqs,
                    error: Some(error),
                },
            );
        }
    }

    // ---- hinted handoff -----------------------------------------------------

    /// What hinted handoff has done on this node, and the hints it holds.
    pub fn handoff_stats(&self) -> handoff::Stats {
        handoff::Stats {
            held: self.hints.len() as u64,
            ..self.handoff
        }
    }

    /// Where a write this node coordinates goes besides itself: every other
    /// primary that looks up, and, in place of each one whose last connection
    /// failed, the next fallback of the preference list that looks up, with
    /// the primary it stands in for. A primary that looks down with no
    /// fallback left is sent the write anyway (it may be back in time).
    fn write_targets(&self, key: &[u8], primaries: &[NodeId]) -> Vec<(NodeId, Option<NodeId>)> {
        let membership = &self.membership;
        let mut fallbacks = membership
            .ring()
            .preference_list(key, usize::from(self.n), |id| membership.is_up(id))
            .into_iter()
            .filter(|entry| entry.role == Role::Fallback)
            .map(|entry| entry.node);
        primaries
            .iter()
            .filter(|p| **p != self.config.node)
            .map(|p| {
                if membership.is_up(p) {
                    return (p.clone(), None);
                }
                match fallbacks.next() {
                    Some(fallback) => (fallback, Some(p.clone())),
                    None => (p.clone(), None),
                }
            })
            .collect()
    }

    /// A coordinator asks this node to keep a write for `owner` as a hint.
    fn on_hint(
        &mut self,
        now: Millis,
        from: &NodeId,
        reqs: Vec<u64>,
        owner: NodeId,
        key: Vec<u8>,
        set: DvvSet,
    ) {
        let ring = self.membership.ring();
        let primaries = ring.primaries(ring.partition_for_key(&key), usize::from(self.n));
        if primaries.contains(&self.config.node) {
            // The coordinator's ring (or its view of who is up) differs from
            // ours: this node is a primary, and keeps the write as one.
            return self.on_replicate(now, from, reqs, &key, &set);
        }
        let refusal = if !primaries.contains(from) {
            Some(format!(
                "hint refused: {from} is not a primary of the key here, and only a primary coordinates a write"
            ))
        } else if self.check_key(&key).is_err() {
            Some(format!(
                "hint refused: its key is empty or longer than {} bytes",
                self.config.max_key_bytes
            ))
        } else if !primaries.contains(&owner) {
            Some(format!(
                "hint refused: {owner} is not a primary of the key here"
            ))
        } else if !self.hints.contains(&owner, &key) && self.hints.len() >= self.config.max_hints {
            Some(format!(
                "hint refused: {} holds {} hints, its limit (max_hints)",
                self.config.node,
                self.hints.len()
            ))
        } else {
            None
        };
        if let Some(error) = refusal {
            tracing::warn!(peer = %from, "{error}");
            self.handoff.refused += 1;
            let ack = PeerMessage::ReplicateAck {
                reqs,
                error: Some(error),
            };
            return self.send(from, ack);
        }
        self.hlc_observe(now, from, &set);
        let stored = handoff::hint_key(&owner, &key);
        let mut hint = match self.load(HINT_PARTITION, &stored) {
            Ok(hint) => hint.unwrap_or_default(),
            Err(error) => {
                let ack = PeerMessage::ReplicateAck {
                    reqs,
                    error: Some(error),
                };
                return self.send(from, ack);
            }
        };
        version::merge_into(&mut hint, &set, self.config.versioning);
        let waiter = PersistWaiter::ReplicaAck {
            to: from.clone(),
            reqs,
        };
        self.persist(HINT_PARTITION, stored, hint, waiter);
        self.hints.insert(&owner, &key);
        self.handoff.accepted += 1;
        if self.membership.reachability(&owner) == Reachability::Reachable {
            self.hints.arm(now);
        }
    }

    /// Whether a handoff round has anything to do: the stored hints are still
    /// to be listed, or an owner of some is connected. Otherwise no timer
    /// runs; a connection to an owner arms one (see [`Node::set_reachable`]).
    fn handoff_wanted(&self) -> bool {
        self.hints.unlisted
            || self
                .hints
                .owners()
                .iter()
                .any(|o| self.membership.reachability(o) == Reachability::Reachable)
    }

    /// Lists the hints storage holds (at start, or after a failed listing).
    fn list_hints(&mut self, now: Millis) {
        // Keys only: the filter sees every key and refuses it, so no stored
        // set is decoded.
        let keys = std::cell::RefCell::new(Vec::new());
        let listed = self.store.scan(HINT_PARTITION, &|stored| {
            keys.borrow_mut().push(stored.to_vec());
            false
        });
        match listed {
            Ok(_) => {
                self.hints.unlisted = false;
                for stored in keys.into_inner() {
                    match handoff::split_hint_key(&stored) {
                        Some((owner, key)) if self.membership.contains(&owner) => {
                            self.hints.insert(&owner, key);
                        }
                        _ => tracing::error!(
                            key = ?stored,
                            "a stored hint names no member of this cluster (or is not one this \
                             version writes); it is left in place and not handed off"
                        ),
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot list the stored hints; retrying at the next handoff round");
                self.hints.unlisted = true;
            }
        }
        if self.handoff_wanted() {
            self.hints.arm(now);
        }
    }

    /// One handoff round: every owner this node is connected to gets its
    /// hints (up to a bound in flight), as the `Replicate` a coordinator
    /// would have sent it.
    fn hand_off(&mut self, now: Millis) {
        if self.hints.unlisted {
            self.list_hints(now);
        }
        for owner in self.hints.owners() {
            self.send_hints(now, &owner);
        }
        if self.handoff_wanted() {
            self.hints.arm(now);
        }
    }

    /// Sends `owner`, if connected, its hints not in flight, up to the bound.
    fn send_hints(&mut self, now: Millis, owner: &NodeId) {
        if self.membership.reachability(owner) != Reachability::Reachable {
            return;
        }
        let owner = owner.clone();
        for key in self.hints.take_to_send(&owner) {
            let stored = handoff::hint_key(&owner, &key);
            let sent = match self.load(HINT_PARTITION, &stored) {
                Ok(Some(set)) => set,
                Ok(None) => {
                    self.hints.remove(&owner, &key);
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, owner = %owner, "cannot read a hint to hand off");
                    self.hints.landed(&owner, &key);
                    continue;
                }
            };
            let req = self.next_request();
            let msg = PeerMessage::Replicate {
                reqs: vec![req],
                key: key.clone(),
                set: sent.clone(),
            };
            self.send(&owner, msg);
            let deadline = now + self.config.request_timeout_ms;
            let handoff = PendingHandoff {
                owner: owner.clone(),
                key,
                sent,
                deadline,
            };
            self.insert_pending(req, Pending::Handoff(handoff));
        }
    }

    /// The owner answered a handoff: once it has persisted the hint, the hint
    /// goes, unless a newer write merged into it meanwhile (that one is sent
    /// again, with the next hint the freed slot lets go).
    fn on_handed_off(&mut self, now: Millis, handoff: PendingHandoff, error: Option<String>) {
        let PendingHandoff {
            owner, key, sent, ..
        } = handoff;
        self.hints.landed(&owner, &key);
        if let Some(e) = error {
            tracing::warn!(owner = %owner, error = %e, "a hint's owner could not persist it; retrying at the next round");
            return;
        }
        let stored = handoff::hint_key(&owner, &key);
        match self.load(HINT_PARTITION, &stored) {
            Ok(Some(current)) if current == sent => {
                self.persist_or_remove(HINT_PARTITION, stored, None, PersistWaiter::Nobody);
                self.hints.remove(&owner, &key);
                self.handoff.delivered += 1;
            }
            Ok(Some(_)) => {}
            Ok(None) => self.hints.remove(&owner, &key),
            Err(e) => tracing::error!(error = %e, owner = %owner, "cannot read a handed-off hint"),
        }
        // The slot is free: the next hint goes now, not at the next round.
        self.send_hints(now, &owner);
    }

    // ---- anti-entropy -------------------------------------------------------

    /// What anti-entropy has done on this node so far.
    pub fn anti_entropy_stats(&self) -> anti_entropy::Stats {
        self.anti_entropy
    }

    /// The partitions this node is a primary of, ascending, with each one's
    /// other primaries in preference-list order.
    fn replica_peers(&self) -> Vec<(u32, Vec<NodeId>)> {
        let ring = self.membership.ring();
        (0..ring.partition_count())
            .filter_map(|p| {
                let primaries = ring.primaries(p, usize::from(self.n));
                primaries.contains(&self.config.node).then(|| {
                    let others = primaries
                        .into_iter()
                        .filter(|o| *o != self.config.node)
                        .collect();
                    (p, others)
                })
            })
            .collect()
    }

    /// Starts the next exchange of the round robin with a reachable peer:
    /// sends it this node's segment hashes of the partition.
    fn start_exchange(&mut self, now: Millis) {
        let pairs: Vec<(u32, NodeId)> = self
            .replica_peers()
            .into_iter()
            .flat_map(|(p, others)| others.into_iter().map(move |o| (p, o)))
            .collect();
        if pairs.is_empty() {
            return;
        }
        for _ in 0..pairs.len() {
            let (partition, peer) =
                pairs[(self.exchanges.cursor % pairs.len() as u64) as usize].clone();
            self.exchanges.cursor = self.exchanges.cursor.wrapping_add(1);
            if self.membership.reachability(&peer) != Reachability::Reachable {
                continue;
            }
            let Some(segments) = self.tree_of(partition).map(|s| s.to_vec()) else {
                return;
            };
            self.anti_entropy.exchanges += 1;
            self.exchanges.note_started(&peer, partition, now);
            self.send(
                &peer,
                PeerMessage::AntiEntropySegments {
                    partition,
                    segments,
                },
            );
            return;
        }
    }

    /// The segment hashes of `partition`, building its tree from the store
    /// and this node's unpersisted writes the first time. `None` when the
    /// store cannot be read (counted; the next exchange tries again).
    fn tree_of(&mut self, partition: u32) -> Option<&anti_entropy::Segments> {
        if !self.trees.is_built(partition) {
            let entries = match self.stored_entries(partition, None) {
                Ok(entries) => entries,
                Err(e) => {
                    self.anti_entropy.read_failures += 1;
                    tracing::warn!(partition, error = %e, "anti-entropy cannot read the partition");
                    return None;
                }
            };
            self.trees.build(
                partition,
                entries.iter().map(|(k, set)| (k.as_slice(), set)),
            );
        }
        self.trees.segments(partition)
    }

    /// What this node stores in `partition` (in the segments `only`, and of
    /// them page `page` of `pages`, when given): the store's sets with the
    /// unpersisted writes over them, in key order, empty sets left out.
    fn stored_entries(
        &self,
        partition: u32,
        only: Option<(&[u8], u32, u32)>,
    ) -> Result<BTreeMap<Vec<u8>, DvvSet>, String> {
        let wanted = |key: &[u8]| {
            only.is_none_or(|(segs, pages, page)| {
                segs.contains(&(anti_entropy::segment_of(key) as u8))
                    && (pages <= 1 || anti_entropy::page_of(key, pages) == page)
            })
        };
        let mut entries: BTreeMap<Vec<u8>, DvvSet> = self
            .store
            .scan(partition, &wanted)
            .map_err(|e| e.to_string())?
            .into_iter()
            .collect();
        if let Some(unsynced) = self.unsynced.get(&partition) {
            for (key, (set, _)) in unsynced {
                if !wanted(key) {
                    continue;
                }
                match set {
                    Some(set) => entries.insert(key.clone(), set.clone()),
                    None => entries.remove(key),
                };
            }
        }
        entries.retain(|_, set| !anti_entropy::holds_nothing(set));
        Ok(entries)
    }

    /// Whether `from` and this node are both primaries of `partition` (an
    /// exchange with anyone else is refused: a peer's ring may disagree).
    /// Both handlers first check that anti-entropy is on here at all.
    fn exchange_allowed(&self, from: &NodeId, partition: u32) -> bool {
        let ring = self.membership.ring();
        if partition >= ring.partition_count() {
            return false;
        }
        let primaries = ring.primaries(partition, usize::from(self.n));
        primaries.contains(from) && primaries.contains(&self.config.node)
    }

    /// A peer's segment hashes: answers with this node's entries in the
    /// segments that differ, asking for the peer's in return.
    fn on_exchange_segments(&mut self, now: Millis, from: &NodeId, partition: u32, theirs: &[u64]) {
        if !self.exchanges.is_on() {
            tracing::debug!(peer = %from, partition, "anti-entropy segments ignored: anti-entropy is off here");
            return;
        }
        if theirs.len() != anti_entropy::SEGMENTS || !self.exchange_allowed(from, partition) {
            tracing::warn!(peer = %from, partition, "anti-entropy segments refused: not a replica pair, or malformed");
            return;
        }
        if !self.exchanges.may_answer(from, now) {
            tracing::debug!(peer = %from, partition, "anti-entropy segments ignored: the peer asks faster than half an interval");
            return;
        }
        let from_segment = self.exchanges.answer_from;
        let Some(ours) = self.tree_of(partition) else {
            return;
        };
        let differing = anti_entropy::differing(ours, theirs, from_segment);
        if differing.is_empty() {
            return;
        }
        self.anti_entropy.segments_differing += differing.len() as u64;
        let (sent, pages) = self.send_entries(from, partition, &differing, true, None);
        if let Some(&last) = sent.last() {
            self.exchanges.answer_from = (usize::from(last) + 1) % anti_entropy::SEGMENTS;
        }
        for segment in sent {
            if pages > 1 {
                *self
                    .exchanges
                    .next_page
                    .entry((partition, segment))
                    .or_default() += 1;
            } else {
                self.exchanges.next_page.remove(&(partition, segment));
            }
        }
    }

    /// Sends this node's entries of `partition` in `segments` to `to`: with
    /// `page` (pages, page), that page of them, as much as fits (the answer
    /// to a peer's entries); without, whole segments while they fit in the message
    /// budget, or a page of the first when it alone does not (the next page
    /// of it next time). Returns the segments sent and into how many pages
    /// they were cut. A scan of whole segments also gives their true hashes,
    /// which correct this node's tree should it disagree.
    fn send_entries(
        &mut self,
        to: &NodeId,
        partition: u32,
        segments: &[u8],
        reply: bool,
        page: Option<(u32, u32)>,
    ) -> (Vec<u8>, u32) {
        let (pages, page_no) = page.unwrap_or((1, 0));
        let entries = match self.stored_entries(partition, Some((segments, pages, page_no))) {
            Ok(entries) => entries,
            Err(e) => {
                self.anti_entropy.read_failures += 1;
                tracing::warn!(partition, error = %e, "anti-entropy cannot read the partition");
                return (Vec::new(), 1);
            }
        };
        let budget = anti_entropy::MAX_ENTRIES_BYTES.min(self.config.max_peer_message_bytes / 2);
        if page.is_some() {
            // The answer to a peer's entries: the same segments and page, as
            // many entries as fit (what does not is the peer's to ask for in
            // its own exchanges, which page what is too large).
            let mut used = 0usize;
            let entries = entries
                .into_iter()
                .take_while(|(key, set)| {
                    used = used.saturating_add(key.len() + set.estimated_bytes());
                    used <= budget
                })
                .collect();
            let shipment = anti_entropy::Shipment {
                segments: segments.to_vec(),
                pages,
                page: page_no,
                entries,
            };
            return self.ship(to, partition, shipment, reply);
        }
        let mut scanned: BTreeMap<u8, u64> = segments.iter().map(|&s| (s, 0)).collect();
        for (key, set) in &entries {
            if let Some(hash) = scanned.get_mut(&(anti_entropy::segment_of(key) as u8)) {
                *hash ^= anti_entropy::entry_hash(key, set);
            }
        }
        let scanned: Vec<(u8, u64)> = scanned.into_iter().collect();
        let wrong = self.trees.correct(partition, &scanned);
        if wrong > 0 {
            self.anti_entropy.segments_corrected += wrong as u64;
            tracing::error!(
                partition,
                wrong,
                "anti-entropy found its hash tree wrong and corrected it"
            );
        }
        let cursor = segments
            .first()
            .and_then(|&s| self.exchanges.next_page.get(&(partition, s)))
            .copied()
            .unwrap_or(0);
        let shipment = anti_entropy::shipment(segments, entries, budget, cursor);
        self.ship(to, partition, shipment, reply)
    }

    fn ship(
        &mut self,
        to: &NodeId,
        partition: u32,
        shipment: anti_entropy::Shipment,
        reply: bool,
    ) -> (Vec<u8>, u32) {
        let anti_entropy::Shipment {
            segments,
            pages,
            page,
            entries,
        } = shipment;
        self.send(
            to,
            PeerMessage::AntiEntropyEntries {
                partition,
                segments: segments.clone(),
                pages,
                page,
                entries: entries
                    .into_iter()
                    .map(|(key, set)| AntiEntropyEntry { key, set })
                    .collect(),
                reply,
            },
        );
        (segments, pages)
    }

    /// A peer's entries of the segments that differ: merges each (a merge
    /// persists only what changes), then, when asked, answers with this
    /// node's entries of those segments, which now cover the peer's.
    fn on_exchange_entries(
        &mut self,
        now: Millis,
        from: &NodeId,
        partition: u32,
        (segments, pages, page): (&[u8], u32, u32),
        entries: Vec<AntiEntropyEntry>,
        reply: bool,
    ) {
        if !self.exchanges.is_on() {
            tracing::debug!(peer = %from, partition, "anti-entropy entries ignored: anti-entropy is off here");
            return;
        }
        let well_formed = segments
            .iter()
            .all(|&s| usize::from(s) < anti_entropy::SEGMENTS)
            && !segments.is_empty()
            && segments.len() <= anti_entropy::MAX_DIFF_SEGMENTS
            && pages.is_power_of_two()
            && pages <= anti_entropy::MAX_PAGES
            && page < pages
            && (pages == 1 || segments.len() == 1);
        if !well_formed || !self.exchange_allowed(from, partition) {
            tracing::warn!(peer = %from, partition, "anti-entropy entries refused: not a replica pair, or malformed");
            return;
        }
        // Only an answer to an exchange this node started earns entries back.
        let reply = reply && self.exchanges.take_started(from, partition, now);
        for AntiEntropyEntry { key, set } in entries {
            let in_place = self.check_key(&key).is_ok()
                && self.membership.ring().partition_for_key(&key) == partition
                && segments.contains(&(anti_entropy::segment_of(&key) as u8))
                && (pages == 1 || anti_entropy::page_of(&key, pages) == page);
            if !in_place {
                tracing::warn!(peer = %from, partition, "anti-entropy entry for a key outside the segments sent; dropped");
                continue;
            }
            if let Some(why) = version::malformation(&set) {
                tracing::error!(peer = %from, "malformed version set from anti-entropy refused: {why}");
                continue;
            }
            self.hlc_observe(now, from, &set);
            match self.merge_local(&key, &set, PersistWaiter::Nobody, false) {
                Ok(true) => self.anti_entropy.keys_repaired += 1,
                Ok(false) => {}
                Err((e, _)) => {
                    tracing::warn!(error = %e, "anti-entropy could not merge a key");
                }
            }
        }
        if reply {
            self.anti_entropy.segments_differing += segments.len() as u64;
            self.send_entries(from, partition, segments, false, Some((pages, page)));
        }
    }

    // ---- plumbing -----------------------------------------------------------

    /// Moves the hybrid clock past the newest timestamp in a set from `from`,
    /// unless that lies beyond the drift bound; returns false then.
    fn hlc_observe(&mut self, now: Millis, from: &NodeId, set: &DvvSet) -> bool {
        let Some(newest) = newest_timestamp(set) else {
            return true;
        };
        if self.hlc.observe(newest, now) {
            return true;
        }
        tracing::debug!(
            peer = %from,
            wall_ms = newest.wall_ms,
            now,
            "a timestamp beyond the clock drift bound was not observed"
        );
        self.warn_if_far_future();
        false
    }

    /// Remembers the far-future newest timestamp of a read reply for get
    /// `req`'s key, for a write this node coordinates on it next.
    fn keep_far_future_floor(&mut self, req: u64, set: &DvvSet) {
        let (Some(Pending::Get(get)), Some(newest)) =
            (self.pending.get(&req), newest_timestamp(set))
        else {
            return;
        };
        let key = get.key.clone();
        let floor = self.far_future_floors.entry(key).or_default();
        *floor = (*floor).max(newest);
        if self.far_future_floors.len() > MAX_FAR_FUTURE_FLOORS {
            self.far_future_floors.pop_first();
        }
    }

    /// Warns, at the first far-future timestamp and then at every power of
    /// two of them (one bad clock sends many), that the cluster's clocks
    /// disagree by more than the bound.
    fn warn_if_far_future(&mut self) {
        let count = self.hlc.far_future();
        if count.is_power_of_two() && self.warned_far_future < count {
            self.warned_far_future = count;
            tracing::warn!(
                count,
                bound_ms = self.config.max_clock_drift_ms,
                "timestamps more than the clock drift bound ahead of this node's clock \
                 were seen (a node's clock is set wrong, or this one's is behind); \
                 they do not move this node's clock"
            );
        }
    }

    /// How many timestamps this node has seen beyond its clock drift bound
    /// (from peers or its own disk) and not let move its clock.
    pub fn far_future_timestamps(&self) -> u64 {
        self.hlc.far_future()
    }

    fn next_request(&mut self) -> u64 {
        let req = self.next_req;
        self.next_req = self.next_req.wrapping_add(1);
        req
    }

    fn insert_pending(&mut self, req: u64, pending: Pending) {
        self.timers.insert((pending.deadline(), req));
        self.pending.insert(req, pending);
    }

    fn remove_pending(&mut self, req: u64) -> Option<Pending> {
        let pending = self.pending.remove(&req)?;
        self.timers.remove(&(pending.deadline(), req));
        Some(pending)
    }

    fn send(&mut self, to: &NodeId, msg: PeerMessage) {
        let at = self.pushed;
        self.push_output(Output::Peer {
            to: to.clone(),
            msg,
        });
        match self.last_to_peer.get_mut(to) {
            Some(last) => *last = at,
            None => {
                self.last_to_peer.insert(to.clone(), at);
            }
        }
    }

    /// Sends write `req` of `key` to replica `to`, folded into the last
    /// message queued for `to` when that is a not yet collected `Replicate`
    /// of the same key: the replica then merges and persists once and
    /// acknowledges both. Merging is what the replica would have done with the
    /// two messages in turn, and nothing else for `to` sits between them.
    fn replicate(&mut self, to: &NodeId, req: u64, key: &[u8], set: &DvvSet) {
        if let Some(&at) = self.last_to_peer.get(to) {
            let queued = at
                .checked_sub(self.popped)
                .and_then(|i| self.outputs.get_mut(i as usize));
            if let Some(Output::Peer {
                msg:
                    PeerMessage::Replicate {
                        reqs,
                        key: queued_key,
                        set: queued_set,
                    },
                ..
            }) = queued
            {
                if queued_key.as_slice() == key {
                    version::merge_into(queued_set, set, self.config.versioning);
                    reqs.push(req);
                    return;
                }
            }
        }
        let msg = PeerMessage::Replicate {
            reqs: vec![req],
            key: key.to_vec(),
            set: set.clone(),
        };
        self.send(to, msg);
    }

    fn push_output(&mut self, output: Output) {
        self.outputs.push_back(output);
        self.pushed += 1;
    }

    fn answer(&mut self, origin: Origin, reply: ClientReply) {
        match origin {
            Origin::Client { client, id } => self.push_output(Output::Reply { client, id, reply }),
            Origin::Forwarded { from, req } => {
                self.send(&from, PeerMessage::ForwardReply { req, reply })
            }
        }
    }

    fn cluster_info(&self) -> ClusterInfo {
        let ring = self.membership.ring();
        let members = self
            .membership
            .members()
            .map(|m| MemberInfo {
                id: m.id.clone(),
                peer_addr: m.peer_addr.clone(),
                client_addr: m.client_addr.clone(),
                http_addr: m.http_addr.clone(),
                status: if m.id == self.config.node {
                    Reachability::Reachable.as_str().into()
                } else {
                    self.membership.reachability(&m.id).as_str().into()
                },
                partitions: ring.partitions_of(&m.id).len() as u32,
            })
            .collect();
        ClusterInfo {
            cluster_id: self.config.cluster_id.clone(),
            node: self.config.node.clone(),
            members,
            ring_version: ring.version(),
            ring_owners: ring.owners().to_vec(),
            n: self.n,
            r: self.r,
            w: self.w,
            q: ring.partition_count(),
        }
    }
}

/// The newest timestamp among a set's siblings.
fn newest_timestamp(set: &DvvSet) -> Option<Hlc> {
    set.siblings.values().map(|s| s.timestamp).max()
}

fn record_read(get: &mut PendingGet, from: NodeId, set: Option<DvvSet>, mode: Versioning) {
    if let Some(set) = &set {
        version::merge_into(&mut get.merged, set, mode);
    }
    get.replies.insert(from, set);
}

fn get_reply(merged: &DvvSet) -> ClientReply {
    ClientReply::Get(GetReply {
        siblings: merged
            .siblings
            .iter()
            .map(|(d, s)| (*d, s.clone()))
            .collect(),
        context: merged.context.clone(),
    })
}

/// Why a get missed its quorum. Primaries that could not read their copy
/// (this node's or a replica's) make it a storage fault, not a timeout: the
/// error names each of them and its storage error.
fn get_failure(get: &PendingGet) -> ClientError {
    if get.failed.is_empty() {
        return ClientError::Quorum {
            op: "get".into(),
            write: false,
            needed: get.needed,
            replied: get.replies.len() as u8,
            n: get.primaries.len() as u8,
        };
    }
    let causes: Vec<String> = get
        .failed
        .iter()
        .map(|(node, error)| format!("{node}: {error}"))
        .collect();
    ClientError::Internal(format!(
        "get could not reach its read quorum ({} of {} needed replicas replied, of {}): {}",
        get.replies.len(),
        get.needed,
        get.primaries.len(),
        causes.join("; ")
    ))
}

fn put_quorum_error(put: &PendingPut) -> ClientError {
    ClientError::Quorum {
        op: if put.is_delete { "delete" } else { "put" }.into(),
        write: true,
        needed: put.needed,
        replied: put.acked.len() as u8,
        n: put.primaries.len() as u8,
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.config.node)
            .field("actor", &self.actor)
            .field("pending", &self.pending.len())
            .field(
                "unsynced",
                &self.unsynced.values().map(BTreeMap::len).sum::<usize>(),
            )
            .finish()
    }
}
