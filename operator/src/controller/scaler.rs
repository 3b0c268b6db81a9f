//! Grows and shrinks each scalable GpuNodePool through its cloud: launches the
//! nodes the current plans need, returns empty nodes after a cool-down (cordon
//! first), terminates instances that never became Nodes, and on a capacity or quota
//! error blocks the pool's growth for a backoff, which the solver sees as less
//! capacity. Deleting a pool releases its instances (finalizer). Writes the pool
//! status `desiredNodes`, `cloudInstances`, `CapacityAvailable` and `CloudReachable`
//! with a field manager of its own.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{self, finalizer};
use kube::{Resource, ResourceExt};
use outrigger_crds::{GpuNodePool, condition};
use tokio::sync::Mutex;

use super::{Context, Error};
use crate::cloud::{CloudError, CloudProvider, Instance, Launch, Target};
use crate::scaling::{self, Backoff, NodeSeat};
use crate::status;

pub const CONTROLLER: &str = "scaler";
/// Its own field manager: `outrigger-inventory` owns the node counts and `Ready`.
const FIELD_MANAGER: &str = "outrigger-scaler";
/// On every pool with `scaling`: its instances are released before it goes.
pub const FINALIZER: &str = "outrigger.dev/cloud-instances";
/// On a Node the scaler cordoned to return it; an admin's cordon is left alone.
pub const SCALE_DOWN_ANNOTATION: &str = "outrigger.dev/scale-down";
/// Look again this often with nothing pending.
const RECHECK: Duration = Duration::from_secs(60);
/// While instances boot or nodes drain: often enough to notice within seconds.
const SOON: Duration = Duration::from_secs(2);

/// How the scaler paces itself.
#[derive(Debug, Clone)]
pub struct Settings {
    /// A node empty this long may be returned.
    pub cooldown: Duration,
    /// An instance that is not a Node this long after launch is a leak.
    pub boot_grace: Duration,
}

/// What this process remembers between reconciles (a restart starts afresh, which
/// only delays scale-down and leak collection).
#[derive(Default)]
pub struct Memory {
    empty_since: HashMap<String, Timestamp>,
    first_seen: HashMap<String, Timestamp>,
}

pub struct Scaler {
    pub settings: Settings,
    pub memory: Mutex<Memory>,
}

pub async fn reconcile(pool: Arc<GpuNodePool>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_timer(CONTROLLER);
    let api: Api<GpuNodePool> = Api::all(ctx.client.clone());
    let target = Target::of(&pool);
    let cloud = ctx.clouds.get(pool.spec.provider).cloned();
    let (Some(target), Some(cloud)) = (target.clone(), cloud) else {
        if target.is_none() && pool.finalizers().iter().any(|f| f == FINALIZER) {
            // `scaling` was removed: Outrigger no longer owns instances here.
            let _ = finalizer(&api, FINALIZER, pool, |_| async {
                Ok::<_, Error>(Action::await_change())
            })
            .await;
        } else if target.is_some() {
            let reachable = condition_for(
                &pool,
                condition::CLOUD_REACHABLE,
                false,
                "NotConfigured",
                format!(
                    "outrigger runs without {} credentials or endpoint; see docs/cloud.md",
                    pool.spec.provider
                ),
            );
            write_status(&ctx, &pool, None, None, vec![reachable]).await?;
        }
        return Ok(Action::await_change());
    };
    finalizer(&api, FINALIZER, pool, |event| async {
        match event {
            finalizer::Event::Apply(pool) => apply(pool, &ctx, cloud.as_ref(), &target).await,
            finalizer::Event::Cleanup(pool) => release(pool, &ctx, cloud.as_ref(), &target).await,
        }
    })
    .await
    .map_err(|e| match e {
        finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    })
}

fn condition_for(
    pool: &GpuNodePool,
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
) -> Condition {
    let previous = pool
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    status::condition(
        previous,
        type_,
        ok,
        reason,
        message,
        pool.metadata.generation,
        Timestamp::now(),
    )
}

fn current_condition<'a>(pool: &'a GpuNodePool, type_: &str) -> Option<&'a Condition> {
    pool.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

async fn apply(
    pool: Arc<GpuNodePool>,
    ctx: &Context,
    cloud: &dyn CloudProvider,
    target: &Target,
) -> Result<Action, Error> {
    let now = Timestamp::now();
    let name = pool.name_any();
    let inventory = ctx.stores.inventory();
    let Some(index) = inventory.pool_index(&name) else {
        return Ok(Action::await_change());
    };
    let instances = match cloud.instances(target).await {
        Ok(found) => found,
        Err(e) => return unreachable_cloud(ctx, &pool, &e).await,
    };
    let reachable = condition_for(
        &pool,
        condition::CLOUD_REACHABLE,
        true,
        "Reachable",
        format!("the {} API answers", pool.spec.provider),
    );
    let live: Vec<&Instance> = instances.iter().filter(|i| i.live()).collect();
    let have = u32::try_from(live.len()).unwrap_or(u32::MAX);
    let desired =
        scaling::nodes_needed(&inventory, index, pool.spec.nodes.min, pool.spec.nodes.max);

    // Growth, unless a capacity error blocks it.
    let backoff = Backoff::of(current_condition(&pool, condition::CAPACITY_AVAILABLE));
    let mut capacity = None;
    let mut launched = 0;
    let blocked_until = match backoff {
        Backoff::Blocked { until, .. } if until > now => Some(until),
        _ => None,
    };
    if desired > have && blocked_until.is_none() {
        let add = desired - have;
        let launch = Launch {
            have,
            add,
            token: scaling::launch_token(
                pool.uid().as_deref().unwrap_or(&name),
                &instances,
                have,
                add,
            ),
        };
        match cloud.launch(target, &launch).await {
            Ok(n) => {
                launched = n;
                tracing::info!(pool = %name, launched = n, have, desired, "scaler: launched instances");
                capacity = Some(condition_for(
                    &pool,
                    condition::CAPACITY_AVAILABLE,
                    true,
                    scaling::REASON_AVAILABLE,
                    format!(
                        "the last launch succeeded ({n} instances of {})",
                        pool.spec.instance_type
                    ),
                ));
            }
            Err(e) if e.blocks_growth() => {
                let seconds = backoff.next_seconds();
                let message = Backoff::blocked_message(&e, seconds, now);
                tracing::warn!(pool = %name, error = %e, seconds, "scaler: capacity error; pool growth blocked");
                publish(
                    ctx,
                    &pool,
                    EventType::Warning,
                    e.category(),
                    message.clone(),
                )
                .await;
                let mut c = condition_for(
                    &pool,
                    condition::CAPACITY_AVAILABLE,
                    false,
                    e.category(),
                    message,
                );
                // The backoff runs from this error, even after an earlier False.
                c.last_transition_time = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now);
                capacity = Some(c);
            }
            Err(e) => return unreachable_cloud(ctx, &pool, &e).await,
        }
    } else if blocked_until.is_none()
        && let Backoff::Blocked { seconds, .. } = backoff
    {
        capacity = Some(condition_for(
            &pool,
            condition::CAPACITY_AVAILABLE,
            true,
            scaling::REASON_BACKOFF_EXPIRED,
            Backoff::expired_message(seconds),
        ));
    } else if current_condition(&pool, condition::CAPACITY_AVAILABLE).is_none() {
        capacity = Some(condition_for(
            &pool,
            condition::CAPACITY_AVAILABLE,
            true,
            scaling::REASON_AVAILABLE,
            "no capacity error seen".to_string(),
        ));
    }

    // Shrinking: empty nodes after the cool-down; leaks after the boot grace.
    let selector = pool.node_selector();
    let nodes: Vec<Arc<Node>> = ctx
        .stores
        .nodes
        .state()
        .into_iter()
        .filter(|n| selector.iter().all(|(k, v)| n.labels().get(k) == Some(v)))
        .collect();
    let node_instances: BTreeMap<String, String> = nodes
        .iter()
        .filter_map(|n| {
            let provider_id = n.spec.as_ref()?.provider_id.as_deref()?;
            Some((
                n.name_any(),
                scaling::instance_of(provider_id, &instances)?.id.clone(),
            ))
        })
        .collect();
    let (seats, leaks) = {
        let mut memory = ctx.scaler.memory.lock().await;
        let mut seats = Vec::new();
        for n in &nodes {
            let node_name = n.name_any();
            let empty = inventory
                .nodes
                .iter()
                .find(|f| f.name == node_name)
                .is_none_or(|f| f.used.iter().all(|(owner, _)| owner.is_none()));
            let empty_since = if empty {
                Some(*memory.empty_since.entry(node_name.clone()).or_insert(now))
            } else {
                memory.empty_since.remove(&node_name);
                None
            };
            seats.push(NodeSeat {
                cordoned: n.annotations().contains_key(SCALE_DOWN_ANNOTATION),
                instance: node_instances.get(&node_name).cloned(),
                name: node_name,
                empty,
                empty_since,
            });
        }
        for i in &live {
            memory.first_seen.entry(i.id.clone()).or_insert(now);
        }
        let first_seen: BTreeMap<String, Timestamp> = live
            .iter()
            .filter_map(|i| Some((i.id.clone(), *memory.first_seen.get(&i.id)?)))
            .collect();
        let leaks = scaling::leaked(
            &instances,
            &node_instances,
            &first_seen,
            ctx.scaler.settings.boot_grace,
            now,
        );
        (seats, leaks)
    };
    let excess = have.saturating_sub(desired);
    let down = scaling::scale_down(&seats, excess, ctx.scaler.settings.cooldown, now);
    for node in &down.cordon {
        cordon(ctx, node, true).await?;
    }
    for node in &down.uncordon {
        cordon(ctx, node, false).await?;
    }
    let mut terminate = down.terminate.clone();
    terminate.extend(leaks.iter().cloned());
    if !terminate.is_empty() {
        if let Err(e) = cloud.terminate(target, &terminate).await {
            return unreachable_cloud(ctx, &pool, &e).await;
        }
        tracing::info!(pool = %name, ?terminate, leaked = leaks.len(), "scaler: terminated instances");
    }
    let terminated = u32::try_from(terminate.len()).unwrap_or(u32::MAX);
    let cloud_instances = (have + launched).saturating_sub(terminated);
    let mut conditions = vec![reachable];
    conditions.extend(capacity);
    write_status(ctx, &pool, Some(desired), Some(cloud_instances), conditions).await?;

    // Wake when something is due: instances booting, nodes draining, a cool-down
    // or a backoff ending.
    let booting = live
        .iter()
        .any(|i| !node_instances.values().any(|id| id == &i.id));
    let mut next =
        if booting || !down.cordon.is_empty() || !down.terminate.is_empty() || launched > 0 {
            SOON
        } else {
            RECHECK
        };
    let mut due = |t: Timestamp| {
        if let Ok(wait) = Duration::try_from(t.duration_since(now)) {
            next = next.min(wait.max(Duration::from_millis(500)));
        }
    };
    if let Some(until) = blocked_until {
        due(until);
    }
    if excess > 0 {
        let cooldown =
            SignedDuration::try_from(ctx.scaler.settings.cooldown).unwrap_or(SignedDuration::MAX);
        for seat in seats.iter().filter(|s| s.empty) {
            if let Some(since) = seat.empty_since {
                due(since + cooldown);
            }
        }
    }
    Ok(Action::requeue(next))
}

/// The pool is going: terminate everything it launched, and keep the finalizer
/// until the cloud lists nothing live.
async fn release(
    pool: Arc<GpuNodePool>,
    ctx: &Context,
    cloud: &dyn CloudProvider,
    target: &Target,
) -> Result<Action, Error> {
    let name = pool.name_any();
    let cloud_error = |source: CloudError| Error::Cloud {
        pool: name.clone(),
        source,
    };
    let instances = cloud.instances(target).await.map_err(cloud_error)?;
    let live: Vec<String> = instances
        .iter()
        .filter(|i| i.live())
        .map(|i| i.id.clone())
        .collect();
    if !live.is_empty() {
        cloud.terminate(target, &live).await.map_err(cloud_error)?;
        tracing::info!(pool = %name, terminated = live.len(), "scaler: pool deleted; instances released");
    }
    let left = cloud.instances(target).await.map_err(cloud_error)?;
    let running = left.iter().filter(|i| i.live()).count();
    if running > 0 {
        return Err(Error::Releasing {
            pool: name,
            running,
        });
    }
    let mut memory = ctx.scaler.memory.lock().await;
    for i in &instances {
        memory.first_seen.remove(&i.id);
    }
    Ok(Action::await_change())
}

async fn unreachable_cloud(
    ctx: &Context,
    pool: &GpuNodePool,
    e: &CloudError,
) -> Result<Action, Error> {
    tracing::warn!(pool = %pool.name_any(), error = %e, "scaler: cloud call failed");
    let reachable = condition_for(
        pool,
        condition::CLOUD_REACHABLE,
        false,
        e.category(),
        e.to_string(),
    );
    write_status(ctx, pool, None, None, vec![reachable]).await?;
    ctx.metrics.reconcile_failed(CONTROLLER, e.category());
    let wait = match e.kind {
        crate::cloud::ErrorKind::Throttled {
            retry_after: Some(after),
        } => after.max(SOON),
        _ => Duration::from_secs(15),
    };
    Ok(Action::requeue(wait))
}

/// Server-side applies the scaler's status fields, only when they differ.
async fn write_status(
    ctx: &Context,
    pool: &GpuNodePool,
    desired: Option<u32>,
    instances: Option<u32>,
    conditions: Vec<Condition>,
) -> Result<(), Error> {
    let status = pool.status.clone().unwrap_or_default();
    let same_condition = |c: &Condition| {
        status.conditions.iter().any(|o| {
            o.type_ == c.type_
                && o.status == c.status
                && o.reason == c.reason
                && o.message == c.message
                && o.last_transition_time == c.last_transition_time
        })
    };
    let unchanged = desired.is_none_or(|d| status.desired_nodes == Some(d))
        && instances.is_none_or(|i| status.cloud_instances == Some(i))
        && conditions.iter().all(same_condition);
    if unchanged {
        return Ok(());
    }
    // An apply claims exactly what it sends: carry the fields and conditions this
    // manager owns but does not set this time, so they are not dropped.
    let mut all = conditions;
    for type_ in [condition::CAPACITY_AVAILABLE, condition::CLOUD_REACHABLE] {
        if !all.iter().any(|c| c.type_ == type_)
            && let Some(c) = status.conditions.iter().find(|c| c.type_ == type_)
        {
            all.push(c.clone());
        }
    }
    let patch = serde_json::json!({
        "apiVersion": GpuNodePool::api_version(&()),
        "kind": GpuNodePool::kind(&()),
        "status": {
            "desiredNodes": desired.or(status.desired_nodes),
            "cloudInstances": instances.or(status.cloud_instances),
            "conditions": all,
        },
    });
    let name = pool.name_any();
    let api: Api<GpuNodePool> = Api::all(ctx.client.clone());
    api.patch_status(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(super::without_nulls(patch)),
    )
    .await
    .map_err(|source| Error::Status { name, source })?;
    ctx.metrics.wrote("gpunodepools/status", "apply");
    Ok(())
}

/// Cordons a node for removal (marking it as ours), or uncordons one we cordoned.
async fn cordon(ctx: &Context, node: &str, on: bool) -> Result<(), Error> {
    let patch = if on {
        serde_json::json!({"metadata": {"annotations": {SCALE_DOWN_ANNOTATION: Timestamp::now().to_string()}},
                           "spec": {"unschedulable": true}})
    } else {
        serde_json::json!({"metadata": {"annotations": {SCALE_DOWN_ANNOTATION: null}},
                           "spec": {"unschedulable": null}})
    };
    let api: Api<Node> = Api::all(ctx.client.clone());
    api.patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|source| Error::Apply {
            kind: "Node",
            name: node.to_string(),
            source,
        })?;
    ctx.metrics.wrote("nodes", "patch");
    tracing::info!(%node, cordoned = on, "scaler: node {}", if on { "cordoned for removal" } else { "uncordoned" });
    Ok(())
}

async fn publish(ctx: &Context, pool: &GpuNodePool, type_: EventType, reason: &str, note: String) {
    ctx.publish(&pool.object_ref(&()), "Scaling", type_, reason, note)
        .await;
}

pub fn error_policy(_: Arc<GpuNodePool>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_failed(CONTROLLER, error.category());
    tracing::warn!(%error, "scaler reconcile failed; retrying in 3 s");
    Action::requeue(Duration::from_secs(3))
}
