//! The ModelDeployment controller: inventory -> validate -> solve -> build ->
//! apply -> status, one pass per reconcile. A pass with nothing to change writes
//! nothing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use outrigger_crds::{ModelDeployment, condition};
use outrigger_placement as placement;

use super::{Context, Error, without_nulls};
use crate::inventory::{Health, Inventory, Key};
use crate::{children, inputs, labels, status, validate};

pub const CONTROLLER: &str = "modeldeployment";
/// Look again this often with no trigger: other workloads' GPU use can change
/// without an event we watch.
const RECHECK: Duration = Duration::from_secs(60);
/// The field manager for the condition that reports an invalid spec or a refused child.
const VALIDATION_MANAGER: &str = "outrigger-validation";

/// The metadata of a watched ModelDeployment, valid or not.
fn meta_of(guard: &DeserializeGuard<ModelDeployment>) -> &ObjectMeta {
    match &guard.0 {
        Ok(md) => &md.metadata,
        Err(invalid) => &invalid.metadata,
    }
}

#[tracing::instrument(name = "reconcile", skip_all, fields(
    controller = CONTROLLER,
    namespace = meta_of(&guard).namespace.as_deref().unwrap_or_default(),
    object = meta_of(&guard).name.as_deref().unwrap_or_default(),
))]
pub async fn reconcile(
    guard: Arc<DeserializeGuard<ModelDeployment>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_timer(CONTROLLER);
    match &guard.0 {
        Ok(md) => apply(md, &ctx).await,
        Err(invalid) => {
            report_invalid(&invalid.metadata, &invalid.error, None, &ctx).await?;
            Ok(Action::await_change())
        }
    }
}

#[tracing::instrument(name = "error_policy", skip_all, fields(
    controller = CONTROLLER,
    namespace = meta_of(&guard).namespace.as_deref().unwrap_or_default(),
    object = meta_of(&guard).name.as_deref().unwrap_or_default(),
))]
pub fn error_policy(
    guard: Arc<DeserializeGuard<ModelDeployment>>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    ctx.metrics.reconcile_failed(CONTROLLER, error.category());
    tracing::warn!(%error, "reconcile failed; retrying in 5 s");
    Action::requeue(Duration::from_secs(5))
}

fn key_of(md: &ModelDeployment) -> Key {
    (md.namespace().unwrap_or_default(), md.name_any())
}

async fn apply(md: &ModelDeployment, ctx: &Context) -> Result<Action, Error> {
    let key = key_of(md);
    if md.metadata.deletion_timestamp.is_some() {
        // Children carry owner references: the garbage collector removes them.
        ctx.plans.lock().await.forget(&key);
        return Ok(Action::await_change());
    }
    let errors = validate::model_deployment(&md.spec);
    if !errors.is_empty() {
        let message: Vec<String> = errors.iter().map(ToString::to_string).collect();
        report_invalid(
            &md.metadata,
            &message.join("; "),
            md.status.as_ref().map(|s| s.conditions.as_slice()),
            ctx,
        )
        .await?;
        return Ok(Action::await_change());
    }

    let inventory = ctx.stores.inventory();
    let grace = Duration::from_secs(u64::from(md.spec.failover.unhealthy_after_seconds));
    let rebalance = Duration::from_secs(u64::from(md.spec.failover.rebalance_after_seconds));
    let view = inventory.view(&key, grace, rebalance);
    let mut request = inputs::request(md);
    request.current = inventory.current(&key);
    // Solves only when the input changed: a pool this deployment cannot use does
    // not enter its digest beyond what makes it ineligible (placement::Fleet).
    let planned = ctx.plans.lock().await.plan(&key, &request, &view.pools);
    let plan = planned.plan;
    tracing::debug!(
        namespace = %key.0, name = %key.1, solved = planned.solved,
        capacity = ?view.pools.iter().map(|p| (p.name.as_str(), p.capacity(request.gpus_per_replica), p.nodes.len(), p.growth_blocked)).collect::<Vec<_>>(),
        current = ?request.current,
        plan = ?plan.placements.iter().map(|p| (p.pool.as_str(), p.replicas)).collect::<Vec<_>>(),
        "planned"
    );
    let ready: BTreeMap<String, u32> = inventory
        .children_of(&key)
        .map(|c| (c.pool.clone(), c.ready))
        .collect();
    let targets = targets(&plan, &request.current, &ready, &view.health);

    if let Err(error) = apply_children(md, &key, &targets, &request.current, &inventory, ctx).await
    {
        // Refused for what the object says (invalid, forbidden, over a quota), not a
        // transient failure: a person has to act on it.
        if let Error::Apply {
            kind,
            name,
            source: kube::Error::Api(status),
        } = &error
            && matches!(status.code, 400 | 403 | 422)
        {
            report_apply_failed(md, kind, name, &status.message, ctx).await?;
        }
        return Err(error);
    }

    let applied: status::Applied = targets
        .iter()
        .map(|(pool, &n)| {
            (
                pool.clone(),
                (n, ready.get(pool).copied().unwrap_or(0).min(n)),
            )
        })
        .collect();
    let now = Timestamp::now();
    let desired = status::desired(md, &plan, &applied, &inventory.pools, now);
    announce(
        md,
        &key,
        &plan,
        &targets,
        &request.current,
        &view.health,
        &desired,
        ctx,
    )
    .await;
    write_status(md, &desired, ctx).await?;
    record_replicas(&key, &targets, &request.current, &inventory, ctx);

    let next = view
        .next_change
        .and_then(|t| Duration::try_from(t.duration_since(now)).ok())
        .map_or(RECHECK, |d| d.min(RECHECK) + Duration::from_millis(50));
    Ok(Action::requeue(next))
}

/// Replicas per pool to apply: the plan, except that while replacements are not
/// Ready yet a healthy pool the plan shrinks keeps its replicas (make before break).
/// A lost pool gives its replicas up at once.
pub fn targets(
    plan: &placement::Plan,
    current: &BTreeMap<String, u32>,
    ready: &BTreeMap<String, u32>,
    health: &BTreeMap<String, Health>,
) -> BTreeMap<String, u32> {
    let mut targets: BTreeMap<String, u32> = plan
        .placements
        .iter()
        .map(|p| (p.pool.clone(), p.replicas))
        .collect();
    let waiting = targets.iter().any(|(pool, &n)| {
        n > current.get(pool).copied().unwrap_or(0) && ready.get(pool).copied().unwrap_or(0) < n
    });
    if waiting {
        for (pool, &now) in current {
            let planned = targets.get(pool).copied().unwrap_or(0);
            if planned < now && health.get(pool) == Some(&Health::Healthy) {
                targets.insert(pool.clone(), now);
            }
        }
    }
    targets
}

fn apply_params() -> PatchParams {
    PatchParams::apply(labels::FIELD_MANAGER).force()
}

async fn apply_children(
    md: &ModelDeployment,
    key: &Key,
    targets: &BTreeMap<String, u32>,
    current: &BTreeMap<String, u32>,
    inventory: &Inventory,
    ctx: &Context,
) -> Result<(), Error> {
    let (ns, name) = key;
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    // Growing pools first, so replacements exist before anything shrinks.
    let mut order: Vec<(&String, &u32)> = targets.iter().filter(|(_, n)| **n > 0).collect();
    order.sort_by_key(|(pool, n)| {
        (
            **n <= current.get(*pool).copied().unwrap_or(0),
            (*pool).clone(),
        )
    });
    for (pool_name, &n) in order {
        let Some(pool) = inventory.pool_index(pool_name).map(|i| &inventory.pools[i]) else {
            continue;
        };
        let desired = children::deployment(md, pool, n);
        let existing = inventory
            .children_of(key)
            .find(|c| &c.pool == pool_name)
            .and_then(|c| c.applied_hash.clone());
        if existing.is_some() && existing == hash_of(&desired.metadata) {
            continue;
        }
        let child = desired.metadata.name.clone().unwrap_or_default();
        deployments
            .patch(&child, &apply_params(), &Patch::Apply(&desired))
            .await
            .map_err(|source| Error::Apply {
                kind: "Deployment",
                name: child.clone(),
                source,
            })?;
        ctx.metrics.wrote("deployments", "apply");
    }
    for child in inventory.children_of(key) {
        if targets.get(&child.pool).copied().unwrap_or(0) == 0 {
            match deployments
                .delete(&child.name, &DeleteParams::background())
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.is_not_found() => {}
                Err(source) => {
                    return Err(Error::Delete {
                        kind: "Deployment",
                        name: child.name.clone(),
                        source,
                    });
                }
            }
            ctx.metrics.wrote("deployments", "delete");
        }
    }

    let services: Api<Service> = Api::namespaced(ctx.client.clone(), ns);
    let existing = ctx.stores.services.find(|s| {
        s.metadata.namespace.as_ref() == Some(ns)
            && s.metadata.name.as_ref() == Some(name)
            && owned_by(&s.metadata, name)
    });
    match (children::service(md), existing) {
        (Some(desired), existing) => {
            if existing.is_none_or(|e| hash_of(&e.metadata) != hash_of(&desired.metadata)) {
                services
                    .patch(name, &apply_params(), &Patch::Apply(&desired))
                    .await
                    .map_err(|source| Error::Apply {
                        kind: "Service",
                        name: name.clone(),
                        source,
                    })?;
                ctx.metrics.wrote("services", "apply");
            }
        }
        (None, Some(_)) => {
            match services.delete(name, &DeleteParams::background()).await {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.is_not_found() => {}
                Err(source) => {
                    return Err(Error::Delete {
                        kind: "Service",
                        name: name.clone(),
                        source,
                    });
                }
            }
            ctx.metrics.wrote("services", "delete");
        }
        (None, None) => {}
    }

    let budgets: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), ns);
    let desired = children::disruption_budget(md);
    let existing = ctx.stores.budgets.find(|b| {
        b.metadata.namespace.as_ref() == Some(ns)
            && b.metadata.name.as_ref() == Some(name)
            && owned_by(&b.metadata, name)
    });
    if existing.is_none_or(|e| hash_of(&e.metadata) != hash_of(&desired.metadata)) {
        budgets
            .patch(name, &apply_params(), &Patch::Apply(&desired))
            .await
            .map_err(|source| Error::Apply {
                kind: "PodDisruptionBudget",
                name: name.clone(),
                source,
            })?;
        ctx.metrics.wrote("poddisruptionbudgets", "apply");
    }
    Ok(())
}

fn owned_by(meta: &ObjectMeta, md: &str) -> bool {
    meta.labels
        .as_ref()
        .and_then(|l| l.get(labels::DEPLOYMENT))
        .is_some_and(|v| v == md)
}

fn hash_of(meta: &ObjectMeta) -> Option<String> {
    meta.annotations
        .as_ref()?
        .get(labels::APPLIED_HASH)
        .cloned()
}

async fn write_status(
    md: &ModelDeployment,
    desired: &outrigger_crds::ModelDeploymentStatus,
    ctx: &Context,
) -> Result<(), Error> {
    let desired_json = without_nulls(serde_json::to_value(desired).expect("status serialises"));
    let current_json = md
        .status
        .as_ref()
        .map(|s| without_nulls(serde_json::to_value(s).expect("status serialises")));
    if current_json.as_ref() == Some(&desired_json) {
        return Ok(());
    }
    let api: Api<ModelDeployment> =
        Api::namespaced(ctx.client.clone(), &md.namespace().unwrap_or_default());
    let patch = serde_json::json!({
        "apiVersion": ModelDeployment::api_version(&()),
        "kind": ModelDeployment::kind(&()),
        "status": desired_json,
    });
    api.patch_status(&md.name_any(), &apply_params(), &Patch::Apply(&patch))
        .await
        .map_err(|source| Error::Status {
            name: md.name_any(),
            source,
        })?;
    ctx.metrics.wrote("modeldeployments/status", "apply");
    Ok(())
}

/// Marks a ModelDeployment whose child the API server refused: `Ready=False` with
/// reason `ApplyFailed` and the server's own message, and a Warning Event, once per
/// distinct message. The reconcile still fails, so it is retried with backoff.
async fn report_apply_failed(
    md: &ModelDeployment,
    kind: &str,
    child: &str,
    said: &str,
    ctx: &Context,
) -> Result<(), Error> {
    let message = format!(
        "the API server refused {kind} {child}: {said}; fix the ModelDeployment's spec (see kubectl describe md {})",
        md.name_any()
    );
    report_condition(
        &md.metadata,
        "ApplyFailed",
        &message,
        md.status.as_ref().map(|s| s.conditions.as_slice()),
        ctx,
    )
    .await
}

/// Marks a ModelDeployment whose spec cannot be used: `Ready=False` with reason
/// `InvalidSpec`, and a Warning Event. Its children are left as they are.
async fn report_invalid(
    meta: &ObjectMeta,
    message: &str,
    previous: Option<&[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]>,
    ctx: &Context,
) -> Result<(), Error> {
    report_condition(
        meta,
        "InvalidSpec",
        &format!("the spec cannot be used: {message}"),
        previous,
        ctx,
    )
    .await
}

/// `Ready=False` with `reason` and `message` (its own field manager, so the rest of
/// the status stays as the last pass wrote it), and a Warning Event with the same
/// reason; nothing when the condition already says so.
async fn report_condition(
    meta: &ObjectMeta,
    reason: &str,
    message: &str,
    previous: Option<&[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]>,
    ctx: &Context,
) -> Result<(), Error> {
    let name = meta.name.clone().unwrap_or_default();
    let ns = meta.namespace.clone().unwrap_or_default();
    let already = previous
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == condition::READY && c.reason == reason && c.message == message);
    if already {
        return Ok(());
    }
    tracing::warn!(namespace = %ns, name = %name, %reason, %message, "ModelDeployment not ready");
    let condition = status::condition(
        previous.unwrap_or_default(),
        condition::READY,
        false,
        reason,
        message.to_string(),
        meta.generation,
        Timestamp::now(),
    );
    let resource = ApiResource::erase::<ModelDeployment>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &ns, &resource);
    let patch = serde_json::json!({
        "apiVersion": resource.api_version,
        "kind": resource.kind,
        "status": {"conditions": [condition]},
    });
    api.patch_status(
        &name,
        &PatchParams::apply(VALIDATION_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(|source| Error::Status {
        name: name.clone(),
        source,
    })?;
    ctx.metrics.wrote("modeldeployments/status", "apply");
    let reference = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some(resource.api_version.clone()),
        kind: Some(resource.kind.clone()),
        name: Some(name),
        namespace: Some(ns),
        uid: meta.uid.clone(),
        ..Default::default()
    };
    publish(
        ctx,
        &reference,
        EventType::Warning,
        reason,
        message.to_string(),
    )
    .await;
    Ok(())
}

async fn publish(
    ctx: &Context,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    type_: EventType,
    reason: &str,
    note: String,
) {
    ctx.publish(reference, "Placing", type_, reason, note).await;
}

fn describe(counts: &BTreeMap<String, u32>) -> String {
    let parts: Vec<String> = counts
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(p, n)| format!("{p}={n}"))
        .collect();
    if parts.is_empty() {
        "nothing".to_string()
    } else {
        parts.join(" ")
    }
}

/// Events for what changed, and the failover clock.
#[allow(clippy::too_many_arguments)]
async fn announce(
    md: &ModelDeployment,
    key: &Key,
    plan: &placement::Plan,
    targets: &BTreeMap<String, u32>,
    current: &BTreeMap<String, u32>,
    health: &BTreeMap<String, Health>,
    desired: &outrigger_crds::ModelDeploymentStatus,
    ctx: &Context,
) {
    let reference = md.object_ref(&());
    let now = Timestamp::now();
    let lost: Vec<(&String, Timestamp)> = current
        .iter()
        .filter(|(_, n)| **n > 0)
        .filter_map(|(pool, _)| match health.get(pool) {
            Some(Health::Unhealthy { lost_since }) => Some((pool, *lost_since)),
            _ => None,
        })
        .collect();
    if let Some(since) = lost.iter().map(|(_, t)| *t).min() {
        let mut failovers = ctx.failovers.lock().await;
        if !failovers.contains_key(key) {
            failovers.insert(key.clone(), since);
            let pools: Vec<&str> = lost.iter().map(|(p, _)| p.as_str()).collect();
            publish(
                ctx,
                &reference,
                EventType::Warning,
                "FailingOver",
                format!(
                    "pool(s) {} lost their nodes; moving replicas: {} -> {}",
                    pools.join(", "),
                    describe(current),
                    describe(targets)
                ),
            )
            .await;
        }
    } else if targets != current {
        let reason = if current.is_empty() {
            "Placed"
        } else {
            "Rescheduled"
        };
        publish(
            ctx,
            &reference,
            EventType::Normal,
            reason,
            format!("{} (was {})", describe(targets), describe(current)),
        )
        .await;
    }
    let was_diversified = md.status.as_ref().and_then(|s| {
        s.conditions
            .iter()
            .find(|c| c.type_ == condition::DIVERSIFIED)
            .map(|c| c.status == "True")
    });
    if !plan.diversified && was_diversified != Some(false) {
        let message = desired
            .conditions
            .iter()
            .find(|c| c.type_ == condition::DIVERSIFIED)
            .map(|c| c.message.clone())
            .unwrap_or_default();
        publish(ctx, &reference, EventType::Warning, "RulesNotMet", message).await;
    }
    let all_ready = desired.ready_replicas >= Some(md.spec.replicas) && plan.unplaced == 0;
    if all_ready && lost.is_empty() {
        let started = ctx.failovers.lock().await.remove(key);
        if let Some(since) = started {
            let seconds = now.duration_since(since).as_secs_f64();
            ctx.metrics.failover_seconds.observe(seconds);
            publish(ctx, &reference, EventType::Normal, "FailedOver", format!("every replica Ready again {seconds:.1} s after the lost pool's nodes went down: {}", describe(targets))).await;
        }
    }
}

fn record_replicas(
    key: &Key,
    targets: &BTreeMap<String, u32>,
    current: &BTreeMap<String, u32>,
    inventory: &Inventory,
    ctx: &Context,
) {
    let deployment = format!("{}/{}", key.0, key.1);
    for pool in current.keys().chain(targets.keys()) {
        let provider = inventory
            .pool_index(pool)
            .map_or("unknown", |i| inventory.pools[i].spec.provider.as_str());
        let labels_ = crate::telemetry::ReplicaLabels {
            deployment: deployment.clone(),
            provider: provider.to_string(),
            pool: pool.clone(),
        };
        ctx.metrics
            .set_replicas(labels_, targets.get(pool).copied().unwrap_or(0));
    }
}
