//! End-to-end tests of the HTTP front end against hostile or careless clients:
//! clients that stall mid-request, and error answers that must say what to
//! change. Each one runs real `dynamo server` processes on loopback.
#![cfg(not(madsim))]

mod common;

use common::{read_until_closed, Cluster};
use std::io::Write as _;
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Slack on top of a server-side deadline for a busy machine.
const SLACK: Duration = Duration::from_secs(15);

/// The status and body of a raw HTTP answer.
fn status_and_body(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// A raw connection to node 0's HTTP port that has sent `bytes`.
fn send_raw(c: &Cluster, bytes: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(c.http_addr(0)).unwrap();
    stream.write_all(bytes).unwrap();
    stream
}

#[test]
fn a_405_names_the_methods_the_path_allows() {
    let c = Cluster::start(1, &[]);
    for (method, path, allowed) in [
        ("POST", "/kv/k", "PUT"),
        ("PATCH", "/kv/k", "DELETE"),
        ("DELETE", "/health", "GET"),
        ("POST", "/", "GET"),
    ] {
        let resp = c.http(0, method, path, &[], b"v");
        assert_eq!(resp.status, 405, "{method} {path}");
        let allow = resp.header("allow").expect("an Allow header").to_string();
        assert!(allow.contains(allowed), "{method} {path}: Allow {allow}");
        // The message names the allowed methods too: it said "use one of:  "
        // with nothing after it, because the Allow header was added after the
        // JSON wrapper had run.
        let msg = resp.json_error();
        assert!(
            msg.contains(&format!("use one of: {allow}")),
            "{method} {path}: {msg}"
        );
    }
}

#[test]
fn a_put_whose_body_stalls_is_answered_408_and_closed() {
    let c = Cluster::start(1, &[]);
    // The head promises a 1,000,000-byte value; most of it comes, then nothing.
    let mut head =
        b"PUT /kv/stalled HTTP/1.1\r\nhost: x\r\ncontent-length: 1000000\r\n\r\n".to_vec();
    head.extend_from_slice(&[b'v'; 900_000]);
    let mut stalled = send_raw(&c, &head);
    let start = Instant::now();
    let deadline = dynamo_node::http::BODY_READ_TIMEOUT + SLACK;
    let (raw, closed) = read_until_closed(&mut stalled, deadline);
    assert!(
        closed,
        "the node still holds a connection (and 900 KB of its body) stalled for {:?}",
        start.elapsed()
    );
    let (status, body) = status_and_body(&raw);
    assert_eq!(status, 408, "{}", String::from_utf8_lossy(&raw));
    assert!(body.contains("did not arrive within"), "{body}");
    // Nothing was written, and the node serves others as before.
    assert_eq!(c.get(0, "/kv/stalled").status, 404);
    assert_eq!(c.put(0, "/kv/fine", None, b"v").status, 204);
}

/// A client that sends part of a request head, or connects and sends
/// nothing, must not hold a connection (a file descriptor and up to ~400 KB of
/// head buffer) for as long as it likes: hyper's 30 s header-read timeout is
/// off because `axum::serve` gives hyper no timer.
#[test]
fn a_stalled_request_head_is_closed() {
    let c = Cluster::start(1, &[]);
    let mut partial = send_raw(&c, b"GET /kv/k HTTP/1.1\r\nhost: x\r\nx-slow: ");
    let mut silent = send_raw(&c, b"");
    let deadline = dynamo_node::http::HEADER_READ_TIMEOUT + SLACK;
    let (_, closed) = read_until_closed(&mut partial, deadline);
    assert!(closed, "a half-sent request head is held past {deadline:?}");
    let (_, closed) = read_until_closed(&mut silent, SLACK);
    assert!(closed, "a connection that never sent a byte is held");
}

/// A client that sends requests and then reads nothing must not hold the
/// connection, and the answers being sent to it, for as long as it likes.
#[test]
fn a_client_that_reads_no_answer_is_dropped() {
    let c = Cluster::start(1, &[]);
    let value = vec![b'v'; 1 << 20];
    assert_eq!(c.put(0, "/kv/big", None, &value).status, 204);
    // 40 pipelined reads of 1 MiB: far more than the sockets' buffers hold,
    // so the node's writes stop making progress.
    const READS: usize = 40;
    let mut reader = send_raw(
        &c,
        &b"GET /kv/big HTTP/1.1\r\nhost: x\r\n\r\n".repeat(READS),
    );
    std::thread::sleep(dynamo_node::http::WRITE_STALL_TIMEOUT + Duration::from_secs(5));
    // Now read: what the sockets held arrives, then the end of the connection,
    // not every answer.
    let (raw, closed) = read_until_closed(&mut reader, SLACK);
    let answers = raw.windows(12).filter(|w| w == b"HTTP/1.1 200").count();
    assert!(
        closed,
        "the connection is still open ({answers} answers read)"
    );
    assert!(
        answers < READS,
        "all {answers} answers arrived: nothing was dropped"
    );
    // The node serves others as before.
    assert_eq!(c.get(0, "/kv/big").status, 200);
}
