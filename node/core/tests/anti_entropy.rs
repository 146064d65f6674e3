//! Anti-entropy between replicas, driven through the in-memory harness: it
//! heals what no read touched, goes quiet once the replicas agree, and refuses
//! what a buggy or hostile peer sends it.

mod util;

use dynamo_core::anti_entropy::{segment_of, SEGMENTS};
use dynamo_core::Config;
use dynamo_proto::{AntiEntropyEntry, DvvSet, NodeId, PeerMessage};
use util::*;

/// N = 3, R = W = 2, 8 partitions (so a sweep of every partition and
/// replica pair takes a few dozen exchanges), an exchange every 10 ms.
fn config() -> Config {
    let mut config = quiet_config();
    config.q = 8;
    config.request_timeout_ms = 1_000;
    config.anti_entropy_interval_ms = 10;
    config
}

/// `size` nodes with `config`, every node reachable.
fn cluster_with(size: usize, config: Config) -> Cluster {
    let mut c = Cluster::with_config(size, config);
    c.all_reachable();
    c
}

fn cluster(size: usize) -> Cluster {
    cluster_with(size, config())
}

fn keys(count: usize) -> Vec<Vec<u8>> {
    (0..count).map(|i| format!("ae-{i}").into_bytes()).collect()
}

fn delivered(c: &Cluster, kind: &str) -> usize {
    c.delivered.iter().filter(|m| m.contains(kind)).count()
}

/// Every node's trees matched the scans that shipped their segments (a tree
/// a write failed to update is corrected there, and counted).
fn assert_trees_were_right(c: &Cluster) {
    for id in ["n1", "n2", "n3"] {
        let stats = c.node(id).anti_entropy_stats();
        assert_eq!(stats.segments_corrected, 0, "{id}: {stats:?}");
    }
}

/// Runs for a second and checks that no exchange shipped entries in it.
fn assert_quiet(c: &mut Cluster) {
    c.delivered.clear();
    c.run_for(1_000);
    assert!(delivered(c, "AntiEntropySegments") > 10);
    assert_eq!(delivered(c, "AntiEntropyEntries"), 0, "{:?}", c.delivered);
}

#[test]
fn a_replica_that_missed_writes_is_healed_without_any_read_and_exchanges_then_go_quiet() {
    let mut c = cluster(3);
    c.isolate("n3");
    let keys = keys(40);
    for key in &keys {
        expect_put(c.put("n1", key, b"v", None));
    }
    c.run_for(200);
    assert!(keys.iter().all(|k| c.durable("n3", k).is_none()));
    c.heal();
    c.run_for(2_000);
    for key in &keys {
        let on_n1 = c.durable("n1", key).expect("n1 took the write");
        assert_eq!(set_values(&on_n1), ["v"]);
        assert_eq!(c.durable("n2", key).as_ref(), Some(&on_n1));
        assert_eq!(c.durable("n3", key).as_ref(), Some(&on_n1), "{key:?}");
    }
    let stats = c.node("n3").anti_entropy_stats();
    assert_eq!(stats.keys_repaired, 40, "{stats:?}");
    assert!(stats.exchanges > 0, "{stats:?}");
    assert_eq!(c.node("n1").anti_entropy_stats().keys_repaired, 0);
    // In sync, an exchange is its segment hashes and nothing more.
    assert_quiet(&mut c);
    assert_trees_were_right(&c);
}

#[test]
fn writes_after_a_tree_is_built_keep_it_current() {
    let mut c = cluster(3);
    // Every tree gets built while the replicas agree.
    c.run_for(1_000);
    c.isolate("n2");
    for key in keys(20) {
        expect_put(c.put("n1", &key, b"late", None));
    }
    c.run_for(200);
    c.heal();
    c.delivered.clear();
    c.run_for(2_000);
    assert!(delivered(&c, "AntiEntropyEntries") > 0);
    for key in keys(20) {
        assert_eq!(c.durable("n2", &key), c.durable("n1", &key), "{key:?}");
    }
    assert_eq!(c.node("n2").anti_entropy_stats().keys_repaired, 20);
    // Had the coordinator's or a replica's write left its tree behind, the
    // scans that shipped the segments would have corrected (and counted) it.
    assert_trees_were_right(&c);
    assert_quiet(&mut c);
}

#[test]
fn a_replica_missing_more_than_one_message_holds_heals_over_successive_exchanges() {
    let mut config = config();
    // Frames of at most 1,000 bytes, and so entries messages of about 500
    // estimated bytes (two or three entries of 100-byte values), where a
    // segment holds about four keys: most segments go a page at a time.
    config.max_peer_message_bytes = 1_000;
    let mut c = cluster_with(3, config);
    c.max_message_bytes = Some(1_000);
    c.isolate("n3");
    let keys = keys(2_000);
    for key in &keys {
        expect_put(c.put("n1", key, &[b'v'; 100], None));
    }
    c.heal();
    // Two or three entries a message: 2,000 keys take a few thousand
    // exchanges (about 40 s here, at 10 ms between them).
    c.run_for(60_000);
    for key in &keys {
        assert_eq!(c.durable("n3", key), c.durable("n1", key), "{key:?}");
    }
    assert_eq!(c.node("n3").anti_entropy_stats().keys_repaired, 2_000);
    assert_eq!(c.oversize, 0, "every message fit in a frame");
    assert_trees_were_right(&c);
    assert_quiet(&mut c);
}

#[test]
fn a_replica_whose_reads_fail_does_not_exchange_and_heals_once_they_work() {
    let mut c = cluster(3);
    c.isolate("n3");
    for key in keys(5) {
        expect_put(c.put("n1", &key, b"v", None));
    }
    c.heal();
    c.fail_reads("n3", true);
    c.run_for(500);
    assert!(c.node("n3").anti_entropy_stats().read_failures > 0);
    assert!(keys(5).iter().all(|k| c.durable("n3", k).is_none()));
    c.fail_reads("n3", false);
    c.run_for(2_000);
    for key in keys(5) {
        assert_eq!(c.durable("n3", &key), c.durable("n1", &key), "{key:?}");
    }
}

/// Delivers `msg` to `to` as if `from` sent it, then lets the cluster run.
fn deliver(c: &mut Cluster, from: &str, to: &str, msg: PeerMessage) {
    let now = c.now;
    c.node_mut(to)
        .node
        .handle_peer(now, &NodeId::from(from), msg);
    c.run_until_quiet();
}

fn entries_msg(partition: u32, segments: Vec<u8>, key: &[u8], set: DvvSet) -> PeerMessage {
    PeerMessage::AntiEntropyEntries {
        partition,
        segments,
        pages: 1,
        page: 0,
        entries: vec![AntiEntropyEntry {
            key: key.to_vec(),
            set,
        }],
        reply: false,
    }
}

#[test]
fn anti_entropy_messages_from_outside_the_replica_set_or_out_of_shape_are_refused() {
    // Anti-entropy on, but no exchange of its own within the test: only the
    // messages below move anything.
    let mut config = quiet_config();
    config.anti_entropy_interval_ms = 3_600_000;
    let mut c = Cluster::with_config(4, config);
    let key = (0..1000)
        .map(|i| format!("hostile-{i}").into_bytes())
        .find(|k| !c.primaries(k).contains(&NodeId::from("n4")))
        .unwrap();
    let primaries: Vec<String> = c.primaries(&key).iter().map(|p| p.to_string()).collect();
    let (writer, target) = (primaries[0].as_str(), primaries[2].as_str());
    c.isolate(target);
    expect_put(c.put(writer, &key, b"v", None));
    c.run_for(2_000);
    c.heal();
    let set = c.durable(writer, &key).unwrap();
    let partition = c.node("n1").membership().ring().partition_for_key(&key);
    let segment = segment_of(&key) as u8;
    let other = ((segment as usize + 1) % SEGMENTS) as u8;

    // From a node that is not a replica of the partition.
    deliver(
        &mut c,
        "n4",
        target,
        entries_msg(partition, vec![segment], &key, set.clone()),
    );
    // A key outside the segments the message names.
    deliver(
        &mut c,
        writer,
        target,
        entries_msg(partition, vec![other], &key, set.clone()),
    );
    // A key of another partition than the one named (of which both are
    // replicas, so only the key's partition refuses it).
    let ring = c.node("n1").membership().ring().clone();
    let elsewhere = (0..64)
        .find(|&p| {
            let owners = ring.primaries(p, 3);
            p != partition
                && owners.contains(&NodeId::from(writer))
                && owners.contains(&NodeId::from(target))
        })
        .unwrap();
    deliver(
        &mut c,
        writer,
        target,
        entries_msg(elsewhere, vec![segment], &key, set.clone()),
    );
    // A partition past the ring, a segment past the tree, and segment
    // hashes of the wrong length.
    deliver(
        &mut c,
        writer,
        target,
        entries_msg(9_999, vec![segment], &key, set.clone()),
    );
    deliver(
        &mut c,
        writer,
        target,
        entries_msg(partition, vec![200], &key, set.clone()),
    );
    // No segment at all.
    deliver(
        &mut c,
        writer,
        target,
        entries_msg(partition, vec![], &key, set.clone()),
    );
    // Hashes of the wrong length, to a replica that holds the key (so that,
    // read as a tree, they would differ from its own).
    let short = PeerMessage::AntiEntropySegments {
        partition,
        segments: vec![1; 3],
    };
    deliver(&mut c, target, writer, short);
    // A set whose context does not cover its sibling.
    let mut malformed = set.clone();
    malformed.context = Default::default();
    deliver(
        &mut c,
        writer,
        target,
        entries_msg(partition, vec![segment], &key, malformed),
    );
    c.run_for(2_000);
    assert_eq!(c.durable(target, &key), None);
    assert!(c
        .delivered
        .iter()
        .all(|m| !m.contains("AntiEntropyEntries")));

    // The same entry from a replica, as sent, asking for an answer to an
    // exchange the target never started: stored, and not answered (an answer
    // costs a partition scan, which no peer may ask for at will).
    let mut asking = entries_msg(partition, vec![segment], &key, set.clone());
    if let PeerMessage::AntiEntropyEntries { reply, .. } = &mut asking {
        *reply = true;
    }
    deliver(&mut c, writer, target, asking);
    c.run_for(2_000);
    assert_eq!(c.durable(target, &key), Some(set));
    assert_eq!(c.node(target).anti_entropy_stats().keys_repaired, 1);
    assert!(c
        .delivered
        .iter()
        .all(|m| !m.contains("AntiEntropyEntries")));
}

#[test]
fn a_node_with_anti_entropy_off_takes_no_part() {
    let mut config = config();
    config.anti_entropy_interval_ms = 0;
    let mut c = cluster_with(3, config);
    let key = b"off".to_vec();
    c.isolate("n3");
    expect_put(c.put("n1", &key, b"v", None));
    c.heal();
    let set = c.durable("n1", &key).unwrap();
    let partition = c.node("n1").membership().ring().partition_for_key(&key);
    let segment = segment_of(&key) as u8;
    deliver(
        &mut c,
        "n1",
        "n3",
        entries_msg(partition, vec![segment], &key, set),
    );
    c.settle();
    assert_eq!(c.durable("n3", &key), None);
    assert!(c.delivered.iter().all(|m| !m.contains("AntiEntropy")));
}
