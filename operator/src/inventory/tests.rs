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
        assert_eq!(readiness(&n, now), want, "{conditions}");
    }
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
    );
    assert!(
        view.pools[0].nodes.is_empty(),
        "not a node that holds nothing"
    );
    assert_eq!(view.pools[0].capacity(8), 2, "both nodes of nodes.max");
    assert_eq!(view.health["aws-a"], Health::Healthy);
}
