//! When the storage worker makes writes durable, and what a crash can lose under
//! each choice. It owns the policy's parsing and printing (the `--sync` flag), never
//! the syncing itself (that is the worker's).

use std::fmt;
use std::str::FromStr;

/// When writes are synced (fsync) relative to their acknowledgement.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SyncPolicy {
    /// Every write is synced before it is acknowledged; concurrent writes share one
    /// fsync (group commit). A crash loses nothing that was acknowledged.
    #[default]
    Always,
    /// Writes are acknowledged once applied, and a sync runs every `ms`
    /// milliseconds. A crash can lose the acknowledged writes of the last `ms`
    /// milliseconds.
    Interval { ms: u64 },
    /// Writes are acknowledged once applied and synced only at graceful shutdown.
    /// A crash of the process loses nothing the engine had handed to the OS, but a
    /// power failure or OS crash loses whatever the OS had not yet written back.
    None,
}

/// A `--sync` value that is not one of the policies.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid sync policy {input:?}: {reason}; expected one of: always, interval:<ms> (for example interval:100), none")]
pub struct ParseSyncPolicyError {
    pub input: String,
    pub reason: &'static str,
}

impl FromStr for SyncPolicy {
    type Err = ParseSyncPolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let error = |reason| ParseSyncPolicyError {
            input: s.to_string(),
            reason,
        };
        match s.trim() {
            "always" => Ok(SyncPolicy::Always),
            "none" => Ok(SyncPolicy::None),
            other => {
                let Some(ms) = other.strip_prefix("interval:") else {
                    return Err(error("unknown policy"));
                };
                match ms.trim().parse::<u64>() {
                    Ok(0) => Err(error("the interval must be at least 1 ms")),
                    Ok(ms) => Ok(SyncPolicy::Interval { ms }),
                    Err(_) => Err(error("the interval is not a whole number of milliseconds")),
                }
            }
        }
    }
}

impl fmt::Display for SyncPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SyncPolicy::Always => f.write_str("always"),
            SyncPolicy::Interval { ms } => write!(f, "interval:{ms}"),
            SyncPolicy::None => f.write_str("none"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_round_trips() {
        for policy in [
            SyncPolicy::Always,
            SyncPolicy::Interval { ms: 250 },
            SyncPolicy::None,
        ] {
            assert_eq!(policy.to_string().parse::<SyncPolicy>(), Ok(policy));
        }
    }
}
