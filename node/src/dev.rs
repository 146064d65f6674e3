//! `dynamo dev`: a local cluster of N `dynamo server` child processes on
//! loopback, for development.
//!
//! Node `i` (named `n<i+1>`) listens on `peer-port + i`, `client-port + i`,
//! `http-port + i` and, for the Redis protocol, `resp-port + i`, keeps its data in `<data-dir>/n<i+1>` and its log in
//! `<data-dir>/n<i+1>.log`. The launcher waits until every node answers and
//! reaches every other (its `/health` counts the peers it reaches), prints the
//! addresses, then waits for Ctrl-C, SIGTERM or SIGHUP, or for a child to
//! exit on its own, and stops every child (SIGTERM, then SIGKILL after 5 s).
//!
//! Children run in their own process group, so a Ctrl-C in the terminal reaches
//! only the launcher, which then stops them in order.
//!
//! It never runs in the simulator (real processes and signals).

use crate::cli::{EXIT_ERROR, EXIT_OK};
use anyhow::{bail, Context as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::signal::unix::{signal, SignalKind};
use tokio::time::Instant;

/// How long every node gets to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long children get to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How often the launcher checks on its children.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

#[derive(clap::Args, Debug, Clone)]
pub struct DevArgs {
    /// How many nodes to start (named n1..nN).
    #[arg(long, default_value_t = 3)]
    pub nodes: u16,
    /// HTTP port of n1; node i uses this plus i.
    #[arg(long, default_value_t = 8080)]
    pub http_port: u16,
    /// Internode port of n1; node i uses this plus i.
    #[arg(long, default_value_t = 7000)]
    pub peer_port: u16,
    /// Binary client port of n1; node i uses this plus i.
    #[arg(long, default_value_t = 7100)]
    pub client_port: u16,
    /// Redis-protocol (RESP) port of n1; node i uses this plus i.
    #[arg(long, default_value_t = 6380)]
    pub resp_port: u16,
    /// Where the nodes keep their data (one directory each) and logs.
    #[arg(long, value_name = "DIR", default_value = ".dev-cluster")]
    pub data_dir: PathBuf,
    /// Sync policy for every node: always | interval:<ms> | none.
    #[arg(long)]
    pub sync: Option<String>,
    /// Replicas per key.
    #[arg(long)]
    pub n: Option<u8>,
    /// Default read quorum.
    #[arg(long)]
    pub r: Option<u8>,
    /// Default write quorum.
    #[arg(long)]
    pub w: Option<u8>,
    /// Ring partitions (a power of two).
    #[arg(long)]
    pub partitions: Option<u32>,
    /// Show the nodes' logs on this terminal instead of writing them to files.
    #[arg(long)]
    pub logs_to_terminal: bool,
    /// Further `dynamo server` flags, passed to every node (after `--`).
    #[arg(last = true, value_name = "SERVER_FLAGS")]
    pub server_args: Vec<String>,
}

/// One node's name and addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevNode {
    pub name: String,
    pub peer_addr: String,
    pub client_addr: String,
    pub http_addr: String,
    pub resp_addr: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
}

/// The nodes `args` describes, or why the ports do not work.
pub fn plan(args: &DevArgs) -> anyhow::Result<Vec<DevNode>> {
    let count = args.nodes;
    if count == 0 || count > 64 {
        bail!("--nodes {count}: start between 1 and 64 nodes");
    }
    let bases = [
        ("peer", "--peer-port", args.peer_port),
        ("client", "--client-port", args.client_port),
        ("http", "--http-port", args.http_port),
        ("resp", "--resp-port", args.resp_port),
    ];
    for (what, flag, base) in bases {
        if base == 0 || base as u32 + count as u32 - 1 > u16::MAX as u32 {
            bail!("{flag} {base}: {count} nodes need {what} ports {base}..{base}+{count}, which must lie in 1..=65535");
        }
    }
    for (i, (a_what, a_flag, a)) in bases.iter().enumerate() {
        for (b_what, b_flag, b) in &bases[i + 1..] {
            if a.abs_diff(*b) < count {
                bail!(
                    "the {a_what} ports ({a_flag} {a}) and the {b_what} ports ({b_flag} {b}) overlap for {count} nodes; move one of them"
                );
            }
        }
    }
    Ok((0..count)
        .map(|i| {
            let name = format!("n{}", i + 1);
            DevNode {
                peer_addr: format!("127.0.0.1:{}", args.peer_port + i),
                client_addr: format!("127.0.0.1:{}", args.client_port + i),
                http_addr: format!("127.0.0.1:{}", args.http_port + i),
                resp_addr: format!("127.0.0.1:{}", args.resp_port + i),
                data_dir: args.data_dir.join(&name),
                log: args.data_dir.join(format!("{name}.log")),
                name,
            }
        })
        .collect())
}

/// The `server` arguments of one node.
pub fn server_args(args: &DevArgs, nodes: &[DevNode], me: &DevNode) -> Vec<String> {
    let mut out = vec![
        "server".to_string(),
        "--node-id".into(),
        me.name.clone(),
        "--peer-addr".into(),
        me.peer_addr.clone(),
        "--client-addr".into(),
        me.client_addr.clone(),
        "--http-addr".into(),
        me.http_addr.clone(),
        "--resp-addr".into(),
        me.resp_addr.clone(),
        "--data-dir".into(),
        me.data_dir.display().to_string(),
    ];
    for other in nodes.iter().filter(|n| n.name != me.name) {
        out.push("--peer".into());
        out.push(format!("{}={}", other.name, other.peer_addr));
    }
    let mut opt = |flag: &str, value: Option<String>| {
        if let Some(v) = value {
            out.push(flag.to_string());
            out.push(v);
        }
    };
    opt("--sync", args.sync.clone());
    opt("--n", args.n.map(|v| v.to_string()));
    opt("--r", args.r.map(|v| v.to_string()));
    opt("--w", args.w.map(|v| v.to_string()));
    opt("--partitions", args.partitions.map(|v| v.to_string()));
    // Settings dev picks for nodes sharing one machine, unless the user chose
    // (extra server arguments, a config file, the environment).
    let chosen = |flag: &str, env: &str| {
        args.server_args
            .iter()
            .any(|a| a.starts_with(flag) || a.starts_with("--config"))
            || std::env::var_os(env).is_some()
    };
    // Each node gets its share of the cores.
    if !chosen("--worker-threads", "DYNAMO_WORKER_THREADS") {
        opt(
            "--worker-threads",
            Some(worker_share(nodes.len()).to_string()),
        );
    }
    // The nodes take the same writes: with one memtable size they would fill
    // and flush together, on the same cores. Each gets its own.
    if !chosen("--memtable-mb", "DYNAMO_MEMTABLE_MB") {
        let me_index = nodes.iter().position(|n| n.name == me.name).unwrap_or(0);
        opt(
            "--memtable-mb",
            memtable_spread(me_index, nodes.len()).map(|mb| mb.to_string()),
        );
    }
    out.extend(args.server_args.iter().cloned());
    out
}

/// Memtable size in MiB of node `index` of `nodes` sharing this machine:
/// spread evenly over 48..=80 (fjall's default 64 in the middle), so no two
/// flush together under an even load; `None` (the default) for a lone node.
/// Riak randomizes LevelDB's write buffer per vnode for the same reason. On a
/// 3-node dev cluster on 2 cores, 30 s open loops at 18.7k ops/s had a p99 of
/// 14-19 ms with 48/64/80 MiB against 22-34 ms with 64 MiB on all three
/// (three interleaved pairs; docs/design.md).
fn memtable_spread(index: usize, nodes: usize) -> Option<u64> {
    const LOW: u64 = 48;
    const HIGH: u64 = 80;
    if nodes < 2 {
        return None;
    }
    let (i, last) = (index.min(nodes - 1) as u64, (nodes - 1) as u64);
    Some(LOW + ((HIGH - LOW) * i + last / 2) / last)
}

/// Worker threads per node when `nodes` nodes share this machine's cores: an
/// even share, at least one. More threads than cores only add context
/// switches (measured in BENCHMARKS.md's notes).
fn worker_share(nodes: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / nodes.max(1)).max(1)
}

/// Fails, naming the port and its flag, when a port is taken.
fn check_ports_free(nodes: &[DevNode]) -> anyhow::Result<()> {
    for node in nodes {
        for (addr, flag) in [
            (&node.peer_addr, "--peer-port"),
            (&node.client_addr, "--client-port"),
            (&node.http_addr, "--http-port"),
            (&node.resp_addr, "--resp-port"),
        ] {
            if let Err(e) = std::net::TcpListener::bind(addr.as_str()) {
                bail!(
                    "port {addr} ({} of {}) is busy ({e}): stop what uses it (an earlier `dynamo dev`?) or pick other ports with {flag}",
                    flag.trim_start_matches("--").trim_end_matches("-port"),
                    node.name
                );
            }
        }
    }
    Ok(())
}

struct Running {
    node: DevNode,
    child: Child,
    exited: Option<ExitStatus>,
}

impl Drop for Running {
    /// A last resort (an early return or a panic): never leave a child behind.
    fn drop(&mut self) {
        if self.exited.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs the dev cluster until interrupted; the process exit code.
pub async fn run(args: DevArgs) -> anyhow::Result<u8> {
    let nodes = plan(&args)?;
    check_ports_free(&nodes)?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating --data-dir {}", args.data_dir.display()))?;
    let exe = std::env::current_exe().context("finding the dynamo executable")?;

    // Install the handlers before any child exists, so no signal is missed.
    let mut sigterm = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing a SIGHUP handler")?;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);

    let mut running: Vec<Running> = Vec::new();
    for node in &nodes {
        match spawn_node(&exe, &args, &nodes, node) {
            Ok(child) => running.push(Running {
                node: node.clone(),
                child,
                exited: None,
            }),
            Err(e) => {
                stop_all(&mut running).await;
                return Err(e);
            }
        }
    }
    eprintln!(
        "starting {} nodes (data in {}{})...",
        nodes.len(),
        args.data_dir.display(),
        if args.logs_to_terminal {
            String::new()
        } else {
            format!(", logs in {}", args.data_dir.join("n<i>.log").display())
        }
    );

    // Wait for readiness, still answering to signals and noticing dead children.
    let ready = tokio::select! {
        biased;
        _ = &mut ctrl_c => Err("interrupted".to_string()),
        _ = sigterm.recv() => Err("terminated".to_string()),
        r = wait_all_ready(&mut running) => r,
    };
    if let Err(why) = ready {
        stop_all(&mut running).await;
        if why == "interrupted" || why == "terminated" {
            eprintln!("{why} before the cluster was ready; stopped every node");
            return Ok(EXIT_OK);
        }
        bail!("{why}");
    }

    print_banner(&nodes);

    let reason = loop {
        tokio::select! {
            biased;
            _ = &mut ctrl_c => break None,
            _ = sigterm.recv() => break None,
            _ = sighup.recv() => break None,
            _ = tokio::time::sleep(POLL_INTERVAL) => {
                if let Some(msg) = check_children(&mut running) {
                    break Some(msg);
                }
            }
        }
    };
    match &reason {
        None => eprintln!("stopping {} nodes...", running.len()),
        Some(msg) => eprintln!("{msg}; stopping the others..."),
    }
    stop_all(&mut running).await;
    match reason {
        None => {
            eprintln!("stopped");
            Ok(EXIT_OK)
        }
        Some(_) => Ok(EXIT_ERROR),
    }
}

fn spawn_node(
    exe: &Path,
    args: &DevArgs,
    nodes: &[DevNode],
    node: &DevNode,
) -> anyhow::Result<Child> {
    let mut cmd = Command::new(exe);
    cmd.args(server_args(args, nodes, node))
        .stdin(Stdio::null())
        .process_group(0);
    if !args.logs_to_terminal {
        let log = std::fs::File::create(&node.log)
            .with_context(|| format!("creating the log file {}", node.log.display()))?;
        let log2 = log.try_clone()?;
        cmd.stdout(Stdio::from(log)).stderr(Stdio::from(log2));
    }
    cmd.spawn()
        .with_context(|| format!("starting {} ({})", node.name, exe.display()))
}

fn print_banner(nodes: &[DevNode]) {
    let mut out = String::from("dev cluster is up:\n");
    for n in nodes {
        out.push_str(&format!(
            "  {:<4} http http://{}  client {}  resp {}  peer {}\n",
            n.name, n.http_addr, n.client_addr, n.resp_addr, n.peer_addr
        ));
    }
    let first = &nodes[0];
    out.push_str(&format!(
        "try:  curl -X PUT --data-binary hello http://{http}/kv/greeting && curl -i http://{http}/kv/greeting\n",
        http = first.http_addr
    ));
    let all: Vec<&str> = nodes.iter().map(|n| n.client_addr.as_str()).collect();
    out.push_str(&format!(
        "      export DYNAMO_NODES={}; dynamo put greeting hello; dynamo get greeting; dynamo status\n",
        all.join(",")
    ));
    out.push_str(&format!(
        "      redis-cli -p {} set greeting hello; redis-cli -p {} get greeting\n",
        port_of(&first.resp_addr),
        port_of(&nodes[nodes.len() - 1].resp_addr)
    ));
    out.push_str("Ctrl-C stops the cluster.\n");
    // The banner is the point of the command: stdout, whatever the log level.
    print!("{out}");
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
}

fn port_of(addr: &str) -> &str {
    addr.rsplit(':').next().unwrap_or(addr)
}

/// Waits until every node answers `GET /health` and reaches every peer, so a
/// request sent the moment the banner shows is not lost to a peer link still
/// in its reconnect backoff. Errs when a child exits or the time runs out.
async fn wait_all_ready(running: &mut [Running]) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut state = vec![Readiness::Down; running.len()];
    loop {
        if let Some(msg) = check_children(running) {
            return Err(msg);
        }
        for (i, r) in running.iter().enumerate() {
            if state[i] != Readiness::Ready {
                state[i] = readiness(&r.node.http_addr).await;
                if state[i] == Readiness::Ready {
                    tracing::info!(node = %r.node.name, "ready");
                }
            }
        }
        if state.iter().all(|s| *s == Readiness::Ready) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let late: Vec<String> = running
                .iter()
                .zip(&state)
                .filter(|(_, s)| **s != Readiness::Ready)
                .map(|(r, s)| format!("{} ({s}; log: {})", r.node.name, r.node.log.display()))
                .collect();
            return Err(format!(
                "nodes not ready after {} s: {}",
                READY_TIMEOUT.as_secs(),
                late.join(", ")
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a node's `GET /health` says about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Readiness {
    /// No healthy answer (yet).
    Down,
    /// Serving, with links to only some of its peers.
    Connecting { reachable: u64, known: u64 },
    /// Serving, and every peer reachable.
    Ready,
}

impl std::fmt::Display for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Readiness::Down => f.write_str("no healthy answer on /health"),
            Readiness::Connecting { reachable, known } => {
                write!(f, "reaches {reachable} of {known} peers")
            }
            Readiness::Ready => f.write_str("ready"),
        }
    }
}

impl Readiness {
    /// Reads a raw HTTP/1.1 response to `GET /health`.
    fn of_response(response: &[u8]) -> Readiness {
        let Some(split) = response.windows(4).position(|w| w == b"\r\n\r\n") else {
            return Readiness::Down;
        };
        let head = String::from_utf8_lossy(&response[..split]);
        let mut status_line = head.lines().next().unwrap_or("").split_whitespace();
        let ok = status_line.next().is_some_and(|v| v.starts_with("HTTP/1."))
            && status_line.next() == Some("200");
        let body: serde_json::Value = match serde_json::from_slice(&response[split + 4..]) {
            Ok(body) if ok => body,
            _ => return Readiness::Down,
        };
        let peers = &body["peers"];
        match (peers["reachable"].as_u64(), peers["known"].as_u64()) {
            (Some(reachable), Some(known)) if reachable >= known => Readiness::Ready,
            (Some(reachable), Some(known)) => Readiness::Connecting { reachable, known },
            _ => Readiness::Down,
        }
    }
}

/// Asks one node's `GET /health` over a raw HTTP/1.1 connection.
async fn readiness(addr: &str) -> Readiness {
    /// More than any `/health` answer; a longer one is not ours.
    const MAX_RESPONSE: u64 = 64 * 1024;
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        stream.flush().await.ok()?;
        let mut response = Vec::new();
        stream
            .take(MAX_RESPONSE)
            .read_to_end(&mut response)
            .await
            .ok()?;
        Some(Readiness::of_response(&response))
    };
    tokio::time::timeout(Duration::from_millis(500), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(Readiness::Down)
}

/// A message naming the first child that exited, with its status and log tail.
fn check_children(running: &mut [Running]) -> Option<String> {
    for r in running.iter_mut() {
        if r.exited.is_some() {
            continue;
        }
        match r.child.try_wait() {
            Ok(Some(status)) => {
                r.exited = Some(status);
                return Some(format!(
                    "{} exited unexpectedly ({status}){}",
                    r.node.name,
                    log_tail(&r.node.log)
                ));
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(node = %r.node.name, error = %e, "cannot check the child"),
        }
    }
    None
}

fn log_tail(path: &Path) -> String {
    let Ok(text) = std::fs::read_to_string(path) else {
        return String::new();
    };
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(15)..];
    if tail.is_empty() {
        return String::new();
    }
    format!(
        "; last lines of {}:\n  {}",
        path.display(),
        tail.join("\n  ")
    )
}

/// SIGTERM to every running child (via `kill`; SIGKILL if that is missing),
/// then SIGKILL to any still running after [`STOP_GRACE`].
async fn stop_all(running: &mut [Running]) {
    for r in running.iter_mut() {
        if r.exited.is_some() || matches!(r.child.try_wait(), Ok(Some(_))) {
            continue;
        }
        let pid = r.child.id();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !sent {
            let _ = r.child.kill();
        }
    }
    let deadline = Instant::now() + STOP_GRACE;
    loop {
        let mut left = 0;
        for r in running.iter_mut().filter(|r| r.exited.is_none()) {
            match r.child.try_wait() {
                Ok(Some(status)) => r.exited = Some(status),
                Ok(None) => left += 1,
                Err(_) => {}
            }
        }
        if left == 0 {
            return;
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for r in running.iter_mut().filter(|r| r.exited.is_none()) {
        eprintln!(
            "{} did not stop within {} s; killing it",
            r.node.name,
            STOP_GRACE.as_secs()
        );
        let _ = r.child.kill();
        r.exited = r.child.wait().ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> DevArgs {
        let mut argv = vec!["dynamo", "dev"];
        argv.extend_from_slice(extra);
        match crate::cli::Cli::try_parse_from(argv).unwrap().command {
            crate::cli::Command::Dev(a) => a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn plan_spreads_ports_and_names_peers() {
        let a = args(&[
            "--nodes",
            "3",
            "--sync",
            "none",
            "--",
            "--max-siblings",
            "4",
        ]);
        let nodes = plan(&a).unwrap();
        assert_eq!(nodes[2].name, "n3");
        assert_eq!(nodes[2].http_addr, "127.0.0.1:8082");
        assert_eq!(nodes[2].client_addr, "127.0.0.1:7102");
        assert_eq!(nodes[2].peer_addr, "127.0.0.1:7002");
        assert_eq!(nodes[2].resp_addr, "127.0.0.1:6382");
        assert_eq!(nodes[2].data_dir, PathBuf::from(".dev-cluster/n3"));
        let argv = server_args(&a, &nodes, &nodes[0]);
        let joined = argv.join(" ");
        assert!(joined.starts_with("server --node-id n1"), "{joined}");
        assert!(joined.contains("--peer n2=127.0.0.1:7001 --peer n3=127.0.0.1:7002"));
        assert!(!joined.contains("n1=127.0.0.1"), "{joined}");
        assert!(joined.contains("--resp-addr 127.0.0.1:6380"), "{joined}");
        assert!(joined.contains("--sync none"));
        assert!(joined.ends_with("--max-siblings 4"), "{joined}");
        // The environment's choice wins over the share (then none is passed).
        let share = worker_share(3).to_string();
        assert_eq!(
            joined.contains(&format!("--worker-threads {share} ")),
            std::env::var_os("DYNAMO_WORKER_THREADS").is_none(),
            "{joined}"
        );
        // Extra server arguments that set the threads win.
        let own = args(&["--nodes", "3", "--", "--worker-threads", "7"]);
        let joined = server_args(&own, &nodes, &nodes[0]).join(" ");
        assert_eq!(joined.matches("--worker-threads").count(), 1, "{joined}");
        assert!(joined.ends_with("--worker-threads 7"), "{joined}");
        // So does a config file, which may set them.
        let file = args(&["--nodes", "3", "--", "--config", "dynamo.toml"]);
        let joined = server_args(&file, &nodes, &nodes[0]).join(" ");
        assert!(!joined.contains("--worker-threads"), "{joined}");
        assert!(!joined.contains("--memtable-mb"), "{joined}");
        // Each node flushes at its own memtable size, unless the user chose.
        if std::env::var_os("DYNAMO_MEMTABLE_MB").is_none() {
            let sizes: Vec<String> = nodes
                .iter()
                .map(|n| {
                    let argv = server_args(&a, &nodes, n);
                    let at = argv.iter().position(|f| f == "--memtable-mb").unwrap();
                    argv[at + 1].clone()
                })
                .collect();
            assert_eq!(sizes, ["48", "64", "80"]);
        }
        let own = args(&["--nodes", "3", "--", "--memtable-mb", "16"]);
        let joined = server_args(&own, &nodes, &nodes[1]).join(" ");
        assert_eq!(joined.matches("--memtable-mb").count(), 1, "{joined}");
        assert!(joined.ends_with("--memtable-mb 16"), "{joined}");
    }

    #[test]
    fn memtable_sizes_spread_evenly_and_a_lone_node_keeps_the_default() {
        assert_eq!(memtable_spread(0, 1), None);
        assert_eq!(
            (0..2).map(|i| memtable_spread(i, 2)).collect::<Vec<_>>(),
            [Some(48), Some(80)]
        );
        assert_eq!(
            (0..5).map(|i| memtable_spread(i, 5)).collect::<Vec<_>>(),
            [Some(48), Some(56), Some(64), Some(72), Some(80)]
        );
        for i in 0..200 {
            let mb = memtable_spread(i, 200).unwrap();
            assert!((48..=80).contains(&mb), "{mb}");
        }
    }

    #[test]
    fn plan_refuses_overlapping_or_overflowing_ports() {
        let e = plan(&args(&["--nodes", "200"])).unwrap_err().to_string();
        assert!(e.contains("--nodes"), "{e}");
        let e = plan(&args(&["--nodes", "40", "--client-port", "7010"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("overlap"), "{e}");
        let e = plan(&args(&["--nodes", "3", "--resp-port", "8081"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--resp-port") && e.contains("overlap"), "{e}");
        let e = plan(&args(&["--http-port", "65534"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--http-port"), "{e}");
    }

    #[test]
    fn a_busy_port_names_its_flag() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let port_s = port.to_string();
        // Put the busy port on the client side of n1, away from the others.
        let a = args(&[
            "--nodes",
            "1",
            "--client-port",
            &port_s,
            "--peer-port",
            "1",
            "--http-port",
            "2",
        ]);
        let nodes = plan(&a).unwrap();
        // Ports 1 and 2 need root to bind, so check only n1's client port here.
        let only_client = vec![DevNode {
            peer_addr: "127.0.0.1:0".into(),
            http_addr: "127.0.0.1:0".into(),
            resp_addr: "127.0.0.1:0".into(),
            ..nodes[0].clone()
        }];
        let e = check_ports_free(&only_client).unwrap_err().to_string();
        assert!(e.contains(&port_s) && e.contains("--client-port"), "{e}");
    }

    #[test]
    fn readiness_needs_a_200_and_every_peer() {
        let answer = |status: &str, body: &str| {
            Readiness::of_response(
                format!("HTTP/1.1 {status}\r\ncontent-type: application/json\r\n\r\n{body}")
                    .as_bytes(),
            )
        };
        let ok = |reachable: u64, known: u64| {
            format!(
                r#"{{"status":"ok","node":"n1","peers":{{"known":{known},"reachable":{reachable}}}}}"#
            )
        };
        assert_eq!(answer("200 OK", &ok(2, 2)), Readiness::Ready);
        assert_eq!(
            answer("200 OK", &ok(0, 0)),
            Readiness::Ready,
            "a single node"
        );
        assert_eq!(
            answer("200 OK", &ok(1, 2)),
            Readiness::Connecting {
                reachable: 1,
                known: 2
            }
        );
        assert_eq!(
            answer("200 OK", &ok(1, 2)).to_string(),
            "reaches 1 of 2 peers"
        );
        assert_eq!(
            answer("503 Service Unavailable", &ok(2, 2)),
            Readiness::Down
        );
        // An older node, or something else on the port, is not taken as ready.
        assert_eq!(
            answer("200 OK", r#"{"status":"ok","node":"n1"}"#),
            Readiness::Down
        );
        assert_eq!(answer("200 OK", "<html>"), Readiness::Down);
        assert_eq!(
            Readiness::of_response(b"HTTP/1.1 200 OK\r\n"),
            Readiness::Down
        );
        assert_eq!(Readiness::of_response(b""), Readiness::Down);
    }
}
