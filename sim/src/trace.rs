//! The run's trace hash: blake3 over every peer message a node's core received,
//! in delivery order, with sender and receiver. The same seed must give the same
//! hash (determinism is checked across processes with it).

use dynamo_node::runtime::PeerTrace;
use dynamo_proto::{NodeId, PeerMessage};
use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
pub struct Trace {
    inner: Arc<Mutex<(blake3::Hasher, u64)>>,
}

impl Trace {
    pub fn new() -> Trace {
        Trace::default()
    }

    /// Feeds arbitrary bytes (client operations, fault steps) into the hash.
    pub fn record(&self, bytes: &[u8]) {
        let mut inner = self.inner.lock().unwrap();
        inner.0.update(&(bytes.len() as u64).to_le_bytes());
        inner.0.update(bytes);
    }

    /// The observer a node's runtime calls for every delivered peer message.
    pub fn peer_observer(&self) -> PeerTrace {
        let trace = self.clone();
        Arc::new(move |from: &NodeId, to: &NodeId, msg: &PeerMessage| {
            let bytes = postcard::to_allocvec(&(from, to, msg)).unwrap_or_default();
            let mut inner = trace.inner.lock().unwrap();
            inner.0.update(&(bytes.len() as u64).to_le_bytes());
            inner.0.update(&bytes);
            inner.1 += 1;
        })
    }

    /// The hash so far (hex) and the number of peer messages in it.
    pub fn finish(&self) -> (String, u64) {
        let inner = self.inner.lock().unwrap();
        (inner.0.finalize().to_hex().to_string(), inner.1)
    }
}
