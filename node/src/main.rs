//! The `dynamo` binary: parses the command line, sets up logging, runs the
//! command on a multi-threaded tokio runtime and maps the outcome to an exit
//! code (see [`dynamo_node::cli`]).

#[cfg(not(madsim))]
#[tokio::main]
async fn main() -> std::process::ExitCode {
    use clap::Parser as _;
    use dynamo_node::cli::{self, Cli};
    use std::io::IsTerminal as _;
    use tracing_subscriber::EnvFilter;

    let cli = Cli::parse();
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
