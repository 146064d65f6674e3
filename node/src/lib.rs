//! `dynamo-node`: the shell around `dynamo-core`. It owns the I/O the core must
//! never do: storage engines, sockets, timers, clocks, the client APIs and the CLI.

#[cfg(not(madsim))]
pub mod cli;
pub mod client;
pub mod config;
pub mod context_token;
#[cfg(not(madsim))]
pub mod dev;
#[cfg(not(madsim))]
pub mod http;
pub mod runtime;
#[cfg(not(madsim))]
pub mod server;
pub mod storage;
