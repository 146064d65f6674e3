//! The Redis-protocol (RESP2) front end: `redis-cli`, `redis-benchmark` and
//! Redis client libraries talk to a node as if it were a Redis server.
//!
//! Off unless `--resp-addr` (`DYNAMO_RESP_ADDR`, file key `resp_addr`) is set;
//! `dynamo dev` turns it on at `--resp-port + i` (6380 and up).
//!
//! # Commands
//!
//! | command | answer |
//! |---|---|
//! | `GET key` | the value, or nil |
//! | `SET key value` | `+OK`; no options (`EX`, `PX`, `NX`, `XX`, `GET`, ... are refused) |
//! | `DEL key [key ...]` | how many of the keys had a value |
//! | `EXISTS key [key ...]` | how many of the keys have a value (repeats count again) |
//! | `MGET key [key ...]` | an array of values and nils; `-ERR` if it would exceed [`commands::mget_reply_bytes_max`] |
//! | `MSET key value [key value ...]` | `+OK` once every write succeeded; not atomic |
//! | `DYNAMO.GETALL key` | `[context, value1, value2, ...]`: see below |
//! | `DYNAMO.PUT key context value` | the new write's context token |
//! | `PING [msg]`, `ECHO msg`, `QUIT`, `SELECT 0`, `HELLO [2]`, `CLIENT SETNAME/GETNAME/ID/SETINFO`, `COMMAND [COUNT/INFO/DOCS/LIST]`, `CONFIG GET pattern ...`, `INFO [section]` | as in Redis, as far as they make sense here |
//!
//! Anything else answers `-ERR unknown command 'X', with args beginning with:
//! ...`, as Redis does. `HELLO 3` answers `-NOPROTO`: this port speaks RESP2.
//!
//! # What SET and GET mean in a store with siblings
//!
//! - `SET` writes with `WriteMode::Overwrite` and no context: it supersedes
//!   every version the coordinating primary holds for the key. Two `SET`s
//!   coordinated by different primaries at the same time, or by a coordinator
//!   that has not yet seen an earlier `SET` (it was down or partitioned when
//!   that write happened), leave both values as siblings. The next `SET`
//!   through a coordinator that holds them all folds them away.
//! - `GET` returns one value: with siblings, the greatest by (timestamp, actor,
//!   counter), the same choice on every node (the last-write-wins order). A
//!   tombstone that wins reads as nil. `DYNAMO.GETALL` shows every sibling.
//! - `DEL` reads each key, then deletes exactly what it read (a tombstone
//!   carrying the read's context), so a `SET` racing with it survives as a
//!   sibling. It counts a key when `GET` would have returned a value.
//!   `EXISTS` counts the same way.
//! - `MSET` and multi-key `DEL` are not atomic: each key is written on its own,
//!   concurrently; on an error some keys may have been written.
//! - Errors from the core: `-TRYAGAIN` when a quorum was not met or the node is
//!   shutting down (a failed write may still have been applied), `-ERR` with
//!   the core's message otherwise.
//!
//! `DYNAMO.GETALL key` answers an array whose first element is the key's causal
//! context token (base64url, the same token as HTTP's `X-Dynamo-Context` and
//! the CLI's `--context`) followed by every live sibling in dot order
//! (tombstones left out); a missing key gives a one-element array. To resolve
//! siblings, send `DYNAMO.PUT key <context> <value>`: it supersedes exactly what
//! the context covers and answers the new write's context (an empty context
//! string writes without one and adds a sibling).
//!
//! # Connections and pipelining
//!
//! Commands are parsed as they arrive (arrays of bulk strings, or inline
//! commands typed into `telnet`) and a pipeline's commands are coordinated
//! concurrently, but commands on the same key from one connection run in the
//! order sent, and replies are always written in request order, flushed once
//! per batch of ready replies. `GET` and `SET` go straight from the reading
//! task to the core when every earlier command of the connection has been
//! answered (always so for a client that waits for each reply, as
//! `redis-benchmark` does); otherwise, and for every other command on keys,
//! the command runs as its own task once the earlier ones on its keys have
//! finished. At most
//! [`MAX_IN_FLIGHT`] commands per connection are outstanding, and fewer when
//! replies are large: about [`REPLY_BYTES_IN_FLIGHT_MAX`] of them, an `MGET`
//! counting once per key (see [`crate::reply_window`]). When that is reached the
//! connection stops reading until replies have been written, so a client that
//! pipelines without reading is held back by TCP, not by the node's memory.
//! `MGET` reads each distinct key once, however often it is named, and
//! refuses a reply larger than [`commands::mget_reply_bytes_max`] (Redis would
//! send it, bounded only by `client-output-buffer-limit`; here one command
//! must not pin an unbounded amount of memory). Malformed input gets one
//! `-ERR Protocol error: ...` after the replies before it, then the connection
//! closes; the node keeps serving. On shutdown the listener stops accepting,
//! connections stop reading, and replies to commands already read are still
//! written, for at most [`SHUTDOWN_DRAIN`] to a client that does not read.
//!
//! Only `tokio::net`, `tokio::io`, `tokio::sync` and `tokio::spawn` are used, so
//! it also builds (and could run) under madsim.

pub mod commands;
pub mod parse;
pub mod reply;

pub use parse::{Decoder, Limits, ProtocolError};
pub use reply::Reply;

use crate::read_buf::ReadBuf;
use crate::reply_window::{
    drain_writer, CloseOnDrop, ReplyWindow, REPLY_BYTES_IN_FLIGHT_MAX,
    UNITS_IN_FLIGHT_MAX as MAX_IN_FLIGHT,
};
use crate::runtime::handle::shutting_down;
use crate::runtime::CoreHandle;
use dynamo_proto::{ClientReply, ClientRequest};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};

/// Replies are written once this many bytes are ready, even if more are.
const WRITE_BATCH: usize = 64 * 1024;
/// Per-key ordering entries kept before finished ones are pruned.
const ORDER_PRUNE_AT: usize = 2 * MAX_IN_FLIGHT;

/// What every connection of one listener shares.
pub(crate) struct Shared {
    pub handle: CoreHandle,
    pub limits: Limits,
    pub port: u16,
    pub started: tokio::time::Instant,
    pub connections_received: AtomicU64,
    pub connected: AtomicU64,
    pub commands: AtomicU64,
    next_client_id: AtomicU64,
}

/// Serves RESP on `listener` until `shutdown` resolves; then stops accepting,
/// stops reading, writes the replies of every command already read, and
/// returns once every connection has closed.
pub async fn serve(
    listener: TcpListener,
    handle: CoreHandle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let port = listener.local_addr()?.port();
    let limits = Limits::for_node(handle.info.max_key_bytes, handle.info.max_value_bytes);
    let shared = Arc::new(Shared {
        handle,
        limits,
        port,
        started: tokio::time::Instant::now(),
        connections_received: AtomicU64::new(0),
        connected: AtomicU64::new(0),
        commands: AtomicU64::new(0),
        next_client_id: AtomicU64::new(1),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    // Every connection holds a clone; when all are gone, every connection closed.
    let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    shared.connections_received.fetch_add(1, Ordering::Relaxed);
                    match shared.handle.connections.admit() {
                        Some(slot) => {
                            let serving = connection(
                                stream,
                                shared.clone(),
                                stop_rx.clone(),
                                alive_tx.clone(),
                            );
                            tokio::spawn(async move {
                                serving.await;
                                drop(slot);
                            });
                        }
                        // Redis's own words, which client libraries know.
                        None => {
                            let answer = b"-ERR max number of clients reached\r\n".to_vec();
                            tokio::spawn(crate::connection_limit::refuse(stream, answer));
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a RESP connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(alive_tx);
    let _ = alive_rx.recv().await;
    Ok(())
}

/// A reply slot as queued for the writer, with the window units it holds.
struct Queued {
    slot: Slot,
    units: usize,
}

/// A reply in request order: ready now, coming from a task, or coming
/// straight from the core (turned into a reply by `finish`; `done` is dropped
/// once it has arrived, releasing later commands on the same key).
enum Slot {
    Ready(Reply),
    Pending(oneshot::Receiver<Reply>),
    Core {
        rx: oneshot::Receiver<ClientReply>,
        finish: fn(ClientReply) -> Reply,
        done: oneshot::Sender<()>,
    },
}

fn lost_reply() -> Reply {
    Reply::err("internal error: the command's task ended without a reply")
}

impl Slot {
    async fn wait(self) -> Reply {
        match self {
            Slot::Ready(r) => r,
            Slot::Pending(rx) => rx.await.unwrap_or_else(|_| lost_reply()),
            Slot::Core { rx, finish, done } => {
                let reply = finish(rx.await.unwrap_or_else(|_| shutting_down()));
                drop(done);
                reply
            }
        }
    }

    /// The reply if it is ready, else the slot back.
    fn try_take(self) -> Result<Reply, Slot> {
        match self {
            Slot::Ready(r) => Ok(r),
            Slot::Pending(mut rx) => match rx.try_recv() {
                Ok(r) => Ok(r),
                Err(oneshot::error::TryRecvError::Empty) => Err(Slot::Pending(rx)),
                Err(oneshot::error::TryRecvError::Closed) => Ok(lost_reply()),
            },
            Slot::Core {
                mut rx,
                finish,
                done,
            } => match rx.try_recv() {
                Ok(r) => Ok(finish(r)),
                Err(oneshot::error::TryRecvError::Empty) => Err(Slot::Core { rx, finish, done }),
                Err(oneshot::error::TryRecvError::Closed) => Ok(finish(shutting_down())),
            },
        }
    }
}

/// One connection's state, owned by its reading task.
pub(crate) struct Conn {
    pub shared: Arc<Shared>,
    pub id: u64,
    pub name: Option<Vec<u8>>,
    /// For each key, a receiver that closes when the last command this
    /// connection sent on the key has finished.
    order: BTreeMap<Vec<u8>, oneshot::Receiver<()>>,
    /// Commands read whose reply the writer has not taken yet.
    unanswered: Arc<AtomicUsize>,
}

/// What the reader does with one command.
pub(crate) enum Action {
    Reply(Reply),
    /// Reply, then close the connection (QUIT).
    ReplyAndClose(Reply),
    /// A task's reply, in order.
    Spawned(oneshot::Receiver<Reply>),
    /// The core's answer, in order (see [`Conn::submit_keyed`]).
    Submitted {
        rx: oneshot::Receiver<ClientReply>,
        finish: fn(ClientReply) -> Reply,
        done: oneshot::Sender<()>,
    },
    /// Nothing (an empty command).
    Nothing,
}

impl Conn {
    /// Runs `work` as its own task once every earlier command of this
    /// connection on any of `keys` has finished.
    pub fn spawn_keyed<F>(&mut self, keys: &[Vec<u8>], work: F) -> Action
    where
        F: Future<Output = Reply> + Send + 'static,
    {
        let unique: BTreeSet<&Vec<u8>> = keys.iter().collect();
        let mut before = Vec::new();
        let mut mine = Vec::with_capacity(unique.len());
        for key in unique {
            let (done_tx, done_rx) = oneshot::channel::<()>();
            if let Some(prev) = self.order.insert(key.clone(), done_rx) {
                before.push(prev);
            }
            mine.push(done_tx);
        }
        if self.order.len() > ORDER_PRUNE_AT {
            self.prune_order();
        }
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            for prev in before {
                let _ = prev.await;
            }
            let reply = work.await;
            let _ = tx.send(reply);
            drop(mine);
        });
        Action::Spawned(rx)
    }

    /// Sends a one-key `request` straight to the core, with no task of its
    /// own, when every earlier command of this connection has been answered
    /// (the common case: a client waiting for each reply); otherwise runs it
    /// as [`Conn::spawn_keyed`] does, after the earlier commands on `key`.
    /// `finish` turns the core's answer into the RESP reply.
    ///
    /// With nothing else outstanding the command heads the writer's queue,
    /// so its key is released the moment its answer arrives and a pipelined
    /// command behind it waits for nothing else.
    pub fn submit_keyed(
        &mut self,
        key: &[u8],
        request: ClientRequest,
        finish: fn(ClientReply) -> Reply,
    ) -> Action {
        if self.unanswered.load(Ordering::Acquire) > 0 {
            let handle = self.shared.handle.clone();
            return self.spawn_keyed(&[key.to_vec()], async move {
                finish(handle.request(request).await)
            });
        }
        let (done, done_rx) = oneshot::channel::<()>();
        self.order.insert(key.to_vec(), done_rx);
        if self.order.len() > ORDER_PRUNE_AT {
            self.prune_order();
        }
        Action::Submitted {
            rx: self.shared.handle.submit(request),
            finish,
            done,
        }
    }

    /// Forgets keys whose last command has finished.
    fn prune_order(&mut self) {
        self.order
            .retain(|_, rx| matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Empty)));
    }

    /// Runs `work` as its own task, unordered with respect to keys.
    pub fn spawn<F>(&mut self, work: F) -> Action
    where
        F: Future<Output = Reply> + Send + 'static,
    {
        self.spawn_keyed(&[], work)
    }
}

async fn connection(
    stream: TcpStream,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    _alive: mpsc::Sender<()>,
) {
    let _ = stream.set_nodelay(true);
    shared.connected.fetch_add(1, Ordering::Relaxed);
    let id = shared.next_client_id.fetch_add(1, Ordering::Relaxed);
    let (mut reader, writer) = tokio::io::split(stream);
    let (tx, rx) = mpsc::channel::<Queued>(MAX_IN_FLIGHT);
    let unanswered = Arc::new(AtomicUsize::new(0));
    let window = Arc::new(ReplyWindow::new(MAX_IN_FLIGHT, REPLY_BYTES_IN_FLIGHT_MAX));
    let write_task = tokio::spawn(write_replies(
        writer,
        rx,
        unanswered.clone(),
        window.clone(),
    ));
    let mut conn = Conn {
        shared: shared.clone(),
        id,
        name: None,
        order: BTreeMap::new(),
        unanswered,
    };
    let mut decoder = Decoder::new(shared.limits);
    let mut buf = ReadBuf::default();
    'conn: loop {
        loop {
            match decoder.decode(buf.unread()) {
                Ok((used, command)) => {
                    buf.consume(used);
                    let Some(command) = command else { break };
                    if command.is_empty() {
                        continue;
                    }
                    // While the window is full nothing is read: the client's
                    // writes back up into its own socket.
                    let units = commands::reply_units(&command);
                    let admitted = tokio::select! {
                        biased;
                        _ = stop.changed() => break 'conn,
                        admitted = window.admit(units) => admitted,
                    };
                    if !admitted {
                        break 'conn;
                    }
                    let (slot, close) = match commands::dispatch(&mut conn, command) {
                        Action::Nothing => {
                            window.written(units);
                            continue;
                        }
                        Action::Reply(r) => (Slot::Ready(r), false),
                        Action::ReplyAndClose(r) => (Slot::Ready(r), true),
                        Action::Spawned(rx) => (Slot::Pending(rx), false),
                        Action::Submitted { rx, finish, done } => {
                            (Slot::Core { rx, finish, done }, false)
                        }
                    };
                    conn.unanswered.fetch_add(1, Ordering::AcqRel);
                    if tx.send(Queued { slot, units }).await.is_err() || close {
                        break 'conn;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "RESP protocol error; closing the connection");
                    conn.unanswered.fetch_add(1, Ordering::AcqRel);
                    window.admit_now(1);
                    let slot = Slot::Ready(Reply::err(format!("Protocol error: {e}")));
                    let _ = tx.send(Queued { slot, units: 1 }).await;
                    break 'conn;
                }
            }
        }
        let n = tokio::select! {
            biased;
            _ = stop.changed() => break,
            n = buf.fill(&mut reader) => n,
        };
        if !matches!(n, Ok(1..)) {
            break;
        }
    }
    // Replies to commands already read are written; once the node is
    // shutting down, a client that does not read gets SHUTDOWN_DRAIN more.
    drop(tx);
    drain_writer(write_task, stop, "RESP").await;
    shared.connected.fetch_sub(1, Ordering::Relaxed);
}

/// Writes replies in request order: waits for the oldest, then takes every
/// later one that is already done, writes them together and flushes,
/// telling `window` what each batch held and when the socket took it.
async fn write_replies<W: tokio::io::AsyncWrite + Unpin>(
    mut writer: W,
    mut rx: mpsc::Receiver<Queued>,
    unanswered: Arc<AtomicUsize>,
    window: Arc<ReplyWindow>,
) {
    let _close = CloseOnDrop(&window);
    let mut out: Vec<u8> = Vec::with_capacity(16 * 1024);
    // A slot taken from the channel whose reply was not ready yet.
    let mut peeked: VecDeque<Queued> = VecDeque::with_capacity(1);
    loop {
        let head = match peeked.pop_front() {
            Some(queued) => queued,
            None => match rx.recv().await {
                Some(queued) => queued,
                None => break,
            },
        };
        let mut batch = Batch::default();
        batch.encode(head.slot.wait().await, head.units, &mut out);
        unanswered.fetch_sub(1, Ordering::AcqRel);
        while out.len() < WRITE_BATCH {
            let next = match peeked.pop_front() {
                Some(queued) => queued,
                None => match rx.try_recv() {
                    Ok(queued) => queued,
                    Err(_) => break,
                },
            };
            match next.slot.try_take() {
                Ok(reply) => {
                    batch.encode(reply, next.units, &mut out);
                    unanswered.fetch_sub(1, Ordering::AcqRel);
                }
                Err(slot) => {
                    peeked.push_back(Queued {
                        slot,
                        units: next.units,
                    });
                    break;
                }
            }
        }
        window.encoded(batch.unit_bytes_max);
        if writer.write_all(&out).await.is_err() || writer.flush().await.is_err() {
            return;
        }
        window.written(batch.units);
        out.clear();
        // One large reply must not pin its buffer for the connection's life.
        if out.capacity() > 4 * WRITE_BATCH {
            out = Vec::with_capacity(16 * 1024);
        }
    }
    let _ = writer.shutdown().await;
}

/// What one write of the writer holds, for the [`ReplyWindow`].
#[derive(Default)]
struct Batch {
    units: usize,
    /// The largest reply's bytes per unit.
    unit_bytes_max: usize,
}

impl Batch {
    fn encode(&mut self, reply: Reply, units: usize, out: &mut Vec<u8>) {
        let start = out.len();
        reply.encode(out);
        self.units += units;
        self.unit_bytes_max = self.unit_bytes_max.max((out.len() - start) / units.max(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::handle::Event;
    use crate::runtime::NodeInfo;
    use dynamo_proto::{Actor, ClientReply, ClientRequest, Context, Dot, GetReply, Hlc, Sibling};
    use std::net::SocketAddr;
    use std::sync::Mutex;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;

    /// A fake core over a map: keys starting with `slow` answer after 150 ms.
    struct Fake {
        addr: SocketAddr,
        requests: Arc<Mutex<Vec<ClientRequest>>>,
        stop: Option<oneshot::Sender<()>>,
        server: tokio::task::JoinHandle<std::io::Result<()>>,
    }

    fn sibling(value: Option<&[u8]>, wall_ms: u64, actor: u64) -> (Dot, Sibling) {
        (
            Dot {
                actor: Actor {
                    incarnation: actor,
                    epoch: 1,
                },
                counter: 1,
            },
            Sibling {
                value: value.map(|v| v.to_vec()),
                timestamp: Hlc {
                    wall_ms,
                    logical: 0,
                },
            },
        )
    }

    async fn fake() -> Fake {
        let (events, mut rx) = mpsc::unbounded_channel::<Event>();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let store: Arc<Mutex<BTreeMap<Vec<u8>, Vec<u8>>>> = Arc::default();
        let recorded = requests.clone();
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                let Event::Client { request, reply, .. } = event else {
                    panic!("a front end sent a non-client event");
                };
                recorded.lock().unwrap().push(request.clone());
                let store = store.clone();
                tokio::spawn(async move {
                    let key = match &request {
                        ClientRequest::Get { key, .. } | ClientRequest::Put { key, .. } => {
                            key.clone()
                        }
                        _ => Vec::new(),
                    };
                    if key.starts_with(b"slow") {
                        tokio::time::sleep(Duration::from_millis(150)).await;
                    }
                    let answer = match request {
                        ClientRequest::Get { key, .. } => {
                            let value = store.lock().unwrap().get(&key).cloned();
                            ClientReply::Get(GetReply {
                                siblings: value.iter().map(|v| sibling(Some(v), 1, 1)).collect(),
                                context: Context::default(),
                            })
                        }
                        ClientRequest::Put { key, value, .. } => {
                            match value {
                                Some(v) => store.lock().unwrap().insert(key, v),
                                None => store.lock().unwrap().remove(&key),
                            };
                            ClientReply::Put {
                                dot: sibling(None, 1, 1).0,
                                sloppy: false,
                                context: Context::default(),
                            }
                        }
                        _ => ClientReply::Error(dynamo_proto::ClientError::Unavailable(
                            "not in the fake".into(),
                        )),
                    };
                    reply.send(answer);
                });
            }
        });
        let handle = CoreHandle::for_tests(
            events,
            NodeInfo {
                node_id: "n1".into(),
                max_key_bytes: 64,
                max_value_bytes: 1024,
                max_frame_bytes: 1 << 20,
            },
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, handle, async {
            let _ = stopped.await;
        }));
        Fake {
            addr,
            requests,
            stop: Some(stop),
            server,
        }
    }

    /// Sends `input` in one write and reads `count` replies.
    async fn exchange(stream: &mut TcpStream, input: &[u8], count: usize) -> Vec<Reply> {
        stream.write_all(input).await.unwrap();
        let mut buf = Vec::new();
        let mut out = Vec::new();
        let mut chunk = [0u8; 4096];
        while out.len() < count {
            while let Some((reply, used)) = Reply::decode(&buf).unwrap() {
                buf.drain(..used);
                out.push(reply);
            }
            if out.len() == count {
                break;
            }
            let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
                .await
                .expect("a reply within 10 s")
                .unwrap();
            assert!(
                n > 0,
                "closed after {} of {count} replies: {out:?}",
                out.len()
            );
            buf.extend_from_slice(&chunk[..n]);
        }
        assert!(buf.is_empty(), "extra bytes: {buf:?}");
        out
    }

    fn cmd(args: &[&str]) -> Vec<u8> {
        let mut out = Vec::new();
        parse::encode_command(args, &mut out);
        out
    }

    fn bulk(s: &str) -> Reply {
        Reply::bulk(s)
    }

    #[tokio::test]
    async fn replies_come_back_in_request_order() {
        let f = fake().await;
        let mut s = TcpStream::connect(f.addr).await.unwrap();
        let mut input = cmd(&["SET", "slowkey", "a"]);
        input.extend(cmd(&["SET", "fast", "b"]));
        input.extend(b"PING\r\n");
        input.extend(cmd(&["GET", "fast"]));
        input.extend(cmd(&["GET", "slowkey"]));
        input.extend(cmd(&["ECHO", "done"]));
        let replies = exchange(&mut s, &input, 6).await;
        assert_eq!(
            replies,
            vec![
                Reply::ok(),
                Reply::ok(),
                Reply::Simple("PONG".into()),
                bulk("b"),
                // Ran after the slow SET on the same key, though it was slow too.
                bulk("a"),
                bulk("done"),
            ]
        );
        // The fast SET reached the core before the slow one had answered.
        let order: Vec<ClientRequest> = f.requests.lock().unwrap().clone();
        assert!(matches!(&order[1], ClientRequest::Put { key, .. } if key == b"fast"));
    }

    #[tokio::test]
    async fn commands_on_one_key_run_in_order_whichever_path_they_take() {
        let f = fake().await;
        let mut s = TcpStream::connect(f.addr).await.unwrap();
        // Each "slow" request takes 150 ms in the fake core. The head of each
        // pipeline goes straight to the core (nothing is outstanding); the
        // commands behind it on the same key run as tasks and must wait for
        // it, so each chain takes its requests' time one after the other,
        // where running them concurrently would take about 150 ms.
        struct Chain {
            commands: Vec<&'static [&'static str]>,
            expected: Vec<Reply>,
            at_least_ms: u64,
        }
        let chains = [
            // GET, then SET and GET behind it: the last GET sees the SET.
            Chain {
                commands: vec![&["GET", "slow1"], &["SET", "slow1", "x"], &["GET", "slow1"]],
                expected: vec![Reply::Nil, Reply::ok(), bulk("x")],
                at_least_ms: 450,
            },
            // SET, then DEL (a read and a write) and GET behind it.
            Chain {
                commands: vec![&["SET", "slow2", "y"], &["DEL", "slow2"], &["GET", "slow2"]],
                expected: vec![Reply::ok(), Reply::Integer(1), Reply::Nil],
                at_least_ms: 600,
            },
        ];
        for Chain {
            commands,
            expected,
            at_least_ms,
        } in chains
        {
            let input: Vec<u8> = commands.iter().flat_map(|c| cmd(c)).collect();
            let started = std::time::Instant::now();
            let replies = exchange(&mut s, &input, commands.len()).await;
            let elapsed = started.elapsed();
            assert_eq!(replies, expected, "{commands:?}");
            assert!(
                elapsed >= Duration::from_millis(at_least_ms),
                "{commands:?} ran concurrently: {elapsed:?}"
            );
        }
        let order: Vec<String> = f
            .requests
            .lock()
            .unwrap()
            .iter()
            .map(|r| match r {
                ClientRequest::Get { key, .. } => format!("get {}", String::from_utf8_lossy(key)),
                ClientRequest::Put { key, value, .. } => format!(
                    "put {} {}",
                    String::from_utf8_lossy(key),
                    value.as_deref().map_or("-".into(), String::from_utf8_lossy)
                ),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            order,
            [
                "get slow1",
                "put slow1 x",
                "get slow1",
                "put slow2 y",
                "get slow2",
                "put slow2 -",
                "get slow2"
            ],
        );
    }

    #[tokio::test]
    async fn set_overwrites_and_del_and_exists_count() {
        let f = fake().await;
        let mut s = TcpStream::connect(f.addr).await.unwrap();
        let mut input = cmd(&["MSET", "a", "1", "b", "2", "a", "3"]);
        input.extend(cmd(&["MGET", "a", "b", "c"]));
        input.extend(cmd(&["EXISTS", "a", "a", "c"]));
        input.extend(cmd(&["DEL", "a", "c", "a"]));
        input.extend(cmd(&["GET", "a"]));
        let replies = exchange(&mut s, &input, 5).await;
        assert_eq!(replies[0], Reply::ok());
        assert_eq!(
            replies[1],
            Reply::Array(vec![bulk("3"), bulk("2"), Reply::Nil])
        );
        assert_eq!(replies[2], Reply::Integer(2));
        assert_eq!(replies[3], Reply::Integer(1));
        assert_eq!(replies[4], Reply::Nil);
        let requests = f.requests.lock().unwrap().clone();
        assert!(requests.iter().any(|r| matches!(
            r,
            ClientRequest::Put {
                mode: dynamo_proto::WriteMode::Overwrite,
                context: None,
                ..
            }
        )));
        // DEL deletes what it read, with the read's context.
        assert!(requests.iter().any(|r| matches!(
            r,
            ClientRequest::Put {
                value: None,
                context: Some(_),
                mode: dynamo_proto::WriteMode::Context,
                ..
            }
        )));
    }

    #[tokio::test]
    async fn server_commands_answer_like_redis() {
        let f = fake().await;
        let mut s = TcpStream::connect(f.addr).await.unwrap();
        let mut input = cmd(&["SET", "k", "v", "EX", "10"]);
        input.extend(cmd(&["FLUSHALL", "ASYNC", "x"]));
        input.extend(cmd(&["HELLO", "3"]));
        input.extend(cmd(&["CONFIG", "GET", "save", "appendonly", "nosuch"]));
        input.extend(cmd(&["COMMAND", "DOCS"]));
        input.extend(cmd(&["SELECT", "1"]));
        input.extend(cmd(&["SELECT", "0"]));
        input.extend(cmd(&["CLIENT", "SETNAME", "bench"]));
        input.extend(cmd(&["CLIENT", "GETNAME"]));
        input.extend(cmd(&["get"]));
        input.extend(b"\r\n*0\r\n");
        input.extend(cmd(&["HELLO", "2"]));
        input.extend(cmd(&["INFO", "server"]));
        let r = exchange(&mut s, &input, 12).await;
        let err = |r: &Reply| match r {
            Reply::Error(e) => e.clone(),
            other => panic!("expected an error, got {other:?}"),
        };
        assert!(
            err(&r[0]).starts_with("ERR SET options are not supported"),
            "{:?}",
            r[0]
        );
        assert_eq!(
            err(&r[1]),
            "ERR unknown command 'FLUSHALL', with args beginning with: 'ASYNC' 'x' "
        );
        assert!(err(&r[2]).starts_with("NOPROTO"));
        assert_eq!(
            r[3],
            Reply::Array(vec![bulk("save"), bulk(""), bulk("appendonly"), bulk("no")])
        );
        assert_eq!(r[4], Reply::Array(vec![]));
        assert!(err(&r[5]).contains("out of range"));
        assert_eq!(r[6], Reply::ok());
        assert_eq!(r[7], Reply::ok());
        assert_eq!(r[8], bulk("bench"));
        assert_eq!(
            err(&r[9]),
            "ERR wrong number of arguments for 'get' command"
        );
        let Reply::Array(hello) = &r[10] else {
            panic!("{:?}", r[10])
        };
        assert_eq!(hello[5], Reply::Integer(2));
        let Reply::Bulk(info) = &r[11] else {
            panic!("{:?}", r[11])
        };
        let info = String::from_utf8_lossy(info);
        assert!(info.contains("redis_version:7.0.0-dynamo") && info.contains("dynamo_node:n1"));
    }

    #[tokio::test]
    async fn a_protocol_error_closes_after_the_earlier_replies() {
        let f = fake().await;
        let mut s = TcpStream::connect(f.addr).await.unwrap();
        let r = exchange(&mut s, b"PING\r\n*1\r\n+x\r\nPING\r\n", 2).await;
        assert_eq!(r[0], Reply::Simple("PONG".into()));
        assert_eq!(
            r[1],
            Reply::Error("ERR Protocol error: expected '$', got '+'".into())
        );
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 0, "nothing after the error, then EOF");
        // The listener still serves.
        let mut s = TcpStream::connect(f.addr).await.unwrap();
        assert_eq!(exchange(&mut s, b"QUIT\r\n", 1).await, vec![Reply::ok()]);
    }

    #[tokio::test]
    async fn shutdown_writes_pending_replies_then_closes() {
        let mut f = fake().await;
        let mut s = TcpStream::connect(f.addr).await.unwrap();
        s.write_all(&cmd(&["GET", "slowpoke"])).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        let _ = f.stop.take().unwrap().send(());
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(out, b"$-1\r\n");
        tokio::time::timeout(Duration::from_secs(5), &mut f.server)
            .await
            .expect("serve returns once connections are closed")
            .unwrap()
            .unwrap();
    }

    #[test]
    fn get_picks_the_same_winner_everywhere() {
        let read = |siblings: Vec<(Dot, Sibling)>| GetReply {
            siblings,
            context: Context::default(),
        };
        let a = sibling(Some(b"a"), 5, 1);
        let b = sibling(Some(b"b"), 7, 1);
        let c = sibling(Some(b"c"), 7, 2);
        let t = sibling(None, 9, 1);
        assert_eq!(
            commands::visible(&read(vec![a.clone(), b.clone()])),
            Some(&b"b"[..])
        );
        // A timestamp tie goes to the greater actor, in any order.
        assert_eq!(
            commands::visible(&read(vec![c.clone(), b.clone()])),
            Some(&b"c"[..])
        );
        assert_eq!(
            commands::visible(&read(vec![b.clone(), c.clone()])),
            Some(&b"c"[..])
        );
        // Taking the value out picks the same one.
        assert_eq!(
            commands::into_visible(read(vec![b.clone(), c.clone()])),
            Some(b"c".to_vec())
        );
        assert_eq!(
            commands::into_visible(read(vec![a.clone(), b.clone()])),
            Some(b"b".to_vec())
        );
        // A winning tombstone reads as nil; so does nothing.
        assert_eq!(
            commands::into_visible(read(vec![a.clone(), t.clone()])),
            None
        );
        assert_eq!(commands::visible(&read(vec![a, t])), None);
        assert_eq!(commands::visible(&read(vec![])), None);
    }

    #[test]
    fn a_storage_fault_answers_err_and_a_missed_quorum_tryagain() {
        use dynamo_proto::ClientError;
        // A get that failed on unreadable copies will fail again: `-ERR` with
        // the core's message, which names the primaries and their errors.
        let fault = "get could not reach its read quorum (1 of 2 needed replicas replied, of \
                     3): n2: storage read failed: stored value of key \"k\" is corrupt";
        assert_eq!(
            commands::core_error(ClientError::Internal(fault.into())),
            Reply::Error(format!("ERR internal error: {fault}"))
        );
        let quorum = ClientError::Quorum {
            op: "get".into(),
            write: false,
            needed: 2,
            replied: 1,
            n: 3,
        };
        let Reply::Error(text) = commands::core_error(quorum) else {
            panic!("not an error reply");
        };
        assert!(text.starts_with("TRYAGAIN get quorum not met"), "{text}");
    }
}
