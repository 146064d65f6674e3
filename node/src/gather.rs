//! Gathering queued messages into one socket write.
//!
//! A writer task is woken by the first message queued for it, usually while
//! the tasks that will queue the next ones (other workers, the core, the
//! readers) are ready to run but have not run yet. Writing at once would cost
//! a syscall (and, on loopback, the receiver's whole network path) per message.
//! [`gather`] takes what is queued, lets the ready tasks run once, then takes
//! what they queued, so a burst shares one write.

use tokio::sync::mpsc;

/// Hands `first`, then every message queued on `rx` behind it, to `add`, up to
/// `max` messages in all. Once the queue is empty it yields to the scheduler a
/// single time (tokio runs the yielding task again after the tasks already
/// ready and the next I/O poll) and takes what arrived meanwhile. Returns how
/// many messages it handed over.
pub(crate) async fn gather<T>(
    first: T,
    rx: &mut mpsc::UnboundedReceiver<T>,
    max: usize,
    mut add: impl FnMut(T),
) -> usize {
    let mut count = 0;
    let mut next = Some(first);
    let mut yielded = false;
    loop {
        while let Some(msg) = next {
            add(msg);
            count += 1;
            next = if count < max {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if yielded || count >= max {
            return count;
        }
        yielded = true;
        tokio::task::yield_now().await;
        next = rx.try_recv().ok();
    }
}

#[cfg(all(test, not(madsim)))]
mod tests {
    use super::gather;
    use tokio::sync::mpsc;

    #[tokio::test(flavor = "current_thread")]
    async fn a_burst_queued_by_tasks_ready_at_the_first_message_is_one_batch() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        tx.send(0).unwrap();
        // Ready to run when the gatherer is woken, not yet run: without the
        // yield their messages would go in later batches.
        for i in 1..=5 {
            let tx = tx.clone();
            tokio::spawn(async move { tx.send(i).unwrap() });
        }
        let first = rx.recv().await.unwrap();
        let mut got = Vec::new();
        let n = gather(first, &mut rx, 256, |m| got.push(m)).await;
        assert_eq!(n, 6);
        assert_eq!(got, vec![0, 1, 2, 3, 4, 5]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn stops_at_max_and_leaves_the_rest_queued() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        for i in 0..10 {
            tx.send(i).unwrap();
        }
        let first = rx.recv().await.unwrap();
        let mut got = Vec::new();
        assert_eq!(gather(first, &mut rx, 4, |m| got.push(m)).await, 4);
        assert_eq!(got, vec![0, 1, 2, 3]);
        assert_eq!(rx.try_recv().ok(), Some(4));
    }
}
