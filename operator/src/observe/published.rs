//! What a peer publishes, made safe before anything is sized or timed by it. A
//! peer's pool that fails the checks a local one passes (`validate::gpu_node_pool`)
//! is left out; every count is clamped to the pool's own `nodes.max`, itself at
//! most [`MAX_POOL_NODES`]; a child's Ready replicas count only up to what its
//! pool's Ready nodes hold; the nodes of all its pools together count for at most
//! [`MAX_CLUSTER_NODES`]; and every time the peer wrote is moved onto this
//! cluster's clock by the measured skew. Pure.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::SignedDuration;
use outrigger_crds::GpuNodePool;

use super::inventory::Child;

/// The most nodes a peer's pool counts for, whatever its `nodes.max` says: above
/// Kubernetes' tested limit of 5 000 nodes a cluster, so no real pool is cut, and
/// small enough that the per-node lists a plan builds stay a few hundred KiB.
pub const MAX_POOL_NODES: u32 = 5_000;
/// The most nodes all of a peer's pools count for together: one cluster's worth,
/// as above; given out to its pools in name order, so every peer counts alike.
pub const MAX_CLUSTER_NODES: u32 = 5_000;
/// The most GPUs a peer's node may have: the largest GPU servers have 8 to 16,
/// a rack-scale node a few more; a higher number is a mistake, not a machine.
pub const MAX_GPUS_PER_NODE: u32 = 64;

/// A peer pool left out of plans, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub pool: String,
    pub problem: String,
}

/// A peer's pools and children, as planning may use them.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    pub pools: Vec<Arc<GpuNodePool>>,
    pub children: Vec<Child>,
    pub rejected: Vec<Rejected>,
}

/// `skew` is the peer's clock minus this cluster's: a time the peer wrote is
/// `skew` later than the same instant here.
pub fn facts(pools: &[Arc<GpuNodePool>], children: &[Child], skew: SignedDuration) -> Facts {
    let mut out = Facts::default();
    let mut ordered: Vec<&Arc<GpuNodePool>> = pools.iter().collect();
    ordered.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut nodes_left = MAX_CLUSTER_NODES;
    for published in ordered {
        match pool(published, skew, &mut nodes_left) {
            Ok(pool) => out.pools.push(Arc::new(pool)),
            Err(problem) => out.rejected.push(Rejected {
                pool: published.metadata.name.clone().unwrap_or_default(),
                problem,
            }),
        }
    }
    out.pools
        .sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    out.rejected.sort_by(|a, b| a.pool.cmp(&b.pool));
    out.children = bounded_children(children, &out.pools);
    out
}

/// One pool, checked, clamped (its nodes also to what is `nodes_left` of the
/// cluster's, which it then takes) and on the local clock.
fn pool(
    published: &GpuNodePool,
    skew: SignedDuration,
    nodes_left: &mut u32,
) -> Result<GpuNodePool, String> {
    let errors = crate::validate::gpu_node_pool(&published.spec);
    if !errors.is_empty() {
        let said: Vec<String> = errors.iter().map(ToString::to_string).collect();
        return Err(said.join("; "));
    }
    if published.spec.gpu.count > MAX_GPUS_PER_NODE {
        return Err(format!(
            "spec.gpu.count: is {}; a node has at most {MAX_GPUS_PER_NODE} GPUs",
            published.spec.gpu.count
        ));
    }
    let mut pool = published.clone();
    let per_node = pool.spec.gpu.count;
    let max = pool.spec.nodes.max.min(MAX_POOL_NODES);
    pool.spec.nodes.max = max;
    pool.spec.nodes.min = pool.spec.nodes.min.min(max);
    let local = |t: &mut Time| t.0 = t.0.checked_sub(skew).unwrap_or(t.0);
    if let Some(status) = pool.status.as_mut() {
        let nodes = status.nodes.map(|n| n.min(max).min(*nodes_left));
        *nodes_left -= nodes.unwrap_or(0);
        status.nodes = nodes;
        status.ready_nodes = status.ready_nodes.map(|r| r.min(nodes.unwrap_or(0)));
        status.desired_nodes = status.desired_nodes.map(|n| n.min(max));
        status.cloud_instances = status.cloud_instances.map(|n| n.min(max));
        if let Some(gpus) = status.gpus.as_mut() {
            let most = nodes.unwrap_or(0).saturating_mul(per_node);
            gpus.allocatable = gpus.allocatable.min(most);
            gpus.requested = gpus.requested.min(most);
        }
        for t in [status.lost_since.as_mut(), status.recovered_at.as_mut()]
            .into_iter()
            .flatten()
        {
            local(t);
        }
        if let Some(backoff) = status.capacity_backoff.as_mut() {
            local(&mut backoff.until);
        }
    }
    Ok(pool)
}

/// The children on admitted pools, each asking at most what its pool could ever
/// hold, and Ready only up to what the pool's Ready nodes hold (given out in name
/// order, so every peer counts alike).
fn bounded_children(children: &[Child], pools: &[Arc<GpuNodePool>]) -> Vec<Child> {
    let mut room: BTreeMap<&str, (u32, u32)> = pools
        .iter()
        .map(|p| {
            let per_node = p.spec.gpu.count;
            let ready_nodes = p.status.as_ref().and_then(|s| s.ready_nodes).unwrap_or(0);
            (
                p.metadata.name.as_deref().unwrap_or_default(),
                (p.spec.nodes.max, ready_nodes.saturating_mul(per_node)),
            )
        })
        .collect();
    let per_node: BTreeMap<&str, u32> = pools
        .iter()
        .map(|p| {
            (
                p.metadata.name.as_deref().unwrap_or_default(),
                p.spec.gpu.count,
            )
        })
        .collect();
    let mut ordered: Vec<&Child> = children.iter().collect();
    ordered.sort_by(|a, b| (&a.owner, &a.name).cmp(&(&b.owner, &b.name)));
    let mut out = Vec::new();
    for child in ordered {
        let Some((max_nodes, ready_gpus)) = room.get_mut(child.pool.as_str()) else {
            continue;
        };
        let gpus = child.gpus.max(1);
        let fits_per_node = per_node[child.pool.as_str()] / gpus;
        let mut bounded = child.clone();
        bounded.replicas = child.replicas.min(max_nodes.saturating_mul(fits_per_node));
        bounded.ready = child.ready.min(bounded.replicas).min(*ready_gpus / gpus);
        bounded.scheduled = child.scheduled.min(bounded.replicas);
        *ready_gpus -= bounded.ready * gpus;
        out.push(bounded);
    }
    out
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::Timestamp;
    use outrigger_crds::{GpuCounts, GpuNodePoolStatus};
    use serde_json::json;

    use super::*;

    fn published(name: &str, max: u32, nodes: u32, ready: u32) -> Arc<GpuNodePool> {
        let mut p: GpuNodePool = serde_json::from_value(json!({
            "apiVersion": "outrigger.dev/v1alpha1", "kind": "GpuNodePool",
            "metadata": {"name": name},
            "spec": {"provider": "aws", "region": "r", "instanceType": "t",
                     "gpu": {"type": "H100", "count": 8}, "nodes": {"min": 0, "max": max}},
        }))
        .unwrap();
        p.status = Some(GpuNodePoolStatus {
            nodes: Some(nodes),
            ready_nodes: Some(ready),
            gpus: Some(GpuCounts {
                allocatable: u32::MAX,
                requested: u32::MAX,
            }),
            ..GpuNodePoolStatus::default()
        });
        Arc::new(p)
    }

    fn child(name: &str, pool: &str, replicas: u32, ready: u32, gpus: u32) -> Child {
        Child {
            owner: ("ns".into(), name.into()),
            pool: pool.into(),
            name: format!("{name}-{pool}"),
            replicas,
            ready,
            gpus,
            scheduled: ready,
            applied_hash: None,
        }
    }

    #[test]
    fn counts_are_clamped_to_the_pools_own_limits_and_the_hard_cap() {
        let f = facts(
            &[
                published("a", 4, u32::MAX, u32::MAX),
                published("b", u32::MAX, u32::MAX, 3),
            ],
            &[],
            SignedDuration::ZERO,
        );
        let a = f.pools[0].status.as_ref().unwrap();
        assert_eq!((a.nodes, a.ready_nodes), (Some(4), Some(4)));
        assert_eq!(a.gpus.as_ref().unwrap().requested, 32);
        let b = &f.pools[1];
        assert_eq!(b.spec.nodes.max, MAX_POOL_NODES);
        // The cluster's 5 000 nodes, less the 4 pool a took.
        assert_eq!(
            b.status.as_ref().unwrap().nodes,
            Some(MAX_CLUSTER_NODES - 4)
        );
        assert!(f.rejected.is_empty());
    }

    #[test]
    fn all_of_a_peers_pools_together_count_for_one_clusters_nodes() {
        let many: Vec<Arc<GpuNodePool>> = (0..5)
            .map(|i| published(&format!("p{i}"), MAX_POOL_NODES, MAX_POOL_NODES, 0))
            .collect();
        let f = facts(&many, &[], SignedDuration::ZERO);
        let nodes: Vec<u32> = f
            .pools
            .iter()
            .map(|p| p.status.as_ref().unwrap().nodes.unwrap())
            .collect();
        assert_eq!(nodes, [MAX_CLUSTER_NODES, 0, 0, 0, 0]);
    }

    #[test]
    fn a_time_at_the_end_of_the_calendar_neither_panics_nor_moves() {
        let mut p = (*published("p", 4, 1, 1)).clone();
        p.status.as_mut().unwrap().lost_since = Some(Time(Timestamp::MAX));
        let f = facts(&[Arc::new(p)], &[], SignedDuration::from_secs(-60));
        assert_eq!(
            f.pools[0].status.as_ref().unwrap().lost_since,
            Some(Time(Timestamp::MAX))
        );
    }

    #[test]
    fn a_pool_that_fails_validation_is_left_out_with_the_reason() {
        let mut bad = (*published("bad", 4, 1, 1)).clone();
        bad.spec.nodes.min = 9;
        let mut huge = (*published("huge", 4, 1, 1)).clone();
        huge.spec.gpu.count = 100_000;
        let f = facts(
            &[Arc::new(bad), Arc::new(huge), published("ok", 4, 1, 1)],
            &[child("md", "bad", 1, 1, 1)],
            SignedDuration::ZERO,
        );
        assert_eq!(f.pools.len(), 1);
        assert_eq!(f.rejected[0].pool, "bad");
        assert!(
            f.rejected[0].problem.contains("spec.nodes"),
            "{:?}",
            f.rejected
        );
        assert!(
            f.rejected[1].problem.contains("at most 64"),
            "{:?}",
            f.rejected
        );
        assert!(
            f.children.is_empty(),
            "children of a rejected pool count for nothing"
        );
    }

    #[test]
    fn ready_replicas_count_only_up_to_what_ready_nodes_hold() {
        // 2 Ready nodes of 8 GPUs: 16 GPUs. md-a claims 3 Ready of 4 GPUs (12),
        // md-b 5 Ready of 2 GPUs (10): b keeps only the 4 GPUs left, 2 replicas.
        let f = facts(
            &[published("p", 4, 2, 2)],
            &[
                child("md-b", "p", 5, 5, 2),
                child("md-a", "p", 3, 3, 4),
                child("md-c", "p", u32::MAX, u32::MAX, 1),
            ],
            SignedDuration::ZERO,
        );
        let ready: Vec<(String, u32, u32)> = f
            .children
            .iter()
            .map(|c| (c.owner.1.clone(), c.replicas, c.ready))
            .collect();
        assert_eq!(
            ready,
            [
                ("md-a".to_string(), 3, 3),
                ("md-b".to_string(), 5, 2),
                ("md-c".to_string(), 32, 0)
            ]
        );
    }

    #[test]
    fn a_peers_times_move_onto_the_local_clock() {
        let t = Timestamp::from_second(1_800_000_000).unwrap();
        let mut p = (*published("p", 4, 1, 1)).clone();
        p.status.as_mut().unwrap().lost_since = Some(Time(t));
        // The peer's clock runs 60 s behind: what it calls t is t + 60 s here.
        let f = facts(&[Arc::new(p)], &[], SignedDuration::from_secs(-60));
        let lost = f.pools[0]
            .status
            .as_ref()
            .unwrap()
            .lost_since
            .clone()
            .unwrap();
        assert_eq!(lost.0, t + SignedDuration::from_secs(60));
    }
}
