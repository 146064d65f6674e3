//! `--max-connections`: past it, a new client connection on any front end is
//! told so in its own protocol and closed, and the node keeps serving the
//! connections it has. Runs a real `dynamo server` on loopback.

mod common;

use common::{free_ports, read_until_closed, Cluster};
use dynamo_proto::{ClientError, ClientReply, ClientReplyEnvelope, FrameCodec};
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Polls until `cond` holds, for at most 10 s.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(10), "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One whole HTTP exchange on `stream`: the status and body of the answer.
fn get_on(stream: &mut TcpStream, path: &str) -> (u16, String) {
    write!(stream, "GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut raw = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if raw.len() >= end + 4 + length {
                let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
                let body = String::from_utf8_lossy(&raw[end + 4..end + 4 + length]);
                return (status, body.into_owned());
            }
        }
        let n = stream.read(&mut chunk).unwrap();
        assert!(n > 0, "closed mid-answer");
        raw.extend_from_slice(&chunk[..n]);
    }
}

/// A metric's value from `/metrics`, asked on `stream`.
fn metric(stream: &mut TcpStream, name: &str) -> u64 {
    let (_, body) = get_on(stream, "/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
        .parse()
        .unwrap()
}

#[test]
fn connections_past_the_bound_are_told_so_and_closed() {
    let resp_port = free_ports(1)[0];
    let resp_addr = format!("127.0.0.1:{resp_port}");
    let c = Cluster::start_with(1, &["--max-connections", "2"], move |_| {
        vec!["--resp-addr".into(), resp_addr.clone()]
    });
    // Two connections held open: one HTTP, one on the binary port.
    let mut held_http = TcpStream::connect(c.http_addr(0)).unwrap();
    let held_binary = TcpStream::connect(c.client_addr(0)).unwrap();
    assert_eq!(get_on(&mut held_http, "/health").0, 200);
    eventually("both held connections counted", || {
        metric(&mut held_http, "dynamo_client_connections") == 2
    });

    // A third, on either port, is refused in its own protocol.
    let mut http = TcpStream::connect(c.http_addr(0)).unwrap();
    let (raw, closed) = read_until_closed(&mut http, Duration::from_secs(10));
    let text = String::from_utf8_lossy(&raw);
    assert!(closed, "{text}");
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("at most 2 client connections"), "{text}");

    let mut binary = TcpStream::connect(c.client_addr(0)).unwrap();
    let (raw, closed) = read_until_closed(&mut binary, Duration::from_secs(10));
    assert!(closed);
    let envelope: ClientReplyEnvelope = FrameCodec::new(1 << 20).decode_exact(&raw).unwrap();
    match envelope.reply {
        ClientReply::Error(ClientError::Unavailable(m)) => {
            assert!(m.contains("--max-connections"), "{m}")
        }
        other => panic!("{other:?}"),
    }

    let mut resp = TcpStream::connect(("127.0.0.1", resp_port)).unwrap();
    let (raw, closed) = read_until_closed(&mut resp, Duration::from_secs(10));
    assert!(closed);
    assert_eq!(raw, b"-ERR max number of clients reached\r\n");

    // The held connections still work; once one closes, its place is free.
    assert_eq!(get_on(&mut held_http, "/kv/k").0, 404);
    assert_eq!(
        metric(&mut held_http, "dynamo_client_connections_refused_total"),
        3
    );
    drop(held_binary);
    eventually("the closed connection's place is freed", || {
        metric(&mut held_http, "dynamo_client_connections") == 1
    });
    assert_eq!(c.get(0, "/health").status, 200);
}
