//! Quorum arithmetic: the effective replication factor and per-request R/W.
//!
//! Owns the rules that turn the cluster's N/R/W and a request's optional R or W
//! into the numbers a coordinator waits for. Never touches messages or state.

/// The replication factor a key really gets: the configured N, or every member
/// when the cluster has fewer nodes than that.
pub fn effective_n(configured_n: u8, members: usize) -> u8 {
    let members = u8::try_from(members).unwrap_or(u8::MAX);
    configured_n.min(members).max(1)
}

/// The default R or W actually used: the configured one, clamped to the
/// effective N. Returns the value and, when it had to clamp, a warning to log.
pub fn clamp_default(name: &str, configured: u8, n: u8) -> (u8, Option<String>) {
    if configured == 0 {
        return (
            1,
            Some(format!("{name} = 0 is not a quorum; using {name} = 1")),
        );
    }
    if configured > n {
        return (
            n,
            Some(format!(
                "{name} = {configured} exceeds the effective N = {n} (fewer nodes than N); \
                 using {name} = {n}"
            )),
        );
    }
    (configured, None)
}

/// The R or W for one request: the request's own value if it gave one (which
/// must lie in 1..=N), or the cluster default.
pub fn resolve(name: &str, requested: Option<u8>, default: u8, n: u8) -> Result<u8, String> {
    match requested {
        None => Ok(default.clamp(1, n)),
        Some(v) if (1..=n).contains(&v) => Ok(v),
        Some(v) => Err(format!(
            "{name} = {v} is outside 1..={n}: a request may ask for between 1 and N = {n} replicas"
        )),
    }
}

/// Whether a quorum of `needed` can still be reached when `failed` of the `n`
/// replicas have already answered with an error.
pub fn still_reachable(needed: u8, failed: usize, n: u8) -> bool {
    usize::from(n).saturating_sub(failed) >= usize::from(needed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_n_table() {
        // (configured N, members, effective N)
        for (n, members, want) in [
            (3, 5, 3),
            (3, 3, 3),
            (3, 2, 2),
            (3, 1, 1),
            (5, 0, 1),
            (1, 9, 1),
        ] {
            assert_eq!(effective_n(n, members), want, "N={n} members={members}");
        }
    }

    #[test]
    fn clamp_default_table() {
        // (configured, effective N, used, warns)
        for (v, n, want, warns) in [
            (2, 3, 2, false),
            (3, 3, 3, false),
            (2, 1, 1, true),
            (0, 3, 1, true),
        ] {
            let (got, warning) = clamp_default("W", v, n);
            assert_eq!((got, warning.is_some()), (want, warns), "W={v} N={n}");
        }
    }

    #[test]
    fn resolve_table() {
        // (requested, default, N, result)
        type Case = (Option<u8>, u8, u8, Result<u8, ()>);
        let cases: [Case; 6] = [
            (None, 2, 3, Ok(2)),
            (Some(1), 2, 3, Ok(1)),
            (Some(3), 2, 3, Ok(3)),
            (Some(4), 2, 3, Err(())),
            (Some(0), 2, 3, Err(())),
            (None, 3, 2, Ok(2)),
        ];
        for (req, default, n, want) in cases {
            let got = resolve("R", req, default, n).map_err(|_| ());
            assert_eq!(got, want, "requested={req:?} default={default} N={n}");
        }
        let msg = resolve("R", Some(4), 2, 3).unwrap_err();
        assert!(msg.contains("1..=3"), "{msg}");
    }

    #[test]
    fn reachability_table() {
        // (needed, failed, N, reachable)
        for (needed, failed, n, want) in [
            (2, 0, 3, true),
            (2, 1, 3, true),
            (2, 2, 3, false),
            (3, 1, 3, false),
            (1, 2, 3, true),
        ] {
            assert_eq!(still_reachable(needed, failed, n), want);
        }
    }
}
