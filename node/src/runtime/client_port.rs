//! The binary client protocol: `ClientEnvelope` frames in, `ClientReplyEnvelope`
//! frames out, pipelined (replies may come back in any order; ids match them).
//!
//! Input is hostile: a malformed or oversize frame gets one error reply (id 0)
//! saying what was wrong, then the connection closes; the node keeps serving.

use super::handle::CoreHandle;
use crate::read_buf::ReadBuf;
use dynamo_proto::{ClientEnvelope, ClientError, ClientReply, ClientReplyEnvelope, FrameCodec};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

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
                Ok((stream, _)) => {
                    tokio::spawn(serve(stream, handle.clone(), shutdown.clone()));
                }
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
    let (mut reader, mut writer) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::unbounded_channel::<ClientReplyEnvelope>();
    let write_task = tokio::spawn(async move {
        let mut buf = Vec::new();
        while let Some(first) = rx.recv().await {
            buf.clear();
            let mut next = Some(first);
            while let Some(env) = next {
                if let Err(e) = codec.encode_into(&env, &mut buf) {
                    let fallback = ClientReplyEnvelope {
                        id: env.id,
                        reply: ClientReply::Error(ClientError::Internal(format!(
                            "the reply could not be framed: {e}"
                        ))),
                    };
                    let _ = codec.encode_into(&fallback, &mut buf);
                }
                next = rx.try_recv().ok();
            }
            if writer.write_all(&buf).await.is_err() || writer.flush().await.is_err() {
                return;
            }
        }
    });
    let mut buf = ReadBuf::default();
    'conn: loop {
        // Decode every whole frame already buffered (a pipelining client
        // sends many per read).
        loop {
            match codec.decode::<ClientEnvelope>(buf.unread()) {
                Ok(Some((env, used))) => {
                    buf.consume(used);
                    // The core answers straight into the writer's channel.
                    handle.submit_to(env.request, &tx, env.id);
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "malformed client frame; closing the connection");
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
    // Let in-flight requests answer, then close the write side.
    drop(tx);
    let _ = write_task.await;
}
