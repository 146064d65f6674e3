//! The bound on client connections a node serves at once, over all its front
//! ends (binary protocol, RESP, HTTP).
//!
//! Every connection holds a file descriptor and some memory (a reply window, a
//! request buffer). Without a bound, clients could take every descriptor the
//! process may open, and then the node could not reach its peers or open its
//! storage's files, and would stop. Past the bound a new connection gets one
//! answer in its own protocol saying so, and is closed.

use crate::metrics::Metrics;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The default bound (`--max-connections`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;

/// How long a refused connection is read (and what it sent dropped) after
/// its answer, so that closing it does not reset the answer away.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Admits client connections up to a bound; counts them in the node's
/// metrics (`dynamo_client_connections`, `..._refused_total`).
#[derive(Clone)]
pub struct ConnectionLimit {
    max: u64,
    metrics: Arc<Metrics>,
}

/// One admitted connection; dropping it frees its place.
pub struct ConnectionSlot {
    metrics: Arc<Metrics>,
}

impl ConnectionLimit {
    pub fn new(max: usize, metrics: Arc<Metrics>) -> ConnectionLimit {
        ConnectionLimit {
            max: max as u64,
            metrics,
        }
    }

    pub fn max(&self) -> usize {
        self.max as usize
    }

    /// A place for one more connection, or `None` (counted) at the bound.
    pub fn admit(&self) -> Option<ConnectionSlot> {
        let open = &self.metrics.client_connections;
        let mut now = open.load(Ordering::Relaxed);
        loop {
            if now >= self.max {
                self.metrics
                    .client_connections_refused
                    .fetch_add(1, Ordering::Relaxed);
                return None;
            }
            match open.compare_exchange_weak(now, now + 1, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => {
                    return Some(ConnectionSlot {
                        metrics: self.metrics.clone(),
                    })
                }
                Err(current) => now = current,
            }
        }
    }

    /// What a refused client is told, in words.
    pub fn refusal(&self) -> String {
        format!(
            "this node serves at most {} client connections at once (--max-connections) and \
             has that many; retry later or through another node",
            self.max
        )
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.metrics
            .client_connections
            .fetch_sub(1, Ordering::AcqRel);
    }
}

/// Sends a refused connection its `answer`, then closes it: after reading
/// (and dropping) what the client sends for at most [`REFUSAL_LINGER`], so that
/// the close does not reset the answer before the client has read it.
pub async fn refuse(mut stream: TcpStream, answer: Vec<u8>) {
    let linger = async {
        stream.write_all(&answer).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut left: usize = 64 << 10;
        while left > 0 {
            let n = stream.read(&mut sink).await?;
            if n == 0 {
                break;
            }
            left = left.saturating_sub(n);
        }
        Ok::<(), std::io::Error>(())
    };
    let _ = tokio::time::timeout(REFUSAL_LINGER, linger).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_the_bound_and_frees_a_place_when_a_connection_ends() {
        let metrics = Metrics::for_tests("n1");
        let limit = ConnectionLimit::new(2, metrics.clone());
        let a = limit.admit().expect("first");
        let b = limit.admit().expect("second");
        assert!(limit.admit().is_none(), "a third past the bound of 2");
        assert_eq!(metrics.client_connections.load(Ordering::Relaxed), 2);
        assert_eq!(
            metrics.client_connections_refused.load(Ordering::Relaxed),
            1
        );
        drop(a);
        let c = limit.admit().expect("a place freed");
        drop((b, c));
        assert_eq!(metrics.client_connections.load(Ordering::Relaxed), 0);
        assert!(limit.refusal().contains("at most 2 client connections"));
    }
}
