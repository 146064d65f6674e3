//! Whole-cluster behaviour of the `Node` state machine, driven deterministically
//! through the in-memory harness in `util`.

mod util;

use dynamo_core::node::first_request_id;
use dynamo_core::version::Versioning;
use dynamo_proto::{ClientError, ClientReply, ClientRequest, ClusterId, Hello, NodeId, WriteMode};
use util::*;

fn k(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

/// A key whose preference list (N = 3 of 4 nodes) leaves out `outsider`.
fn key_not_on(cluster: &Cluster, outsider: &str) -> Vec<u8> {
    (0..1000)
        .map(|i| format!("key-{i}").into_bytes())
        .find(|key| !cluster.primaries(key).contains(&NodeId::from(outsider)))
        .expect("some key avoids the node")
}

#[test]
fn quorum_put_then_get() {
    let mut c = Cluster::new(3, 3, 2, 2);
    let (dot, _) = expect_put(c.put("n1", b"k", b"v1", None));
    let got = expect_get(c.get("n2", b"k", None));
    assert_eq!(values(&got), ["v1"]);
    assert_eq!(got.siblings[0].0, dot);
    c.settle();
    // Every primary stores it durably once the cluster is quiet.
    for n in ["n1", "n2", "n3"] {
        assert_eq!(set_values(&c.durable(n, b"k").unwrap()), ["v1"], "{n}");
    }
}

#[test]
fn quorum_failure_reports_counts() {
    let mut c = Cluster::new(3, 3, 2, 2);
    let key = k("lonely");
    let primaries = c.primaries(&key);
    let coordinator = primaries[0].to_string();
    for p in &primaries[1..] {
        c.isolate(p.as_str());
    }
    let reply = c.put(&coordinator, &key, b"v", None);
    let ClientReply::Error(err @ ClientError::Quorum { .. }) = reply else {
        panic!("expected a quorum error, got {reply:?}");
    };
    assert_eq!(
        err,
        ClientError::Quorum {
            op: "put".into(),
            write: true,
            needed: 2,
            replied: 1,
            n: 3
        }
    );
    assert!(
        err.to_string().contains("may still have been applied"),
        "{err}"
    );
    let reply = c.get(&coordinator, &key, Some(3));
    assert_eq!(
        reply,
        ClientReply::Error(ClientError::Quorum {
            op: "get".into(),
            write: false,
            needed: 3,
            replied: 1,
            n: 3
        })
    );
    // The failed write is still on the coordinator: indeterminate, not lost.
    c.heal();
    let got = expect_get(c.get(&coordinator, &key, Some(3)));
    assert_eq!(values(&got), ["v"]);
}

#[test]
fn replicas_ack_only_after_persisting() {
    let mut c = Cluster::new(3, 3, 2, 2);
    let key = k("held");
    let primaries = c.primaries(&key);
    for p in &primaries {
        c.node_mut(p.as_str()).hold_sync = true;
    }
    let req = c.submit(primaries[0].as_str(), put_req(&key, Some(b"v"), None, None));
    c.run_until_quiet();
    assert!(
        !c.replies.contains_key(&req),
        "acknowledged before any replica was durable"
    );
    c.node_mut(primaries[1].as_str()).hold_sync = false;
    c.run_until_quiet();
    assert!(
        !c.replies.contains_key(&req),
        "acknowledged with one durable copy and W = 2"
    );
    c.node_mut(primaries[0].as_str()).hold_sync = false;
    c.run_until_quiet();
    expect_put(
        c.replies
            .remove(&req)
            .expect("acknowledged once two copies are durable"),
    );
}

#[test]
fn concurrent_writes_make_siblings_and_a_merged_context_resolves_them() {
    let mut c = Cluster::new(3, 3, 2, 2);
    let key = k("cart");
    let (_, ctx0) = expect_put(c.put("n1", &key, b"base", None));
    // Two clients read-modify-write from the same context, through different nodes.
    let a = c.submit("n1", put_req(&key, Some(b"a"), Some(ctx0.clone()), None));
    let b = c.submit("n2", put_req(&key, Some(b"b"), Some(ctx0), None));
    expect_put(c.wait(a));
    expect_put(c.wait(b));
    let got = expect_get(c.get("n3", &key, Some(3)));
    assert_eq!(
        values(&got),
        ["a", "b"],
        "both concurrent writes survive as siblings"
    );
    let (_, ctx) = expect_put(c.put("n3", &key, b"a+b", Some(got.context)));
    let got = expect_get(c.get("n1", &key, Some(3)));
    assert_eq!(values(&got), ["a+b"]);
    // The reply context of the resolving write covers what it resolved.
    for (dot, _) in &got.siblings {
        assert!(dynamo_core::version::covers(&ctx, dot));
    }
}

#[test]
fn a_chain_of_puts_leaves_one_value_and_interleaved_puts_make_no_siblings() {
    let mut c = Cluster::new(3, 3, 2, 2);
    let key = k("counter");
    let coordinator = c.primaries(&key)[0].to_string();
    let mut ctx = None;
    for i in 0..5 {
        let (_, next) = expect_put(c.put(&coordinator, &key, format!("v{i}").as_bytes(), ctx));
        ctx = Some(next);
    }
    assert_eq!(values(&expect_get(c.get("n2", &key, None))), ["v4"]);
    // Two in-flight puts at one coordinator, the second with the first's context
    // as soon as it has it: no siblings.
    let first = c.submit(&coordinator, put_req(&key, Some(b"x"), ctx.clone(), None));
    let (_, ctx_x) = expect_put(c.wait(first));
    let second = c.submit(&coordinator, put_req(&key, Some(b"y"), Some(ctx_x), None));
    let third_blind_ctx = ctx;
    expect_put(c.wait(second));
    let got = expect_get(c.get(&coordinator, &key, Some(3)));
    assert_eq!(values(&got), ["y"]);
    // A put with a stale context (it saw v4, not x or y) does add a sibling.
    expect_put(c.put(&coordinator, &key, b"stale", third_blind_ctx));
    assert_eq!(
        values(&expect_get(c.get("n3", &key, Some(3)))),
        ["stale", "y"]
    );
}

#[test]
fn delete_then_get() {
    let mut c = Cluster::new(3, 3, 2, 2);
    let key = k("gone");
    expect_put(c.put("n1", &key, b"v", None));
    let got = expect_get(c.get("n1", &key, None));
    let reply = c.request("n2", put_req(&key, None, Some(got.context), None));
    expect_put(reply);
    let got = expect_get(c.get("n3", &key, Some(3)));
    assert!(
        values(&got).is_empty(),
        "deleted key still has values: {got:?}"
    );
    assert_eq!(got.siblings.len(), 1, "one tombstone");
    assert!(got.siblings[0].1.value.is_none());
    assert!(
        !got.context.vv.is_empty(),
        "the tombstone's context comes back"
    );
    // A delete without a context covers nothing: the value stays beside it.
    expect_put(c.put("n1", &key, b"again", None));
    expect_put(c.request("n1", put_req(&key, None, None, None)));
    let got = expect_get(c.get("n1", &key, Some(3)));
    assert_eq!(values(&got), ["again"]);
}

#[test]
fn read_repair_fixes_a_replica_that_missed_a_write() {
    let mut c = Cluster::new(3, 3, 2, 2);
    let key = k("repair-me");
    let primaries = c.primaries(&key);
    let missed = primaries[2].to_string();
    c.isolate(&missed);
    expect_put(c.put(primaries[0].as_str(), &key, b"v", None));
    c.settle();
    c.heal();
    assert_eq!(c.durable(&missed, &key), None);
    // R = 2 answers from the first two replies; the late, stale one is repaired.
    let got = expect_get(c.get(primaries[0].as_str(), &key, Some(2)));
    assert_eq!(values(&got), ["v"]);
    c.settle();
    assert_eq!(
        set_values(&c.durable(&missed, &key).expect("repaired")),
        ["v"]
    );
    assert_eq!(
        c.durable(&missed, &key),
        c.durable(primaries[0].as_str(), &key)
    );
}

#[test]
fn writes_to_a_non_primary_are_forwarded_to_a_primary() {
    let mut c = Cluster::new(4, 3, 2, 2);
    let key = key_not_on(&c, "n4");
    let (dot, _) = expect_put(c.put("n4", &key, b"forwarded", None));
    // The dot was minted by a primary's actor, not n4's.
    let n4_actor = c.node("n4").actor();
    assert_ne!(dot.actor, n4_actor);
    let primaries = c.primaries(&key);
    assert!(primaries
        .iter()
        .any(|p| c.node(p.as_str()).actor() == dot.actor));
    c.settle();
    assert_eq!(
        c.durable("n4", &key),
        None,
        "the non-primary stores nothing"
    );
    // Gets coordinate anywhere.
    assert_eq!(values(&expect_get(c.get("n4", &key, None))), ["forwarded"]);
}

#[test]
fn forward_to_an_unreachable_primary_times_out_with_a_clear_error() {
    let mut c = Cluster::new(4, 3, 2, 2);
    let key = key_not_on(&c, "n4");
    for p in c.primaries(&key) {
        c.isolate(p.as_str());
    }
    let reply = c.put("n4", &key, b"v", None);
    let ClientReply::Error(ClientError::Unavailable(msg)) = reply else {
        panic!("expected unavailable, got {reply:?}");
    };
    assert!(msg.contains("may still have been applied"), "{msg}");
}

/// Regression for swarm seed 14000: a node that had just restarted had not yet
/// finished greeting a frozen primary, counted it as up, forwarded a write to it
/// and timed out, although another primary was connected.
#[test]
fn a_forward_prefers_a_connected_primary_to_one_not_yet_reached() {
    let mut c = Cluster::new(4, 3, 2, 1);
    let key = key_not_on(&c, "n4");
    let primaries = c.primaries(&key);
    c.isolate(primaries[0].as_str());
    let n4 = &mut c.node_mut("n4").node;
    // The first primary: never reached since n4 started; the second: connected.
    n4.set_reachable(&primaries[1], true);
    let (dot, _) = expect_put(c.put("n4", &key, b"v", None));
    assert_ne!(dot.actor, c.node(primaries[0].as_str()).actor());
    // With none connected, one not yet reached goes before those known
    // unreachable.
    c.heal();
    c.isolate(primaries[0].as_str());
    c.isolate(primaries[1].as_str());
    let n4 = &mut c.node_mut("n4").node;
    n4.set_reachable(&primaries[0], false);
    n4.set_reachable(&primaries[1], false);
    let (dot, _) = expect_put(c.put("n4", &key, b"w", None));
    assert_eq!(dot.actor, c.node(primaries[2].as_str()).actor());
}

#[test]
fn acknowledged_write_survives_a_replica_losing_unsynced_writes() {
    let mut c = Cluster::new(3, 3, 2, 2);
    let key = k("durable");
    let primaries = c.primaries(&key);
    let lazy = primaries[2].to_string();
    c.node_mut(&lazy).hold_sync = true;
    let (dot, _) = expect_put(c.put(primaries[0].as_str(), &key, b"kept", None));
    // The lazy replica merged it in memory but never synced; it crashes.
    c.crash_and_restart(&lazy);
    assert_eq!(c.durable(&lazy, &key), None);
    // The two that acknowledged have it durably, and a full read brings it back.
    for p in &primaries[..2] {
        assert_eq!(set_values(&c.durable(p.as_str(), &key).unwrap()), ["kept"]);
    }
    let got = expect_get(c.get(&lazy, &key, Some(3)));
    assert_eq!(
        got.siblings.iter().map(|(d, _)| *d).collect::<Vec<_>>(),
        [dot]
    );
}

#[test]
fn coordinator_crash_before_its_own_sync_reuses_no_dot() {
    let mut c = Cluster::new(3, 3, 2, 2);
    let key = k("coordinated");
    let primaries = c.primaries(&key);
    let coord = primaries[0].to_string();
    c.node_mut(&coord).hold_sync = true;
    // W = 2 is met by the two other replicas; the coordinator's copy is volatile.
    let (dot1, _) = expect_put(c.put(&coord, &key, b"first", None));
    c.crash_and_restart(&coord);
    assert_eq!(
        c.durable(&coord, &key),
        None,
        "the coordinator lost its copy"
    );
    // After the restart it mints under a new epoch: no dot is reused.
    let (dot2, _) = expect_put(c.put(&coord, &key, b"second", None));
    assert_ne!(dot1, dot2);
    assert_eq!(dot2.actor.epoch, dot1.actor.epoch + 1);
    assert_eq!(dot2.actor.incarnation, dot1.actor.incarnation);
    let got = expect_get(c.get(&coord, &key, Some(3)));
    assert_eq!(
        values(&got),
        ["first", "second"],
        "every acknowledged value is there"
    );
}

#[test]
fn per_request_quorums_are_validated_and_defaults_clamped() {
    let mut c = Cluster::new(3, 3, 2, 2);
    let reply = c.request("n1", put_req(b"k", Some(b"v"), None, Some(4)));
    let ClientReply::Error(ClientError::Invalid(msg)) = reply else {
        panic!("expected invalid, got {reply:?}");
    };
    assert!(msg.contains("1..=3"), "{msg}");
    let reply = c.get("n1", b"k", Some(0));
    assert!(matches!(reply, ClientReply::Error(ClientError::Invalid(_))));
    // Two nodes with N = 3, W = 3: the effective N is 2 and W is clamped, with a warning.
    let mut c = Cluster::new(2, 3, 3, 3);
    assert_eq!(c.node("n1").quorum(), (2, 2, 2));
    assert!(c
        .node("n1")
        .warnings()
        .iter()
        .any(|w| w.contains("fewer than N")));
    expect_put(c.put("n1", b"k", b"v", None));
    assert_eq!(values(&expect_get(c.get("n2", b"k", None))), ["v"]);
}

#[test]
fn limits_and_max_siblings_give_clear_errors() {
    let mut config = quiet_config();
    config.max_siblings = 3;
    config.max_key_bytes = 8;
    config.max_value_bytes = 16;
    let mut c = Cluster::with_config(3, config);
    assert!(matches!(
        c.put("n1", b"much-too-long-key", b"v", None),
        ClientReply::Error(ClientError::KeyTooLarge { len: 17, max: 8 })
    ));
    assert!(matches!(
        c.put("n1", b"k", &[0; 17], None),
        ClientReply::Error(ClientError::ValueTooLarge { len: 17, max: 16 })
    ));
    assert!(matches!(
        c.put("n1", b"", b"v", None),
        ClientReply::Error(ClientError::Invalid(_))
    ));
    let coord = c.primaries(b"k")[0].to_string();
    for i in 0..3 {
        expect_put(c.put(&coord, b"k", format!("{i}").as_bytes(), None));
    }
    let reply = c.put(&coord, b"k", b"one-too-many", None);
    let ClientReply::Error(err @ ClientError::TooManySiblings { count: 4, limit: 3 }) = reply
    else {
        panic!("expected too many siblings, got {reply:?}");
    };
    assert!(err.to_string().contains("resolve"), "{err}");
    // Resolving with the read's context is always possible.
    let got = expect_get(c.get(&coord, b"k", None));
    expect_put(c.put(&coord, b"k", b"merged", Some(got.context)));
}

#[test]
fn overwrite_mode_supersedes_what_the_coordinator_holds() {
    let mut c = Cluster::new(3, 3, 2, 2);
    let coord = c.primaries(b"k")[0].to_string();
    for v in ["a", "b"] {
        expect_put(c.put(&coord, b"k", v.as_bytes(), None));
    }
    let set = ClientRequest::Put {
        key: b"k".to_vec(),
        value: Some(b"set".to_vec()),
        context: None,
        w: None,
        mode: WriteMode::Overwrite,
    };
    expect_put(c.request(&coord, set));
    assert_eq!(values(&expect_get(c.get("n1", b"k", Some(3)))), ["set"]);
}

#[test]
fn back_to_back_writes_of_one_key_reach_each_replica_folded() {
    let mut c = Cluster::new(3, 3, 2, 2);
    let key = k("hot");
    let primaries = c.primaries(&key);
    let coord = primaries[0].to_string();
    let set = |v: &str| ClientRequest::Put {
        key: key.clone(),
        value: Some(v.as_bytes().to_vec()),
        context: None,
        w: None,
        mode: WriteMode::Overwrite,
    };
    // Everything below is submitted before the coordinator's outputs are
    // collected, as when a burst of clients' writes lands in one turn.
    let mut reqs = vec![
        c.submit(&coord, set("1")),
        c.submit(&coord, set("2")),
        // Blind puts supersede nothing: "2", "3" and "4" end up siblings.
        c.submit(&coord, put_req(&key, Some(b"3"), None, None)),
        c.submit(&coord, put_req(&key, Some(b"4"), None, None)),
    ];
    // Another key between them: the write after it travels on its own.
    reqs.push(c.submit(&coord, put_req(b"other", Some(b"x"), None, None)));
    reqs.push(c.submit(&coord, put_req(&key, Some(b"5"), None, None)));
    for req in reqs {
        expect_put(c.wait(req));
    }
    c.settle();
    let replicates: Vec<&String> = c
        .delivered
        .iter()
        .filter(|m| m.contains("Replicate {"))
        .collect();
    assert_eq!(replicates.len(), 6, "{replicates:#?}");
    for replica in &primaries[1..] {
        let to_it: Vec<&&String> = replicates
            .iter()
            .filter(|m| m.starts_with(&format!("{coord}->{replica}:")))
            .collect();
        assert_eq!(to_it.len(), 3, "{to_it:#?}");
        let r = first_request_id(c.node(&coord).actor());
        let folded = format!("reqs: [{r}, {}, {}, {}]", r + 1, r + 2, r + 3);
        assert!(to_it[0].contains(&folded), "{}", to_it[0]);
        assert!(
            to_it[1].contains(&format!("reqs: [{}]", r + 4)),
            "{}",
            to_it[1]
        );
        assert!(
            to_it[2].contains(&format!("reqs: [{}]", r + 5)),
            "{}",
            to_it[2]
        );
        let acks = c
            .delivered
            .iter()
            .filter(|m| m.starts_with(&format!("{replica}->{coord}: ReplicateAck")))
            .count();
        assert_eq!(
            acks, 3,
            "one acknowledgement per message, each for all its writes"
        );
    }
    for n in &primaries {
        let mut held = set_values(&c.durable(n.as_str(), &key).unwrap());
        held.sort();
        assert_eq!(held, ["2", "3", "4", "5"], "{n}");
    }
}

#[test]
fn a_primary_that_cannot_read_its_copy_has_another_coordinate_the_write() {
    let mut c = Cluster::new(3, 3, 2, 2);
    let key = k("k");
    let primaries = c.primaries(&key);
    let (failing, other) = (primaries[0].clone(), primaries[1].clone());
    expect_put(c.put(failing.as_str(), &key, b"v1", None));
    c.settle();
    c.fail_reads(failing.as_str(), true);
    let before = c.delivered.len();
    let reply = c.put(failing.as_str(), &key, b"v2", None);
    let (dot, _) = expect_put(reply);
    assert_ne!(
        dot.actor,
        c.node(failing.as_str()).actor(),
        "minted elsewhere"
    );
    assert!(
        c.delivered[before..]
            .iter()
            .any(|m| m.starts_with(&format!("{failing}->")) && m.contains("Forward {")),
        "forwarded to another primary: {:?}",
        &c.delivered[before..]
    );
    c.fail_reads(failing.as_str(), false);
    let got = expect_get(c.get(other.as_str(), &key, Some(3)));
    // A write without a context leaves a sibling, wherever it was minted.
    assert_eq!(values(&got), ["v1", "v2"]);
    // With every primary unable to read, each is tried once and the write
    // fails with the read error.
    for p in &primaries {
        c.fail_reads(p.as_str(), true);
    }
    let reply = c.put(failing.as_str(), &key, b"v3", None);
    assert!(
        matches!(&reply, ClientReply::Error(ClientError::Unavailable(t))
            if t.contains("cannot read its copy") && t.contains("injected read failure")),
        "{reply:?}"
    );
}

#[test]
fn a_forwarded_write_goes_on_to_the_next_primary_when_one_cannot_read() {
    // Three nodes, N = 2: one node is not a primary of the key and forwards.
    let mut c = Cluster::new(3, 2, 1, 1);
    let key = k("k");
    let primaries = c.primaries(&key);
    let outsider = ["n1", "n2", "n3"]
        .into_iter()
        .find(|n| !primaries.iter().any(|p| p.as_str() == *n))
        .unwrap();
    expect_put(c.put(outsider, &key, b"v1", None));
    c.settle();
    // The first primary in preference order cannot read its copy.
    c.fail_reads(primaries[0].as_str(), true);
    let (dot, _) = expect_put(c.put(outsider, &key, b"v2", None));
    assert_eq!(dot.actor, c.node(primaries[1].as_str()).actor());
}

#[test]
fn a_replica_that_cannot_read_fails_every_folded_write_at_once() {
    let mut c = Cluster::new(3, 3, 2, 3);
    let key = k("hot");
    let primaries = c.primaries(&key);
    let coord = primaries[0].to_string();
    c.fail_reads(primaries[1].as_str(), true);
    let first = c.submit(&coord, put_req(&key, Some(b"1"), None, None));
    let second = c.submit(&coord, put_req(&key, Some(b"2"), None, None));
    let before = c.now;
    for req in [first, second] {
        let reply = c.wait(req);
        assert!(
            matches!(
                reply,
                ClientReply::Error(ClientError::Quorum { needed: 3, .. })
            ),
            "{reply:?}"
        );
    }
    assert_eq!(
        c.now, before,
        "both failed on the error acknowledgement, not by timeout"
    );
    let acks: Vec<&String> = c
        .delivered
        .iter()
        .filter(|m| m.starts_with(&format!("{}->{coord}: ReplicateAck", primaries[1])))
        .collect();
    assert_eq!(acks.len(), 1, "{acks:#?}");
    let r = first_request_id(c.node(&coord).actor());
    let both = format!("reqs: [{r}, {}]", r + 1);
    assert!(acks[0].contains(&both) && acks[0].contains("injected read failure"));
}

#[test]
fn lww_mode_keeps_one_value() {
    let mut config = quiet_config();
    config.versioning = Versioning::Lww;
    let mut c = Cluster::with_config(3, config);
    expect_put(c.put("n1", b"k", b"old", None));
    c.now += 10;
    expect_put(c.put("n2", b"k", b"new", None));
    let got = expect_get(c.get("n3", b"k", Some(3)));
    assert_eq!(values(&got), ["new"]);
}

/// A 3-node cluster with `versioning`, `isolated` cut off, and an
/// acknowledged put of `key` coordinated by `coordinator` with its clock
/// `ahead_ms` ahead (the replicas take it with their own clocks, 10 ms on);
/// returns the true time before the put.
fn put_from_a_clock_ahead(
    versioning: Versioning,
    isolated: Option<&str>,
    coordinator: &str,
    key: &[u8],
    ahead_ms: u64,
) -> (Cluster, u64) {
    let mut config = quiet_config();
    config.versioning = versioning;
    let mut c = Cluster::with_config(3, config);
    let real = c.now;
    if let Some(node) = isolated {
        c.isolate(node);
    }
    c.now = real + ahead_ms;
    let req = c.submit(
        coordinator,
        put_req(key, Some(b"from the future"), None, None),
    );
    c.now = real + 10;
    expect_put(c.wait(req));
    (c, real)
}

/// Every node reads `key` (R = 3) as the one value `value`.
fn all_read(c: &mut Cluster, key: &[u8], value: &str) {
    for n in ["n1", "n2", "n3"] {
        let got = expect_get(c.get(n, key, Some(3)));
        assert_eq!(values(&got), [value], "read through {n}");
    }
}

/// The timestamp of the one sibling `node` stores for `key`.
fn stamp(c: &Cluster, node: &str, key: &[u8]) -> dynamo_proto::Hlc {
    let set = c.durable(node, key).expect("stored");
    set.siblings.values().next().expect("a sibling").timestamp
}

const HOUR: u64 = 3_600_000;

#[test]
fn a_clock_an_hour_ahead_moves_no_other_clock_and_lww_still_keeps_the_later_write() {
    let (mut c, real) = put_from_a_clock_ahead(Versioning::Lww, None, "n1", b"skewed", HOUR);
    c.settle();
    for n in ["n2", "n3"] {
        assert_eq!(c.node(n).far_future_timestamps(), 1, "{n} saw it once");
    }
    // n2's next write elsewhere is stamped from its own clock, not an hour on.
    expect_put(c.put("n2", b"other", b"now", None));
    c.settle();
    let other = stamp(&c, "n2", b"other");
    assert!(other.wall_ms < real + 1_000, "{other:?}");
    // A later write over the skewed key, through n2, still wins under LWW.
    let read = expect_get(c.get("n2", b"skewed", Some(3)));
    expect_put(c.put("n2", b"skewed", b"later", Some(read.context)));
    c.settle();
    all_read(&mut c, b"skewed", "later");
}

#[test]
fn a_write_right_after_a_read_that_saw_a_far_future_version_is_stamped_after_it() {
    // n1 misses a write n2 coordinates with its clock an hour ahead.
    let (mut c, _) = put_from_a_clock_ahead(Versioning::Lww, Some("n1"), "n2", b"k", HOUR);
    c.run_until_quiet();
    c.heal();
    // A read through n1 is answered by n1 and n2 while n3 is cut off, so the
    // read's repair of n1's own copy waits for its deadline.
    c.isolate("n3");
    let read = expect_get(c.get("n1", b"k", Some(2)));
    assert_eq!(values(&read), ["from the future"]);
    assert!(
        c.durable("n1", b"k").is_none(),
        "n1's copy is not repaired yet"
    );
    // The client's next write through n1 still supersedes what it read.
    expect_put(c.put("n1", b"k", b"later", Some(read.context)));
    c.heal();
    c.settle();
    all_read(&mut c, b"k", "later");
}

#[test]
fn a_clock_ahead_within_the_bound_moves_the_other_clocks() {
    // n1's clock is 30 s ahead, within the 60 s bound: the replicas observe it.
    let (mut c, real) = put_from_a_clock_ahead(Versioning::Dvv, None, "n1", b"ahead", 30_000);
    c.settle();
    c.now = real + 20;
    let ahead = stamp(&c, "n2", b"ahead");
    // n2's next write, on another key, is stamped after what it observed.
    expect_put(c.put("n2", b"other", b"w", None));
    c.settle();
    let other = stamp(&c, "n2", b"other");
    assert!(other > ahead, "{other:?} after {ahead:?}");
    assert_eq!(c.node("n2").far_future_timestamps(), 0);
}

#[test]
fn hello_checks_cluster_q_n_and_membership() {
    let c = Cluster::new(3, 3, 2, 2);
    let n1 = c.node("n1");
    let good = c.node("n2").hello();
    assert_eq!(n1.check_hello(&good), Ok(()));
    let other_cluster = Hello {
        cluster_id: ClusterId("other".into()),
        ..good.clone()
    };
    assert!(n1
        .check_hello(&other_cluster)
        .unwrap_err()
        .contains("cluster"));
    let other_q = Hello {
        q: 128,
        ..good.clone()
    };
    assert!(n1.check_hello(&other_q).unwrap_err().contains("Q = 128"));
    let other_n = Hello {
        n: 5,
        ..good.clone()
    };
    assert!(n1.check_hello(&other_n).is_err());
    let stranger = Hello {
        node: NodeId::from("n9"),
        ..good
    };
    assert!(n1
        .check_hello(&stranger)
        .unwrap_err()
        .contains("not a member"));
}

#[test]
fn the_same_inputs_give_the_same_message_trace() {
    fn run() -> Vec<String> {
        let mut c = Cluster::new(4, 3, 2, 2);
        for i in 0..20 {
            let key = format!("k{}", i % 7);
            let node = format!("n{}", 1 + i % 4);
            let _ = c.put(&node, key.as_bytes(), format!("v{i}").as_bytes(), None);
            let _ = c.get(&node, key.as_bytes(), None);
        }
        c.settle();
        c.delivered
    }
    let a = run();
    assert!(a.len() > 100);
    assert_eq!(a, run());
}

/// `/cluster` reports a peer `unknown` until the shell has reached it, then as
/// the last report says; the answering node is always `up`. Only a failed
/// connection takes a peer out of routing.
#[test]
fn cluster_info_tells_unknown_peers_from_reachable_and_unreachable_ones() {
    let mut c = Cluster::new(3, 3, 2, 2);
    let statuses = |c: &mut Cluster| -> Vec<(String, String)> {
        let ClientReply::ClusterInfo(info) = c.request("n1", ClientRequest::ClusterInfo) else {
            panic!("expected cluster info");
        };
        info.members
            .into_iter()
            .map(|m| (m.id.to_string(), m.status))
            .collect()
    };
    let named = |list: &[(&str, &str)]| -> Vec<(String, String)> {
        list.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    };
    assert_eq!(
        statuses(&mut c),
        named(&[("n1", "up"), ("n2", "unknown"), ("n3", "unknown")])
    );
    assert!(
        c.node("n1").membership().is_up(&NodeId::from("n2")),
        "a peer not yet reached is routed to"
    );
    let n1 = c.node_mut("n1");
    n1.node.set_reachable(&NodeId::from("n2"), true);
    n1.node.set_reachable(&NodeId::from("n3"), false);
    assert_eq!(
        statuses(&mut c),
        named(&[("n1", "up"), ("n2", "up"), ("n3", "unreachable")])
    );
    let membership = c.node("n1").membership();
    assert!(membership.is_up(&NodeId::from("n2")));
    assert!(!membership.is_up(&NodeId::from("n3")));
    c.node_mut("n1")
        .node
        .set_reachable(&NodeId::from("n3"), true);
    assert_eq!(
        statuses(&mut c),
        named(&[("n1", "up"), ("n2", "up"), ("n3", "up")])
    );
}

/// Every peer message `node` has queued, in order (other outputs dropped).
fn peer_messages(node: &mut dynamo_core::Node) -> Vec<(NodeId, dynamo_proto::PeerMessage)> {
    let mut out = Vec::new();
    while let Some(output) = node.poll_output() {
        if let dynamo_core::Output::Peer { to, msg } = output {
            out.push((to, msg));
        }
    }
    out
}

/// Regression for swarm seed 14182: a replica's answer to a read that its
/// coordinator sent before restarting reached the restarted coordinator, which
/// had started numbering its requests over and took the answer for its new read
/// of another key; the client saw that key's value as a sibling, and read
/// repair stored it there.
#[test]
fn a_reply_to_a_request_from_before_a_restart_is_not_taken_for_a_new_one() {
    let mut c = Cluster::new(3, 3, 3, 3);
    // Written through n3 and n2 (distinct dots), so that n1's first request of
    // each start is a read.
    expect_put(c.put("n3", b"a", b"value of a", None));
    expect_put(c.put("n2", b"b", b"value of b", None));
    c.settle();
    let (n1, n2) = (NodeId::from("n1"), NodeId::from("n2"));
    let get = |key: &[u8]| ClientRequest::Get {
        key: key.to_vec(),
        r: Some(3),
    };
    // n1 reads "a" from every replica; n2's answer is still in flight when n1
    // crashes.
    c.submit("n1", get(b"a"));
    let now = c.now;
    let read = peer_messages(&mut c.node_mut("n1").node)
        .into_iter()
        .find(|(to, _)| *to == n2)
        .expect("a read for n2")
        .1;
    c.node_mut("n2").node.handle_peer(now, &n1, read);
    let stale = peer_messages(&mut c.node_mut("n2").node)
        .into_iter()
        .find(|(to, msg)| *to == n1 && matches!(msg, dynamo_proto::PeerMessage::ReadReply { .. }))
        .expect("n2 answers the read")
        .1;
    c.crash_and_restart("n1");
    // The restarted n1 reads "b"; the old answer (about "a") lands first.
    let req = c.submit("n1", get(b"b"));
    c.node_mut("n1").node.handle_peer(now, &n2, stale);
    let got = expect_get(c.wait(req));
    assert_eq!(values(&got), ["value of b"]);
    c.settle();
    for n in ["n1", "n2", "n3"] {
        assert_eq!(
            set_values(&c.durable(n, b"b").unwrap()),
            ["value of b"],
            "{n}"
        );
    }
}

#[test]
fn an_altered_context_gets_a_clear_error_and_the_key_stays_writable() {
    // A client re-encodes the context a put returned with its coordinator's
    // counter at u64::MAX: minting the next dot would overflow (a panic in a
    // debug build; a wrapped counter, a dot the context already covers, in
    // release). It is refused instead, and nothing is stored.
    let mut c = Cluster::new(3, 3, 2, 2);
    let (dot, mut context) = expect_put(c.put("n1", b"k", b"v1", None));
    context.vv.insert(dot.actor, u64::MAX);
    context.dots.clear();
    let reply = c.put("n1", b"k", b"v2", Some(context));
    match &reply {
        ClientReply::Error(ClientError::Invalid(e)) => {
            assert!(e.contains("past any version a node writes"), "{e}")
        }
        other => panic!("an altered context was accepted: {other:?}"),
    }
    assert_eq!(values(&expect_get(c.get("n2", b"k", None))), ["v1"]);
    // The context a read returns still works.
    let context = expect_get(c.get("n1", b"k", None)).context;
    expect_put(c.put("n1", b"k", b"v3", Some(context)));
    assert_eq!(values(&expect_get(c.get("n3", b"k", None))), ["v3"]);
}

#[test]
fn an_altered_context_naming_another_node_cannot_take_its_writes_away() {
    // The context claims n2's counter at u64::MAX, through n1, which cannot
    // check n2's counters. Taken, it would be merged into the key on every
    // replica, and every later write of the key that n2 coordinates would find
    // its counter used up. It is refused, and n2 writes the key as before.
    let mut c = Cluster::new(3, 3, 2, 2);
    let (n2_dot, _) = expect_put(c.put("n2", b"probe", b"x", None));
    let mut context = dynamo_proto::Context::default();
    context.vv.insert(n2_dot.actor, u64::MAX);
    match c.put("n1", b"k", b"hostile", Some(context)) {
        ClientReply::Error(ClientError::Invalid(e)) => {
            assert!(e.contains("past any version a node writes"), "{e}")
        }
        other => panic!("an altered context was accepted: {other:?}"),
    }
    let read = expect_get(c.get("n2", b"k", None));
    assert!(values(&read).is_empty());
    expect_put(c.put("n2", b"k", b"mine", Some(read.context)));
    assert_eq!(values(&expect_get(c.get("n3", b"k", None))), ["mine"]);
}

#[test]
fn a_context_past_the_entry_limit_is_refused_before_it_is_walked() {
    use dynamo_core::version::MAX_CONTEXT_ENTRIES;
    use dynamo_proto::{Actor, Context};
    // N = 3 of 4 nodes: one of them is not a primary of the key.
    let mut c = Cluster::new(4, 3, 2, 2);
    let mut context = Context::default();
    for i in 0..=MAX_CONTEXT_ENTRIES as u64 {
        let actor = Actor {
            incarnation: 1_000 + i,
            epoch: 1,
        };
        context.vv.insert(actor, 1);
    }
    // At any node, primary or not (a forward would carry it on).
    for n in ["n1", "n2", "n3", "n4"] {
        match c.put(n, b"k", b"v", Some(context.clone())) {
            ClientReply::Error(ClientError::Invalid(e)) => {
                assert!(e.contains("limit of 10000"), "{e}")
            }
            other => panic!("{n} accepted a context of 10,001 entries: {other:?}"),
        }
    }
    assert!(values(&expect_get(c.get("n1", b"k", None))).is_empty());
}

#[test]
fn a_get_that_fails_on_this_nodes_own_read_says_so() {
    // One node, N = R = W = 1: its copy of the key cannot be read (a corrupt
    // stored value). The client must learn that, not that a quorum timed out.
    let mut c = Cluster::new(1, 1, 1, 1);
    let key = k("damaged");
    assert!(matches!(
        c.put("n1", &key, b"v", None),
        ClientReply::Put { .. }
    ));
    c.fail_reads("n1", true);
    let reply = c.get("n1", &key, None);
    let ClientReply::Error(error) = &reply else {
        panic!("{reply:?}");
    };
    let text = error.to_string();
    assert!(
        text.contains("injected read failure") && !text.contains("timeout"),
        "{text}"
    );
}

/// Three nodes (N = 3, R = W = 2) that all store "v" under a key: the
/// cluster, the key, and the key's first two primaries.
fn a_key_stored_everywhere() -> (Cluster, Vec<u8>, NodeId, NodeId) {
    let mut c = Cluster::new(3, 3, 2, 2);
    let key = k("k");
    expect_put(c.put("n1", &key, b"v", None));
    c.settle();
    let primaries = c.primaries(&key);
    let (coord, replica) = (primaries[0].clone(), primaries[1].clone());
    (c, key, coord, replica)
}

/// Reads the key of [`a_key_stored_everywhere`] at `coord` while `failing`
/// cannot answer with its copy. With R = 3 the get fails as soon as that
/// answer arrives, not at its timeout, with an error naming `failing` and
/// `cause`. With R = 2 the other two answer, and `failing` is neither taken
/// for a replica without the key nor sent read repair.
fn a_failed_read_is_reported_and_not_repaired(
    c: &mut Cluster,
    key: &[u8],
    coord: &NodeId,
    failing: &NodeId,
    cause: &str,
) {
    let before = c.now;
    let reply = c.get(coord.as_str(), key, Some(3));
    assert_eq!(c.now, before, "answered on the failed read, not by timeout");
    let ClientReply::Error(ClientError::Internal(text)) = &reply else {
        panic!("{reply:?}");
    };
    assert!(text.contains(&format!("{failing}: {cause}")), "{text}");
    let seen = c.delivered.len();
    assert_eq!(
        values(&expect_get(c.get(coord.as_str(), key, Some(2)))),
        ["v"]
    );
    c.settle();
    let repairs: Vec<&String> = c.delivered[seen..]
        .iter()
        .filter(|m| m.contains("Repair"))
        .collect();
    assert!(repairs.is_empty(), "{repairs:#?}");
}

#[test]
fn a_get_that_fails_on_a_replicas_read_says_so_at_once() {
    // A replica whose copy cannot be read answers with the error, instead of
    // staying silent until the get times out and blames the quorum.
    let (mut c, key, coord, broken) = a_key_stored_everywhere();
    c.fail_reads(broken.as_str(), true);
    let cause = "storage read failed: injected read failure";
    a_failed_read_is_reported_and_not_repaired(&mut c, &key, &coord, &broken, cause);
}

/// `set` with a sibling its context does not cover (a bogus value): what a
/// buggy or hostile peer could send.
fn malformed(set: &dynamo_proto::DvvSet) -> dynamo_proto::DvvSet {
    use dynamo_proto::{Actor, Dot, Hlc, Sibling};
    let mut bad = set.clone();
    let dot = Dot {
        actor: Actor {
            incarnation: 0xbad,
            epoch: 1,
        },
        counter: 1,
    };
    let bogus = Sibling {
        value: Some(b"bogus".to_vec()),
        timestamp: Hlc::default(),
    };
    bad.siblings.insert(dot, bogus);
    bad
}

/// Makes every set that `from` sends `to` malformed.
fn corrupt_sets(c: &mut Cluster, from: &NodeId, to: &NodeId) {
    use dynamo_proto::PeerMessage;
    let (from, to) = (from.clone(), to.clone());
    c.tamper = Some(Box::new(move |sender, receiver, msg| {
        if *sender != from || *receiver != to {
            return;
        }
        match msg {
            PeerMessage::Replicate { set, .. }
            | PeerMessage::Repair { set, .. }
            | PeerMessage::ReadReply {
                result: Ok(Some(set)),
                ..
            } => *set = malformed(set),
            _ => {}
        }
    }));
}

#[test]
fn a_malformed_replicated_set_is_refused_with_an_error() {
    let mut c = Cluster::new(3, 3, 2, 3);
    let key = k("k");
    let primaries = c.primaries(&key);
    let coord = primaries[0].clone();
    corrupt_sets(&mut c, &coord, &primaries[1]);
    let before = c.now;
    let reply = c.put(coord.as_str(), &key, b"v", None);
    assert!(
        matches!(
            reply,
            ClientReply::Error(ClientError::Quorum { needed: 3, .. })
        ),
        "{reply:?}"
    );
    assert_eq!(c.now, before, "failed on the error acknowledgement");
    c.settle();
    assert_eq!(c.durable(primaries[1].as_str(), &key), None);
    let ack = format!("{}->{coord}: ReplicateAck", primaries[1]);
    assert!(
        c.delivered
            .iter()
            .any(|m| m.starts_with(&ack) && m.contains("malformed")),
        "{:#?}",
        c.delivered
    );
}

#[test]
fn a_malformed_read_reply_counts_as_a_failed_read() {
    let (mut c, key, coord, liar) = a_key_stored_everywhere();
    corrupt_sets(&mut c, &liar, &coord);
    a_failed_read_is_reported_and_not_repaired(&mut c, &key, &coord, &liar, "malformed");
}

#[test]
fn a_malformed_read_repair_is_dropped() {
    let mut c = Cluster::new(3, 3, 2, 2);
    let key = k("k");
    let primaries = c.primaries(&key);
    let (coord, behind) = (primaries[0].clone(), primaries[2].clone());
    c.isolate(behind.as_str());
    expect_put(c.put(coord.as_str(), &key, b"v", None));
    c.settle();
    c.heal();
    corrupt_sets(&mut c, &coord, &behind);
    assert_eq!(
        values(&expect_get(c.get(coord.as_str(), &key, Some(3)))),
        ["v"]
    );
    c.settle();
    assert!(
        c.delivered
            .iter()
            .any(|m| m.starts_with(&format!("{coord}->{behind}: Repair"))),
        "no repair was sent"
    );
    assert_eq!(c.durable(behind.as_str(), &key), None);
}
