//! The handle every client front end (binary protocol, HTTP, CLI-in-process,
//! simulator clients) uses to submit requests to the node's core task.

use dynamo_proto::{ClientError, ClientReply, ClientRequest};
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

/// Events the core task consumes. Front ends only ever send `Client`.
#[derive(Debug)]
pub(crate) enum Event {
    Client {
        request: ClientRequest,
        reply: oneshot::Sender<ClientReply>,
    },
    Peer {
        from: dynamo_proto::NodeId,
        msg: dynamo_proto::PeerMessage,
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
}

impl CoreHandle {
    /// Submits a request and waits for the core's answer. Requests carry their
    /// own timeout inside the core, so this always resolves; if the node is
    /// shutting down it resolves at once with `Unavailable`.
    pub async fn request(&self, request: ClientRequest) -> ClientReply {
        let (reply, rx) = oneshot::channel();
        if self.events.send(Event::Client { request, reply }).is_err() {
            return shutting_down();
        }
        rx.await.unwrap_or_else(|_| shutting_down())
    }
}

fn shutting_down() -> ClientReply {
    ClientReply::Error(ClientError::Unavailable(
        "the node is shutting down; retry on another node".into(),
    ))
}
