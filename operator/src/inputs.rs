//! Resources turned into the solver's plain inputs (docs/architecture.md: cloud -> pool status ->
//! inventory -> solver). The operator passes the nodes its inventory sees; `outrigger
//! plan` passes the counts a pool's status reports.

use std::collections::BTreeMap;

use k8s_openapi::jiff::Timestamp;
use outrigger_crds::{
    GpuNodePool, GpuNodePoolStatus, ModelDeployment, SpreadBy, Strategy, WhenUnsatisfiable,
};
use outrigger_placement as placement;

/// A pool as the solver sees it, given the nodes observed for it.
pub fn pool(
    pool: &GpuNodePool,
    nodes: Vec<placement::Node>,
    growth_blocked: bool,
    healthy: bool,
) -> placement::Pool {
    let spec = &pool.spec;
    placement::Pool {
        name: pool.metadata.name.clone().unwrap_or_default(),
        provider: spec.provider.as_str().to_string(),
        region: spec.region.clone(),
        zone: spec.zone.clone(),
        gpu_type: spec.gpu.r#type.clone(),
        gpus_per_node: spec.gpu.count,
        capacity_type: spec.capacity_type.as_str().to_string(),
        price_per_node_hour: spec.price_per_node_hour.unwrap_or(0.0),
        max_nodes: spec.nodes.max,
        scalable: spec.scaling.is_some(),
        growth_blocked,
        healthy,
        nodes,
    }
}

/// `total` nodes, `ready` of them Ready, with `requested` GPUs taken from the
/// Ready ones in turn.
pub fn nodes_from_counts(
    gpus_per_node: u32,
    total: u32,
    ready: u32,
    mut requested: u32,
) -> Vec<placement::Node> {
    let ready = ready.min(total);
    (0..total)
        .map(|i| {
            let taken = if i < ready {
                requested.min(gpus_per_node)
            } else {
                0
            };
            requested -= taken;
            placement::Node {
                ready: i < ready,
                free_gpus: gpus_per_node - taken,
            }
        })
        .collect()
}

/// The pool's typed backoff says the cloud refused to grow it, and the backoff has
/// not ended yet at `now`.
pub fn growth_blocked(status: Option<&GpuNodePoolStatus>, now: Timestamp) -> bool {
    status
        .and_then(|s| s.capacity_backoff.as_ref())
        .is_some_and(|b| b.until.0 > now)
}

/// What a ModelDeployment asks of the solver, with its current placement.
pub fn request(md: &ModelDeployment) -> placement::Request {
    let spec = &md.spec;
    let current: BTreeMap<String, u32> = md
        .status
        .iter()
        .flat_map(|s| &s.placements)
        .filter(|p| p.replicas > 0)
        .map(|p| (p.pool.clone(), p.replicas.unsigned_abs()))
        .collect();
    placement::Request {
        replicas: spec.replicas.max(0).unsigned_abs(),
        gpus_per_replica: spec.gpu.count,
        gpu_types: spec.gpu.types.clone(),
        providers: spec
            .placement
            .providers
            .iter()
            .map(|p| p.as_str().to_string())
            .collect(),
        regions: spec.placement.regions.clone(),
        capacity_types: spec
            .placement
            .capacity_types
            .iter()
            .map(|c| c.as_str().to_string())
            .collect(),
        strategy: match spec.placement.strategy {
            Strategy::Cost => placement::Strategy::Cost,
            Strategy::Balanced => placement::Strategy::Balanced,
        },
        spread: spec
            .placement
            .spread
            .iter()
            .map(|rule| placement::SpreadRule {
                by: match rule.by {
                    SpreadBy::Provider => placement::Level::Provider,
                    SpreadBy::Region => placement::Level::Region,
                    SpreadBy::Zone => placement::Level::Zone,
                    SpreadBy::Pool => placement::Level::Pool,
                },
                min_groups: rule.min_groups,
                max_share: rule.max_share,
            })
            .collect(),
        when_unsatisfiable: match spec.placement.when_unsatisfiable {
            WhenUnsatisfiable::ScheduleAnyway => placement::WhenUnsatisfiable::ScheduleAnyway,
            WhenUnsatisfiable::DoNotSchedule => placement::WhenUnsatisfiable::DoNotSchedule,
        },
        current,
    }
}
