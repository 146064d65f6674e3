#!/usr/bin/env bash
# `just bench-sim`: how fast the simulator runs the default scenario, and the
# ring's balance and movement table; rewrites the "Simulator" section of
# BENCHMARKS.md (between the bench-sim markers) and keeps the rest of the file.
#
#   - 20 seeds of `sim run --quiet --seed N`, one after another: simulated seconds
#     per wall second (from each run's own "sim X s, wall Y s") and seeds per
#     minute (wall clock around the processes, startup included);
#   - `sim sweep --seeds 1..41 --scenario scenarios/default.toml --jobs 2`: the
#     runs per minute it reports;
#   - `just ring-table`: the balance and movement lines.
#
# Knobs (environment): BENCH_SIM_SEEDS (default 20), BENCH_SIM_SWEEP (default 1..41),
# BENCH_SIM_JOBS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT="$ROOT/BENCHMARKS.md"
SEEDS=${BENCH_SIM_SEEDS:-20}
SWEEP=${BENCH_SIM_SWEEP:-1..41}
JOBS=${BENCH_SIM_JOBS:-2}
SIM="target/sim/sim/sim"

START_EPOCH=$(date +%s)
log() { printf '[bench-sim %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}
for tool in just cargo python3; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found on PATH (just: pip install rust-just)"
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/dynamo-bench-sim.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "building the simulator (just sim-build)"
just sim-build >&2
[ -x "$SIM" ] || die "$SIM was not built"

# --- one seed at a time --------------------------------------------------------
log "running seeds 1..$SEEDS of the default scenario, one at a time"
: >"$WORK/runs.txt"
failed_seeds=""
t0=$(date +%s.%N)
for ((seed = 1; seed <= SEEDS; seed++)); do
    rc=0
    timeout 300 "$SIM" run --quiet --seed "$seed" >>"$WORK/runs.txt" 2>&1 || rc=$?
    if [ "$rc" != 0 ]; then
        failed_seeds="$failed_seeds $seed(exit $rc)"
        log "  seed $seed exited $rc"
    fi
done
t1=$(date +%s.%N)
tail -n 3 "$WORK/runs.txt" | sed 's/^/  /' >&2

# --- a sweep ---------------------------------------------------------------------
sweep_cmd=("$SIM" sweep --seeds "$SWEEP" --scenario scenarios/default.toml --jobs "$JOBS")
log "${sweep_cmd[*]}"
sweep_rc=0
timeout 1200 "${sweep_cmd[@]}" >"$WORK/sweep.txt" 2>&1 || sweep_rc=$?
tail -n 2 "$WORK/sweep.txt" | sed 's/^/  /' >&2
RUNS_PER_MIN=$(grep -o '[0-9.]* runs per minute' "$WORK/sweep.txt" | tail -1 | awk '{ print $1 }' || true)
[ -n "$RUNS_PER_MIN" ] || die "could not find 'runs per minute' in the sweep's output: $(tail -5 "$WORK/sweep.txt")"
SWEEP_SUMMARY=$(grep -E '^sim: ' "$WORK/sweep.txt" | tail -1 || true)

# --- the ring table --------------------------------------------------------------
log "just ring-table"
just ring-table >"$WORK/ring.txt" 2>&1 || die "just ring-table failed: $(tail -20 "$WORK/ring.txt")"

END_EPOCH=$(date +%s)
export WORK SEEDS T0="$t0" T1="$t1" RUNS_PER_MIN JOBS SWEEP SWEEP_RC="$sweep_rc" \
    SWEEP_SUMMARY FAILED_SEEDS="$failed_seeds"
SECTION=$(
    python3 - <<'EOF'
import os, re
env = os.environ
w = env["WORK"]
sim_s = wall_s = 0.0
runs = 0
for line in open(w + "/runs.txt"):
    m = re.search(r"sim ([0-9.]+)s, wall ([0-9.]+)s", line)
    if m:
        runs += 1
        sim_s += float(m.group(1))
        wall_s += float(m.group(2))
if runs == 0:
    raise SystemExit("no 'sim X s, wall Y s' in the runs' output")
outer = float(env["T1"]) - float(env["T0"])
seeds = int(env["SEEDS"])

out = []
out.append("| measurement | value |")
out.append("|---|---|")
out.append(f"| simulated seconds per wall second (default scenario, {runs} seeds, in-process) | {sim_s / wall_s:,.0f} |")
out.append(f"| simulated time per seed (mean) | {sim_s / runs:.1f} s |")
out.append(f"| wall time per seed, in-process (mean) | {wall_s / runs:.2f} s |")
out.append(f"| seeds per minute, one process at a time (startup included) | {seeds * 60 / outer:,.0f} |")
out.append(f"| `sim sweep` runs per minute, `--jobs {env['JOBS']}` (seeds {env['SWEEP']}) | {float(env['RUNS_PER_MIN']):,.0f} |")
notes = []
if env.get("FAILED_SEEDS", "").strip():
    notes.append(f"- seeds that did not pass: {env['FAILED_SEEDS'].strip()}")
if env["SWEEP_RC"] != "0":
    notes.append(f"- the sweep exited {env['SWEEP_RC']}: {env.get('SWEEP_SUMMARY', '')}")

# The ring table: each test's header (after "test name ... ") and its indented rows.
table = []
moves = {"join": [], "leave": []}
for line in open(w + "/ring.txt"):
    line = line.rstrip("\n")
    m = re.match(r"^test \S+ \.\.\. (.*Q = .*)$", line)
    if m:
        if table:
            table.append("")
        table.append(m.group(1))
    elif re.match(r"^  [SN] ", line):
        table.append(line)
        mv = re.match(r"^  N\s*\d+ (join|leave)\s+(\d+) ->\s*(\d+): moved\s+(\d+) \(ideal\s+(\d+)\)", line)
        if mv:
            kind, a, b, moved, ideal = mv.groups()
            moves[kind].append((int(moved) - int(ideal), int(moved), int(ideal), int(a), int(b)))
if not table:
    raise SystemExit("no ring table lines in `just ring-table` output")
summary = []
for kind, rows in moves.items():
    if rows:
        exact = sum(1 for r in rows if r[0] == 0)
        worst = max(rows)
        summary.append(
            f"- {kind}s: moved exactly the ideal number of partitions in {exact} of {len(rows)} steps; "
            f"worst {worst[1]} vs ideal {worst[2]} (S {worst[3]} -> {worst[4]})"
        )

print("\n".join(out))
if notes:
    print()
    print("\n".join(notes))
print()
print("### Ring balance and movement (Q = 256, `just ring-table`)")
print()
print("\n".join(summary))
print()
print("```text")
print("\n".join(table))
print("```")
EOF
) || die "could not build the simulator section"

echo
echo "$SECTION"
echo

GIT_REV=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    GIT_REV="$GIT_REV (with uncommitted changes)"
fi
CPU_MODEL=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
MEM=$(awk '/^MemTotal:/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)

{
    echo '<!-- bench-sim:begin -->'
    echo '## Simulator'
    echo
    echo "Run $(date -u '+%Y-%m-%d %H:%M UTC') at commit $GIT_REV; took $((END_EPOCH - START_EPOCH)) s."
    echo
    echo "- Machine: $(nproc) cores, $MEM, $CPU_MODEL, Linux $(uname -r)"
    echo "- Versions: $(rustc --version)"
    echo
    printf '%s\n' "$SECTION"
    echo
    echo 'Commands:'
    echo
    echo '```sh'
    echo 'just sim-build'
    echo "for seed in \$(seq 1 $SEEDS); do $SIM run --quiet --seed \$seed; done"
    echo "${sweep_cmd[*]}"
    echo 'just ring-table'
    echo '```'
    echo '<!-- bench-sim:end -->'
} >"$WORK/section.md"

# Replace the section in place, or append it (creating the file with the header
# `just bench` writes when there is none yet).
if [ ! -f "$OUT" ]; then
    cat >"$OUT" <<'EOF'
# Benchmarks

Generated; do not edit by hand. `just bench` (ci/bench.sh) rewrites the cluster
section and keeps the simulator section; `just bench-sim` (ci/bench-sim.sh)
rewrites only the simulator section. Both need no running services: `just bench`
installs redis-server, redis-tools, etcd-server and wrk with apt when missing,
starts everything on free loopback ports in a temporary directory and stops it all
when done.

<!-- bench:begin -->
## Cluster benchmarks

Not measured yet: run `just bench`.
<!-- bench:end -->

EOF
fi
python3 - "$OUT" "$WORK/section.md" <<'EOF'
import sys
path, section_path = sys.argv[1], sys.argv[2]
text = open(path).read()
section = open(section_path).read().rstrip("\n") + "\n"
begin, end = "<!-- bench-sim:begin -->", "<!-- bench-sim:end -->"
if begin in text and end in text:
    a = text.index(begin)
    b = text.index(end) + len(end)
    text = text[:a] + section.rstrip("\n") + text[b:]
else:
    text = text.rstrip("\n") + "\n\n" + section
open(path + ".tmp", "w").write(text)
EOF
mv "$OUT.tmp" "$OUT"
log "wrote the simulator section of $OUT (took $((END_EPOCH - START_EPOCH)) s)"
