//! The scaler's decisions, pure: how many nodes the current plans need in a pool,
//! which nodes to cordon and return, which instances failed to register, which
//! broken nodes to repair, and the capacity backoff that the pool's typed
//! `status.capacityBackoff` carries across restarts.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use outrigger_crds::{CapacityBackoff, GpuNodePool, Offering};

use crate::cloud::{CloudError, Instance};
use crate::observe::inventory::{Inventory, NodeFacts, Readiness};

/// The default first backoff after a capacity or quota error (`--capacity-backoff-seconds`):
/// long enough that a few reconciles do not hammer an offering that just said no,
/// short enough that a transient shortage costs little (Karpenter's
/// unavailable-offerings cache uses 3 min).
pub const BACKOFF_FIRST: Duration = Duration::from_secs(180);
/// Backoffs double while the errors repeat, up to ten times the first (30 min by default).
const BACKOFF_GROWTH: u64 = 10;
/// An Azure allocation failure in a zone lasts longer than a passing shortage: the
/// first backoff is five times the base (15 min by default).
const ZONAL_FACTOR: u32 = 5;
/// A quota whose limit is 0 changes only when someone raises it: twenty times the
/// base (1 h by default).
const ZERO_QUOTA_FACTOR: u32 = 20;

/// The first backoff after `error`, given `--capacity-backoff-seconds`: the base for
/// a capacity shortage (`InsufficientInstanceCapacity`), a quota reached or a
/// failed registration; longer for a zonal allocation failure and a quota of 0.
pub fn first_backoff(error: &CloudError, base: Duration) -> Duration {
    let zonal = matches!(
        error.code.as_str(),
        "ZonalAllocationFailed" | "AllocationFailed" | "OverconstrainedZonalAllocationRequest"
    );
    // How EC2 (`... your current vCPU limit of 0 allows ...`) and Azure
    // (`Current Limit: 0`) word a quota of 0.
    let zero_quota = error.kind == crate::cloud::ErrorKind::QuotaExceeded
        && (error.message.contains("limit of 0 ") || error.message.contains("Current Limit: 0,"));
    if zero_quota {
        base * ZERO_QUOTA_FACTOR
    } else if zonal {
        base * ZONAL_FACTOR
    } else {
        base
    }
}

/// Condition reasons of `CapacityAvailable`.
pub const REASON_AVAILABLE: &str = "CapacityAvailable";
pub const REASON_BACKOFF_EXPIRED: &str = "BackoffExpired";

/// Where the pool stands after capacity errors, read from its typed backoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backoff {
    /// No capacity error since the last successful launch.
    Clear,
    /// Growth blocked until `until`; the backoff that led there.
    Blocked { until: Timestamp, seconds: u64 },
    /// The last backoff (`seconds`) has passed; growing again, and a new error doubles it.
    Expired { seconds: u64 },
}

impl Backoff {
    /// The backoff a pool's status records, as of `now`.
    pub fn of(record: Option<&CapacityBackoff>, now: Timestamp) -> Backoff {
        match record {
            None => Backoff::Clear,
            Some(b) if b.until.0 > now => Backoff::Blocked {
                until: b.until.0,
                seconds: u64::from(b.seconds),
            },
            Some(b) => Backoff::Expired {
                seconds: u64::from(b.seconds),
            },
        }
    }

    /// The backoff after one more capacity error, given the first one.
    pub fn next_seconds(self, first: Duration) -> u64 {
        let first = first.as_secs().max(1);
        match self {
            Backoff::Clear => first,
            Backoff::Blocked { seconds, .. } | Backoff::Expired { seconds } => seconds
                .saturating_mul(2)
                .clamp(first, first.saturating_mul(BACKOFF_GROWTH)),
        }
    }

    /// The typed record of a new backoff of `seconds` from `since`, after `error`.
    pub fn record(
        pool: &GpuNodePool,
        error: &CloudError,
        seconds: u64,
        since: Timestamp,
    ) -> CapacityBackoff {
        // A backoff is at most ten times --capacity-backoff-seconds: a u32 holds it.
        let seconds = u32::try_from(seconds).unwrap_or(u32::MAX);
        CapacityBackoff {
            until: Time(since + SignedDuration::from_secs(i64::from(seconds))),
            seconds,
            reason: error.category().to_string(),
            code: error.code.clone(),
            offering: Offering {
                instance_type: pool.spec.instance_type.clone(),
                zone: pool.spec.zone.clone(),
                capacity_type: pool.spec.capacity_type,
            },
        }
    }

    /// The message of a blocked condition, for people.
    pub fn blocked_message(error: &CloudError, record: &CapacityBackoff) -> String {
        format!(
            "{} {}: {}; the pool does not grow until {} (backoff {}s)",
            error.code, error.operation, error.message, record.until.0, record.seconds
        )
    }

    pub fn expired_message(seconds: u64) -> String {
        format!(
            "the capacity backoff has passed; the pool may grow again (last backoff {seconds}s)"
        )
    }
}

/// Nodes the current plans need in pool `pool`: its children's replicas packed
/// first onto the Ready nodes' free GPUs (GPUs other workloads hold are not free),
/// largest first, then onto new nodes of `gpus_per_node`; the nodes that receive
/// a replica, clamped to `min..=max`.
pub fn nodes_needed(inventory: &Inventory, pool: usize, min: u32, max: u32) -> u32 {
    let spec = &inventory.pools[pool].spec;
    let name = inventory.pools[pool]
        .metadata
        .name
        .as_deref()
        .unwrap_or_default();
    let mut replicas: Vec<u32> = inventory
        .children_in(name)
        .filter(|c| c.gpus > 0)
        .flat_map(|c| std::iter::repeat_n(c.gpus, c.replicas as usize))
        .collect();
    replicas.sort_unstable_by(|a, b| b.cmp(a));
    let mut bins: Vec<(u32, bool)> = inventory
        .nodes_in(pool)
        .filter(|n| n.readiness == Readiness::Ready && !n.doomed())
        .map(|n| (n.allocatable.saturating_sub(n.others_gpus()), false))
        .collect();
    for gpus in replicas {
        match bins.iter_mut().find(|(free, _)| *free >= gpus) {
            Some(bin) => {
                bin.0 -= gpus;
                bin.1 = true;
            }
            None if spec.gpu.count >= gpus => bins.push((spec.gpu.count - gpus, true)),
            // A replica no node of this pool can hold: no node helps it.
            None => {}
        }
    }
    let used = u32::try_from(bins.iter().filter(|(_, used)| *used).count()).unwrap_or(u32::MAX);
    used.clamp(min, max.max(min))
}

/// Whether broken nodes may be replaced now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepairState {
    /// `repair.notReadyAfterSeconds: 0`.
    Off,
    /// Nodes NotReady this long are replaced.
    Allowed { after: u32 },
    /// A pool of the same provider and region has lost every node.
    Outage { region: String },
    /// More unhealthy nodes than one, and than 20% of the pool.
    TooManyUnhealthy { unhealthy: usize, nodes: usize },
}

/// Decides whether broken nodes may be repaired and which: nodes NotReady (not
/// doomed by an interruption, their instance live) for `repair.notReadyAfterSeconds`,
/// unless that would be churn in an outage.
pub fn repairs(
    pool: &GpuNodePool,
    inventory: &Inventory,
    nodes: &[&NodeFacts],
    node_instances: &BTreeMap<String, String>,
    now: Timestamp,
) -> (RepairState, Vec<(String, String)>, Vec<Timestamp>) {
    let after = pool.spec.repair.unwrap_or_default().not_ready_after_seconds;
    if after == 0 {
        return (RepairState::Off, Vec::new(), Vec::new());
    }
    let started = nodes
        .iter()
        .filter(|n| n.readiness != Readiness::Booting)
        .count();
    let unhealthy: Vec<&&NodeFacts> = nodes
        .iter()
        .filter(|n| n.lost_since().is_some() && !n.doomed())
        .collect();
    let lost_pool = inventory.pools.iter().enumerate().any(|(j, p)| {
        p.spec.provider == pool.spec.provider
            && p.spec.region == pool.spec.region
            && inventory.pool_lost_since(j).is_some()
    });
    if lost_pool {
        let region = format!("{} {}", pool.spec.provider, pool.spec.region);
        return (RepairState::Outage { region }, Vec::new(), Vec::new());
    }
    if unhealthy.len() > (started / 5).max(1) {
        let state = RepairState::TooManyUnhealthy {
            unhealthy: unhealthy.len(),
            nodes: started,
        };
        return (state, Vec::new(), Vec::new());
    }
    let wait = SignedDuration::from_secs(i64::from(after));
    let mut due = Vec::new();
    let mut chosen = Vec::new();
    for n in unhealthy {
        let Some(since) = n.lost_since() else {
            continue;
        };
        match node_instances.get(&n.name) {
            Some(instance) if since + wait <= now => {
                chosen.push((n.name.clone(), instance.clone()));
            }
            Some(_) => due.push(since + wait),
            None => {}
        }
    }
    (RepairState::Allowed { after }, chosen, due)
}

/// The idempotency token of a launch: the same pool, the same instances and the
/// same request give the same token, so a launch repeated after a crash or a
/// timeout returns the first one's instances instead of launching more. Instances
/// in every state are part of it, so a later launch from the same count is new.
/// The hash is FNV-1a, stable across Rust releases (`std`'s hasher is not): an
/// upgrade between a timed-out launch and its retry must not launch twice.
pub fn launch_token(pool_uid: &str, instances: &[Instance], have: u32, add: u32) -> String {
    let mut ids: Vec<&str> = instances.iter().map(|i| i.id.as_str()).collect();
    ids.sort_unstable();
    let request = format!("{pool_uid}\n{}\n{have}\n{add}", ids.join(","));
    format!("outrigger-{}", crate::children::fnv(&request))
}

/// A node of the pool, as scale-down sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSeat {
    pub name: String,
    /// The cloud instance behind it (from `spec.providerID`).
    pub instance: Option<String>,
    /// No replica of a ModelDeployment runs on it.
    pub empty: bool,
    /// Empty since then (as this process saw it).
    pub empty_since: Option<Timestamp>,
    /// Cordoned by the scaler for removal.
    pub cordoned: bool,
}

/// What to do with the pool's nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScaleDown {
    pub cordon: Vec<String>,
    pub uncordon: Vec<String>,
    /// Instances to terminate: cordoned, still empty.
    pub terminate: Vec<String>,
}

/// Returns `excess` nodes: empty ones only, empty for at least `cooldown`, cordoned
/// first and terminated on a later pass if still empty. Nodes cordoned earlier that
/// are no longer in excess are uncordoned, unless their instance is already gone.
pub fn scale_down(
    nodes: &[NodeSeat],
    excess: u32,
    cooldown: Duration,
    now: Timestamp,
) -> ScaleDown {
    let cooldown = SignedDuration::try_from(cooldown).unwrap_or(SignedDuration::MAX);
    let mut chosen: Vec<&NodeSeat> = nodes
        .iter()
        .filter(|n| n.empty && n.instance.is_some())
        .filter(|n| n.cordoned || n.empty_since.is_some_and(|t| t + cooldown <= now))
        .collect();
    // Already cordoned ones first, then the longest empty, then by name.
    chosen.sort_by_key(|n| (!n.cordoned, n.empty_since, n.name.clone()));
    chosen.truncate(excess as usize);
    let mut plan = ScaleDown::default();
    for n in &chosen {
        if n.cordoned {
            plan.terminate.extend(n.instance.clone());
        } else {
            plan.cordon.push(n.name.clone());
        }
    }
    plan.uncordon = nodes
        .iter()
        .filter(|n| n.cordoned && n.instance.is_some())
        .filter(|n| !chosen.iter().any(|c| c.name == n.name))
        .map(|n| n.name.clone())
        .collect();
    plan
}

/// Live instances that have had `grace` to become a Node and did not: leaks.
/// `first_seen` says since when this process knows each instance.
pub fn leaked(
    instances: &[Instance],
    node_instances: &BTreeMap<String, String>,
    first_seen: &BTreeMap<String, Timestamp>,
    grace: Duration,
    now: Timestamp,
) -> Vec<String> {
    let grace = SignedDuration::try_from(grace).unwrap_or(SignedDuration::MAX);
    instances
        .iter()
        .filter(|i| i.live() && !node_instances.values().any(|id| id == &i.id))
        .filter(|i| {
            let since = match (i.launched, first_seen.get(&i.id)) {
                (Some(l), Some(s)) => l.min(*s),
                (Some(l), None) => l,
                (None, Some(s)) => *s,
                (None, None) => now,
            };
            since + grace <= now
        })
        .map(|i| i.id.clone())
        .collect()
}

/// The instance id a Node's `spec.providerID` names, given the pool's instances.
pub fn instance_of<'a>(provider_id: &str, instances: &'a [Instance]) -> Option<&'a Instance> {
    let wanted = provider_id.to_ascii_lowercase();
    instances
        .iter()
        .find(|i| i.provider_id.to_ascii_lowercase() == wanted)
}

#[cfg(test)]
mod tests;
