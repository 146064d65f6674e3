//! Per-connection flow control for the front ends that pipeline (RESP and the
//! binary client port): how many requests one connection may have started and
//! not yet answered on its socket, so that a client which sends faster than it
//! reads is pushed back on by TCP instead of growing the node's memory.
//!
//! The reading task calls [`ReplyWindow::admit`] before it starts each request,
//! and reads nothing from the socket while it waits; the writing task reports
//! each batch of replies with [`ReplyWindow::encoded`] before writing it and
//! with [`ReplyWindow::written`] once the socket has taken it. The window only
//! ever delays reading: it never drops, reorders or refuses a reply.
//!
//! A reply's size is not known until the core answers, so the window is sized
//! from the replies seen so far: at most `reply_bytes_max / estimate` units in
//! flight (and never more than `units_max`), where the estimate jumps to any
//! larger reply at once and decays slowly back when replies get small (the
//! first batch of replies replaces the initial guess outright). A
//! request counts as one unit, or as one per key for a command that answers
//! with many values (`MGET`), so a large reply is measured per value. Before
//! its first reply a connection may start [`INITIAL_WINDOW`] units.
//!
//! The bound is on the common case, not the worst one: a connection whose
//! replies have all been small may have `units_max` requests in flight, and if
//! all of them then answer with the largest value the node allows, that much
//! is held until the client reads. What the window removes is the unbounded
//! part: a client that keeps sending and never reads stops being read.
//!
//! It knows nothing of either protocol.

use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

/// Requests one connection may have started and not yet seen written back
/// (an `MGET` counts once per key), on either front end. Clients that
/// pipeline keep far fewer: `dynamo bench` keeps `--concurrency /
/// --connections` (25 by default, 200 in the largest published run).
pub const UNITS_IN_FLIGHT_MAX: usize = 1024;
/// About how many bytes of replies one connection may have in flight once
/// their sizes are known: 16 values of the default 1 MiB maximum.
pub const REPLY_BYTES_IN_FLIGHT_MAX: usize = 16 << 20;
/// How long a connection keeps writing its last replies once the node is
/// shutting down: a client that does not read must not keep it open forever.
pub const SHUTDOWN_DRAIN: Duration = Duration::from_secs(5);

/// Waits for a connection's `writer` to write the replies to what was already
/// started (its reply channel is closed). Once the node is shutting down (or
/// gone), it gets [`SHUTDOWN_DRAIN`] more, then it is aborted.
pub async fn drain_writer(
    mut writer: JoinHandle<()>,
    mut shutdown: watch::Receiver<bool>,
    front_end: &str,
) {
    let deadline = async {
        if !*shutdown.borrow() {
            // An error means the node is gone: as good as shutting down.
            let _ = shutdown.changed().await;
        }
        tokio::time::sleep(SHUTDOWN_DRAIN).await;
    };
    tokio::select! {
        // Not random (the simulator replays every choice).
        biased;
        _ = &mut writer => {}
        _ = deadline => {
            tracing::debug!("a {front_end} client did not read its last replies within {SHUTDOWN_DRAIN:?}; closing");
            writer.abort();
        }
    }
}

/// Units a connection may start before any of its replies has been seen.
pub const INITIAL_WINDOW: usize = 64;

/// How fast the reply-size estimate falls back after a large reply: by
/// 1/`ESTIMATE_DECAY` of itself per batch of smaller replies written.
const ESTIMATE_DECAY: usize = 16;

/// One connection's window, shared by its reading and writing tasks.
#[derive(Debug)]
pub struct ReplyWindow {
    units_max: usize,
    reply_bytes_max: usize,
    state: Mutex<State>,
    /// Signalled when units are written or the writer has gone.
    drained: Notify,
}

#[derive(Debug)]
struct State {
    /// Units admitted whose replies the socket has not taken yet.
    in_flight: usize,
    /// Bytes per unit the next replies are expected to take.
    unit_bytes_estimate: usize,
    /// Whether the estimate comes from a reply yet (or is the initial guess,
    /// which the first reply replaces outright).
    measured: bool,
    /// The writer has gone: nothing will be written any more.
    closed: bool,
}

impl ReplyWindow {
    /// A window of at most `units_max` units in flight, and about
    /// `reply_bytes_max` bytes of replies once reply sizes are known.
    pub fn new(units_max: usize, reply_bytes_max: usize) -> ReplyWindow {
        let units_max = units_max.max(1);
        ReplyWindow {
            units_max,
            reply_bytes_max,
            state: Mutex::new(State {
                in_flight: 0,
                unit_bytes_estimate: (reply_bytes_max / INITIAL_WINDOW.min(units_max)).max(1),
                measured: false,
                closed: false,
            }),
            drained: Notify::new(),
        }
    }

    /// Waits until `units` more fit in the window and counts them in flight:
    /// `true`, or `false` once the writer has gone (the connection is over).
    /// A request larger than the whole window is admitted when nothing else is
    /// in flight. Cancel-safe: dropped before it resolves, it counts nothing.
    pub async fn admit(&self, units: usize) -> bool {
        loop {
            // Made before the check: a `written` between the check and the
            // wait leaves a permit, so no wakeup is lost.
            let drained = self.drained.notified();
            if let Some(admitted) = self.try_admit(units) {
                return admitted;
            }
            drained.await;
        }
    }

    /// [`ReplyWindow::admit`] without waiting: `None` when the window is full.
    fn try_admit(&self, units: usize) -> Option<bool> {
        let mut s = self.lock();
        if s.closed {
            return Some(false);
        }
        let window = (self.reply_bytes_max / s.unit_bytes_estimate).clamp(1, self.units_max);
        if s.in_flight == 0 || s.in_flight + units <= window {
            s.in_flight += units;
            return Some(true);
        }
        None
    }

    /// Counts `units` in flight whatever the window says: for the one reply a
    /// connection sends before it closes (the answer to malformed input).
    pub fn admit_now(&self, units: usize) {
        self.lock().in_flight += units;
    }

    /// The writer is about to write a batch of replies whose largest took
    /// `unit_bytes_max` bytes per unit. Called before the write, which may
    /// wait on a client that does not read, so that the window shrinks at once.
    pub fn encoded(&self, unit_bytes_max: usize) {
        let mut s = self.lock();
        let decayed = if s.measured {
            s.unit_bytes_estimate - s.unit_bytes_estimate / ESTIMATE_DECAY
        } else {
            0
        };
        s.unit_bytes_estimate = unit_bytes_max.max(decayed).max(1);
        s.measured = true;
    }

    /// `units` have been written to the socket, or will never be (a request
    /// that had no reply); the reader may start more.
    pub fn written(&self, units: usize) {
        {
            let mut s = self.lock();
            s.in_flight = s.in_flight.saturating_sub(units);
        }
        self.drained.notify_one();
    }

    /// The writer has gone; a waiting reader gives up.
    pub fn close(&self) {
        self.lock().closed = true;
        self.drained.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state stays consistent whatever panicked while holding it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Closes the window when dropped: the writer holds one, so that a reader
/// never waits for a writer that returned or panicked.
pub struct CloseOnDrop<'a>(pub &'a ReplyWindow);

impl Drop for CloseOnDrop<'_> {
    fn drop(&mut self) {
        self.0.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    const MIB: usize = 1 << 20;

    /// Admits single units until the window is full; how many it took.
    fn fill(w: &ReplyWindow) -> usize {
        let mut n = 0;
        while w.try_admit(1) == Some(true) {
            n += 1;
        }
        n
    }

    #[test]
    fn a_new_connection_starts_the_initial_window() {
        let w = ReplyWindow::new(1024, 16 * MIB);
        assert_eq!(fill(&w), INITIAL_WINDOW);
        w.written(1);
        assert_eq!(fill(&w), 1, "one written, one more admitted");
        // The first replies replace the initial guess outright.
        w.encoded(100);
        assert_eq!(fill(&w), 1024 - INITIAL_WINDOW);
    }

    #[test]
    fn large_replies_shrink_the_window_and_small_ones_reopen_it() {
        let w = ReplyWindow::new(1024, 16 * MIB);
        w.encoded(MIB);
        assert_eq!(fill(&w), 16, "16 MiB of 1 MiB replies");
        w.written(16);
        // Small replies decay the estimate back; the cap is then units_max.
        for _ in 0..200 {
            w.encoded(100);
        }
        assert_eq!(fill(&w), 1024);
        // One large reply closes it again at once.
        w.written(1024);
        w.encoded(4 * MIB);
        assert_eq!(fill(&w), 4);
    }

    #[test]
    fn a_request_larger_than_the_window_goes_alone() {
        let w = ReplyWindow::new(1024, 16 * MIB);
        w.encoded(MIB);
        assert_eq!(w.try_admit(100), Some(true), "nothing else in flight");
        assert_eq!(w.try_admit(1), None);
        w.written(100);
        assert_eq!(w.try_admit(1), Some(true));
        assert_eq!(w.try_admit(100), None, "waits for the one in flight");
    }

    #[tokio::test]
    async fn a_waiting_reader_wakes_when_replies_drain_or_the_writer_goes() {
        let w = Arc::new(ReplyWindow::new(2, MIB));
        assert_eq!(fill(&w), 2);
        let waiter = tokio::spawn({
            let w = w.clone();
            async move { w.admit(1).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "admitted over a full window");
        w.written(1);
        assert!(tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken by written")
            .unwrap());

        let waiter = tokio::spawn({
            let w = w.clone();
            async move { w.admit(1).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(CloseOnDrop(&w));
        assert!(!tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken by close")
            .unwrap());
    }
}
