//! `dynamo-node`: the shell around `dynamo-core`. It owns the I/O the core must
//! never do: storage engines, sockets, timers, clocks, the client APIs and the CLI.

#[cfg(not(madsim))]
pub mod bench;
#[cfg(not(madsim))]
pub mod cli;
pub mod client;
pub mod config;
pub mod connection_limit;
pub mod context_token;
#[cfg(not(madsim))]
pub mod dev;
mod gather;
#[cfg(not(madsim))]
pub mod http;
pub mod metrics;
mod read_buf;
mod reply_window;
/// The Redis-protocol front end (only `tokio::net`/`io`/`sync`, so it also
/// builds under madsim).
pub mod resp;
pub mod runtime;
#[cfg(not(madsim))]
pub mod server;
pub mod storage;
