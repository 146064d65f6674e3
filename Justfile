# Dynamo: a leaderless, Dynamo-style key-value store and its deterministic simulator.
# `just` lists the recipes; `just test` is what CI runs.

set shell := ["bash", "-euo", "pipefail", "-c"]

# The madsim build lives in its own target dir so it never invalidates the normal one.
sim_target := "target/sim"

default:
    @just --list

# Everything CI checks: formatting, clippy (normal and madsim builds), all tests.
test: fmt-check clippy unit sim-build

# Formatting, checked (run `cargo fmt --all` to fix).
fmt-check:
    cargo fmt --all -- --check

# Clippy with warnings as errors, in the normal build.
clippy:
    cargo clippy --workspace --all-targets --locked -- -D warnings

# The workspace's unit, property and integration tests.
unit:
    cargo test --workspace --locked

# The whole workspace under `--cfg madsim` (the simulator's build), in target/sim.
sim-build:
    RUSTFLAGS="--cfg madsim" cargo build --workspace --locked --target-dir {{sim_target}}

# The ring's balance and movement table (claims for S -> S+1 and S -> S-1 at Q = 256).
ring-table:
    cargo test -p dynamo-core --release --test ring_props -- --nocapture --test-threads 1
