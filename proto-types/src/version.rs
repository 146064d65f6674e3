//! Versioned values as they are stored and sent: a dotted version vector set.
//!
//! This module holds data only. The rules (merge, update with a context, LWW
//! pruning) live in `dynamo-core::version`, the one place that may change them.

use crate::ids::{Actor, Dot};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// A hybrid logical timestamp: wall-clock milliseconds from the node's (injected)
/// clock, and a logical counter that orders events within one millisecond or
/// behind a clock that went backwards. Ordered by `(wall_ms, logical)`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Hlc {
    pub wall_ms: u64,
    pub logical: u32,
}

/// A causal context: the set of dots it covers. Every dot `(a, c)` with
/// `c <= vv[a]` is covered, and so is every dot in `dots` (the exceptions that a
/// plain version vector cannot express, such as "this one write of `a` but not
/// the earlier sibling of `a`"). Clients receive it as an opaque token.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Context {
    pub vv: BTreeMap<Actor, u64>,
    pub dots: BTreeSet<Dot>,
}

/// One concurrent version of a key. `value == None` is a tombstone.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Sibling {
    #[serde(with = "serde_bytes_opt")]
    pub value: Option<Vec<u8>>,
    pub timestamp: Hlc,
}

/// Everything a replica stores for one key: the siblings (each named by the dot
/// that wrote it) and the causal context that covers every write the replica
/// knows of, live or superseded. Every sibling's dot is covered by `context`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DvvSet {
    pub context: Context,
    pub siblings: BTreeMap<Dot, Sibling>,
}

impl Context {
    /// About the memory it takes: a map or set slot per entry. An estimate for
    /// budgets (caches, queues), not an encoded size.
    pub fn estimated_bytes(&self) -> usize {
        32 * (self.vv.len() + self.dots.len())
    }
}

impl DvvSet {
    /// About the memory it takes: each sibling's value and slot, and its
    /// context. An estimate for budgets (caches, queues), not an encoded size.
    pub fn estimated_bytes(&self) -> usize {
        let siblings: usize = self
            .siblings
            .values()
            .map(|s| s.value.as_ref().map_or(0, Vec::len) + 64)
            .sum();
        siblings + self.context.estimated_bytes()
    }
}

pub(crate) mod serde_bytes_opt {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        v.as_ref().map(|b| serde_bytes::Bytes::new(b)).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Ok(Option::<serde_bytes::ByteBuf>::deserialize(d)?.map(|b| b.into_vec()))
    }
}
