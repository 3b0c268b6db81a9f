//! What faults and capacity limits decide about an operation before it starts:
//! refuse it now, let it fail later, or stall it.

use axum::http::StatusCode;
use outrigger_crds::Provider;

use super::cloud::{AzureCloud, OperationPlan};
use super::error::ArmError;
use super::scale_set::ScaleSet;
use crate::faults::{Fault, FaultBook, matches, matches_opt};

/// What faults and capacity say about growing `set` by VMs in `zones`: a refusal
/// now (`Err`), or an operation that will fail.
pub(super) fn growth_plan(
    book: &mut FaultBook,
    cloud: &AzureCloud,
    set: &ScaleSet,
    zones: &[Option<String>],
) -> Result<OperationPlan, ArmError> {
    let region = set.location.to_ascii_lowercase();
    let sku = set.sku.as_str();
    let mut distinct: Vec<Option<&str>> = zones.iter().map(Option::as_deref).collect();
    distinct.sort();
    distinct.dedup();
    let refused = book.trigger(|f| match f {
        Fault::SkuNotAvailable {
            instance_type,
            region: r,
            zone,
        } => {
            matches(instance_type, sku)
                && matches(r, &region)
                && distinct.iter().any(|z| matches_opt(zone, *z))
        }
        Fault::OperationNotAllowed {
            instance_type,
            region: r,
        } => matches(instance_type, sku) && matches(r, &region),
        _ => false,
    });
    match refused {
        Some((_, Fault::SkuNotAvailable { zone, .. })) => {
            return Err(ArmError::new(
                StatusCode::CONFLICT,
                "SkuNotAvailable",
                format!(
                    "The requested VM size {sku} is currently not available in location '{region}'{} for subscription '{}'. Please try another size or deploy to a different location or zones.",
                    zone.map(|z| format!(" zones '{z}'")).unwrap_or_default(),
                    set.subscription
                ),
            ));
        }
        Some(_) => {
            let family = set.shape().map_or("standard", |s| s.family);
            return Err(ArmError::new(
                StatusCode::CONFLICT,
                "OperationNotAllowed",
                format!(
                    "Operation could not be completed as it results in exceeding approved {family} Cores quota. Additional details - Deployment Model: Resource Manager, Location: {region}. Please read more about quota limits at https://aka.ms/ComputeQuotaLimits."
                ),
            ));
        }
        None => {}
    }
    let zonal = !set.zones.is_empty();
    let allocation_failure = |zone: Option<&str>| {
        if zonal {
            ArmError::new(
                StatusCode::OK,
                "ZonalAllocationFailed",
                format!(
                    "Allocation failed. We do not have sufficient capacity for the requested VM size {sku} in zone '{}' of region {region}. Read more about improving likelihood of allocation success at http://aka.ms/allocation-guidance",
                    zone.unwrap_or("")
                ),
            )
        } else {
            ArmError::new(
                StatusCode::OK,
                "AllocationFailed",
                format!(
                    "Allocation failed. We do not have sufficient capacity for the requested VM size {sku} in region {region}. Read more about improving likelihood of allocation success at http://aka.ms/allocation-guidance"
                ),
            )
        }
    };
    let mut plan = OperationPlan::default();
    if let Some((_, Fault::ZonalAllocationFailed { zone, .. })) = book.trigger(|f| match f {
        Fault::ZonalAllocationFailed {
            instance_type,
            region: r,
            zone,
        } => {
            matches(instance_type, sku)
                && matches(r, &region)
                && distinct.iter().any(|z| matches_opt(zone, *z))
        }
        _ => false,
    }) {
        plan.failure = Some(allocation_failure(
            zone.as_deref().or(distinct.first().copied().flatten()),
        ));
        return Ok(plan);
    }
    for zone in &distinct {
        for limit in book.limits_for(Provider::Azure, sku, &region, *zone) {
            let used = cloud.count_vms(sku, &region, limit.zone.as_deref());
            let adding = zones
                .iter()
                .filter(|z| matches_opt(&limit.zone, z.as_deref()))
                .count() as u32;
            if used + adding > limit.limit.unwrap_or(u32::MAX) {
                plan.failure = Some(allocation_failure(*zone));
                return Ok(plan);
            }
        }
    }
    Ok(plan)
}

/// Faults that shape any long-running operation of `scale_set`: failing or stalling it.
pub(super) fn add_operation_faults(
    book: &mut FaultBook,
    plan: &mut OperationPlan,
    scale_set: &str,
) {
    if plan.failure.is_none()
        && let Some((_, Fault::OperationFailed { code, message, .. })) = book.trigger(
            |f| matches!(f, Fault::OperationFailed { scale_set: s, .. } if names(s, scale_set)),
        )
    {
        plan.failure = Some(ArmError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            &code,
            message
                .unwrap_or_else(|| "The operation failed (injected by the simulator).".to_string()),
        ));
    }
    if let Some((id, _)) = book
        .trigger(|f| matches!(f, Fault::OperationStalled { scale_set: s } if names(s, scale_set)))
    {
        plan.stalled_by = Some(id);
    }
}

/// True when a scale-set filter is absent or names `scale_set` (ARM names ignore case).
fn names(filter: &Option<String>, scale_set: &str) -> bool {
    filter
        .as_deref()
        .is_none_or(|f| f.eq_ignore_ascii_case(scale_set))
}
