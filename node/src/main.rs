//! The `dynamo` binary: parses the command line, sets up logging, runs the
//! command on a multi-threaded tokio runtime and maps the outcome to an exit
//! code (see [`dynamo_node::cli`]).

/// mimalloc instead of glibc's malloc: the request path allocates small,
/// short-lived buffers on one thread and frees them on another, where glibc's
/// arenas spend a measurable share of a node's CPU (see BENCHMARKS.md).
#[cfg(not(madsim))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h (the same in its v2 and v3);
/// libmimalloc-sys names no constant for it.
#[cfg(not(madsim))]
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps the memory mimalloc frees for reuse instead of handing it back to the
/// OS after a second idle, its default. A node's heap cycles on a longer beat
/// than that (memtables fill, flush and are freed every several seconds under
/// load), so the default purged pages only to fault them in again, zeroing
/// 2 MiB at a time: about 700 faults a second per node under puts, and 10% of
/// the nodes' CPU (docs/design.md). The price is that a node's resident memory
/// stays at its high-water mark. `MIMALLOC_PURGE_DELAY` in the environment
/// (milliseconds) still decides when set.
#[cfg(not(madsim))]
fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: sets one of mimalloc's process-wide options, which it reads
    // afresh each time it considers purging; any thread may set it at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

#[cfg(not(madsim))]
fn main() -> std::process::ExitCode {
    use clap::Parser as _;
    use dynamo_node::cli::{self, Cli};

    keep_freed_memory();
    let cli = Cli::parse();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cli.command.worker_threads() {
        builder.worker_threads(n);
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the tokio runtime: {e}");
            return std::process::ExitCode::from(cli::EXIT_ERROR);
        }
    };
    let code = runtime.block_on(run(cli));
    // Everything a command must finish (a server's drain and final sync, a
    // client's request) is awaited inside `run`. What may still be running is
    // a blocking name lookup for a host that did not answer in time:
    // getaddrinfo cannot be cancelled, and dropping the runtime would wait for
    // it, up to the resolver's own timeouts (10 s for a container cut off from
    // its network's DNS) after the answer was printed.
    runtime.shutdown_background();
    code
}

#[cfg(not(madsim))]
async fn run(cli: dynamo_node::cli::Cli) -> std::process::ExitCode {
    use dynamo_node::cli;
    use std::io::IsTerminal as _;
    use tracing_subscriber::EnvFilter;

    // RUST_LOG wins; otherwise servers log at info and client commands at warn.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(cli.command.default_log_level()));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let code = match cli::run(cli).await {
        Ok(code) => code,
        Err(e) => cli::report_error(&e),
    };
    std::process::ExitCode::from(code)
}

/// Under `--cfg madsim` the networking is simulated, so a real binary cannot
/// work; the simulator drives the library instead.
#[cfg(madsim)]
fn main() {
    eprintln!("dynamo was built with --cfg madsim, where it cannot run; build it normally");
    std::process::exit(2);
}

#[cfg(all(test, not(madsim)))]
mod tests {
    use super::*;

    /// The raw option number is the purge delay: its default is mimalloc's
    /// 1000 ms, unlike any other option's, and setting it reads back.
    #[test]
    fn the_purge_delay_option_is_the_one_set() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        // SAFETY: reads and sets mimalloc's process-wide options, as main does.
        let default = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(
            default, 1000,
            "option {MI_OPTION_PURGE_DELAY} is not the purge delay"
        );
        keep_freed_memory();
        let now = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(now, -1);
    }
}
