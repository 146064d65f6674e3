//! Command dispatch: what each RESP command does, in terms of the core's
//! [`ClientRequest`]s. The module docs of [`crate::resp`] describe the semantics.

use super::parse::Command;
use super::{Action, Conn, Reply, Shared};
use crate::context_token;
use crate::runtime::CoreHandle;
use dynamo_proto::{
    ClientError, ClientReply, ClientRequest, ClusterInfo, Context, GetReply, Sibling, WriteMode,
};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The version `INFO` and `HELLO` report: Redis 7.0 compatible, dynamo inside.
pub const REDIS_VERSION: &str = "7.0.0-dynamo";

/// Most keys one `MGET` reads from the core at once: enough to overlap the
/// reads of a typical `MGET`, few enough that a long one holds few values
/// beyond the ones it has already counted against its reply limit.
const MGET_READS_IN_FLIGHT: usize = 64;

/// The largest `MGET` reply, in bytes: 64 MiB, or four of the node's largest
/// values if that is more. A larger `MGET` gets `-ERR` (see [`crate::resp`]).
pub fn mget_reply_bytes_max(max_value_bytes: usize) -> usize {
    (64usize << 20).max(max_value_bytes.saturating_mul(4))
}

/// How many units of the connection's reply window a command takes: one per
/// value of its reply for `MGET`, one otherwise.
pub(crate) fn reply_units(args: &Command) -> usize {
    match args.first() {
        Some(name) if name.eq_ignore_ascii_case(b"mget") => args.len().saturating_sub(1).max(1),
        _ => 1,
    }
}

/// A command this port knows, as `COMMAND` describes it.
struct Spec {
    name: &'static str,
    /// Redis convention: `n > 0` exactly n words (name included), `-n` at least n.
    arity: i64,
    flags: &'static [&'static str],
    first_key: i64,
    last_key: i64,
    step: i64,
}

const fn spec(
    name: &'static str,
    arity: i64,
    flags: &'static [&'static str],
    keys: (i64, i64, i64),
) -> Spec {
    Spec {
        name,
        arity,
        flags,
        first_key: keys.0,
        last_key: keys.1,
        step: keys.2,
    }
}

const NO_KEYS: (i64, i64, i64) = (0, 0, 0);

const SPECS: &[Spec] = &[
    spec("get", 2, &["readonly", "fast"], (1, 1, 1)),
    spec("set", -3, &["write", "denyoom"], (1, 1, 1)),
    spec("del", -2, &["write"], (1, -1, 1)),
    spec("exists", -2, &["readonly", "fast"], (1, -1, 1)),
    spec("mget", -2, &["readonly", "fast"], (1, -1, 1)),
    spec("mset", -3, &["write", "denyoom"], (1, -1, 2)),
    spec("dynamo.getall", 2, &["readonly"], (1, 1, 1)),
    spec("dynamo.put", 4, &["write", "denyoom"], (1, 1, 1)),
    spec("ping", -1, &["fast", "stale"], NO_KEYS),
    spec("echo", 2, &["fast"], NO_KEYS),
    spec(
        "quit",
        -1,
        &["fast", "noscript", "loading", "stale"],
        NO_KEYS,
    ),
    spec("select", 2, &["fast", "loading", "stale"], NO_KEYS),
    spec(
        "hello",
        -1,
        &["fast", "noscript", "loading", "stale"],
        NO_KEYS,
    ),
    spec("client", -2, &["noscript", "loading", "stale"], NO_KEYS),
    spec("command", -1, &["loading", "stale"], NO_KEYS),
    spec(
        "config",
        -2,
        &["admin", "noscript", "loading", "stale"],
        NO_KEYS,
    ),
    spec("info", -1, &["loading", "stale"], NO_KEYS),
];

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn wrong_arity(name: &str) -> Reply {
    Reply::err(format!("wrong number of arguments for '{name}' command"))
}

/// Redis's answer to a command it does not know, word for word.
fn unknown_command(args: &Command) -> Reply {
    let mut rest = String::new();
    for arg in &args[1..] {
        if rest.len() >= 128 {
            break;
        }
        let arg: String = lossy(arg).chars().take(128 - rest.len()).collect();
        rest.push_str(&format!("'{arg}' "));
    }
    let name: String = lossy(&args[0]).chars().take(128).collect();
    Reply::err(format!(
        "unknown command '{name}', with args beginning with: {rest}"
    ))
}

fn unknown_subcommand(command: &str, sub: &[u8]) -> Reply {
    Reply::err(format!(
        "unknown subcommand '{}'. Try {} HELP.",
        lossy(sub),
        command.to_ascii_uppercase()
    ))
}

/// Handles one command read from `conn`.
pub(crate) fn dispatch(conn: &mut Conn, args: Command) -> Action {
    if args.is_empty() {
        return Action::Nothing;
    }
    conn.shared.commands.fetch_add(1, Ordering::Relaxed);
    let name = lossy(&args[0]).to_ascii_lowercase();
    let Some(spec) = SPECS.iter().find(|s| s.name == name) else {
        return Action::Reply(unknown_command(&args));
    };
    let n = args.len() as i64;
    if (spec.arity > 0 && n != spec.arity) || (spec.arity < 0 && n < -spec.arity) {
        return Action::Reply(wrong_arity(spec.name));
    }
    let handle = conn.shared.handle.clone();
    let mut args = args;
    args.remove(0);
    match spec.name {
        "get" => {
            let key = args.swap_remove(0);
            let request = ClientRequest::Get {
                key: key.clone(),
                r: None,
            };
            conn.submit_keyed(&key, request, |reply| match get_reply(reply) {
                Ok(read) => into_visible(read).map(Reply::Bulk).unwrap_or(Reply::Nil),
                Err(e) => e,
            })
        }
        "set" => {
            if args.len() > 2 {
                return Action::Reply(Reply::err(format!(
                    "SET options are not supported (got '{}'): dynamo has no expiry (EX, PX, \
                     EXAT, PXAT, KEEPTTL) and no conditional writes (NX, XX, GET); send SET key \
                     value",
                    lossy(&args[2])
                )));
            }
            let value = args.pop().unwrap_or_default();
            let key = args.pop().unwrap_or_default();
            let request = ClientRequest::Put {
                key: key.clone(),
                value: Some(value),
                context: None,
                w: None,
                mode: WriteMode::Overwrite,
            };
            conn.submit_keyed(&key, request, |reply| match put_reply(reply) {
                Ok(_) => Reply::ok(),
                Err(e) => e,
            })
        }
        "del" => {
            let keys: Vec<Vec<u8>> = args
                .into_iter()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let work = keys.clone().into_iter().map(|key| {
                let handle = handle.clone();
                async move { delete(&handle, key).await }
            });
            let work: Vec<_> = work.collect();
            conn.spawn_keyed(&keys, async move {
                match all(work).await {
                    Ok(counts) => Reply::Integer(counts.into_iter().sum()),
                    Err(e) => e,
                }
            })
        }
        "exists" => {
            let unique: Vec<Vec<u8>> = args
                .iter()
                .cloned()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let work: Vec<_> = unique
                .iter()
                .cloned()
                .map(|key| {
                    let handle = handle.clone();
                    async move { get(&handle, key).await.map(|r| visible(&r).is_some()) }
                })
                .collect();
            let keys = unique.clone();
            conn.spawn_keyed(&keys, async move {
                match all(work).await {
                    Ok(found) => {
                        let present: BTreeSet<&Vec<u8>> = unique
                            .iter()
                            .zip(found)
                            .filter(|(_, f)| *f)
                            .map(|(k, _)| k)
                            .collect();
                        Reply::Integer(args.iter().filter(|k| present.contains(k)).count() as i64)
                    }
                    Err(e) => e,
                }
            })
        }
        "mget" => {
            let reply_bytes_max = mget_reply_bytes_max(handle.info.max_value_bytes);
            let distinct: Vec<Vec<u8>> = args
                .iter()
                .cloned()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            conn.spawn_keyed(&distinct, async move {
                mget(handle, args, reply_bytes_max).await
            })
        }
        "mset" => {
            if !args.len().is_multiple_of(2) {
                return Action::Reply(wrong_arity("mset"));
            }
            // A key named twice ends with its last value, as in Redis; writing
            // both concurrently could leave them as siblings.
            let mut pairs: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
            let mut it = args.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                pairs.insert(k, v);
            }
            let keys: Vec<Vec<u8>> = pairs.keys().cloned().collect();
            let work: Vec<_> = pairs
                .into_iter()
                .map(|(key, value)| {
                    let handle = handle.clone();
                    async move {
                        put(&handle, key, Some(value), None, WriteMode::Overwrite)
                            .await
                            .map(|_| ())
                    }
                })
                .collect();
            conn.spawn_keyed(&keys, async move {
                match all(work).await {
                    Ok(_) => Reply::ok(),
                    Err(Reply::Error(e)) => Reply::Error(format!(
                        "{e} (MSET is not atomic: some keys may have been written)"
                    )),
                    Err(e) => e,
                }
            })
        }
        "dynamo.getall" => {
            let key = args.swap_remove(0);
            let keys = [key.clone()];
            conn.spawn_keyed(&keys, async move {
                match get(&handle, key).await {
                    Ok(read) => {
                        let mut items = vec![Reply::bulk(context_token::encode(&read.context))];
                        items.extend(read.values().map(Reply::bulk));
                        Reply::Array(items)
                    }
                    Err(e) => e,
                }
            })
        }
        "dynamo.put" => {
            let value = args.pop().unwrap_or_default();
            let token = args.pop().unwrap_or_default();
            let key = args.pop().unwrap_or_default();
            let context = if token.is_empty() {
                None
            } else {
                match std::str::from_utf8(&token)
                    .map_err(|_| "context token is not ASCII".to_string())
                    .and_then(context_token::decode)
                {
                    Ok(c) => Some(c),
                    Err(e) => return Action::Reply(Reply::err(e)),
                }
            };
            let keys = [key.clone()];
            conn.spawn_keyed(&keys, async move {
                match put(&handle, key, Some(value), context, WriteMode::Context).await {
                    Ok(ctx) => Reply::bulk(context_token::encode(&ctx)),
                    Err(e) => e,
                }
            })
        }
        "ping" => match args.len() {
            0 => Action::Reply(Reply::Simple("PONG".into())),
            1 => Action::Reply(Reply::Bulk(args.swap_remove(0))),
            _ => Action::Reply(wrong_arity("ping")),
        },
        "echo" => Action::Reply(Reply::Bulk(args.swap_remove(0))),
        "quit" => Action::ReplyAndClose(Reply::ok()),
        "select" => Action::Reply(match lossy(&args[0]).parse::<i64>() {
            Ok(0) => Reply::ok(),
            Ok(_) => Reply::err("DB index is out of range (dynamo has only database 0)"),
            Err(_) => Reply::err("value is not an integer or out of range"),
        }),
        "hello" => Action::Reply(hello(conn, &args)),
        "client" => Action::Reply(client(conn, &args)),
        "command" => Action::Reply(command(&args)),
        "config" => Action::Reply(config(&conn.shared, &args)),
        "info" => {
            let shared = conn.shared.clone();
            let sections: Vec<String> =
                args.iter().map(|a| lossy(a).to_ascii_lowercase()).collect();
            conn.spawn(async move { info(&shared, &sections).await })
        }
        _ => Action::Reply(unknown_command(&args)),
    }
}

// ---------------------------------------------------------------------------
// The core

/// The RESP form of a core error: `-TRYAGAIN` when retrying can help (a quorum
/// was not met, the node is shutting down), `-ERR` otherwise.
pub fn core_error(error: ClientError) -> Reply {
    match error {
        ClientError::Quorum { .. } | ClientError::Unavailable(_) => {
            Reply::Error(format!("TRYAGAIN {error}"))
        }
        other => Reply::err(other.to_string()),
    }
}

fn unexpected(reply: &ClientReply) -> Reply {
    let kind = match reply {
        ClientReply::Get(_) => "Get",
        ClientReply::Put { .. } => "Put",
        ClientReply::LocalGet(_) => "LocalGet",
        ClientReply::ClusterInfo(_) => "ClusterInfo",
        ClientReply::Pong { .. } => "Pong",
        ClientReply::Error(_) => "Error",
    };
    Reply::err(format!(
        "internal error: the core answered with an unexpected {kind} reply"
    ))
}

async fn get(handle: &CoreHandle, key: Vec<u8>) -> Result<GetReply, Reply> {
    get_reply(handle.request(ClientRequest::Get { key, r: None }).await)
}

/// The core's answer to a `Get`, or the RESP error to send instead.
fn get_reply(reply: ClientReply) -> Result<GetReply, Reply> {
    match reply {
        ClientReply::Get(read) => Ok(read),
        ClientReply::Error(e) => Err(core_error(e)),
        other => Err(unexpected(&other)),
    }
}

/// The core's answer to a `Put` (the new write's context), or the RESP error
/// to send instead.
fn put_reply(reply: ClientReply) -> Result<Context, Reply> {
    match reply {
        ClientReply::Put { context, .. } => Ok(context),
        ClientReply::Error(e) => Err(core_error(e)),
        other => Err(unexpected(&other)),
    }
}

async fn put(
    handle: &CoreHandle,
    key: Vec<u8>,
    value: Option<Vec<u8>>,
    context: Option<Context>,
    mode: WriteMode,
) -> Result<Context, Reply> {
    let request = ClientRequest::Put {
        key,
        value,
        context,
        w: None,
        mode,
    };
    put_reply(handle.request(request).await)
}

/// Reads `key`; if any sibling is live, deletes exactly what was read. 1 when
/// `GET` would have returned a value.
async fn delete(handle: &CoreHandle, key: Vec<u8>) -> Result<i64, Reply> {
    let read = get(handle, key.clone()).await?;
    if read.values().next().is_none() {
        return Ok(0);
    }
    let counted = i64::from(visible(&read).is_some());
    put(handle, key, None, Some(read.context), WriteMode::Context).await?;
    Ok(counted)
}

/// The sibling `GET` shows: the greatest by (timestamp, actor, counter), the
/// same order as `dynamo_core::version::winner`, so every node picks the same.
pub fn winner(read: &GetReply) -> Option<&Sibling> {
    winner_index(read).map(|at| &read.siblings[at].1)
}

/// Where [`winner`] is in `read.siblings`.
fn winner_index(read: &GetReply) -> Option<usize> {
    read.siblings
        .iter()
        .enumerate()
        .max_by(|(_, (dx, x)), (_, (dy, y))| x.timestamp.cmp(&y.timestamp).then_with(|| dx.cmp(dy)))
        .map(|(at, _)| at)
}

/// What `GET` returns: the winner's value, `None` when there is no sibling or
/// the winner is a tombstone.
pub fn visible(read: &GetReply) -> Option<&[u8]> {
    winner(read).and_then(|s| s.value.as_deref())
}

/// [`visible`], taken out of the read rather than copied.
pub(crate) fn into_visible(read: GetReply) -> Option<Vec<u8>> {
    let at = winner_index(&read)?;
    read.siblings.into_iter().nth(at).and_then(|(_, s)| s.value)
}

/// The bytes `value` takes in an `MGET` reply (`$<len>` and data, or `$-1`).
fn bulk_reply_bytes(value: Option<&[u8]>) -> usize {
    match value {
        Some(v) => 1 + v.len().to_string().len() + 2 + v.len() + 2,
        None => 5,
    }
}

/// `MGET`: each distinct key is read once, at most [`MGET_READS_IN_FLIGHT`]
/// at a time and in order, and a value named several times is copied into
/// the reply only once the whole reply is known to fit `reply_bytes_max`.
/// So memory stays near the reply's own size, and never far above the limit,
/// whatever the keys repeat; over it, the answer is `-ERR` and nothing more is
/// read.
async fn mget(handle: CoreHandle, keys: Vec<Vec<u8>>, reply_bytes_max: usize) -> Reply {
    // Distinct keys in order of first naming, how often each is named, and
    // which distinct key each position of the reply shows.
    let mut index: BTreeMap<&[u8], usize> = BTreeMap::new();
    let mut distinct: Vec<&[u8]> = Vec::new();
    let mut named: Vec<usize> = Vec::new();
    let positions: Vec<usize> = keys
        .iter()
        .map(|key| {
            let i = *index.entry(key.as_slice()).or_insert_with(|| {
                distinct.push(key.as_slice());
                named.push(0);
                distinct.len() - 1
            });
            named[i] += 1;
            i
        })
        .collect();
    let mut reply_bytes = 1 + keys.len().to_string().len() + 2;
    let mut values: Vec<Option<Vec<u8>>> = Vec::with_capacity(distinct.len());
    let mut reads = VecDeque::with_capacity(MGET_READS_IN_FLIGHT);
    let mut next = 0;
    loop {
        while reads.len() < MGET_READS_IN_FLIGHT && next < distinct.len() {
            let handle = handle.clone();
            let key = distinct[next].to_vec();
            reads.push_back(tokio::spawn(async move {
                get(&handle, key).await.map(into_visible)
            }));
            next += 1;
        }
        let Some(read) = reads.pop_front() else {
            break;
        };
        let value = match read.await {
            Ok(Ok(value)) => value,
            Ok(Err(e)) => return e,
            Err(_) => return Reply::err("internal error: a key's task failed"),
        };
        let i = values.len();
        reply_bytes =
            reply_bytes.saturating_add(named[i].saturating_mul(bulk_reply_bytes(value.as_deref())));
        if reply_bytes > reply_bytes_max {
            return Reply::err(format!(
                "the MGET reply would be larger than the limit of {reply_bytes_max} bytes \
                 (more than {reply_bytes} with {} of its {} distinct keys read); ask for \
                 fewer keys per MGET, or GET the large values one at a time",
                i + 1,
                distinct.len()
            ));
        }
        values.push(value);
    }
    // Each value is copied once per naming but the last, which moves.
    let mut items = Vec::with_capacity(positions.len());
    for i in positions {
        named[i] -= 1;
        let value = if named[i] == 0 {
            values[i].take()
        } else {
            values[i].clone()
        };
        items.push(value.map(Reply::Bulk).unwrap_or(Reply::Nil));
    }
    Reply::Array(items)
}

/// Runs every future as its own task; their results in order, or the first
/// error in order.
async fn all<T, F>(work: Vec<F>) -> Result<Vec<T>, Reply>
where
    T: Send + 'static,
    F: Future<Output = Result<T, Reply>> + Send + 'static,
{
    let mut work = work;
    if work.len() == 1 {
        if let Some(only) = work.pop() {
            return only.await.map(|v| vec![v]);
        }
    }
    let tasks: Vec<_> = work.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(tasks.len());
    let mut first_error = None;
    for task in tasks {
        match task.await {
            Ok(Ok(v)) => out.push(v),
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(_) => {
                first_error.get_or_insert(Reply::err("internal error: a key's task failed"));
            }
        }
    }
    match first_error {
        None => Ok(out),
        Some(e) => Err(e),
    }
}

// ---------------------------------------------------------------------------
// Connection and server commands

fn hello(conn: &mut Conn, args: &[Vec<u8>]) -> Reply {
    let mut rest = args;
    if let Some((ver, tail)) = args.split_first() {
        match lossy(ver).parse::<i64>() {
            Ok(2) => {}
            Ok(3) => {
                return Reply::Error(
                    "NOPROTO this server speaks RESP2 only: send HELLO 2, or no HELLO".into(),
                )
            }
            Ok(_) => return Reply::Error("NOPROTO unsupported protocol version".into()),
            Err(_) => return Reply::err("Protocol version is not an integer or out of range"),
        }
        rest = tail;
    }
    let mut name = None;
    let mut i = 0;
    while i < rest.len() {
        let opt = lossy(&rest[i]).to_ascii_lowercase();
        match opt.as_str() {
            "auth" if i + 2 < rest.len() => {
                return Reply::err("AUTH is not supported: dynamo has no users or passwords");
            }
            "setname" if i + 1 < rest.len() => {
                name = Some(rest[i + 1].clone());
                i += 2;
            }
            _ => return Reply::err(format!("Syntax error in HELLO option '{opt}'")),
        }
    }
    if let Some(name) = name {
        if let Err(e) = set_name(conn, name) {
            return e;
        }
    }
    Reply::Array(vec![
        Reply::bulk("server"),
        Reply::bulk("redis"),
        Reply::bulk("version"),
        Reply::bulk(REDIS_VERSION),
        Reply::bulk("proto"),
        Reply::Integer(2),
        Reply::bulk("id"),
        Reply::Integer(conn.id as i64),
        Reply::bulk("mode"),
        Reply::bulk("standalone"),
        Reply::bulk("role"),
        Reply::bulk("master"),
        Reply::bulk("modules"),
        Reply::Array(Vec::new()),
    ])
}

fn set_name(conn: &mut Conn, name: Vec<u8>) -> Result<(), Reply> {
    if name.iter().any(|&b| !(b'!'..=b'~').contains(&b)) {
        return Err(Reply::err(
            "Client names cannot contain spaces, newlines or special characters.",
        ));
    }
    conn.name = (!name.is_empty()).then_some(name);
    Ok(())
}

fn client(conn: &mut Conn, args: &[Vec<u8>]) -> Reply {
    let sub = lossy(&args[0]).to_ascii_lowercase();
    match (sub.as_str(), args.len()) {
        ("setname", 2) => match set_name(conn, args[1].clone()) {
            Ok(()) => Reply::ok(),
            Err(e) => e,
        },
        ("getname", 1) => conn.name.clone().map(Reply::Bulk).unwrap_or(Reply::Nil),
        ("id", 1) => Reply::Integer(conn.id as i64),
        ("setinfo", 3) => Reply::ok(),
        ("info", 1) => Reply::bulk(format!(
            "id={} name={} db=0 resp=2\n",
            conn.id,
            conn.name.as_deref().map(lossy).unwrap_or_default()
        )),
        ("help", _) => Reply::Array(
            [
                "CLIENT <subcommand> [<arg> ...]. Subcommands are:",
                "GETNAME, SETNAME <name>, ID, INFO, SETINFO <attr> <value> (accepted and ignored)",
            ]
            .iter()
            .map(|s| Reply::Simple(s.to_string()))
            .collect(),
        ),
        ("setname" | "getname" | "id" | "setinfo" | "info", _) => {
            wrong_arity(&format!("client|{sub}"))
        }
        _ => unknown_subcommand("client", &args[0]),
    }
}

fn command_info(s: &Spec) -> Reply {
    Reply::Array(vec![
        Reply::bulk(s.name),
        Reply::Integer(s.arity),
        Reply::Array(
            s.flags
                .iter()
                .map(|f| Reply::Simple(f.to_string()))
                .collect(),
        ),
        Reply::Integer(s.first_key),
        Reply::Integer(s.last_key),
        Reply::Integer(s.step),
        Reply::Array(Vec::new()),
        Reply::Array(Vec::new()),
        Reply::Array(Vec::new()),
        Reply::Array(Vec::new()),
    ])
}

fn find_spec(name: &[u8]) -> Option<&'static Spec> {
    let name = lossy(name).to_ascii_lowercase();
    SPECS.iter().find(|s| s.name == name)
}

fn command(args: &[Vec<u8>]) -> Reply {
    let Some(sub) = args.first() else {
        return Reply::Array(SPECS.iter().map(command_info).collect());
    };
    match lossy(sub).to_ascii_lowercase().as_str() {
        "count" => Reply::Integer(SPECS.len() as i64),
        "list" => Reply::strings(SPECS.iter().map(|s| s.name)),
        // Documentation is optional; redis-cli asks for it on start and copes
        // with an empty answer.
        "docs" => Reply::Array(Vec::new()),
        "info" if args.len() == 1 => Reply::Array(SPECS.iter().map(command_info).collect()),
        "info" => Reply::Array(
            args[1..]
                .iter()
                .map(|n| find_spec(n).map(command_info).unwrap_or(Reply::Nil))
                .collect(),
        ),
        "help" => Reply::Array(
            [
                "COMMAND [<subcommand>]. Subcommands are:",
                "(no subcommand): every command's details; COUNT; LIST; INFO [<name> ...]; DOCS",
            ]
            .iter()
            .map(|s| Reply::Simple(s.to_string()))
            .collect(),
        ),
        _ => unknown_subcommand("command", sub),
    }
}

/// `*` and `?` glob matching, ASCII case-insensitive (for `CONFIG GET`).
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p].eq_ignore_ascii_case(&text[t])) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

fn config(shared: &Shared, args: &[Vec<u8>]) -> Reply {
    let sub = lossy(&args[0]).to_ascii_lowercase();
    match sub.as_str() {
        "get" => {
            if args.len() < 2 {
                return wrong_arity("config|get");
            }
            let params: Vec<(&str, String)> = vec![
                // No RDB snapshots and no AOF: durability is dynamo's --sync.
                ("save", String::new()),
                ("appendonly", "no".into()),
                ("databases", "1".into()),
                ("maxmemory", "0".into()),
                ("timeout", "0".into()),
                ("port", shared.port.to_string()),
                ("cluster-enabled", "no".into()),
                ("proto-max-bulk-len", shared.limits.max_bulk.to_string()),
            ];
            let mut out = Vec::new();
            for (name, value) in &params {
                if args[1..].iter().any(|pat| glob(pat, name.as_bytes())) {
                    out.push(Reply::bulk(*name));
                    out.push(Reply::bulk(value.as_str()));
                }
            }
            Reply::Array(out)
        }
        "set" => Reply::err(
            "CONFIG SET is not supported: configure dynamo with `dynamo server` flags (see \
             `dynamo server --help`)",
        ),
        "resetstat" => Reply::ok(),
        "help" => Reply::Array(vec![Reply::Simple(
            "CONFIG GET <pattern> [<pattern> ...]: a few Redis parameters, for tools".into(),
        )]),
        _ => unknown_subcommand("config", &args[0]),
    }
}

async fn info(shared: &Arc<Shared>, sections: &[String]) -> Reply {
    let everything = sections.is_empty()
        || sections
            .iter()
            .any(|s| matches!(s.as_str(), "all" | "default" | "everything"));
    let want = |name: &str| everything || sections.iter().any(|s| s == name);
    let mut out = String::new();
    if want("server") {
        out.push_str(&format!(
            "# Server\r\nredis_version:{REDIS_VERSION}\r\nredis_mode:standalone\r\n\
             dynamo_version:{}\r\ndynamo_node:{}\r\nprocess_id:{}\r\ntcp_port:{}\r\n\
             uptime_in_seconds:{}\r\n\r\n",
            env!("CARGO_PKG_VERSION"),
            shared.handle.info.node_id,
            std::process::id(),
            shared.port,
            shared.started.elapsed().as_secs(),
        ));
    }
    if want("clients") {
        out.push_str(&format!(
            "# Clients\r\nconnected_clients:{}\r\n\r\n",
            shared.connected.load(Ordering::Relaxed)
        ));
    }
    if want("stats") {
        out.push_str(&format!(
            "# Stats\r\ntotal_connections_received:{}\r\ntotal_commands_processed:{}\r\n\r\n",
            shared.connections_received.load(Ordering::Relaxed),
            shared.commands.load(Ordering::Relaxed)
        ));
    }
    if want("cluster") {
        out.push_str("# Cluster\r\ncluster_enabled:0\r\n");
        match shared.handle.request(ClientRequest::ClusterInfo).await {
            ClientReply::ClusterInfo(c) => out.push_str(&cluster_lines(&c)),
            ClientReply::Error(e) => out.push_str(&format!("dynamo_cluster_error:{e}\r\n")),
            other => out.push_str(&format!("dynamo_cluster_error:{other:?}\r\n")),
        }
        out.push_str("\r\n");
    }
    if want("keyspace") {
        // Keys are spread over the ring and not counted.
        out.push_str("# Keyspace\r\n\r\n");
    }
    Reply::Bulk(out.into_bytes())
}

fn cluster_lines(c: &ClusterInfo) -> String {
    let up = c.members.iter().filter(|m| m.status == "up").count();
    let mut out = format!(
        "dynamo_cluster_id:{}\r\ndynamo_node:{}\r\ndynamo_members:{}\r\ndynamo_members_up:{up}\r\n\
         dynamo_n:{}\r\ndynamo_r:{}\r\ndynamo_w:{}\r\ndynamo_partitions:{}\r\n\
         dynamo_ring_version:{}\r\n",
        c.cluster_id,
        c.node,
        c.members.len(),
        c.n,
        c.r,
        c.w,
        c.q,
        c.ring_version
    );
    for m in &c.members {
        out.push_str(&format!(
            "dynamo_member_{}:status={},peer={},client={},http={},partitions={}\r\n",
            m.id, m.status, m.peer_addr, m.client_addr, m.http_addr, m.partitions
        ));
    }
    out
}
