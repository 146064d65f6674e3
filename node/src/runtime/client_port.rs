//! The binary client protocol: `ClientEnvelope` frames in, `ClientReplyEnvelope`
//! frames out, pipelined (replies may come back in any order; ids match them).
//!
//! Input is hostile: a malformed or oversize frame gets one error reply (id 0)
//! saying what was wrong, then the connection closes; the node keeps serving.
//!
//! Each connection has flow control ([`ReplyWindow`]): at most
//! [`UNITS_IN_FLIGHT_MAX`] requests started and not yet written back, and
//! fewer when replies are large (about [`REPLY_BYTES_IN_FLIGHT_MAX`] of them).
//! When the window is full the connection stops reading, so a client that
//! pipelines faster than it reads is held back by TCP; replies are never
//! dropped. Replies are written in chunks of about [`WRITE_CHUNK_BYTES`].
//! On shutdown the connection stops reading, and the replies to requests
//! already started are written for at most
//! [`SHUTDOWN_DRAIN`](crate::reply_window::SHUTDOWN_DRAIN).

use super::handle::CoreHandle;
use crate::read_buf::ReadBuf;
use crate::reply_window::{
    drain_writer, CloseOnDrop, ReplyWindow, REPLY_BYTES_IN_FLIGHT_MAX, UNITS_IN_FLIGHT_MAX,
};
use dynamo_proto::{ClientEnvelope, ClientError, ClientReply, ClientReplyEnvelope, FrameCodec};
use std::sync::Arc;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

/// The writer stops taking replies into one write once this many bytes are
/// encoded (one reply may make a chunk larger).
pub const WRITE_CHUNK_BYTES: usize = 256 << 10;
/// Accepts client connections until shutdown.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    handle: CoreHandle,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => match handle.connections.admit() {
                    Some(slot) => {
                        let serving = serve(stream, handle.clone(), shutdown.clone());
                        tokio::spawn(async move {
                            serving.await;
                            drop(slot);
                        });
                    }
                    None => {
                        let reply = ClientReplyEnvelope {
                            id: 0,
                            reply: ClientReply::Error(ClientError::Unavailable(
                                handle.connections.refusal(),
                            )),
                        };
                        let codec = FrameCodec::new(handle.info.max_frame_bytes);
                        let mut answer = Vec::new();
                        // An error reply always fits a frame; were it not to,
                        // the client still sees the connection close.
                        let _ = codec.encode_into(&reply, &mut answer);
                        tokio::spawn(crate::connection_limit::refuse(stream, answer));
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a client connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
        }
    }
}

async fn serve(stream: TcpStream, handle: CoreHandle, mut shutdown: watch::Receiver<bool>) {
    let _ = stream.set_nodelay(true);
    let codec = FrameCodec::new(handle.info.max_frame_bytes);
    let (mut reader, writer) = tokio::io::split(stream);
    // Unbounded, but never holding more than the window admitted.
    let (tx, rx) = mpsc::unbounded_channel::<ClientReplyEnvelope>();
    let window = Arc::new(ReplyWindow::new(
        UNITS_IN_FLIGHT_MAX,
        REPLY_BYTES_IN_FLIGHT_MAX,
    ));
    let write_task = tokio::spawn(write_replies(writer, rx, codec, window.clone()));
    let mut buf = ReadBuf::default();
    'conn: loop {
        // Decode every whole frame already buffered (a pipelining client
        // sends many per read), as long as the window lets requests start.
        loop {
            match codec.decode::<ClientEnvelope>(buf.unread()) {
                Ok(Some((env, used))) => {
                    buf.consume(used);
                    // While the window is full nothing is read: the client's
                    // writes back up into its own socket.
                    let admitted = tokio::select! {
                        biased;
                        _ = shutdown.changed() => break 'conn,
                        admitted = window.admit(1) => admitted,
                    };
                    if !admitted {
                        break 'conn;
                    }
                    // The core answers straight into the writer's channel.
                    handle.submit_to(env.request, &tx, env.id);
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "malformed client frame; closing the connection");
                    window.admit_now(1);
                    let _ = tx.send(ClientReplyEnvelope {
                        id: 0,
                        reply: ClientReply::Error(ClientError::Invalid(format!(
                            "malformed frame ({e}); the connection is closed. Clients must send \
                             dynamo-proto frames of ClientEnvelope"
                        ))),
                    });
                    break 'conn;
                }
            }
        }
        let n = tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            n = buf.fill(&mut reader) => n,
        };
        if !matches!(n, Ok(1..)) {
            break;
        }
    }
    // Let requests already started answer, then close. Once the node is
    // shutting down, a client that does not read gets SHUTDOWN_DRAIN more.
    drop(tx);
    drain_writer(write_task, shutdown, "binary-protocol").await;
}

/// Writes replies as they come, in chunks of about [`WRITE_CHUNK_BYTES`],
/// telling `window` what each chunk held and when the socket took it.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut rx: mpsc::UnboundedReceiver<ClientReplyEnvelope>,
    codec: FrameCodec,
    window: Arc<ReplyWindow>,
) {
    let _close = CloseOnDrop(&window);
    let mut buf = Vec::with_capacity(WRITE_CHUNK_BYTES);
    while let Some(first) = rx.recv().await {
        let mut replies = 0;
        let mut largest = 0;
        let mut next = Some(first);
        while let Some(env) = next {
            let start = buf.len();
            if let Err(e) = codec.encode_into(&env, &mut buf) {
                let fallback = ClientReplyEnvelope {
                    id: env.id,
                    reply: ClientReply::Error(ClientError::Internal(format!(
                        "the reply could not be framed: {e}"
                    ))),
                };
                let _ = codec.encode_into(&fallback, &mut buf);
            }
            replies += 1;
            largest = largest.max(buf.len() - start);
            next = if buf.len() < WRITE_CHUNK_BYTES {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        window.encoded(largest);
        if writer.write_all(&buf).await.is_err() || writer.flush().await.is_err() {
            return;
        }
        window.written(replies);
        buf.clear();
        // One large reply must not pin its buffer for the connection's life.
        if buf.capacity() > 2 * WRITE_CHUNK_BYTES {
            buf = Vec::with_capacity(WRITE_CHUNK_BYTES);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reply_window::SHUTDOWN_DRAIN;
    use crate::runtime::handle::Event;
    use crate::runtime::NodeInfo;
    use dynamo_proto::{Actor, ClientRequest, Context, Dot, GetReply, Hlc, Sibling};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;
    use tokio::io::AsyncReadExt;

    /// Every reply of the fake core carries a value this large.
    const VALUE_BYTES: usize = 256 << 10;

    /// A fake core that answers every request with a `VALUE_BYTES` value and
    /// counts the requests it received.
    fn fake_core() -> (CoreHandle, Arc<AtomicUsize>) {
        let (events, mut rx) = mpsc::unbounded_channel::<Event>();
        let received = Arc::new(AtomicUsize::new(0));
        let counted = received.clone();
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                let Event::Client { reply, .. } = event else {
                    panic!("a front end sent a non-client event");
                };
                counted.fetch_add(1, Ordering::SeqCst);
                reply.send(ClientReply::Get(GetReply {
                    siblings: vec![(
                        Dot {
                            actor: Actor {
                                incarnation: 1,
                                epoch: 1,
                            },
                            counter: 1,
                        },
                        Sibling {
                            value: Some(vec![7; VALUE_BYTES]),
                            timestamp: Hlc::default(),
                        },
                    )],
                    context: Context::default(),
                }));
            }
        });
        let handle = CoreHandle::for_tests(
            events,
            NodeInfo {
                node_id: "n1".into(),
                max_key_bytes: 64,
                max_value_bytes: VALUE_BYTES,
                max_frame_bytes: 2 * VALUE_BYTES,
            },
        );
        (handle, received)
    }

    /// A connection to `serve` over loopback; the task serving it.
    async fn connect(
        handle: CoreHandle,
        shutdown: watch::Receiver<bool>,
    ) -> (TcpStream, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        (client, tokio::spawn(serve(stream, handle, shutdown)))
    }

    fn gets(count: u64) -> Vec<u8> {
        let codec = FrameCodec::default();
        let mut out = Vec::new();
        for id in 1..=count {
            let request = ClientRequest::Get {
                key: b"big".to_vec(),
                r: None,
            };
            codec
                .encode_into(&ClientEnvelope { id, request }, &mut out)
                .unwrap();
        }
        out
    }

    /// Waits until `received` stops changing for 200 ms; its value then.
    async fn settled(received: &AtomicUsize) -> usize {
        let mut last = usize::MAX;
        loop {
            let now = received.load(Ordering::SeqCst);
            if now == last {
                return now;
            }
            last = now;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    #[tokio::test]
    async fn a_client_that_does_not_read_stops_being_read_and_then_gets_every_reply() {
        let (handle, received) = fake_core();
        let (_stop, shutdown) = watch::channel(false);
        let (mut client, _task) = connect(handle, shutdown).await;
        const SENT: u64 = 1000;
        client.write_all(&gets(SENT)).await.unwrap();
        // The window (64 at first, then 16 MiB of replies) plus what the
        // loopback socket buffers hold: far from everything sent.
        let started = settled(&received).await;
        assert!(
            started <= 300,
            "{started} of {SENT} requests for 256 KiB values started for a client that reads nothing"
        );
        // Reading lets the rest through, each reply exactly once.
        let codec = FrameCodec::new(4 * VALUE_BYTES);
        let mut seen = vec![false; SENT as usize + 1];
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 256 << 10];
        let mut count = 0;
        while count < SENT {
            let mut at = 0;
            while let Some((env, used)) = codec.decode::<ClientReplyEnvelope>(&buf[at..]).unwrap() {
                at += used;
                assert!(!std::mem::replace(&mut seen[env.id as usize], true));
                assert!(matches!(env.reply, ClientReply::Get(_)), "{:?}", env.id);
                count += 1;
            }
            buf.drain(..at);
            if count == SENT {
                break;
            }
            let n = tokio::time::timeout(Duration::from_secs(10), client.read(&mut chunk))
                .await
                .expect("a reply within 10 s")
                .unwrap();
            assert!(n > 0, "closed after {count} replies");
            buf.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(received.load(Ordering::SeqCst), SENT as usize);
    }

    #[tokio::test]
    async fn shutdown_does_not_wait_forever_for_a_client_that_does_not_read() {
        let (handle, received) = fake_core();
        let (stop, shutdown) = watch::channel(false);
        let (mut client, task) = connect(handle, shutdown).await;
        client.write_all(&gets(200)).await.unwrap();
        while received.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.send(true).unwrap();
        tokio::time::timeout(SHUTDOWN_DRAIN + Duration::from_secs(5), task)
            .await
            .expect("the connection closes after the drain time")
            .unwrap();
        drop(client);
    }
}
