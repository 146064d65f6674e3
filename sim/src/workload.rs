//! Simulated clients: each runs on its own madsim host, sends a seeded mix of
//! puts, deletes and gets over the binary protocol to random nodes, and records
//! every operation in the shared history.

use crate::history::{History, Key, Op, OpKind, Outcome};
use crate::scenario::Scenario;
use dynamo_node::client::Connection;
use dynamo_proto::{ClientError, ClientReply, ClientRequest, Context, WriteMode};
use madsim::time::{sleep, timeout, Duration, Instant};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// What every client shares: the history and the run's start.
#[derive(Clone)]
pub struct Shared {
    pub history: Arc<Mutex<History>>,
    pub start: Instant,
    next_op: Arc<Mutex<u64>>,
}

impl Default for Shared {
    fn default() -> Self {
        Shared::new()
    }
}

impl Shared {
    pub fn new() -> Shared {
        Shared {
            history: Arc::new(Mutex::new(History::default())),
            start: Instant::now(),
            next_op: Arc::new(Mutex::new(1)),
        }
    }

    pub fn elapsed_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn begin(&self, client: usize, node: &str, kind: OpKind) -> u64 {
        let id = {
            let mut next = self.next_op.lock().unwrap();
            let id = *next;
            *next += 1;
            id
        };
        self.history.lock().unwrap().ops.push(Op {
            id,
            client,
            node: node.to_string(),
            kind,
            invoked_ms: self.elapsed_ms(),
            completed_ms: None,
            outcome: Outcome::Pending,
        });
        id
    }

    fn complete(&self, id: u64, outcome: Outcome) {
        let now = self.elapsed_ms();
        let mut history = self.history.lock().unwrap();
        if let Some(op) = history.ops.iter_mut().rev().find(|op| op.id == id) {
            op.completed_ms = Some(now);
            op.outcome = outcome;
        }
    }
}

pub fn key_name(i: usize) -> Key {
    format!("key{i}").into_bytes()
}

/// A client's connections, one per node, opened lazily and dropped on error.
pub struct Sessions {
    addrs: Vec<(String, String)>,
    conns: BTreeMap<usize, Connection>,
    /// How long a client waits for an answer before calling it timed out.
    deadline: Duration,
}

impl Sessions {
    pub fn new(addrs: Vec<(String, String)>, request_timeout_ms: u64) -> Sessions {
        Sessions {
            addrs,
            conns: BTreeMap::new(),
            deadline: Duration::from_millis(request_timeout_ms * 2 + 500),
        }
    }

    pub fn node_name(&self, node: usize) -> &str {
        &self.addrs[node].0
    }

    /// Sends one request; `None` when no answer came (connect failure, I/O
    /// error or the deadline). A connection opened earlier may have died with a
    /// node that crashed since; when it fails in a way that proves the request
    /// was not applied (or the request is a read), the client reconnects and
    /// tries once more, as a real client would.
    pub async fn call(&mut self, node: usize, request: ClientRequest) -> Option<ClientReply> {
        let deadline = self.deadline;
        let retry_safe = matches!(request, ClientRequest::Get { .. });
        let attempt = async {
            for _ in 0..2 {
                let reused = self.conns.contains_key(&node);
                if !reused {
                    let conn = Connection::connect(&self.addrs[node].1, Duration::from_millis(500))
                        .await
                        .ok()?;
                    self.conns.insert(node, conn);
                }
                let conn = self.conns.get_mut(&node)?;
                match conn.call(request.clone()).await {
                    Ok(reply) => return Some(reply),
                    Err(e) => {
                        self.conns.remove(&node);
                        if !(reused && (retry_safe || e.nothing_sent())) {
                            return None;
                        }
                    }
                }
            }
            None
        };
        match timeout(deadline, attempt).await {
            Ok(Some(reply)) => Some(reply),
            _ => {
                self.conns.remove(&node);
                None
            }
        }
    }
}

/// Runs one client until `stop_ms` after the start.
pub async fn client_loop(
    client: usize,
    scenario: Scenario,
    addrs: Vec<(String, String)>,
    seed: u64,
    shared: Shared,
    stop_ms: u64,
) {
    let w = &scenario.workload;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ ((client as u64 + 1) << 40) ^ 0xc11e);
    let mut sessions = Sessions::new(addrs, scenario.cluster.request_timeout.0);
    let mut contexts: BTreeMap<Key, Context> = BTreeMap::new();
    let total = w.put + w.get + w.delete;
    while shared.elapsed_ms() < stop_ms {
        let think = rng.gen_range(w.think_time[0].0..=w.think_time[1].0);
        sleep(Duration::from_millis(think)).await;
        let key = key_name(rng.gen_range(0..w.keys));
        // Drawn either way, so the rest of the client's draws do not depend on it.
        let drawn = rng.gen_range(0..scenario.cluster.nodes);
        let node = if w.home_node {
            client % scenario.cluster.nodes
        } else {
            drawn
        };
        let with_context = rng.gen_bool(w.with_context.clamp(0.0, 1.0));
        let context = if with_context {
            contexts.get(&key).cloned()
        } else {
            None
        };
        let pick = rng.gen_range(0..total);
        let size = rng.gen_range(w.value_size[0]..=w.value_size[1]);
        let (kind, request) = if pick < w.put {
            // The value names its op: the id is filled in below.
            let kind = OpKind::Put {
                key: key.clone(),
                value: Vec::new(),
                context: context.clone(),
            };
            (kind, None)
        } else if pick < w.put + w.delete {
            let kind = OpKind::Delete {
                key: key.clone(),
                context: context.clone(),
            };
            let request = ClientRequest::Put {
                key: key.clone(),
                value: None,
                context,
                w: None,
                mode: WriteMode::Context,
            };
            (kind, Some(request))
        } else {
            let kind = OpKind::Get {
                key: key.clone(),
                r: None,
            };
            let request = ClientRequest::Get {
                key: key.clone(),
                r: None,
            };
            (kind, Some(request))
        };
        let node_name = sessions.node_name(node).to_string();
        let (id, request) = match request {
            Some(request) => (shared.begin(client, &node_name, kind), request),
            None => {
                let id = shared.begin(client, &node_name, kind);
                let value = unique_value(client, id, size);
                set_put_value(&shared, id, value.clone());
                let request = ClientRequest::Put {
                    key: key.clone(),
                    value: Some(value),
                    context: contexts.get(&key).cloned().filter(|_| with_context),
                    w: None,
                    mode: WriteMode::Context,
                };
                (id, request)
            }
        };
        let reply = sessions.call(node, request).await;
        let outcome = outcome_of(reply, &key, &mut contexts);
        shared.complete(id, outcome);
    }
}

/// Maps a reply to an outcome, remembering the context it carried for the key.
pub fn outcome_of(
    reply: Option<ClientReply>,
    key: &Key,
    contexts: &mut BTreeMap<Key, Context>,
) -> Outcome {
    match reply {
        None => Outcome::TimedOut,
        Some(ClientReply::Put {
            dot,
            context,
            sloppy,
        }) => {
            contexts.insert(key.clone(), context.clone());
            Outcome::Written {
                dot,
                context,
                sloppy,
            }
        }
        Some(ClientReply::Get(reply)) => {
            contexts.insert(key.clone(), reply.context.clone());
            Outcome::Read(reply)
        }
        Some(ClientReply::Error(e)) => {
            let definite = matches!(
                e,
                ClientError::Invalid(_)
                    | ClientError::TooManySiblings { .. }
                    | ClientError::KeyTooLarge { .. }
                    | ClientError::ValueTooLarge { .. }
            );
            Outcome::Failed {
                message: e.to_string(),
                definite,
            }
        }
        Some(other) => Outcome::Failed {
            message: format!("unexpected reply {other:?}"),
            definite: false,
        },
    }
}

fn unique_value(client: usize, op: u64, size: usize) -> Vec<u8> {
    let mut value = format!("c{client}-op{op}:").into_bytes();
    while value.len() < size {
        value.push(b'a' + (value.len() % 26) as u8);
    }
    value
}

fn set_put_value(shared: &Shared, id: u64, value: Vec<u8>) {
    let mut history = shared.history.lock().unwrap();
    if let Some(op) = history.ops.iter_mut().rev().find(|op| op.id == id) {
        if let OpKind::Put { value: v, .. } = &mut op.kind {
            *v = value;
        }
    }
}

/// The liveness phase's reads: every key with R = N from one client, retried
/// until it succeeds or `attempts` run out. Returns how many keys failed.
pub async fn read_everything(
    client: usize,
    keys: usize,
    r: u8,
    addrs: Vec<(String, String)>,
    request_timeout_ms: u64,
    shared: Shared,
) -> usize {
    let mut sessions = Sessions::new(addrs.clone(), request_timeout_ms);
    let mut contexts = BTreeMap::new();
    let mut failed = 0;
    for k in 0..keys {
        let key = key_name(k);
        let mut ok = false;
        for attempt in 0..10 {
            let node = (k + attempt) % addrs.len();
            let node_name = addrs[node].0.clone();
            let kind = OpKind::Get {
                key: key.clone(),
                r: Some(r),
            };
            let id = shared.begin(client, &node_name, kind);
            let request = ClientRequest::Get {
                key: key.clone(),
                r: Some(r),
            };
            let reply = sessions.call(node, request).await;
            let outcome = outcome_of(reply, &key, &mut contexts);
            ok = matches!(outcome, Outcome::Read(_));
            shared.complete(id, outcome);
            if ok {
                break;
            }
            sleep(Duration::from_millis(200)).await;
        }
        if !ok {
            failed += 1;
        }
    }
    failed
}
