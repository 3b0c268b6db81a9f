//! One ModelDeployment's pools over every cluster that serves it, from what each
//! cluster publishes, this one included: its GpuNodePools' specs and statuses and
//! its child Deployments' replicas. Every peer builds the same view from the same
//! facts, so the deterministic solver gives every peer the same plan. A pool is
//! named `cluster/pool` in it. Pure.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use outrigger_crds::GpuNodePool;
use outrigger_placement as placement;

use super::inventory::{Child, Health, Key, View};
use crate::inputs;

/// A pool's name in a plan over several clusters.
pub fn qualified(cluster: &str, pool: &str) -> String {
    format!("{cluster}/{pool}")
}

/// What one cluster publishes, and how it stands.
pub struct Cluster {
    pub name: String,
    pub pools: Vec<Arc<GpuNodePool>>,
    /// Its child Deployments, of every ModelDeployment.
    pub children: Vec<Child>,
    /// When it came back after being lost: its pools take nothing new until each
    /// deployment's `rebalanceAfterSeconds` after this.
    pub back_since: Option<Timestamp>,
    /// A peer still counts it as lost (for this cluster itself): its pools keep
    /// what they run and take nothing new until that peer sees it back.
    pub held: bool,
}

/// A pool in the view, by its qualified name.
#[derive(Debug, Clone)]
pub struct PoolRef {
    /// The cluster that holds it; `None` without peers.
    pub cluster: Option<String>,
    pub pool: Arc<GpuNodePool>,
}

/// The view, and the deployment's replicas in every cluster.
pub struct GlobalView {
    pub view: View,
    /// Replicas per (qualified) pool its children ask for now.
    pub current: BTreeMap<String, u32>,
    /// Ready replicas per (qualified) pool.
    pub ready: BTreeMap<String, u32>,
    pub pools: BTreeMap<String, PoolRef>,
}

/// `t + d`, or the last instant there is: a time a peer published may be anywhere
/// up to the year 9999, and a sum past it must not panic.
fn later(t: Timestamp, d: SignedDuration) -> Timestamp {
    t.checked_add(d).unwrap_or(Timestamp::MAX)
}

/// Ready nodes whose free GPUs are only `own` (packed node by node): a pool that
/// keeps what the deployment has Ready there and takes nothing new.
fn holding(gpus_per_node: u32, ready: u32, mut own: u32) -> Vec<placement::Node> {
    (0..ready)
        .map(|_| {
            let free = own.min(gpus_per_node);
            own -= free;
            placement::Node {
                ready: true,
                free_gpus: free,
            }
        })
        .collect()
}

/// The pools of `clusters` as `owner` sees them.
pub fn view(
    clusters: &[Cluster],
    owner: &Key,
    grace: Duration,
    rebalance: Duration,
    now: Timestamp,
) -> GlobalView {
    let grace = SignedDuration::try_from(grace).unwrap_or(SignedDuration::MAX);
    let rebalance = SignedDuration::try_from(rebalance).unwrap_or(SignedDuration::MAX);
    let mut next: Option<Timestamp> = None;
    let mut soonest = |t: Timestamp| {
        if t > now {
            next = Some(next.map_or(t, |n: Timestamp| n.min(t)));
        }
    };
    let mut out = GlobalView {
        view: View {
            pools: Vec::new(),
            health: BTreeMap::new(),
            next_change: None,
        },
        current: BTreeMap::new(),
        ready: BTreeMap::new(),
        pools: BTreeMap::new(),
    };
    for cluster in clusters {
        for child in cluster.children.iter().filter(|c| &c.owner == owner) {
            let name = qualified(&cluster.name, &child.pool);
            if child.replicas > 0 {
                out.current.insert(name.clone(), child.replicas);
            }
            out.ready.insert(name, child.ready);
        }
        for pool in &cluster.pools {
            let pool_name = pool.metadata.name.clone().unwrap_or_default();
            let name = qualified(&cluster.name, &pool_name);
            let status = pool.status.as_ref();
            let per_node = pool.spec.gpu.count;
            // GPUs this deployment's child asks for and holds Ready here, and what
            // the other deployments' children ask for.
            let (mut own, mut own_ready, mut others) = (0u32, 0u32, 0u32);
            for child in cluster.children.iter().filter(|c| c.pool == pool_name) {
                let gpus = child.replicas.saturating_mul(child.gpus);
                if &child.owner == owner {
                    own = own.saturating_add(gpus);
                    own_ready = own_ready
                        .saturating_add(child.ready.min(child.replicas).saturating_mul(child.gpus));
                } else {
                    others = others.saturating_add(gpus);
                }
            }
            let requested = status
                .and_then(|s| s.gpus.as_ref())
                .map_or(0, |g| g.requested);
            // What the pods of others request, or what other deployments' children
            // ask for when more (their pods may not be bound yet).
            let taken = requested.saturating_sub(own.min(requested)).max(others);
            let lost = status.and_then(|s| s.lost_since.as_ref()).map(|t| t.0);
            let recovering_until = [
                status
                    .and_then(|s| s.recovered_at.as_ref())
                    .map(|t| later(t.0, rebalance)),
                cluster.back_since.map(|t| later(t, rebalance)),
                cluster.held.then(|| later(now, rebalance)),
            ]
            .into_iter()
            .flatten()
            .filter(|until| *until > now)
            .max();
            let health = match (lost, recovering_until) {
                (Some(since), _) if later(since, grace) <= now => {
                    Health::Unhealthy { lost_since: since }
                }
                (_, Some(until)) => Health::Recovering { until },
                _ => Health::Healthy,
            };
            if let Some(since) = lost {
                soonest(later(since, grace));
            }
            if let Some(until) = recovering_until {
                soonest(until);
            }
            if let Some(backoff) = status.and_then(|s| s.capacity_backoff.as_ref()) {
                soonest(backoff.until.0);
            }
            let ready_nodes = status.and_then(|s| s.ready_nodes).unwrap_or(0);
            // Lost within the grace period, or recovering: keep what is Ready there
            // (after an outage its replicas may be gone though its children remain).
            let holds = lost.is_some() || matches!(health, Health::Recovering { .. });
            let nodes = if holds {
                holding(
                    per_node,
                    ready_nodes.max(own_ready.div_ceil(per_node.max(1))),
                    own_ready,
                )
            } else {
                inputs::nodes_from_counts(
                    per_node,
                    status.and_then(|s| s.nodes).unwrap_or(0),
                    ready_nodes,
                    taken,
                )
            };
            let growth_blocked = holds || inputs::growth_blocked(status, now);
            let mut solver_pool = inputs::pool(
                pool,
                nodes,
                growth_blocked,
                !matches!(health, Health::Unhealthy { .. }),
            );
            solver_pool.name = name.clone();
            out.view.pools.push(solver_pool);
            out.view.health.insert(name.clone(), health);
            out.pools.insert(
                name,
                PoolRef {
                    cluster: Some(cluster.name.clone()),
                    pool: pool.clone(),
                },
            );
        }
    }
    out.view.next_change = next;
    out
}

#[cfg(test)]
mod tests {
    use outrigger_crds::{GpuCounts, GpuNodePoolStatus};
    use serde_json::json;

    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn pool(name: &str, provider: &str, ready: u32, requested: u32) -> Arc<GpuNodePool> {
        let mut p: GpuNodePool = serde_json::from_value(json!({
            "apiVersion": "outrigger.dev/v1alpha1", "kind": "GpuNodePool",
            "metadata": {"name": name},
            "spec": {"provider": provider, "region": "r", "instanceType": "t",
                     "gpu": {"type": "H100", "count": 1}, "nodes": {"min": 0, "max": 4},
                     "pricePerNodeHour": 1.0},
        }))
        .unwrap();
        p.status = Some(GpuNodePoolStatus {
            nodes: Some(ready),
            ready_nodes: Some(ready),
            gpus: Some(GpuCounts {
                allocatable: ready,
                requested,
            }),
            ..GpuNodePoolStatus::default()
        });
        Arc::new(p)
    }

    fn child(owner: &str, pool: &str, replicas: u32, ready: u32) -> Child {
        Child {
            owner: ("ns".into(), owner.into()),
            pool: pool.into(),
            name: format!("{owner}-{pool}"),
            replicas,
            ready,
            gpus: 1,
            scheduled: ready,
            applied_hash: None,
        }
    }

    fn clusters() -> Vec<Cluster> {
        vec![
            Cluster {
                name: "aws".into(),
                pools: vec![pool("a", "aws", 3, 3)],
                children: vec![child("md", "a", 2, 2), child("other", "a", 1, 1)],
                back_since: None,
                held: false,
            },
            Cluster {
                name: "azure".into(),
                pools: vec![pool("b", "azure", 2, 2)],
                children: vec![child("md", "b", 2, 1)],
                back_since: None,
                held: false,
            },
        ]
    }

    const D: Duration = Duration::from_secs(30);

    #[test]
    fn pools_are_named_by_cluster_and_the_deployment_keeps_its_own_gpus() {
        let key = ("ns".to_string(), "md".to_string());
        let v = view(&clusters(), &key, D, D, at(0));
        let names: Vec<&str> = v.view.pools.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["aws/a", "azure/b"]);
        assert_eq!(
            v.current,
            BTreeMap::from([("aws/a".into(), 2), ("azure/b".into(), 2)])
        );
        assert_eq!(v.ready["azure/b"], 1);
        // aws/a: 3 GPUs, 1 taken by the other deployment; its own 2 are free to it.
        let free: u32 = v.view.pools[0].nodes.iter().map(|n| n.free_gpus).sum();
        assert_eq!(free, 2);
        assert_eq!(v.pools["azure/b"].cluster.as_deref(), Some("azure"));
    }

    #[test]
    fn a_cluster_back_from_a_loss_keeps_what_it_runs_and_takes_nothing_new() {
        let key = ("ns".to_string(), "md".to_string());
        let mut cs = clusters();
        cs[0].back_since = Some(at(-10));
        let v = view(&cs, &key, D, D, at(0));
        assert_eq!(v.view.health["aws/a"], Health::Recovering { until: at(20) });
        let aws = &v.view.pools[0];
        assert!(aws.growth_blocked);
        assert_eq!(aws.nodes.iter().map(|n| n.free_gpus).sum::<u32>(), 2);
        assert_eq!(v.view.next_change, Some(at(20)));
        // Both sides build the same view from the same facts.
        let again = view(&cs, &key, D, D, at(0));
        assert_eq!(
            format!("{:?}", again.view.pools),
            format!("{:?}", v.view.pools)
        );
    }

    #[test]
    fn times_at_the_end_of_the_calendar_do_not_panic() {
        let key = ("ns".to_string(), "md".to_string());
        let mut cs = clusters();
        let mut p = (*cs[1].pools[0]).clone();
        p.status.as_mut().unwrap().lost_since = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::MAX),
        );
        p.status.as_mut().unwrap().recovered_at = p.status.as_ref().unwrap().lost_since.clone();
        cs[1].pools[0] = Arc::new(p);
        cs[0].back_since = Some(Timestamp::MAX);
        let v = view(&cs, &key, D, D, at(0));
        assert!(v.view.pools[1].healthy, "lost only from the end of time on");
    }

    #[test]
    fn a_pool_lost_past_the_grace_period_is_unhealthy() {
        let key = ("ns".to_string(), "md".to_string());
        let mut cs = clusters();
        let mut p = (*cs[1].pools[0]).clone();
        p.status.as_mut().unwrap().lost_since = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at(-31)),
        );
        cs[1].pools[0] = Arc::new(p);
        let v = view(&cs, &key, D, D, at(0));
        assert!(!v.view.pools[1].healthy);
    }
}
