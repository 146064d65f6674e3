//! Who is in the cluster, where they listen, and which of them look reachable.
//!
//! Membership is static for now: the list of members given at start and the
//! ring claimed from it. Gossip, joins and leaves will replace what is behind
//! this interface, not the callers. Reachability is a local opinion fed by the
//! shell (connections made and lost); it routes requests and never changes the
//! ring.

use crate::ring::{Ring, RingError};
use dynamo_proto::{ClusterId, Hello, NodeId};
use std::collections::{BTreeMap, BTreeSet};

/// A member and its addresses (opaque strings to the core).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub id: NodeId,
    pub peer_addr: String,
    pub client_addr: String,
    pub http_addr: String,
}

impl Member {
    /// A member known only by name (tests, simulations).
    pub fn named(id: &str) -> Member {
        Member {
            id: NodeId::from(id),
            peer_addr: String::new(),
            client_addr: String::new(),
            http_addr: String::new(),
        }
    }
}

/// A peer as this node's shell last saw it, ordered from the best target for a
/// request to the worst.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reachability {
    /// The last connection to it was made (and greeted).
    Reachable,
    /// No connection attempt has finished since this node started.
    Unknown,
    /// The last connection to it failed or was lost.
    Unreachable,
}

impl Reachability {
    /// The name `/cluster` and `dynamo status` show.
    pub fn as_str(self) -> &'static str {
        match self {
            Reachability::Unknown => "unknown",
            Reachability::Reachable => "up",
            Reachability::Unreachable => "unreachable",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Membership {
    members: BTreeMap<NodeId, Member>,
    ring: Ring,
    /// What the shell last reported about each peer; absent means
    /// [`Reachability::Unknown`].
    reachability: BTreeMap<NodeId, Reachability>,
}

impl Membership {
    /// A fixed cluster of `members`, its ring claimed over `q` partitions so that
    /// `n` consecutive partitions have distinct owners where possible.
    pub fn fixed(members: Vec<Member>, q: u32, n: usize) -> Result<Membership, RingError> {
        let ids: Vec<NodeId> = members.iter().map(|m| m.id.clone()).collect();
        let ring = Ring::claim(q, &ids, n)?;
        let members = members.into_iter().map(|m| (m.id.clone(), m)).collect();
        Ok(Membership {
            members,
            ring,
            reachability: BTreeMap::new(),
        })
    }

    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    pub fn contains(&self, id: &NodeId) -> bool {
        self.members.contains_key(id)
    }

    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    pub fn member(&self, id: &NodeId) -> Option<&Member> {
        self.members.get(id)
    }

    /// Records where a member serves clients (learned from its greeting).
    pub fn set_addresses(&mut self, id: &NodeId, client_addr: &str, http_addr: &str) {
        if let Some(m) = self.members.get_mut(id) {
            m.client_addr = client_addr.to_string();
            m.http_addr = http_addr.to_string();
        }
    }

    /// Whether requests may be routed to `id`: a member not yet heard of counts
    /// as up until a connection to it fails.
    pub fn is_up(&self, id: &NodeId) -> bool {
        self.reachability(id) != Reachability::Unreachable
    }

    /// What the shell last reported about `id`.
    pub fn reachability(&self, id: &NodeId) -> Reachability {
        self.reachability
            .get(id)
            .copied()
            .unwrap_or(Reachability::Unknown)
    }

    /// Records what the shell learned: a connection to `id` works (`up`) or failed.
    pub fn set_reachable(&mut self, id: &NodeId, up: bool) {
        if self.members.contains_key(id) {
            let seen = if up {
                Reachability::Reachable
            } else {
                Reachability::Unreachable
            };
            self.reachability.insert(id.clone(), seen);
        }
    }
}

/// What a peer's `Hello` must match: the same cluster, Q and N, a member's name,
/// and not our own.
#[derive(Clone, Debug)]
pub struct HelloCheck {
    pub cluster_id: ClusterId,
    pub node: NodeId,
    pub q: u32,
    pub n: u8,
    pub members: BTreeSet<NodeId>,
}

impl HelloCheck {
    pub fn check(&self, hello: &Hello) -> Result<(), String> {
        if hello.cluster_id != self.cluster_id {
            return Err(format!(
                "peer {} belongs to cluster {:?}, this node to {:?}",
                hello.node, hello.cluster_id.0, self.cluster_id.0
            ));
        }
        if hello.q != self.q || hello.n != self.n {
            return Err(format!(
                "peer {} runs with Q = {}, N = {}; this node with Q = {}, N = {}",
                hello.node, hello.q, hello.n, self.q, self.n
            ));
        }
        if hello.node == self.node {
            return Err(format!("peer claims this node's own id {}", hello.node));
        }
        if !self.members.contains(&hello.node) {
            return Err(format!("{} is not a member of this cluster", hello.node));
        }
        Ok(())
    }
}
