//! Sloppy quorum and hinted handoff, driven through the in-memory harness.

mod util;

use dynamo_core::handoff::{hint_key, HINT_PARTITION};
use dynamo_core::Config;
use dynamo_proto::{ClientError, ClientReply, DvvSet, NodeId, PeerMessage};
use util::*;

/// Five nodes, N = 3, R = 2, W = 3: with one primary down, a write reaches W
/// only if a fallback's hint counts.
fn cluster(sloppy: bool, max_hints: usize) -> Cluster {
    let mut config: Config = quiet_config();
    config.n = 3;
    config.r = 2;
    config.w = 3;
    config.request_timeout_ms = 1_000;
    config.sloppy_quorum = sloppy;
    config.max_hints = max_hints;
    let mut c = Cluster::with_config(5, config);
    c.all_reachable();
    c
}

/// Every node sees `node` as down (its connections failed) or back up.
fn mark(c: &mut Cluster, node: &str, up: bool) {
    let id = NodeId::from(node);
    for sim in c.nodes.values_mut() {
        if sim.node.id() != &id {
            sim.node.set_reachable(&id, up);
        }
    }
}

/// `node` crashes out of reach: isolated and seen as down by everyone.
fn take_down(c: &mut Cluster, node: &str) {
    c.isolate(node);
    mark(c, node, false);
}

fn bring_back(c: &mut Cluster, node: &str) {
    c.heal();
    mark(c, node, true);
}

/// What `holder` durably keeps as a hint for `owner` of `key`.
fn durable_hint(c: &Cluster, holder: &str, owner: &str, key: &[u8]) -> Option<DvvSet> {
    let stored = hint_key(&NodeId::from(owner), key);
    let disk = c.nodes[&NodeId::from(holder)].disk.0.lock().unwrap();
    disk.durable.get(&(HINT_PARTITION, stored)).cloned()
}

/// The key's three primaries and its first fallback, by name.
fn roles(c: &Cluster, key: &[u8]) -> (Vec<String>, String) {
    let primaries: Vec<String> = c.primaries(key).iter().map(|p| p.to_string()).collect();
    let node = c.node(&primaries[0]);
    let fallback = node
        .membership()
        .ring()
        .preference_list(key, 3, |_| true)
        .into_iter()
        .find(|e| e.role == dynamo_core::ring::Role::Fallback)
        .expect("five nodes leave two fallbacks")
        .node
        .to_string();
    (primaries, fallback)
}

/// `down` comes back; soon after it holds `key`'s "v1" and `fallback` no
/// hint for it.
fn assert_handed_off_on_return(c: &mut Cluster, fallback: &str, down: &str, key: &[u8]) {
    bring_back(c, down);
    c.run_for(1_500);
    assert_eq!(set_values(&c.durable(down, key).unwrap()), ["v1"]);
    assert_eq!(durable_hint(c, fallback, down, key), None);
}

/// Hands `to` a `Hint` of `key` for `owner` as if `from` sent it, lets the
/// cluster run, and returns the acknowledgement `to` sent back (its text).
fn deliver_hint(
    c: &mut Cluster,
    (to, from): (&str, &str),
    req: u64,
    owner: &str,
    (key, set): (&[u8], DvvSet),
) -> String {
    let now = c.now;
    c.node_mut(to).node.handle_peer(
        now,
        &NodeId::from(from),
        PeerMessage::Hint {
            reqs: vec![req],
            owner: NodeId::from(owner),
            key: key.to_vec(),
            set,
        },
    );
    c.run_until_quiet();
    let ack = format!("{to}->{from}: ReplicateAck {{ reqs: [{req}]");
    c.delivered
        .iter()
        .rev()
        .find(|m| m.starts_with(&ack))
        .cloned()
        .unwrap_or_else(|| panic!("no acknowledgement of {req}: {:?}", c.delivered.last()))
}

fn stats(c: &Cluster, node: &str) -> dynamo_core::handoff::Stats {
    c.node(node).handoff_stats()
}

#[test]
fn a_write_with_a_primary_down_is_hinted_to_a_fallback_counted_and_handed_off_on_return() {
    let mut c = cluster(true, 100);
    let key = b"hinted".to_vec();
    let (primaries, fallback) = roles(&c, &key);
    let down = primaries[2].clone();
    take_down(&mut c, &down);

    // Two primaries and a fallback's hint make W = 3: the reply says so.
    let reply = c.put(&primaries[0], &key, b"v1", None);
    let ClientReply::Put {
        dot, sloppy: true, ..
    } = reply
    else {
        panic!("expected a sloppy put, got {reply:?}");
    };
    // The fallback persisted the write as a hint for the primary, not as data.
    let hint = durable_hint(&c, &fallback, &down, &key).expect("the fallback holds a hint");
    assert_eq!(set_values(&hint), ["v1"]);
    assert_eq!(c.durable(&fallback, &key), None);
    assert_eq!(c.durable(&down, &key), None);
    assert_eq!(stats(&c, &fallback).held, 1);
    assert_eq!(stats(&c, &fallback).accepted, 1);

    // While the owner stays down, no handoff round runs (the cluster can
    // settle) and the hint stays.
    c.run_for(3_000);
    c.settle();
    assert_eq!(c.node(&fallback).poll_timeout(), None);
    assert_eq!(c.durable(&down, &key), None);
    assert!(durable_hint(&c, &fallback, &down, &key).is_some());

    // The owner's connection comes back: its hints go at once, not a round
    // later.
    bring_back(&mut c, &down);
    c.run_for(1);
    let handed = c.durable(&down, &key).expect("the owner got the hint");
    assert_eq!(set_values(&handed), ["v1"]);
    assert!(handed.siblings.contains_key(&dot));
    assert_eq!(durable_hint(&c, &fallback, &down, &key), None);
    let s = stats(&c, &fallback);
    assert_eq!((s.held, s.delivered), (0, 1));
    // With no hint left, no handoff timer stays armed.
    c.settle();
    assert_eq!(c.node(&fallback).poll_timeout(), None);
}

#[test]
fn without_a_sloppy_quorum_the_hint_is_kept_and_handed_off_but_not_counted() {
    let mut c = cluster(false, 100);
    let key = b"strict".to_vec();
    let (primaries, fallback) = roles(&c, &key);
    let down = primaries[2].clone();
    take_down(&mut c, &down);

    let reply = c.put(&primaries[0], &key, b"v1", None);
    assert_eq!(
        reply,
        ClientReply::Error(ClientError::Quorum {
            op: "put".into(),
            write: true,
            needed: 3,
            replied: 2,
            n: 3,
        })
    );
    assert!(durable_hint(&c, &fallback, &down, &key).is_some());
    assert_handed_off_on_return(&mut c, &fallback, &down, &key);
}

#[test]
fn hints_survive_a_crash_of_their_holder() {
    let mut c = cluster(true, 100);
    let key = b"crash".to_vec();
    let (primaries, fallback) = roles(&c, &key);
    let down = primaries[1].clone();
    take_down(&mut c, &down);
    expect_put(c.put(&primaries[0], &key, b"v1", None));

    c.crash_and_restart(&fallback);
    assert_eq!(stats(&c, &fallback).held, 1, "listed from storage at start");
    // With every primary up, a write is on W primaries: not sloppy.
    mark(&mut c, &down, true);
    c.heal();
    let reply = c.put(&primaries[0], b"other", b"v", None);
    assert!(
        matches!(reply, ClientReply::Put { sloppy: false, .. }),
        "{reply:?}"
    );
    take_down(&mut c, &down);
    c.all_reachable();
    assert_handed_off_on_return(&mut c, &fallback, &down, &key);
}

#[test]
fn a_hint_that_changes_while_it_is_handed_off_is_kept_and_sent_again() {
    let mut c = cluster(true, 100);
    let key = b"moving".to_vec();
    let (primaries, fallback) = roles(&c, &key);
    let down = primaries[2].clone();
    take_down(&mut c, &down);
    let (_, ctx) = expect_put(c.put(&primaries[0], &key, b"v1", None));

    // The owner is back for the fallback only: the coordinator still hints.
    c.heal();
    let owner = NodeId::from(down.as_str());
    c.node_mut(&fallback).node.set_reachable(&owner, true);
    // Jump to the fallback's handoff round but do not deliver it yet...
    let at = c
        .node(&fallback)
        .poll_timeout()
        .expect("a handoff round is armed");
    c.now = c.now.max(at);
    let now = c.now;
    c.node_mut(&fallback).node.handle_timeout(now);
    // ...a second write of the key is hinted meanwhile.
    let second = c.submit(&primaries[0], put_req(&key, Some(b"v2"), Some(ctx), None));
    assert!(matches!(c.wait(second), ClientReply::Put { .. }));

    // The first handoff (v1) landed after the hint took v2: the hint stayed,
    // and went again at once; once v2 landed it was removed.
    let handoffs: Vec<&String> = c
        .delivered
        .iter()
        .filter(|m| m.starts_with(&format!("{fallback}->{down}: Replicate")))
        .collect();
    assert_eq!(handoffs.len(), 2, "{handoffs:#?}");
    assert!(handoffs[0].contains("[118, 49]") && handoffs[1].contains("[118, 50]"));
    assert_eq!(set_values(&c.durable(&down, &key).unwrap()), ["v2"]);
    assert_eq!(durable_hint(&c, &fallback, &down, &key), None);
    assert_eq!(stats(&c, &fallback).delivered, 1);
}

#[test]
fn hints_past_the_bound_or_for_a_non_primary_are_refused() {
    let mut c = cluster(true, 1);
    let keys: Vec<Vec<u8>> = (0..200).map(|i| format!("key-{i}").into_bytes()).collect();
    // Two keys whose primaries include n5 and whose first fallback is the same.
    let mut picked: Vec<(Vec<u8>, Vec<String>, String)> = Vec::new();
    for key in keys {
        let (primaries, fallback) = roles(&c, &key);
        if primaries.iter().any(|p| p == "n5")
            && picked.first().is_none_or(|(_, _, f)| *f == fallback)
        {
            picked.push((key, primaries, fallback));
        }
        if picked.len() == 2 {
            break;
        }
    }
    assert_eq!(picked.len(), 2, "two keys share a fallback");
    take_down(&mut c, "n5");
    let (k1, p1, fallback) = picked[0].clone();
    let (k2, p2, _) = picked[1].clone();
    let coordinator = |p: &[String]| p.iter().find(|n| *n != "n5").unwrap().clone();
    expect_put(c.put(&coordinator(&p1), &k1, b"v1", None));
    // The fallback is full: the second hint is refused and W = 3 is not met.
    let reply = c.put(&coordinator(&p2), &k2, b"v2", None);
    assert!(
        matches!(
            reply,
            ClientReply::Error(ClientError::Quorum { needed: 3, .. })
        ),
        "{reply:?}"
    );
    assert_eq!(durable_hint(&c, &fallback, "n5", &k2), None);
    assert_eq!(stats(&c, &fallback).refused, 1);

    // A hint naming a node that is not a primary of the key, from a buggy or
    // hostile peer, is refused with an error acknowledgement.
    let non_primary = ["n1", "n2", "n3", "n4", "n5"]
        .into_iter()
        .find(|n| !p1.iter().any(|p| p == n) && *n != fallback)
        .unwrap();
    let ack = deliver_hint(
        &mut c,
        (&fallback, &p1[0]),
        77,
        non_primary,
        (&k1, DvvSet::default()),
    );
    assert!(ack.contains("is not a primary of the key"), "{ack}");
    assert_eq!(durable_hint(&c, &fallback, non_primary, &k1), None);

    // Nor from a node that is not a primary of the key: only primaries
    // coordinate writes.
    let ack = deliver_hint(
        &mut c,
        (&fallback, non_primary),
        78,
        &p1[0],
        (&k1, DvvSet::default()),
    );
    assert!(ack.contains("only a primary coordinates"), "{ack}");
    assert_eq!(durable_hint(&c, &fallback, &p1[0], &k1), None);
    assert_eq!(stats(&c, &fallback).refused, 3);
}

#[test]
fn a_returning_owner_gets_every_hint_without_waiting_a_round_per_batch() {
    let mut c = cluster(true, 10_000);
    // Enough hints for one owner to need several batches of those in flight.
    let down = "n5";
    take_down(&mut c, down);
    let mut hinted = 0;
    for i in 0..2_000 {
        let key = format!("bulk-{i}").into_bytes();
        let primaries: Vec<String> = c.primaries(&key).iter().map(|p| p.to_string()).collect();
        if !primaries.iter().any(|p| p == down) {
            continue;
        }
        let coordinator = primaries.iter().find(|p| *p != down).unwrap().clone();
        expect_put(c.put(&coordinator, &key, b"v", None));
        hinted += 1;
    }
    let held: u64 = c.nodes.values().map(|s| s.node.handoff_stats().held).sum();
    assert_eq!(held, hinted);
    assert!(held > 2 * dynamo_core::handoff::MAX_IN_FLIGHT_PER_OWNER as u64);
    // Well within one handoff interval (1 s) of the owner's return, every
    // hint is handed off: each acknowledgement frees a slot for the next.
    bring_back(&mut c, down);
    c.run_for(1);
    let left: u64 = c.nodes.values().map(|s| s.node.handoff_stats().held).sum();
    assert_eq!(left, 0);
    let delivered: u64 = c
        .nodes
        .values()
        .map(|s| s.node.handoff_stats().delivered)
        .sum();
    assert_eq!(delivered, hinted);
}

#[test]
fn a_handoff_the_owner_never_answers_does_not_hold_back_a_shutdown() {
    let mut c = cluster(true, 100);
    let key = b"unanswered".to_vec();
    let (primaries, fallback) = roles(&c, &key);
    let down = primaries[2].clone();
    take_down(&mut c, &down);
    expect_put(c.put(&primaries[0], &key, b"v1", None));
    // The owner looks connected again but its messages still go nowhere.
    mark(&mut c, &down, true);
    c.run_for(1);
    assert_eq!(c.durable(&down, &key), None, "nothing reached the owner");
    assert!(c.node(&fallback).is_idle(), "only a handoff is in flight");
    assert_eq!(stats(&c, &fallback).held, 1, "the hint stays stored");
}

#[test]
fn a_hint_reaching_a_primary_of_its_key_is_kept_as_a_replica_keeps_it() {
    // The coordinator's view differed: the node it took for a fallback is a
    // primary here. It stores the write as data and acknowledges it.
    let mut c = cluster(true, 100);
    let key = b"primary-here".to_vec();
    let (primaries, fallback) = roles(&c, &key);
    take_down(&mut c, &primaries[1]);
    expect_put(c.put(&primaries[0], &key, b"v1", None));
    let hint = durable_hint(&c, &fallback, &primaries[1], &key).expect("hinted");
    c.heal();
    assert_eq!(c.durable(&primaries[1], &key), None);
    let ack = deliver_hint(
        &mut c,
        (&primaries[1], &primaries[0]),
        79,
        &primaries[2],
        (&key, hint),
    );
    assert!(ack.contains("error: None"), "{ack}");
    assert_eq!(set_values(&c.durable(&primaries[1], &key).unwrap()), ["v1"]);
    assert_eq!(durable_hint(&c, &primaries[1], &primaries[2], &key), None);
    assert_eq!(stats(&c, &primaries[1]).accepted, 0);
}

#[test]
fn a_stored_hint_for_a_node_outside_the_cluster_is_left_alone() {
    // A hint whose owner left the member list (or a data directory from
    // another cluster) is neither listed nor sent, so no timer runs for it.
    let mut c = cluster(true, 100);
    let stray = hint_key(&NodeId::from("n9"), b"k");
    c.node_mut("n1")
        .disk
        .0
        .lock()
        .unwrap()
        .durable
        .insert((HINT_PARTITION, stray.clone()), DvvSet::default());
    c.crash_and_restart("n1");
    c.all_reachable();
    assert_eq!(stats(&c, "n1").held, 0);
    c.settle();
    assert_eq!(c.node("n1").poll_timeout(), None);
    let disk = c.nodes[&NodeId::from("n1")].disk.0.lock().unwrap();
    assert!(disk.durable.contains_key(&(HINT_PARTITION, stray)));
}
