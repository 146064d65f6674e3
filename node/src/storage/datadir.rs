//! The identity of a data directory: its storage format version, the cluster it
//! belongs to, the random incarnation chosen when it was created, and the epoch
//! bumped (durably) at every start.
//!
//! It owns the rule that no dot is ever minted twice: a coordinator mints dots as
//! `(incarnation, epoch)` plus a counter that restarts at every start, and a crash
//! may lose the record of dots already minted. Bumping the epoch durably before the
//! node serves makes every start's actor new; a wiped disk gets a new random
//! incarnation. It must never hold protocol logic.

use dynamo_proto::Actor;
use rand::RngCore;

use super::{Storage, StorageError};

/// The storage format this build writes and reads.
pub const STORAGE_FORMAT_VERSION: u32 = 1;

const META_FORMAT_VERSION: &str = "format_version";
const META_CLUSTER_ID: &str = "cluster_id";
const META_INCARNATION: &str = "incarnation";
const META_EPOCH: &str = "epoch";
const META_PARTITIONS: &str = "partitions";

/// Who this node is for this start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeIdentity {
    /// Chosen at random when the data directory was created.
    pub incarnation: u64,
    /// 1 on a fresh data directory, then one more at every start.
    pub epoch: u32,
    /// The data directory was empty and has just been initialised.
    pub fresh: bool,
}

impl NodeIdentity {
    /// The actor under which this start's coordinator mints dots.
    pub fn actor(&self) -> Actor {
        Actor {
            incarnation: self.incarnation,
            epoch: self.epoch,
        }
    }
}

/// Reads (or, on an empty store, creates) the data directory's identity and bumps
/// its epoch durably before returning.
///
/// Refuses a store written by another storage format version or for another
/// cluster, with a message that says what to do.
pub fn open_identity(
    storage: &dyn Storage,
    cluster_id: &str,
    rng: &mut impl RngCore,
) -> Result<NodeIdentity, StorageError> {
    let Some(version) = storage.get_meta(META_FORMAT_VERSION)? else {
        // A half-initialised directory was being made for this cluster; one
        // that names another cluster lost its format version and holds that
        // cluster's data, which must not be adopted.
        if let Some(stored) = storage.get_meta(META_CLUSTER_ID)? {
            if stored != cluster_id.as_bytes() {
                return Err(StorageError::ClusterMismatch {
                    stored: String::from_utf8_lossy(&stored).into_owned(),
                    configured: cluster_id.to_string(),
                });
            }
        }
        return initialise(storage, cluster_id, rng);
    };
    let found = u32::from_be_bytes(fixed(META_FORMAT_VERSION, &version)?);
    if found != STORAGE_FORMAT_VERSION {
        return Err(StorageError::FormatVersion {
            found,
            supported: STORAGE_FORMAT_VERSION,
        });
    }
    let stored_cluster = required(storage, META_CLUSTER_ID)?;
    let stored_cluster =
        String::from_utf8(stored_cluster).map_err(|e| corrupt(META_CLUSTER_ID, e))?;
    if stored_cluster != cluster_id {
        return Err(StorageError::ClusterMismatch {
            stored: stored_cluster,
            configured: cluster_id.to_string(),
        });
    }
    let incarnation = u64::from_be_bytes(fixed(
        META_INCARNATION,
        &required(storage, META_INCARNATION)?,
    )?);
    let previous = u32::from_be_bytes(fixed(META_EPOCH, &required(storage, META_EPOCH)?)?);
    let epoch = previous
        .checked_add(1)
        .ok_or_else(|| corrupt(META_EPOCH, "the epoch has reached its maximum"))?;
    // Durable before the caller may mint a single dot under the new epoch.
    storage.put_meta(META_EPOCH, &epoch.to_be_bytes())?;
    Ok(NodeIdentity {
        incarnation,
        epoch,
        fresh: false,
    })
}

/// Writes a new identity. The format version goes last: it marks the directory as
/// initialised, so a crash half way through leaves a directory that is initialised
/// afresh at the next start (no dot was minted under the half-written identity).
fn initialise(
    storage: &dyn Storage,
    cluster_id: &str,
    rng: &mut impl RngCore,
) -> Result<NodeIdentity, StorageError> {
    let identity = NodeIdentity {
        incarnation: rng.next_u64(),
        epoch: 1,
        fresh: true,
    };
    storage.put_meta(META_CLUSTER_ID, cluster_id.as_bytes())?;
    storage.put_meta(META_INCARNATION, &identity.incarnation.to_be_bytes())?;
    storage.put_meta(META_EPOCH, &identity.epoch.to_be_bytes())?;
    storage.put_meta(META_FORMAT_VERSION, &STORAGE_FORMAT_VERSION.to_be_bytes())?;
    Ok(identity)
}

/// Records the ring's partition count in a data directory that has none, and
/// refuses one recorded with another count: stored keys are grouped by the
/// partition they hash to under that count, so under another one nearly every
/// key would be looked for where it is not, and read as absent.
pub fn check_partitions(storage: &dyn Storage, partitions: u32) -> Result<(), StorageError> {
    match storage.get_meta(META_PARTITIONS)? {
        None => storage.put_meta(META_PARTITIONS, &partitions.to_be_bytes()),
        Some(bytes) => {
            let stored = u32::from_be_bytes(fixed(META_PARTITIONS, &bytes)?);
            if stored == partitions {
                Ok(())
            } else {
                Err(StorageError::PartitionsMismatch {
                    stored,
                    configured: partitions,
                })
            }
        }
    }
}

fn required(storage: &dyn Storage, name: &str) -> Result<Vec<u8>, StorageError> {
    storage
        .get_meta(name)?
        .ok_or_else(|| corrupt(name, "missing although the format version is set"))
}

fn fixed<const N: usize>(name: &str, bytes: &[u8]) -> Result<[u8; N], StorageError> {
    bytes
        .try_into()
        .map_err(|_| corrupt(name, format!("expected {N} bytes, found {}", bytes.len())))
}

fn corrupt(name: &str, detail: impl std::fmt::Display) -> StorageError {
    StorageError::CorruptMeta {
        name: name.to_string(),
        detail: detail.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryStorage;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn half_initialised_directory_starts_afresh() {
        let s = MemoryStorage::new();
        s.put_meta(META_CLUSTER_ID, b"c").unwrap();
        let id = open_identity(&s, "c", &mut ChaCha8Rng::seed_from_u64(1)).unwrap();
        assert!(id.fresh);
        assert_eq!(id.epoch, 1);
    }

    #[test]
    fn newer_format_is_refused() {
        let s = MemoryStorage::new();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        open_identity(&s, "c", &mut rng).unwrap();
        s.put_meta(META_FORMAT_VERSION, &2u32.to_be_bytes())
            .unwrap();
        let err = open_identity(&s, "c", &mut rng).unwrap_err();
        assert_eq!(
            err,
            StorageError::FormatVersion {
                found: 2,
                supported: 1
            }
        );
        assert!(err.to_string().contains("--data-dir"), "{err}");
    }

    #[test]
    fn truncated_epoch_is_reported_as_corrupt() {
        let s = MemoryStorage::new();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        open_identity(&s, "c", &mut rng).unwrap();
        s.put_meta(META_EPOCH, &[1]).unwrap();
        let err = open_identity(&s, "c", &mut rng).unwrap_err();
        assert!(err.to_string().contains("\"epoch\""), "{err}");
    }
}
