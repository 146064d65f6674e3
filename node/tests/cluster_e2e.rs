//! End-to-end tests of real `dynamo server` processes on loopback: the HTTP API,
//! siblings and their resolution, node failure, durability across `kill -9`,
//! hostile input, graceful shutdown, `/cluster`, and cluster-id checks.
//!
//! Every cluster is N = 3, R = 2, W = 2 unless a test says otherwise. The
//! harness (tests/common) kills every process when a test ends, pass or fail,
//! and prints the nodes' log tails when one fails.

mod common;

use common::{decode_b64_list, read_until_closed, wait_until, Cluster, CONDITION_DEADLINE};
use dynamo_proto::{
    ClientEnvelope, ClientError, ClientReply, ClientReplyEnvelope, ClientRequest, ClusterId,
    FrameCodec, Hello, NodeId, PeerMessage, WriteMode,
};
use serde_json::Value;
use std::io::{Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// How long a process may take to exit after SIGTERM on a busy machine.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(15);

fn sorted(mut v: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    v.sort();
    v
}

/// A GET that must answer 300: its siblings (sorted) and its context.
fn siblings(c: &Cluster, i: usize, key: &str) -> (Vec<Vec<u8>>, String) {
    let resp = c.get(i, &format!("/kv/{key}"));
    assert_eq!(resp.status, 300, "GET {key}: {}", resp.text());
    let body = resp.json();
    let context = body["context"].as_str().expect("a context").to_string();
    assert_eq!(
        resp.context(),
        Some(context.as_str()),
        "header and body context agree"
    );
    (sorted(decode_b64_list(&body["siblings"])), context)
}

/// A GET that must answer 200: the value and its context.
fn get_one(c: &Cluster, i: usize, key: &str) -> (Vec<u8>, String) {
    let resp = c.get(i, &format!("/kv/{key}"));
    assert_eq!(resp.status, 200, "GET {key} on n{}: {}", i + 1, resp.text());
    let ctx = resp.context().expect("a 200 carries a context").to_string();
    assert!(!ctx.is_empty());
    (resp.body, ctx)
}

/// A PUT that must answer 204: the context of the write.
fn put_ok(c: &Cluster, i: usize, path: &str, context: Option<&str>, value: &[u8]) -> String {
    let resp = c.put(i, path, context, value);
    assert_eq!(
        resp.status,
        204,
        "PUT {path} on n{}: {}",
        i + 1,
        resp.text()
    );
    assert!(resp.body.is_empty());
    resp.context().expect("a 204 carries a context").to_string()
}

#[test]
fn put_get_delete_over_http() {
    let c = Cluster::start(3, &[]);
    c.wait_connected();

    let ctx = put_ok(&c, 0, "/kv/alpha", None, b"hello world");
    assert!(!ctx.is_empty());
    // Any node coordinates a read of what another node coordinated.
    for i in 0..3 {
        let (value, _) = get_one(&c, i, "alpha");
        assert_eq!(value, b"hello world");
    }
    let resp = c.get(1, "/kv/alpha");
    assert_eq!(
        resp.header("content-type"),
        Some("application/octet-stream")
    );

    // Binary values and keys with slashes and percent escapes round-trip.
    let value: Vec<u8> = (0..=255u8).collect();
    put_ok(&c, 1, "/kv/dir%2Fsub/%FFbin", None, &value);
    let (got, _) = get_one(&c, 2, "dir%2Fsub/%FFbin");
    assert_eq!(got, value);

    // An update with the context read supersedes the old value: no siblings.
    let (_, read_ctx) = get_one(&c, 2, "alpha");
    put_ok(&c, 2, "/kv/alpha", Some(&read_ctx), b"second");
    let (value, ctx2) = get_one(&c, 0, "alpha");
    assert_eq!(value, b"second");

    // Delete with the context read, then the key is gone everywhere.
    let resp = c.http(
        1,
        "DELETE",
        "/kv/alpha",
        &[("X-Dynamo-Context", &ctx2)],
        b"",
    );
    assert_eq!(resp.status, 204, "{}", resp.text());
    assert!(resp.context().is_some_and(|c| !c.is_empty()));
    for i in 0..3 {
        let resp = c.get(i, "/kv/alpha");
        assert_eq!(resp.status, 404, "n{}: {}", i + 1, resp.text());
        assert_eq!(resp.json_error(), "not found");
    }

    // A key never written is a plain 404 without a context.
    let resp = c.get(0, "/kv/never-written");
    assert_eq!(resp.status, 404);
    assert_eq!(resp.context(), None);
    assert_eq!(resp.json_error(), "not found");
}

#[test]
fn concurrent_writes_make_siblings_that_a_context_write_resolves() {
    let c = Cluster::start(3, &[]);
    c.wait_connected();

    // Two blind writes through different coordinators are concurrent.
    put_ok(&c, 0, "/kv/blind", None, b"left");
    put_ok(&c, 1, "/kv/blind", None, b"right");
    let (values, ctx) = siblings(&c, 2, "blind");
    assert_eq!(values, vec![b"left".to_vec(), b"right".to_vec()]);
    // Writing with the 300's context resolves them.
    put_ok(&c, 2, "/kv/blind", Some(&ctx), b"left+right");
    for i in 0..3 {
        let (value, _) = get_one(&c, i, "blind");
        assert_eq!(value, b"left+right");
    }

    // Two writes with the same context read earlier are concurrent too, and
    // both supersede the value that context covered.
    put_ok(&c, 0, "/kv/shared", None, b"base");
    let (base, read_ctx) = get_one(&c, 1, "shared");
    assert_eq!(base, b"base");
    put_ok(&c, 0, "/kv/shared", Some(&read_ctx), b"one");
    put_ok(&c, 1, "/kv/shared", Some(&read_ctx), b"two");
    let (values, ctx) = siblings(&c, 0, "shared");
    assert_eq!(values, vec![b"one".to_vec(), b"two".to_vec()]);
    put_ok(&c, 1, "/kv/shared", Some(&ctx), b"one,two");
    let (value, _) = get_one(&c, 2, "shared");
    assert_eq!(value, b"one,two");
}

#[test]
fn writes_and_reads_survive_kill9_of_one_node() {
    let c = &mut Cluster::start(3, &[]);
    c.wait_connected();
    for k in 0..5 {
        put_ok(
            c,
            k % 3,
            &format!("/kv/before-{k}"),
            None,
            format!("b{k}").as_bytes(),
        );
    }

    c.kill9(2);

    // Every request goes through a survivor; 2 of 3 replicas are alive, so W = 2
    // and R = 2 are met even where a coordinator waits on the dead one.
    for k in 0..8 {
        let writer = k % 2;
        let reader = 1 - writer;
        put_ok(
            c,
            writer,
            &format!("/kv/during-{k}"),
            None,
            format!("d{k}").as_bytes(),
        );
        let (value, _) = get_one(c, reader, &format!("during-{k}"));
        assert_eq!(value, format!("d{k}").as_bytes());
    }
    for k in 0..5 {
        let (value, _) = get_one(c, k % 2, &format!("before-{k}"));
        assert_eq!(value, format!("b{k}").as_bytes());
    }
    // W = 3 cannot be met with a replica dead: 503 naming the quorum.
    let resp = c.put(0, "/kv/needs-three?w=3", None, b"x");
    assert_eq!(resp.status, 503, "{}", resp.text());
    let body = resp.json();
    assert_eq!(body["needed"], 3, "{body}");
    assert!(body["error"].as_str().unwrap().contains("quorum"), "{body}");

    // Back from the dead, the node rejoins: W = 3 works again (once the
    // survivors have reconnected to it).
    // Each attempt writes its own key: a blind write that timed out may still
    // have been applied, and a second one to the same key would be a sibling.
    c.restart(2);
    let mut attempt = 0;
    let key = wait_until(
        "a w=3 write to succeed after the restart",
        CONDITION_DEADLINE,
        || {
            attempt += 1;
            let key = format!("after-restart-{attempt}");
            let resp = c.put(0, &format!("/kv/{key}?w=3"), None, b"all three");
            (resp.status == 204).then_some(key)
        },
    );
    let (value, _) = get_one(c, 2, &key);
    assert_eq!(value, b"all three");
}

#[test]
fn acknowledged_w3_writes_survive_kill9_and_restart_locally() {
    let c = &mut Cluster::start(3, &["--sync", "always"]);
    c.wait_connected();
    let keys: Vec<String> = (0..20).map(|k| format!("durable-{k}")).collect();
    for (k, key) in keys.iter().enumerate() {
        // Coordinated by every node in turn, including the one about to die.
        put_ok(
            c,
            k % 3,
            &format!("/kv/{key}?w=3"),
            None,
            format!("value-{k}").as_bytes(),
        );
    }

    c.kill9(1);
    c.restart(1);

    // Only local reads on the restarted node: no quorum read could have
    // repaired anything since the kill.
    for (k, key) in keys.iter().enumerate() {
        let stored = c
            .local_values(1, key)
            .unwrap_or_else(|| panic!("n2 lost the acknowledged write of {key}"));
        assert!(
            stored.contains(&format!("value-{k}").into_bytes()),
            "n2 stores {stored:?} for {key}"
        );
    }
    assert_eq!(c.local_values(1, "never-written"), None);
}

// ---------------------------------------------------------------------------
// Hostile input

/// Deterministic junk that cannot start with the frame magic.
fn junk(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    out[0] = 0;
    out
}

/// A frame header: magic, the protocol version, payload length.
fn header(len: u32) -> Vec<u8> {
    let mut h = dynamo_proto::frame::MAGIC.to_vec();
    h.extend_from_slice(&dynamo_proto::PROTOCOL_VERSION.to_be_bytes());
    h.extend_from_slice(&len.to_be_bytes());
    h
}

/// What arrives on a fresh connection after sending `bytes` (and, with
/// `close_write`, shutting down the write half): the bytes and whether the
/// node closed the connection.
fn send_raw(addr: SocketAddr, bytes: &[u8], close_write: bool) -> (Vec<u8>, bool) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.write_all(bytes).unwrap();
    s.flush().unwrap();
    if close_write {
        s.shutdown(Shutdown::Write).unwrap();
    }
    read_until_closed(&mut s, Duration::from_secs(20))
}

/// One request over the binary client protocol on a fresh connection.
fn client_call(addr: SocketAddr, id: u64, request: ClientRequest) -> ClientReply {
    let codec = FrameCodec::default();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let frame = codec.encode(&ClientEnvelope { id, request }).unwrap();
    s.write_all(&frame).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((env, _)) = codec.decode::<ClientReplyEnvelope>(&buf).unwrap() {
            assert_eq!(env.id, id);
            return env.reply;
        }
        let n = s.read(&mut chunk).expect("reading a client reply");
        assert!(n > 0, "the node closed the connection without replying");
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn assert_serving(c: &Cluster, i: usize, key: &str) {
    let resp = c.get(i, "/health");
    assert_eq!(resp.status, 200, "{}", resp.text());
    put_ok(c, i, &format!("/kv/{key}"), None, key.as_bytes());
    let (value, _) = get_one(c, i, key);
    assert_eq!(value, key.as_bytes());
}

#[test]
fn hostile_bytes_on_peer_and_client_ports_close_only_that_connection() {
    let c = Cluster::start(3, &["--max-value-bytes", "1000"]);
    c.wait_connected();
    let codec = FrameCodec::default();

    let mut truncated = header(100);
    truncated.extend_from_slice(&[7; 20]);
    let mut bad_payload = header(8);
    bad_payload.extend_from_slice(&[0xff; 8]);
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        (
            "an HTTP request",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            false,
        ),
        ("random bytes", junk(512), false),
        ("a huge length", header(u32::MAX), false),
        ("an undecodable payload", bad_payload, false),
        ("a truncated frame, then close", truncated, true),
    ];

    // Peer port: the node refuses with HelloRejected naming the problem, closes
    // that connection, and nothing else changes.
    for (case, (what, bytes, close_write)) in cases.iter().enumerate() {
        let (reply, closed) = send_raw(c.peer_addr(0), bytes, *close_write);
        assert!(closed, "peer port kept the connection open after {what}");
        match codec.decode::<PeerMessage>(&reply) {
            Ok(Some((PeerMessage::HelloRejected { reason }, used))) => {
                assert!(reason.contains("malformed"), "{what}: {reason}");
                assert_eq!(used, reply.len(), "{what}: nothing after the refusal");
            }
            other => panic!("{what} on the peer port: expected HelloRejected, got {other:?}"),
        }
        assert_serving(&c, 0, &format!("after-peer-garbage-{case}"));
    }

    // Client port: one Invalid error reply (id 0) saying the frame was
    // malformed, then the connection closes.
    for (case, (what, bytes, close_write)) in cases.iter().enumerate() {
        let (reply, closed) = send_raw(c.client_addr(1), bytes, *close_write);
        assert!(closed, "client port kept the connection open after {what}");
        if *close_write && reply.is_empty() {
            // A frame cut short by the client's own close: nothing to answer.
        } else {
            let (env, used) = codec
                .decode::<ClientReplyEnvelope>(&reply)
                .unwrap_or_else(|e| panic!("{what}: undecodable reply {reply:?}: {e}"))
                .unwrap_or_else(|| panic!("{what}: incomplete reply {reply:?}"));
            assert_eq!(used, reply.len(), "{what}: one reply only");
            assert_eq!(env.id, 0);
            match env.reply {
                ClientReply::Error(ClientError::Invalid(msg)) => {
                    assert!(msg.contains("malformed"), "{what}: {msg}")
                }
                other => panic!("{what}: expected Error(Invalid), got {other:?}"),
            }
        }
        assert_serving(&c, 1, &format!("after-client-garbage-{case}"));
    }

    // The binary protocol still works, and agrees with HTTP.
    match client_call(c.client_addr(1), 7, ClientRequest::Ping) {
        ClientReply::Pong { node } => assert_eq!(node, NodeId::new("n2")),
        other => panic!("expected Pong, got {other:?}"),
    }
    let put = ClientRequest::Put {
        key: b"via-binary".to_vec(),
        value: Some(b"framed".to_vec()),
        context: None,
        w: None,
        mode: WriteMode::Context,
    };
    match client_call(c.client_addr(1), 8, put) {
        ClientReply::Put { .. } => {}
        other => panic!("expected Put, got {other:?}"),
    }
    let (value, _) = get_one(&c, 2, "via-binary");
    assert_eq!(value, b"framed");
    // Every node is still healthy.
    for i in 0..3 {
        assert_eq!(c.get(i, "/health").status, 200);
    }
}

#[test]
fn http_rejects_invalid_input_with_json_errors() {
    let c = Cluster::start(3, &["--max-value-bytes", "1000"]);
    c.wait_connected();

    // Values: exactly the limit is fine, one byte more is 413 naming both sizes.
    put_ok(&c, 0, "/kv/at-limit", None, &[b'v'; 1000]);
    let resp = c.put(0, "/kv/too-big", None, &[b'v'; 1001]);
    assert_eq!(resp.status, 413, "{}", resp.text());
    let msg = resp.json_error();
    assert!(
        msg.contains("1001 bytes") && msg.contains("1000 bytes"),
        "{msg}"
    );

    // Keys: longer than --max-key-bytes (default 1024) is 413.
    let long_key = "k".repeat(2000);
    let resp = c.put(0, &format!("/kv/{long_key}"), None, b"v");
    assert_eq!(resp.status, 413, "{}", resp.text());
    assert!(resp.json_error().contains("2000 bytes"));

    // Syntax errors are 400 with a JSON message naming the culprit.
    let resp = c.get(0, "/kv/at-limit?r=abc");
    assert_eq!(resp.status, 400);
    assert!(resp.json_error().contains("r=abc"));
    let resp = c.put(0, "/kv/k", Some("!!not-a-token"), b"v");
    assert_eq!(resp.status, 400);
    assert!(resp.json_error().contains("X-Dynamo-Context"));
    let resp = c.get(0, "/kv/k?bogus=1");
    assert_eq!(resp.status, 400);
    assert!(resp.json_error().contains("bogus"));

    // Out-of-range quorums are refused by the core's validation (1..=N).
    let resp = c.put(0, "/kv/k?w=4", None, b"v");
    assert_eq!(resp.status, 400, "{}", resp.text());
    assert!(resp.json_error().contains("1..=3"), "{}", resp.text());
    let resp = c.get(0, "/kv/at-limit?r=0");
    assert_eq!(resp.status, 400, "{}", resp.text());
    assert!(resp.json_error().contains("1..=3"), "{}", resp.text());

    // Unknown routes and methods are JSON too.
    let resp = c.get(0, "/nope");
    assert_eq!(resp.status, 404);
    assert!(resp.json_error().contains("/kv/{key}"));
    let resp = c.http(0, "POST", "/kv/k", &[], b"v");
    assert_eq!(resp.status, 405);
    assert!(resp.json_error().contains("method not allowed"));

    // None of it disturbed the node; none of the refused writes happened.
    assert_serving(&c, 0, "still-fine");
    assert_eq!(c.get(1, "/kv/too-big").status, 404);
    assert_eq!(c.get(1, "/kv/k").status, 404);
}

// ---------------------------------------------------------------------------
// Lifecycle

#[test]
fn sigterm_exits_zero_and_keeps_acknowledged_writes() {
    // With interval syncing an acknowledged write may not be on disk yet: a
    // graceful stop must sync it.
    let c = &mut Cluster::start(3, &["--sync", "interval:5000"]);
    c.wait_connected();
    let keys: Vec<String> = (0..10).map(|k| format!("graceful-{k}")).collect();
    for (k, key) in keys.iter().enumerate() {
        put_ok(
            c,
            1,
            &format!("/kv/{key}"),
            None,
            format!("g{k}").as_bytes(),
        );
    }

    // A client stalled halfway through a request body, never to send the
    // rest, does not hold the stop up (it did, for as long as it kept the
    // connection open).
    let mut stalled = std::net::TcpStream::connect(c.http_addr(1)).unwrap();
    stalled
        .write_all(b"PUT /kv/stalled HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nabc")
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));

    let start = Instant::now();
    c.sigterm(1);
    let status = c.wait_exit(1, SHUTDOWN_DEADLINE);
    let took = start.elapsed();
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}"
    );
    assert!(
        c.log(1).contains("stopped cleanly"),
        "{}",
        c.log_tail(1, 30)
    );
    eprintln!("n2 stopped {took:?} after SIGTERM");
    drop(stalled);

    // The survivors keep serving while n2 is down.
    put_ok(c, 0, "/kv/while-down", None, b"x");

    c.restart(1);
    for (k, key) in keys.iter().enumerate() {
        let stored = c
            .local_values(1, key)
            .unwrap_or_else(|| panic!("n2 lost {key} across a graceful restart"));
        assert!(
            stored.contains(&format!("g{k}").into_bytes()),
            "n2 stores {stored:?} for {key}"
        );
    }
}

/// The value of the one sample `name` (labels included) on a `/metrics` page.
fn sample(page: &str, name: &str) -> f64 {
    let values: Vec<f64> = page
        .lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .collect();
    assert_eq!(values.len(), 1, "{name} on\n{page}");
    values[0]
}

#[test]
fn metrics_count_requests_group_commits_and_peer_traffic() {
    let c = Cluster::start(3, &[]);
    c.wait_connected();
    for (i, key) in ["m1", "m2", "m3"].iter().enumerate() {
        put_ok(
            &c,
            0,
            &format!("/kv/{key}"),
            None,
            format!("v{i}").as_bytes(),
        );
    }
    get_one(&c, 0, "m1");
    get_one(&c, 0, "m2");
    assert_eq!(c.get(0, "/kv/never").status, 404);

    let resp = c.get(0, "/metrics");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        resp.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let page = resp.text();
    let info = format!(
        "dynamo_node_info{{node=\"{}\",version=\"{}\"}}",
        c.name(0),
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(sample(&page, &info), 1.0);
    // This node's front end submitted them, whoever coordinated.
    let requests = |kind: &str, outcome: &str| {
        sample(
            &page,
            &format!("dynamo_client_requests_total{{kind=\"{kind}\",outcome=\"{outcome}\"}}"),
        )
    };
    assert_eq!(requests("put", "ok"), 3.0);
    // A missing key is an answered get, not an error.
    assert_eq!(requests("get", "ok"), 3.0);
    assert_eq!(requests("put", "quorum"), 0.0);
    assert_eq!(
        sample(
            &page,
            "dynamo_client_request_duration_seconds_count{kind=\"put\"}"
        ),
        3.0
    );
    assert_eq!(sample(&page, "dynamo_client_requests_in_flight"), 0.0);
    assert_eq!(sample(&page, "dynamo_peers"), 2.0);
    assert_eq!(sample(&page, "dynamo_peers_reachable"), 2.0);
    assert!(
        sample(&page, "dynamo_peer_messages_sent_total") > 0.0,
        "{page}"
    );
    assert!(
        sample(&page, "dynamo_peer_messages_received_total") > 0.0,
        "{page}"
    );

    // Every node holds a replica of every key (N = 3 of 3): three writes reach
    // each one's storage worker (the third replica's may land after the W = 2
    // answer), in group commits that each synced once (read once no batch is
    // between its count and its sync).
    for i in 0..3 {
        let page = wait_until(
            &format!("n{}'s group commits to settle", i + 1),
            CONDITION_DEADLINE,
            || {
                let page = c.get(i, "/metrics").text();
                let batches = sample(&page, "dynamo_storage_batches_total");
                let synced = sample(&page, "dynamo_storage_sync_seconds_count");
                let writes = sample(&page, "dynamo_storage_persist_requests_total");
                (batches == synced && writes >= 3.0).then_some(page)
            },
        );
        assert!(
            sample(&page, "dynamo_storage_persist_requests_total") >= 3.0,
            "n{}: {page}",
            i + 1
        );
        let batches = sample(&page, "dynamo_storage_batches_total");
        assert!(batches >= 1.0, "n{}: {page}", i + 1);
        assert_eq!(
            sample(&page, "dynamo_storage_batch_requests_count"),
            batches
        );
        assert_eq!(sample(&page, "dynamo_storage_failures_total"), 0.0);
    }
}

#[test]
fn cluster_endpoint_lists_members_and_settings() {
    let c = Cluster::start(3, &["--partitions", "64"]);
    c.wait_connected();
    for i in 0..3 {
        let resp = c.get(i, "/cluster");
        assert_eq!(resp.status, 200, "{}", resp.text());
        let body = resp.json();
        assert_eq!(body["cluster_id"], "dynamo", "{body}");
        assert_eq!(body["node"], c.name(i), "{body}");
        assert_eq!(
            (&body["n"], &body["r"], &body["w"], &body["q"]),
            (
                &Value::from(3),
                &Value::from(2),
                &Value::from(2),
                &Value::from(64)
            ),
            "{body}"
        );
        let members = body["members"].as_array().expect("members");
        assert_eq!(members.len(), 3, "{body}");
        let mut total = 0;
        for j in 0..3 {
            let m = members
                .iter()
                .find(|m| m["id"] == c.name(j))
                .unwrap_or_else(|| panic!("{} missing from {body}", c.name(j)));
            assert_eq!(m["peer_addr"], c.peer_addr(j).to_string().as_str(), "{m}");
            assert_eq!(
                m["client_addr"],
                c.client_addr(j).to_string().as_str(),
                "{m}"
            );
            assert_eq!(m["http_addr"], c.http_addr(j).to_string().as_str(), "{m}");
            assert_eq!(m["status"], "up", "{m}");
            let p = m["partitions"].as_u64().expect("partitions");
            assert!(p > 0, "{m}");
            total += p;
        }
        assert_eq!(total, 64, "partitions sum to Q: {body}");
    }
}

#[test]
fn peer_from_another_cluster_is_refused() {
    // n2 claims another cluster: n1 refuses it and is refused by it, so a
    // write needing both replicas cannot be met.
    let c = Cluster::start_with(2, &["--n", "2", "--request-timeout-ms", "1000"], |i| {
        if i == 1 {
            vec!["--cluster-id".into(), "other".into()]
        } else {
            vec![]
        }
    });
    wait_until("n1 to log a refused peer", CONDITION_DEADLINE, || {
        c.log(0).contains("refused a peer").then_some(())
    });
    wait_until("n1 to report n2 unreachable", CONDITION_DEADLINE, || {
        let body = c.get(0, "/cluster").json();
        let n2 = body["members"]
            .as_array()?
            .iter()
            .find(|m| m["id"] == "n2")?
            .clone();
        (n2["status"] == "unreachable").then_some(())
    });
    let resp = c.put(0, "/kv/split?w=2", None, b"v");
    assert_eq!(resp.status, 503, "{}", resp.text());
    let body = resp.json();
    assert_eq!(body["needed"], 2, "{body}");
    assert!(body["error"].as_str().unwrap().contains("quorum"), "{body}");
    // Its own replica is still fine for w=1.
    put_ok(&c, 0, "/kv/alone?w=1", None, b"v");

    // A greeting from another cluster on the peer port: HelloRejected saying why.
    let hello = PeerMessage::Hello(Hello {
        cluster_id: ClusterId("intruders".into()),
        node: NodeId::new("n2"),
        q: 256,
        n: 2,
        client_addr: String::new(),
        http_addr: String::new(),
    });
    let codec = FrameCodec::default();
    let (reply, closed) = send_raw(c.peer_addr(0), &codec.encode(&hello).unwrap(), false);
    assert!(closed);
    match codec.decode::<PeerMessage>(&reply) {
        Ok(Some((PeerMessage::HelloRejected { reason }, _))) => {
            assert!(
                reason.contains("intruders") && reason.contains("dynamo"),
                "{reason}"
            )
        }
        other => panic!("expected HelloRejected, got {other:?}"),
    }
    assert_eq!(c.get(0, "/health").status, 200);
}

#[test]
fn data_dir_of_another_cluster_refuses_to_start() {
    let c = &mut Cluster::start(1, &["--cluster-id", "alpha"]);
    put_ok(c, 0, "/kv/mine", None, b"alpha data");
    c.sigterm(0);
    assert_eq!(c.wait_exit(0, SHUTDOWN_DEADLINE).code(), Some(0));

    c.nodes[0].extra_args = vec!["--cluster-id".into(), "beta".into()];
    let (status, log) = c.start_expecting_exit(0, Duration::from_secs(30));
    assert!(
        !status.success(),
        "started on another cluster's data: {log}"
    );
    assert!(
        log.contains("\"alpha\"") && log.contains("\"beta\""),
        "the error names both cluster ids: {log}"
    );
    assert!(
        log.contains("--cluster-id") && log.contains("--data-dir"),
        "the error says what to do: {log}"
    );

    // The directory is untouched: with the right cluster id it starts and
    // still holds the data.
    c.nodes[0].extra_args = vec!["--cluster-id".into(), "alpha".into()];
    c.restart(0);
    assert_eq!(
        c.local_values(0, "mine"),
        Some(vec![b"alpha data".to_vec()])
    );
}

// ---------------------------------------------------------------------------
// A stuck peer

/// Plays `hello.node` on `listener`: greets the first connection, answers its
/// pings, and returns it unread once the first `Replicate` arrives, for the
/// caller to hold open as a peer that got stuck. `greeted` hears when the
/// greeting went out.
fn fake_peer_until_first_replicate(
    listener: &std::net::TcpListener,
    hello: Hello,
    greeted: std::sync::mpsc::Sender<()>,
) -> TcpStream {
    let codec = FrameCodec::default();
    let (mut s, _) = listener.accept().unwrap();
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        while let Some((msg, used)) = codec.decode::<PeerMessage>(&buf).unwrap() {
            buf.drain(..used);
            let answer = match msg {
                PeerMessage::Hello(_) => {
                    let _ = greeted.send(());
                    PeerMessage::Hello(hello.clone())
                }
                PeerMessage::Ping { seq } => PeerMessage::Pong { seq },
                PeerMessage::Replicate { .. } => return s,
                _ => continue,
            };
            s.write_all(&codec.encode(&answer).unwrap()).unwrap();
        }
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "the node closed its connection to the fake peer");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// `WRITERS` threads each put `PUTS_PER_WRITER` values of `value` to keys named
/// after `prefix` on node `i`, and wait for every answer.
fn put_many(c: &Cluster, i: usize, prefix: &str, value: &[u8]) {
    const WRITERS: usize = 4;
    const PUTS_PER_WRITER: usize = 80;
    std::thread::scope(|s| {
        for t in 0..WRITERS {
            s.spawn(move || {
                for k in 0..PUTS_PER_WRITER {
                    put_ok(c, i, &format!("/kv/{prefix}-{t}-{k}"), None, value);
                }
            });
        }
    });
}

/// A peer that completed the greeting and then stops reading (stuck, or cut
/// off by a partition) fills the node's socket buffers, so the node's next
/// write blocks. The node must still notice within a few seconds: replace the
/// connection, report the peer unreachable, and drop what it cannot send
/// instead of queueing it without bound. It used to show the peer `up` for
/// as long as the write stayed blocked (until TCP gave up, ~15 minutes) while
/// every write's replica piled up in memory.
///
/// The queue is watched through `dynamo_peer_queued_bytes`, not the process's
/// RSS: the storage engine's own memory after the same writes varies by
/// hundreds of MiB from run to run.
#[test]
fn a_peer_that_stops_reading_is_reported_unreachable_and_its_queue_stays_bounded() {
    // What may wait for one peer (MAX_QUEUED_BYTES in peers.rs), plus the one
    // message allowed past it and slack for the estimate.
    const QUEUE_BOUND_BYTES: f64 = (64 << 20) as f64 + 2_000_000.0;
    let value = vec![b'x'; 1_000_000];
    let mut c = Cluster::start(2, &["--n", "2", "--r", "1", "--w", "1"]);
    c.wait_connected();
    // n2 hands its peer port to a fake n2 that this test controls.
    let fake_addr = c.peer_addr(1);
    let hello = Hello {
        cluster_id: ClusterId("dynamo".into()),
        node: NodeId::new("n2"),
        q: 256,
        n: 2,
        client_addr: c.client_addr(1).to_string(),
        http_addr: c.http_addr(1).to_string(),
    };
    c.kill9(1);
    let listener = wait_until("the fake n2 to bind n2's port", CONDITION_DEADLINE, || {
        std::net::TcpListener::bind(fake_addr).ok()
    });
    let (greeted_tx, greeted_rx) = std::sync::mpsc::channel();
    let fake = std::thread::spawn(move || {
        let stuck = fake_peer_until_first_replicate(&listener, hello, greeted_tx);
        // Never accepted again: later connections wait in the backlog
        // unanswered, as a stuck process's would.
        (listener, stuck)
    });
    greeted_rx
        .recv_timeout(CONDITION_DEADLINE)
        .expect("n1 to connect to the fake n2");
    let n2_status = |c: &Cluster| -> String {
        let body = c.get(0, "/cluster").json();
        let members = body["members"].as_array().expect("members").clone();
        let n2 = members.iter().find(|m| m["id"] == "n2").expect("n2");
        n2["status"].as_str().unwrap_or_default().to_string()
    };
    wait_until("n1 to see the fake n2 up", CONDITION_DEADLINE, || {
        (n2_status(&c) == "up").then_some(())
    });
    put_ok(&c, 0, "/kv/first", None, &value);
    // From here on the fake n2 reads nothing.
    let _stuck = fake.join().unwrap();

    let done = std::sync::atomic::AtomicBool::new(false);
    let started = Instant::now();
    let most_queued = std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            let mut most = 0.0f64;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(resp) = c.try_http(0, "GET", "/metrics", &[], b"") {
                    let queued = resp
                        .text()
                        .lines()
                        .find_map(|l| l.strip_prefix("dynamo_peer_queued_bytes ")?.parse().ok());
                    most = most.max(queued.unwrap_or(0.0));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            most
        });
        put_many(&c, 0, "stuck", &value);
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        watcher.join().unwrap()
    });
    let put_time = started.elapsed();
    let noticed = wait_until(
        "n1 to report the stuck n2 unreachable",
        Duration::from_secs(10),
        || (n2_status(&c) == "unreachable").then(|| started.elapsed()),
    );
    eprintln!(
        "puts took {put_time:?}; n2 unreachable by {noticed:?}; at most {most_queued} bytes queued"
    );
    let page = c.get(0, "/metrics").text();
    assert!(
        most_queued > 0.0 && most_queued <= QUEUE_BOUND_BYTES,
        "at most {most_queued} bytes were queued for n2\n{page}"
    );
    assert!(
        sample(&page, "dynamo_peer_messages_dropped_total") > 0.0,
        "{page}"
    );
    assert!(
        c.log(0).contains("the connection looks stuck"),
        "{}",
        c.log_tail(0, 20)
    );
    // What waited for n2 is dropped once the attempt to reach it again fails.
    wait_until("n1's queue for n2 to empty", CONDITION_DEADLINE, || {
        let page = c.get(0, "/metrics").text();
        (sample(&page, "dynamo_peer_queued_bytes") == 0.0).then_some(())
    });
    // n1 itself is fine.
    put_ok(&c, 0, "/kv/after", None, b"v");
    assert_eq!(c.get(0, "/health").status, 200);
}
