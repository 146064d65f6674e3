# Dynamo: a leaderless, Dynamo-style key-value store and its deterministic simulator.
# `just` lists the recipes; `just test` is what CI runs.

set shell := ["bash", "-euo", "pipefail", "-c"]

# The madsim build lives in its own target dir so it never invalidates the normal one.
sim_target := "target/sim"
sim_env := "RUSTFLAGS=\"--cfg madsim\""
sim_bin := sim_target + "/sim/sim"

default:
    @just --list

# Everything CI checks: formatting, clippy in both builds, every test, a bounded simulation sweep.
test: fmt-check clippy unit sim-test sim-check bench-test

# Tests of the benchmark scripts' table code (ci/test_*.py; no cluster needed).
bench-test:
    python3 -m unittest discover -s ci -p 'test_*.py'

# Formatting, checked (run `cargo fmt --all` to fix).
fmt-check:
    cargo fmt --all -- --check

# Clippy with warnings as errors, in the normal and the madsim build.
clippy:
    cargo clippy --workspace --all-targets --locked -- -D warnings
    {{sim_env}} cargo clippy --workspace --all-targets --locked --target-dir {{sim_target}} -- -D warnings

# The workspace's unit, property and integration tests (integration tests start real `dynamo` processes).
unit:
    cargo test --workspace --locked

# The simulator's own tests (scenario parsing, checkers, the pinned report snapshot) under madsim.
sim-test:
    {{sim_env}} cargo test -p dynamo-sim --locked --profile sim --target-dir {{sim_target}}

# Builds the `sim` binary (optimised, madsim) into target/sim/sim/sim.
sim-build:
    {{sim_env}} cargo build -p dynamo-sim --locked --profile sim --target-dir {{sim_target}}

# Replays one seed: `just sim 7`, `just sim seed=7`, `just sim seed=7 scenario=scenarios/swarm.toml`.
sim seed="1" scenario="" *args="": sim-build
    {{sim_bin}} run --seed {{trim_start_match(seed, "seed=")}} {{ if trim_start_match(scenario, "scenario=") == "" { "" } else { "--scenario " + trim_start_match(scenario, "scenario=") } }} {{args}}

# Many seeds, each in its own process: `just sweep`, `just sweep seeds=1..2001 scenario=scenarios/default.toml`.
sweep seeds="1..501" scenario="scenarios/swarm.toml" jobs="2": sim-build
    {{sim_bin}} sweep --seeds {{trim_start_match(seeds, "seeds=")}} --scenario {{trim_start_match(scenario, "scenario=")}} --jobs {{trim_start_match(jobs, "jobs=")}}

# The bounded sweep `just test` runs: every scenario x 4 seeds (2 checked for determinism), 200 swarm seeds.
sim-check: sim-build
    {{sim_bin}} sweep --seeds 1..5 --check-determinism 2 --jobs 2
    {{sim_bin}} sweep --seeds 100..300 --scenario scenarios/swarm.toml --jobs 2

# The ring's balance and movement table (claims for S -> S+1 and S -> S-1 at Q = 256).
ring-table:
    cargo test -p dynamo-core --release --test ring_props -- --nocapture --test-threads 1

# A local 3-node cluster in release mode (HTTP on 8080-8082); Ctrl-C stops it.
run nodes="3":
    cargo run --release --locked -p dynamo-node --bin dynamo -- dev --nodes {{trim_start_match(nodes, "nodes=")}}

# The container image dynamo:dev, FROM scratch: the release binary and the libraries it links (needs Docker).
image tag="dynamo:dev":
    ci/docker-image.sh {{tag}}

# A 3-node cluster in containers (docker/compose.yaml): HTTP on 127.0.0.1:18081-18083, RESP on 16381-16383.
cluster: image
    docker-compose -p dynamo -f docker/compose.yaml up -d
    @echo "up: curl http://127.0.0.1:18081/cluster; stop with: just cluster-down"

# Stops the container cluster and deletes its volumes.
cluster-down:
    docker-compose -p dynamo -f docker/compose.yaml down -v

# Multi-container tests: SIGKILL and restart on its volume, a network partition, graceful stop (needs Docker).
cluster-test:
    ci/cluster-test.sh

# The web client in headless Chromium against a dev cluster (needs chromium and Python's websocket-client).
web-test:
    cargo build --release --locked -p dynamo-node --bin dynamo
    python3 ci/web-test.py target/release/dynamo

# Cluster benchmarks against Redis and etcd on this machine (installs redis-server, etcd-server and wrk with apt when missing); rewrites BENCHMARKS.md.
bench:
    ci/bench.sh

# Simulator speed (simulated seconds per wall second, seeds per minute) and the ring table; rewrites the simulator section of BENCHMARKS.md.
bench-sim:
    ci/bench-sim.sh
