//! The `dynamo` command line against real server processes on loopback:
//! put / get / delete / status, their output formats and exit codes, client
//! failover past a dead node, and `dynamo dev` start and stop.
//!
//! Every process a test starts is killed when its guard drops, pass or fail.

mod common;

use common::Cluster;
use std::io::{Read as _, Write as _};
use std::net::TcpListener;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

const DYNAMO: &str = env!("CARGO_BIN_EXE_dynamo");

/// A base port with `count` consecutive free ports from it. Each call starts
/// its search somewhere else, so tests running at once in this process do not
/// pick the same ports.
fn free_port_run(count: u16, avoid: &[u16]) -> u16 {
    static CALLS: AtomicU16 = AtomicU16::new(0);
    let seed = (std::process::id() as u16)
        .wrapping_add(CALLS.fetch_add(1, Ordering::Relaxed).wrapping_mul(4099));
    for i in 0..2000u16 {
        let base = 20_000 + (seed.wrapping_mul(7).wrapping_add(i.wrapping_mul(13))) % 30_000;
        let range = base..base + count;
        if avoid
            .iter()
            .any(|p| range.contains(p) || (*p..*p + count).contains(&base))
        {
            continue;
        }
        let held: Vec<_> = range
            .clone()
            .map_while(|p| TcpListener::bind(("127.0.0.1", p)).ok())
            .collect();
        if held.len() == count as usize {
            return base;
        }
    }
    panic!("no run of {count} free ports");
}

/// Runs `dynamo ARGS --node <every node>` against a cluster, feeding `stdin`.
fn run(cluster: &Cluster, args: &[&str], stdin: Option<&[u8]>) -> Output {
    run_dynamo(args, &["--node", &nodes(cluster)], stdin)
}

/// Every node's client address, comma-separated.
fn nodes(cluster: &Cluster) -> String {
    (0..cluster.len())
        .map(|i| cluster.client_addr(i).to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// A 3-node cluster whose members all see each other (the CLI routes by ring).
fn cluster() -> Cluster {
    let cluster = Cluster::start(3, &["--sync", "none"]);
    cluster.wait_connected();
    cluster
}

fn run_dynamo(args: &[&str], extra: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(DYNAMO)
        .args(args)
        .args(extra)
        .env_remove("DYNAMO_NODES")
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(data) = stdin {
        input.write_all(data).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts the exit code, showing the output when it differs.
#[track_caller]
fn expect(out: &Output, code: i32) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

fn context_line(s: &str) -> String {
    s.lines()
        .find_map(|l| l.strip_prefix("context: "))
        .unwrap_or_else(|| panic!("no context line in {s:?}"))
        .to_string()
}

#[test]
fn put_get_delete_status_and_failover() {
    let mut cluster = cluster();

    // status: text and JSON.
    let out = run(&cluster, &["status"], None);
    expect(&out, 0);
    let s = text(&out.stdout);
    assert!(
        s.contains("3 members") && s.contains("N=3 R=2 W=2 Q=256"),
        "{s}"
    );
    for (i, addr) in (0..cluster.len())
        .map(|i| cluster.client_addr(i).to_string())
        .enumerate()
    {
        assert!(
            s.contains(&format!("n{}", i + 1)) && s.contains(addr.as_str()),
            "{s}"
        );
    }
    let out = run(&cluster, &["status", "--json"], None);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["n"].as_u64(), v["q"].as_u64()), (Some(3), Some(256)));

    // A missing key: exit 1, message on stderr, nothing on stdout.
    let out = run(&cluster, &["get", "k"], None);
    expect(&out, 1);
    assert!(out.stdout.is_empty());
    assert!(text(&out.stderr).contains("not found"));

    // put then get: the value alone on stdout, the context on stderr.
    let out = run(&cluster, &["put", "k", "hello"], None);
    expect(&out, 0);
    let s = text(&out.stdout);
    assert!(s.starts_with("ok\n"), "{s}");
    context_line(&s);
    let out = run(&cluster, &["get", "k"], None);
    expect(&out, 0);
    assert_eq!(out.stdout, b"hello");
    let token = context_line(&text(&out.stderr));
    // On a terminal the value's line is ended, so the context (stderr) starts
    // on its own line; script(1) runs the CLI under a pseudo-terminal.
    let on_tty = format!("{DYNAMO} get k --node {}", nodes(&cluster));
    let tty = Command::new("script")
        .args(["-qec", &on_tty, "/dev/null"])
        .env_remove("DYNAMO_NODES")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("script(1), from util-linux, runs the CLI on a terminal");
    let shown = text(&tty.stdout);
    assert!(shown.starts_with("hello\r\ncontext: "), "{shown:?}");

    // A blind put adds a sibling; get lists both, JSON too.
    expect(&run(&cluster, &["put", "k", "world", "--blind"], None), 0);
    let out = run(&cluster, &["get", "k"], None);
    expect(&out, 0);
    let s = text(&out.stdout);
    assert!(
        s.contains("sibling 1 of 2") && s.contains("hello") && s.contains("world"),
        "{s}"
    );
    let out = run(&cluster, &["get", "k", "--json"], None);
    expect(&out, 0);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let siblings = v["siblings"].as_array().unwrap();
    assert_eq!(siblings.len(), 2, "{v}");
    assert_eq!(v["key"], "k");

    // A put with the first read's context replaces only "hello".
    expect(
        &run(&cluster, &["put", "k", "hola", "--context", &token], None),
        0,
    );
    let out = run(&cluster, &["get", "k", "--json"], None);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut values: Vec<&str> = v["siblings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["value"].as_str().unwrap())
        .collect();
    values.sort();
    assert_eq!(values, ["hola", "world"]);

    // A put without --context reads first and replaces what it read, from stdin.
    let out = run(&cluster, &["put", "k"], Some(b"resolved\x00\xff"));
    expect(&out, 0);
    assert!(
        text(&out.stdout).contains("replaced 2 values"),
        "{}",
        text(&out.stdout)
    );
    let out = run(&cluster, &["get", "k"], None);
    expect(&out, 0);
    assert_eq!(
        out.stdout, b"resolved\x00\xff",
        "binary values pass through as-is"
    );

    // --file, and JSON output of put.
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), b"from a file").unwrap();
    let out = run(
        &cluster,
        &[
            "put",
            "f",
            "--file",
            file.path().to_str().unwrap(),
            "--json",
            "--w",
            "3",
        ],
        None,
    );
    expect(&out, 0);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert!(v["context"].as_str().is_some_and(|c| !c.is_empty()));
    let out = run(&cluster, &["get", "f", "--r", "3"], None);
    assert_eq!(out.stdout, b"from a file");

    // delete reads first; a second delete finds nothing (exit 1).
    let out = run(&cluster, &["delete", "k"], None);
    expect(&out, 0);
    assert!(
        text(&out.stdout).starts_with("deleted"),
        "{}",
        text(&out.stdout)
    );
    expect(&run(&cluster, &["get", "k"], None), 1);
    let out = run(&cluster, &["delete", "k"], None);
    expect(&out, 1);
    assert!(text(&out.stderr).contains("not found"));

    // Errors: exit 2 with a message.
    let out = run(&cluster, &["get", "k", "--r", "9"], None);
    expect(&out, 2);
    assert!(
        text(&out.stderr).starts_with("error: "),
        "{}",
        text(&out.stderr)
    );
    let out = run(&cluster, &["put", "k", "v", "--context", "!!!"], None);
    expect(&out, 2);
    assert!(
        text(&out.stderr).contains("--context"),
        "{}",
        text(&out.stderr)
    );
    let dead = format!("127.0.0.1:{}", common::free_ports(1)[0]);
    let out = run_dynamo(&["get", "k"], &["--node", &dead], None);
    expect(&out, 2);
    assert!(
        text(&out.stderr).contains("cannot reach the cluster"),
        "{}",
        text(&out.stderr)
    );
    let out = run_dynamo(&["get"], &[], None);
    expect(&out, 2);

    // Failover: with n1 dead, a client that names it first still works.
    cluster.kill9(0);
    let nodes = nodes(&cluster);
    let out = run_dynamo(
        &["put", "after", "v2", "--blind"],
        &["--node", &nodes],
        None,
    );
    expect(&out, 0);
    let out = run_dynamo(&["get", "after"], &["--node", &nodes], None);
    expect(&out, 0);
    assert_eq!(out.stdout, b"v2");
    let out = run_dynamo(&["get", "f"], &["--node", &nodes], None);
    expect(&out, 0);
    assert_eq!(out.stdout, b"from a file");
}

/// Collects `out` on a thread; returns what arrived once `needle` appears or
/// the time runs out.
fn read_until(out: std::process::ChildStdout, needle: &str, limit: Duration) -> String {
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut out = out;
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let deadline = Instant::now() + limit;
    while !seen.contains(needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(chunk) => seen.push_str(&String::from_utf8_lossy(&chunk)),
            Err(_) => break,
        }
    }
    seen
}

/// The base ports of a 2-node `dynamo dev`.
struct DevPorts {
    peer: u16,
    client: u16,
    http: u16,
    resp: u16,
}

impl DevPorts {
    fn free() -> DevPorts {
        let peer = free_port_run(2, &[]);
        let client = free_port_run(2, &[peer, peer + 1]);
        let http = free_port_run(2, &[peer, peer + 1, client, client + 1]);
        let resp = free_port_run(2, &[peer, peer + 1, client, client + 1, http, http + 1]);
        DevPorts {
            peer,
            client,
            http,
            resp,
        }
    }
}

/// Starts `dynamo dev` with two nodes (N=2, sync none) on `ports`.
fn spawn_dev(dir: &std::path::Path, ports: &DevPorts) -> DevGuard {
    let dev = Command::new(DYNAMO)
        .args(["dev", "--nodes", "2", "--n", "2", "--sync", "none"])
        .args(["--peer-port", &ports.peer.to_string()])
        .args(["--client-port", &ports.client.to_string()])
        .args(["--http-port", &ports.http.to_string()])
        .args(["--resp-port", &ports.resp.to_string()])
        .arg("--data-dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    DevGuard(dev)
}

/// Waits for the launcher's banner and returns it; panics with n1's log if it
/// never comes.
fn banner(dev: &mut DevGuard, dir: &std::path::Path) -> String {
    let stdout = dev.0.stdout.take().unwrap();
    let banner = read_until(stdout, "Ctrl-C", Duration::from_secs(60));
    if !banner.contains("Ctrl-C") {
        let logs = std::fs::read_to_string(dir.join("n1.log")).unwrap_or_default();
        panic!("no banner: {banner}\nn1.log:\n{logs}");
    }
    banner
}

/// The pid of the launcher's child `node` (`dynamo server --node-id NODE`),
/// looked for in /proc until it appears.
fn dev_child(launcher: u32, node: &str, limit: Duration) -> u32 {
    let deadline = Instant::now() + limit;
    let wanted = format!("\0--node-id\0{node}\0");
    loop {
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // The parent pid is the second field after the parenthesised name.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if ppid == Some(launcher) && String::from_utf8_lossy(&cmdline).contains(&wanted) {
                return pid;
            }
        }
        assert!(Instant::now() < deadline, "no child {node} of {launcher}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Stops a `dynamo dev` launcher the way a user would (SIGTERM), so it stops
/// its nodes; SIGKILL only if it does not exit.
struct DevGuard(Child);

impl DevGuard {
    fn terminate(&mut self) -> Option<i32> {
        if let Ok(Some(status)) = self.0.try_wait() {
            return status.code();
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.0.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
        None
    }
}

impl Drop for DevGuard {
    fn drop(&mut self) {
        self.terminate();
    }
}

#[test]
fn dev_starts_a_cluster_and_stops_it_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let ports = DevPorts::free();
    let mut dev = spawn_dev(dir.path(), &ports);
    let banner = banner(&mut dev, dir.path());
    let DevPorts {
        peer,
        client,
        http,
        resp,
    } = ports;
    assert!(
        banner.contains(&format!("n2   http http://127.0.0.1:{}", http + 1)),
        "{banner}"
    );
    assert!(
        banner.contains(&format!("client 127.0.0.1:{client}")),
        "{banner}"
    );
    assert!(banner.contains("curl"), "{banner}");
    assert!(
        banner.contains(&format!("resp 127.0.0.1:{resp}")),
        "{banner}"
    );
    assert!(dir.path().join("n1.log").exists() && dir.path().join("n2").exists());

    // The nodes serve: write through n2, read through n1.
    let n1 = format!("127.0.0.1:{client}");
    let n2 = format!("127.0.0.1:{}", client + 1);
    expect(&run_dynamo(&["put", "x", "1"], &["--node", &n2], None), 0);
    let out = run_dynamo(&["get", "x"], &["--node", &n1], None);
    expect(&out, 0);
    assert_eq!(out.stdout, b"1");

    // A second dev cluster on the same ports names the busy port and its flag.
    let out = run_dynamo(
        &["dev", "--nodes", "2"],
        &[
            "--peer-port",
            &peer.to_string(),
            "--client-port",
            &client.to_string(),
            "--http-port",
            &http.to_string(),
            "--resp-port",
            &resp.to_string(),
            "--data-dir",
            dir.path().join("other").to_str().unwrap(),
        ],
        None,
    );
    expect(&out, 2);
    let err = text(&out.stderr);
    assert!(
        err.contains(&peer.to_string()) && err.contains("--peer-port"),
        "{err}"
    );

    // SIGTERM stops the launcher and every node.
    assert_eq!(dev.terminate(), Some(0));
    for port in [client, client + 1] {
        assert!(
            wait_port_closed(&format!("127.0.0.1:{port}"), Duration::from_secs(5)),
            "a node still listens on {port}"
        );
    }
}

fn wait_port_closed(addr: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(addr).is_err() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A node that starts late leaves its peers' links to it in reconnect backoff;
/// the banner must wait until every link is up, or the first request through a
/// peer is dropped on the floor and times out (the CI failure this pins: n2's
/// read before a put got 1 of 2 replies).
#[test]
fn dev_banner_waits_until_the_nodes_reach_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let ports = DevPorts::free();
    let mut dev = spawn_dev(dir.path(), &ports);
    // Hold n1 stopped as it starts, as a slow disk or a busy machine would:
    // n2's connects to it are refused and back off to 800 ms.
    let n1 = dev_child(dev.0.id(), "n1", Duration::from_secs(10)).to_string();
    let signal = |sig: &str| {
        let status = Command::new("kill").args([sig, &n1]).status().unwrap();
        assert!(status.success(), "kill {sig} {n1}");
    };
    signal("-STOP");
    std::thread::sleep(Duration::from_millis(900));
    signal("-CONT");
    banner(&mut dev, dir.path());

    let n2 = format!("127.0.0.1:{}", ports.client + 1);
    expect(
        &run_dynamo(&["put", "late", "1"], &["--node", &n2], None),
        0,
    );
    let n1_client = format!("127.0.0.1:{}", ports.client);
    let out = run_dynamo(&["get", "late"], &["--node", &n1_client], None);
    expect(&out, 0);
    assert_eq!(out.stdout, b"1");
    assert_eq!(dev.terminate(), Some(0));
}
