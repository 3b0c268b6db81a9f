//! Cloud vocabulary shared by both kinds: which provider, which market.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A cloud provider Outrigger can grow pools in: `aws` or `azure`.
#[derive(
    Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// Amazon EC2.
    Aws,
    /// Microsoft Azure (virtual machine scale sets).
    Azure,
}

impl Provider {
    /// Every provider, in a stable order.
    pub const ALL: [Provider; 2] = [Provider::Aws, Provider::Azure];

    /// The name used in manifests and labels: `aws` or `azure`.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Aws => "aws",
            Provider::Azure => "azure",
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a pool's instances are bought: `on-demand` (the default) or `spot`
/// (cheaper, but the cloud may reclaim the nodes at short notice).
#[derive(
    Serialize,
    Deserialize,
    JsonSchema,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
)]
#[serde(rename_all = "kebab-case")]
pub enum CapacityType {
    /// Regular instances, billed per hour, not reclaimed by the cloud.
    #[default]
    OnDemand,
    /// Spot (AWS) or Spot priority (Azure) instances, reclaimable at any time.
    Spot,
}

impl CapacityType {
    /// The name used in manifests: `on-demand` or `spot`.
    pub fn as_str(self) -> &'static str {
        match self {
            CapacityType::OnDemand => "on-demand",
            CapacityType::Spot => "spot",
        }
    }
}

impl fmt::Display for CapacityType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_serde() {
        for provider in Provider::ALL {
            let json = serde_json::to_value(provider).unwrap();
            assert_eq!(json, provider.as_str());
            assert_eq!(provider.to_string(), provider.as_str());
        }
        for capacity in [CapacityType::OnDemand, CapacityType::Spot] {
            let json = serde_json::to_value(capacity).unwrap();
            assert_eq!(json, capacity.as_str());
            assert_eq!(capacity.to_string(), capacity.as_str());
        }
    }
}
