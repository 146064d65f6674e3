#!/usr/bin/env bash
# `just bench`: throughput and latency of a 3-node dev cluster against Redis and
# etcd on this machine, written to BENCHMARKS.md (the "Cluster benchmarks"
# section; the simulator section written by `just bench-sim` is kept).
#
# What it does, in one run:
#   1. installs redis-server, redis-tools, etcd-server and wrk with apt when missing;
#   2. builds `dynamo` (release) and starts `dynamo dev --nodes 3 --sync always`
#      (N=3 R=2 W=2) on free loopback ports, data in a temporary directory;
#   3. starts redis-server (appendonly, appendfsync always) and a one-node etcd;
#   4. redis-benchmark against Redis and against node 1's RESP listener, on
#      redis-benchmark's one key and on 100,000 random keys (-r);
#      `dynamo bench` at 100 B and 4 KiB (read ratio 0.5), puts only at 100 B,
#      and an open loop at 70% of the 100 B closed-loop throughput;
#      wrk POSTing distinct keys to etcd's v3 HTTP gateway;
#   5. prints one table (figures, ratios to baselines, targets met or missed) and,
#      for the closed puts run and the open loop, what the machine did inside them;
#   6. rewrites BENCHMARKS.md with the table, the machine, versions and commands.
# Every process it starts is stopped on exit (trap EXIT INT TERM). The scratch
# directory lives under target/ (not /tmp, a tmpfs on some systems); on failure
# its logs and results are kept and the path printed.
# On a host with systemd, apt itself may start the packaged redis-server and etcd
# services on their default ports (6379, 2379); this script does not use them.
#
# Knobs (environment): BENCH_DURATION (dynamo bench measuring time, default 12s),
# BENCH_REDIS_REQUESTS (redis-benchmark -n, default 200000), BENCH_REDIS_ROUNDS
# (interleaved rounds of the one-key redis-benchmark runs, default 3; the table
# gives each system's median), BENCH_WRK_DURATION
# (default 10s), BENCH_PEAK_DURATION (each run of the peak sweep, default 8s),
# BENCH_PEAK_CLIENTS (its extra client counts, default "200 400"), BENCH_TMPDIR (parent of the scratch directory, default target/),
# BENCH_KEEP=1 keeps the scratch directory (logs, JSON, data).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT="$ROOT/BENCHMARKS.md"

DURATION=${BENCH_DURATION:-12s}
REDIS_N=${BENCH_REDIS_REQUESTS:-200000}
REDIS_ROUNDS=${BENCH_REDIS_ROUNDS:-3}
WRK_DURATION=${BENCH_WRK_DURATION:-10s}
CONCURRENCY=50
# The peak sweep: puts at more clients, for dynamo and etcd alike, beside the
# CONCURRENCY runs (a closed loop at 50 clients measures latency as much as
# capacity).
PEAK_DURATION=${BENCH_PEAK_DURATION:-8s}
PEAK_CLIENTS=${BENCH_PEAK_CLIENTS:-200 400}
# Pipelined connections per node that dynamo bench's workers share.
CONNECTIONS=2
OPEN_LOOP_FRACTION=0.7

START_EPOCH=$(date +%s)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}
case $REDIS_ROUNDS in '' | *[!0-9]* | 0) die "BENCH_REDIS_ROUNDS must be a positive integer, not '$REDIS_ROUNDS'" ;; esac

# ---------------------------------------------------------------------------
# 1. Tools
# ---------------------------------------------------------------------------
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    fi
fi

APT_UPDATED=0
apt_update() {
    if [ "$APT_UPDATED" = 0 ]; then
        log "apt-get update"
        $SUDO apt-get update -q >&2 || die "apt-get update failed"
        APT_UPDATED=1
    fi
}
apt_candidate() {
    apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ { print $2 }'
}
has_candidate() {
    local c
    c=$(apt_candidate "$1")
    [ -n "$c" ] && [ "$c" != "(none)" ]
}

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-benchmark >/dev/null 2>&1 || missing+=(redis-tools)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v etcd >/dev/null 2>&1 || missing+=(etcd)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v python3 >/dev/null 2>&1 || missing+=(python3)

if [ "${#missing[@]}" -gt 0 ]; then
    # Deduplicate (redis-tools may be listed twice).
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | awk '!seen[$0]++')
    log "missing: ${missing[*]}; installing with apt"
    command -v apt-get >/dev/null 2>&1 ||
        die "apt-get is not available: install redis-server, redis-tools (redis-benchmark), etcd 3.4 (etcd-server), wrk, curl and python3 yourself, then rerun"
    if [ "$(id -u)" != 0 ] && [ -z "$SUDO" ]; then
        die "installing ${missing[*]} needs root: rerun as root, give passwordless sudo, or install them yourself"
    fi
    pkgs=()
    for p in "${missing[@]}"; do
        if [ "$p" = etcd ]; then
            # Debian 12 ships the server as etcd-server; older releases called it etcd.
            etcd_pkg=""
            for attempt in 1 2; do
                for cand in etcd-server etcd; do
                    if has_candidate "$cand"; then
                        etcd_pkg=$cand
                        break
                    fi
                done
                [ -n "$etcd_pkg" ] && break
                [ "$attempt" = 1 ] && apt_update
            done
            [ -n "$etcd_pkg" ] || die "apt knows no etcd-server or etcd package"
            pkgs+=("$etcd_pkg")
        else
            has_candidate "$p" || apt_update
            has_candidate "$p" || die "apt knows no package $p"
            pkgs+=("$p")
        fi
    done
    log "apt-get install -y ${pkgs[*]}"
    if ! DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${pkgs[@]}" >&2; then
        [ "$APT_UPDATED" = 0 ] || die "apt-get install ${pkgs[*]} failed"
        apt_update
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${pkgs[@]}" >&2 ||
            die "apt-get install ${pkgs[*]} failed"
    fi
    hash -r
fi
for tool in redis-server redis-benchmark redis-cli etcd wrk curl python3 cargo; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found on PATH"
done

# ---------------------------------------------------------------------------
# 2. Build
# ---------------------------------------------------------------------------
log "building dynamo (release)"
cargo build --release --locked -p dynamo-node --bin dynamo >&2
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
DYNAMO="$TARGET_DIR/release/dynamo"
[ -x "$DYNAMO" ] || die "$DYNAMO was not built"

# ---------------------------------------------------------------------------
# Scratch directory, ports, cleanup
# ---------------------------------------------------------------------------
# Under target/ by default rather than /tmp, which is a tmpfs on some systems
# (fsync would cost nothing there and flatter every store).
SCRATCH_PARENT=${BENCH_TMPDIR:-$TARGET_DIR}
mkdir -p "$SCRATCH_PARENT"
WORK=$(mktemp -d "$SCRATCH_PARENT/bench.XXXXXX")
if [ "$(stat -f -c %T "$WORK")" = tmpfs ]; then
    log "warning: $WORK is on a tmpfs: fsync is free there, so the figures flatter every store"
fi
mkdir -p "$WORK/dev" "$WORK/redis" "$WORK/etcd" "$WORK/results"
COMMANDS="$WORK/commands.txt"
: >"$COMMANDS"

DEV_PID=""
DEV_CHILDREN=""
REDIS_PID=""
ETCD_PID=""
LOAD_PID=""

alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }

# Waits up to $2 seconds for pid $1 to exit; SIGKILLs it after that.
stop_pid() {
    local pid=$1 grace=$2 i
    alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < grace * 10; i++)); do
        alive "$pid" || return 0
        sleep 0.1
    done
    log "pid $pid still running after ${grace}s; SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

CLEANED=0
cleanup() {
    local rc=$?
    [ "$CLEANED" = 1 ] && return
    CLEANED=1
    trap - EXIT INT TERM
    set +e
    if alive "$LOAD_PID"; then
        log "stopping the load generator (pid $LOAD_PID)"
        stop_pid "$LOAD_PID" 5
    fi
    if alive "$DEV_PID"; then
        log "stopping the dev cluster (SIGTERM to the launcher, pid $DEV_PID)"
        stop_pid "$DEV_PID" 20
    fi
    # Nodes run in their own process groups: if the launcher died without
    # stopping them, stop them here (only pids whose command line names our
    # scratch directory, in case a pid was reused).
    for pid in $DEV_CHILDREN; do
        if alive "$pid" && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "$WORK"; then
            log "node pid $pid outlived the launcher; stopping it"
            stop_pid "$pid" 10
        fi
    done
    if alive "$REDIS_PID"; then
        log "stopping redis-server (pid $REDIS_PID)"
        stop_pid "$REDIS_PID" 10
    fi
    if alive "$ETCD_PID"; then
        log "stopping etcd (pid $ETCD_PID)"
        stop_pid "$ETCD_PID" 10
    fi
    wait 2>/dev/null
    if [ "${BENCH_KEEP:-0}" = 1 ]; then
        log "everything kept in $WORK"
    elif [ "$rc" != 0 ]; then
        # Keep the logs and results, drop the stores (the 4 KiB prefill alone
        # writes about 1 GiB across the three nodes).
        rm -rf "$WORK"/dev/n[0-9]*/ "$WORK/redis" "$WORK/etcd"
        log "failed (exit $rc); logs and results kept in $WORK (BENCH_KEEP=1 keeps the data too)"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A block of 16 consecutive free loopback ports below the ephemeral range, so the
# defaults a developer's own cluster uses (7000, 7100, 8080, 6380) stay untouched.
BASE=$(
    python3 - <<'EOF'
import random, socket, sys
def free(p):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", p))
        return True
    except OSError:
        return False
    finally:
        s.close()
rng = random.Random()
for _ in range(500):
    base = rng.randrange(20000, 32000, 16)
    if all(free(p) for p in range(base, base + 16)):
        print(base)
        sys.exit(0)
sys.exit("no block of 16 free ports found in 20000-32000")
EOF
) || die "could not find free ports"
PEER_PORT=$BASE
CLIENT_PORT=$((BASE + 3))
HTTP_PORT=$((BASE + 6))
RESP_PORT=$((BASE + 9))
REDIS_PORT=$((BASE + 12))
ETCD_PORT=$((BASE + 13))
ETCD_PEER_PORT=$((BASE + 14))
NODES="127.0.0.1:$CLIENT_PORT,127.0.0.1:$((CLIENT_PORT + 1)),127.0.0.1:$((CLIENT_PORT + 2))"
log "scratch $WORK; ports $BASE-$((BASE + 15))"

# Records a command (as run, with this run's ports and paths) for BENCHMARKS.md.
record() {
    local arg line="" safe='^[-A-Za-z0-9_./:=,@%+$]+$'
    for arg in "$@"; do
        arg=${arg//"$WORK"/\$TMP}
        arg=${arg#"$ROOT/"}
        if [[ "$arg" =~ $safe ]]; then
            line+="$arg "
        else
            line+="'${arg//\'/\'\\\'\'}' "
        fi
    done
    printf '%s\n' "${line% }" >>"$COMMANDS"
}

# wait_for SECONDS DESCRIPTION PID COMMAND...: polls COMMAND every 0.2 s until it
# succeeds; fails if PID dies or the time runs out.
wait_for() {
    local secs=$1 what=$2 pid=$3 i
    shift 3
    for ((i = 0; i < secs * 5; i++)); do
        if "$@" >/dev/null 2>&1; then
            return 0
        fi
        alive "$pid" || die "$what: the process exited (see $WORK)"
        sleep 0.2
    done
    die "$what: not ready after ${secs}s (see $WORK)"
}

# ---------------------------------------------------------------------------
# 3. Servers
# ---------------------------------------------------------------------------
log "starting the dynamo dev cluster (3 nodes, --sync always, N=3 R=2 W=2)"
dev_cmd=("$DYNAMO" dev --nodes 3 --sync always --n 3 --r 2 --w 2
    --peer-port "$PEER_PORT" --client-port "$CLIENT_PORT" --http-port "$HTTP_PORT"
    --resp-port "$RESP_PORT" --data-dir "$WORK/dev")
record "${dev_cmd[@]}"
"${dev_cmd[@]}" >"$WORK/dev.out" 2>"$WORK/dev.err" </dev/null &
DEV_PID=$!
wait_for 90 "dev cluster" "$DEV_PID" grep -q "dev cluster is up" "$WORK/dev.out"
DEV_CHILDREN=$(pgrep -P "$DEV_PID" | tr '\n' ' ' || true)
for i in 0 1 2; do
    wait_for 30 "node n$((i + 1)) /health" "$DEV_PID" curl -sf "http://127.0.0.1:$((HTTP_PORT + i))/health"
done
wait_for 30 "RESP on node 1" "$DEV_PID" sh -c "redis-cli -p $RESP_PORT ping | grep -q PONG"
log "dev cluster up (pids $DEV_PID, nodes $DEV_CHILDREN)"

log "starting redis-server on $REDIS_PORT (appendonly yes, appendfsync always)"
redis_cmd=(redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --daemonize no
    --appendonly yes --appendfsync always --save "" --dir "$WORK/redis"
    --logfile "$WORK/redis.log")
record "${redis_cmd[@]}"
"${redis_cmd[@]}" </dev/null >/dev/null 2>&1 &
REDIS_PID=$!
wait_for 30 "redis-server" "$REDIS_PID" sh -c "redis-cli -p $REDIS_PORT ping | grep -q PONG"

log "starting etcd on $ETCD_PORT"
etcd_cmd=(etcd --name bench --data-dir "$WORK/etcd/data"
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT"
    --advertise-client-urls "http://127.0.0.1:$ETCD_PORT"
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT"
    --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT"
    --initial-cluster "bench=http://127.0.0.1:$ETCD_PEER_PORT")
record "${etcd_cmd[@]}"
"${etcd_cmd[@]}" </dev/null >"$WORK/etcd.log" 2>&1 &
ETCD_PID=$!
wait_for 60 "etcd" "$ETCD_PID" sh -c "curl -sf http://127.0.0.1:$ETCD_PORT/health | grep -q true"
# etcd 3.4 serves the v3 gateway at /v3/, 3.3 at /v3beta/: use whichever answers.
ETCD_PUT_PATH=""
for path in /v3/kv/put /v3beta/kv/put; do
    if curl -sf -X POST -d '{"key":"cHJvYmU=","value":"cHJvYmU="}' \
        "http://127.0.0.1:$ETCD_PORT$path" | grep -q header; then
        ETCD_PUT_PATH=$path
        break
    fi
done
[ -n "$ETCD_PUT_PATH" ] || die "etcd's HTTP gateway answers neither /v3/kv/put nor /v3beta/kv/put"
log "etcd up, gateway put path $ETCD_PUT_PATH"

# ---------------------------------------------------------------------------
# 4. Load
# ---------------------------------------------------------------------------
# run_load SECONDS OUTFILE COMMAND...: runs a load generator in the background
# and waits for it (so INT/TERM reach the trap at once), killed after SECONDS.
run_load() {
    local secs=$1 out=$2 rc=0
    shift 2
    timeout "$secs" "$@" >"$out" 2>&1 </dev/null &
    LOAD_PID=$!
    wait "$LOAD_PID" || rc=$?
    LOAD_PID=""
    [ "$rc" = 124 ] && echo "(timed out after ${secs}s)" >>"$out"
    return "$rc"
}

# redis-benchmark --csv prints "test","rps",...; pulls out the rps of one test.
csv_rps() {
    awk -F'","' -v t="$2" '{ gsub(/^"|"$/, "", $1) } $1 == t { gsub(/"/, "", $2); print $2 }' "$1"
}

run_redis_benchmark() { # name port, then more redis-benchmark flags
    local name=$1 port=$2 cmd
    shift 2
    cmd=(redis-benchmark -h 127.0.0.1 -p "$port" -t set,get -c "$CONCURRENCY" -n "$REDIS_N" -q --csv "$@")
    record "${cmd[@]}"
    log "redis-benchmark against $name (port $port, $REDIS_N requests per test)"
    run_load 600 "$WORK/results/$name.csv" "${cmd[@]}" ||
        die "redis-benchmark against $name failed: $(tail -3 "$WORK/results/$name.csv")"
    local set get
    set=$(csv_rps "$WORK/results/$name.csv" SET)
    get=$(csv_rps "$WORK/results/$name.csv" GET)
    [ -n "$set" ] && [ -n "$get" ] || die "could not parse redis-benchmark output: $(cat "$WORK/results/$name.csv")"
    log "  $name: SET $set/s, GET $get/s"
}
# The one-key runs that the targets compare, in interleaved rounds (Redis
# first in odd rounds, node 1 first in even ones): back-to-back runs of one
# build differ by up to 15% on this kind of VM, and a drift over the minutes
# then reaches both systems alike. The table gives each system's median.
for round in $(seq 1 "$REDIS_ROUNDS"); do
    if [ $((round % 2)) = 1 ]; then
        run_redis_benchmark "redis-$round" "$REDIS_PORT"
        run_redis_benchmark "resp-$round" "$RESP_PORT"
    else
        run_redis_benchmark "resp-$round" "$RESP_PORT"
        run_redis_benchmark "redis-$round" "$REDIS_PORT"
    fi
done
# The same with a key drawn from 100,000 per request: no hot key to fold writes on.
run_redis_benchmark redis-r "$REDIS_PORT" -r 100000
run_redis_benchmark resp-r "$RESP_PORT" -r 100000

# json_field FILE FIELD
json_field() {
    python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"
}

run_dynamo_bench() { # name concurrency, then more dynamo bench flags
    local name=$1 workers=$2 cmd
    shift 2
    cmd=("$DYNAMO" bench --node "$NODES" --concurrency "$workers" --connections "$CONNECTIONS"
        --duration "${RUN_DURATION:-$DURATION}" --no-progress --json "$WORK/results/$name.json" "$@")
    record "${cmd[@]}"
    log "dynamo bench $name: $*"
    run_load 600 "$WORK/results/$name.txt" "${cmd[@]}" ||
        die "dynamo bench $name failed: $(tail -5 "$WORK/results/$name.txt")"
    log "  $name: $(json_field "$WORK/results/$name.json" throughput_ops_per_s) ops/s, p99 $(json_field "$WORK/results/$name.json" p99_ms) ms, errors $(json_field "$WORK/results/$name.json" errors)"
}
# What the machine did inside a run: snapshot NAME records the machine's CPU
# counters, the nodes' CPU time and each node's /metrics; window NAME samples
# one snapshot 2 s into a run (past dynamo bench's 1 s warm-up) and one
# WINDOW_SECS later, in the background. BENCHMARKS.md reports, per window,
# how busy the machine was, the nodes' CPU per operation and memory growth,
# the journal fsyncs that took long and the tables fjall wrote (flushes and
# compactions): what a missed target was up against.
snapshot() {
    local out=$WORK/results/$1 i pid
    {
        head -1 /proc/stat
        for pid in $DEV_CHILDREN; do
            echo "node $(awk '{ print $14 + $15, $24 }' "/proc/$pid/stat" 2>/dev/null || echo 0 0)"
        done
        echo "hz $(getconf CLK_TCK) $(getconf PAGESIZE)"
    } >"$out.proc"
    for i in 0 1 2; do
        curl -sf "http://127.0.0.1:$((HTTP_PORT + i))/metrics" >"$out.n$i.prom" || : >"$out.n$i.prom"
        # fjall's table files (KEYSPACE/tables/ID): the ones new at the end of
        # a window are the memtable flushes and compactions inside it.
        (cd "$WORK/dev/n$((i + 1))/keyspaces" && find . -path '*/tables/*' -type f | sort) \
            >"$out.n$i.tables" 2>/dev/null || : >"$out.n$i.tables"
    done
}
WINDOW_SECS=$(python3 -c '
import re, sys
m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", sys.argv[1])
secs = float(m[1]) * {"ms": 0.001, "s": 1, "m": 60, None: 1}[m[2]] if m else 0
print(int(min(secs - 3, 8)) if secs >= 5 else 0)' "$DURATION")
WINDOWS=""
WINDOW_PID=""
window() {
    [ "$WINDOW_SECS" -gt 0 ] || return 0
    WINDOWS="$WINDOWS $1"
    (sleep 2 && snapshot "$1.a" && sleep "$WINDOW_SECS" && snapshot "$1.b") &
    WINDOW_PID=$!
}
window_done() {
    [ -z "$WINDOW_PID" ] || wait "$WINDOW_PID" || die "sampling the machine during a run failed"
    WINDOW_PID=""
}
# The 100 B runs first (the 4 KiB prefill overwrites every key with 4 KiB values).
run_dynamo_bench mixed-100 "$CONCURRENCY" --value-size 100 --read-ratio 0.5 --prefill
window puts-100
run_dynamo_bench puts-100 "$CONCURRENCY" --value-size 100 --read-ratio 0
window_done
MAX_100=$(json_field "$WORK/results/mixed-100.json" throughput_ops_per_s)
RATE=$(python3 -c "import sys; print(max(1, int(float(sys.argv[1]) * $OPEN_LOOP_FRACTION)))" "$MAX_100")
# Open loop: each worker owns every Nth slot of the schedule and issues one
# operation at a time, so an operation slower than N / rate makes that worker's
# next slots start late (counted as latency, since it is measured from the
# slot). With 100 workers at 20k/s that budget is 5 ms, and the generator, not
# the cluster, becomes the queue behind every slow operation. Enough workers
# for 50 ms between a worker's slots keeps the schedule independent of the
# answers, which is what an open loop is for.
OPEN_LOOP_WORKERS=$(python3 -c "import sys; print(max(2 * $CONCURRENCY, int(float(sys.argv[1]) * 0.05)))" "$RATE")
window open-100
run_dynamo_bench open-100 "$OPEN_LOOP_WORKERS" --value-size 100 --read-ratio 0.5 --rate "$RATE"
window_done
# The peak sweep after the open loop: its heavy writes leave flushes and
# compactions behind, which the open loop's latency must not inherit.
for c in $PEAK_CLIENTS; do
    RUN_DURATION=$PEAK_DURATION run_dynamo_bench "puts-100-c$c" "$c" --value-size 100 --read-ratio 0
done
run_dynamo_bench mixed-4k "$CONCURRENCY" --value-size 4096 --read-ratio 0.5 --prefill

# etcd: wrk POSTs a distinct key per request (thread id + counter), 100-byte value.
cat >"$WORK/put.lua" <<EOF
-- Puts distinct keys into etcd through its v3 HTTP gateway (JSON, base64 key and value).
local alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local function b64(s)
  local out = {}
  for i = 1, #s, 3 do
    local a, b, c = s:byte(i, i + 2)
    local n = a * 65536 + (b or 0) * 256 + (c or 0)
    local c1 = math.floor(n / 262144) % 64
    local c2 = math.floor(n / 4096) % 64
    local c3 = math.floor(n / 64) % 64
    local c4 = n % 64
    out[#out + 1] = alphabet:sub(c1 + 1, c1 + 1) .. alphabet:sub(c2 + 1, c2 + 1)
      .. (b and alphabet:sub(c3 + 1, c3 + 1) or "=") .. (c and alphabet:sub(c4 + 1, c4 + 1) or "=")
  end
  return table.concat(out)
end

local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

local value = b64(string.rep("v", 100))
local counter = 0
local headers = { ["Content-Type"] = "application/json" }

function request()
  counter = counter + 1
  local key = b64(string.format("bench:%d:%010d", tid or 0, counter))
  return wrk.format("POST", "$ETCD_PUT_PATH", headers,
    '{"key":"' .. key .. '","value":"' .. value .. '"}')
end
EOF
# run_wrk NAME CLIENTS DURATION: wrk puts against etcd; sets WRK_RPS, and adds
# any non-2xx answers or socket errors to ETCD_NON2XX / ETCD_SOCKERR.
ETCD_NON2XX=""
ETCD_SOCKERR=""
run_wrk() {
    local name=$1 clients=$2 duration=$3 cmd non2xx sockerr
    cmd=(wrk -t2 -c"$clients" -d"$duration" -s "$WORK/put.lua" "http://127.0.0.1:$ETCD_PORT")
    record "${cmd[@]}"
    log "wrk puts against etcd, $clients connections ($duration)"
    run_load 300 "$WORK/results/$name.txt" "${cmd[@]}" || die "wrk failed: $(tail -5 "$WORK/results/$name.txt")"
    WRK_RPS=$(awk '/^Requests\/sec:/ { print $2 }' "$WORK/results/$name.txt")
    [ -n "$WRK_RPS" ] || die "could not parse wrk output: $(cat "$WORK/results/$name.txt")"
    non2xx=$(awk '/Non-2xx or 3xx responses:/ { print $NF }' "$WORK/results/$name.txt")
    sockerr=$(grep -E '^ +Socket errors:' "$WORK/results/$name.txt" | sed 's/^ *//' || true)
    [ -z "$non2xx" ] || ETCD_NON2XX="$ETCD_NON2XX${ETCD_NON2XX:+, }$non2xx at $clients connections"
    [ -z "$sockerr" ] || ETCD_SOCKERR="$ETCD_SOCKERR${ETCD_SOCKERR:+; }$sockerr at $clients connections"
    log "  etcd, $clients connections: $WRK_RPS puts/s${non2xx:+ (non-2xx $non2xx)}"
}
run_wrk etcd "$CONCURRENCY" "$WRK_DURATION"
ETCD_RPS=$WRK_RPS
# "clients:puts/s" pairs for the peak sweep.
ETCD_PEAK=""
for c in $PEAK_CLIENTS; do
    run_wrk "etcd-c$c" "$c" "$PEAK_DURATION"
    ETCD_PEAK="$ETCD_PEAK $c:$WRK_RPS"
done
ETCD_KEYS=$(curl -sf -X POST -d '{"key":"AA==","range_end":"AA==","count_only":true}' \
    "http://127.0.0.1:$ETCD_PORT${ETCD_PUT_PATH%put}range" |
    python3 -c 'import json,sys; print(json.load(sys.stdin).get("count", "?"))' || echo "?")
log "  etcd: keys in etcd afterwards: $ETCD_KEYS"

# ---------------------------------------------------------------------------
# 5. Versions and the table
# ---------------------------------------------------------------------------
REDIS_VERSION="redis-server $(redis-server --version | sed -n 's/.* v=\([^ ]*\).*/\1/p')"
ETCD_VERSION="etcd $(etcd --version 2>&1 | sed -n 's/^etcd Version: //p')"
RUSTC_VERSION=$(rustc --version)
GIT_REV=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    GIT_REV="$GIT_REV (with uncommitted changes)"
fi
CPU_MODEL=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
MEM=$(awk '/^MemTotal:/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
END_EPOCH=$(date +%s)
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
# Busy before we started (load average over 1, 5 and 15 minutes above half the cores)?
NOISY=$(awk -v n="$(nproc)" '{ print ($1 > n / 2 || $2 > n / 2) ? "yes" : "no" }' <<<"$LOAD_START")

export WORK REDIS_N REDIS_ROUNDS DURATION WRK_DURATION RATE ETCD_RPS ETCD_NON2XX ETCD_SOCKERR ETCD_KEYS \
    ETCD_PUT_PATH CONCURRENCY OPEN_LOOP_FRACTION ETCD_PEAK PEAK_CLIENTS WINDOWS WINDOW_SECS ROOT
TABLE=$(
    python3 - <<'EOF'
import csv, json, os, statistics, sys
w = os.environ["WORK"] + "/results/"
rounds = range(1, int(os.environ["REDIS_ROUNDS"]) + 1)

def rps(name, test):
    for row in csv.reader(open(w + name + ".csv")):
        if row and row[0] == test:
            return float(row[1])
    raise SystemExit(f"no {test} in {name}.csv")

def bench(name):
    return json.load(open(w + name + ".json"))

def median_of(name, test):
    return statistics.median(rps(f"{name}-{i}", test) for i in rounds)

redis_set, redis_get = median_of("redis", "SET"), median_of("redis", "GET")
resp_set, resp_get = median_of("resp", "SET"), median_of("resp", "GET")
redis_set_r, redis_get_r = rps("redis-r", "SET"), rps("redis-r", "GET")
resp_set_r, resp_get_r = rps("resp-r", "SET"), rps("resp-r", "GET")
mixed, mixed4k = bench("mixed-100"), bench("mixed-4k")
puts, openl = bench("puts-100"), bench("open-100")
etcd = float(os.environ["ETCD_RPS"])

def n(x):
    return f"{x:,.0f}"

rows = []
def row(what, ours, base=None, base_name="", target=None, unit="/s"):
    """target: a minimum ratio to the baseline, or with unit "ms" a maximum."""
    ours_s = f"{ours:.2f} ms" if unit == "ms" else n(ours) + "/s"
    base_s = f"{n(base)}/s {base_name}" if base is not None else ""
    ratio = f"{ours / base:.2f}x" if base else ""
    if target is None:
        verdict = "(no target)"
    elif unit == "ms":
        verdict = ("met" if ours < target else "**missed**") + f" (< {target} ms)"
    else:
        verdict = ("met" if base and ours / base >= target else "**missed**") + f" (>= {target}x)"
    rows.append((what, ours_s, base_s, ratio, verdict))

median = f", median of {len(rounds)}" if len(rounds) > 1 else ""
row(f"RESP SET (redis-benchmark, node 1{median})", resp_set, redis_set, "redis SET", 0.5)
row(f"RESP GET (redis-benchmark, node 1{median})", resp_get, redis_get, "redis GET", 0.5)
row("RESP SET, 100k random keys (`-r 100000`)", resp_set_r, redis_set_r, "redis SET")
row("RESP GET, 100k random keys (`-r 100000`)", resp_get_r, redis_get_r, "redis GET")
row("dynamo bench puts only, 100 B", puts["throughput_ops_per_s"], etcd, "etcd put", 5)
# The peak sweep: each system's best puts/s over the same client counts.
sweep = [(int(os.environ["CONCURRENCY"]), puts, etcd)]
for pair in os.environ["ETCD_PEAK"].split():
    c, rps_s = pair.split(":")
    sweep.append((int(c), bench(f"puts-100-c{c}"), float(rps_s)))
ours_peak = max(sweep, key=lambda r: r[1]["throughput_ops_per_s"])
etcd_peak = max(sweep, key=lambda r: r[2])
row(f"dynamo bench puts only, 100 B, peak ({ours_peak[0]} vs {etcd_peak[0]} clients)",
    ours_peak[1]["throughput_ops_per_s"], etcd_peak[2], "etcd put")
row("dynamo bench 50% reads, 100 B (ops)", mixed["throughput_ops_per_s"])
row("  of which puts, 100 B", mixed["write_ops_per_s"], etcd, "etcd put")
row("dynamo bench 50% reads, 4 KiB (ops)", mixed4k["throughput_ops_per_s"])
row(f"open loop at {int(openl['config']['rate'] or 0):,}/s (70% of 100 B max): p99", openl["p99_ms"], target=10, unit="ms")

lines = ["| measurement | ours | baseline | ratio | target |", "|---|---|---|---|---|"]
lines += ["| " + " | ".join(r) + " |" for r in rows]

notes = []
for name, doc in [("mixed-100", mixed), ("mixed-4k", mixed4k), ("puts-100", puts), ("open-100", openl)]:
    if doc["errors"]:
        notes.append(f"- `dynamo bench` {name}: {doc['errors']} errors ({json.dumps(doc['error_counts'])})")
    if doc.get("unsent", 0) * 100 > doc["ops"]:
        notes.append(f"- `dynamo bench` {name}: the open loop fell behind ({doc['unsent']} operations never sent)")
if os.environ.get("ETCD_NON2XX"):
    notes.append(f"- etcd: non-2xx responses (counted in wrk's rate): {os.environ['ETCD_NON2XX']}")
if os.environ.get("ETCD_SOCKERR"):
    notes.append(f"- etcd: wrk {os.environ['ETCD_SOCKERR']}")

lat = ["| dynamo bench run | ops/s | p50 ms | p99 ms | p99.9 ms | max ms | errors |", "|---|---|---|---|---|---|---|"]
for name, doc in [("50% reads, 100 B", mixed), ("50% reads, 4 KiB", mixed4k), ("puts only, 100 B", puts), ("open loop, 100 B", openl)]:
    lat.append(f"| {name} | {n(doc['throughput_ops_per_s'])} | {doc['p50_ms']} | {doc['p99_ms']} | {doc['p999_ms']} | {doc['max_ms']} | {doc['errors']} |")

by_round = ["| round | RESP SET | redis SET | ratio | RESP GET | redis GET | ratio |", "|---|---|---|---|---|---|---|"]
for i in rounds:
    cells = [str(i)]
    for test in ("SET", "GET"):
        ours, base = rps(f"resp-{i}", test), rps(f"redis-{i}", test)
        cells += [n(ours), n(base), f"{ours / base:.2f}x"]
    by_round.append("| " + " | ".join(cells) + " |")

sys.path.insert(0, os.path.join(os.environ["ROOT"], "ci"))
from bench_window import window_row

secs = int(os.environ.get("WINDOW_SECS") or 0)
inside = []
for name in os.environ.get("WINDOWS", "").split():
    row_text = window_row(w, name, secs, bench(name))
    if row_text:
        inside.append(row_text)

peak = ["| clients | dynamo puts/s | p50 ms | p99 ms | etcd puts/s | ratio |", "|---|---|---|---|---|---|"]
for c, doc, e in sweep:
    peak.append(f"| {c} | {n(doc['throughput_ops_per_s'])} | {doc['p50_ms']} | {doc['p99_ms']} | {n(e)} | {doc['throughput_ops_per_s'] / e:.2f}x |")

sections = [(None, lines), (None, lat)]
if len(rounds) > 1:
    sections.append(("redis-benchmark on one key, by round (Redis ran first in odd rounds, node 1 in even ones):", by_round))
if inside:
    sections.append((f"Inside the runs ({secs} s from 2 s in): how busy the machine was, the three nodes' CPU per "
                     "operation, how fast the three nodes' resident memory grew, and each node's journal fsyncs "
                     "(n1/n2/n3) in all, over 10 ms and over 100 ms. A machine near 100% busy queues every request; "
                     "a growing heap pays a page fault per new page (a 2 MiB one where transparent huge pages apply); "
                     "each slow fsync holds back every write behind it; and the tables each node's fjall wrote (memtable "
                     "flushes and compactions, which on a small machine take CPU from every request; the three nodes "
                     "take the same writes, so they flush together):",
                     ["| run | ops/s | machine CPU busy | nodes' CPU per op | nodes' memory growth | fsyncs | over 10 ms | over 100 ms | tables written | p99 ms |",
                      "|---|---|---|---|---|---|---|---|---|---|"] + inside))
sections.append(("Puts of 100 B by client count (dynamo bench workers; wrk connections to etcd):", peak))
if notes:
    sections.append(("Warnings:", notes))
blocks = [(f"{title}\n\n" if title else "") + "\n".join(body) for title, body in sections]
print("\n\n".join(blocks))
EOF
) || die "could not build the results table"

echo
echo "$TABLE"
echo
if [ "$NOISY" = yes ]; then
    log "warning: load average was $LOAD_START before the run on $(nproc) cores: figures are noise-prone"
fi

# ---------------------------------------------------------------------------
# 6. BENCHMARKS.md (this section rewritten; the simulator section kept)
# ---------------------------------------------------------------------------
SIM_SECTION=""
if [ -f "$OUT" ]; then
    SIM_SECTION=$(awk '/^<!-- bench-sim:begin -->$/ { on = 1 } on { print } /^<!-- bench-sim:end -->$/ { on = 0 }' "$OUT")
fi
if [ -z "$SIM_SECTION" ]; then
    SIM_SECTION=$(printf '%s\n' '<!-- bench-sim:begin -->' '## Simulator' '' \
        'Not measured yet: run `just bench-sim`.' '<!-- bench-sim:end -->')
fi

{
    cat <<EOF
# Benchmarks

Generated; do not edit by hand. \`just bench\` (ci/bench.sh) rewrites the cluster
section and keeps the simulator section; \`just bench-sim\` (ci/bench-sim.sh)
rewrites only the simulator section. Both need no running services: \`just bench\`
installs redis-server, redis-tools, etcd-server and wrk with apt when missing,
starts everything on free loopback ports in a temporary directory and stops it all
when done.

<!-- bench:begin -->
## Cluster benchmarks

Run $(date -u '+%Y-%m-%d %H:%M UTC') at commit $GIT_REV; took $((END_EPOCH - START_EPOCH)) s.

- Machine: $(nproc) cores, $MEM, $CPU_MODEL, Linux $(uname -r)
- Load average (1, 5, 15 min) before the run: $LOAD_START; after: $LOAD_END$(
        [ "$NOISY" = yes ] && printf '%s' " (**the machine was already busy: treat these figures as noise-prone, rerun on a quiet machine**)")
- Versions: $REDIS_VERSION; $ETCD_VERSION; $RUSTC_VERSION
- Everything (3 dynamo nodes, Redis, etcd and the load generators) shares this one
  machine and loopback; all three stores fsync before acknowledging a write
  (dynamo \`--sync always\` with W=2 of N=3, Redis \`appendfsync always\`, etcd's WAL).

$TABLE

Notes:
- redis-benchmark without \`-r\` uses one key (\`key:__rand_int__\`) for every SET and GET,
  against Redis and against node 1's RESP listener alike. Back-to-back writes of that one
  key are folded: one replication message per replica and one storage write per group
  commit carry several SETs (each still acknowledged only once durable on W nodes). The
  \`-r 100000\` rows draw a key per request from 100,000, where nothing folds.
- The one-key redis-benchmark runs go in $REDIS_ROUNDS interleaved rounds (Redis first
  in odd rounds, node 1 first in even ones); the RESP SET and GET rows give each
  system's median, the table by round every figure. The \`-r 100000\` runs go once.
- \`dynamo bench\` sends every request to a primary of its key (\`--node\` lists all three
  nodes); puts are blind overwrites; the 50%-read runs \`--prefill\` every key first.
  Its workers share $CONNECTIONS pipelined connections per node (replies matched by id, as
  etcd's own gRPC clients multiplex over one HTTP/2 connection); redis-benchmark and
  wrk keep 50 connections with one request in flight on each.
- \`dynamo dev\` gives each of the 3 nodes an even share of the cores as tokio worker
  threads (\`--worker-threads $(( $(nproc) / 3 > 0 ? $(nproc) / 3 : 1 ))\` here), and memtables of 48, 64 and 80 MiB
  (\`--memtable-mb\`) so that the three, which take the same writes, do not flush together.
- The open loop schedules $RATE ops/s ($OPEN_LOOP_FRACTION x the 100 B closed-loop
  throughput) with $OPEN_LOOP_WORKERS workers (50 ms between one worker's slots, so a slow
  answer does not hold back the schedule) and measures each operation's latency from its
  scheduled start (or from its send, when the 1 ms timer tick let it go up to a tick early).
- The target compares puts at $CONCURRENCY clients, as the issue's reference figures do.
  With one request in flight per client, that throughput is clients / latency, so it
  measures latency as much as capacity; the peak row and the table by client count
  (dynamo bench at $PEAK_CLIENTS workers for $PEAK_DURATION, wrk at as many etcd
  connections) compare each system at its best.
- etcd: wrk POSTs JSON \`{"key": base64, "value": base64}\` to \`$ETCD_PUT_PATH\` on its HTTP
  gateway, a distinct key per request (keys in etcd afterwards: $ETCD_KEYS).

Commands (\`\$TMP\` is the run's scratch directory; ports differ per run):

\`\`\`sh
$(cat "$COMMANDS")
# put.lua:
$(cat "$WORK/put.lua")
\`\`\`
<!-- bench:end -->

EOF
    printf '%s\n' "$SIM_SECTION"
} >"$OUT.tmp"
mv "$OUT.tmp" "$OUT"
log "wrote $OUT (took $((END_EPOCH - START_EPOCH)) s)"
