//! Internode transport: one long-lived outbound TCP connection per peer for what
//! this node sends, and an acceptor for what peers send to it.
//!
//! Every connection starts with a `Hello` each way; a peer from another cluster,
//! with another Q or N, or not a member, is refused with `HelloRejected`. Frames
//! are `dynamo-proto` frames; a malformed one closes that connection and nothing
//! else. Outbound connections reconnect with capped exponential backoff; while a
//! peer is unreachable its messages are dropped (the core's timeouts, read
//! repair and, later, hinted handoff make up for them). Messages sent while a
//! connection attempt is under way wait for it, and go out if it succeeds.
//!
//! A connected peer that stops taking bytes (stuck, or behind a partition)
//! counts as unreachable within [`STALL_TIMEOUT`], even while a write to it is
//! blocked, and what waits for one peer is bounded ([`MAX_QUEUED_BYTES`]): the
//! core never waits for a peer, and a peer never holds the node's memory.
//!
//! Only `tokio::net`, `tokio::time` and `tokio::spawn` are used, so the simulator
//! runs this very code.

use super::handle::Event;
use crate::gather::gather;
use crate::metrics::Metrics;
use crate::read_buf::ReadBuf;
use dynamo_core::HelloCheck;
use dynamo_proto::{ClientReply, ClientRequest, Context, DvvSet};
use dynamo_proto::{FrameCodec, FrameError, Hello, NodeId, PeerMessage};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Messages written per flush at most, so one busy peer cannot starve the others.
const MAX_BATCH: usize = 256;
/// How often an outbound connection proves it still moves traffic.
const HEARTBEAT: Duration = Duration::from_millis(250);
/// How long an outbound connection may go without any sign of life (see
/// [`StallCheck`]) before it is declared stuck and replaced.
const STALL_TIMEOUT: Duration = Duration::from_millis(1_000);
/// What may wait for one peer, queued or in the batch being written, in
/// [`estimated_bytes`], before further messages to it are dropped. A
/// connection that moves traffic drains its queue far faster than the core
/// fills it; this bounds what piles up behind one that does not, until the
/// stall check replaces it and the backoff drops the rest.
const MAX_QUEUED_BYTES: usize = 64 << 20;

/// The senders for every peer's outbound connection task.
#[derive(Clone, Default)]
pub(crate) struct PeerSenders {
    senders: BTreeMap<NodeId, PeerQueue>,
}

/// The sending end of one peer's queue, and how much that queue holds.
#[derive(Clone)]
struct PeerQueue {
    tx: mpsc::UnboundedSender<Queued>,
    held: Arc<QueueBytes>,
}

/// What one peer's queue holds, in [`estimated_bytes`]; every peer's together
/// are `dynamo_peer_queued_bytes`.
struct QueueBytes {
    bytes: AtomicUsize,
    metrics: Arc<Metrics>,
}

impl QueueBytes {
    fn add(&self, bytes: usize) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        let all = &self.metrics.peers.queued_bytes;
        all.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    fn remove(&self, bytes: usize) {
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
        let all = &self.metrics.peers.queued_bytes;
        all.fetch_sub(bytes as u64, Ordering::Relaxed);
    }
}

impl PeerSenders {
    /// Queues `msg` for `to`'s connection, or drops it (and counts it) when
    /// that queue already holds [`MAX_QUEUED_BYTES`]. Never waits: the core
    /// task calls it.
    pub fn send(&self, to: &NodeId, msg: PeerMessage) {
        let Some(queue) = self.senders.get(to) else {
            tracing::warn!(peer = %to, "no connection to a peer the core named");
            return;
        };
        // Checked before this message is added, so one message larger than
        // the bound still goes into an empty queue.
        if queue.held.bytes.load(Ordering::Relaxed) >= MAX_QUEUED_BYTES {
            let dropped = &queue.held.metrics.peers.messages_dropped;
            dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let bytes = estimated_bytes(&msg);
        queue.held.add(bytes);
        let charge = Some(Charge {
            bytes,
            held: queue.held.clone(),
        });
        // Fails only once the connection task is gone (shutdown); the charge
        // goes back with the message.
        let _ = queue.tx.send(Queued { msg, charge });
    }
}

/// A message on its way to a peer. Its size counts toward its queue's bytes
/// until it is written or thrown away.
struct Queued {
    msg: PeerMessage,
    /// `None` for what the connection task makes itself (pings).
    charge: Option<Charge>,
}

/// A queued message's share of its queue's bytes, given back on drop.
struct Charge {
    bytes: usize,
    held: Arc<QueueBytes>,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.held.remove(self.bytes);
    }
}

/// What a message weighs in its queue: the keys and values it carries plus a
/// fixed allowance. An estimate, cheap enough for the core task; it only has
/// to keep a stalled peer's queue within a small factor of the bound.
fn estimated_bytes(msg: &PeerMessage) -> usize {
    const FIXED: usize = 64;
    FIXED
        + match msg {
            PeerMessage::Replicate { reqs, key, set } => {
                8 * reqs.len() + key.len() + set.estimated_bytes()
            }
            PeerMessage::Hint {
                reqs,
                owner,
                key,
                set,
            } => 8 * reqs.len() + owner.0.len() + key.len() + set.estimated_bytes(),
            PeerMessage::Repair { key, set } => key.len() + set.estimated_bytes(),
            PeerMessage::ReplicateAck { reqs, error } => {
                8 * reqs.len() + error.as_ref().map_or(0, String::len)
            }
            PeerMessage::Read { key, .. } => key.len(),
            PeerMessage::ReadReply { result, .. } => match result {
                Ok(set) => set.as_ref().map_or(0, DvvSet::estimated_bytes),
                Err(error) => error.len(),
            },
            PeerMessage::Forward { request, .. } => match request {
                ClientRequest::Put {
                    key,
                    value,
                    context,
                    ..
                } => {
                    key.len()
                        + value.as_ref().map_or(0, Vec::len)
                        + context.as_ref().map_or(0, Context::estimated_bytes)
                }
                ClientRequest::Get { key, .. } | ClientRequest::LocalGet { key } => key.len(),
                ClientRequest::ClusterInfo | ClientRequest::Ping => 0,
            },
            PeerMessage::ForwardReply { reply, .. } => match reply {
                ClientReply::Get(get) => {
                    let values: usize = get
                        .siblings
                        .iter()
                        .map(|(_, s)| FIXED + s.value.as_ref().map_or(0, Vec::len))
                        .sum();
                    values + get.context.estimated_bytes()
                }
                ClientReply::Put { context, .. } => context.estimated_bytes(),
                ClientReply::LocalGet(set) => set.as_ref().map_or(0, DvvSet::estimated_bytes),
                ClientReply::ClusterInfo(_) | ClientReply::Pong { .. } | ClientReply::Error(_) => 0,
            },
            PeerMessage::AntiEntropySegments { segments, .. } => 8 * segments.len(),
            PeerMessage::AntiEntropyEntries {
                segments, entries, ..
            } => {
                segments.len()
                    + entries
                        .iter()
                        .map(|e| e.key.len() + e.set.estimated_bytes())
                        .sum::<usize>()
            }
            PeerMessage::Hello(_)
            | PeerMessage::HelloRejected { .. }
            | PeerMessage::Ping { .. }
            | PeerMessage::Pong { .. } => 0,
        }
}

/// What the connection tasks share.
#[derive(Clone)]
pub(crate) struct PeerContext {
    pub hello: Hello,
    pub check: HelloCheck,
    pub codec: FrameCodec,
    pub events: mpsc::UnboundedSender<Event>,
    pub shutdown: watch::Receiver<bool>,
    pub metrics: Arc<Metrics>,
}

/// Starts one outbound connection task per peer.
pub(crate) fn spawn_outbound(ctx: &PeerContext, peers: &[(NodeId, String)]) -> PeerSenders {
    let mut senders = BTreeMap::new();
    for (id, addr) in peers {
        let (tx, rx) = mpsc::unbounded_channel();
        let held = Arc::new(QueueBytes {
            bytes: AtomicUsize::new(0),
            metrics: ctx.metrics.clone(),
        });
        let queue = PeerQueue { tx, held };
        senders.insert(id.clone(), queue);
        tokio::spawn(outbound(ctx.clone(), id.clone(), addr.clone(), rx));
    }
    PeerSenders { senders }
}

async fn outbound(
    mut ctx: PeerContext,
    peer: NodeId,
    addr: String,
    mut rx: mpsc::UnboundedReceiver<Queued>,
) {
    let mut backoff = BACKOFF_MIN;
    let mut reported_down = false;
    loop {
        if *ctx.shutdown.borrow() {
            return;
        }
        match connect_and_greet(&ctx, &peer, &addr).await {
            Ok((stream, theirs)) => {
                ctx.metrics.peers.connects.fetch_add(1, Ordering::Relaxed);
                backoff = BACKOFF_MIN;
                reported_down = false;
                tracing::info!(peer = %peer, %addr, "connected to peer");
                let _ = ctx.events.send(Event::PeerReachable {
                    peer: peer.clone(),
                    up: true,
                    client_addr: Some(theirs.client_addr),
                    http_addr: Some(theirs.http_addr),
                });
                // What was queued during this attempt goes out now: the
                // request it belongs to is most likely still waiting (a node
                // that just started, a peer back from a restart). What piled up
                // while the peer was away was dropped during the backoff.
                match pump(&mut ctx, stream, &mut rx).await {
                    PumpEnd::Shutdown | PumpEnd::Closed => return,
                    PumpEnd::Failed(e) => {
                        ctx.metrics
                            .peers
                            .connect_failures
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(peer = %peer, error = %e, "peer connection lost");
                    }
                }
            }
            Err(e) => {
                ctx.metrics
                    .peers
                    .connect_failures
                    .fetch_add(1, Ordering::Relaxed);
                if !reported_down {
                    tracing::warn!(peer = %peer, %addr, error = %e, "cannot reach peer; retrying");
                }
            }
        }
        if !reported_down {
            reported_down = true;
            let _ = ctx.events.send(Event::PeerReachable {
                peer: peer.clone(),
                up: false,
                client_addr: None,
                http_addr: None,
            });
        }
        // Drop what piles up while the peer is away (what queued up behind a
        // stuck connection first), then wait out the backoff.
        let until = tokio::time::Instant::now() + backoff;
        loop {
            tokio::select! {
                biased;
                _ = ctx.shutdown.changed() => return,
                _ = tokio::time::sleep_until(until) => break,
                msg = rx.recv() => match msg {
                    Some(_) => {
                        ctx.metrics.peers.messages_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    None => return,
                },
            }
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

enum PumpEnd {
    Shutdown,
    Closed,
    Failed(String),
}

/// Writes queued messages to the peer, and keeps the connection honest: a
/// `Ping` every [`HEARTBEAT`], answered by a `Pong` on the same connection. A
/// connection that shows no sign of life for [`STALL_TIMEOUT`] is stuck (a TCP
/// connection can sit in retransmission backoff long after a partition heals,
/// and a peer that stopped reading blocks the write in progress until TCP
/// gives up, many minutes later) and is replaced by a fresh one.
async fn pump(
    ctx: &mut PeerContext,
    stream: TcpStream,
    rx: &mut mpsc::UnboundedReceiver<Queued>,
) -> PumpEnd {
    let (mut reader, mut writer) = tokio::io::split(stream);
    let (pong_tx, mut pong_rx) = mpsc::unbounded_channel::<()>();
    let codec = ctx.codec;
    let reader_task = tokio::spawn(async move {
        let mut buf = ReadBuf::default();
        // Anything the peer sends back on this connection counts as a sign of life.
        while let Ok(Some(_)) = read_frame(&mut reader, &codec, &mut buf).await {
            if pong_tx.send(()).is_err() {
                return;
            }
        }
    });
    let end = pump_loop(ctx, &mut writer, rx, &mut pong_rx).await;
    reader_task.abort();
    end
}

async fn pump_loop<W: AsyncWrite + Unpin>(
    ctx: &mut PeerContext,
    writer: &mut W,
    rx: &mut mpsc::UnboundedReceiver<Queued>,
    pongs: &mut mpsc::UnboundedReceiver<()>,
) -> PumpEnd {
    let mut buf = Vec::with_capacity(64 * 1024);
    // The charges of the messages in `buf`, given back once it is written.
    let mut batch_charges = Vec::with_capacity(MAX_BATCH);
    let mut stall = StallCheck::new();
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    let mut seq = 0u64;
    loop {
        let first = tokio::select! {
            biased;
            _ = ctx.shutdown.changed() => return PumpEnd::Shutdown,
            pong = pongs.recv() => {
                if pong.is_none() {
                    return peer_closed();
                }
                stall.sign_of_life();
                continue;
            }
            _ = heartbeat.tick() => {
                if stall.is_stuck() {
                    return StallCheck::stuck();
                }
                seq += 1;
                Queued { msg: PeerMessage::Ping { seq }, charge: None }
            }
            msg = rx.recv() => match msg {
                Some(m) => m,
                None => return PumpEnd::Closed,
            },
        };
        buf.clear();
        let count = gather(first, rx, MAX_BATCH, |queued| {
            if let Err(e) = ctx.codec.encode_into(&queued.msg, &mut buf) {
                tracing::error!(error = %e, "dropping a message that cannot be framed");
            }
            batch_charges.extend(queued.charge);
        })
        .await;
        let m = &ctx.metrics.peers;
        let written = write_watched(writer, &buf, pongs, &mut stall).await;
        batch_charges.clear();
        if let Err(end) = written {
            m.messages_dropped
                .fetch_add(count as u64, Ordering::Relaxed);
            return end;
        }
        m.messages_sent.fetch_add(count as u64, Ordering::Relaxed);
        m.writes.fetch_add(1, Ordering::Relaxed);
        m.bytes_sent.fetch_add(buf.len() as u64, Ordering::Relaxed);
    }
}

fn peer_closed() -> PumpEnd {
    PumpEnd::Failed("the peer closed the connection".into())
}

/// The stall check's one rule, for the heartbeat and for a write that waits
/// alike: a connection is stuck once [`STALL_TIMEOUT`] has passed since its
/// last sign of life. Signs of life are frames the peer sends back, and bytes
/// a write gets into a send buffer it found full: room there means the peer
/// acknowledged earlier bytes, so a big batch that a slow link keeps draining
/// is never cut off, however long it takes in all.
struct StallCheck {
    last_sign_of_life: Instant,
}

impl StallCheck {
    fn new() -> StallCheck {
        StallCheck {
            last_sign_of_life: Instant::now(),
        }
    }

    fn sign_of_life(&mut self) {
        self.last_sign_of_life = Instant::now();
    }

    /// When the connection counts as stuck unless a sign of life comes first.
    fn deadline(&self) -> Instant {
        self.last_sign_of_life + STALL_TIMEOUT
    }

    fn is_stuck(&self) -> bool {
        Instant::now() > self.deadline()
    }

    fn stuck() -> PumpEnd {
        PumpEnd::Failed(format!(
            "no answer for {STALL_TIMEOUT:?}; the connection looks stuck"
        ))
    }
}

/// Writes and flushes `buf`, taking the peer's answers meanwhile, and gives up
/// with [`StallCheck::stuck`] once the connection is stuck: a peer that stopped
/// reading would otherwise block the write until TCP gives up, with the stall
/// check, the pongs and the queue all waiting behind it.
async fn write_watched<W: AsyncWrite + Unpin>(
    writer: &mut W,
    buf: &[u8],
    pongs: &mut mpsc::UnboundedReceiver<()>,
    stall: &mut StallCheck,
) -> Result<(), PumpEnd> {
    let mut written = 0;
    // Whether the last write call took less than it was offered, so the send
    // buffer was full when it returned.
    let mut send_buffer_full = false;
    loop {
        let flushing = written == buf.len();
        let step = async {
            if flushing {
                writer.flush().await.map(|()| 0)
            } else {
                writer.write(&buf[written..]).await
            }
        };
        // The write comes first: when it is done at once (nearly always) the
        // timer is never even polled.
        let result = tokio::select! {
            biased;
            result = step => result,
            pong = pongs.recv() => {
                if pong.is_none() {
                    return Err(peer_closed());
                }
                stall.sign_of_life();
                continue;
            }
            _ = tokio::time::sleep_until(stall.deadline()) => return Err(StallCheck::stuck()),
        };
        let n = match result {
            Ok(_) if flushing => return Ok(()),
            Ok(0) => return Err(PumpEnd::Failed("the peer's socket took no bytes".into())),
            Ok(n) => n,
            Err(e) => return Err(PumpEnd::Failed(e.to_string())),
        };
        if send_buffer_full {
            stall.sign_of_life();
        }
        send_buffer_full = n < buf.len() - written;
        written += n;
    }
}

async fn write_all_flush<W: AsyncWrite + Unpin>(w: &mut W, buf: &[u8]) -> std::io::Result<()> {
    w.write_all(buf).await?;
    w.flush().await
}

async fn connect_and_greet(
    ctx: &PeerContext,
    peer: &NodeId,
    addr: &str,
) -> Result<(TcpStream, Hello), String> {
    let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let frame = ctx
        .codec
        .encode(&PeerMessage::Hello(ctx.hello.clone()))
        .map_err(|e| e.to_string())?;
    write_all_flush(&mut stream, &frame)
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = ReadBuf::default();
    let reply = tokio::time::timeout(HELLO_TIMEOUT, read_frame(&mut stream, &ctx.codec, &mut buf))
        .await
        .map_err(|_| "no greeting from the peer".to_string())?
        .map_err(|e| e.to_string())?;
    match reply {
        Some(PeerMessage::Hello(theirs)) => {
            if &theirs.node != peer {
                return Err(format!(
                    "{addr} answered as {}, expected {peer}",
                    theirs.node
                ));
            }
            ctx.check.check(&theirs)?;
            Ok((stream, theirs))
        }
        Some(PeerMessage::HelloRejected { reason }) => Err(format!("refused us: {reason}")),
        Some(other) => Err(format!("expected a greeting, got {other:?}")),
        None => Err("closed before greeting".into()),
    }
}

/// Reads one frame, keeping leftover bytes in `buf`. `Ok(None)` on a clean
/// close. Cancel-safe: nothing read is lost if the future is dropped.
async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    codec: &FrameCodec,
    buf: &mut ReadBuf,
) -> Result<Option<PeerMessage>, ReadError> {
    loop {
        if let Some((msg, used)) = codec.decode::<PeerMessage>(buf.unread())? {
            buf.consume(used);
            return Ok(Some(msg));
        }
        if buf.fill(r).await? == 0 {
            let have = buf.unread().len();
            return if have == 0 {
                Ok(None)
            } else {
                Err(ReadError::Frame(FrameError::Truncated {
                    have,
                    need: have + 1,
                }))
            };
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Frame(#[from] FrameError),
}

/// Accepts peer connections until `stop_accepting`; accepted connections run
/// until the peer transport stops.
pub(crate) async fn accept_loop(
    ctx: PeerContext,
    listener: TcpListener,
    mut stop_accepting: watch::Receiver<bool>,
) {
    let shutdown = &mut stop_accepting;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, from)) => {
                    tokio::spawn(inbound(ctx.clone(), stream, from.to_string()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a peer connection failed");
                    tokio::time::sleep(BACKOFF_MIN).await;
                }
            },
        }
    }
}

async fn inbound(mut ctx: PeerContext, mut stream: TcpStream, from: String) {
    let _ = stream.set_nodelay(true);
    let mut buf = ReadBuf::default();
    let greeting =
        tokio::time::timeout(HELLO_TIMEOUT, read_frame(&mut stream, &ctx.codec, &mut buf)).await;
    let peer = match greeting {
        Ok(Ok(Some(PeerMessage::Hello(hello)))) => match ctx.check.check(&hello) {
            Ok(()) => hello.node,
            Err(reason) => {
                tracing::warn!(%from, %reason, "refused a peer");
                reject(&ctx, &mut stream, reason).await;
                return;
            }
        },
        Ok(Ok(Some(other))) => {
            let reason = format!("the first frame must be a Hello, got {}", kind(&other));
            tracing::warn!(%from, %reason, "refused a peer");
            reject(&ctx, &mut stream, reason).await;
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::warn!(%from, error = %e, "garbage on the peer port; connection closed");
            reject(&ctx, &mut stream, format!("malformed frame: {e}")).await;
            return;
        }
        Err(_) => {
            tracing::warn!(%from, "no greeting within {HELLO_TIMEOUT:?}; connection closed");
            return;
        }
    };
    let ours = match ctx.codec.encode(&PeerMessage::Hello(ctx.hello.clone())) {
        Ok(frame) => frame,
        Err(e) => {
            tracing::error!(error = %e, "cannot encode our greeting");
            return;
        }
    };
    if write_all_flush(&mut stream, &ours).await.is_err() {
        return;
    }
    // Everything one read brings goes to the core as one event; a ping is
    // answered at once, in its place.
    let mut shutdown = std::pin::pin!(ctx.shutdown.changed());
    let mut msgs = Vec::new();
    let received = &ctx.metrics.peers.messages_received;
    loop {
        loop {
            match ctx.codec.decode::<PeerMessage>(buf.unread()) {
                Ok(Some((PeerMessage::Ping { seq }, used))) => {
                    buf.consume(used);
                    received.fetch_add(1, Ordering::Relaxed);
                    let Ok(pong) = ctx.codec.encode(&PeerMessage::Pong { seq }) else {
                        return;
                    };
                    if write_all_flush(&mut stream, &pong).await.is_err() {
                        return;
                    }
                }
                Ok(Some((msg, used))) => {
                    buf.consume(used);
                    received.fetch_add(1, Ordering::Relaxed);
                    msgs.push(msg);
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(peer = %peer, error = %e, "malformed frame from a peer; connection closed");
                    // What arrived intact before it still counts.
                    deliver(&ctx.events, &peer, &mut msgs);
                    return;
                }
            }
        }
        if !deliver(&ctx.events, &peer, &mut msgs) {
            return;
        }
        let read = tokio::select! {
            biased;
            _ = &mut shutdown => return,
            read = buf.fill(&mut stream) => read,
        };
        match read {
            Ok(0) => {
                let have = buf.unread().len();
                if have > 0 {
                    tracing::warn!(peer = %peer, bytes = have, "peer closed the connection inside a frame");
                }
                return;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(peer = %peer, error = %e, "reading from a peer failed; connection closed");
                return;
            }
        }
    }
}

/// Hands `msgs` (if any) to the core as one event; false once the core is gone.
fn deliver(
    events: &mpsc::UnboundedSender<Event>,
    peer: &NodeId,
    msgs: &mut Vec<PeerMessage>,
) -> bool {
    if msgs.is_empty() {
        return true;
    }
    let msgs = std::mem::take(msgs);
    events
        .send(Event::Peer {
            from: peer.clone(),
            msgs,
        })
        .is_ok()
}

async fn reject(ctx: &PeerContext, stream: &mut TcpStream, reason: String) {
    if let Ok(frame) = ctx.codec.encode(&PeerMessage::HelloRejected { reason }) {
        let _ = write_all_flush(stream, &frame).await;
    }
}

fn kind(msg: &PeerMessage) -> &'static str {
    match msg {
        PeerMessage::Hello(_) => "Hello",
        PeerMessage::HelloRejected { .. } => "HelloRejected",
        PeerMessage::Replicate { .. } => "Replicate",
        PeerMessage::Hint { .. } => "Hint",
        PeerMessage::ReplicateAck { .. } => "ReplicateAck",
        PeerMessage::Read { .. } => "Read",
        PeerMessage::ReadReply { .. } => "ReadReply",
        PeerMessage::Repair { .. } => "Repair",
        PeerMessage::Forward { .. } => "Forward",
        PeerMessage::ForwardReply { .. } => "ForwardReply",
        PeerMessage::Ping { .. } => "Ping",
        PeerMessage::Pong { .. } => "Pong",
        PeerMessage::AntiEntropySegments { .. } => "AntiEntropySegments",
        PeerMessage::AntiEntropyEntries { .. } => "AntiEntropyEntries",
    }
}

#[cfg(all(test, not(madsim)))]
mod tests {
    use super::*;
    use dynamo_proto::ClusterId;
    use std::collections::BTreeSet;

    fn hello(node: &str) -> Hello {
        Hello {
            cluster_id: ClusterId("c".into()),
            node: NodeId::new(node),
            q: 8,
            n: 2,
            client_addr: String::new(),
            http_addr: String::new(),
        }
    }

    /// A message sent while the connection's greeting is still under way (a
    /// peer that just started, or is slow to answer) goes out once the greeting
    /// succeeds; it used to be thrown away with what the backoff drops.
    #[tokio::test]
    async fn a_message_sent_during_the_greeting_goes_out_after_it() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let codec = FrameCodec::new(1 << 20);
        let (events, mut events_rx) = mpsc::unbounded_channel();
        let (_stop, shutdown) = watch::channel(false);
        let ctx = PeerContext {
            hello: hello("n1"),
            check: HelloCheck {
                cluster_id: ClusterId("c".into()),
                node: NodeId::new("n1"),
                q: 8,
                n: 2,
                members: BTreeSet::from([NodeId::new("n1"), NodeId::new("n2")]),
            },
            codec,
            events,
            shutdown,
            metrics: crate::metrics::Metrics::for_tests("n1"),
        };
        let (heard_tx, heard_rx) = tokio::sync::oneshot::channel();
        let (answer_tx, answer_rx) = tokio::sync::oneshot::channel();
        let peer = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = ReadBuf::default();
            let first = read_frame(&mut stream, &codec, &mut buf).await.unwrap();
            assert!(matches!(first, Some(PeerMessage::Hello(h)) if h.node.as_str() == "n1"));
            heard_tx.send(()).unwrap();
            // Answer the greeting only once the message below is queued.
            answer_rx.await.unwrap();
            let ours = codec.encode(&PeerMessage::Hello(hello("n2"))).unwrap();
            write_all_flush(&mut stream, &ours).await.unwrap();
            loop {
                match read_frame(&mut stream, &codec, &mut buf).await.unwrap() {
                    Some(PeerMessage::Ping { .. }) => continue,
                    other => return other,
                }
            }
        });
        let senders = spawn_outbound(&ctx, &[(NodeId::new("n2"), addr)]);
        heard_rx.await.unwrap();
        let ack = PeerMessage::ReplicateAck {
            reqs: vec![7],
            error: None,
        };
        senders.send(&NodeId::new("n2"), ack.clone());
        answer_tx.send(()).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), peer)
            .await
            .expect("the peer heard nothing after the greeting")
            .unwrap();
        assert_eq!(got, Some(ack));
        let reachable = events_rx.recv().await.unwrap();
        assert!(matches!(reachable, Event::PeerReachable { up: true, .. }));
    }

    /// A big batch that a slow reader keeps draining takes longer than
    /// STALL_TIMEOUT in all, and still goes out whole: only a write that stops
    /// moving is stuck.
    #[tokio::test]
    async fn a_write_that_keeps_moving_is_not_stuck_however_long_it_takes() {
        const CHUNK: usize = 16 * 1024;
        let (mut ours, mut theirs) = tokio::io::duplex(CHUNK);
        let batch = vec![7u8; 16 * CHUNK];
        let len = batch.len();
        let reader = tokio::spawn(async move {
            let mut got = 0;
            let mut chunk = vec![0u8; CHUNK];
            while got < len {
                tokio::time::sleep(Duration::from_millis(100)).await;
                got += tokio::io::AsyncReadExt::read(&mut theirs, &mut chunk)
                    .await
                    .unwrap();
            }
            got
        });
        let (_pong_tx, mut pongs) = mpsc::unbounded_channel();
        let mut stall = StallCheck::new();
        let started = Instant::now();
        let written = write_watched(&mut ours, &batch, &mut pongs, &mut stall).await;
        assert!(written.is_ok(), "a moving write was declared stuck");
        assert!(started.elapsed() > STALL_TIMEOUT, "{:?}", started.elapsed());
        assert_eq!(reader.await.unwrap(), len);
    }

    /// A write the peer stops taking gives up after STALL_TIMEOUT, the way the
    /// heartbeat's stall check does, instead of blocking until TCP gives up.
    #[tokio::test]
    async fn a_write_that_stops_moving_is_stuck_after_the_stall_timeout() {
        let (mut ours, _theirs) = tokio::io::duplex(16 * 1024);
        let (_pong_tx, mut pongs) = mpsc::unbounded_channel();
        let mut stall = StallCheck::new();
        let started = Instant::now();
        let written = write_watched(&mut ours, &[0; 64 * 1024], &mut pongs, &mut stall).await;
        assert!(
            matches!(&written, Err(PumpEnd::Failed(e)) if e.contains("stuck")),
            "expected the write to be declared stuck"
        );
        let took = started.elapsed();
        assert!(
            took >= STALL_TIMEOUT && took < 3 * STALL_TIMEOUT,
            "{took:?}"
        );
    }

    /// A peer's queue takes messages until it holds MAX_QUEUED_BYTES, drops
    /// (and counts) the rest without waiting, and takes messages again as
    /// what it holds drains.
    #[test]
    fn a_full_queue_drops_what_comes_next_until_it_drains() {
        let metrics = crate::metrics::Metrics::for_tests("n1");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let held = Arc::new(QueueBytes {
            bytes: AtomicUsize::new(0),
            metrics: metrics.clone(),
        });
        let n2 = NodeId::new("n2");
        let senders = PeerSenders {
            senders: BTreeMap::from([(n2.clone(), PeerQueue { tx, held })]),
        };
        let put = PeerMessage::Forward {
            req: 1,
            request: ClientRequest::Put {
                key: b"k".to_vec(),
                value: Some(vec![0; 1 << 20]),
                context: None,
                w: None,
                mode: dynamo_proto::WriteMode::Context,
            },
        };
        let each = estimated_bytes(&put);
        let fits = MAX_QUEUED_BYTES.div_ceil(each);
        for _ in 0..fits + 10 {
            senders.send(&n2, put.clone());
        }
        let p = &metrics.peers;
        assert_eq!(p.messages_dropped.load(Ordering::Relaxed), 10);
        let queued = p.queued_bytes.load(Ordering::Relaxed);
        assert_eq!(queued, (fits * each) as u64);
        let mut taken = Vec::new();
        while let Ok(q) = rx.try_recv() {
            taken.push(q);
        }
        assert_eq!(taken.len(), fits);
        drop(taken);
        assert_eq!(p.queued_bytes.load(Ordering::Relaxed), 0);
        senders.send(&n2, put);
        assert!(rx.try_recv().is_ok());
        assert_eq!(p.messages_dropped.load(Ordering::Relaxed), 10);
    }
}
