//! What the simulated clients did and saw: every operation with its invocation
//! and completion time, the context it sent, and its outcome. Every value written
//! is unique, so a value names the operation that wrote it.

use dynamo_proto::{Context, Dot, DvvSet, GetReply};
use std::collections::BTreeMap;

pub type Key = Vec<u8>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpKind {
    Put {
        key: Key,
        value: Vec<u8>,
        context: Option<Context>,
    },
    Delete {
        key: Key,
        context: Option<Context>,
    },
    Get {
        key: Key,
        r: Option<u8>,
    },
}

impl OpKind {
    pub fn key(&self) -> &Key {
        match self {
            OpKind::Put { key, .. } | OpKind::Delete { key, .. } | OpKind::Get { key, .. } => key,
        }
    }

    pub fn is_write(&self) -> bool {
        !matches!(self, OpKind::Get { .. })
    }

    /// The context a write carried (None for gets and blind writes).
    pub fn context(&self) -> Option<&Context> {
        match self {
            OpKind::Put { context, .. } | OpKind::Delete { context, .. } => context.as_ref(),
            OpKind::Get { .. } => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Never completed (the run ended, or the client gave up without an answer).
    Pending,
    /// A write acknowledged with the dot it minted and the context of that
    /// write; `sloppy` when fallbacks' hints made up W (see `ClientReply::Put`).
    Written {
        dot: Dot,
        context: Context,
        sloppy: bool,
    },
    /// A read's siblings and context.
    Read(GetReply),
    /// The node answered with an error. `definite` is true when the error
    /// proves the write was never applied (invalid request, too many siblings);
    /// otherwise (quorum, unavailable) it is indeterminate.
    Failed { message: String, definite: bool },
    /// The client's own deadline passed without an answer: indeterminate.
    TimedOut,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    pub id: u64,
    pub client: usize,
    /// The node the client sent the request to.
    pub node: String,
    pub kind: OpKind,
    pub invoked_ms: u64,
    pub completed_ms: Option<u64>,
    pub outcome: Outcome,
}

impl Op {
    pub fn acknowledged(&self) -> bool {
        matches!(self.outcome, Outcome::Written { .. })
    }

    /// A write that may or may not have been applied.
    pub fn indeterminate(&self) -> bool {
        self.kind.is_write()
            && matches!(
                self.outcome,
                Outcome::Pending
                    | Outcome::TimedOut
                    | Outcome::Failed {
                        definite: false,
                        ..
                    }
            )
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct History {
    pub ops: Vec<Op>,
}

impl History {
    /// The op that wrote `value` (values are unique per op).
    pub fn writer_of(&self, value: &[u8]) -> Option<&Op> {
        self.ops
            .iter()
            .find(|op| matches!(&op.kind, OpKind::Put { value: v, .. } if v == value))
    }
}

/// What every node durably stores at the end, read through the simulator-only
/// hook (the storage itself, not quorum reads), and each key's primaries.
#[derive(Clone, Debug, Default)]
pub struct FinalState {
    /// node -> key -> stored set.
    pub stored: BTreeMap<String, BTreeMap<Key, DvvSet>>,
    /// key -> its primaries, in preference-list order.
    pub primaries: BTreeMap<Key, Vec<String>>,
    /// node -> the storage keys of the hints it still holds (owner and key,
    /// as `dynamo_core::handoff::hint_key` makes them).
    pub hints: BTreeMap<String, Vec<Vec<u8>>>,
}
