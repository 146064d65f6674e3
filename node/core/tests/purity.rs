//! Keeps the core pure: no async runtime among its dependencies, and no clock,
//! OS randomness, I/O or randomly ordered hash collections in its source. Clippy
//! (`clippy.toml`) enforces the same for types and methods; this test also catches
//! a dependency or a fully qualified path that slips past it.

use std::path::Path;

const FORBIDDEN_DEPENDENCIES: &[&str] = &[
    "tokio",
    "madsim",
    "async-std",
    "smol",
    "futures",
    "mio",
    "getrandom",
    "hashbrown",
];

const FORBIDDEN_IN_SOURCE: &[&str] = &[
    "tokio::",
    "std::time::Instant",
    "SystemTime",
    "Instant::now",
    "thread_rng",
    "rand::random",
    "OsRng",
    "from_entropy",
    "std::net",
    "std::fs",
    "std::thread",
    "HashMap",
    "HashSet",
];

#[test]
fn core_depends_on_no_async_runtime() {
    let manifest =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")).unwrap();
    let deps: String = manifest
        .split("[dependencies]")
        .nth(1)
        .expect("a [dependencies] table")
        .split("\n[")
        .next()
        .unwrap()
        .to_string();
    for dep in FORBIDDEN_DEPENDENCIES {
        let declared = deps.lines().any(|l| {
            l.trim_start().starts_with(&format!("{dep} "))
                || l.trim_start().starts_with(&format!("{dep}="))
                || l.contains(&format!("package = \"{dep}"))
        });
        assert!(!declared, "dynamo-core must not depend on {dep}");
    }
}

#[test]
fn core_source_reads_no_clock_randomness_or_io() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut checked = 0;
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for (no, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap();
            for bad in FORBIDDEN_IN_SOURCE {
                assert!(
                    !code.contains(bad),
                    "{}:{}: the core must not use {bad}: {line}",
                    path.display(),
                    no + 1
                );
            }
        }
        checked += 1;
    }
    assert!(
        checked >= 5,
        "expected the core's modules under {}",
        src.display()
    );
}
