//! The one task that owns a node's `dynamo_core::Node`.
//!
//! It feeds the core every event (client requests, peer messages, persisted
//! writes, reachability changes, timer expiries) with the clock's `now`, then
//! carries out everything the core asks: messages to peers, replies to clients,
//! writes to the storage worker. It makes no protocol decision of its own.

use super::clock::Clock;
use super::handle::{shutting_down, Event, ReplyTo};
use super::peers::PeerSenders;
use crate::storage::StorageWorker;
use dynamo_core::{ClientId, Node, Output};
use dynamo_proto::ClientEnvelope;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// Every front-end request travels under this one client id; the envelope id
/// (unique per node) tells replies apart.
const FRONT_END: ClientId = ClientId(0);

pub(crate) struct CoreTask {
    pub node: Node,
    pub clock: Clock,
    pub events: mpsc::UnboundedReceiver<Event>,
    pub persisted: mpsc::UnboundedReceiver<crate::storage::Persisted>,
    pub peers: PeerSenders,
    pub storage: StorageWorker,
    pub shutdown: watch::Receiver<bool>,
    pub trace: Option<super::PeerTrace>,
}

impl CoreTask {
    /// Runs until shutdown is signalled and then drains: new client requests
    /// are refused, in-flight ones finish (or time out in the core), then it
    /// returns the node so the caller can see its final state.
    pub async fn run(mut self) -> Node {
        let mut waiting: BTreeMap<u64, ReplyTo> = BTreeMap::new();
        let mut next_id: u64 = 1;
        let mut draining = false;
        loop {
            if draining && self.node.is_idle() {
                break;
            }
            let sleep_ms = self
                .node
                .poll_timeout()
                .map(|at| at.saturating_sub(self.clock.now_ms()));
            tokio::select! {
                biased;
                changed = self.shutdown.changed(), if !draining => {
                    draining = true;
                    if changed.is_err() {
                        break;
                    }
                }
                Some(done) = self.persisted.recv() => {
                    for id in done.ids {
                        self.node.on_persisted(id, done.error.clone());
                    }
                }
                Some(event) = self.events.recv() => {
                    let now = self.clock.now_ms();
                    match event {
                        Event::Client { reply, .. } if draining => reply.send(shutting_down()),
                        Event::Client { request, reply } => {
                            let id = next_id;
                            next_id += 1;
                            waiting.insert(id, reply);
                            self.node.handle_client(now, FRONT_END, ClientEnvelope { id, request });
                        }
                        Event::Peer { from, msg } => {
                            if let Some(trace) = &self.trace {
                                trace(&from, self.node.id(), &msg);
                            }
                            self.node.handle_peer(now, &from, msg);
                        }
                        Event::PeerReachable { peer, up, client_addr, http_addr } => {
                            if let (Some(c), Some(h)) = (&client_addr, &http_addr) {
                                self.node.learn_addresses(&peer, c, h);
                            }
                            self.node.set_reachable(&peer, up);
                        }
                    }
                }
                _ = sleep_or_forever(sleep_ms) => {
                    self.node.handle_timeout(self.clock.now_ms());
                }
            }
            while let Some(output) = self.node.poll_output() {
                match output {
                    Output::Peer { to, msg } => self.peers.send(&to, msg),
                    Output::Reply { id, reply, .. } => {
                        if let Some(to) = waiting.remove(&id) {
                            to.send(reply);
                        }
                    }
                    Output::Persist(request) => self.storage.submit(request),
                }
            }
        }
        // Every front end still waiting hears "shutting down".
        for (_, to) in waiting {
            to.send(shutting_down());
        }
        self.node
    }
}

async fn sleep_or_forever(ms: Option<u64>) {
    match ms {
        Some(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
        None => std::future::pending().await,
    }
}
