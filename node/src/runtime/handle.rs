//! The handle every client front end (binary protocol, HTTP, CLI-in-process,
//! simulator clients) uses to submit requests to the node's core task.

use dynamo_proto::{ClientError, ClientReply, ClientReplyEnvelope, ClientRequest};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// What the front ends need to know about the node without asking the core.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    pub node_id: String,
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    /// The largest frame accepted on the binary protocols.
    pub max_frame_bytes: usize,
}

/// Where the core task sends a client request's answer.
#[derive(Debug)]
pub(crate) enum ReplyTo {
    /// A front end awaiting this one answer ([`CoreHandle::request`]).
    Once(oneshot::Sender<ClientReply>),
    /// Straight into a connection's writer, under the connection's request id:
    /// no task and no extra wakeup per request.
    Conn {
        tx: mpsc::UnboundedSender<ClientReplyEnvelope>,
        id: u64,
    },
}

impl ReplyTo {
    /// Delivers the answer; a front end that went away is no one's concern.
    pub fn send(self, reply: ClientReply) {
        match self {
            ReplyTo::Once(tx) => {
                let _ = tx.send(reply);
            }
            ReplyTo::Conn { tx, id } => {
                let _ = tx.send(ClientReplyEnvelope { id, reply });
            }
        }
    }
}

/// Events the core task consumes. Front ends only ever send `Client`.
#[derive(Debug)]
pub(crate) enum Event {
    Client {
        request: ClientRequest,
        reply: ReplyTo,
        /// When the front end submitted it (the request's latency starts here).
        at: tokio::time::Instant,
    },
    /// Messages from one peer, in the order they arrived (everything one
    /// read of its connection held).
    Peer {
        from: dynamo_proto::NodeId,
        msgs: Vec<dynamo_proto::PeerMessage>,
    },
    PeerReachable {
        peer: dynamo_proto::NodeId,
        up: bool,
        client_addr: Option<String>,
        http_addr: Option<String>,
    },
}

/// A cheap, cloneable way to talk to one node's core.
#[derive(Clone)]
pub struct CoreHandle {
    pub(crate) events: mpsc::UnboundedSender<Event>,
    pub info: Arc<NodeInfo>,
    /// The node's counters (`GET /metrics`).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The bound on client connections, shared by every front end.
    pub connections: crate::connection_limit::ConnectionLimit,
}

impl CoreHandle {
    pub(crate) fn new(
        events: mpsc::UnboundedSender<Event>,
        info: NodeInfo,
        metrics: Arc<crate::metrics::Metrics>,
        max_connections: usize,
    ) -> CoreHandle {
        CoreHandle {
            events,
            info: Arc::new(info),
            connections: crate::connection_limit::ConnectionLimit::new(
                max_connections,
                metrics.clone(),
            ),
            metrics,
        }
    }

    /// A handle for front-end tests: `events` go to a fake core; the metrics
    /// are its own and the connection bound the default.
    #[cfg(test)]
    pub(crate) fn for_tests(events: mpsc::UnboundedSender<Event>, info: NodeInfo) -> CoreHandle {
        let metrics = crate::metrics::Metrics::for_tests(&info.node_id);
        CoreHandle::new(
            events,
            info,
            metrics,
            crate::connection_limit::DEFAULT_MAX_CONNECTIONS,
        )
    }

    /// Submits a request and waits for the core's answer. Requests carry their
    /// own timeout inside the core, so this always resolves; if the node is
    /// shutting down it resolves at once with `Unavailable`.
    pub async fn request(&self, request: ClientRequest) -> ClientReply {
        self.submit(request)
            .await
            .unwrap_or_else(|_| shutting_down())
    }

    /// Submits a request without waiting: its answer arrives on the returned
    /// receiver, which closes without one only if the node is shutting down.
    pub fn submit(&self, request: ClientRequest) -> oneshot::Receiver<ClientReply> {
        let (reply, rx) = oneshot::channel();
        // If the core is gone the sender is dropped with the event: the
        // receiver closes, which the caller reads as "shutting down".
        let _ = self.events.send(Event::Client {
            request,
            reply: ReplyTo::Once(reply),
            at: tokio::time::Instant::now(),
        });
        rx
    }

    /// Submits a request whose answer goes to `tx` as `ClientReplyEnvelope { id, .. }`
    /// (at once, with `Unavailable`, if the node is shutting down).
    pub(crate) fn submit_to(
        &self,
        request: ClientRequest,
        tx: &mpsc::UnboundedSender<ClientReplyEnvelope>,
        id: u64,
    ) {
        let reply = ReplyTo::Conn { tx: tx.clone(), id };
        let at = tokio::time::Instant::now();
        if self
            .events
            .send(Event::Client { request, reply, at })
            .is_err()
        {
            let _ = tx.send(ClientReplyEnvelope {
                id,
                reply: shutting_down(),
            });
        }
    }
}

pub(crate) fn shutting_down() -> ClientReply {
    ClientReply::Error(ClientError::Unavailable(
        "the node is shutting down; retry on another node".into(),
    ))
}
