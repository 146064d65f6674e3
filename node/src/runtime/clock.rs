//! The node's clock: wall-clock milliseconds for the core's `now`, with an
//! adjustable skew so the simulator can give each node its own idea of time.
//!
//! It reads `tokio::time::Instant` (simulated under madsim) from a base fixed at
//! creation, so a simulated run never reads the host's clock.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use tokio::time::Instant;

#[derive(Clone, Debug)]
pub struct Clock {
    base_wall_ms: u64,
    start: Instant,
    skew_ms: Arc<AtomicI64>,
}

impl Clock {
    /// A clock that reads `base_wall_ms` now and advances with tokio's time.
    pub fn starting_at(base_wall_ms: u64) -> Clock {
        Clock {
            base_wall_ms,
            start: Instant::now(),
            skew_ms: Arc::new(AtomicI64::new(0)),
        }
    }

    /// The host's wall clock (production).
    #[cfg(not(madsim))]
    #[allow(clippy::disallowed_methods)]
    pub fn system() -> Clock {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Clock::starting_at(wall)
    }

    /// Milliseconds since the Unix epoch as this node sees them.
    pub fn now_ms(&self) -> u64 {
        let elapsed = self.start.elapsed().as_millis() as u64;
        let skew = self.skew_ms.load(Ordering::Relaxed);
        (self.base_wall_ms + elapsed).saturating_add_signed(skew)
    }

    /// Shifts this clock (and every clone of it) by `skew_ms` from true time.
    pub fn set_skew_ms(&self, skew_ms: i64) {
        self.skew_ms.store(skew_ms, Ordering::Relaxed);
    }
}
