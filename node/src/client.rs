//! The client side of the binary client protocol: one TCP [`Connection`], and a
//! ring-aware [`Client`] that routes each key to one of its primaries (the paper's
//! client-driven coordination) over a small pool of reused connections.
//!
//! Each request is one frame carrying a [`ClientEnvelope`]; each reply is a frame
//! carrying the [`ClientReplyEnvelope`] with the same id. A [`Connection`] sends
//! one request at a time and skips replies to other ids, so it tolerates a server
//! that answers out of order.
//!
//! Routing: [`Client::connect`] asks the seeds for [`ClusterInfo`], builds the
//! [`Ring`] and sends a key's requests to its first primary, then the next
//! primaries, then any member. When no node gives ring information it falls back
//! to the seed's way: ping every seed at once and prefer the fastest.
//!
//! A put is sent to another node only when the first never received it (the
//! connection could not be opened): once sent, a put may have been applied, and a
//! retry would add a second sibling with the same value. Such a failure is
//! reported as indeterminate, as the server reports a failed quorum.
//!
//! This module uses only `tokio::net`, `tokio::time`, `tokio::spawn` and
//! `tokio::io`, which madsim replaces, so the simulator reuses this very client.
//! It never reads the OS clock directly and never iterates a hash-ordered map.

use crate::gather::gather;
use crate::read_buf::ReadBuf;
use dynamo_core::ring::Ring;
use dynamo_proto::frame::DEFAULT_MAX_PAYLOAD;
use dynamo_proto::{
    ClientEnvelope, ClientError, ClientReply, ClientReplyEnvelope, ClientRequest, ClusterInfo,
    Context, Dot, DvvSet, FrameCodec, FrameError, GetReply, NodeId, WriteMode,
};
use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::Poll;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// How long to wait for a TCP connection unless told otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_millis(1_000);
/// How long to wait for a reply unless told otherwise. Longer than the server's
/// default quorum timeout (2 s), so the server's own quorum error arrives first.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_millis(5_000);
/// Idle connections kept per address.
pub const DEFAULT_MAX_IDLE_PER_ADDR: usize = 4;
/// First delay before reconnecting to an address that failed; doubles per failure.
const BACKOFF_BASE: Duration = Duration::from_millis(50);
/// Longest delay before reconnecting to an address that keeps failing.
const BACKOFF_MAX: Duration = Duration::from_millis(2_000);
/// Connection attempts for a request aimed at one given address.
const DIRECT_ATTEMPTS: u32 = 3;
/// How long a connection attempt to one candidate runs alone before the next
/// candidate's starts beside it. A host that is down or cut off answers
/// nothing (no refusal), and its name may not even resolve: without this each
/// such candidate would cost the whole connect timeout, one after another.
const CONNECT_STAGGER: Duration = Duration::from_millis(250);
/// A failure asks for fresh cluster information, at most this often.
const REFRESH_MIN_INTERVAL: Duration = Duration::from_millis(1_000);
/// Cluster information older than this is refreshed before routing.
const REFRESH_MAX_AGE: Duration = Duration::from_secs(60);

/// A transport failure: the request got no reply from this address.
#[derive(Debug, thiserror::Error)]
pub enum ClientIoError {
    #[error("cannot connect to {addr}: {source} (is a dynamo node's client port there? see --client-addr)")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("connecting to {addr} timed out after {ms} ms")]
    ConnectTimeout { addr: String, ms: u64 },
    #[error("{addr} did not answer within {ms} ms")]
    Timeout { addr: String, ms: u64 },
    /// Writing the request failed: no whole frame reached the server, so the
    /// request was not applied.
    #[error("sending to {addr} failed: {source}")]
    Send {
        addr: String,
        source: std::io::Error,
    },
    #[error("connection to {addr} failed: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
    #[error("{addr} closed the connection before answering")]
    Closed { addr: String },
    #[error("{addr} sent a bad frame: {source}")]
    Frame { addr: String, source: FrameError },
    #[error("cannot send the request: {0}")]
    Encode(FrameError),
}

impl ClientIoError {
    /// True when the request certainly never reached the server, so sending it
    /// elsewhere cannot apply it twice.
    pub fn nothing_sent(&self) -> bool {
        matches!(
            self,
            ClientIoError::Connect { .. }
                | ClientIoError::ConnectTimeout { .. }
                | ClientIoError::Send { .. }
                | ClientIoError::Encode(_)
        )
    }

    /// True when another node (or a later attempt) might succeed.
    pub fn is_transient(&self) -> bool {
        !matches!(self, ClientIoError::Encode(_))
    }
}

/// Why a [`Client`] call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientCallError {
    /// No reply: the node could not be reached, timed out or broke the connection.
    #[error(transparent)]
    Io(#[from] ClientIoError),
    /// No node answered. `last` is the last node's failure.
    #[error("no node answered (tried {}): {last}", tried.join(", "))]
    Unreachable {
        tried: Vec<String>,
        last: ClientIoError,
    },
    /// The server answered with an error; its message says what to do.
    #[error("{error}")]
    Server { addr: String, error: ClientError },
    /// The server answered with a reply of the wrong kind (a protocol bug).
    #[error("{addr} answered a {request} request with an unexpected reply: {reply}")]
    UnexpectedReply {
        addr: String,
        request: &'static str,
        reply: String,
    },
    #[error("no node addresses given: pass at least one client address (host:port)")]
    NoSeeds,
}

impl ClientCallError {
    /// True for transport failures (connect, timeout, broken connection), false
    /// for an answer from a server.
    pub fn is_io(&self) -> bool {
        matches!(
            self,
            ClientCallError::Io(_) | ClientCallError::Unreachable { .. }
        )
    }

    /// The server's error, when a server answered with one.
    pub fn server_error(&self) -> Option<&ClientError> {
        match self {
            ClientCallError::Server { error, .. } => Some(error),
            _ => None,
        }
    }
}

fn request_name(request: &ClientRequest) -> &'static str {
    match request {
        ClientRequest::Get { .. } => "get",
        ClientRequest::Put { value: Some(_), .. } => "put",
        ClientRequest::Put { value: None, .. } => "delete",
        ClientRequest::LocalGet { .. } => "local get",
        ClientRequest::ClusterInfo => "cluster info",
        ClientRequest::Ping => "ping",
    }
}

/// Requests that change nothing, so a retry elsewhere is harmless.
fn is_idempotent(request: &ClientRequest) -> bool {
    !matches!(request, ClientRequest::Put { .. })
}

/// One TCP connection to a node's client port. Sequential: one request at a time.
pub struct Connection {
    addr: String,
    stream: TcpStream,
    codec: FrameCodec,
    read_buf: Vec<u8>,
    write_buf: Vec<u8>,
    next_id: u64,
    request_timeout: Duration,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("addr", &self.addr)
            .field("next_id", &self.next_id)
            .finish()
    }
}

impl Connection {
    /// Opens a connection, giving up after `timeout`. Replies may be up to the
    /// codec's default payload cap ([`DEFAULT_MAX_PAYLOAD`]); see
    /// [`Connection::with_max_frame`].
    pub async fn connect(addr: &str, timeout: Duration) -> Result<Connection, ClientIoError> {
        let stream = open_stream(addr, timeout).await?;
        Ok(Connection {
            addr: addr.to_string(),
            stream,
            codec: FrameCodec::default(),
            read_buf: Vec::new(),
            write_buf: Vec::new(),
            next_id: 1,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        })
    }

    /// Sets the largest frame payload sent or accepted.
    pub fn with_max_frame(mut self, max_payload: usize) -> Connection {
        self.codec = FrameCodec::new(max_payload);
        self
    }

    /// Sets how long [`Connection::call`] waits for a reply.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Connection {
        self.request_timeout = timeout;
        self
    }

    /// The address this connection was opened to, as given.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The largest frame payload this connection sends or accepts.
    pub fn max_frame(&self) -> usize {
        self.codec.max_payload
    }

    /// Sends one request and waits for its reply. After an error the connection
    /// is in an unknown state: drop it.
    pub async fn call(&mut self, request: ClientRequest) -> Result<ClientReply, ClientIoError> {
        let timeout = self.request_timeout;
        match tokio::time::timeout(timeout, self.call_inner(request)).await {
            Ok(result) => result,
            Err(_) => Err(ClientIoError::Timeout {
                addr: self.addr.clone(),
                ms: timeout.as_millis() as u64,
            }),
        }
    }

    async fn call_inner(&mut self, request: ClientRequest) -> Result<ClientReply, ClientIoError> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.write_buf.clear();
        self.codec
            .encode_into(&ClientEnvelope { id, request }, &mut self.write_buf)
            .map_err(ClientIoError::Encode)?;
        let io_err = |addr: &str, source| ClientIoError::Io {
            addr: addr.to_string(),
            source,
        };
        let send_err = |addr: &str, source| ClientIoError::Send {
            addr: addr.to_string(),
            source,
        };
        self.stream
            .write_all(&self.write_buf)
            .await
            .map_err(|e| send_err(&self.addr, e))?;
        // madsim's TcpStream sends nothing until flushed.
        self.stream
            .flush()
            .await
            .map_err(|e| send_err(&self.addr, e))?;
        loop {
            let decoded = self
                .codec
                .decode::<ClientReplyEnvelope>(&self.read_buf)
                .map_err(|source| ClientIoError::Frame {
                    addr: self.addr.clone(),
                    source,
                })?;
            if let Some((envelope, used)) = decoded {
                self.read_buf.drain(..used);
                if envelope.id == id {
                    return Ok(envelope.reply);
                }
                // A late reply to an earlier request: skip it.
                continue;
            }
            self.read_buf.reserve(64 * 1024);
            let n = self
                .stream
                .read_buf(&mut self.read_buf)
                .await
                .map_err(|e| io_err(&self.addr, e))?;
            if n == 0 {
                return Err(ClientIoError::Closed {
                    addr: self.addr.clone(),
                });
            }
        }
    }
}

/// Opens a TCP connection to `addr` within `timeout`, with Nagle off (requests
/// are small and latency matters more than packet count).
async fn open_stream(addr: &str, timeout: Duration) -> Result<TcpStream, ClientIoError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(source)) => {
            return Err(ClientIoError::Connect {
                addr: addr.to_string(),
                source,
            })
        }
        Err(_) => {
            return Err(ClientIoError::ConnectTimeout {
                addr: addr.to_string(),
                ms: timeout.as_millis() as u64,
            })
        }
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Requests written to a [`SharedConnection`] per write call at most.
const SHARED_WRITE_BATCH: usize = 256;

/// One TCP connection that many tasks use at once: requests are pipelined (the
/// writer sends whatever is queued in one write) and replies are matched to
/// their callers by id, in whatever order the server answers. Under load this
/// turns many small writes and reads into few large ones, on both ends, as
/// drivers for Cassandra's native protocol do with stream ids.
///
/// Cheap to clone; every clone is the same connection. Once the connection
/// breaks, every request waiting on it fails and later calls fail at once:
/// check [`SharedConnection::is_broken`] and open a new one.
#[derive(Clone)]
pub struct SharedConnection {
    addr: std::sync::Arc<str>,
    requests: tokio::sync::mpsc::UnboundedSender<ClientEnvelope>,
    state: std::sync::Arc<Mutex<SharedState>>,
    request_timeout: Duration,
}

type ReplySender = tokio::sync::oneshot::Sender<Result<ClientReply, ClientIoError>>;

#[derive(Default)]
struct SharedState {
    next_id: u64,
    waiting: BTreeMap<u64, ReplySender>,
    /// Why the connection broke, once it has.
    broken: Option<String>,
}

impl SharedState {
    /// Marks the connection broken and fails every waiting request.
    fn fail_all(&mut self, addr: &str, reason: String) {
        if self.broken.is_none() {
            self.broken = Some(reason.clone());
        }
        for (_, tx) in std::mem::take(&mut self.waiting) {
            let _ = tx.send(Err(ClientIoError::Io {
                addr: addr.to_string(),
                source: std::io::Error::other(reason.clone()),
            }));
        }
    }
}

impl std::fmt::Debug for SharedConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedConnection")
            .field("addr", &self.addr)
            .field("broken", &self.is_broken())
            .finish()
    }
}

impl SharedConnection {
    /// Opens the connection (giving up after `connect_timeout`) and starts its
    /// writer and reader tasks; they end when every clone is dropped or the
    /// connection breaks.
    pub async fn connect(
        addr: &str,
        connect_timeout: Duration,
        request_timeout: Duration,
    ) -> Result<SharedConnection, ClientIoError> {
        let stream = open_stream(addr, connect_timeout).await?;
        let (reader, writer) = tokio::io::split(stream);
        let (requests, queue) = tokio::sync::mpsc::unbounded_channel();
        let state = std::sync::Arc::new(Mutex::new(SharedState {
            next_id: 1,
            ..SharedState::default()
        }));
        let addr: std::sync::Arc<str> = addr.into();
        let codec = FrameCodec::default();
        tokio::spawn(shared_writer(
            writer,
            queue,
            codec,
            addr.clone(),
            state.clone(),
        ));
        tokio::spawn(shared_reader(reader, codec, addr.clone(), state.clone()));
        Ok(SharedConnection {
            addr,
            requests,
            state,
            request_timeout,
        })
    }

    /// The address this connection was opened to, as given.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// True once the connection has failed; every call fails from then on.
    pub fn is_broken(&self) -> bool {
        self.lock().broken.is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SharedState> {
        // A panic while holding the lock cannot leave the map inconsistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends one request and waits for its reply (or the request timeout).
    /// A timeout breaks the connection: a server that answers nothing for
    /// that long may be stuck or cut off, and the caller should go elsewhere.
    pub async fn call(&self, request: ClientRequest) -> Result<ClientReply, ClientIoError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let id = {
            let mut state = self.lock();
            if let Some(reason) = &state.broken {
                // Nothing was written for this request.
                return Err(ClientIoError::Send {
                    addr: self.addr.to_string(),
                    source: std::io::Error::other(reason.clone()),
                });
            }
            let id = state.next_id;
            state.next_id += 1;
            state.waiting.insert(id, tx);
            id
        };
        // If this call is dropped before its reply, its waiter goes too.
        let _forget = ForgetOnDrop { conn: self, id };
        if self.requests.send(ClientEnvelope { id, request }).is_err() {
            return Err(ClientIoError::Closed {
                addr: self.addr.to_string(),
            });
        }
        match tokio::time::timeout(self.request_timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ClientIoError::Closed {
                addr: self.addr.to_string(),
            }),
            Err(_) => {
                let ms = self.request_timeout.as_millis() as u64;
                self.lock()
                    .fail_all(&self.addr, format!("a request got no reply within {ms} ms"));
                Err(ClientIoError::Timeout {
                    addr: self.addr.to_string(),
                    ms,
                })
            }
        }
    }
}

/// Removes a call's waiter when the call ends, however it ends.
struct ForgetOnDrop<'a> {
    conn: &'a SharedConnection,
    id: u64,
}

impl Drop for ForgetOnDrop<'_> {
    fn drop(&mut self) {
        self.conn.lock().waiting.remove(&self.id);
    }
}

async fn shared_writer<W: tokio::io::AsyncWrite + Unpin>(
    mut writer: W,
    mut queue: tokio::sync::mpsc::UnboundedReceiver<ClientEnvelope>,
    codec: FrameCodec,
    addr: std::sync::Arc<str>,
    state: std::sync::Arc<Mutex<SharedState>>,
) {
    let mut buf = Vec::with_capacity(16 * 1024);
    while let Some(first) = queue.recv().await {
        buf.clear();
        gather(first, &mut queue, SHARED_WRITE_BATCH, |envelope| {
            if let Err(e) = codec.encode_into(&envelope, &mut buf) {
                // Only this request fails; nothing of it was written.
                let waiter = state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .waiting
                    .remove(&envelope.id);
                if let Some(tx) = waiter {
                    let _ = tx.send(Err(ClientIoError::Encode(e)));
                }
            }
        })
        .await;
        if buf.is_empty() {
            continue;
        }
        let written = match writer.write_all(&buf).await {
            Ok(()) => writer.flush().await,
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            // Some of the batch may have reached the server: the waiting
            // requests' outcome is unknown.
            state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .fail_all(&addr, format!("writing failed: {e}"));
            return;
        }
    }
    let _ = writer.shutdown().await;
}

async fn shared_reader<R: tokio::io::AsyncRead + Unpin>(
    mut reader: R,
    codec: FrameCodec,
    addr: std::sync::Arc<str>,
    state: std::sync::Arc<Mutex<SharedState>>,
) {
    let mut buf = ReadBuf::default();
    let reason = loop {
        let mut failed = None;
        loop {
            match codec.decode::<ClientReplyEnvelope>(buf.unread()) {
                Ok(Some((envelope, used))) => {
                    buf.consume(used);
                    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
                    match st.waiting.remove(&envelope.id) {
                        Some(tx) => {
                            drop(st);
                            let _ = tx.send(Ok(envelope.reply));
                        }
                        // Id 0 is the server's "your frame was malformed"; it
                        // closes the connection next.
                        None if envelope.id == 0 => {
                            failed =
                                Some(format!("the server refused a frame: {:?}", envelope.reply));
                            break;
                        }
                        // A reply its caller stopped waiting for (timed out).
                        None => {}
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    failed = Some(format!("bad frame from the server: {e}"));
                    break;
                }
            }
        }
        if let Some(reason) = failed {
            break reason;
        }
        match buf.fill(&mut reader).await {
            Ok(0) => break "the server closed the connection".to_string(),
            Ok(_) => {}
            Err(e) => break format!("reading failed: {e}"),
        }
    };
    state
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .fail_all(&addr, reason);
}

/// Tunables of a [`Client`].
#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// Largest frame payload sent or accepted.
    pub max_frame: usize,
    /// Idle connections kept open per address.
    pub max_idle_per_addr: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_frame: DEFAULT_MAX_PAYLOAD,
            max_idle_per_addr: DEFAULT_MAX_IDLE_PER_ADDR,
        }
    }
}

/// Routing by the ring: which client addresses to try for a key, in order.
#[derive(Clone, Debug)]
pub struct RingRoute {
    info: ClusterInfo,
    ring: Ring,
}

impl RingRoute {
    /// `None` when the cluster information carries no usable ring.
    pub fn new(info: ClusterInfo) -> Option<RingRoute> {
        let ring = Ring::from_parts(info.ring_version, info.ring_owners.clone()).ok()?;
        Some(RingRoute { info, ring })
    }

    pub fn info(&self) -> &ClusterInfo {
        &self.info
    }

    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// The client address of a member, if it has one.
    pub fn client_addr(&self, node: &NodeId) -> Option<&str> {
        self.info
            .members
            .iter()
            .find(|m| &m.id == node && !m.client_addr.is_empty())
            .map(|m| m.client_addr.as_str())
    }

    /// The key's primaries, in preference-list order.
    pub fn primaries(&self, key: &[u8]) -> Vec<NodeId> {
        let partition = self.ring.partition_for_key(key);
        self.ring.primaries(partition, self.info.n.max(1) as usize)
    }

    /// Client addresses to try for `key`: the primaries in preference-list order
    /// (those the answering node sees as up before the others), then every
    /// other member in the order the cluster listed them.
    pub fn candidates(&self, key: &[u8]) -> Vec<String> {
        let primaries = self.primaries(key);
        let is_up = |node: &NodeId| {
            self.info
                .members
                .iter()
                .any(|m| &m.id == node && m.status == "up")
        };
        let mut out: Vec<String> = Vec::new();
        let push = |addr: &str, out: &mut Vec<String>| {
            if !out.iter().any(|a| a == addr) {
                out.push(addr.to_string());
            }
        };
        for up in [true, false] {
            for node in primaries.iter().filter(|n| is_up(n) == up) {
                if let Some(addr) = self.client_addr(node) {
                    push(addr, &mut out);
                }
            }
        }
        for member in &self.info.members {
            if !member.client_addr.is_empty() {
                push(&member.client_addr, &mut out);
            }
        }
        out
    }

    /// Every member's client address, in listed order.
    pub fn all_addrs(&self) -> Vec<String> {
        self.info
            .members
            .iter()
            .filter(|m| !m.client_addr.is_empty())
            .map(|m| m.client_addr.clone())
            .collect()
    }
}

/// How a [`Client`] currently picks nodes.
#[derive(Clone, Debug)]
enum Routing {
    Ring(RingRoute),
    /// No ring information: addresses that answered a ping, fastest first.
    Fastest(Vec<String>),
}

/// Recent failures of one address, for reconnect backoff.
#[derive(Clone, Copy, Debug)]
struct AddrHealth {
    failures: u32,
    retry_after: Instant,
}

struct State {
    routing: Routing,
    routed_at: Instant,
    refresh_wanted: bool,
    pool: BTreeMap<String, Vec<Connection>>,
    health: BTreeMap<String, AddrHealth>,
}

/// A cluster client: routes by ring, pools connections, fails over.
///
/// Methods take `&self`; share one client between tasks with an `Arc`. Each
/// call takes a connection from the pool (or opens one) and returns it after.
pub struct Client {
    seeds: Vec<String>,
    options: ClientOptions,
    state: Mutex<State>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("seeds", &self.seeds)
            .finish()
    }
}

/// What ping-all found for one address.
struct PingResult {
    addr: String,
    outcome: Result<(Duration, Connection), ClientIoError>,
}

impl Client {
    /// Connects with default options; see [`Client::connect_with`].
    pub async fn connect(seeds: &[String]) -> Result<Client, ClientCallError> {
        Client::connect_with(seeds, ClientOptions::default()).await
    }

    /// Asks the seeds, in order, for the cluster's ring; the first that answers
    /// wins. When none gives ring information, pings every seed at once and
    /// prefers the fastest. Fails only when no seed answers at all.
    pub async fn connect_with(
        seeds: &[String],
        options: ClientOptions,
    ) -> Result<Client, ClientCallError> {
        let seeds: Vec<String> = seeds
            .iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if seeds.is_empty() {
            return Err(ClientCallError::NoSeeds);
        }
        let client = Client {
            seeds: seeds.clone(),
            options,
            state: Mutex::new(State {
                routing: Routing::Fastest(seeds),
                routed_at: Instant::now(),
                refresh_wanted: false,
                pool: BTreeMap::new(),
                health: BTreeMap::new(),
            }),
        };
        client.refresh_routing().await?;
        Ok(client)
    }

    pub fn seeds(&self) -> &[String] {
        &self.seeds
    }

    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    /// The cluster information the routing uses, when it has any.
    pub fn cached_cluster_info(&self) -> Option<ClusterInfo> {
        match &self.lock().routing {
            Routing::Ring(route) => Some(route.info.clone()),
            Routing::Fastest(_) => None,
        }
    }

    /// True when requests are routed by ring (false: fastest-pinged fallback).
    pub fn routes_by_ring(&self) -> bool {
        matches!(self.lock().routing, Routing::Ring(_))
    }

    /// The addresses a request for `key` would try, in order.
    pub fn candidates_for(&self, key: &[u8]) -> Vec<String> {
        let state = self.lock();
        let mut out = match &state.routing {
            Routing::Ring(route) => route.candidates(key),
            Routing::Fastest(addrs) => addrs.clone(),
        };
        for seed in &self.seeds {
            if !out.contains(seed) {
                out.push(seed.clone());
            }
        }
        // Addresses that failed recently go last, keeping their relative order.
        let now = Instant::now();
        let backing_off = |a: &String| state.health.get(a).is_some_and(|h| h.retry_after > now);
        let (mut fresh, late): (Vec<String>, Vec<String>) =
            out.into_iter().partition(|a| !backing_off(a));
        fresh.extend(late);
        fresh
    }

    /// Reads `key` with read quorum `r` (the cluster's default when `None`).
    pub async fn get(&self, key: &[u8], r: Option<u8>) -> Result<GetReply, ClientCallError> {
        let request = ClientRequest::Get {
            key: key.to_vec(),
            r,
        };
        match self.call_for_key(key, request).await? {
            (_, ClientReply::Get(reply)) => Ok(reply),
            (addr, other) => Err(unexpected(addr, "get", other)),
        }
    }

    /// Writes `value` (a delete when `None`) superseding what `context` covers,
    /// with write quorum `w` (the cluster's default when `None`). Returns the new
    /// write's dot and its context.
    pub async fn put(
        &self,
        key: &[u8],
        value: Option<Vec<u8>>,
        context: Option<Context>,
        w: Option<u8>,
    ) -> Result<(Dot, Context), ClientCallError> {
        self.put_with_mode(key, value, context, w, WriteMode::Context)
            .await
    }

    /// [`Client::put`] with an explicit [`WriteMode`].
    pub async fn put_with_mode(
        &self,
        key: &[u8],
        value: Option<Vec<u8>>,
        context: Option<Context>,
        w: Option<u8>,
        mode: WriteMode,
    ) -> Result<(Dot, Context), ClientCallError> {
        let name = if value.is_some() { "put" } else { "delete" };
        let request = ClientRequest::Put {
            key: key.to_vec(),
            value,
            context,
            w,
            mode,
        };
        match self.call_for_key(key, request).await? {
            (_, ClientReply::Put { dot, context, .. }) => Ok((dot, context)),
            (addr, other) => Err(unexpected(addr, name, other)),
        }
    }

    /// Deletes `key`: a tombstone superseding what `context` covers.
    pub async fn delete(
        &self,
        key: &[u8],
        context: Option<Context>,
        w: Option<u8>,
    ) -> Result<(Dot, Context), ClientCallError> {
        self.put(key, None, context, w).await
    }

    /// What the node at `addr` alone stores for `key` (no quorum; diagnostics).
    pub async fn local_get(
        &self,
        addr: &str,
        key: &[u8],
    ) -> Result<Option<DvvSet>, ClientCallError> {
        let request = ClientRequest::LocalGet { key: key.to_vec() };
        match self.call_addr(addr, request).await? {
            ClientReply::LocalGet(set) => Ok(set),
            other => Err(unexpected(addr.to_string(), "local get", other)),
        }
    }

    /// Fresh cluster information from the first node that answers; the routing
    /// adopts it.
    pub async fn cluster_info(&self) -> Result<ClusterInfo, ClientCallError> {
        let (addr, reply) = self
            .call_any(&self.info_candidates(), ClientRequest::ClusterInfo)
            .await?;
        match reply {
            ClientReply::ClusterInfo(info) => {
                self.adopt(info.clone());
                Ok(info)
            }
            other => Err(unexpected(addr, "cluster info", other)),
        }
    }

    /// Pings the node at `addr`: its id and the round-trip time.
    pub async fn ping(&self, addr: &str) -> Result<(NodeId, Duration), ClientCallError> {
        let start = Instant::now();
        match self.call_addr(addr, ClientRequest::Ping).await? {
            ClientReply::Pong { node } => Ok((node, start.elapsed())),
            other => Err(unexpected(addr.to_string(), "ping", other)),
        }
    }

    /// Sends a request about `key` to its best candidate, failing over as the
    /// module documentation describes. Returns the address that answered.
    pub async fn call_for_key(
        &self,
        key: &[u8],
        request: ClientRequest,
    ) -> Result<(String, ClientReply), ClientCallError> {
        self.maybe_refresh().await;
        let candidates = self.candidates_for(key);
        self.call_any(&candidates, request).await
    }

    /// Sends `request` to `addr` only, reconnecting with backoff when the
    /// connection cannot be opened.
    pub async fn call_addr(
        &self,
        addr: &str,
        request: ClientRequest,
    ) -> Result<ClientReply, ClientCallError> {
        let name = request_name(&request);
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.call_once(addr, request.clone()).await {
                Ok(ClientReply::Error(error)) => {
                    return Err(ClientCallError::Server {
                        addr: addr.to_string(),
                        error,
                    })
                }
                Ok(reply) => return Ok(reply),
                Err(e) => {
                    let retry = attempt < DIRECT_ATTEMPTS
                        && e.is_transient()
                        && (e.nothing_sent() || is_idempotent(&request));
                    if !retry {
                        tracing::debug!(addr, request = name, error = %e, "request failed");
                        return Err(e.into());
                    }
                    tokio::time::sleep(backoff_delay(attempt)).await;
                }
            }
        }
    }

    /// Tries `candidates` in order until one answers. Server errors are final
    /// (except `Unavailable` for requests that change nothing); transport
    /// failures move on to the next candidate unless the request was a put that
    /// may have been received.
    async fn call_any(
        &self,
        candidates: &[String],
        request: ClientRequest,
    ) -> Result<(String, ClientReply), ClientCallError> {
        let name = request_name(&request);
        let mut tried = Vec::new();
        let mut last_io: Option<ClientIoError> = None;
        let mut last_unavailable: Option<ClientCallError> = None;
        let mut queue: VecDeque<String> = candidates.iter().cloned().collect();
        while let Some((addr, conn, reused)) = self
            .connect_first(&mut queue, &mut tried, &mut last_io)
            .await
        {
            let addr = &addr;
            tried.push(addr.clone());
            match self.call_on(addr, conn, reused, request.clone()).await {
                Ok(ClientReply::Error(error)) => {
                    let err = ClientCallError::Server {
                        addr: addr.clone(),
                        error,
                    };
                    if is_idempotent(&request)
                        && matches!(err.server_error(), Some(ClientError::Unavailable(_)))
                    {
                        last_unavailable = Some(err);
                        continue;
                    }
                    return Err(err);
                }
                Ok(reply) => return Ok((addr.clone(), reply)),
                Err(e) => {
                    tracing::debug!(addr = %addr, request = name, error = %e, "request failed");
                    self.lock().refresh_wanted = true;
                    if !e.is_transient() || !(e.nothing_sent() || is_idempotent(&request)) {
                        return Err(e.into());
                    }
                    last_io = Some(e);
                }
            }
        }
        if let Some(err) = last_unavailable {
            return Err(err);
        }
        match last_io {
            Some(last) if tried.len() == 1 => Err(ClientCallError::Io(last)),
            Some(last) => Err(ClientCallError::Unreachable { tried, last }),
            None => Err(ClientCallError::NoSeeds),
        }
    }

    /// One request on a pooled (or new) connection to `addr`. A pooled
    /// connection that turns out to be closed is replaced once, for requests that
    /// change nothing.
    async fn call_once(
        &self,
        addr: &str,
        request: ClientRequest,
    ) -> Result<ClientReply, ClientIoError> {
        let (conn, reused) = match self.take_pooled(addr) {
            Some(conn) => (conn, true),
            None => (self.open(addr).await?, false),
        };
        self.call_on(addr, conn, reused, request).await
    }

    /// A connection to the first of `queue`'s addresses that gives one: a
    /// pooled connection at once, otherwise connection attempts started
    /// [`CONNECT_STAGGER`] apart, the first to connect winning. An address
    /// whose attempt failed goes to `tried`, its error to `last_io`, and asks
    /// for fresh cluster information; those whose attempt was still running
    /// when another won go back to the queue's front, in order. `None` once
    /// every address has failed.
    async fn connect_first(
        &self,
        queue: &mut VecDeque<String>,
        tried: &mut Vec<String>,
        last_io: &mut Option<ClientIoError>,
    ) -> Option<(String, Connection, bool)> {
        type Attempt = Pin<Box<dyn Future<Output = Result<Connection, ClientIoError>> + Send>>;
        let mut running: Vec<(String, Attempt)> = Vec::new();
        let give_back = |queue: &mut VecDeque<String>, running: Vec<(String, Attempt)>| {
            for (addr, _) in running.into_iter().rev() {
                queue.push_front(addr);
            }
        };
        let mut start_next = true;
        loop {
            if start_next || running.is_empty() {
                let Some(addr) = queue.pop_front() else {
                    if running.is_empty() {
                        return None;
                    }
                    start_next = false;
                    continue;
                };
                if let Some(conn) = self.take_pooled(&addr) {
                    give_back(queue, running);
                    return Some((addr, conn, true));
                }
                let timeout = self.options.connect_timeout;
                let target = addr.clone();
                running.push((
                    addr,
                    Box::pin(async move { Connection::connect(&target, timeout).await }),
                ));
            }
            let first_done = std::future::poll_fn(|cx| {
                for (i, (_, attempt)) in running.iter_mut().enumerate() {
                    if let Poll::Ready(result) = attempt.as_mut().poll(cx) {
                        return Poll::Ready((i, result));
                    }
                }
                Poll::Pending
            });
            let more = !queue.is_empty();
            tokio::select! {
                // A finished attempt before the stagger timer (and the same
                // order every time: an unbiased select draws a random one).
                biased;
                (i, result) = first_done => {
                    let (addr, _) = running.remove(i);
                    match self.opened(&addr, result) {
                        Ok(conn) => {
                            give_back(queue, running);
                            return Some((addr, conn, false));
                        }
                        Err(e) => {
                            tracing::debug!(addr = %addr, error = %e, "connection failed");
                            self.lock().refresh_wanted = true;
                            tried.push(addr);
                            *last_io = Some(e);
                            start_next = false;
                        }
                    }
                }
                _ = tokio::time::sleep(CONNECT_STAGGER), if more => start_next = true,
            }
        }
    }

    /// One request on `conn`, a connection to `addr` (`reused`: taken from
    /// the pool). A pooled connection that turns out to be closed is replaced
    /// once, for requests that change nothing.
    async fn call_on(
        &self,
        addr: &str,
        mut conn: Connection,
        reused: bool,
        request: ClientRequest,
    ) -> Result<ClientReply, ClientIoError> {
        match conn.call(request.clone()).await {
            Ok(reply) => {
                self.give_back(conn);
                Ok(reply)
            }
            Err(e) if reused && is_idempotent(&request) && e.is_transient() => {
                // The server may have closed an idle connection; try a new one.
                drop(conn);
                let mut conn = self.open(addr).await?;
                let reply = conn.call(request).await;
                match reply {
                    Ok(reply) => {
                        self.give_back(conn);
                        Ok(reply)
                    }
                    Err(e) => {
                        self.note_failure(addr);
                        Err(e)
                    }
                }
            }
            Err(e) => {
                self.note_failure(addr);
                Err(e)
            }
        }
    }

    async fn open(&self, addr: &str) -> Result<Connection, ClientIoError> {
        let result = Connection::connect(addr, self.options.connect_timeout).await;
        self.opened(addr, result)
    }

    /// Takes note of a connection attempt's outcome and sets the connection up.
    fn opened(
        &self,
        addr: &str,
        result: Result<Connection, ClientIoError>,
    ) -> Result<Connection, ClientIoError> {
        match result {
            Ok(conn) => {
                self.lock().health.remove(addr);
                Ok(conn
                    .with_max_frame(self.options.max_frame)
                    .with_request_timeout(self.options.request_timeout))
            }
            Err(e) => {
                self.note_failure(addr);
                Err(e)
            }
        }
    }

    fn take_pooled(&self, addr: &str) -> Option<Connection> {
        self.lock().pool.get_mut(addr).and_then(|conns| conns.pop())
    }

    fn give_back(&self, conn: Connection) {
        let max = self.options.max_idle_per_addr;
        let mut state = self.lock();
        let idle = state.pool.entry(conn.addr.clone()).or_default();
        if idle.len() < max {
            idle.push(conn);
        }
    }

    fn note_failure(&self, addr: &str) {
        let mut state = self.lock();
        state.pool.remove(addr);
        let health = state.health.entry(addr.to_string()).or_insert(AddrHealth {
            failures: 0,
            retry_after: Instant::now(),
        });
        health.failures = health.failures.saturating_add(1);
        health.retry_after = Instant::now() + backoff_delay(health.failures);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where to ask for cluster information: known members, then the seeds.
    fn info_candidates(&self) -> Vec<String> {
        let mut out = match &self.lock().routing {
            Routing::Ring(route) => route.all_addrs(),
            Routing::Fastest(addrs) => addrs.clone(),
        };
        for seed in &self.seeds {
            if !out.contains(seed) {
                out.push(seed.clone());
            }
        }
        out
    }

    fn adopt(&self, info: ClusterInfo) -> bool {
        let Some(route) = RingRoute::new(info) else {
            return false;
        };
        let mut state = self.lock();
        state.routing = Routing::Ring(route);
        state.routed_at = Instant::now();
        state.refresh_wanted = false;
        true
    }

    /// Refreshes the routing after failures (at most once a second) or when it
    /// is old. A failed refresh keeps the routing it had.
    async fn maybe_refresh(&self) {
        let due = {
            let state = self.lock();
            let age = state.routed_at.elapsed();
            (state.refresh_wanted && age >= REFRESH_MIN_INTERVAL) || age >= REFRESH_MAX_AGE
        };
        if due {
            if let Err(e) = self.refresh_routing().await {
                tracing::debug!(error = %e, "could not refresh the cluster information");
                let mut state = self.lock();
                state.routed_at = Instant::now();
                state.refresh_wanted = false;
            }
        }
    }

    /// Asks for the ring; without one, pings every candidate at once.
    async fn refresh_routing(&self) -> Result<(), ClientCallError> {
        let candidates = self.info_candidates();
        let mut tried = Vec::new();
        let mut last_io = None;
        let mut queue: VecDeque<String> = candidates.iter().cloned().collect();
        while let Some((addr, conn, reused)) = self
            .connect_first(&mut queue, &mut tried, &mut last_io)
            .await
        {
            tried.push(addr.clone());
            let request = ClientRequest::ClusterInfo;
            match self.call_on(&addr, conn, reused, request).await {
                Ok(ClientReply::ClusterInfo(info)) => {
                    if self.adopt(info) {
                        return Ok(());
                    }
                    tracing::debug!(addr = %addr, "cluster information without a usable ring");
                }
                Ok(other) => {
                    tracing::debug!(addr = %addr, reply = ?other, "no cluster information")
                }
                Err(e) => {
                    tracing::debug!(addr = %addr, error = %e, "cluster information failed");
                    last_io = Some(e);
                }
            }
        }
        let fastest = self.ping_all(&candidates).await;
        if fastest.is_empty() {
            return Err(match last_io {
                Some(last) => ClientCallError::Unreachable { tried, last },
                None => ClientCallError::NoSeeds,
            });
        }
        let mut state = self.lock();
        state.routing = Routing::Fastest(fastest);
        state.routed_at = Instant::now();
        state.refresh_wanted = false;
        Ok(())
    }

    /// Pings every address concurrently; returns those that answered, fastest
    /// first, and pools their connections.
    async fn ping_all(&self, addrs: &[String]) -> Vec<String> {
        let mut tasks = Vec::new();
        for addr in addrs {
            let addr = addr.clone();
            let options = self.options.clone();
            tasks.push(tokio::spawn(async move {
                let start = Instant::now();
                let outcome = async {
                    let mut conn = Connection::connect(&addr, options.connect_timeout)
                        .await?
                        .with_max_frame(options.max_frame)
                        .with_request_timeout(options.connect_timeout);
                    match conn.call(ClientRequest::Ping).await? {
                        ClientReply::Pong { .. } => Ok((
                            start.elapsed(),
                            conn.with_request_timeout(options.request_timeout),
                        )),
                        _ => Err(ClientIoError::Closed { addr: addr.clone() }),
                    }
                }
                .await;
                PingResult { addr, outcome }
            }));
        }
        let mut answered: Vec<(Duration, usize, String)> = Vec::new();
        for (index, task) in tasks.into_iter().enumerate() {
            let Ok(result) = task.await else { continue };
            match result.outcome {
                Ok((rtt, conn)) => {
                    answered.push((rtt, index, result.addr));
                    self.give_back(conn);
                }
                Err(e) => {
                    tracing::debug!(addr = %result.addr, error = %e, "ping failed");
                    self.note_failure(&result.addr);
                }
            }
        }
        answered.sort();
        answered.into_iter().map(|(_, _, addr)| addr).collect()
    }
}

fn backoff_delay(failures: u32) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(10);
    (BACKOFF_BASE * factor).min(BACKOFF_MAX)
}

fn unexpected(addr: String, request: &'static str, reply: ClientReply) -> ClientCallError {
    match reply {
        ClientReply::Error(error) => ClientCallError::Server { addr, error },
        other => ClientCallError::UnexpectedReply {
            addr,
            request,
            reply: format!("{other:?}").chars().take(200).collect(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dynamo_proto::{ClusterId, MemberInfo};

    fn member(id: &str, client_addr: &str, status: &str) -> MemberInfo {
        MemberInfo {
            id: NodeId::new(id),
            peer_addr: String::new(),
            client_addr: client_addr.to_string(),
            http_addr: String::new(),
            status: status.to_string(),
            partitions: 0,
        }
    }

    fn info(members: Vec<MemberInfo>, owners: &[&str], n: u8) -> ClusterInfo {
        ClusterInfo {
            cluster_id: ClusterId("test".into()),
            node: members[0].id.clone(),
            members,
            ring_version: 1,
            ring_owners: owners.iter().map(|o| NodeId::new(*o)).collect(),
            n,
            r: 2,
            w: 2,
            q: owners.len() as u32,
        }
    }

    fn three() -> ClusterInfo {
        info(
            vec![
                member("a", "10.0.0.1:7100", "up"),
                member("b", "10.0.0.2:7100", "up"),
                member("c", "10.0.0.3:7100", "up"),
            ],
            &["a", "b", "c", "a", "b", "c", "a", "b"],
            2,
        )
    }

    #[test]
    fn routing_prefers_the_keys_primaries_in_order() {
        let route = RingRoute::new(three()).unwrap();
        for k in 0..50u32 {
            let key = format!("key-{k}");
            let primaries = route.primaries(key.as_bytes());
            assert_eq!(primaries.len(), 2);
            let addr_of = |n: &NodeId| route.client_addr(n).unwrap().to_string();
            let candidates = route.candidates(key.as_bytes());
            assert_eq!(candidates[0], addr_of(&primaries[0]), "{key}");
            assert_eq!(candidates[1], addr_of(&primaries[1]), "{key}");
            assert_eq!(candidates.len(), 3, "every member is a last resort");
            // The first primary owns the key's partition.
            let p = route.ring().partition_for_key(key.as_bytes());
            assert_eq!(&primaries[0], route.ring().owner(p));
        }
    }

    #[test]
    fn unreachable_primaries_go_after_up_ones() {
        let mut i = three();
        let route = RingRoute::new(i.clone()).unwrap();
        let key = b"some key";
        let primaries = route.primaries(key);
        for m in &mut i.members {
            if m.id == primaries[0] {
                m.status = "unreachable".into();
            }
        }
        let route = RingRoute::new(i).unwrap();
        let candidates = route.candidates(key);
        assert_eq!(candidates[0], route.client_addr(&primaries[1]).unwrap());
        assert_eq!(candidates[1], route.client_addr(&primaries[0]).unwrap());
    }

    #[test]
    fn no_ring_means_no_ring_route() {
        let mut i = three();
        i.ring_owners.clear();
        assert!(RingRoute::new(i.clone()).is_none());
        i.ring_owners = vec![NodeId::new("a"); 3];
        assert!(
            RingRoute::new(i).is_none(),
            "3 partitions is not a power of two"
        );
    }

    #[test]
    fn errors_keep_the_servers_message_and_classify() {
        let server = ClientCallError::Server {
            addr: "x:1".into(),
            error: ClientError::Quorum {
                op: "put".into(),
                write: true,
                needed: 2,
                replied: 1,
                n: 3,
            },
        };
        assert!(!server.is_io());
        assert!(server.to_string().contains("may still have been applied"));
        let io = ClientCallError::from(ClientIoError::Timeout {
            addr: "x:1".into(),
            ms: 5,
        });
        assert!(io.is_io());
        let refused = ClientIoError::Connect {
            addr: "x:1".into(),
            source: std::io::ErrorKind::ConnectionRefused.into(),
        };
        assert!(refused.nothing_sent() && refused.is_transient());
        assert!(!ClientIoError::Closed { addr: "x".into() }.nothing_sent());
        let unreachable = ClientCallError::Unreachable {
            tried: vec!["a:1".into(), "b:2".into()],
            last: refused,
        };
        assert!(unreachable.is_io());
        assert!(unreachable.to_string().contains("a:1, b:2"));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff_delay(1), BACKOFF_BASE);
        assert_eq!(backoff_delay(2), BACKOFF_BASE * 2);
        assert_eq!(backoff_delay(40), BACKOFF_MAX);
    }

    /// A fake node on a real loopback socket (the simulator has its own tests).
    #[cfg(not(madsim))]
    mod fake {
        use super::*;
        use tokio::net::TcpListener;

        /// Serves `info` for ClusterInfo (or an error when `None`), Pong for
        /// Ping, an empty get and a fixed put; a get of "fail" is a quorum error.
        pub async fn serve(listener: TcpListener, name: &'static str, info: Option<ClusterInfo>) {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let info = info.clone();
                tokio::spawn(async move {
                    let codec = FrameCodec::default();
                    let mut buf = Vec::new();
                    loop {
                        match codec.decode::<ClientEnvelope>(&buf) {
                            Ok(Some((env, used))) => {
                                buf.drain(..used);
                                let reply = match env.request {
                                    ClientRequest::Ping => ClientReply::Pong {
                                        node: NodeId::new(name),
                                    },
                                    ClientRequest::ClusterInfo => match &info {
                                        Some(i) => ClientReply::ClusterInfo(i.clone()),
                                        None => ClientReply::Error(ClientError::Unavailable(
                                            "no ring yet".into(),
                                        )),
                                    },
                                    ClientRequest::Get { key, .. } if key == b"fail" => {
                                        ClientReply::Error(ClientError::Quorum {
                                            op: "get".into(),
                                            write: false,
                                            needed: 2,
                                            replied: 1,
                                            n: 3,
                                        })
                                    }
                                    ClientRequest::Get { .. } => ClientReply::Get(GetReply {
                                        siblings: vec![],
                                        context: Context::default(),
                                    }),
                                    ClientRequest::Put { .. } => ClientReply::Put {
                                        dot: Dot {
                                            actor: dynamo_proto::Actor {
                                                incarnation: 1,
                                                epoch: 1,
                                            },
                                            counter: 1,
                                        },
                                        context: Context::default(),
                                        sloppy: false,
                                    },
                                    ClientRequest::LocalGet { .. } => ClientReply::LocalGet(None),
                                };
                                let out = codec
                                    .encode(&ClientReplyEnvelope { id: env.id, reply })
                                    .unwrap();
                                if stream.write_all(&out).await.is_err() {
                                    return;
                                }
                                let _ = stream.flush().await;
                            }
                            Ok(None) => {
                                buf.reserve(4096);
                                match stream.read_buf(&mut buf).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(_) => {}
                                }
                            }
                            Err(_) => return,
                        }
                    }
                });
            }
        }

        /// An address nothing listens on.
        pub async fn dead_addr() -> String {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap().to_string();
            drop(l);
            addr
        }

        #[tokio::test]
        async fn fails_over_from_a_dead_primary() {
            let live = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let live_addr = live.local_addr().unwrap().to_string();
            let dead = dead_addr().await;
            let i = info(
                vec![member("a", &dead, "up"), member("b", &live_addr, "up")],
                &["a", "b", "a", "b"],
                1,
            );
            tokio::spawn(serve(live, "b", Some(i.clone())));
            let client = Client::connect(&[dead.clone(), live_addr.clone()])
                .await
                .unwrap();
            assert!(client.routes_by_ring());
            let route = RingRoute::new(i).unwrap();
            let key = (0..100)
                .map(|k| format!("k{k}"))
                .find(|k| route.candidates(k.as_bytes())[0] == dead)
                .unwrap();
            assert_eq!(
                client.candidates_for(key.as_bytes())[0],
                live_addr,
                "dead goes last"
            );
            let reply = client.get(key.as_bytes(), None).await.unwrap();
            assert!(reply.siblings.is_empty());
            // A put whose connection was refused was never sent: it fails over too.
            client
                .put(key.as_bytes(), Some(b"v".to_vec()), None, Some(1))
                .await
                .unwrap();
            let err = client.get(b"fail", None).await.unwrap_err();
            assert!(err.server_error().is_some());
            assert!(err.to_string().contains("quorum not met"), "{err}");
            let (node, _) = client.ping(&live_addr).await.unwrap();
            assert_eq!(node, NodeId::new("b"));
            assert!(client.local_get(&live_addr, b"x").await.unwrap().is_none());
            let err = client.ping(&dead).await.unwrap_err();
            assert!(err.is_io(), "{err}");
        }

        #[tokio::test]
        async fn a_candidate_that_never_answers_costs_the_stagger_not_the_timeout() {
            // A listener whose accept queue is full drops new handshakes, as a
            // host that is down or cut off does: connecting neither succeeds
            // nor is refused.
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
            let silent = socket.listen(0).unwrap();
            let silent_addr = silent.local_addr().unwrap().to_string();
            let _fills_the_queue = std::net::TcpStream::connect(&silent_addr).unwrap();
            let live = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let live_addr = live.local_addr().unwrap().to_string();
            let ring = info(vec![member("b", &live_addr, "up")], &["b"; 4], 1);
            tokio::spawn(serve(live, "b", Some(ring)));
            // The silent seed comes first: asking for the ring moves past it too.
            let seeds = [silent_addr.clone(), live_addr.clone()];
            let with_connect_timeout = |connect_timeout| {
                let options = ClientOptions {
                    connect_timeout,
                    ..ClientOptions::default()
                };
                Client::connect_with(&seeds, options)
            };
            let started = Instant::now();
            let client = with_connect_timeout(Duration::from_secs(5)).await.unwrap();
            let took = started.elapsed();
            assert!(client.routes_by_ring());
            assert!(took < Duration::from_secs(2), "connecting took {took:?}");
            let get = ClientRequest::Get {
                key: b"k".to_vec(),
                r: Some(1),
            };
            let started = Instant::now();
            let candidates = [silent_addr.clone(), live_addr.clone()];
            let (addr, reply) = client.call_any(&candidates, get.clone()).await.unwrap();
            let took = started.elapsed();
            assert_eq!(addr, live_addr);
            assert!(matches!(reply, ClientReply::Get(_)), "{reply:?}");
            // Before the stagger, the silent candidate took the whole 5 s
            // connect timeout before the live one was tried.
            assert!(took < Duration::from_secs(2), "took {took:?}");
            // The silent candidate's attempt was abandoned, not failed: it is
            // not backed off, and asked alone it still gets its full timeout.
            assert!(!client.lock().health.contains_key(&silent_addr));
            let alone = with_connect_timeout(Duration::from_millis(300))
                .await
                .unwrap();
            let err = alone
                .call_any(std::slice::from_ref(&silent_addr), get)
                .await
                .unwrap_err();
            assert!(err.to_string().contains("timed out after 300 ms"), "{err}");
        }

        #[tokio::test]
        async fn without_a_ring_it_uses_the_fastest_pinged_node() {
            let live = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let live_addr = live.local_addr().unwrap().to_string();
            tokio::spawn(serve(live, "solo", None));
            let dead = dead_addr().await;
            let client = Client::connect(&[dead.clone(), live_addr.clone()])
                .await
                .unwrap();
            assert!(!client.routes_by_ring());
            assert_eq!(client.candidates_for(b"k")[0], live_addr);
            client.get(b"k", Some(1)).await.unwrap();
        }

        /// Reads whatever requests have arrived and answers them in reverse
        /// order, each get with its own key as the value; a get of "silent" is
        /// never answered and a get of "close" closes the connection.
        async fn serve_reversed(listener: TcpListener) {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let codec = FrameCodec::default();
            let mut buf = Vec::new();
            loop {
                buf.reserve(4096);
                match stream.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let mut batch = Vec::new();
                while let Ok(Some((env, used))) = codec.decode::<ClientEnvelope>(&buf) {
                    buf.drain(..used);
                    batch.push(env);
                }
                let mut out = Vec::new();
                for env in batch.into_iter().rev() {
                    let ClientRequest::Get { key, .. } = env.request else {
                        continue;
                    };
                    match key.as_slice() {
                        b"silent" => continue,
                        b"close" => return,
                        _ => {}
                    }
                    let sibling = dynamo_proto::Sibling {
                        value: Some(key),
                        timestamp: Default::default(),
                    };
                    let dot = Dot {
                        actor: dynamo_proto::Actor {
                            incarnation: 1,
                            epoch: 1,
                        },
                        counter: 1,
                    };
                    let reply = ClientReply::Get(GetReply {
                        siblings: vec![(dot, sibling)],
                        context: Context::default(),
                    });
                    codec
                        .encode_into(&ClientReplyEnvelope { id: env.id, reply }, &mut out)
                        .unwrap();
                }
                if stream.write_all(&out).await.is_err() {
                    return;
                }
            }
        }

        fn get(key: &str) -> ClientRequest {
            ClientRequest::Get {
                key: key.as_bytes().to_vec(),
                r: None,
            }
        }

        /// A [`SharedConnection`] to a fresh [`serve_reversed`] server.
        async fn reversed_connection(request_timeout: Duration) -> SharedConnection {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            tokio::spawn(serve_reversed(listener));
            SharedConnection::connect(&addr, Duration::from_secs(1), request_timeout)
                .await
                .unwrap()
        }

        #[tokio::test]
        async fn a_shared_connection_matches_out_of_order_replies_to_their_callers() {
            let conn = reversed_connection(Duration::from_millis(300)).await;
            let calls: Vec<_> = (0..40)
                .map(|i| {
                    let conn = conn.clone();
                    tokio::spawn(async move { (i, conn.call(get(&format!("k{i}"))).await) })
                })
                .collect();
            for call in calls {
                let (i, reply) = call.await.unwrap();
                let Ok(ClientReply::Get(read)) = reply else {
                    panic!("call {i}: {reply:?}");
                };
                let values: Vec<&[u8]> = read.values().collect();
                assert_eq!(values, vec![format!("k{i}").as_bytes()], "call {i}");
            }

            // A call dropped before its reply leaves no waiter behind.
            let dropped = tokio::time::timeout(Duration::from_millis(50), conn.call(get("silent")));
            assert!(dropped.await.is_err(), "the silent request was answered");
            assert!(conn.lock().waiting.is_empty());
            assert!(conn.call(get("after")).await.is_ok());

            // A connection the server closes fails what waits on it, then
            // every later call at once, without sending it.
            let err = conn.call(get("close")).await.unwrap_err();
            assert!(!err.nothing_sent(), "the request was sent: {err}");
            assert!(conn.is_broken());
            let err = conn.call(get("later")).await.unwrap_err();
            assert!(err.nothing_sent(), "{err}");
        }

        #[tokio::test]
        async fn a_timeout_breaks_a_shared_connection() {
            let conn = reversed_connection(Duration::from_millis(200)).await;
            let other = {
                let conn = conn.clone();
                // Sent after the silent one, in its own batch: it fails with it.
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    conn.call(get("silent")).await
                })
            };
            let err = conn.call(get("silent")).await.unwrap_err();
            assert!(matches!(err, ClientIoError::Timeout { .. }), "{err}");
            assert!(!err.nothing_sent());
            assert!(
                conn.is_broken(),
                "a server that answers nothing is given up on"
            );
            let err = other.await.unwrap().unwrap_err();
            assert!(!err.nothing_sent(), "{err}");
            assert!(conn.call(get("later")).await.unwrap_err().nothing_sent());
        }

        #[tokio::test]
        async fn no_seed_answering_is_an_io_error() {
            let dead = dead_addr().await;
            let err = Client::connect(std::slice::from_ref(&dead))
                .await
                .unwrap_err();
            assert!(err.is_io(), "{err}");
            assert!(err.to_string().contains(&dead), "{err}");
            assert!(matches!(
                Client::connect(&[]).await.unwrap_err(),
                ClientCallError::NoSeeds
            ));
        }
    }
}
