//! The end-of-run report and the exit codes a sweep or CI reads.

use crate::checkers::{Verdict, ViolationKind};
use crate::history::Outcome;
use crate::run::RunResult;
use std::fmt::Write as _;
use std::time::Duration;

/// Exit codes of `sim run` (and what a sweep lists).
pub mod exit {
    pub const PASS: i32 = 0;
    pub const USAGE: i32 = 2;
    pub const SAFETY: i32 = 10;
    pub const LIVENESS: i32 = 11;
    pub const PANIC: i32 = 12;
    pub const NONDETERMINISM: i32 = 13;

    pub fn describe(code: i32) -> &'static str {
        match code {
            PASS => "pass",
            USAGE => "usage or setup error",
            SAFETY => "safety violation",
            LIVENESS => "liveness violation",
            PANIC => "panic",
            NONDETERMINISM => "nondeterminism",
            _ => "unexpected exit",
        }
    }
}

/// The exit code a result earns: safety beats liveness.
pub fn exit_code(result: &RunResult) -> i32 {
    let mut code = exit::PASS;
    for check in &result.checks {
        if let Verdict::Fail(v) = &check.verdict {
            match v.kind {
                ViolationKind::Safety => return exit::SAFETY,
                ViolationKind::Liveness => code = exit::LIVENESS,
            }
        }
    }
    if result.unreadable_keys > 0 {
        code = exit::LIVENESS;
    }
    code
}

/// The report printed at the end of a run. `wall` is `None` in snapshots, where
/// wall time and the time ratio are left out.
pub fn render(result: &RunResult, wall: Option<Duration>) -> String {
    let mut out = String::new();
    let ops = &result.history.ops;
    let count = |f: &dyn Fn(&Outcome) -> bool| ops.iter().filter(|o| f(&o.outcome)).count();
    let ok = count(&|o| matches!(o, Outcome::Written { .. } | Outcome::Read(_)));
    let failed = count(&|o| matches!(o, Outcome::Failed { .. }));
    let timed_out = count(&|o| matches!(o, Outcome::TimedOut | Outcome::Pending));
    let writes = ops.iter().filter(|o| o.kind.is_write()).count();
    let _ = writeln!(
        out,
        "== report: scenario {} seed {} ==",
        result.scenario.name, result.seed
    );
    let sim_s = result.sim_ms as f64 / 1000.0;
    match wall {
        Some(wall) => {
            let wall_s = wall.as_secs_f64();
            let _ = writeln!(
                out,
                "simulated time  {sim_s:.1}s   wall time {wall_s:.2}s   ratio {:.1}x",
                sim_s / wall_s.max(1e-9)
            );
        }
        None => {
            let _ = writeln!(out, "simulated time  {sim_s:.1}s");
        }
    }
    let _ = writeln!(
        out,
        "operations      {} ({} writes): {} ok, {} failed, {} timed out",
        ops.len(),
        writes,
        ok,
        failed,
        timed_out
    );
    let _ = writeln!(out, "faults injected {}", result.faults);
    let _ = writeln!(out, "peer messages   {}", result.messages);
    if result.unreadable_keys > 0 {
        let _ = writeln!(
            out,
            "liveness        {} keys could not be read with R = N after healing",
            result.unreadable_keys
        );
    }
    let _ = writeln!(out, "checkers:");
    for check in &result.checks {
        let verdict = match &check.verdict {
            Verdict::Pass => "pass".to_string(),
            Verdict::Skipped(why) => format!("skipped ({why})"),
            Verdict::Fail(v) => format!("FAIL ({:?}): {}", v.kind, v.message),
        };
        let _ = writeln!(out, "  {:<20} {verdict}", check.name);
    }
    let _ = writeln!(out, "trace hash      {}", result.trace_hash);
    out
}
