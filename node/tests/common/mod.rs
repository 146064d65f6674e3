//! A reusable harness for end-to-end tests against real `dynamo server`
//! processes on loopback.
//!
//! [`Cluster::start`] picks free ports, writes every node's data directory and
//! log under one temporary directory, spawns the servers and waits for each
//! `/health` to answer 200. Every process is killed when the cluster drops, pass
//! or fail; on a failing test the tail of every node's log is printed and the
//! temporary directory is kept for inspection.
//!
//! Synchronisation is always "poll until a condition holds, with a generous
//! deadline", never a bare sleep, so a busy machine slows the tests down rather
//! than failing them.

#![allow(dead_code)]

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde_json::Value;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The binary under test, built by cargo for this test target.
pub const DYNAMO: &str = env!("CARGO_BIN_EXE_dynamo");

/// How long a node may take to answer `/health` after it was spawned.
pub const STARTUP_DEADLINE: Duration = Duration::from_secs(30);
/// The default deadline of [`wait_until`] loops in the tests.
pub const CONDITION_DEADLINE: Duration = Duration::from_secs(30);
/// Socket timeouts of the HTTP client: far longer than any request timeout.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Whole-cluster start attempts (a port picked free may be taken before use).
const START_ATTEMPTS: usize = 4;
/// Flags every node gets unless the test passes them itself. The request
/// timeout is longer than the server's default (2 s) so a starved coordinator on
/// a busy machine does not turn a slow success into a 503.
pub const DEFAULT_ARGS: &[(&str, &str)] = &[("--request-timeout-ms", "5000")];
/// Lines of each node's log printed when a test fails.
const LOG_TAIL_LINES: usize = 80;

/// Polls `cond` every 50 ms until it returns `Some`, or panics after `deadline`
/// with `what` and the last value `describe` reported.
pub fn wait_until<T>(what: &str, deadline: Duration, mut cond: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = cond() {
            return v;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------
// HTTP client

/// An HTTP answer.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header names lower-cased, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The `X-Dynamo-Context` token, if any.
    pub fn context(&self) -> Option<&str> {
        self.header("x-dynamo-context")
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics (showing the body) if it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "expected a JSON body (status {}), got {:?}: {e}",
                self.status,
                self.text()
            )
        })
    }

    /// `body["error"]` of a JSON error answer, checking the content type too.
    pub fn json_error(&self) -> String {
        let ct = self.header("content-type").unwrap_or("");
        assert!(
            ct.starts_with("application/json"),
            "error answers must be JSON; got content-type {ct:?}, body {:?}",
            self.text()
        );
        self.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no \"error\" string in {:?}", self.text()))
            .to_string()
    }
}

/// One HTTP/1.1 request with `Connection: close`; reads the whole answer.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Response> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let _ = stream.set_nodelay(true);
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    stream.write_all(&bytes)?;
    stream.flush()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw)
}

fn bad(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

fn parse_response(raw: &[u8]) -> std::io::Result<Response> {
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| {
            bad(format!(
                "no end of headers in {:?}",
                String::from_utf8_lossy(raw)
            ))
        })?;
    let head = std::str::from_utf8(&raw[..head_end]).map_err(|e| bad(e.to_string()))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
    let mut headers = Vec::new();
    for line in lines {
        if let Some((n, v)) = line.split_once(':') {
            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let rest = &raw[head_end + 4..];
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    let body = if chunked {
        decode_chunked(rest)?
    } else if let Some((_, len)) = headers.iter().find(|(n, _)| n == "content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| bad(format!("content-length {len:?}")))?;
        if rest.len() < len {
            return Err(bad(format!(
                "body truncated: {} of {len} bytes",
                rest.len()
            )));
        }
        rest[..len].to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn decode_chunked(mut rest: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| bad("chunk size line not terminated".into()))?;
        let size_text = std::str::from_utf8(&rest[..line_end]).map_err(|e| bad(e.to_string()))?;
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| bad(format!("chunk size {size_text:?}")))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if rest.len() < size + 2 {
            return Err(bad("chunk truncated".into()));
        }
        out.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// Decodes the base64 values of a JSON array (siblings of a 300 answer).
pub fn decode_b64_list(v: &Value) -> Vec<Vec<u8>> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected an array of base64 strings, got {v}"))
        .iter()
        .map(|s| {
            STANDARD
                .decode(s.as_str().expect("a base64 string"))
                .expect("valid base64")
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Processes

/// Where [`free_ports`] looks: below the kernel's ephemeral range (32768 and up
/// by default), so no `bind(0)` or outgoing connection of another process is
/// handed a port a stopped node is about to bind again on restart; and below
/// the 20000.. window `tests/cli.rs` scans for port runs.
const PORT_WINDOW: std::ops::Range<u16> = 12_000..20_000;

/// The kernel's ephemeral port range, if readable.
fn ephemeral_range() -> Option<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = text.split_whitespace().map(|s| s.parse::<u16>().ok());
    Some((it.next()??, it.next()??))
}

/// A new pseudo-random number each call (seeded by time, process and a counter).
fn random_u64() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut x = nanos
        ^ (u64::from(std::process::id()) << 32)
        ^ COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    // splitmix64 finaliser
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// `count` distinct loopback ports nobody listens on right now: all bound at
/// once, then released for the nodes to bind. Ports come from [`PORT_WINDOW`]
/// when it lies outside the ephemeral range, so a node restarted on its old
/// ports does not find them taken by some other process's ephemeral port;
/// otherwise the OS picks them. A window port goes out once per test process
/// ([`HANDED_OUT`]): the tests of one binary run in parallel, and another
/// test's probe or node once took a port while the node that owned it was
/// stopped, so its restart failed ("Address already in use"). A port may
/// still be grabbed by another process before the node binds it;
/// [`Cluster::start`] retries with fresh ports when that happens.
pub fn free_ports(count: usize) -> Vec<u16> {
    let window_ok =
        ephemeral_range().is_some_and(|(lo, hi)| PORT_WINDOW.end <= lo || PORT_WINDOW.start > hi);
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let mut held: Vec<TcpListener> = Vec::new();
    if window_ok {
        let span = u64::from(PORT_WINDOW.end - PORT_WINDOW.start);
        for _ in 0..50 * count {
            if held.len() == count {
                break;
            }
            let port = PORT_WINDOW.start + (random_u64() % span) as u16;
            if handed_out.contains(&port) {
                continue;
            }
            if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
                if !held.iter().any(|h| h.local_addr().unwrap().port() == port) {
                    held.push(l);
                }
            }
        }
    }
    while held.len() < count {
        held.push(TcpListener::bind("127.0.0.1:0").expect("binding an ephemeral port"));
    }
    let ports: Vec<u16> = held
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect();
    handed_out.extend(ports.iter().copied());
    ports
}

/// Every port [`free_ports`] returned in this process. Held while it probes,
/// so two tests never probe or take the same port at once.
static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// One server process of a [`Cluster`] and everything needed to restart it.
pub struct Node {
    pub name: String,
    pub peer_addr: SocketAddr,
    pub client_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    /// Arguments after the generated ones (cluster-wide extras, then per node).
    pub extra_args: Vec<String>,
    child: Option<Child>,
    spawns: usize,
}

impl Node {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

/// What waiting for a spawned node's health found.
enum Startup {
    Healthy,
    /// The process exited before it was healthy; `port_clash` when its log says
    /// an address was in use (retry with other ports).
    Exited {
        status: ExitStatus,
        port_clash: bool,
    },
}

/// A set of `dynamo server` processes on loopback that know each other.
pub struct Cluster {
    pub nodes: Vec<Node>,
    /// `--peer` value shared by every node.
    pub peer_list: String,
    dir: Option<tempfile::TempDir>,
}

impl Cluster {
    /// Starts `n_nodes` nodes named n1, n2, ... with `extra_args` appended to each
    /// command line, and waits until every `/health` answers 200.
    pub fn start(n_nodes: usize, extra_args: &[&str]) -> Cluster {
        Self::start_with(n_nodes, extra_args, |_| Vec::new())
    }

    /// Like [`Cluster::start`], with `per_node(i)` appended to node `i`'s arguments.
    pub fn start_with(
        n_nodes: usize,
        extra_args: &[&str],
        per_node: impl Fn(usize) -> Vec<String>,
    ) -> Cluster {
        let mut last_error = String::new();
        for attempt in 1..=START_ATTEMPTS {
            let mut cluster = Self::prepare(n_nodes, extra_args, &per_node);
            for i in 0..n_nodes {
                cluster.spawn(i);
            }
            let mut clash = false;
            let mut failure = None;
            for i in 0..n_nodes {
                match cluster.wait_started(i) {
                    Startup::Healthy => {}
                    Startup::Exited { status, port_clash } => {
                        clash |= port_clash;
                        failure = Some(format!(
                            "node {} exited with {status} during start",
                            cluster.nodes[i].name
                        ));
                        break;
                    }
                }
            }
            match failure {
                None => return cluster,
                Some(msg) if clash && attempt < START_ATTEMPTS => {
                    eprintln!("harness: {msg} (address in use); retrying with fresh ports");
                    last_error = msg;
                    // Drop kills the rest; not panicking, so the directory goes too.
                }
                Some(msg) => {
                    cluster.print_logs();
                    panic!("cluster start failed: {msg}");
                }
            }
        }
        panic!("cluster start failed {START_ATTEMPTS} times: {last_error}");
    }

    fn prepare(
        n_nodes: usize,
        extra_args: &[&str],
        per_node: &impl Fn(usize) -> Vec<String>,
    ) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("dynamo-e2e-")
            .tempdir()
            .expect("creating a temporary directory");
        let ports = free_ports(3 * n_nodes);
        let addr = |p: u16| -> SocketAddr { format!("127.0.0.1:{p}").parse().unwrap() };
        let mut nodes = Vec::new();
        for i in 0..n_nodes {
            let name = format!("n{}", i + 1);
            let mut extra: Vec<String> = Vec::new();
            for (flag, value) in DEFAULT_ARGS {
                if !extra_args.contains(flag) {
                    extra.extend([flag.to_string(), value.to_string()]);
                }
            }
            extra.extend(extra_args.iter().map(|s| s.to_string()));
            extra.extend(per_node(i));
            nodes.push(Node {
                peer_addr: addr(ports[3 * i]),
                client_addr: addr(ports[3 * i + 1]),
                http_addr: addr(ports[3 * i + 2]),
                data_dir: dir.path().join(format!("data-{name}")),
                log_path: dir.path().join(format!("{name}.log")),
                name,
                extra_args: extra,
                child: None,
                spawns: 0,
            });
        }
        let peer_list = nodes
            .iter()
            .map(|n| format!("{}={}", n.name, n.peer_addr))
            .collect::<Vec<_>>()
            .join(",");
        Cluster {
            nodes,
            peer_list,
            dir: Some(dir),
        }
    }

    /// The temporary directory holding data directories and logs.
    pub fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .expect("the directory lives as long as the cluster")
            .path()
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn http_addr(&self, i: usize) -> SocketAddr {
        self.nodes[i].http_addr
    }

    pub fn peer_addr(&self, i: usize) -> SocketAddr {
        self.nodes[i].peer_addr
    }

    pub fn client_addr(&self, i: usize) -> SocketAddr {
        self.nodes[i].client_addr
    }

    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// The full `dynamo server ...` argument list of node `i`.
    pub fn args(&self, i: usize) -> Vec<String> {
        let n = &self.nodes[i];
        let mut args: Vec<String> = [
            "server",
            "--node-id",
            &n.name,
            "--peer-addr",
            &n.peer_addr.to_string(),
            "--client-addr",
            &n.client_addr.to_string(),
            "--http-addr",
            &n.http_addr.to_string(),
            "--data-dir",
            &n.data_dir.to_string_lossy(),
            "--peer",
            &self.peer_list,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(n.extra_args.iter().cloned());
        args
    }

    /// Spawns node `i` (not running) with its logs appended to its log file.
    fn spawn(&mut self, i: usize) {
        assert!(self.nodes[i].child.is_none(), "node {i} is already running");
        let args = self.args(i);
        let node = &mut self.nodes[i];
        node.spawns += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log_path)
            .expect("opening the node log");
        writeln!(
            log,
            "===== harness: start #{} of {}: {DYNAMO} {}",
            node.spawns,
            node.name,
            args.join(" ")
        )
        .unwrap();
        let err = log.try_clone().expect("cloning the log handle");
        let child = Command::new(DYNAMO)
            .args(&args)
            .env("RUST_LOG", "info")
            .env_remove("DYNAMO_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("spawning the dynamo binary");
        node.child = Some(child);
    }

    /// Waits for node `i`'s `/health` to answer 200, or for the process to exit.
    fn wait_started(&mut self, i: usize) -> Startup {
        let start = Instant::now();
        loop {
            let node = &mut self.nodes[i];
            let child = node.child.as_mut().expect("node was spawned");
            if let Some(status) = child.try_wait().expect("polling the child") {
                node.child = None;
                let log = std::fs::read_to_string(&node.log_path).unwrap_or_default();
                let last_start = log.rsplit("===== harness: start").next().unwrap_or("");
                let port_clash = last_start.contains("in use") || last_start.contains("binding");
                return Startup::Exited { status, port_clash };
            }
            if let Ok(resp) = http_request(node.http_addr, "GET", "/health", &[], b"") {
                if resp.status == 200 {
                    return Startup::Healthy;
                }
            }
            if start.elapsed() > STARTUP_DEADLINE {
                self.print_logs();
                panic!(
                    "node {} did not answer /health with 200 within {STARTUP_DEADLINE:?}",
                    self.nodes[i].name
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts a stopped node `i` again with the same ports, data directory and
    /// arguments, and waits for its health.
    pub fn restart(&mut self, i: usize) {
        self.spawn(i);
        match self.wait_started(i) {
            Startup::Healthy => {}
            Startup::Exited { status, .. } => {
                self.print_logs();
                panic!(
                    "node {} exited with {status} on restart",
                    self.nodes[i].name
                );
            }
        }
    }

    /// Spawns node `i` (stopped) with its current arguments and expects it to
    /// exit on its own within `deadline`; returns the status and what it logged
    /// during this start.
    pub fn start_expecting_exit(&mut self, i: usize, deadline: Duration) -> (ExitStatus, String) {
        self.spawn(i);
        let status = self.wait_exit(i, deadline);
        let log = std::fs::read_to_string(&self.nodes[i].log_path).unwrap_or_default();
        let this_start = log
            .rsplit("===== harness: start")
            .next()
            .unwrap_or("")
            .to_string();
        (status, this_start)
    }

    /// `kill -9` node `i` and reap it.
    pub fn kill9(&mut self, i: usize) {
        let mut child = self.nodes[i].child.take().expect("node is running");
        child.kill().expect("SIGKILL");
        child.wait().expect("reaping the killed node");
    }

    /// Sends SIGTERM to node `i` (still tracked as running until it exits).
    pub fn sigterm(&mut self, i: usize) {
        let pid = self.nodes[i].pid().expect("node is running");
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -TERM {pid} failed: {status}");
    }

    /// Waits for node `i` to exit by itself; panics after `deadline`.
    pub fn wait_exit(&mut self, i: usize, deadline: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            let child = self.nodes[i].child.as_mut().expect("node is running");
            if let Some(status) = child.try_wait().expect("polling the child") {
                self.nodes[i].child = None;
                return status;
            }
            if start.elapsed() > deadline {
                self.print_logs();
                panic!(
                    "node {} did not exit within {deadline:?}",
                    self.nodes[i].name
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// An HTTP request to node `i`; panics on a transport error.
    pub fn http(
        &self,
        i: usize,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Response {
        self.try_http(i, method, path, headers, body)
            .unwrap_or_else(|e| panic!("{method} {path} on {}: {e}", self.nodes[i].name))
    }

    pub fn try_http(
        &self,
        i: usize,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Response> {
        http_request(self.nodes[i].http_addr, method, path, headers, body)
    }

    pub fn get(&self, i: usize, path: &str) -> Response {
        self.http(i, "GET", path, &[], b"")
    }

    /// PUT with an optional context; returns the answer whatever its status.
    pub fn put(&self, i: usize, path: &str, context: Option<&str>, body: &[u8]) -> Response {
        match context {
            Some(c) => self.http(i, "PUT", path, &[("X-Dynamo-Context", c)], body),
            None => self.http(i, "PUT", path, &[], body),
        }
    }

    /// The live values node `i` itself stores for `key` (`GET ?local=true`):
    /// `None` when it stores nothing, tombstones left out.
    pub fn local_values(&self, i: usize, key: &str) -> Option<Vec<Vec<u8>>> {
        let resp = self.get(i, &format!("/kv/{key}?local=true"));
        assert_eq!(resp.status, 200, "local read of {key}: {}", resp.text());
        let body = resp.json();
        assert_eq!(body["node"], self.nodes[i].name.as_str(), "{body}");
        let stored = &body["stored"];
        if stored.is_null() {
            return None;
        }
        let siblings = stored["siblings"]
            .as_array()
            .unwrap_or_else(|| panic!("no siblings array in {body}"));
        Some(
            siblings
                .iter()
                .filter_map(|s| s["value"].as_str())
                .map(|v| STANDARD.decode(v).expect("base64 value"))
                .collect(),
        )
    }

    /// Waits until every running node's `/cluster` shows every member up with the
    /// addresses it learned from a greeting: each node has connected to every
    /// other at least once.
    pub fn wait_connected(&self) {
        for i in 0..self.len() {
            if !self.nodes[i].is_running() {
                continue;
            }
            let expected: Vec<usize> = (0..self.len())
                .filter(|&j| self.nodes[j].is_running())
                .collect();
            wait_until(
                &format!("{} to see every running peer up", self.name(i)),
                CONDITION_DEADLINE,
                || {
                    let resp = self.try_http(i, "GET", "/cluster", &[], b"").ok()?;
                    if resp.status != 200 {
                        return None;
                    }
                    let body: Value = serde_json::from_slice(&resp.body).ok()?;
                    let members = body["members"].as_array()?.clone();
                    let all = expected.iter().all(|&j| {
                        members.iter().any(|m| {
                            m["id"] == self.name(j)
                                && m["status"] == "up"
                                && m["http_addr"] == self.http_addr(j).to_string().as_str()
                        })
                    });
                    all.then_some(())
                },
            );
        }
    }

    /// The last lines of node `i`'s log.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let log = std::fs::read_to_string(&self.nodes[i].log_path).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Node `i`'s whole log.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log_path).unwrap_or_default()
    }

    pub fn print_logs(&self) {
        for i in 0..self.len() {
            eprintln!(
                "----- {} log tail ({}) -----\n{}\n",
                self.nodes[i].name,
                self.nodes[i].log_path.display(),
                self.log_tail(i, LOG_TAIL_LINES)
            );
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            self.print_logs();
            if let Some(dir) = self.dir.take() {
                let kept = dir.keep();
                eprintln!("harness: kept the cluster directory {}", kept.display());
            }
        }
    }
}

/// Reads whatever a peer sends until it closes (or `deadline` passes): returns
/// the bytes and whether the connection was closed by the other side.
pub fn read_until_closed(stream: &mut TcpStream, deadline: Duration) -> (Vec<u8>, bool) {
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let start = Instant::now();
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return (out, true),
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if start.elapsed() > deadline {
                    return (out, false);
                }
            }
            // A reset also means the node closed the connection.
            Err(_) => return (out, true),
        }
    }
}

// ---------------------------------------------------------------------------
// Process memory

/// A size field of `/proc/<pid>/status` in bytes: `VmRSS` (resident now),
/// `VmHWM` (the peak resident). `None` once the process is gone, or off Linux.
pub fn proc_status_bytes(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status
        .lines()
        .find(|l| l.split(':').next() == Some(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Watches the peak resident memory (`VmHWM`) of process `pid` for
/// `duration`, and panics with `what` as soon as it passes `limit_bytes`: a
/// node whose memory runs away is stopped (the cluster drops) before it takes
/// the machine's. Returns the peak seen.
pub fn watch_peak_rss(pid: u32, limit_bytes: u64, duration: Duration, what: &str) -> u64 {
    let start = Instant::now();
    let mut peak = 0;
    loop {
        if let Some(hwm) = proc_status_bytes(pid, "VmHWM") {
            peak = hwm;
        }
        assert!(
            peak <= limit_bytes,
            "{what}: the node's peak RSS reached {:.1} MiB, over the limit of {:.1} MiB",
            peak as f64 / (1 << 20) as f64,
            limit_bytes as f64 / (1 << 20) as f64
        );
        if start.elapsed() >= duration {
            return peak;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
