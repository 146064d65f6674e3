//! The `dynamo` command line: `server`, the client commands (`get`, `put`,
//! `delete`, `status`), `dev` (a local cluster of child processes) and `bench` (a
//! load generator, [`crate::bench`]).
//!
//! It owns argument parsing, output formats and exit codes; the work is done by
//! [`crate::server`], [`crate::client`] and [`crate::dev`]. Output that scripts
//! consume goes to stdout (a value, `ok`, JSON); everything else to stderr, so
//! `dynamo get k > file` writes only the value.
//!
//! Exit codes: [`EXIT_OK`] (0), [`EXIT_NOT_FOUND`] (1: a get or delete found no
//! live value), [`EXIT_ERROR`] (2: any error, the server's message printed; clap
//! also exits 2 on a usage error).

use crate::client::{Client, ClientOptions};
use crate::context_token;
use anyhow::Context as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use clap::{Args, Parser, Subcommand};
use dynamo_proto::{ClusterInfo, Context, GetReply};
use serde_json::json;
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::time::Duration;

pub const EXIT_OK: u8 = 0;
/// A get or delete found no live value.
pub const EXIT_NOT_FOUND: u8 = 1;
/// Any error: bad arguments, unreachable nodes, or an error from the server.
pub const EXIT_ERROR: u8 = 2;

/// A Dynamo-style distributed key-value store.
#[derive(Parser, Debug)]
#[command(name = "dynamo", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a node.
    #[cfg(not(madsim))]
    Server(Box<crate::config::ServerArgs>),
    /// Read a key: its value (several if there are concurrent siblings) on
    /// stdout, byte for byte (a newline is added only on a terminal), its
    /// context token on stderr. Exit 1 when not found.
    Get(GetArgs),
    /// Write a key. Without --context it first reads the key and replaces what it
    /// read; --blind writes without reading (adding a sibling).
    Put(PutArgs),
    /// Delete a key (reads it first unless --context is given). Exit 1 when there
    /// was nothing to delete.
    Delete(DeleteArgs),
    /// Show the cluster: members, their addresses and state, N/R/W/Q, the ring version.
    Status(StatusArgs),
    /// Start a local cluster of N server processes for development.
    #[cfg(not(madsim))]
    Dev(crate::dev::DevArgs),
    /// Load-test a cluster: concurrent workers, uniform or zipfian keys, closed
    /// or open loop; latency percentiles, throughput and errors (writes are
    /// blind overwrites).
    #[cfg(not(madsim))]
    Bench(crate::bench::BenchArgs),
}

impl Command {
    /// The runtime's worker threads this command asks for (`None`: one per
    /// core). A server and `bench` have a setting; a server's bad
    /// configuration is reported when the server resolves it again.
    pub fn worker_threads(&self) -> Option<usize> {
        match self {
            #[cfg(not(madsim))]
            Command::Server(args) => crate::config::ServerConfig::resolve(args)
                .ok()
                .and_then(|c| c.worker_threads),
            #[cfg(not(madsim))]
            Command::Bench(args) => args.threads.map(usize::from),
            _ => None,
        }
    }

    /// Long-running commands log at `info` by default; client commands at `warn`.
    pub fn default_log_level(&self) -> &'static str {
        match self {
            #[cfg(not(madsim))]
            Command::Server(_) | Command::Dev(_) => "info",
            _ => "warn",
        }
    }
}

/// How to reach the cluster.
#[derive(Args, Debug, Clone)]
pub struct ConnectArgs {
    /// A node's client address (host:port). Repeat, or comma-separate, to give
    /// several; the first that answers tells the client the whole cluster.
    #[arg(
        long = "node",
        value_name = "ADDR",
        env = "DYNAMO_NODES",
        value_delimiter = ',',
        default_value = "127.0.0.1:7100"
    )]
    pub nodes: Vec<String>,
    /// Give up on a request after this long.
    #[arg(long, value_name = "MS", default_value_t = 5_000)]
    pub timeout_ms: u64,
    /// Print JSON on stdout instead of text.
    #[arg(long)]
    pub json: bool,
}

impl ConnectArgs {
    pub async fn client(&self) -> anyhow::Result<Client> {
        let timeout = Duration::from_millis(self.timeout_ms.max(1));
        let options = ClientOptions {
            connect_timeout: timeout.min(Duration::from_secs(1)),
            request_timeout: timeout,
            ..ClientOptions::default()
        };
        Client::connect_with(&self.nodes, options)
            .await
            .with_context(|| {
                format!(
                    "cannot reach the cluster at {} (pass --node ADDR or set DYNAMO_NODES)",
                    self.nodes.join(", ")
                )
            })
    }
}

#[derive(Args, Debug, Clone)]
pub struct GetArgs {
    pub key: String,
    /// Read quorum for this request (default: the cluster's R).
    #[arg(long)]
    pub r: Option<u8>,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

#[derive(Args, Debug, Clone)]
pub struct PutArgs {
    pub key: String,
    /// The value. Without VALUE or --file, the value is read from stdin.
    #[arg(conflicts_with = "file")]
    pub value: Option<String>,
    /// Read the value from this file.
    #[arg(long, value_name = "PATH")]
    pub file: Option<PathBuf>,
    /// The context token a get printed: replace exactly what that read saw.
    #[arg(long, value_name = "TOKEN", conflicts_with = "blind")]
    pub context: Option<String>,
    /// Write without reading first and without a context: adds a sibling next to
    /// whatever the key holds.
    #[arg(long)]
    pub blind: bool,
    /// Read quorum for the read before the write.
    #[arg(long)]
    pub r: Option<u8>,
    /// Write quorum for this request (default: the cluster's W).
    #[arg(long)]
    pub w: Option<u8>,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

#[derive(Args, Debug, Clone)]
pub struct DeleteArgs {
    pub key: String,
    /// The context token a get printed: delete exactly what that read saw.
    #[arg(long, value_name = "TOKEN")]
    pub context: Option<String>,
    /// Read quorum for the read before the delete.
    #[arg(long)]
    pub r: Option<u8>,
    /// Write quorum for this request (default: the cluster's W).
    #[arg(long)]
    pub w: Option<u8>,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// Runs the command; the exit code on success ([`EXIT_OK`] or
/// [`EXIT_NOT_FOUND`]). An error means [`EXIT_ERROR`].
pub async fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        #[cfg(not(madsim))]
        Command::Server(args) => {
            crate::server::run(&args).await?;
            Ok(EXIT_OK)
        }
        Command::Get(args) => get(args).await,
        Command::Put(args) => put(args).await,
        Command::Delete(args) => delete(args).await,
        Command::Status(args) => status(args).await,
        #[cfg(not(madsim))]
        Command::Dev(args) => crate::dev::run(args).await,
        #[cfg(not(madsim))]
        Command::Bench(args) => crate::bench::run(args).await,
    }
}

async fn get(args: GetArgs) -> anyhow::Result<u8> {
    let client = args.connect.client().await?;
    let reply = client.get(args.key.as_bytes(), args.r).await?;
    let token = context_token::encode(&reply.context);
    let live = reply.values().count();
    let mut out = std::io::stdout().lock();
    if args.connect.json {
        writeln!(out, "{}", get_json(&args.key, &reply))?;
    } else if live == 1 {
        let value = reply.values().next().unwrap_or_default();
        out.write_all(value)?;
        // The value's bytes exactly, for pipes and files; on a terminal, end
        // the line so the prompt (and the context on stderr) start afresh.
        if std::io::stdout().is_terminal() && !value.ends_with(b"\n") {
            out.write_all(b"\n")?;
        }
        let tombstones = reply.siblings.len() - 1;
        if tombstones > 0 {
            eprintln!("note: a concurrent delete is a sibling of this value; a put with this context resolves it");
        }
    } else if live > 1 {
        write_siblings(&mut out, &reply)?;
        eprintln!(
            "{live} concurrent values (siblings): write the resolved value with this context to replace them"
        );
    }
    out.flush()?;
    drop(out);
    if live == 0 {
        eprintln!("not found: {}", args.key);
    }
    if !args.connect.json {
        eprintln!("context: {token}");
    }
    Ok(if live == 0 { EXIT_NOT_FOUND } else { EXIT_OK })
}

/// Every sibling, numbered, with its dot; values as text when they are UTF-8,
/// else as base64.
fn write_siblings(out: &mut impl Write, reply: &GetReply) -> std::io::Result<()> {
    let total = reply.siblings.len();
    for (i, (dot, sibling)) in reply.siblings.iter().enumerate() {
        let shown = match &sibling.value {
            None => "(deleted)".to_string(),
            Some(v) => match std::str::from_utf8(v) {
                Ok(text) => text.to_string(),
                Err(_) => format!("base64:{}", BASE64.encode(v)),
            },
        };
        writeln!(out, "--- sibling {} of {total} (dot {dot})", i + 1)?;
        writeln!(out, "{shown}")?;
    }
    Ok(())
}

/// `{"key", "found", "siblings": [{"dot", "deleted", "value", "value_base64"}],
/// "context"}`; `value` is null for a tombstone or a value that is not UTF-8.
pub fn get_json(key: &str, reply: &GetReply) -> serde_json::Value {
    let siblings: Vec<serde_json::Value> = reply
        .siblings
        .iter()
        .map(|(dot, s)| {
            let text = s.value.as_deref().and_then(|v| std::str::from_utf8(v).ok());
            json!({
                "dot": dot.to_string(),
                "deleted": s.value.is_none(),
                "value": text,
                "value_base64": s.value.as_deref().map(|v| BASE64.encode(v)),
            })
        })
        .collect();
    json!({
        "key": key,
        "found": reply.values().next().is_some(),
        "siblings": siblings,
        "context": context_token::encode(&reply.context),
    })
}

fn parse_context(token: &str) -> anyhow::Result<Context> {
    context_token::decode(token).map_err(|e| anyhow::anyhow!("--context: {e}"))
}

/// The context a write without `--context` uses: what a read of the key returns.
/// Also the number of live values and tombstones it replaces.
async fn read_for_write(
    client: &Client,
    key: &str,
    r: Option<u8>,
    what: &str,
) -> anyhow::Result<(Context, usize, usize)> {
    let reply = client.get(key.as_bytes(), r).await.with_context(|| {
        format!("reading {key:?} before the {what} (to replace what it holds; pass --context TOKEN to skip the read)")
    })?;
    let live = reply.values().count();
    Ok((reply.context, live, reply.siblings.len() - live))
}

fn read_value(args: &PutArgs) -> anyhow::Result<Vec<u8>> {
    if let Some(v) = &args.value {
        return Ok(v.as_bytes().to_vec());
    }
    if let Some(path) = &args.file {
        return std::fs::read(path).with_context(|| format!("reading --file {}", path.display()));
    }
    let mut buf = Vec::new();
    std::io::stdin()
        .lock()
        .read_to_end(&mut buf)
        .context("reading the value from stdin (or pass VALUE or --file PATH)")?;
    Ok(buf)
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

async fn put(args: PutArgs) -> anyhow::Result<u8> {
    let value = read_value(&args)?;
    let given = args.context.as_deref().map(parse_context).transpose()?;
    let client = args.connect.client().await?;
    let (context, replaced) = match (given, args.blind) {
        (Some(ctx), _) => (Some(ctx), None),
        (None, true) => (None, None),
        (None, false) => {
            let (ctx, live, _) = read_for_write(&client, &args.key, args.r, "put").await?;
            (Some(ctx), Some(live))
        }
    };
    let (dot, context) = client
        .put(args.key.as_bytes(), Some(value), context, args.w)
        .await?;
    let token = context_token::encode(&context);
    if args.connect.json {
        println!(
            "{}",
            json!({"ok": true, "key": args.key, "dot": dot.to_string(), "replaced": replaced, "context": token})
        );
    } else {
        match replaced {
            Some(n) if n > 0 => println!("ok (replaced {})", plural(n, "value", "values")),
            _ => println!("ok"),
        }
        println!("context: {token}");
    }
    Ok(EXIT_OK)
}

async fn delete(args: DeleteArgs) -> anyhow::Result<u8> {
    let given = args.context.as_deref().map(parse_context).transpose()?;
    let client = args.connect.client().await?;
    let (context, replaced) = match given {
        Some(ctx) => (ctx, None),
        None => {
            let (ctx, live, _) = read_for_write(&client, &args.key, args.r, "delete").await?;
            if live == 0 {
                if args.connect.json {
                    println!("{}", json!({"ok": false, "key": args.key, "found": false}));
                }
                eprintln!("not found: {} (nothing to delete)", args.key);
                return Ok(EXIT_NOT_FOUND);
            }
            (ctx, Some(live))
        }
    };
    let (dot, context) = client
        .delete(args.key.as_bytes(), Some(context), args.w)
        .await?;
    let token = context_token::encode(&context);
    if args.connect.json {
        println!(
            "{}",
            json!({"ok": true, "key": args.key, "found": true, "dot": dot.to_string(), "deleted": replaced, "context": token})
        );
    } else {
        match replaced {
            Some(n) => println!("deleted ({})", plural(n, "value", "values")),
            None => println!("deleted"),
        }
        println!("context: {token}");
    }
    Ok(EXIT_OK)
}

async fn status(args: StatusArgs) -> anyhow::Result<u8> {
    let client = args.connect.client().await?;
    let info = client.cluster_info().await?;
    if args.connect.json {
        println!("{}", status_json(&info));
    } else {
        print!("{}", status_table(&info));
    }
    Ok(EXIT_OK)
}

pub fn status_json(info: &ClusterInfo) -> serde_json::Value {
    let members: Vec<serde_json::Value> = info
        .members
        .iter()
        .map(|m| {
            json!({
                "id": m.id.as_str(),
                "status": m.status,
                "partitions": m.partitions,
                "client_addr": m.client_addr,
                "http_addr": m.http_addr,
                "peer_addr": m.peer_addr,
            })
        })
        .collect();
    json!({
        "cluster_id": info.cluster_id.0,
        "answered_by": info.node.as_str(),
        "ring_version": info.ring_version,
        "n": info.n,
        "r": info.r,
        "w": info.w,
        "q": info.q,
        "members": members,
    })
}

/// The members as an aligned table, after a summary line.
pub fn status_table(info: &ClusterInfo) -> String {
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            s.to_string()
        }
    };
    let mut rows = vec![[
        "ID".to_string(),
        "STATUS".to_string(),
        "PARTITIONS".to_string(),
        "CLIENT".to_string(),
        "HTTP".to_string(),
        "PEER".to_string(),
    ]];
    for m in &info.members {
        rows.push([
            m.id.to_string(),
            m.status.clone(),
            m.partitions.to_string(),
            dash(&m.client_addr),
            dash(&m.http_addr),
            dash(&m.peer_addr),
        ]);
    }
    let mut widths = [0usize; 6];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = format!(
        "cluster {}: {} members, ring version {}, N={} R={} W={} Q={} (answered by {})\n",
        info.cluster_id,
        info.members.len(),
        info.ring_version,
        info.n,
        info.r,
        info.w,
        info.q,
        info.node
    );
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Prints an error the way every command does, and returns [`EXIT_ERROR`].
pub fn report_error(e: &anyhow::Error) -> u8 {
    eprintln!("error: {e:#}");
    EXIT_ERROR
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use dynamo_proto::{Actor, ClusterId, Dot, MemberInfo, NodeId, Sibling};

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_parse() {
        let cli = Cli::try_parse_from([
            "dynamo", "put", "k", "v", "--node", "a:1,b:2", "--node", "c:3", "--w", "3", "--json",
        ])
        .unwrap();
        let Command::Put(p) = cli.command else {
            panic!("not a put")
        };
        assert_eq!(p.connect.nodes, ["a:1", "b:2", "c:3"]);
        assert_eq!(
            (p.w, p.connect.json, p.value.as_deref()),
            (Some(3), true, Some("v"))
        );
        assert!(Cli::try_parse_from(["dynamo", "put", "k", "v", "--file", "f"]).is_err());
        assert!(Cli::try_parse_from(["dynamo", "put", "k", "--blind", "--context", "x"]).is_err());
        let cli = Cli::try_parse_from(["dynamo", "get", "k"]).unwrap();
        let Command::Get(g) = cli.command else {
            panic!("not a get")
        };
        if std::env::var_os("DYNAMO_NODES").is_none() {
            assert_eq!(g.connect.nodes, ["127.0.0.1:7100"]);
        }
    }

    fn dot(counter: u64) -> Dot {
        Dot {
            actor: Actor {
                incarnation: 0xab,
                epoch: 1,
            },
            counter,
        }
    }

    #[test]
    fn get_json_marks_tombstones_and_binary_values() {
        let sib = |v: Option<&[u8]>| Sibling {
            value: v.map(|v| v.to_vec()),
            timestamp: Default::default(),
        };
        let reply = GetReply {
            siblings: vec![
                (dot(1), sib(Some(b"text"))),
                (dot(2), sib(Some(&[0xff, 0x00]))),
                (dot(3), sib(None)),
            ],
            context: Context::default(),
        };
        let j = get_json("k", &reply);
        assert_eq!(j["found"], true);
        assert_eq!(j["siblings"][0]["value"], "text");
        assert_eq!(j["siblings"][1]["value"], serde_json::Value::Null);
        assert_eq!(j["siblings"][1]["value_base64"], "/wA=");
        assert_eq!(j["siblings"][2]["deleted"], true);
        assert_eq!(j["context"], context_token::encode(&Context::default()));
        let mut text = Vec::new();
        write_siblings(&mut text, &reply).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(text.contains("sibling 2 of 3"), "{text}");
        assert!(text.contains("base64:/wA="), "{text}");
        assert!(text.contains("(deleted)"), "{text}");
    }

    #[test]
    fn status_table_lists_members() {
        let info = ClusterInfo {
            cluster_id: ClusterId("dev".into()),
            node: NodeId::new("n1"),
            members: vec![MemberInfo {
                id: NodeId::new("n1"),
                peer_addr: "127.0.0.1:7000".into(),
                client_addr: "127.0.0.1:7100".into(),
                http_addr: String::new(),
                status: "up".into(),
                partitions: 256,
            }],
            ring_version: 4,
            ring_owners: vec![],
            n: 3,
            r: 2,
            w: 2,
            q: 256,
        };
        let table = status_table(&info);
        assert!(table.contains("N=3 R=2 W=2 Q=256"), "{table}");
        assert!(table.contains("ring version 4"), "{table}");
        assert!(
            table.lines().nth(2).unwrap().starts_with("n1  up"),
            "{table}"
        );
        assert_eq!(status_json(&info)["members"][0]["http_addr"], "");
    }
}
