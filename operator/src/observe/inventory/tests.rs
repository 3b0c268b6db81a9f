//! Tests of how nodes count: Ready, booting, lost.

use std::sync::Arc;

use serde_json::json;

use super::*;

const CREATED: &str = "2026-01-01T00:00:00Z";

fn node(conditions: serde_json::Value, taints: serde_json::Value) -> Arc<Node> {
    Arc::new(
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "n0", "creationTimestamp": CREATED,
                         "labels": {"outrigger.dev/pool": "aws-a"}},
            "spec": {"taints": taints},
            "status": {"conditions": conditions, "allocatable": {"nvidia.com/gpu": "8"}}
        }))
        .unwrap(),
    )
}

fn ready(status: &str, reason: &str, since: &str) -> serde_json::Value {
    json!([{"type": "Ready", "status": status, "reason": reason, "lastTransitionTime": since}])
}

fn at(t: &str) -> Timestamp {
    t.parse().unwrap()
}

fn pool() -> Arc<GpuNodePool> {
    Arc::new(
        serde_json::from_value(json!({
            "apiVersion": "outrigger.dev/v1alpha1", "kind": "GpuNodePool",
            "metadata": {"name": "aws-a"},
            "spec": {"provider": "aws", "region": "us-east-1", "instanceType": "p5.48xlarge",
                     "gpu": {"type": "H100", "count": 8}, "nodes": {"min": 0, "max": 2},
                     "scaling": {"aws": {"launchTemplate": {"name": "t"}}}}
        }))
        .unwrap(),
    )
}

#[test]
fn a_node_that_never_was_ready_is_booting_not_lost() {
    let now = at("2026-01-01T00:05:00Z");
    let cases = [
        (json!(null), json!(null), Readiness::Booting),
        (
            ready("False", "KubeletNotReady", CREATED),
            json!(null),
            Readiness::Booting,
        ),
        (
            ready("True", "KubeletReady", CREATED),
            json!(null),
            Readiness::Ready,
        ),
        // Stopped reporting soon after it started: lost, not booting.
        (
            ready("Unknown", "NodeStatusUnknown", "2026-01-01T00:00:08Z"),
            json!(null),
            Readiness::Lost(at("2026-01-01T00:00:08Z")),
        ),
        (
            ready("False", "KubeletNotReady", "2026-01-01T00:01:00Z"),
            json!(null),
            Readiness::Lost(at("2026-01-01T00:01:00Z")),
        ),
        (
            ready("True", "KubeletReady", CREATED),
            json!([{"key": labels::UNREACHABLE_TAINT, "effect": "NoExecute",
                    "timeAdded": "2026-01-01T00:02:00Z"}]),
            Readiness::Lost(at("2026-01-01T00:02:00Z")),
        ),
    ];
    for (conditions, taints, want) in cases {
        let n = node(conditions.clone(), taints);
        let mut clock = LostClock::default();
        assert_eq!(
            clock.readiness("n0", reported(&n), now),
            want,
            "{conditions}"
        );
    }
}

#[test]
fn a_lost_node_without_timestamps_is_lost_since_it_was_first_seen_lost() {
    // As some node agents write it: Ready=False with no lastTransitionTime.
    let n = node(
        json!([{"type": "Ready", "status": "False", "reason": "NodeDown"}]),
        json!(null),
    );
    let first = at("2026-01-01T00:05:00Z");
    let mut clock = LostClock::default();
    assert_eq!(
        clock.readiness("n0", reported(&n), first),
        Readiness::Lost(first)
    );
    // Every later pass keeps the clock running from the first sighting.
    let later = at("2026-01-01T00:05:30Z");
    assert_eq!(
        clock.readiness("n0", reported(&n), later),
        Readiness::Lost(first)
    );
    // A status time later than the sighting does not restart it either.
    let stale = node(
        ready("Unknown", "NodeStatusUnknown", "2026-01-01T00:05:20Z"),
        json!(null),
    );
    assert_eq!(
        clock.readiness("n0", reported(&stale), later),
        Readiness::Lost(first)
    );
    // Ready again: forgotten, and the next loss starts a new clock.
    let back = node(ready("True", "KubeletReady", CREATED), json!(null));
    assert_eq!(
        clock.readiness("n0", reported(&back), later),
        Readiness::Ready
    );
    let again = at("2026-01-01T00:06:00Z");
    assert_eq!(
        clock.readiness("n0", reported(&n), again),
        Readiness::Lost(again)
    );
}

#[test]
fn a_pool_whose_nodes_report_no_times_still_fails_over_after_the_grace() {
    let lost = node(
        json!([{"type": "Ready", "status": "False", "reason": "NodeDown"}]),
        json!(null),
    );
    let owner: Key = ("ns".into(), "md".into());
    let grace = Duration::from_secs(5);
    let mut clock = LostClock::default();
    let t0 = at("2026-01-01T00:05:00Z");
    let view = |clock: &mut LostClock, now: Timestamp| {
        Inventory::new(
            vec![pool()],
            std::slice::from_ref(&lost),
            &[],
            &[],
            now,
            clock,
        )
        .view(&owner, grace, Duration::from_secs(20), now)
    };
    assert_eq!(view(&mut clock, t0).health["aws-a"], Health::Healthy);
    let t6 = at("2026-01-01T00:05:06Z");
    assert_eq!(
        view(&mut clock, t6).health["aws-a"],
        Health::Unhealthy { lost_since: t0 }
    );
}

#[test]
fn booting_nodes_are_room_to_grow_and_do_not_make_a_pool_lost() {
    let now = at("2026-01-01T00:00:05Z");
    let inv = Inventory::new(
        vec![pool()],
        &[node(json!(null), json!(null))],
        &[],
        &[],
        now,
        &mut LostClock::default(),
    );
    let counts = inv.counts(0);
    assert_eq!(
        (counts.nodes, counts.ready_nodes, counts.booting_nodes),
        (1, 0, 1)
    );
    assert_eq!(inv.pool_lost_since(0), None);
    let view = inv.view(
        &("ns".into(), "md".into()),
        Duration::from_secs(5),
        Duration::from_secs(20),
        now,
    );
    assert!(
        view.pools[0].nodes.is_empty(),
        "not a node that holds nothing"
    );
    assert_eq!(view.pools[0].capacity(8), 2, "both nodes of nodes.max");
    assert_eq!(view.health["aws-a"], Health::Healthy);
}

#[test]
fn replicas_of_others_not_bound_yet_never_take_the_room_own_pods_hold() {
    // One node of 8 GPUs, nodes.max 1: this deployment's bound replica holds 4 of
    // them, and another deployment has 2 replicas of 4 GPUs planned here, Pending.
    let mut pool = (*pool()).clone();
    pool.spec.nodes.max = 1;
    let mut roomier = pool.clone();
    roomier.spec.nodes.max = 2;
    let owner: Key = ("ns".into(), "md".into());
    let other: Key = ("ns".into(), "other".into());
    let facts = vec![NodeFacts {
        name: "n0".into(),
        pool: Some(0),
        readiness: Readiness::Ready,
        allocatable: 8,
        used: vec![(Some(owner.clone()), 4)],
        provider_id: None,
        cordoned: false,
        interruption: None,
    }];
    let pending = Child {
        owner: other,
        pool: "aws-a".into(),
        name: "other-aws-a".into(),
        replicas: 2,
        ready: 0,
        gpus: 4,
        scheduled: 0,
        applied_hash: None,
    };
    let now = at("2026-01-01T00:05:00Z");
    let capacity = |pool: GpuNodePool| {
        let inventory =
            Inventory::from_facts(vec![Arc::new(pool)], facts.clone(), vec![pending.clone()]);
        inventory
            .view(&owner, Duration::from_secs(5), Duration::from_secs(20), now)
            .pools[0]
            .capacity(4)
    };
    // The other deployment's replicas take the 4 free GPUs (one of them fits);
    // this deployment's own replica keeps its place.
    assert_eq!(capacity(pool), 1);
    // With room for a second node, the other replica is planned on it, and the
    // first node still holds this deployment's replica and room for one more.
    assert_eq!(capacity(roomier), 2);
}
