//! Every message between a client and a node, and between two nodes.
//!
//! Both directions travel as [`crate::frame`] frames whose payload is one of the
//! envelope types here, encoded with postcard.

use crate::ids::{ClusterId, Dot, NodeId};
use crate::version::{Context, DvvSet, Sibling};
use serde::{Deserialize, Serialize};

/// The protocol version carried in every frame header. Bump it whenever a
/// message's encoding changes; peers with another version are refused.
pub const PROTOCOL_VERSION: u16 = 5;

/// How a write treats the versions it did not name in its context.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum WriteMode {
    /// Supersede exactly what the request's context covers (nothing without one).
    #[default]
    Context,
    /// Supersede every version the coordinating primary holds for the key, as a
    /// Redis `SET` does. Writes through other coordinators may still leave siblings.
    Overwrite,
}

/// A client's request. `r` and `w` override the cluster's defaults.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientRequest {
    Get {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        r: Option<u8>,
    },
    /// A put (`value` is `Some`) or a delete (`value` is `None`, a tombstone).
    Put {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "crate::version::serde_bytes_opt")]
        value: Option<Vec<u8>>,
        context: Option<Context>,
        w: Option<u8>,
        mode: WriteMode,
    },
    /// What this one node stores for the key, without any quorum (diagnostics).
    LocalGet {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// The members, their addresses, the ring and the quorum settings.
    ClusterInfo,
    Ping,
}

/// A client request with the id its reply will carry. Clients may pipeline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientEnvelope {
    pub id: u64,
    pub request: ClientRequest,
}

/// A node's reply to the client request with the same `id`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientReplyEnvelope {
    pub id: u64,
    pub reply: ClientReply,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientReply {
    /// Every sibling (tombstones included) and the context that covers them all.
    Get(GetReply),
    /// The dot this write minted, and the context of this write: it covers the
    /// new value and what the request's context covered, nothing else.
    /// `sloppy`: fewer than W primaries had persisted it when it was
    /// acknowledged, fallbacks' hints making up the rest (sloppy quorum);
    /// until the hints are handed off, a read with R + W > N may miss it.
    Put {
        dot: Dot,
        context: Context,
        sloppy: bool,
    },
    LocalGet(Option<DvvSet>),
    ClusterInfo(ClusterInfo),
    Pong {
        node: NodeId,
    },
    Error(ClientError),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetReply {
    pub siblings: Vec<(Dot, Sibling)>,
    pub context: Context,
}

impl GetReply {
    /// The live values, in dot order (tombstones left out).
    pub fn values(&self) -> impl Iterator<Item = &[u8]> {
        self.siblings.iter().filter_map(|(_, s)| s.value.as_deref())
    }
}

/// A member as clients see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub id: NodeId,
    /// Internode (peer) address.
    pub peer_addr: String,
    /// Binary client protocol address.
    pub client_addr: String,
    /// HTTP address, empty when the node serves no HTTP.
    pub http_addr: String,
    /// As the answering node sees it: `up` (connected), `unreachable` (its
    /// last connection failed or was lost) or `unknown` (no connection attempt
    /// has finished since the answering node started). The answering node is
    /// always `up`.
    pub status: String,
    pub partitions: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub cluster_id: ClusterId,
    pub node: NodeId,
    pub members: Vec<MemberInfo>,
    pub ring_version: u64,
    /// The owner of each partition, partition 0 first.
    pub ring_owners: Vec<NodeId>,
    pub n: u8,
    pub r: u8,
    pub w: u8,
    pub q: u32,
}

/// Why a request failed, in terms a user can act on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ClientError {
    #[error(
        "{op} quorum not met: {replied} of {needed} needed replicas replied (of {n}) before \
         the timeout{}",
        if *write { "; the write may still have been applied" } else { "" }
    )]
    Quorum {
        op: String,
        write: bool,
        needed: u8,
        replied: u8,
        n: u8,
    },
    #[error(
        "the key would have {count} siblings, more than max_siblings = {limit}; read the key, \
         resolve its siblings and write back with the context you read"
    )]
    TooManySiblings { count: u32, limit: u32 },
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("key is {len} bytes, larger than the limit of {max} bytes")]
    KeyTooLarge { len: u64, max: u64 },
    #[error("value is {len} bytes, larger than the limit of {max} bytes")]
    ValueTooLarge { len: u64, max: u64 },
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// The first frame on every internode connection, in both directions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub cluster_id: ClusterId,
    pub node: NodeId,
    pub q: u32,
    pub n: u8,
    /// Where the sender serves the binary client protocol and HTTP (empty when
    /// it does not), so clients can route by ring to any member.
    pub client_addr: String,
    pub http_addr: String,
}

/// Internode messages. Request ids are local to the node that sent the request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerMessage {
    Hello(Hello),
    /// The peer refused our `Hello`; the connection closes after it.
    HelloRejected {
        reason: String,
    },
    /// Merge this set into your copy of `key`, persist, then acknowledge
    /// every request in `reqs`. A coordinator folds back-to-back writes of one
    /// key to one replica into a single message: `set` is their merge.
    Replicate {
        reqs: Vec<u64>,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        set: DvvSet,
    },
    /// Sloppy quorum: `owner`, a primary of `key`, looked down to the
    /// coordinator, so this node (a fallback) keeps the write as a hint for it:
    /// merge `set` into your hint for (`owner`, `key`), persist, acknowledge
    /// every request in `reqs` with `ReplicateAck`, and hand the hint to
    /// `owner` (as a `Replicate`) once it is reachable again.
    Hint {
        reqs: Vec<u64>,
        owner: NodeId,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        set: DvvSet,
    },
    /// The replica persisted the merged set (`error` is `None`), or could not,
    /// for every request in `reqs`.
    ReplicateAck {
        reqs: Vec<u64>,
        error: Option<String>,
    },
    /// Send me your copy of `key`.
    Read {
        req: u64,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// The replica's copy of the key read for request `req` (`None`: it has
    /// none), or why it could not read it (a failing or corrupt disk). A
    /// failure is an answer, so the coordinator need not wait out its timeout,
    /// and it is not an absent key, which read repair would fill.
    ReadReply {
        req: u64,
        result: Result<Option<DvvSet>, String>,
    },
    /// Read repair: merge this set into your copy and persist; no reply.
    Repair {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        set: DvvSet,
    },
    /// A write that reached a node outside the key's preference list, passed on to
    /// a primary, which coordinates it and answers with `ForwardReply`.
    Forward {
        req: u64,
        request: ClientRequest,
    },
    ForwardReply {
        req: u64,
        reply: ClientReply,
    },
    /// Transport keepalive on an outbound connection; the receiver answers with
    /// `Pong` on the same connection. A connection whose pongs stop is replaced.
    Ping {
        seq: u64,
    },
    Pong {
        seq: u64,
    },
    /// Anti-entropy, from one primary of `partition` to another: the sender's
    /// hashes of the partition's segments (`dynamo_core::anti_entropy`). A
    /// receiver whose hashes differ answers with `AntiEntropyEntries`.
    AntiEntropySegments {
        partition: u32,
        segments: Vec<u64>,
    },
    /// Anti-entropy: the sender's stored sets of the keys of `partition` that
    /// fall in `segments` (and, when `pages` > 1, in page `page` of them: a
    /// segment too large for one message goes a page at a time). Merge them;
    /// with `reply`, answer with your own entries of the same segments and
    /// page (after merging), without `reply`.
    AntiEntropyEntries {
        partition: u32,
        #[serde(with = "serde_bytes")]
        segments: Vec<u8>,
        pages: u32,
        page: u32,
        entries: Vec<AntiEntropyEntry>,
        reply: bool,
    },
}

/// One key's stored set, as anti-entropy ships it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AntiEntropyEntry {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    pub set: DvvSet,
}
