//! A ModelDeployment's status from its plan and what its children report. Pure.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use outrigger_crds::{ModelDeployment, ModelDeploymentStatus, PlacementStatus, condition};
use outrigger_placement::Plan;

use crate::observe::global::PoolRef;

/// Per pool: replicas applied and ready.
pub type Applied = BTreeMap<String, (u32, u32)>;

/// A condition that keeps its `lastTransitionTime` while its status stays the same.
pub fn condition(
    previous: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    let since = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or(Time(now), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.to_string(),
        status,
        reason: reason.to_string(),
        message,
        observed_generation: generation,
        last_transition_time: since,
    }
}

/// The status to write. Only lines about spread rules and unplaced replicas go in the
/// Diversified message; the full explanation is in `outrigger plan` and the Events.
/// `pools` names every pool a placement may be on (by its name in the plan);
/// `in_sync`, served by peers, the clusters whose copy's spec differs from this one.
pub fn desired(
    md: &ModelDeployment,
    plan: &Plan,
    applied: &Applied,
    pools: &BTreeMap<String, PoolRef>,
    in_sync: Option<&[String]>,
    now: Timestamp,
) -> ModelDeploymentStatus {
    let previous = md
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let generation = md.metadata.generation;
    let wanted = md.spec.replicas.max(0);
    let mut placements = Vec::new();
    let mut providers: BTreeMap<&str, u32> = BTreeMap::new();
    let (mut replicas, mut ready) = (0u32, 0u32);
    for (pool_name, &(n, r)) in applied.iter().filter(|(_, (n, _))| *n > 0) {
        replicas += n;
        ready += r;
        let Some(PoolRef { cluster, pool }) = pools.get(pool_name) else {
            continue;
        };
        *providers.entry(pool.spec.provider.as_str()).or_default() += n;
        placements.push(PlacementStatus {
            cluster: cluster.clone(),
            pool: pool.metadata.name.clone().unwrap_or_default(),
            provider: pool.spec.provider,
            region: pool.spec.region.clone(),
            zone: pool.spec.zone.clone(),
            replicas: i32::try_from(n).unwrap_or(i32::MAX),
            ready_replicas: Some(i32::try_from(r).unwrap_or(i32::MAX)),
        });
    }
    let providers = providers
        .iter()
        .map(|(p, n)| format!("{p}={n}"))
        .collect::<Vec<_>>()
        .join(" ");
    let ready_i = i32::try_from(ready).unwrap_or(i32::MAX);
    let all_ready = ready_i >= wanted && plan.unplaced == 0;
    let rule_lines: Vec<&str> = plan
        .rules
        .iter()
        .chain(&plan.unplaced_reason)
        .map(String::as_str)
        .collect();
    let diversified_message = if rule_lines.is_empty() {
        "no spread rules".to_string()
    } else {
        rule_lines.join("; ")
    };
    let ready_condition = if all_ready {
        condition(
            previous,
            condition::READY,
            true,
            "AllReplicasReady",
            format!("{ready} of {wanted} replicas ready"),
            generation,
            now,
        )
    } else if plan.unplaced > 0 {
        condition(
            previous,
            condition::READY,
            false,
            "ReplicasUnplaced",
            format!(
                "{} of {wanted} replicas have no pool; {ready} ready{}",
                plan.unplaced,
                // The solver's own words for why: which pools are not eligible or full.
                plan.unplaced_reason
                    .as_ref()
                    .map(|l| format!(" ({l})"))
                    .unwrap_or_default()
            ),
            generation,
            now,
        )
    } else {
        condition(
            previous,
            condition::READY,
            false,
            "ReplicasNotReady",
            format!("{ready} of {wanted} replicas ready"),
            generation,
            now,
        )
    };
    let diversified = if plan.diversified {
        condition(
            previous,
            condition::DIVERSIFIED,
            true,
            "RulesMet",
            diversified_message,
            generation,
            now,
        )
    } else {
        condition(
            previous,
            condition::DIVERSIFIED,
            false,
            "RulesNotMet",
            diversified_message,
            generation,
            now,
        )
    };
    let degraded = if plan.unplaced > 0 {
        condition(
            previous,
            condition::DEGRADED,
            true,
            "ReplicasUnplaced",
            format!("{} replicas unplaced", plan.unplaced),
            generation,
            now,
        )
    } else if ready < replicas {
        condition(
            previous,
            condition::DEGRADED,
            true,
            "ReplicasNotReady",
            format!(
                "{} of {replicas} placed replicas not ready",
                replicas - ready
            ),
            generation,
            now,
        )
    } else {
        condition(
            previous,
            condition::DEGRADED,
            false,
            "AsPlanned",
            "every placed replica is ready".to_string(),
            generation,
            now,
        )
    };
    let mut conditions = vec![ready_condition, diversified, degraded];
    if let Some(differ) = in_sync {
        conditions.push(if differ.is_empty() {
            condition(
                previous,
                condition::IN_SYNC,
                true,
                "SameSpec",
                "every cluster's copy has the same spec".to_string(),
                generation,
                now,
            )
        } else {
            condition(
                previous,
                condition::IN_SYNC,
                false,
                "SpecsDiffer",
                format!(
                    "the copies in {} have another spec than this one: apply the same manifest to every cluster; until then each plans with its own copy",
                    differ.join(", ")
                ),
                generation,
                now,
            )
        });
    }
    ModelDeploymentStatus {
        observed_generation: generation,
        replicas: Some(i32::try_from(replicas).unwrap_or(i32::MAX)),
        ready_replicas: Some(ready_i),
        selector: Some(format!(
            "{}={}",
            crate::labels::DEPLOYMENT,
            md.metadata.name.as_deref().unwrap_or_default()
        )),
        unplaced_replicas: Some(i32::try_from(plan.unplaced).unwrap_or(i32::MAX)),
        placements,
        providers: Some(providers),
        cost_per_hour: Some(plan.cost_per_hour),
        // This cluster's own children, filled in by the caller that knows them.
        children: Vec::new(),
        conditions,
    }
}
