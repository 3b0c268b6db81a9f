//! The ModelDeployment controller, one pass per reconcile: observe (the inventory,
//! the pools as this deployment sees them, its plan) -> decide (`decide`, pure) ->
//! act (growth first, through the one applier) -> report (status, Events, metrics).
//! A pass with nothing to change writes nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use outrigger_crds::{ModelDeployment, condition};
use tokio::sync::Mutex;

use super::apply::{Applier, applied_hash, manager};
use super::{Context, Error, Stores};
use crate::observe::inventory::{Inventory, Key};
use crate::{inputs, labels, status, validate};

pub mod decide;
pub mod peers;

pub const CONTROLLER: &str = "modeldeployment";
/// The `Ready` reason of a ModelDeployment whose child the API server refused.
const APPLY_FAILED: &str = "ApplyFailed";

/// The ModelDeployment controller's own state, beside what all controllers share.
pub struct Ctx {
    pub shared: Arc<Context>,
    /// ModelDeployments moving off a lost pool, and since when its nodes were lost,
    /// until every replacement is Ready.
    pub failovers: Mutex<HashMap<Key, Timestamp>>,
    /// Each ModelDeployment's last plan and a digest of its solver input: a pass
    /// whose input is unchanged (say, only a pool it cannot use changed) does not
    /// solve again.
    pub plans: Mutex<outrigger_placement::Fleet<Key>>,
    /// The lost peers whose share each deployment took over (announced once per loss).
    pub took_over: Mutex<std::collections::HashSet<(Key, String, Timestamp)>>,
}

/// How soon a pass waiting for a peer's standing looks again.
const PEER_WAIT: Duration = Duration::from_secs(1);
/// Served by peers, a plan also reads pool counts, whose changes trigger no pass:
/// look again this often.
const PEER_RECHECK: Duration = Duration::from_secs(5);

impl Ctx {
    pub fn new(shared: Arc<Context>) -> Ctx {
        Ctx {
            shared,
            failovers: Mutex::default(),
            // The status quotes only a plan's typed words.
            plans: Mutex::new(outrigger_placement::Fleet::without_explanations()),
            took_over: Mutex::default(),
        }
    }
}

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
    ctx: Arc<Ctx>,
) -> Result<Action, Error> {
    let _timer = ctx.shared.metrics.reconcile_timer(CONTROLLER);
    match &guard.0 {
        Ok(md) => apply(md, &ctx).await,
        Err(invalid) => {
            report_invalid(&invalid.metadata, &invalid.error, None, &ctx.shared).await?;
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
    ctx: Arc<Ctx>,
) -> Action {
    ctx.shared
        .metrics
        .reconcile_failed(CONTROLLER, error.category());
    tracing::warn!(%error, "reconcile failed; retrying in 5 s");
    Action::requeue(Duration::from_secs(5))
}

fn key_of(md: &ModelDeployment) -> Key {
    (md.namespace().unwrap_or_default(), md.name_any())
}

async fn apply(md: &ModelDeployment, ctx: &Ctx) -> Result<Action, Error> {
    let key = key_of(md);
    if md.metadata.deletion_timestamp.is_some() {
        // Children carry owner references: the garbage collector removes them,
        // once a copy served with peers has handed its share over.
        ctx.plans.lock().await.forget(&key);
        if md.finalizers().iter().any(|f| f == peers::FINALIZER) {
            return hand_over(md, &key, &ctx.shared).await;
        }
        return Ok(Action::await_change());
    }
    let errors = validate::model_deployment(&md.spec);
    if !errors.is_empty() {
        let message: Vec<String> = errors.iter().map(ToString::to_string).collect();
        report_invalid(
            &md.metadata,
            &message.join("; "),
            md.status.as_ref().map(|s| s.conditions.as_slice()),
            &ctx.shared,
        )
        .await?;
        return Ok(Action::await_change());
    }

    // Observe: the facts this deployment's plan reads.
    let deciding = std::time::Instant::now();
    let shared = &ctx.shared;
    let name = format!("{}/{}", key.0, key.1);
    // As the API server holds them: a write of new ones triggers the next pass.
    shared.metrics.set_conditions(
        "ModelDeployment",
        &name,
        md.status
            .as_ref()
            .map(|s| s.conditions.as_slice())
            .unwrap_or_default(),
    );
    let now = shared.now();
    let inventory = shared.stores.inventory(now);
    let grace = Duration::from_secs(u64::from(md.spec.failover.unhealthy_after_seconds));
    let rebalance = Duration::from_secs(u64::from(md.spec.failover.rebalance_after_seconds));
    let observed = match &shared.peers {
        Some(peers) => peers::observe(md, &key, &inventory, peers, (grace, rebalance), now),
        None => peers::Observed::Alone,
    };
    let (view, current, ready, pools, cluster, differ, lost) = match observed {
        peers::Observed::Alone => (
            inventory.view(&key, grace, rebalance, now),
            inventory.current(&key),
            inventory.ready(&key),
            inventory.pool_refs(),
            None,
            None,
            Vec::new(),
        ),
        peers::Observed::Wait(peer) => {
            tracing::debug!(%peer, "waiting to hear from a peer before planning");
            return Ok(Action::requeue(PEER_WAIT));
        }
        peers::Observed::Peers { view, differ, lost } => (
            view.view,
            view.current,
            view.ready,
            view.pools,
            shared.peers.as_ref().map(|p| p.me.name.as_str()),
            Some(differ),
            lost,
        ),
    };
    // Every replica this cluster knows of, its lost peers' as last seen included:
    // over the spec for long means both sides of a partition serve it all.
    let running = current
        .values()
        .chain(lost.iter().map(|l| &l.replicas))
        .fold(0u32, |sum, n| sum.saturating_add(*n));
    shared.metrics.set_over_spec(
        &name,
        running.saturating_sub(md.spec.replicas.max(0).unsigned_abs()),
    );
    if cluster.is_some() && !md.finalizers().iter().any(|f| f == peers::FINALIZER) {
        // Served with peers: a deleted copy hands its share over before its replicas go.
        set_finalizer(md, &shared.applier, true).await?;
    }
    let mut request = inputs::request(md);
    request.current = current;
    // Solves only when the input changed: a pool this deployment cannot use does
    // not enter its digest beyond what makes it ineligible (placement::Fleet).
    let planned = ctx.plans.lock().await.plan(&key, &request, &view.pools);
    tracing::debug!(
        solved = planned.solved,
        current = ?request.current,
        plan = ?planned.plan.placements.iter().map(|p| (p.pool.as_str(), p.replicas)).collect::<Vec<_>>(),
        "planned"
    );
    let existing = existing(&key, &inventory, &shared.stores);
    let failing_over = ctx.failovers.lock().await.get(&key).copied();

    // Decide, without I/O.
    let mut decision = decide::decide(
        md,
        &decide::Facts {
            key: &key,
            cluster,
            inventory: &inventory,
            view: &view,
            plan: &planned.plan,
            pools: &pools,
            current: &request.current,
            ready: &ready,
            in_sync: differ.as_deref(),
            existing: &existing,
            failing_over,
            now,
        },
    );
    if cluster.is_some() {
        decision.requeue = decision.requeue.min(PEER_RECHECK);
        let mut took_over = ctx.took_over.lock().await;
        for gone in lost.iter().filter(|l| l.replicas > 0) {
            if took_over.insert((key.clone(), gone.peer.clone(), gone.since)) {
                decision.notes.push(decide::Note {
                    warning: true,
                    reason: "TookOverShare",
                    message: format!(
                        "cluster {} is lost (since {}, {:.1} s ago, unreachable for its unreachableAfterSeconds): its {} replica(s) are planned on the clusters that remain: {}",
                        gone.peer,
                        gone.since,
                        now.duration_since(gone.since).as_secs_f64(),
                        gone.replicas,
                        planned
                            .plan
                            .placements
                            .iter()
                            .map(|p| format!("{}={}", p.pool, p.replicas))
                            .collect::<Vec<_>>()
                            .join(" ")
                    ),
                });
            }
        }
    }

    tracing::debug!(writes = decision.writes(), "decided");
    shared
        .metrics
        .reconcile_phase(CONTROLLER, "decide", deciding.elapsed());
    let writing = std::time::Instant::now();

    // Act and report: the growing pools, the Service, the budget and the status go
    // out together; the pools that shrink, and deletes, once those are applied
    // (make before break). A pass that shrinks nothing is one round trip. After a
    // refused apply the status waits for the children, so a pass that is refused
    // again never overwrites the ApplyFailed condition with its own.
    let refused_before = md.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == condition::READY && c.reason == APPLY_FAILED)
    });
    let status = decision
        .status
        .as_ref()
        .map(|status| serde_json::to_value(status).expect("status serialises"));
    let status_write = status.map(|status| {
        shared
            .applier
            .status::<ModelDeployment>(Some(&key.0), &key.1, manager::CHILDREN, status)
    });
    let mut first: Vec<_> = decision
        .grow
        .iter()
        .map(|w| futures::future::Either::Left(write(shared, &key.0, w)))
        .collect();
    let mut last = None;
    if refused_before {
        last = status_write;
    } else {
        first.extend(status_write.map(futures::future::Either::Right));
    }
    let then = decision.then.iter().map(|w| write(shared, &key.0, w));
    // Every write of a step finishes (none is dropped in flight) before an error
    // is looked at, so the ApplyFailed condition is the last word.
    let all = |results: Vec<Result<(), Error>>| results.into_iter().collect::<Result<(), Error>>();
    let written = async {
        all(futures::future::join_all(first).await)?;
        all(futures::future::join_all(then).await)?;
        if let Some(status) = last {
            status.await?;
        }
        Ok::<(), Error>(())
    }
    .await;
    if decision.writes() > 0 {
        shared
            .metrics
            .reconcile_phase(CONTROLLER, "write", writing.elapsed());
    }
    if let Err(error) = written {
        // Refused for what the object says (invalid, forbidden, over a quota), not a
        // transient failure: a person has to act on it.
        if let Error::Apply {
            kind,
            name,
            source: kube::Error::Api(status),
        } = &error
            && matches!(status.code, 400 | 403 | 422)
        {
            report_apply_failed(md, kind, name, &status.message, shared).await?;
        }
        return Err(error);
    }
    // Events are best effort, and off the reconcile's path.
    let reference = md.object_ref(&());
    let notes = decision.notes.clone();
    let publisher = shared.clone();
    tokio::spawn(async move {
        for note in notes {
            let type_ = if note.warning {
                EventType::Warning
            } else {
                EventType::Normal
            };
            publish(&publisher, &reference, type_, note.reason, note.message).await;
        }
    });
    match decision.failover {
        decide::Failover::Unchanged => {}
        decide::Failover::Started(since) => {
            ctx.failovers.lock().await.insert(key.clone(), since);
        }
        decide::Failover::Ended(seconds) => {
            ctx.failovers.lock().await.remove(&key);
            shared.metrics.failover_seconds.observe(seconds);
        }
    }
    for (labels_, replicas) in decision.replicas {
        shared.metrics.set_replicas(labels_, replicas);
    }
    Ok(Action::requeue(decision.requeue))
}

/// A deleted copy served with peers: its replicas stay until the copies in the
/// other clusters have the deployment's replicas Ready (they plan without this
/// cluster once its copy is being deleted), then the finalizer goes and the garbage
/// collector removes the children. With no other copy served, or after
/// `peers::HAND_OVER_LIMIT`, it goes at once.
async fn hand_over(md: &ModelDeployment, key: &Key, shared: &Context) -> Result<Action, Error> {
    let now = shared.now();
    let since = md.metadata.deletion_timestamp.as_ref().map_or(now, |t| t.0);
    let handed = match shared.peers.as_ref() {
        // Not knowing the peers yet is not having none: wait.
        Some(p) if p.pending().is_some() || peers::waiting(p) => {
            return Ok(Action::requeue(PEER_WAIT));
        }
        Some(p) => peers::handover(key, p),
        None => peers::Handover::Nobody,
    };
    let waited = now.duration_since(since).as_secs_f64();
    let (done, note) = match handed {
        peers::Handover::Nobody => (true, None),
        peers::Handover::Ready { ready, clusters }
            if ready >= md.spec.replicas.max(0).unsigned_abs() =>
        {
            (
                true,
                Some((
                    EventType::Normal,
                    "HandedOver",
                    format!(
                        "this copy is deleted: {ready} replicas are Ready in {} after {waited:.1} s; removing this cluster's replicas",
                        clusters.join(", ")
                    ),
                )),
            )
        }
        peers::Handover::Ready { ready, .. } if waited >= peers::HAND_OVER_LIMIT.as_secs_f64() => (
            true,
            Some((
                EventType::Warning,
                "HandOverTimedOut",
                format!(
                    "this copy is deleted, but after {waited:.0} s the other clusters have only {ready} of {} replicas Ready; removing this cluster's replicas anyway",
                    md.spec.replicas
                ),
            )),
        ),
        peers::Handover::Ready { .. } => (false, None),
    };
    if !done {
        return Ok(Action::requeue(PEER_WAIT));
    }
    set_finalizer(md, &shared.applier, false).await?;
    if let Some((type_, reason, message)) = note {
        publish(shared, &md.object_ref(&()), type_, reason, message).await;
    }
    Ok(Action::await_change())
}

/// Adds or removes the peers finalizer, as a merge patch guarded by the
/// resourceVersion read (a conflict is retried).
async fn set_finalizer(md: &ModelDeployment, applier: &Applier, add: bool) -> Result<(), Error> {
    let mut finalizers: Vec<String> = md
        .finalizers()
        .iter()
        .filter(|f| f.as_str() != peers::FINALIZER)
        .cloned()
        .collect();
    if add {
        finalizers.push(peers::FINALIZER.to_string());
    }
    let api: kube::Api<ModelDeployment> = kube::Api::namespaced(
        applier.client().clone(),
        &md.namespace().unwrap_or_default(),
    );
    let patch = serde_json::json!({"metadata": {
        "finalizers": finalizers,
        "resourceVersion": md.resource_version(),
    }});
    api.patch(
        &md.name_any(),
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&patch),
    )
    .await
    .map_err(|source| Error::Finalizer(format!("ModelDeployment {}: {source}", md.name_any())))?;
    Ok(())
}

/// The children the caches hold for `key`.
fn existing(key: &Key, inventory: &Inventory, stores: &Stores) -> decide::Existing {
    let (ns, name) = key;
    // The Service and budget share the ModelDeployment's name; only ours count.
    let ours =
        |meta: &ObjectMeta| owned_by(meta, name).then(|| applied_hash(meta).map(str::to_string));
    decide::Existing {
        deployments: inventory
            .children_of(key)
            .map(|c| (c.pool.clone(), c.name.clone(), c.applied_hash.clone()))
            .collect(),
        service: stores
            .services
            .get(&ObjectRef::new(name).within(ns))
            .and_then(|s| ours(&s.metadata)),
        budget: stores
            .budgets
            .get(&ObjectRef::new(name).within(ns))
            .and_then(|b| ours(&b.metadata)),
    }
}

/// Performs one write; a child Deployment written is told to the stores, so the
/// next plan counts it before the watch brings it.
async fn write(shared: &Context, ns: &str, write: &decide::Write) -> Result<(), Error> {
    let applier = &shared.applier;
    match write {
        decide::Write::Deployment(d) => {
            let applied = applier.child(ns, d.as_ref()).await?;
            let name = d.metadata.name.as_deref().unwrap_or_default();
            shared.stores.wrote(ns, name, Some(applied), shared.now());
            Ok(())
        }
        decide::Write::Service(s) => applier.child(ns, s.as_ref()).await.map(drop),
        decide::Write::Budget(b) => applier.child(ns, b.as_ref()).await.map(drop),
        decide::Write::DeleteDeployment(name) => {
            applier.delete::<Deployment>(ns, name).await?;
            shared.stores.wrote(ns, name, None, shared.now());
            Ok(())
        }
        decide::Write::DeleteService(name) => applier.delete::<Service>(ns, name).await,
    }
}

fn owned_by(meta: &ObjectMeta, md: &str) -> bool {
    meta.labels
        .as_ref()
        .and_then(|l| l.get(labels::DEPLOYMENT))
        .is_some_and(|v| v == md)
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
        APPLY_FAILED,
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
        ctx.now(),
    );
    ctx.applier
        .status::<ModelDeployment>(
            Some(&ns),
            &name,
            manager::VALIDATION,
            serde_json::json!({"conditions": [condition]}),
        )
        .await?;
    let reference = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some(ModelDeployment::api_version(&()).to_string()),
        kind: Some(ModelDeployment::kind(&()).to_string()),
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
