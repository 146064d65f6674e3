//! `sim run` and `sim sweep`.
//!
//! A run prints the seed and the fully resolved scenario first (a swarm run can
//! be saved as a file), then the report, and on failure the line that replays
//! it. Sweeps run every seed in its own process, so no static state leaks from
//! one simulation into the next.

use crate::report::{self, exit};
use crate::run;
use crate::scenario::{Scenario, DEFAULT_SCENARIO};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "sim", about = "Deterministic simulation of a dynamo cluster")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run one seed and check every invariant.
    Run {
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// A scenario file (default: the built-in scenarios/default.toml).
        #[arg(long)]
        scenario: Option<PathBuf>,
        /// Run the seed twice, each in its own process, and compare trace hashes.
        #[arg(long)]
        check_determinism: bool,
        /// Print only a one-line verdict.
        #[arg(long)]
        quiet: bool,
        /// Node and simulator logs (a RUST_LOG filter, e.g. `info`).
        #[arg(long, default_value = "error")]
        log: String,
    },
    /// Run many seeds, each in its own process, and list the failures.
    Sweep {
        /// Seeds as A..B (B excluded).
        #[arg(long, default_value = "1..21")]
        seeds: String,
        /// Scenario files (repeatable; default: every file in scenarios/).
        #[arg(long)]
        scenario: Vec<PathBuf>,
        /// Parallel processes (default: the number of cores).
        #[arg(long)]
        jobs: Option<usize>,
        /// Also run each seed twice and compare trace hashes, for the first K seeds.
        #[arg(long, default_value_t = 0)]
        check_determinism: usize,
    },
}

pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                exit::USAGE
            } else {
                exit::PASS
            };
        }
    };
    match cli.command {
        Cmd::Run {
            seed,
            scenario,
            check_determinism,
            quiet,
            log,
        } => {
            if check_determinism {
                return determinism(seed, scenario.as_ref());
            }
            run_seed(seed, scenario.as_ref(), quiet, &log)
        }
        Cmd::Sweep {
            seeds,
            scenario,
            jobs,
            check_determinism,
        } => sweep(&seeds, scenario, jobs, check_determinism),
    }
}

fn load(path: Option<&PathBuf>) -> anyhow::Result<Scenario> {
    let text = match path {
        Some(p) => std::fs::read_to_string(p)
            .map_err(|e| anyhow::anyhow!("reading scenario {}: {e}", p.display()))?,
        None => DEFAULT_SCENARIO.to_string(),
    };
    Scenario::parse(&text).map_err(|e| {
        anyhow::anyhow!(
            "scenario {}: {e:#}",
            path.map(|p| p.display().to_string())
                .unwrap_or("default".into())
        )
    })
}

/// The command that replays a seed.
pub fn replay_line(seed: u64, scenario: Option<&PathBuf>) -> String {
    match scenario {
        Some(p) => format!("just sim seed={seed} scenario={}", p.display()),
        None => format!("just sim seed={seed}"),
    }
}

fn run_seed(seed: u64, path: Option<&PathBuf>, quiet: bool, log: &str) -> i32 {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(log))
        .with_writer(std::io::stderr)
        .try_init();
    let scenario = match load(path) {
        Ok(s) => s.resolve(seed),
        Err(e) => {
            eprintln!("error: {e:#}");
            return exit::USAGE;
        }
    };
    if !quiet {
        println!("== sim run: seed {seed} ==");
        println!("# the resolved scenario (save it to replay this exact run):");
        println!("{}", scenario.to_toml());
    }
    let limit =
        Duration::from_millis(scenario.workload.duration.0 + scenario.liveness.quiesce.0 + 120_000);
    let wall = std::time::Instant::now();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut rt =
            madsim::runtime::Runtime::with_seed_and_config(seed, madsim::Config::default());
        rt.set_time_limit(limit);
        rt.block_on(run::run(scenario.clone(), seed))
    }));
    let wall = wall.elapsed();
    let code = match outcome {
        Ok(Ok(result)) => {
            let code = report::exit_code(&result);
            if quiet {
                println!(
                    "seed {seed} {}: {} (sim {:.1}s, wall {:.2}s, trace {})",
                    scenario.name,
                    exit::describe(code),
                    result.sim_ms as f64 / 1000.0,
                    wall.as_secs_f64(),
                    result.trace_hash
                );
            } else {
                print!("{}", report::render(&result, Some(wall)));
            }
            code
        }
        Ok(Err(e)) => {
            eprintln!("error: the simulation could not be set up: {e:#}");
            exit::USAGE
        }
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            println!("seed {seed} {}: panic: {msg}", scenario.name);
            exit::PANIC
        }
    };
    if code != exit::PASS {
        println!("replay: {}", replay_line(seed, path));
    }
    code
}

/// Runs `sim run --quiet` for one seed in a child process; returns its exit
/// code and its last line.
fn child_run(seed: u64, scenario: Option<&PathBuf>) -> (i32, String) {
    let exe = std::env::current_exe().expect("the sim binary's path");
    let mut cmd = Command::new(exe);
    cmd.args(["run", "--quiet", "--seed", &seed.to_string()]);
    if let Some(p) = scenario {
        cmd.arg("--scenario").arg(p);
    }
    match cmd.output() {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            let line = text
                .lines()
                .find(|l| l.starts_with("seed "))
                .unwrap_or("")
                .to_string();
            (out.status.code().unwrap_or(exit::PANIC), line)
        }
        Err(e) => (exit::USAGE, format!("could not start the sim binary: {e}")),
    }
}

fn trace_of(line: &str) -> Option<&str> {
    line.rsplit_once("trace ")
        .map(|(_, h)| h.trim_end_matches(')'))
}

fn determinism(seed: u64, scenario: Option<&PathBuf>) -> i32 {
    let (a_code, a) = child_run(seed, scenario);
    let (b_code, b) = child_run(seed, scenario);
    println!("first:  {a}");
    println!("second: {b}");
    match (trace_of(&a), trace_of(&b)) {
        (Some(x), Some(y)) if x == y && a_code == b_code => {
            println!("deterministic: both runs have trace hash {x}");
            a_code
        }
        _ => {
            println!("NONDETERMINISM: the same seed gave different runs");
            println!(
                "replay: {} (with --check-determinism)",
                replay_line(seed, scenario)
            );
            exit::NONDETERMINISM
        }
    }
}

fn parse_range(seeds: &str) -> anyhow::Result<std::ops::Range<u64>> {
    let (a, b) = seeds
        .split_once("..")
        .ok_or_else(|| anyhow::anyhow!("--seeds {seeds:?}: expected A..B, like 1..501"))?;
    Ok(a.trim().parse()?..b.trim().parse()?)
}

fn scenario_files() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("toml"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

fn sweep(
    seeds: &str,
    scenarios: Vec<PathBuf>,
    jobs: Option<usize>,
    determinism_seeds: usize,
) -> i32 {
    let range = match parse_range(seeds) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e:#}");
            return exit::USAGE;
        }
    };
    let scenarios = if scenarios.is_empty() {
        scenario_files()
    } else {
        scenarios
    };
    for s in &scenarios {
        if let Err(e) = load(Some(s)) {
            eprintln!("error: {e:#}");
            return exit::USAGE;
        }
    }
    let jobs = jobs
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
        })
        .max(1);
    let mut work: Vec<(PathBuf, u64, bool)> = Vec::new();
    for s in &scenarios {
        for (i, seed) in range.clone().enumerate() {
            work.push((s.clone(), seed, i < determinism_seeds));
        }
    }
    let total = work.len();
    println!(
        "sweep: {} scenario(s) x seeds {seeds} = {total} runs, {jobs} at a time",
        scenarios.len()
    );
    let started = std::time::Instant::now();
    let queue = Arc::new(Mutex::new(work));
    let failures = Arc::new(Mutex::new(Vec::<(i32, String)>::new()));
    let done = Arc::new(Mutex::new(0usize));
    let workers: Vec<_> = (0..jobs)
        .map(|_| {
            let queue = queue.clone();
            let failures = failures.clone();
            let done = done.clone();
            std::thread::spawn(move || loop {
                let Some((scenario, seed, det)) = queue.lock().unwrap().pop() else {
                    return;
                };
                let (mut code, line) = child_run(seed, Some(&scenario));
                if det && code == exit::PASS {
                    let (_, again) = child_run(seed, Some(&scenario));
                    if trace_of(&line) != trace_of(&again) {
                        code = exit::NONDETERMINISM;
                    }
                }
                let mut n = done.lock().unwrap();
                *n += 1;
                if code != exit::PASS {
                    let msg = format!(
                        "FAIL [{}] {line}\n     replay: {}",
                        exit::describe(code),
                        replay_line(seed, Some(&scenario))
                    );
                    println!("{msg}");
                    failures.lock().unwrap().push((code, msg));
                } else if n.is_multiple_of(25) || *n == total {
                    println!(
                        "  {}/{total} runs done, {:.0}s",
                        *n,
                        started.elapsed().as_secs_f64()
                    );
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let failures = failures.lock().unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "sweep finished in {elapsed:.0}s ({:.1} runs per minute)",
        total as f64 * 60.0 / elapsed.max(1e-9)
    );
    if !failures.is_empty() {
        println!("failing runs:");
        for (_, f) in failures.iter() {
            println!("{f}");
        }
    }
    println!(
        "sim: {} passed, {} failed",
        total - failures.len(),
        failures.len()
    );
    // The most severe failure decides the exit code.
    [
        exit::SAFETY,
        exit::PANIC,
        exit::NONDETERMINISM,
        exit::LIVENESS,
        exit::USAGE,
    ]
    .into_iter()
    .find(|code| failures.iter().any(|(c, _)| c == code))
    .or_else(|| failures.first().map(|(c, _)| *c))
    .unwrap_or(exit::PASS)
}
