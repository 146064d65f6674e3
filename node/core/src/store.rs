//! The one thing the core asks of local storage: read a key's stored set.
//!
//! Writes never go through here: the core emits `Persist` actions and learns of
//! durability through `on_persisted`. Reads must see every write already handed
//! to the shell (the node keeps its own overlay of unpersisted writes, so a shell
//! that applies writes late is still correct).

use dynamo_proto::DvvSet;

/// A storage read failed; the request that needed it fails with this message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("storage read failed: {0}")]
pub struct StoreError(pub String);

/// Synchronous reads of what this node stores. Keys are grouped by partition so a
/// partition can be scanned in order (transfers and anti-entropy need it).
pub trait LocalStore {
    fn load(&self, partition: u32, key: &[u8]) -> Result<Option<DvvSet>, StoreError>;

    /// Every key the store holds in `partition` that `keep` accepts, with its
    /// set, in key order (anti-entropy builds its hash trees and ships
    /// segments from it); refused keys should not be decoded. Like `load`, it
    /// need not see writes not yet applied: the node overlays its own
    /// unpersisted writes.
    fn scan(
        &self,
        partition: u32,
        keep: &dyn Fn(&[u8]) -> bool,
    ) -> Result<Vec<(Vec<u8>, DvvSet)>, StoreError>;
}
