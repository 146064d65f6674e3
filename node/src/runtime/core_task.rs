//! The one task that owns a node's `dynamo_core::Node`.
//!
//! It feeds the core every event (client requests, peer messages, persisted
//! writes, reachability changes, timer expiries) with the clock's `now`, then
//! carries out everything the core asks: messages to peers, replies to clients,
//! writes to the storage worker. It makes no protocol decision of its own.

use super::clock::Clock;
use super::handle::{shutting_down, Event, ReplyTo};
use super::peers::PeerSenders;
use crate::metrics::{Metrics, RequestKind};
use crate::storage::StorageWorker;
use dynamo_core::{ClientId, Node, Output};
use dynamo_proto::{ClientEnvelope, NodeId};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
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
    pub metrics: Arc<Metrics>,
}

/// Events handled per wakeup at most before the core's outputs go out, so a
/// flood of one kind cannot hold back replies, peer messages or writes.
const MAX_EVENTS_PER_TURN: usize = 256;

impl CoreTask {
    /// Runs until shutdown is signalled and then drains: new client requests
    /// are refused, in-flight ones finish (or time out in the core), then it
    /// returns the node so the caller can see its final state.
    ///
    /// Each wakeup takes every event that is ready (up to
    /// [`MAX_EVENTS_PER_TURN`]), durable writes first, and only then sends
    /// what the core produced, so a burst shares one round of channel sends
    /// and wakeups. The shutdown signal and the timer are armed once, not per
    /// event.
    pub async fn run(self) -> Node {
        let CoreTask {
            node,
            clock,
            mut events,
            mut persisted,
            peers,
            storage,
            mut shutdown,
            trace,
            metrics,
        } = self;
        let mut state = Turn {
            node,
            clock,
            trace,
            waiting: BTreeMap::new(),
            next_id: 1,
            draining: false,
            reachable: BTreeSet::new(),
            metrics,
        };
        let mut shutdown_signal = std::pin::pin!(shutdown.changed());
        let timer = tokio::time::sleep(Duration::ZERO);
        let mut timer = std::pin::pin!(timer);
        // The core deadline (its own milliseconds) the timer is armed for.
        let mut armed: Option<u64> = None;
        loop {
            if state.draining && state.node.is_idle() {
                break;
            }
            let deadline = state.node.poll_timeout();
            if deadline != armed {
                if let Some(at) = deadline {
                    let wait = at.saturating_sub(state.clock.now_ms());
                    timer
                        .as_mut()
                        .reset(tokio::time::Instant::now() + Duration::from_millis(wait));
                }
                armed = deadline;
            }
            tokio::select! {
                biased;
                changed = &mut shutdown_signal, if !state.draining => {
                    state.draining = true;
                    if changed.is_err() {
                        break;
                    }
                }
                Some(done) = persisted.recv() => state.persisted(done),
                Some(event) = events.recv() => state.event(event),
                _ = &mut timer, if armed.is_some() => {
                    // Re-armed from the core's next deadline on the next turn
                    // (the clock may have been skewed meanwhile).
                    armed = None;
                    state.node.handle_timeout(state.clock.now_ms());
                }
            }
            let mut handled = 1;
            while handled < MAX_EVENTS_PER_TURN {
                if let Ok(done) = persisted.try_recv() {
                    state.persisted(done);
                } else if let Ok(event) = events.try_recv() {
                    state.event(event);
                } else {
                    break;
                }
                handled += 1;
            }
            state.metrics.core_turns.fetch_add(1, Ordering::Relaxed);
            state
                .metrics
                .core_events
                .fetch_add(handled as u64, Ordering::Relaxed);
            state.metrics.record_core(&state.node);
            let mut writes = Vec::new();
            while let Some(output) = state.node.poll_output() {
                match output {
                    Output::Peer { to, msg } => peers.send(&to, msg),
                    Output::Reply { id, reply, .. } => {
                        if let Some(waiting) = state.waiting.remove(&id) {
                            state.metrics.requests.answered(
                                waiting.kind,
                                &reply,
                                waiting.at.elapsed(),
                            );
                            waiting.reply.send(reply);
                        }
                    }
                    Output::Persist(request) => writes.push(request),
                }
            }
            storage.submit_all(writes);
        }
        // Every front end still waiting hears "shutting down".
        for (_, waiting) in state.waiting {
            let reply = shutting_down();
            let took = waiting.at.elapsed();
            state.metrics.requests.answered(waiting.kind, &reply, took);
            waiting.reply.send(reply);
        }
        state.node
    }
}

/// The core and what the task keeps beside it between events.
struct Turn {
    node: Node,
    clock: Clock,
    trace: Option<super::PeerTrace>,
    /// Front ends waiting for an answer, by envelope id.
    waiting: BTreeMap<u64, Waiting>,
    next_id: u64,
    draining: bool,
    /// Peers reported reachable (for the metrics gauge).
    reachable: BTreeSet<NodeId>,
    metrics: Arc<Metrics>,
}

/// A client request the core has not answered yet.
struct Waiting {
    reply: ReplyTo,
    kind: RequestKind,
    at: tokio::time::Instant,
}

impl Turn {
    fn persisted(&mut self, done: crate::storage::Persisted) {
        for id in done.ids {
            self.node.on_persisted(id, done.error.clone());
        }
    }

    fn event(&mut self, event: Event) {
        let now = self.clock.now_ms();
        match event {
            Event::Client { request, reply, at } if self.draining => {
                let answer = shutting_down();
                self.metrics.requests.started();
                let kind = RequestKind::of(&request);
                self.metrics.requests.answered(kind, &answer, at.elapsed());
                reply.send(answer);
            }
            Event::Client { request, reply, at } => {
                let id = self.next_id;
                self.next_id += 1;
                self.metrics.requests.started();
                let kind = RequestKind::of(&request);
                self.waiting.insert(id, Waiting { reply, kind, at });
                self.node
                    .handle_client(now, FRONT_END, ClientEnvelope { id, request });
            }
            Event::Peer { from, msgs } => {
                for msg in msgs {
                    if let Some(trace) = &self.trace {
                        trace(&from, self.node.id(), &msg);
                    }
                    self.node.handle_peer(now, &from, msg);
                }
            }
            Event::PeerReachable {
                peer,
                up,
                client_addr,
                http_addr,
            } => {
                if let (Some(c), Some(h)) = (&client_addr, &http_addr) {
                    self.node.learn_addresses(&peer, c, h);
                }
                if up {
                    self.reachable.insert(peer.clone());
                } else {
                    self.reachable.remove(&peer);
                }
                let reachable = self.reachable.len() as u64;
                self.metrics
                    .peers_reachable
                    .store(reachable, Ordering::Relaxed);
                self.node.set_reachable(&peer, up);
            }
        }
    }
}
