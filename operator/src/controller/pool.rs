//! Keeps each GpuNodePool's observed status current: nodes, Ready nodes, GPUs, the
//! typed `lostSince` (every node lost since then) and `recoveredAt` (back since then,
//! which starts the ModelDeployments' rebalance clock), and the `Ready` condition
//! that says the same in words (`NodesLost`, `Recovered`). Marks the nodes an AKS
//! scheduled event removes (`interruption::mark`).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use outrigger_crds::{GpuNodePool, condition};

use super::apply::manager;
use super::{Context, Error};
use crate::{labels, status};

pub const CONTROLLER: &str = "gpunodepool";
/// Look again this often with no trigger.
const RECHECK: Duration = Duration::from_secs(300);

#[tracing::instrument(name = "reconcile", skip_all, fields(controller = CONTROLLER, object = pool.metadata.name.as_deref().unwrap_or_default()))]
pub async fn reconcile(pool: Arc<GpuNodePool>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_timer(CONTROLLER);
    let now = ctx.now();
    let inventory = ctx.stores.inventory(now);
    let name = pool.name_any();
    let Some(index) = inventory.pool_index(&name) else {
        return Ok(Action::await_change());
    };
    // An AKS scheduled event that removes a node (node-problem-detector's
    // VMEventScheduled condition): marked and cordoned like an AWS notice.
    for node in inventory.nodes_in(index) {
        if let Some(i) = node.interruption {
            super::interruption::mark(&ctx, &pool, node, i).await?;
        }
    }
    let counts = inventory.counts(index);
    let previous = pool
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let prior = previous.iter().find(|c| c.type_ == condition::READY);
    let current = pool.status.as_ref();
    let lost = counts.nodes - counts.ready_nodes - counts.booting_nodes;
    // Typed facts first: placement (here and in peers) reads these, never the words.
    let lost_since = if lost > 0 && counts.ready_nodes == 0 {
        inventory.pool_lost_since(index).map(Time)
    } else {
        None
    };
    let was_lost = current.is_some_and(|s| s.lost_since.is_some());
    let recovered_at = match (&lost_since, was_lost) {
        (Some(_), _) => None,
        (None, true) => Some(Time(now)),
        (None, false) => current.and_then(|s| s.recovered_at.clone()),
    };
    let ready = if lost_since.is_some() {
        status::condition(
            previous,
            condition::READY,
            false,
            labels::REASON_NODES_LOST,
            format!("all {lost} started nodes are NotReady or unreachable"),
            pool.metadata.generation,
            now,
        )
    } else if let Some(at) = &recovered_at {
        let mut c = status::condition(previous, condition::READY, true, labels::REASON_RECOVERED, "nodes are Ready again after all were lost; replicas return after each ModelDeployment's failover.rebalanceAfterSeconds".to_string(), pool.metadata.generation, now);
        c.last_transition_time = at.clone();
        c
    } else if counts.nodes == 0 {
        status::condition(
            previous,
            condition::READY,
            true,
            "NoNodes",
            "the pool has no nodes".to_string(),
            pool.metadata.generation,
            now,
        )
    } else {
        status::condition(
            previous,
            condition::READY,
            true,
            "NodesReady",
            format!(
                "{} of {} nodes Ready, {} booting",
                counts.ready_nodes, counts.nodes, counts.booting_nodes
            ),
            pool.metadata.generation,
            now,
        )
    };
    let unchanged = current.is_some_and(|s| {
        s.nodes == Some(counts.nodes)
            && s.ready_nodes == Some(counts.ready_nodes)
            && s.gpus.as_ref().is_some_and(|g| {
                g.allocatable == counts.allocatable && g.requested == counts.requested
            })
            && s.lost_since == lost_since
            && s.recovered_at == recovered_at
    }) && prior.is_some_and(|c| {
        c.status == ready.status && c.reason == ready.reason && c.message == ready.message
    });
    if unchanged {
        return Ok(Action::requeue(RECHECK));
    }
    // Owned by this controller's field manager: the scaler owns other status fields.
    ctx.applier
        .status::<GpuNodePool>(
            None,
            &name,
            manager::INVENTORY,
            serde_json::json!({
                "nodes": counts.nodes,
                "readyNodes": counts.ready_nodes,
                "gpus": {"allocatable": counts.allocatable, "requested": counts.requested},
                "lostSince": lost_since,
                "recoveredAt": recovered_at,
                "conditions": [ready],
            }),
        )
        .await?;
    Ok(Action::requeue(RECHECK))
}

#[tracing::instrument(name = "error_policy", skip_all, fields(controller = CONTROLLER, object = pool.metadata.name.as_deref().unwrap_or_default()))]
pub fn error_policy(pool: Arc<GpuNodePool>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_failed(CONTROLLER, error.category());
    tracing::warn!(%error, "pool status update failed; retrying in 5 s");
    Action::requeue(Duration::from_secs(5))
}
