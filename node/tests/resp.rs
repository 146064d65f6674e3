//! End-to-end tests of the Redis-protocol front end: a real 3-node cluster
//! (N = 3, R = 2, W = 2) with `--resp-addr` on every node, driven over plain
//! `std::net::TcpStream`s.

mod common;

use common::{
    free_ports, proc_status_bytes, read_until_closed, wait_until, watch_peak_rss, Cluster,
    CONDITION_DEADLINE,
};
use dynamo_node::resp::parse::encode_command;
use dynamo_node::resp::Reply;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

const MAX_VALUE: usize = 4096;

/// A 3-node cluster serving RESP; the RESP addresses by node.
fn cluster() -> (Cluster, Vec<SocketAddr>) {
    let ports = free_ports(3);
    let addrs: Vec<SocketAddr> = ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}").parse().unwrap())
        .collect();
    let resp = addrs.clone();
    let max_value = MAX_VALUE.to_string();
    let c = Cluster::start_with(3, &["--max-value-bytes", &max_value], move |i| {
        vec!["--resp-addr".into(), resp[i].to_string()]
    });
    c.wait_connected();
    (c, addrs)
}

/// A blocking RESP client.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connecting to RESP at {addr}: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let _ = stream.set_nodelay(true);
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    fn read(&mut self) -> Reply {
        loop {
            if let Some((reply, used)) = Reply::decode(&self.buf).expect("a RESP2 reply") {
                self.buf.drain(..used);
                return reply;
            }
            let mut chunk = [0u8; 64 * 1024];
            let n = self.stream.read(&mut chunk).expect("reading a reply");
            assert!(n > 0, "the server closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn call(&mut self, args: &[&[u8]]) -> Reply {
        let mut out = Vec::new();
        encode_command(args, &mut out);
        self.send(&out);
        self.read()
    }

    fn cmd(&mut self, args: &[&str]) -> Reply {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.call(&args)
    }

    fn error(&mut self, args: &[&str]) -> String {
        match self.cmd(args) {
            Reply::Error(e) => e,
            other => panic!("{args:?}: expected an error, got {other:?}"),
        }
    }
}

fn bulk(s: &str) -> Reply {
    Reply::bulk(s)
}

fn ok() -> Reply {
    Reply::ok()
}

/// `DYNAMO.GETALL`: the context token and the live values, sorted.
fn getall(c: &mut Client, key: &str) -> (String, Vec<Vec<u8>>) {
    match c.cmd(&["DYNAMO.GETALL", key]) {
        Reply::Array(items) => {
            let mut it = items.into_iter();
            let Some(Reply::Bulk(ctx)) = it.next() else {
                panic!("GETALL {key}: no context first");
            };
            let mut values: Vec<Vec<u8>> = it
                .map(|r| match r {
                    Reply::Bulk(v) => v,
                    other => panic!("GETALL {key}: {other:?} is not a value"),
                })
                .collect();
            values.sort();
            (String::from_utf8(ctx).unwrap(), values)
        }
        other => panic!("GETALL {key}: {other:?}"),
    }
}

#[test]
fn redis_commands_against_a_cluster() {
    let (mut c, resp) = cluster();
    let mut n1 = Client::connect(resp[0]);
    let mut n2 = Client::connect(resp[1]);
    let mut n3 = Client::connect(resp[2]);

    assert_eq!(n1.cmd(&["PING"]), Reply::Simple("PONG".into()));
    assert_eq!(n1.cmd(&["PING", "hi"]), bulk("hi"));
    assert_eq!(n1.cmd(&["ECHO", "x y"]), bulk("x y"));

    // SET then GET, through any node; binary-safe values.
    assert_eq!(n1.call(&[b"SET", b"alpha", b"one\r\n\x00two"]), ok());
    for client in [&mut n1, &mut n2, &mut n3] {
        assert_eq!(
            client.cmd(&["GET", "alpha"]),
            Reply::bulk(&b"one\r\n\x00two"[..])
        );
    }
    // A SET through the same node replaces the value, no sibling.
    assert_eq!(n1.cmd(&["SET", "alpha", "uno"]), ok());
    assert_eq!(n2.cmd(&["GET", "alpha"]), bulk("uno"));
    assert_eq!(getall(&mut n3, "alpha").1, vec![b"uno".to_vec()]);
    // Missing keys read as nil.
    assert_eq!(n2.cmd(&["GET", "nothing-here"]), Reply::Nil);

    // MSET / MGET / EXISTS / DEL.
    assert_eq!(n2.cmd(&["MSET", "k1", "v1", "k2", "v2", "k3", "v3"]), ok());
    assert_eq!(
        n3.cmd(&["MGET", "k1", "nope", "k3", "k2"]),
        Reply::Array(vec![bulk("v1"), Reply::Nil, bulk("v3"), bulk("v2")])
    );
    assert_eq!(
        n1.cmd(&["EXISTS", "k1", "k2", "nope", "k1"]),
        Reply::Integer(3)
    );
    assert_eq!(n1.cmd(&["DEL", "k1", "k2", "nope"]), Reply::Integer(2));
    assert_eq!(n3.cmd(&["EXISTS", "k1", "k2", "k3"]), Reply::Integer(1));
    assert_eq!(n2.cmd(&["GET", "k1"]), Reply::Nil);
    assert_eq!(n2.cmd(&["DEL", "k1"]), Reply::Integer(0));
    // A deleted key can be written again.
    assert_eq!(n3.cmd(&["SET", "k1", "again"]), ok());
    assert_eq!(n1.cmd(&["GET", "k1"]), bulk("again"));

    // 100 pipelined SETs in one write: 100 +OK, then every value is there.
    let mut pipeline = Vec::new();
    for i in 0..100 {
        encode_command(&["SET", &format!("p{i}"), &format!("v{i}")], &mut pipeline);
    }
    n2.send(&pipeline);
    for i in 0..100 {
        assert_eq!(n2.read(), ok(), "reply {i} of the pipeline");
    }
    let mut gets = Vec::new();
    for i in 0..100 {
        encode_command(&["GET", &format!("p{i}")], &mut gets);
    }
    n3.send(&gets);
    for i in 0..100 {
        assert_eq!(n3.read(), bulk(&format!("v{i}")), "GET p{i}");
    }
    // Same-key commands of one pipeline take effect in order.
    let mut same = Vec::new();
    encode_command(&["SET", "seq", "1"], &mut same);
    encode_command(&["GET", "seq"], &mut same);
    encode_command(&["SET", "seq", "2"], &mut same);
    encode_command(&["GET", "seq"], &mut same);
    n1.send(&same);
    assert_eq!(
        (n1.read(), n1.read(), n1.read(), n1.read()),
        (ok(), bulk("1"), ok(), bulk("2"))
    );

    // Inline commands, as typed into telnet.
    n3.send(b"set inline \"a b\"\r\nget inline\r\n");
    assert_eq!((n3.read(), n3.read()), (ok(), bulk("a b")));

    // Errors say what is wrong.
    assert_eq!(
        n1.error(&["FLUSHALL", "ASYNC"]),
        "ERR unknown command 'FLUSHALL', with args beginning with: 'ASYNC' "
    );
    assert!(n1.error(&["SET", "k", "v", "NX"]).contains("not supported"));
    assert_eq!(
        n1.error(&["GET"]),
        "ERR wrong number of arguments for 'get' command"
    );
    let too_big = "x".repeat(MAX_VALUE + 1);
    let e = n1.error(&["SET", "big", &too_big]);
    assert!(e.starts_with("ERR value is") && e.contains("limit"), "{e}");
    assert!(n1.error(&["GET", ""]).contains("empty"));
    assert_eq!(n1.cmd(&["SELECT", "0"]), ok());
    let Reply::Bulk(info) = n2.cmd(&["INFO"]) else {
        panic!("INFO is a bulk string");
    };
    let info = String::from_utf8_lossy(&info);
    assert!(info.contains("# Server") && info.contains("redis_version:7.0.0-dynamo"));
    assert!(info.contains("# Cluster") && info.contains("dynamo_node:n2"));
    assert!(info.contains("dynamo_members_up:3"), "{info}");

    // Garbage: a protocol error, then the connection closes; the node serves on.
    let mut bad = Client::connect(resp[0]);
    bad.send(b"*2\r\n$3\r\nGET\r\n$abc\r\n");
    let (bytes, closed) = read_until_closed(&mut bad.stream, CONDITION_DEADLINE);
    assert_eq!(bytes, b"-ERR Protocol error: invalid bulk length\r\n");
    assert!(closed, "the connection closes after a protocol error");
    // A bulk far over the value limit is refused before its data is read.
    let mut huge = Client::connect(resp[0]);
    huge.send(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$99999999\r\n");
    let (bytes, closed) = read_until_closed(&mut huge.stream, CONDITION_DEADLINE);
    assert!(
        String::from_utf8_lossy(&bytes).starts_with("-ERR Protocol error: bulk length 99999999"),
        "{}",
        String::from_utf8_lossy(&bytes)
    );
    assert!(closed);
    assert_eq!(n1.cmd(&["GET", "alpha"]), bulk("uno"));
    assert_eq!(
        Client::connect(resp[0]).cmd(&["PING"]),
        Reply::Simple("PONG".into())
    );
    assert_eq!(n1.cmd(&["QUIT"]), ok());
    let (_, closed) = read_until_closed(&mut n1.stream, CONDITION_DEADLINE);
    assert!(closed, "QUIT closes the connection");

    // Without a quorum: -TRYAGAIN with the core's message.
    c.kill9(1);
    c.kill9(2);
    let e = n3_error_after_kill(resp[0]);
    assert!(
        e.starts_with("TRYAGAIN") && e.contains("quorum not met"),
        "{e}"
    );

    // A node with RESP connections open stops cleanly on SIGTERM.
    let mut idle = Client::connect(resp[0]);
    assert_eq!(idle.cmd(&["PING"]), Reply::Simple("PONG".into()));
    c.sigterm(0);
    let status = c.wait_exit(0, Duration::from_secs(20));
    assert!(status.success(), "n1 exited with {status}");
    let (_, closed) = read_until_closed(&mut idle.stream, CONDITION_DEADLINE);
    assert!(closed);
}

fn n3_error_after_kill(addr: SocketAddr) -> String {
    Client::connect(addr).error(&["SET", "alone", "x"])
}

#[test]
fn siblings_show_in_getall_and_get_picks_one_winner() {
    let (c, resp) = cluster();
    let mut clients: Vec<Client> = resp.iter().map(|a| Client::connect(*a)).collect();

    assert_eq!(clients[0].cmd(&["SET", "color", "red"]), ok());
    // A blind HTTP PUT (no context) adds a sibling next to it.
    let put = c.put(1, "/kv/color", None, b"blue");
    assert_eq!(put.status, 204, "{}", put.text());
    let (ctx, values) = wait_until("both siblings visible", CONDITION_DEADLINE, || {
        let (ctx, values) = getall(&mut clients[2], "color");
        (values.len() == 2).then_some((ctx, values))
    });
    assert_eq!(values, vec![b"blue".to_vec(), b"red".to_vec()]);
    assert!(!ctx.is_empty());
    // GET picks the same winner on every node.
    let winners: Vec<Reply> = clients
        .iter_mut()
        .map(|c| c.cmd(&["GET", "color"]))
        .collect();
    assert!(
        winners[0] == bulk("red") || winners[0] == bulk("blue"),
        "{winners:?}"
    );
    assert!(winners.iter().all(|w| *w == winners[0]), "{winners:?}");
    assert_eq!(clients[1].cmd(&["EXISTS", "color"]), Reply::Integer(1));

    // DYNAMO.PUT with the context resolves them.
    let Reply::Bulk(token) = clients[1].cmd(&["DYNAMO.PUT", "color", &ctx, "purple"]) else {
        panic!("DYNAMO.PUT answers a context token");
    };
    assert!(!token.is_empty());
    wait_until(
        "the siblings folded into purple",
        CONDITION_DEADLINE,
        || (getall(&mut clients[0], "color").1 == vec![b"purple".to_vec()]).then_some(()),
    );
    assert!(clients[0]
        .error(&["DYNAMO.PUT", "color", "not a token!", "x"])
        .contains("context token"));

    // Siblings again; a SET through an up-to-date coordinator folds them away.
    let put = c.put(2, "/kv/color", None, b"green");
    assert_eq!(put.status, 204, "{}", put.text());
    wait_until("green and purple both visible", CONDITION_DEADLINE, || {
        (getall(&mut clients[0], "color").1.len() == 2).then_some(())
    });
    // Let every replica hold both before the overwrite.
    wait_until("every replica holds both", CONDITION_DEADLINE, || {
        (0..3)
            .all(|i| c.local_values(i, "color").is_some_and(|v| v.len() == 2))
            .then_some(())
    });
    assert_eq!(clients[0].cmd(&["SET", "color", "final"]), ok());
    wait_until("one value left", CONDITION_DEADLINE, || {
        (getall(&mut clients[2], "color").1 == vec![b"final".to_vec()]).then_some(())
    });
    let http = c.get(1, "/kv/color");
    assert_eq!((http.status, http.body.as_slice()), (200, &b"final"[..]));

    // DEL removes every sibling it read.
    assert_eq!(clients[1].cmd(&["DEL", "color"]), Reply::Integer(1));
    assert_eq!(clients[2].cmd(&["GET", "color"]), Reply::Nil);
    assert_eq!(getall(&mut clients[0], "color").1, Vec::<Vec<u8>>::new());
}

/// Values of the node's default maximum size, for the memory tests.
const LARGE_VALUE: usize = 1 << 20;
/// How far the node's peak RSS may grow while a client does not read: the
/// reply window holds 64 values at first and about 16 MiB once it has seen
/// one; the rest is slack for the allocator and the socket buffers.
const RSS_GROWTH_MAX: u64 = 256 << 20;
/// How long the node gets to do its worst before the client reads.
const NOT_READING_FOR: Duration = Duration::from_secs(4);

/// Watches the node's RSS for [`NOT_READING_FOR`] while the client reads
/// nothing; fails at once if it grows past [`RSS_GROWTH_MAX`].
fn watch_while_not_reading(pid: u32, baseline: u64, what: &str) {
    let peak = watch_peak_rss(pid, baseline + RSS_GROWTH_MAX, NOT_READING_FOR, what);
    eprintln!("{what}: peak RSS grew by {} MiB", (peak - baseline) >> 20);
}

/// One node serving RESP with the default 1 MiB maximum value, holding
/// `LARGE_VALUE` bytes under `big`: the cluster, a client, the node's pid, the
/// value, and the node's peak RSS so far.
fn node_with_a_large_value() -> (Cluster, Client, u32, Vec<u8>, u64) {
    let port = free_ports(1)[0];
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let c = Cluster::start_with(1, &[], move |_| {
        vec!["--resp-addr".into(), addr.to_string()]
    });
    let pid = c.nodes[0].pid().expect("the node runs");
    let mut client = Client::connect(addr);
    let value: Vec<u8> = (0..LARGE_VALUE).map(|i| (i % 251) as u8).collect();
    assert_eq!(client.call(&[b"SET", b"big", &value]), ok());
    // One read first, so the baseline includes what any read costs.
    assert_eq!(client.cmd(&["GET", "big"]), Reply::Bulk(value.clone()));
    let baseline = proc_status_bytes(pid, "VmHWM").expect("Linux /proc");
    (c, client, pid, value, baseline)
}

#[test]
fn mget_naming_one_large_key_many_times_does_not_multiply_memory() {
    let (_c, mut client, pid, value, baseline) = node_with_a_large_value();
    // 4000 namings of one 1 MiB value: a 28 KB command, a 4 GB answer.
    let mut args: Vec<&[u8]> = vec![b"MGET"];
    args.extend(std::iter::repeat_n(&b"big"[..], 4000));
    let mut command = Vec::new();
    encode_command(&args, &mut command);
    client.send(&command);
    watch_while_not_reading(pid, baseline, "MGET of one 1 MiB key named 4000 times");
    match client.read() {
        Reply::Error(e) => assert!(
            e.starts_with("ERR the MGET reply would be larger than the limit"),
            "{e}"
        ),
        other => panic!("expected a refusal, got {}", reply_summary(&other)),
    }
    // The connection still serves, and an MGET that fits answers in full.
    let mut args: Vec<&[u8]> = vec![b"MGET"];
    args.extend(std::iter::repeat_n(&b"big"[..], 8));
    args.push(b"missing");
    let mut expected = vec![Reply::Bulk(value); 8];
    expected.push(Reply::Nil);
    assert_eq!(client.call(&args), Reply::Array(expected));
}

#[test]
fn pipelined_large_gets_from_a_client_that_does_not_read_are_held_back_in_order() {
    let (_c, mut client, pid, value, baseline) = node_with_a_large_value();
    // 400 rounds of four GETs of the 1 MiB value and an ECHO of the round.
    const ROUNDS: usize = 400;
    let mut pipeline = Vec::new();
    for round in 0..ROUNDS {
        for _ in 0..4 {
            encode_command(&[b"GET", b"big"], &mut pipeline);
        }
        encode_command(&[b"ECHO", round.to_string().as_bytes()], &mut pipeline);
    }
    client.send(&pipeline);
    watch_while_not_reading(
        pid,
        baseline,
        "1600 pipelined GETs of a 1 MiB value, none of it read",
    );
    // Reading lets everything through, in request order.
    for round in 0..ROUNDS {
        for _ in 0..4 {
            let reply = client.read();
            assert!(
                reply == Reply::Bulk(value.clone()),
                "round {round}: {}",
                reply_summary(&reply)
            );
        }
        assert_eq!(client.read(), bulk(&round.to_string()));
    }
    assert_eq!(client.cmd(&["PING"]), Reply::Simple("PONG".into()));
}

/// A reply shown without megabytes of value.
fn reply_summary(r: &Reply) -> String {
    match r {
        Reply::Bulk(b) if b.len() > 64 => format!("a bulk string of {} bytes", b.len()),
        Reply::Array(items) => format!("an array of {} replies", items.len()),
        other => format!("{other:?}"),
    }
}
