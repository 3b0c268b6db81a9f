//! Tests of the scaler's pure decisions.

use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use outrigger_crds::GpuNodePool;

use super::*;
use crate::cloud::{ErrorKind, InstanceState};
use crate::observe::inventory::{Child, NodeFacts, Readiness};

fn pool(gpus: u32) -> Arc<GpuNodePool> {
    Arc::new(
        serde_json::from_value(serde_json::json!({
            "apiVersion": "outrigger.dev/v1alpha1", "kind": "GpuNodePool",
            "metadata": {"name": "aws-a", "uid": "u1"},
            "spec": {"provider": "aws", "region": "us-east-1", "instanceType": "p5.48xlarge",
                     "gpu": {"type": "H100", "count": gpus}, "nodes": {"min": 0, "max": 10}}
        }))
        .unwrap(),
    )
}

fn node(name: &str, allocatable: u32, used: Vec<(Option<(&str, &str)>, u32)>) -> NodeFacts {
    NodeFacts {
        name: name.into(),
        pool: Some(0),
        readiness: Readiness::Ready,
        allocatable,
        used: used
            .into_iter()
            .map(|(o, g)| (o.map(|(ns, n)| (ns.to_string(), n.to_string())), g))
            .collect(),
        provider_id: None,
        cordoned: false,
        interruption: None,
    }
}

fn child(replicas: u32, gpus: u32) -> Child {
    Child {
        owner: ("ns".into(), "md".into()),
        pool: "aws-a".into(),
        name: "md-aws-a".into(),
        replicas,
        ready: 0,
        gpus,
        scheduled: 0,
        applied_hash: None,
    }
}

fn inventory(nodes: Vec<NodeFacts>, children: Vec<Child>) -> Inventory {
    Inventory::from_facts(vec![pool(8)], nodes, children)
}

#[test]
fn replicas_fill_free_gpus_then_new_nodes() {
    let inv = inventory(vec![node("n0", 8, vec![])], vec![child(5, 4)]);
    // Two on n0, three more need two new nodes.
    assert_eq!(nodes_needed(&inv, 0, 0, 10), 3);
    assert_eq!(nodes_needed(&inv, 0, 0, 2), 2, "clamped to max");
    assert_eq!(nodes_needed(&inventory(vec![], vec![]), 0, 1, 10), 1, "min");
    assert_eq!(
        nodes_needed(&inventory(vec![], vec![child(0, 4)]), 0, 0, 10),
        0
    );
}

#[test]
fn gpus_of_other_workloads_are_not_free() {
    let inv = inventory(vec![node("n0", 8, vec![(None, 6)])], vec![child(1, 4)]);
    assert_eq!(nodes_needed(&inv, 0, 0, 10), 1, "a new node, n0 is full");
    let mut lost = node("n1", 8, vec![]);
    lost.readiness = Readiness::Lost(Timestamp::UNIX_EPOCH);
    let inv = inventory(vec![lost], vec![child(1, 4)]);
    assert_eq!(nodes_needed(&inv, 0, 0, 10), 1, "a lost node holds nothing");
}

#[test]
fn backoff_is_a_typed_record_that_blocks_until_its_end_and_doubles_to_the_cap() {
    let now: Timestamp = "2030-01-01T00:00:00Z".parse().unwrap();
    let error = CloudError::new(
        ErrorKind::InsufficientCapacity,
        "launch",
        "InsufficientInstanceCapacity",
        "no p5 in us-east-1a",
    );
    let seconds = Backoff::Clear.next_seconds(BACKOFF_FIRST);
    assert_eq!(seconds, 180);
    let record = Backoff::record(&pool(8), &error, seconds, now);
    assert_eq!(record.until, Time(now + SignedDuration::from_secs(180)));
    assert_eq!(
        (record.reason.as_str(), record.code.as_str()),
        ("InsufficientCapacity", "InsufficientInstanceCapacity")
    );
    assert_eq!(record.offering.instance_type, "p5.48xlarge");
    let backoff = Backoff::of(Some(&record), now);
    assert_eq!(
        backoff,
        Backoff::Blocked {
            until: now + SignedDuration::from_secs(180),
            seconds: 180
        }
    );
    let message = Backoff::blocked_message(&error, &record);
    assert!(message.contains("2030-01-01T00:03:00Z"), "{message}");
    assert_eq!(backoff.next_seconds(BACKOFF_FIRST), 360);
    // At its end the record stays: expired, and the next error doubles it.
    let later = Backoff::record(&pool(8), &error, 1440, now);
    let after = now + SignedDuration::from_secs(1440);
    assert_eq!(
        Backoff::of(Some(&later), after),
        Backoff::Expired { seconds: 1440 }
    );
    assert_eq!(
        Backoff::of(Some(&later), after).next_seconds(BACKOFF_FIRST),
        1800,
        "capped"
    );
    assert_eq!(Backoff::of(None, now), Backoff::Clear);
}

fn seat(name: &str, empty: bool, since: Option<i64>, cordoned: bool) -> NodeSeat {
    NodeSeat {
        name: name.into(),
        instance: Some(format!("i-{name}")),
        empty,
        empty_since: since.map(|s| Timestamp::from_second(s).unwrap()),
        cordoned,
    }
}

#[test]
fn scale_down_waits_for_the_cooldown_cordons_then_terminates() {
    let cooldown = Duration::from_secs(60);
    let at = |s| Timestamp::from_second(s).unwrap();
    let nodes = vec![
        seat("a", true, Some(0), false),
        seat("b", false, None, false),
    ];
    assert_eq!(
        scale_down(&nodes, 1, cooldown, at(30)),
        ScaleDown::default()
    );
    let plan = scale_down(&nodes, 2, cooldown, at(60));
    assert_eq!(plan.cordon, vec!["a"], "never a node with a replica");
    assert!(plan.terminate.is_empty());
    let nodes = vec![seat("a", true, Some(0), true)];
    assert_eq!(
        scale_down(&nodes, 1, cooldown, at(61)).terminate,
        vec!["i-a"]
    );
    let plan = scale_down(&nodes, 0, cooldown, at(61));
    assert_eq!(plan.uncordon, vec!["a"], "needed again");
    assert!(plan.terminate.is_empty());
}

fn instance(id: &str, launched: Option<i64>) -> Instance {
    Instance {
        id: id.into(),
        provider_id: format!("aws:///us-east-1a/{id}"),
        state: InstanceState::Running,
        launched: launched.map(|s| Timestamp::from_second(s).unwrap()),
    }
}

#[test]
fn instances_that_never_became_nodes_leak_after_the_grace() {
    let at = |s| Timestamp::from_second(s).unwrap();
    let grace = Duration::from_secs(600);
    let instances = vec![
        instance("i-1", Some(0)),
        instance("i-2", Some(0)),
        instance("i-3", Some(500)),
    ];
    let nodes = BTreeMap::from([("i-1".to_string(), "i-1".to_string())]);
    let seen = BTreeMap::new();
    assert_eq!(
        leaked(&instances, &nodes, &seen, grace, at(700)),
        vec!["i-2"]
    );
    assert!(leaked(&instances, &nodes, &seen, grace, at(100)).is_empty());
}

#[test]
fn launch_tokens_repeat_for_the_same_request_only() {
    let a = vec![instance("i-1", None)];
    let b = vec![instance("i-1", None), instance("i-2", None)];
    assert_eq!(launch_token("u", &a, 1, 2), launch_token("u", &a, 1, 2));
    assert_ne!(launch_token("u", &a, 1, 2), launch_token("u", &b, 1, 2));
    assert!(launch_token("u", &b, 2, 1).len() <= 64);
    // Fixed across builds and Rust releases: a retry after an upgrade reuses it.
    assert_eq!(launch_token("u", &[], 0, 1), "outrigger-c41b15de93d74391");
    assert_eq!(
        instance_of("AWS:///us-east-1a/i-2", &b).map(|i| i.id.as_str()),
        Some("i-2")
    );
}

fn lost(name: &str, since: &str) -> NodeFacts {
    NodeFacts {
        readiness: Readiness::Lost(since.parse().unwrap()),
        ..node(name, 8, vec![])
    }
}

fn pool_with_repair(after: u32) -> GpuNodePool {
    let mut p = (*pool(8)).clone();
    p.spec.repair = Some(outrigger_crds::NodeRepair {
        not_ready_after_seconds: after,
    });
    p
}

#[test]
fn one_broken_node_is_repaired_after_its_threshold() {
    let now: Timestamp = "2026-01-01T00:10:00Z".parse().unwrap();
    let nodes = vec![
        lost("n0", "2026-01-01T00:00:00Z"),
        node("n1", 8, vec![]),
        node("n2", 8, vec![]),
    ];
    let inv = inventory(nodes.clone(), vec![]);
    let seats: Vec<&NodeFacts> = nodes.iter().collect();
    let instances = BTreeMap::from([("n0".to_string(), "i-0".to_string())]);
    let (state, chosen, _) = repairs(&pool_with_repair(300), &inv, &seats, &instances, now);
    assert_eq!(state, RepairState::Allowed { after: 300 });
    assert_eq!(chosen, [("n0".to_string(), "i-0".to_string())]);
    // Not yet due: a wake-up at the threshold instead.
    let (_, chosen, due) = repairs(&pool_with_repair(900), &inv, &seats, &instances, now);
    assert!(chosen.is_empty());
    assert_eq!(due, ["2026-01-01T00:15:00Z".parse::<Timestamp>().unwrap()]);
    // Off.
    let (state, chosen, _) = repairs(&pool_with_repair(0), &inv, &seats, &instances, now);
    assert_eq!(state, RepairState::Off);
    assert!(chosen.is_empty());
}

#[test]
fn an_outage_is_not_repaired() {
    let now: Timestamp = "2026-01-01T00:10:00Z".parse().unwrap();
    let instances = BTreeMap::from([
        ("n0".to_string(), "i-0".to_string()),
        ("n1".to_string(), "i-1".to_string()),
    ]);
    // Every node of the pool lost: the pool is lost.
    let all = vec![
        lost("n0", "2026-01-01T00:00:00Z"),
        lost("n1", "2026-01-01T00:00:00Z"),
    ];
    let inv = inventory(all.clone(), vec![]);
    let seats: Vec<&NodeFacts> = all.iter().collect();
    let (state, chosen, _) = repairs(&pool_with_repair(60), &inv, &seats, &instances, now);
    assert!(matches!(state, RepairState::Outage { .. }), "{state:?}");
    assert!(chosen.is_empty());
    // Two of six unhealthy: more than one and more than 20%.
    let mut many = vec![
        lost("n0", "2026-01-01T00:00:00Z"),
        lost("n1", "2026-01-01T00:00:00Z"),
    ];
    many.extend((2..6).map(|i| node(&format!("n{i}"), 8, vec![])));
    let inv = inventory(many.clone(), vec![]);
    let seats: Vec<&NodeFacts> = many.iter().collect();
    let (state, chosen, _) = repairs(&pool_with_repair(60), &inv, &seats, &instances, now);
    assert_eq!(
        state,
        RepairState::TooManyUnhealthy {
            unhealthy: 2,
            nodes: 6
        }
    );
    assert!(chosen.is_empty());
}

#[test]
fn backoffs_are_longer_for_zonal_allocation_failures_and_a_zero_quota() {
    let base = Duration::from_secs(180);
    let error = |kind, code: &str, message: &str| CloudError::new(kind, "launch", code, message);
    assert_eq!(
        first_backoff(
            &error(
                ErrorKind::InsufficientCapacity,
                "InsufficientInstanceCapacity",
                "no capacity"
            ),
            base
        ),
        base
    );
    assert_eq!(
        first_backoff(
            &error(
                ErrorKind::InsufficientCapacity,
                "ZonalAllocationFailed",
                "zone 1"
            ),
            base
        ),
        Duration::from_secs(900)
    );
    assert_eq!(
        first_backoff(
            &error(
                ErrorKind::QuotaExceeded,
                "VcpuLimitExceeded",
                "You have requested more vCPU capacity than your current vCPU limit of 0 allows"
            ),
            base
        ),
        Duration::from_secs(3600)
    );
    assert_eq!(
        first_backoff(
            &error(
                ErrorKind::QuotaExceeded,
                "VcpuLimitExceeded",
                "your current vCPU limit of 192 allows"
            ),
            base
        ),
        base
    );
}
