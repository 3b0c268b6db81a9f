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
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{self, finalizer};
use kube::{Resource, ResourceExt};
use outrigger_crds::{CapacityBackoff, GpuNodePool, condition};
use tokio::sync::Mutex;

use super::apply::manager;
use super::{Context, Error};
use crate::cloud::{CloudError, CloudProvider, ErrorKind, Instance, Launch, Target};
use crate::observe::inventory::{Inventory, NodeFacts, Readiness};
use crate::scaling::{self, Backoff, NodeSeat, RepairState};
use crate::{labels, status};

pub const CONTROLLER: &str = "scaler";
/// On every pool with `scaling`: its instances are released before it goes.
pub const FINALIZER: &str = "outrigger.dev/cloud-instances";
/// Look again this often with nothing pending.
const RECHECK: Duration = Duration::from_secs(60);
/// While instances boot or nodes drain: often enough to notice within seconds.
const SOON: Duration = Duration::from_secs(2);

/// How the scaler paces itself.
#[derive(Debug, Clone)]
pub struct Settings {
    /// A node empty this long may be returned.
    pub cooldown: Duration,
    /// An instance that is not a Ready Node this long after launch failed to
    /// register (a pool's `registrationTimeoutSeconds` overrides it).
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

/// The scaler's own state, beside what all controllers share.
pub struct Ctx {
    pub shared: Arc<Context>,
    pub settings: Settings,
    pub memory: Mutex<Memory>,
}

impl Ctx {
    pub fn new(shared: Arc<Context>, settings: Settings) -> Ctx {
        Ctx {
            shared,
            settings,
            memory: Mutex::default(),
        }
    }
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
    async fn of(ctx: &Ctx, pool: &GpuNodePool) -> Written {
        if let Some(w) = ctx.memory.lock().await.written.get(&uid_of(pool)) {
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
        now: Timestamp,
    ) -> Condition {
        status::condition(
            &self.conditions,
            type_,
            ok,
            reason,
            message,
            pool.metadata.generation,
            now,
        )
    }
}

const OWN_CONDITIONS: [&str; 4] = [
    condition::CAPACITY_AVAILABLE,
    condition::CLOUD_REACHABLE,
    condition::CLOUD_RESOURCE_READY,
    condition::NODE_REPAIR,
];

fn uid_of(pool: &GpuNodePool) -> String {
    pool.uid().unwrap_or_else(|| pool.name_any())
}

#[tracing::instrument(name = "reconcile", skip_all, fields(controller = CONTROLLER, object = pool.metadata.name.as_deref().unwrap_or_default()))]
pub async fn reconcile(pool: Arc<GpuNodePool>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let _timer = ctx.shared.metrics.reconcile_timer(CONTROLLER);
    let api: Api<GpuNodePool> = Api::all(ctx.shared.applier.client().clone());
    let target = Target::of(&pool);
    let cloud = ctx.shared.clouds.get(pool.spec.provider).cloned();
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
                ctx.shared.now(),
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

/// What one pass will do to a pool, decided before any of it is done.
#[derive(Debug, Clone, PartialEq)]
pub struct Steps {
    /// Nodes the current plans need.
    pub desired: u32,
    /// Live instances now.
    pub have: u32,
    /// Instances to launch, unless a backoff blocks growth.
    pub launch: Option<Launch>,
    pub backoff: Backoff,
    /// The offering's backoff this pool takes on from elsewhere.
    pub adopted: Option<CapacityBackoff>,
    pub cordon: Vec<String>,
    pub uncordon: Vec<String>,
    /// Empty cordoned nodes' instances, then repairs, then registration timeouts.
    pub terminate: Vec<String>,
    /// Instances that did not become a Ready Node within the registration timeout.
    pub leaked: usize,
    /// Nodes NotReady past `repair.notReadyAfterSeconds`: (node, instance).
    pub repair: Vec<(String, String)>,
    pub repair_state: RepairState,
    /// Instances that are not Nodes yet.
    pub booting: bool,
    /// When something falls due with nothing else to trigger a pass: a backoff
    /// ending, an empty node's cool-down passing.
    pub due: Vec<Timestamp>,
}

/// Decides a pass over pool `index` of `inventory` and the `nodes` its selector
/// matches, given the cloud's `instances`,
/// what the scaler last wrote, and the time. Updates `memory`'s clocks (empty since,
/// first seen), and nothing else: no I/O.
#[allow(clippy::too_many_arguments)]
pub fn decide(
    pool: &GpuNodePool,
    inventory: &Inventory,
    index: usize,
    nodes: &[&NodeFacts],
    instances: &[Instance],
    before: &Written,
    memory: &mut Memory,
    settings: &Settings,
    now: Timestamp,
) -> Steps {
    let name = pool.name_any();
    let live: Vec<&Instance> = instances.iter().filter(|i| i.live()).collect();
    let have = u32::try_from(live.len()).unwrap_or(u32::MAX);
    let desired = scaling::nodes_needed(inventory, index, pool.spec.nodes.min, pool.spec.nodes.max);
    // The offering's backoff, when another pool's error or a spot interruption
    // started one that ends later than this pool's own: the same offering would
    // refuse this pool too.
    let adopted = inventory
        .offering_backoff(index)
        .filter(|b| b.until.0 > now)
        .filter(|b| {
            before
                .backoff
                .as_ref()
                .is_none_or(|own| own.until.0 < b.until.0)
        })
        .cloned();
    let backoff = Backoff::of(adopted.as_ref().or(before.backoff.as_ref()), now);
    let blocked = matches!(backoff, Backoff::Blocked { .. }) || inventory.offering_reclaimed(index);
    // A launch waits while instances fail to register: they count as a failed
    // launch first (the backoff decides whether to try again).
    let registration = pool
        .spec
        .registration_timeout_seconds
        .map_or(settings.boot_grace, |s| Duration::from_secs(u64::from(s)));
    let joined: BTreeMap<String, String> = nodes
        .iter()
        .filter(|n| n.readiness != Readiness::Booting)
        .filter_map(|n| {
            let instance = scaling::instance_of(n.provider_id.as_deref()?, instances)?;
            Some((n.name.clone(), instance.id.clone()))
        })
        .collect();
    for i in &live {
        memory.first_seen.entry(i.id.clone()).or_insert(now);
    }
    let first_seen: BTreeMap<String, Timestamp> = live
        .iter()
        .filter_map(|i| Some((i.id.clone(), *memory.first_seen.get(&i.id)?)))
        .collect();
    let leaks = scaling::leaked(instances, &joined, &first_seen, registration, now);
    let launch = (desired > have && !blocked && leaks.is_empty()).then(|| {
        let add = desired - have;
        Launch {
            have,
            add,
            token: scaling::launch_token(
                pool.uid().as_deref().unwrap_or(&name),
                instances,
                have,
                add,
            ),
        }
    });

    // Nodes of live instances only: a node whose instance is already going is
    // neither kept nor returned again.
    let node_instances: BTreeMap<String, String> = nodes
        .iter()
        .filter_map(|n| {
            let provider_id = n.provider_id.as_deref()?;
            let instance = scaling::instance_of(provider_id, instances).filter(|i| i.live())?;
            Some((n.name.clone(), instance.id.clone()))
        })
        .collect();
    let mut seats = Vec::new();
    for n in nodes.iter().copied() {
        let empty = n.runs_no_replica();
        let empty_since = if empty {
            Some(*memory.empty_since.entry(n.name.clone()).or_insert(now))
        } else {
            memory.empty_since.remove(&n.name);
            None
        };
        seats.push(NodeSeat {
            cordoned: n.cordoned,
            instance: node_instances.get(&n.name).cloned(),
            name: n.name.clone(),
            empty,
            empty_since,
        });
    }
    let (repair_state, repair, repair_due) =
        scaling::repairs(pool, inventory, nodes, &node_instances, now);
    let excess = have.saturating_sub(desired);
    let down = scaling::scale_down(&seats, excess, settings.cooldown, now);
    let mut due = Vec::new();
    if let Backoff::Blocked { until, .. } = backoff {
        due.push(until);
    }
    if excess > 0 {
        let cooldown = SignedDuration::try_from(settings.cooldown).unwrap_or(SignedDuration::MAX);
        due.extend(
            seats
                .iter()
                .filter(|s| s.empty)
                .filter_map(|s| s.empty_since)
                .map(|since| since + cooldown),
        );
    }
    due.extend(repair_due);
    let registration = SignedDuration::try_from(registration).unwrap_or(SignedDuration::MAX);
    due.extend(
        live.iter()
            .filter(|i| !joined.values().any(|id| id == &i.id))
            .filter_map(|i| first_seen.get(&i.id).map(|t| *t + registration)),
    );
    let mut terminate = down.terminate;
    for (_, instance) in &repair {
        if !terminate.contains(instance) {
            terminate.push(instance.clone());
        }
    }
    terminate.extend(
        leaks
            .iter()
            .filter(|i| !terminate.contains(i))
            .cloned()
            .collect::<Vec<_>>(),
    );
    Steps {
        desired,
        have,
        launch,
        backoff,
        adopted,
        cordon: down.cordon,
        uncordon: down.uncordon,
        terminate,
        leaked: leaks.len(),
        repair,
        repair_state,
        booting: live
            .iter()
            .any(|i| !node_instances.values().any(|id| id == &i.id)),
        due,
    }
}

/// What the launch's outcome means for the pool's status: the `CapacityAvailable`
/// condition to write (if any), the backoff record (`None`: as it was; `Some(None)`:
/// cleared), and a Warning Event for a capacity error.
pub struct LaunchReport {
    pub capacity: Option<Condition>,
    pub backoff: Option<Option<CapacityBackoff>>,
    pub warning: Option<(&'static str, String)>,
}

/// Pure: the report of a pass whose launch went as `outcome` says (`None`: no launch).
pub fn report_launch(
    pool: &GpuNodePool,
    steps: &Steps,
    outcome: Option<&Result<u32, CloudError>>,
    before: &Written,
    settings: &Settings,
    now: Timestamp,
) -> LaunchReport {
    let available = |reason: &str, message: String| {
        before.make(
            pool,
            condition::CAPACITY_AVAILABLE,
            true,
            reason,
            message,
            now,
        )
    };
    match outcome {
        Some(Ok(n)) => LaunchReport {
            capacity: Some(available(
                scaling::REASON_AVAILABLE,
                format!(
                    "the last launch succeeded ({n} instances of {})",
                    pool.spec.instance_type
                ),
            )),
            backoff: Some(None),
            warning: None,
        },
        Some(Err(e)) => {
            let seconds = steps
                .backoff
                .next_seconds(scaling::first_backoff(e, settings.backoff));
            let record = Backoff::record(pool, e, seconds, now);
            let message = Backoff::blocked_message(e, &record);
            let mut c = before.make(
                pool,
                condition::CAPACITY_AVAILABLE,
                false,
                e.category(),
                message.clone(),
                now,
            );
            // The backoff runs from this error, even after an earlier False.
            c.last_transition_time = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now);
            LaunchReport {
                capacity: Some(c),
                backoff: Some(Some(record)),
                warning: Some((e.category(), message)),
            }
        }
        None if steps.adopted.is_some() => {
            let record = steps.adopted.clone();
            let capacity = record.as_ref().map(|b| {
                before.make(
                    pool,
                    condition::CAPACITY_AVAILABLE,
                    false,
                    &b.reason,
                    format!(
                        "offering {} {} {} is in backoff until {} after {} (shared by every pool with it); the pool does not grow until then",
                        b.offering.instance_type,
                        b.offering.zone.as_deref().unwrap_or("(no zone)"),
                        b.offering.capacity_type.as_str(),
                        b.until.0,
                        b.code
                    ),
                    now,
                )
            });
            LaunchReport {
                capacity,
                backoff: Some(record),
                warning: None,
            }
        }
        None => {
            let was_false = before
                .condition(condition::CAPACITY_AVAILABLE)
                .is_some_and(|c| c.status == "False");
            let capacity = match steps.backoff {
                Backoff::Expired { seconds } if was_false => Some(available(
                    scaling::REASON_BACKOFF_EXPIRED,
                    Backoff::expired_message(seconds),
                )),
                _ if before.condition(condition::CAPACITY_AVAILABLE).is_none() => Some(available(
                    scaling::REASON_AVAILABLE,
                    "no capacity error seen".to_string(),
                )),
                _ => None,
            };
            LaunchReport {
                capacity,
                backoff: None,
                warning: None,
            }
        }
    }
}

/// Observe, decide, execute, report.
async fn apply(
    pool: Arc<GpuNodePool>,
    ctx: &Ctx,
    cloud: &dyn CloudProvider,
    target: &Target,
) -> Result<Action, Error> {
    let shared = &ctx.shared;
    let now = shared.now();
    let name = pool.name_any();
    let inventory = shared.stores.inventory(now);
    let Some(index) = inventory.pool_index(&name) else {
        return Ok(Action::await_change());
    };
    let before = Written::of(ctx, &pool).await;
    let instances = match cloud.instances(target).await {
        Ok(found) => found,
        Err(e) => return unreachable_cloud(ctx, &pool, &before, &e).await,
    };
    // Every Node its selector matches, even one that counts for another pool in
    // placement: its instance is this pool's, never a leak.
    let nodes: Vec<&NodeFacts> = shared
        .stores
        .nodes
        .state()
        .iter()
        .filter(|n| pool.selects(n.labels()))
        .filter_map(|n| inventory.node(&n.name_any()))
        .collect();
    let steps = decide(
        &pool,
        &inventory,
        index,
        &nodes,
        &instances,
        &before,
        &mut *ctx.memory.lock().await,
        &ctx.settings,
        now,
    );

    // Execute: the launch (or, when instances failed to register, that failure),
    // then repairs and scale-down.
    let outcome = match &steps.launch {
        None if steps.leaked > 0 => {
            let timeout = pool
                .spec
                .registration_timeout_seconds
                .map_or(ctx.settings.boot_grace.as_secs(), u64::from);
            Some(Err(CloudError::new(
                ErrorKind::NotRegistered,
                "register",
                "RegistrationTimeout",
                format!(
                    "{} launched instance(s) did not become a Ready Node within {timeout} s (registrationTimeoutSeconds); terminated",
                    steps.leaked
                ),
            )))
        }
        Some(launch) => match cloud.launch(target, launch).await {
            Ok(n) => {
                tracing::info!(pool = %name, launched = n, have = steps.have, desired = steps.desired, "scaler: launched instances");
                Some(Ok(n))
            }
            Err(e) if e.blocks_growth() => {
                tracing::warn!(pool = %name, error = %e, "scaler: capacity error; pool growth blocked");
                Some(Err(e))
            }
            Err(e) => return unreachable_cloud(ctx, &pool, &before, &e).await,
        },
        None => None,
    };
    for (node, instance) in &steps.repair {
        let after = pool.spec.repair.unwrap_or_default().not_ready_after_seconds;
        tracing::warn!(pool = %name, %node, %instance, "scaler: repairing a node NotReady for {after} s");
        shared
            .metrics
            .repaired(pool.spec.provider.as_str(), "NotReady");
        publish(
            shared,
            &pool,
            EventType::Warning,
            "Repairing",
            format!(
                "node {node} has been NotReady for at least {after} s (repair.notReadyAfterSeconds): terminating its instance {instance}; the scaler launches a replacement"
            ),
        )
        .await;
    }
    for node in &steps.cordon {
        cordon(shared, node, true).await?;
    }
    // Drain what is being repaired: its kubelet is gone, so its pods go at once and
    // their ReplicaSets start them elsewhere.
    for (node, _) in &steps.repair {
        for pod in shared.stores.pods.state() {
            let here = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node);
            if let (true, Some(ns), Some(name)) = (
                here,
                pod.metadata.namespace.as_deref(),
                pod.metadata.name.as_deref(),
            ) {
                shared.applier.delete_pod_now(ns, name).await?;
            }
        }
    }
    for node in &steps.uncordon {
        cordon(shared, node, false).await?;
    }
    if !steps.terminate.is_empty() {
        if let Err(e) = cloud.terminate(target, &steps.terminate).await {
            return unreachable_cloud(ctx, &pool, &before, &e).await;
        }
        tracing::info!(pool = %name, terminate = ?steps.terminate, leaked = steps.leaked, "scaler: terminated instances");
    }

    // Report.
    let report = report_launch(&pool, &steps, outcome.as_ref(), &before, &ctx.settings, now);
    if let Some((reason, message)) = &report.warning {
        publish(shared, &pool, EventType::Warning, reason, message.clone()).await;
    }
    let launched = match outcome {
        Some(Ok(n)) => n,
        _ => 0,
    };
    let terminated = u32::try_from(steps.terminate.len()).unwrap_or(u32::MAX);
    let mut conditions = vec![
        reachable(&pool, &before, now),
        repair_condition(&pool, &steps, &before, now),
    ];
    // Once reported busy, the resource is reported ready again.
    if before.condition(condition::CLOUD_RESOURCE_READY).is_some() {
        conditions.push(before.make(
            &pool,
            condition::CLOUD_RESOURCE_READY,
            true,
            "Accepted",
            "the pool's cloud resource takes changes again".to_string(),
            now,
        ));
    }
    conditions.extend(report.capacity);
    write_status(
        ctx,
        &pool,
        &before,
        Update {
            desired: Some(steps.desired),
            instances: Some((steps.have + launched).saturating_sub(terminated)),
            backoff: report.backoff,
            conditions,
        },
    )
    .await?;

    // Wake when something is due: instances booting, nodes draining, a cool-down
    // or a backoff ending.
    let busy = steps.booting || !steps.cordon.is_empty() || terminated > 0 || launched > 0;
    let mut next = if busy { SOON } else { RECHECK };
    for t in &steps.due {
        if let Ok(wait) = Duration::try_from(t.duration_since(now)) {
            next = next.min(wait.max(Duration::from_millis(500)));
        }
    }
    Ok(Action::requeue(next))
}

/// `NodeRepair`: whether broken nodes are replaced now, and why not.
fn repair_condition(
    pool: &GpuNodePool,
    steps: &Steps,
    before: &Written,
    now: Timestamp,
) -> Condition {
    let (ok, reason, message) = match &steps.repair_state {
        RepairState::Off => (
            false,
            "Disabled",
            "repair.notReadyAfterSeconds is 0: broken nodes are not replaced".to_string(),
        ),
        RepairState::Allowed { after } => (
            true,
            "Allowed",
            format!("a node NotReady for {after} s is terminated and replaced"),
        ),
        RepairState::Outage { region } => (
            false,
            "ProviderOutage",
            format!(
                "a pool of {region} has lost all its nodes: that is an outage, so no node is repaired until it ends"
            ),
        ),
        RepairState::TooManyUnhealthy { unhealthy, nodes } => (
            false,
            "TooManyUnhealthy",
            format!(
                "{unhealthy} of {nodes} nodes are unhealthy (more than one and more than 20%): no node is repaired while so many are"
            ),
        ),
    };
    before.make(pool, condition::NODE_REPAIR, ok, reason, message, now)
}

/// The pool is going: terminate everything it launched, and keep the finalizer
/// until the cloud lists nothing live.
async fn release(
    pool: Arc<GpuNodePool>,
    ctx: &Ctx,
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
    let mut memory = ctx.memory.lock().await;
    for i in &instances {
        memory.first_seen.remove(&i.id);
    }
    memory.written.remove(&uid_of(&pool));
    Ok(Action::await_change())
}

fn reachable(pool: &GpuNodePool, before: &Written, now: Timestamp) -> Condition {
    before.make(
        pool,
        condition::CLOUD_REACHABLE,
        true,
        "Reachable",
        format!("the {} API answers", pool.spec.provider),
        now,
    )
}

async fn unreachable_cloud(
    ctx: &Ctx,
    pool: &GpuNodePool,
    before: &Written,
    e: &CloudError,
) -> Result<Action, Error> {
    tracing::warn!(pool = %pool.name_any(), error = %e, "scaler: cloud call failed");
    let now = ctx.shared.now();
    let conditions = if e.kind == crate::cloud::ErrorKind::Conflict {
        // The cloud answered: its resource is busy or changed by someone else.
        vec![
            reachable(pool, before, now),
            before.make(
                pool,
                condition::CLOUD_RESOURCE_READY,
                false,
                &e.code,
                e.message.clone(),
                now,
            ),
        ]
    } else {
        vec![before.make(
            pool,
            condition::CLOUD_REACHABLE,
            false,
            e.category(),
            e.to_string(),
            now,
        )]
    };
    write_status(ctx, pool, before, Update::conditions(conditions)).await?;
    ctx.shared
        .metrics
        .reconcile_failed(CONTROLLER, e.category());
    let wait = match e.kind {
        crate::cloud::ErrorKind::Throttled {
            retry_after: Some(after),
        } => after.max(SOON),
        _ => Duration::from_secs(15),
    };
    Ok(Action::requeue(wait))
}

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

/// Server-side applies the scaler's status fields, only when they differ from what
/// it wrote last. An apply claims exactly what it sends, so the fields and
/// conditions not set this time are sent as they were.
async fn write_status(
    ctx: &Ctx,
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
    ctx.shared
        .applier
        .status::<GpuNodePool>(
            None,
            &pool.name_any(),
            manager::SCALER,
            serde_json::json!({
                "desiredNodes": after.desired,
                "cloudInstances": after.instances,
                "capacityBackoff": after.backoff,
                "conditions": after.conditions,
            }),
        )
        .await?;
    ctx.memory.lock().await.written.insert(uid_of(pool), after);
    Ok(())
}

/// Cordons a node for removal (marking it as ours), or uncordons one we cordoned.
async fn cordon(ctx: &Context, node: &str, on: bool) -> Result<(), Error> {
    let patch = if on {
        serde_json::json!({"metadata": {"annotations": {labels::SCALE_DOWN: ctx.now().to_string()}},
                           "spec": {"unschedulable": true}})
    } else {
        serde_json::json!({"metadata": {"annotations": {labels::SCALE_DOWN: null}},
                           "spec": {"unschedulable": null}})
    };
    // A Node that is gone: its instance went and the registrar or the cloud
    // controller removed it.
    if ctx.applier.merge::<Node>(node, &patch).await? {
        tracing::info!(%node, cordoned = on, "scaler: node {}", if on { "cordoned for removal" } else { "uncordoned" });
    }
    Ok(())
}

async fn publish(ctx: &Context, pool: &GpuNodePool, type_: EventType, reason: &str, note: String) {
    ctx.publish(&pool.object_ref(&()), "Scaling", type_, reason, note)
        .await;
}

#[tracing::instrument(name = "error_policy", skip_all, fields(controller = CONTROLLER, object = pool.metadata.name.as_deref().unwrap_or_default()))]
pub fn error_policy(pool: Arc<GpuNodePool>, error: &Error, ctx: Arc<Ctx>) -> Action {
    ctx.shared
        .metrics
        .reconcile_failed(CONTROLLER, error.category());
    tracing::warn!(%error, "scaler reconcile failed; retrying in 3 s");
    Action::requeue(Duration::from_secs(3))
}
