//! Spec checks that mirror the CRDs' schema and CEL rules, for input that never went
//! through an API server (`outrigger plan`) and as a last guard in the controllers.
//! Each problem names the field and the fix.

use outrigger_crds::{GpuNodePoolSpec, ModelDeploymentSpec, Provider};

/// One problem with one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path from the object's root, e.g. `spec.placement.spread[0].maxShare`.
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// A cluster name is a DNS label: `Err` says why `name` is not one.
pub fn dns_label(name: &str) -> Result<(), &'static str> {
    let label = name.len() <= 63
        && !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if label {
        Ok(())
    } else {
        Err(
            "is not a cluster name: use lower-case letters, digits and '-' (a DNS label, at most 63 characters), as in clusterName",
        )
    }
}

fn error(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

pub fn model_deployment(spec: &ModelDeploymentSpec) -> Vec<FieldError> {
    let mut errors = Vec::new();
    if spec.replicas < 0 {
        errors.push(error(
            "spec.replicas",
            format!("is {}; it must be 0 or more", spec.replicas),
        ));
    }
    if spec.gpu.count == 0 {
        errors.push(error(
            "spec.gpu.count",
            "is 0; a replica needs at least 1 GPU",
        ));
    }
    for (i, rule) in spec.placement.spread.iter().enumerate() {
        if rule.min_groups == 0 {
            errors.push(error(
                format!("spec.placement.spread[{i}].minGroups"),
                "is 0; it must be at least 1 (omit it for the default 1)",
            ));
        }
        if !(1..=100).contains(&rule.max_share) {
            errors.push(error(
                format!("spec.placement.spread[{i}].maxShare"),
                format!(
                    "is {}; it is a percentage from 1 to 100 (omit it for the default 100)",
                    rule.max_share
                ),
            ));
        }
    }
    if spec.failover.unhealthy_after_seconds == 0 {
        errors.push(error(
            "spec.failover.unhealthyAfterSeconds",
            "is 0; it must be at least 1 second",
        ));
    }
    if spec.service.as_ref().is_some_and(|s| s.port == 0) {
        errors.push(error(
            "spec.service.port",
            "is 0; use a port from 1 to 65535",
        ));
    }
    errors
}

pub fn gpu_node_pool(spec: &GpuNodePoolSpec) -> Vec<FieldError> {
    let mut errors = Vec::new();
    if spec.gpu.count == 0 {
        errors.push(error("spec.gpu.count", "is 0; a node has at least 1 GPU"));
    }
    if spec.nodes.min > spec.nodes.max {
        errors.push(error(
            "spec.nodes",
            format!(
                "min {} is above max {}; nodes.min must be <= nodes.max",
                spec.nodes.min, spec.nodes.max
            ),
        ));
    }
    if let Some(price) = spec.price_per_node_hour
        && !(price.is_finite() && price >= 0.0)
    {
        errors.push(error(
            "spec.pricePerNodeHour",
            format!("is {price}; it must be a price in USD of 0 or more"),
        ));
    }
    if let Some(scaling) = &spec.scaling {
        let (own, other) = match spec.provider {
            Provider::Aws => (scaling.aws.is_some(), scaling.azure.is_some()),
            Provider::Azure => (scaling.azure.is_some(), scaling.aws.is_some()),
        };
        let name = spec.provider.as_str();
        if !own {
            errors.push(error(
                format!("spec.scaling.{name}"),
                format!("is missing; a {name} pool with scaling needs scaling.{name}"),
            ));
        }
        if other {
            errors.push(error(
                "spec.scaling",
                format!("names another provider's block; a {name} pool takes only scaling.{name}"),
            ));
        }
    }
    errors
}
