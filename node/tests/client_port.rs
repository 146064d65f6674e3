//! End-to-end tests of the binary client port's flow control, against a real
//! `dynamo server` process: a client that pipelines large reads and does not
//! read its socket must not grow the node's memory without bound, and once it
//! reads it gets every reply.

mod common;

use common::{proc_status_bytes, watch_peak_rss, Cluster};
use dynamo_proto::{
    ClientEnvelope, ClientReply, ClientReplyEnvelope, ClientRequest, FrameCodec, WriteMode,
};
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// The value every read returns: the node's default maximum.
const VALUE_BYTES: usize = 1 << 20;
/// Reads pipelined before the client reads anything: 2 GiB of replies.
const PIPELINED_GETS: u64 = 2000;
/// How far the node's peak RSS may grow while the client does not read. The
/// reply window holds 64 replies at first and about 16 MiB once it has seen
/// one; the rest is slack for the allocator and the socket buffers.
const RSS_GROWTH_MAX: u64 = 256 << 20;
/// How long the node gets to do its worst before the client reads.
const NOT_READING_FOR: Duration = Duration::from_secs(4);

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

/// Reads replies from `s` until `count` have arrived, handing each to `check`.
fn read_replies(s: &mut TcpStream, count: u64, mut check: impl FnMut(ClientReplyEnvelope)) {
    let codec = FrameCodec::default();
    let mut buf: Vec<u8> = Vec::new();
    let mut at = 0;
    let mut chunk = vec![0u8; 1 << 20];
    let mut seen = 0;
    while seen < count {
        while let Some((env, used)) = codec
            .decode::<ClientReplyEnvelope>(&buf[at..])
            .expect("a well-formed reply frame")
        {
            at += used;
            seen += 1;
            check(env);
        }
        if seen == count {
            break;
        }
        buf.drain(..at);
        at = 0;
        let n = s.read(&mut chunk).expect("reading replies");
        assert!(n > 0, "the node closed the connection after {seen} replies");
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn send(s: &mut TcpStream, id: u64, request: ClientRequest) {
    let frame = FrameCodec::default()
        .encode(&ClientEnvelope { id, request })
        .unwrap();
    s.write_all(&frame).unwrap();
}

fn get(key: &[u8]) -> ClientRequest {
    ClientRequest::Get {
        key: key.to_vec(),
        r: None,
    }
}

#[test]
fn pipelined_large_reads_from_a_client_that_does_not_read_are_held_back() {
    let c = Cluster::start(1, &[]);
    let pid = c.nodes[0].pid().expect("the node runs");
    let value: Vec<u8> = (0..VALUE_BYTES).map(|i| (i % 251) as u8).collect();
    let mut s = connect(c.client_addr(0));
    send(
        &mut s,
        1,
        ClientRequest::Put {
            key: b"big".to_vec(),
            value: Some(value.clone()),
            context: None,
            w: None,
            mode: WriteMode::Overwrite,
        },
    );
    read_replies(&mut s, 1, |env| {
        assert!(matches!(env.reply, ClientReply::Put { .. }), "{env:?}")
    });
    // One read first, so the baseline includes what any read costs.
    send(&mut s, 2, get(b"big"));
    read_replies(&mut s, 1, |env| {
        assert!(matches!(env.reply, ClientReply::Get(_)), "{env:?}")
    });
    let baseline = proc_status_bytes(pid, "VmHWM").expect("Linux /proc");

    let codec = FrameCodec::default();
    let mut frames = Vec::new();
    for id in 1..=PIPELINED_GETS {
        let request = get(b"big");
        codec
            .encode_into(&ClientEnvelope { id, request }, &mut frames)
            .unwrap();
    }
    s.write_all(&frames).unwrap();
    let peak = watch_peak_rss(
        pid,
        baseline + RSS_GROWTH_MAX,
        NOT_READING_FOR,
        "2000 pipelined reads of a 1 MiB value, none of it read",
    );
    eprintln!(
        "peak RSS grew by {} MiB while the client did not read",
        (peak - baseline) >> 20
    );

    // Reading lets everything through: every id once, each with the value.
    let mut seen = vec![false; PIPELINED_GETS as usize + 1];
    read_replies(&mut s, PIPELINED_GETS, |env| {
        let ClientReply::Get(read) = &env.reply else {
            panic!("reply {}: {:?}", env.id, env.reply);
        };
        assert!(
            read.values().eq([value.as_slice()]),
            "reply {}: not the value",
            env.id
        );
        assert!(
            !std::mem::replace(&mut seen[env.id as usize], true),
            "reply {} twice",
            env.id
        );
    });
    assert!(seen[1..].iter().all(|s| *s));
}
