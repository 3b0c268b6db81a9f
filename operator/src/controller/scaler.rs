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
use outrigger_crds::{CapacityBackoff, GpuNodePool, condition};
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
    /// A pool's growth pauses this long after a capacity or quota error, doubling
    /// while the errors repeat.
    pub backoff: Duration,
}

/// What this process remembers between reconciles (a restart starts afresh, which
/// only delays scale-down and leak collection).
#[derive(Default)]
pub struct Memory {
    empty_since: HashMap<String, Timestamp>,
    first_seen: HashMap<String, Timestamp>,
    /// What the scaler last wrote to each pool's status, by pool uid.
    written: HashMap<String, Written>,
}

/// The status fields the scaler owns, as it last wrote them, or after a start as
/// the pool's status has them. Decisions read this, not the store: a reconcile can
/// run before the store holds the scaler's own last write, and must neither
/// undo it (a stale `CapacityAvailable=True` over a fresh `False`) nor repeat the
/// call that caused it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Written {
    desired: Option<u32>,
    instances: Option<u32>,
    backoff: Option<CapacityBackoff>,
    conditions: Vec<Condition>,
}

impl Written {
    async fn of(ctx: &Context, pool: &GpuNodePool) -> Written {
        if let Some(w) = ctx.scaler.memory.lock().await.written.get(&uid_of(pool)) {
            return w.clone();
        }
        let status = pool.status.clone().unwrap_or_default();
        let mut conditions: Vec<Condition> = status
            .conditions
            .into_iter()
            .filter(|c| OWN_CONDITIONS.contains(&c.type_.as_str()))
            .collect();
        conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
        Written {
            desired: status.desired_nodes,
            instances: status.cloud_instances,
            backoff: status.capacity_backoff,
            conditions,
        }
    }

    fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }

    /// A condition of the scaler's, keeping its transition time if the status is
    /// unchanged.
    fn make(
        &self,
        pool: &GpuNodePool,
        type_: &str,
        ok: bool,
        reason: &str,
        message: String,
    ) -> Condition {
        status::condition(
            &self.conditions,
            type_,
            ok,
            reason,
            message,
            pool.metadata.generation,
            Timestamp::now(),
        )
    }
}

const OWN_CONDITIONS: [&str; 2] = [condition::CAPACITY_AVAILABLE, condition::CLOUD_REACHABLE];

fn uid_of(pool: &GpuNodePool) -> String {
    pool.uid().unwrap_or_else(|| pool.name_any())
}

pub struct Scaler {
    pub settings: Settings,
    pub memory: Mutex<Memory>,
}

#[tracing::instrument(name = "reconcile", skip_all, fields(controller = CONTROLLER, object = pool.metadata.name.as_deref().unwrap_or_default()))]
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
            let before = Written::of(&ctx, &pool).await;
            let reachable = before.make(
                &pool,
                condition::CLOUD_REACHABLE,
                false,
                "NotConfigured",
                format!(
                    "outrigger runs without {} credentials or endpoint; see docs/cloud.md",
                    pool.spec.provider
                ),
            );
            write_status(&ctx, &pool, &before, Update::conditions(vec![reachable])).await?;
        }
        return Ok(Action::await_change());
    };
    let result = finalizer(&api, FINALIZER, pool, |event| async {
        match event {
            finalizer::Event::Apply(pool) => apply(pool, &ctx, cloud.as_ref(), &target).await,
            finalizer::Event::Cleanup(pool) => release(pool, &ctx, cloud.as_ref(), &target).await,
        }
    })
    .await;
    match result {
        Ok(action) => Ok(action),
        Err(finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e)) => Err(e),
        // The store lagged behind our own finalizer write, so the patch's test of
        // the old list failed: the watch event is on its way, look again shortly.
        Err(finalizer::Error::AddFinalizer(kube::Error::Api(e))) if e.code == 422 => {
            Ok(Action::requeue(Duration::from_millis(500)))
        }
        Err(other) => Err(Error::Finalizer(other.to_string())),
    }
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
    let before = Written::of(ctx, &pool).await;
    let instances = match cloud.instances(target).await {
        Ok(found) => found,
        Err(e) => return unreachable_cloud(ctx, &pool, &before, &e).await,
    };
    let reachable = before.make(
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
    let backoff = Backoff::of(before.backoff.as_ref(), now);
    let mut capacity = None;
    // `None`: the recorded backoff stays as it is.
    let mut backoff_after: Option<Option<CapacityBackoff>> = None;
    let mut launched = 0;
    let blocked_until = match backoff {
        Backoff::Blocked { until, .. } => Some(until),
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
                backoff_after = Some(None);
                tracing::info!(pool = %name, launched = n, have, desired, "scaler: launched instances");
                capacity = Some(before.make(
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
                let seconds = backoff.next_seconds(ctx.scaler.settings.backoff);
                let record = Backoff::record(&pool, &e, seconds, now);
                let message = Backoff::blocked_message(&e, &record);
                backoff_after = Some(Some(record));
                tracing::warn!(pool = %name, error = %e, seconds, "scaler: capacity error; pool growth blocked");
                publish(
                    ctx,
                    &pool,
                    EventType::Warning,
                    e.category(),
                    message.clone(),
                )
                .await;
                let mut c = before.make(
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
            Err(e) => return unreachable_cloud(ctx, &pool, &before, &e).await,
        }
    } else if let Backoff::Expired { seconds } = backoff
        && before
            .condition(condition::CAPACITY_AVAILABLE)
            .is_some_and(|c| c.status == "False")
    {
        capacity = Some(before.make(
            &pool,
            condition::CAPACITY_AVAILABLE,
            true,
            scaling::REASON_BACKOFF_EXPIRED,
            Backoff::expired_message(seconds),
        ));
    } else if before.condition(condition::CAPACITY_AVAILABLE).is_none() {
        capacity = Some(before.make(
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
    // Nodes of live instances only: a node whose instance is already going is
    // neither kept nor returned again.
    let node_instances: BTreeMap<String, String> = nodes
        .iter()
        .filter_map(|n| {
            let provider_id = n.spec.as_ref()?.provider_id.as_deref()?;
            let instance = scaling::instance_of(provider_id, &instances).filter(|i| i.live())?;
            Some((n.name_any(), instance.id.clone()))
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
            return unreachable_cloud(ctx, &pool, &before, &e).await;
        }
        tracing::info!(pool = %name, ?terminate, leaked = leaks.len(), "scaler: terminated instances");
    }
    let terminated = u32::try_from(terminate.len()).unwrap_or(u32::MAX);
    let cloud_instances = (have + launched).saturating_sub(terminated);
    let mut conditions = vec![reachable];
    conditions.extend(capacity);
    write_status(
        ctx,
        &pool,
        &before,
        Update {
            desired: Some(desired),
            instances: Some(cloud_instances),
            backoff: backoff_after,
            conditions,
        },
    )
    .await?;

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
    memory.written.remove(&uid_of(&pool));
    Ok(Action::await_change())
}

async fn unreachable_cloud(
    ctx: &Context,
    pool: &GpuNodePool,
    before: &Written,
    e: &CloudError,
) -> Result<Action, Error> {
    tracing::warn!(pool = %pool.name_any(), error = %e, "scaler: cloud call failed");
    let reachable = before.make(
        pool,
        condition::CLOUD_REACHABLE,
        false,
        e.category(),
        e.to_string(),
    );
    write_status(ctx, pool, before, Update::conditions(vec![reachable])).await?;
    ctx.metrics.reconcile_failed(CONTROLLER, e.category());
    let wait = match e.kind {
        crate::cloud::ErrorKind::Throttled {
            retry_after: Some(after),
        } => after.max(SOON),
        _ => Duration::from_secs(15),
    };
    Ok(Action::requeue(wait))
}

/// Server-side applies the scaler's status fields, only when they differ from what
/// it wrote last. An apply claims exactly what it sends, so the fields and
/// conditions not set this time are sent as they were.
/// What one pass changes in the scaler's part of the status; `None`s keep what was
/// written.
struct Update {
    desired: Option<u32>,
    instances: Option<u32>,
    /// `Some(None)` clears the backoff.
    backoff: Option<Option<CapacityBackoff>>,
    conditions: Vec<Condition>,
}

impl Update {
    fn conditions(conditions: Vec<Condition>) -> Update {
        Update {
            desired: None,
            instances: None,
            backoff: None,
            conditions,
        }
    }
}

async fn write_status(
    ctx: &Context,
    pool: &GpuNodePool,
    before: &Written,
    update: Update,
) -> Result<(), Error> {
    let mut after = Written {
        desired: update.desired.or(before.desired),
        instances: update.instances.or(before.instances),
        backoff: update.backoff.unwrap_or_else(|| before.backoff.clone()),
        conditions: update.conditions,
    };
    for c in &before.conditions {
        if !after.conditions.iter().any(|n| n.type_ == c.type_) {
            after.conditions.push(c.clone());
        }
    }
    after.conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
    if &after == before {
        return Ok(());
    }
    let patch = serde_json::json!({
        "apiVersion": GpuNodePool::api_version(&()),
        "kind": GpuNodePool::kind(&()),
        "status": {
            "desiredNodes": after.desired,
            "cloudInstances": after.instances,
            "capacityBackoff": after.backoff,
            "conditions": after.conditions,
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
    ctx.scaler
        .memory
        .lock()
        .await
        .written
        .insert(uid_of(pool), after);
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
    match api
        .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => {}
        // Its instance went and the registrar or the cloud controller removed it.
        Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
        Err(source) => {
            return Err(Error::Apply {
                kind: "Node",
                name: node.to_string(),
                source,
            });
        }
    }
    ctx.metrics.wrote("nodes", "patch");
    tracing::info!(%node, cordoned = on, "scaler: node {}", if on { "cordoned for removal" } else { "uncordoned" });
    Ok(())
}

async fn publish(ctx: &Context, pool: &GpuNodePool, type_: EventType, reason: &str, note: String) {
    ctx.publish(&pool.object_ref(&()), "Scaling", type_, reason, note)
        .await;
}

#[tracing::instrument(name = "error_policy", skip_all, fields(controller = CONTROLLER, object = pool.metadata.name.as_deref().unwrap_or_default()))]
pub fn error_policy(pool: Arc<GpuNodePool>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_failed(CONTROLLER, error.category());
    tracing::warn!(%error, "scaler reconcile failed; retrying in 3 s");
    Action::requeue(Duration::from_secs(3))
}
