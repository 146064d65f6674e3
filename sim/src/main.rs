//! The `sim` binary: `sim run --seed N [--scenario FILE]` and `sim sweep`.

#[cfg(madsim)]
fn main() {
    std::process::exit(dynamo_sim::cli::main());
}

#[cfg(not(madsim))]
fn main() {
    eprintln!(
        "sim: this binary runs only in the madsim build. Use `just sim seed=N`, or \
         RUSTFLAGS=\"--cfg madsim\" cargo run -p dynamo-sim --profile sim --target-dir target/sim -- run --seed N"
    );
    std::process::exit(2);
}
