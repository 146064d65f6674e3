//! A deterministic in-memory harness for several `Node`s: a FIFO network, a fake
//! clock that jumps to the next timer, and a disk per node whose writes stay
//! volatile until the harness syncs them (after quinn's `tests/util.rs` `Pair`).

#![allow(dead_code)]

use dynamo_core::{ClientId, Config, LocalStore, Member, Millis, Node, Output, StoreError};
use dynamo_proto::{
    Actor, ClientEnvelope, ClientReply, ClientRequest, Context, DvvSet, GetReply, NodeId,
    PeerMessage, WriteMode,
};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};

/// One node's disk: what survives a crash, and what does not yet.
#[derive(Default, Debug)]
pub struct Disk {
    pub durable: BTreeMap<(u32, Vec<u8>), DvvSet>,
    /// Unsynced writes; `None` removes the key.
    pub volatile: BTreeMap<(u32, Vec<u8>), Option<DvvSet>>,
    /// While set, every read fails (a broken disk).
    pub fail_reads: bool,
}

#[derive(Clone, Default)]
pub struct DiskHandle(pub Arc<Mutex<Disk>>);

impl LocalStore for DiskHandle {
    fn load(&self, partition: u32, key: &[u8]) -> Result<Option<DvvSet>, StoreError> {
        let disk = self.0.lock().unwrap();
        if disk.fail_reads {
            return Err(StoreError("injected read failure".into()));
        }
        let slot = (partition, key.to_vec());
        Ok(match disk.volatile.get(&slot) {
            Some(written) => written.clone(),
            None => disk.durable.get(&slot).cloned(),
        })
    }

    fn scan(
        &self,
        partition: u32,
        keep: &dyn Fn(&[u8]) -> bool,
    ) -> Result<Vec<(Vec<u8>, DvvSet)>, StoreError> {
        let disk = self.0.lock().unwrap();
        if disk.fail_reads {
            return Err(StoreError("injected read failure".into()));
        }
        let mut all: BTreeMap<Vec<u8>, DvvSet> = BTreeMap::new();
        for ((p, key), set) in &disk.durable {
            if *p == partition && keep(key) {
                all.insert(key.clone(), set.clone());
            }
        }
        for ((p, key), written) in &disk.volatile {
            if *p == partition && keep(key) {
                match written {
                    Some(set) => all.insert(key.clone(), set.clone()),
                    None => all.remove(key),
                };
            }
        }
        Ok(all.into_iter().collect())
    }
}

pub struct SimNode {
    pub node: Node,
    pub disk: DiskHandle,
    /// Persist requests applied to the volatile disk, not yet synced.
    pub unsynced: Vec<u64>,
    /// While set, this node's disk does not sync (its acks wait).
    pub hold_sync: bool,
    pub incarnation: u64,
    pub epoch: u32,
}

pub struct Cluster {
    pub now: Millis,
    pub nodes: BTreeMap<NodeId, SimNode>,
    pub members: Vec<Member>,
    pub config: Config,
    net: VecDeque<(NodeId, NodeId, PeerMessage)>,
    /// Nodes cut off from everyone: messages to and from them are dropped.
    pub isolated: BTreeSet<NodeId>,
    pub replies: BTreeMap<(ClientId, u64), ClientReply>,
    next_client_req: u64,
    /// Every peer message delivered, in order (for determinism checks).
    pub delivered: Vec<String>,
    /// Alters each message (sender, receiver, message) before it is delivered:
    /// a peer that is buggy or hostile.
    pub tamper: Option<Tamper>,
    /// Drops messages whose encoding is longer (as the shell's frame codec
    /// refuses them), counting them in `oversize`.
    pub max_message_bytes: Option<usize>,
    pub oversize: usize,
}

/// See [`Cluster::tamper`].
pub type Tamper = Box<dyn FnMut(&NodeId, &NodeId, &mut PeerMessage)>;

/// The defaults with Q = 64 and anti-entropy off: its timer never stops, so
/// `settle` would not return (the anti-entropy tests turn it on themselves).
pub fn quiet_config() -> Config {
    let mut config = Config::new("n1");
    config.q = 64;
    config.anti_entropy_interval_ms = 0;
    config
}

pub fn ids(names: &[&str]) -> Vec<NodeId> {
    names.iter().map(|n| NodeId::from(*n)).collect()
}

impl Cluster {
    /// `size` nodes named n1..n<size> with the given N/R/W and Q = 64.
    pub fn new(size: usize, n: u8, r: u8, w: u8) -> Cluster {
        let mut config = quiet_config();
        config.n = n;
        config.r = r;
        config.w = w;
        config.request_timeout_ms = 1_000;
        Self::with_config(size, config)
    }

    pub fn with_config(size: usize, config: Config) -> Cluster {
        let members: Vec<Member> = (1..=size)
            .map(|i| Member::named(&format!("n{i}")))
            .collect();
        let mut cluster = Cluster {
            now: 1_000,
            nodes: BTreeMap::new(),
            members: members.clone(),
            config,
            net: VecDeque::new(),
            isolated: BTreeSet::new(),
            replies: BTreeMap::new(),
            next_client_req: 1,
            delivered: Vec::new(),
            tamper: None,
            max_message_bytes: None,
            oversize: 0,
        };
        for (i, m) in members.iter().enumerate() {
            let disk = DiskHandle::default();
            let sim = cluster.boot(&m.id, disk, 0x1000 + i as u64, 1);
            cluster.nodes.insert(m.id.clone(), sim);
        }
        cluster
    }

    fn boot(&self, id: &NodeId, disk: DiskHandle, incarnation: u64, epoch: u32) -> SimNode {
        let mut config = self.config.clone();
        config.node = id.clone();
        let actor = Actor { incarnation, epoch };
        let node = Node::new(config, self.members.clone(), actor, Box::new(disk.clone()))
            .expect("valid cluster");
        SimNode {
            node,
            disk,
            unsynced: Vec::new(),
            hold_sync: false,
            incarnation,
            epoch,
        }
    }

    pub fn node(&self, id: &str) -> &Node {
        &self.nodes[&NodeId::from(id)].node
    }

    pub fn node_mut(&mut self, id: &str) -> &mut SimNode {
        self.nodes.get_mut(&NodeId::from(id)).unwrap()
    }

    /// Makes every read of `id`'s disk fail (`true`) or work again.
    pub fn fail_reads(&mut self, id: &str, fail: bool) {
        self.node_mut(id).disk.0.lock().unwrap().fail_reads = fail;
    }

    /// The primaries of `key` in ring order.
    pub fn primaries(&self, key: &[u8]) -> Vec<NodeId> {
        let node = self.nodes.values().next().unwrap();
        let ring = node.node.membership().ring();
        let (n, _, _) = node.node.quorum();
        ring.primaries(ring.partition_for_key(key), usize::from(n))
    }

    /// Sends a client request to `to` and returns its id.
    pub fn submit(&mut self, to: &str, request: ClientRequest) -> (ClientId, u64) {
        let id = self.next_client_req;
        self.next_client_req += 1;
        let client = ClientId(7);
        let now = self.now;
        self.node_mut(to)
            .node
            .handle_client(now, client, ClientEnvelope { id, request });
        (client, id)
    }

    /// Runs until `req` is answered (jumping the clock to timers as needed).
    pub fn wait(&mut self, req: (ClientId, u64)) -> ClientReply {
        for _ in 0..10_000 {
            self.run_until_quiet();
            if let Some(reply) = self.replies.remove(&req) {
                return reply;
            }
            if !self.advance_to_next_timer() {
                break;
            }
        }
        panic!("request {req:?} never answered");
    }

    pub fn request(&mut self, to: &str, request: ClientRequest) -> ClientReply {
        let req = self.submit(to, request);
        self.wait(req)
    }

    pub fn put(
        &mut self,
        to: &str,
        key: &[u8],
        value: &[u8],
        context: Option<Context>,
    ) -> ClientReply {
        self.request(to, put_req(key, Some(value), context, None))
    }

    pub fn get(&mut self, to: &str, key: &[u8], r: Option<u8>) -> ClientReply {
        self.request(
            to,
            ClientRequest::Get {
                key: key.to_vec(),
                r,
            },
        )
    }

    /// Delivers messages, applies and syncs persists, until nothing moves.
    pub fn run_until_quiet(&mut self) {
        loop {
            let mut moved = self.drain_outputs();
            moved |= self.sync_disks();
            if let Some((from, to, mut msg)) = self.net.pop_front() {
                moved = true;
                let oversize = self.max_message_bytes.is_some_and(|limit| {
                    postcard::to_allocvec(&msg).map_or(true, |bytes| bytes.len() > limit)
                });
                if oversize {
                    self.oversize += 1;
                } else if !self.isolated.contains(&from) && !self.isolated.contains(&to) {
                    if let Some(tamper) = &mut self.tamper {
                        tamper(&from, &to, &mut msg);
                    }
                    self.delivered.push(format!("{from}->{to}: {msg:?}"));
                    let now = self.now;
                    if let Some(sim) = self.nodes.get_mut(&to) {
                        sim.node.handle_peer(now, &from, msg);
                    }
                }
            }
            if !moved {
                return;
            }
        }
    }

    /// Jumps the clock to the earliest timer and fires it. False when none is armed.
    pub fn advance_to_next_timer(&mut self) -> bool {
        let next = self
            .nodes
            .values()
            .filter_map(|s| s.node.poll_timeout())
            .min();
        let Some(at) = next else {
            return false;
        };
        self.now = self.now.max(at);
        let now = self.now;
        for sim in self.nodes.values_mut() {
            sim.node.handle_timeout(now);
        }
        self.run_until_quiet();
        true
    }

    /// Every node considers every other reachable (as the shell reports once
    /// connections are up); anti-entropy exchanges only with such peers.
    pub fn all_reachable(&mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().cloned().collect();
        for sim in self.nodes.values_mut() {
            for id in &ids {
                if id != sim.node.id() {
                    sim.node.set_reachable(id, true);
                }
            }
        }
    }

    /// Fires every timer (anti-entropy's included) until the clock reaches
    /// `now + ms`.
    pub fn run_for(&mut self, ms: Millis) {
        let until = self.now + ms;
        self.run_until_quiet();
        while self
            .nodes
            .values()
            .filter_map(|s| s.node.poll_timeout())
            .min()
            .is_some_and(|at| at <= until)
        {
            self.advance_to_next_timer();
        }
        self.now = until;
    }

    /// Lets every pending timer fire (request deadlines pass, late repairs run).
    pub fn settle(&mut self) {
        self.run_until_quiet();
        while self.advance_to_next_timer() {}
    }

    fn drain_outputs(&mut self) -> bool {
        let mut moved = false;
        let versioning = self.config.versioning;
        for (id, sim) in self.nodes.iter_mut() {
            while let Some(out) = sim.node.poll_output() {
                moved = true;
                match out {
                    Output::Peer { to, msg } => self.net.push_back((id.clone(), to, msg)),
                    Output::Reply { client, id, reply } => {
                        self.replies.insert((client, id), reply);
                    }
                    Output::Persist(p) => {
                        let mut disk = sim.disk.0.lock().unwrap();
                        // This disk keeps only the newest write of a key (as
                        // the core's overlay does): each write of a key must
                        // subsume the one before it, or the overwrite loses data.
                        let slot = (p.partition, p.key);
                        let prev = match disk.volatile.get(&slot) {
                            Some(written) => written.as_ref(),
                            None => disk.durable.get(&slot),
                        };
                        if let (Some(prev), Some(set)) = (prev, &p.set) {
                            assert_eq!(
                                &dynamo_core::version::merge(prev, set, versioning),
                                set,
                                "{id}: a write of {:?} does not subsume the one before it",
                                slot.1
                            );
                        }
                        disk.volatile.insert(slot, p.set);
                        sim.unsynced.push(p.id);
                    }
                }
            }
        }
        moved
    }

    fn sync_disks(&mut self) -> bool {
        let mut moved = false;
        for sim in self.nodes.values_mut() {
            if sim.hold_sync || sim.unsynced.is_empty() {
                continue;
            }
            moved = true;
            {
                let mut disk = sim.disk.0.lock().unwrap();
                for (slot, written) in std::mem::take(&mut disk.volatile) {
                    match written {
                        Some(set) => disk.durable.insert(slot, set),
                        None => disk.durable.remove(&slot),
                    };
                }
            }
            for id in std::mem::take(&mut sim.unsynced) {
                sim.node.on_persisted(id, None);
            }
        }
        moved
    }

    /// Crashes `id`: unsynced writes and in-flight messages are lost; the node
    /// restarts from its durable disk with its epoch bumped (as the shell does).
    pub fn crash_and_restart(&mut self, id: &str) {
        let id = NodeId::from(id);
        let old = self.nodes.remove(&id).unwrap();
        old.disk.0.lock().unwrap().volatile.clear();
        self.net.retain(|(from, to, _)| *from != id && *to != id);
        let sim = self.boot(&id, old.disk.clone(), old.incarnation, old.epoch + 1);
        self.nodes.insert(id, sim);
    }

    /// Cuts `id` off from everyone (messages to and from it are dropped).
    pub fn isolate(&mut self, id: &str) {
        self.isolated.insert(NodeId::from(id));
    }

    pub fn heal(&mut self) {
        self.isolated.clear();
    }

    /// What `id` durably stores for `key`.
    pub fn durable(&self, id: &str, key: &[u8]) -> Option<DvvSet> {
        let sim = &self.nodes[&NodeId::from(id)];
        let ring = sim.node.membership().ring();
        let slot = (ring.partition_for_key(key), key.to_vec());
        sim.disk.0.lock().unwrap().durable.get(&slot).cloned()
    }
}

pub fn put_req(
    key: &[u8],
    value: Option<&[u8]>,
    context: Option<Context>,
    w: Option<u8>,
) -> ClientRequest {
    ClientRequest::Put {
        key: key.to_vec(),
        value: value.map(|v| v.to_vec()),
        context,
        w,
        mode: WriteMode::Context,
    }
}

pub fn expect_get(reply: ClientReply) -> GetReply {
    match reply {
        ClientReply::Get(g) => g,
        other => panic!("expected a get reply, got {other:?}"),
    }
}

pub fn expect_put(reply: ClientReply) -> (dynamo_proto::Dot, Context) {
    match reply {
        ClientReply::Put { dot, context, .. } => (dot, context),
        other => panic!("expected a put reply, got {other:?}"),
    }
}

/// The live values of a get, sorted, as strings.
pub fn values(reply: &GetReply) -> Vec<String> {
    let mut v: Vec<String> = reply
        .values()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect();
    v.sort();
    v
}

/// The live values stored in a set, sorted, as strings.
pub fn set_values(set: &DvvSet) -> Vec<String> {
    let mut v: Vec<String> = set
        .siblings
        .values()
        .filter_map(|s| s.value.as_deref())
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect();
    v.sort();
    v
}
