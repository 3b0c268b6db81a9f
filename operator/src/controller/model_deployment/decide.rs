//! What one ModelDeployment pass should do, decided without I/O: from the
//! ModelDeployment, what the cluster holds (its children, the pools' health) and its
//! plan, the writes (growth first), the status, the Events and the failover clock.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use outrigger_crds::{ChildStatus, ModelDeployment, ModelDeploymentStatus, condition};
use outrigger_placement as placement;

use crate::controller::apply::{applied_hash, without_nulls};
use crate::observe::global::{PoolRef, qualified};
use crate::observe::inventory::{Health, Inventory, Key, View};
use crate::telemetry::ReplicaLabels;
use crate::{children, status};

/// Look again this often with no trigger: other workloads' GPU use can change
/// without an event we watch.
pub const RECHECK: Duration = Duration::from_secs(60);

/// The children of this ModelDeployment that exist, as the caches hold them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Existing {
    /// Per child Deployment: its pool, name and applied hash.
    pub deployments: Vec<(String, String, Option<String>)>,
    /// The applied hash of its Service, when it has one.
    pub service: Option<Option<String>>,
    /// The applied hash of its PodDisruptionBudget, when it has one.
    pub budget: Option<Option<String>>,
}

/// One write to the API server.
#[derive(Debug, Clone)]
pub enum Write {
    Deployment(Box<Deployment>),
    Service(Box<Service>),
    Budget(Box<PodDisruptionBudget>),
    DeleteDeployment(String),
    DeleteService(String),
}

/// An Event to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub warning: bool,
    pub reason: &'static str,
    pub message: String,
}

/// What happens to this ModelDeployment's failover clock.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Failover {
    Unchanged,
    /// A pool it runs on was lost at this time: the failover starts.
    Started(Timestamp),
    /// Every replica is Ready again, this many seconds after the loss.
    Ended(f64),
}

/// Everything one pass does.
#[derive(Debug, Clone)]
pub struct Decision {
    /// Applied first, together with the status: the pools that grow, so
    /// replacements exist before anything shrinks, and the Service and budget,
    /// which shrink nothing.
    pub grow: Vec<Write>,
    /// Then, together: pools that keep or shrink, and deletes.
    pub then: Vec<Write>,
    /// The status, when it differs from what the object has.
    pub status: Option<ModelDeploymentStatus>,
    pub notes: Vec<Note>,
    pub failover: Failover,
    /// The `outrigger_replicas` series to set.
    pub replicas: Vec<(ReplicaLabels, u32)>,
    pub requeue: Duration,
}

impl Decision {
    pub fn writes(&self) -> usize {
        self.grow.len() + self.then.len() + usize::from(self.status.is_some())
    }
}

/// What the pass knows about this ModelDeployment besides its object. Pools are
/// named as the plan names them: `cluster/pool` when peers serve it, else `pool`.
pub struct Facts<'a> {
    pub key: &'a Key,
    /// This cluster's name, when peers serve the deployment: only its own pools
    /// get children here.
    pub cluster: Option<&'a str>,
    pub inventory: &'a Inventory,
    pub view: &'a View,
    pub plan: &'a placement::Plan,
    /// Every pool the plan may name.
    pub pools: &'a BTreeMap<String, PoolRef>,
    /// Replicas per pool its children have now, in every cluster.
    pub current: &'a BTreeMap<String, u32>,
    /// Ready replicas per pool, in every cluster.
    pub ready: &'a BTreeMap<String, u32>,
    /// Served by peers: the clusters whose copy's spec differs from this one.
    pub in_sync: Option<&'a [String]>,
    pub existing: &'a Existing,
    /// Since when it has been failing over, if it is.
    pub failing_over: Option<Timestamp>,
    pub now: Timestamp,
}

pub fn decide(md: &ModelDeployment, facts: &Facts<'_>) -> Decision {
    let Facts {
        key,
        cluster,
        inventory,
        view,
        plan,
        pools,
        current,
        ready,
        in_sync,
        existing,
        failing_over,
        now,
    } = *facts;
    // A plan's pool name, as this cluster's own pool, if it is one.
    let local = |name: &'_ str| -> Option<String> {
        match cluster {
            None => Some(name.to_string()),
            Some(c) => name
                .strip_prefix(c)
                .and_then(|rest| rest.strip_prefix('/'))
                .map(str::to_string),
        }
    };
    let in_plan = |pool: &str| match cluster {
        None => pool.to_string(),
        Some(c) => qualified(c, pool),
    };
    let doomed_since: BTreeMap<String, (u32, Timestamp)> = inventory
        .doomed(key, now)
        .into_iter()
        .map(|(pool, d)| (in_plan(&pool), d))
        .collect();
    let doomed: BTreeMap<String, u32> = doomed_since
        .iter()
        .map(|(pool, (n, _))| (pool.clone(), *n))
        .collect();
    let (targets, released) = targets(plan, current, ready, &view.health, &doomed);

    let mut grow = Vec::new();
    let mut then = Vec::new();
    for (pool_name, &n) in targets.iter().filter(|(_, n)| **n > 0) {
        let Some(own) = local(pool_name) else {
            continue;
        };
        let Some(pool) = inventory.pool(&own) else {
            continue;
        };
        let desired = children::deployment(md, pool, n);
        let stored = existing
            .deployments
            .iter()
            .find(|(pool, _, _)| *pool == own)
            .and_then(|(_, _, hash)| hash.as_deref());
        if stored.is_some() && stored == applied_hash(&desired.metadata) {
            continue;
        }
        let write = Write::Deployment(Box::new(desired));
        if n > current.get(pool_name).copied().unwrap_or(0) {
            grow.push(write);
        } else {
            then.push(write);
        }
    }
    for (pool, name, _) in &existing.deployments {
        if targets.get(&in_plan(pool)).copied().unwrap_or(0) == 0 {
            then.push(Write::DeleteDeployment(name.clone()));
        }
    }
    match (children::service(md), &existing.service) {
        (Some(desired), stored) => {
            if stored
                .as_ref()
                .is_none_or(|h| h.as_deref() != applied_hash(&desired.metadata))
            {
                grow.push(Write::Service(Box::new(desired)));
            }
        }
        (None, Some(_)) => then.push(Write::DeleteService(key.1.clone())),
        (None, None) => {}
    }
    let budget = children::disruption_budget(md);
    if existing
        .budget
        .as_ref()
        .is_none_or(|h| h.as_deref() != applied_hash(&budget.metadata))
    {
        grow.push(Write::Budget(Box::new(budget)));
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
    let mut desired = status::desired(md, plan, &applied, pools, in_sync, now);
    desired.children = published_children(&applied, md.spec.gpu.count, local);
    let (notes, failover) = announce(
        md,
        plan,
        &targets,
        current,
        view,
        &desired,
        failing_over,
        now,
    );
    let status = (!same_status(md.status.as_ref(), &desired)).then_some(desired);
    let mut notes = notes;
    for (pool, &gone) in &released {
        let Some((n, noticed)) = doomed_since.get(pool) else {
            continue;
        };
        let shrinks =
            targets.get(pool).copied().unwrap_or(0) < current.get(pool).copied().unwrap_or(0);
        if gone > 0 && shrinks {
            notes.push(Note {
                warning: false,
                reason: "Replaced",
                message: format!(
                    "replacements Ready {:.1} s after the interruption notice: {gone} of the {n} replica(s) on interrupted nodes of pool {pool} go ({})",
                    now.duration_since(*noticed).as_secs_f64(),
                    describe(&targets)
                ),
            });
        }
    }

    let deployment = format!("{}/{}", key.0, key.1);
    let replicas = current
        .keys()
        .chain(targets.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .map(|pool| {
            let provider = pools
                .get(pool)
                .map_or("unknown", |p| p.pool.spec.provider.as_str());
            (
                ReplicaLabels {
                    deployment: deployment.clone(),
                    provider: provider.to_string(),
                    pool: pool.clone(),
                },
                targets.get(pool).copied().unwrap_or(0),
            )
        })
        .collect();
    let requeue = view
        .next_change
        .and_then(|t| Duration::try_from(t.duration_since(now)).ok())
        .map_or(RECHECK, |d| d.min(RECHECK) + Duration::from_millis(50));
    Decision {
        grow,
        then,
        status,
        notes,
        failover,
        replicas,
        requeue,
    }
}

/// This cluster's children of the deployment as its peers read them, by pool: what
/// each asks for once this pass's writes are done, and its Ready replicas up to
/// that. Published with the writes, not a pass after them, so a peer never counts
/// Ready replicas a shrink here has just given up (and hands a deleted copy's
/// share over too early).
fn published_children(
    applied: &status::Applied,
    gpus: u32,
    local: impl Fn(&str) -> Option<String>,
) -> Vec<ChildStatus> {
    let mut children: Vec<ChildStatus> = applied
        .iter()
        .filter(|(_, (n, _))| *n > 0)
        .filter_map(|(pool, &(n, ready))| {
            Some(ChildStatus {
                pool: local(pool)?,
                replicas: n,
                ready_replicas: ready,
                gpus_per_replica: gpus,
            })
        })
        .collect();
    children.sort_by(|a, b| a.pool.cmp(&b.pool));
    children
}

fn same_status(current: Option<&ModelDeploymentStatus>, desired: &ModelDeploymentStatus) -> bool {
    let json = |s: &ModelDeploymentStatus| {
        without_nulls(serde_json::to_value(s).expect("status serialises"))
    };
    current.is_some_and(|c| json(c) == json(desired))
}

/// Replicas per pool to apply: the plan, except that a healthy pool the plan
/// shrinks keeps Ready replicas while the pools the plan grows are short of Ready
/// ones (make before break): as many as they are short, so the Ready replicas
/// never fall under the plan's. Counting the growing pools by Ready replicas, not
/// by the replicas their children ask for, matters: a grown child's replicas are
/// written at once (here, or by a peer), and are Ready only later. A pool back
/// from an outage, until `rebalanceAfterSeconds`, counts no Ready replicas for
/// this: what it reports may predate the outage (a peer's cluster back shows the
/// children it had). A lost pool gives its replicas up at once.
///
/// Replicas on doomed nodes (`doomed`, per pool: an interruption notice came, the
/// deadline has not) count as Ready nowhere, and each stays, on top of the plan,
/// while the deployment is short of other Ready replicas: the replacement comes
/// first, wherever the plan puts it, even in the same pool. Also returns, per
/// pool, the doomed replicas let go (their replacements are Ready).
pub fn targets(
    plan: &placement::Plan,
    current: &BTreeMap<String, u32>,
    ready: &BTreeMap<String, u32>,
    health: &BTreeMap<String, Health>,
    doomed: &BTreeMap<String, u32>,
) -> (BTreeMap<String, u32>, BTreeMap<String, u32>) {
    let mut targets: BTreeMap<String, u32> = plan
        .placements
        .iter()
        .map(|p| (p.pool.clone(), p.replicas))
        .collect();
    let doomed_in = |pool: &str| doomed.get(pool).copied().unwrap_or(0);
    let ready_in = |pool: &str| match health.get(pool) {
        Some(Health::Recovering { .. }) => 0,
        _ => ready
            .get(pool)
            .copied()
            .unwrap_or(0)
            .saturating_sub(doomed_in(pool)),
    };
    let mut short: u32 = targets
        .iter()
        .map(|(pool, &n)| n.saturating_sub(ready_in(pool)))
        .sum();
    for (pool, &now) in current {
        if short == 0 {
            break;
        }
        let planned = targets.get(pool).copied().unwrap_or(0);
        if planned < now && health.get(pool) == Some(&Health::Healthy) {
            let spare = ready_in(pool).min(now).saturating_sub(planned);
            let keep = spare.min(short);
            if keep > 0 {
                short -= keep;
                targets.insert(pool.clone(), planned + keep);
            }
        }
    }
    let mut released = BTreeMap::new();
    for (pool, &n) in doomed {
        let keep = n.min(short);
        short -= keep;
        if keep > 0 {
            *targets.entry(pool.clone()).or_default() += keep;
        }
        released.insert(pool.clone(), n - keep);
    }
    (targets, released)
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

/// The Events for what changed, and the failover clock.
#[allow(clippy::too_many_arguments)]
fn announce(
    md: &ModelDeployment,
    plan: &placement::Plan,
    targets: &BTreeMap<String, u32>,
    current: &BTreeMap<String, u32>,
    view: &View,
    desired: &ModelDeploymentStatus,
    failing_over: Option<Timestamp>,
    now: Timestamp,
) -> (Vec<Note>, Failover) {
    let mut notes = Vec::new();
    let mut failover = Failover::Unchanged;
    let lost: Vec<(&String, Timestamp)> = current
        .iter()
        .filter(|(_, n)| **n > 0)
        .filter_map(|(pool, _)| match view.health.get(pool) {
            Some(Health::Unhealthy { lost_since }) => Some((pool, *lost_since)),
            _ => None,
        })
        .collect();
    if let Some(since) = lost.iter().map(|(_, t)| *t).min() {
        if failing_over.is_none() {
            failover = Failover::Started(since);
            let pools: Vec<&str> = lost.iter().map(|(p, _)| p.as_str()).collect();
            notes.push(Note {
                warning: true,
                reason: "FailingOver",
                message: format!(
                    "pool(s) {} lost their nodes; moving replicas: {} -> {}",
                    pools.join(", "),
                    describe(current),
                    describe(targets)
                ),
            });
        }
    } else if targets != current {
        notes.push(Note {
            warning: false,
            reason: if current.is_empty() {
                "Placed"
            } else {
                "Rescheduled"
            },
            message: format!("{} (was {})", describe(targets), describe(current)),
        });
    }
    let was_diversified = md.status.as_ref().and_then(|s| {
        s.conditions
            .iter()
            .find(|c| c.type_ == condition::DIVERSIFIED)
            .map(|c| c.status == "True")
    });
    if !plan.diversified && was_diversified != Some(false) {
        notes.push(Note {
            warning: true,
            reason: "RulesNotMet",
            message: desired
                .conditions
                .iter()
                .find(|c| c.type_ == condition::DIVERSIFIED)
                .map(|c| c.message.clone())
                .unwrap_or_default(),
        });
    }
    let all_ready = desired.ready_replicas >= Some(md.spec.replicas) && plan.unplaced == 0;
    if all_ready
        && lost.is_empty()
        && let Some(since) = failing_over
    {
        let seconds = now.duration_since(since).as_secs_f64();
        failover = Failover::Ended(seconds);
        notes.push(Note {
            warning: false,
            reason: "FailedOver",
            message: format!(
                "every replica Ready again {seconds:.1} s after the lost pool's nodes went down: {}",
                describe(targets)
            ),
        });
    }
    (notes, failover)
}

#[cfg(test)]
mod tests;
