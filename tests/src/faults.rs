//! What is broken in the simulated clouds: injected faults, provider outages and
//! capacity limits, switched on and off at run time through the control API.
//!
//! Everything here is plain data behind one lock ([`FaultBook`]); the EC2 proxy,
//! the Azure server and the node registrar consult it on every request or pass.

use std::time::Duration;

use outrigger_crds::Provider;
use serde::{Deserialize, Serialize};

/// One fault the simulators can inject. The JSON form names the fault in `fault`
/// and its optional filters beside it, e.g.
/// `{"fault": "InsufficientInstanceCapacity", "instanceType": "p5.48xlarge", "zone": "us-east-1a"}`.
/// A filter left out matches everything.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "fault", rename_all_fields = "camelCase", deny_unknown_fields)]
pub enum Fault {
    /// EC2 `RunInstances` fails with `InsufficientInstanceCapacity` (HTTP 500).
    InsufficientInstanceCapacity {
        instance_type: Option<String>,
        region: Option<String>,
        zone: Option<String>,
    },
    /// EC2 `RunInstances` fails with `VcpuLimitExceeded` (HTTP 400): the vCPU quota.
    VcpuLimitExceeded {
        instance_type: Option<String>,
        region: Option<String>,
    },
    /// Any EC2 action (or only `action`) is throttled: `RequestLimitExceeded` (HTTP 503).
    RequestLimitExceeded {
        action: Option<String>,
        region: Option<String>,
    },
    /// Any EC2 action (or only `action`) fails with `InternalError` (HTTP 500).
    InternalError {
        action: Option<String>,
        region: Option<String>,
    },
    /// Growing an Azure scale set is refused with `SkuNotAvailable` (HTTP 409); the
    /// resource SKU list shows the matching restriction while the fault is active.
    SkuNotAvailable {
        instance_type: Option<String>,
        region: Option<String>,
        zone: Option<String>,
    },
    /// Growing an Azure scale set is accepted, then its operation ends `Failed` with
    /// `ZonalAllocationFailed` (zonal scale sets) or `AllocationFailed` (regional ones).
    ZonalAllocationFailed {
        instance_type: Option<String>,
        region: Option<String>,
        zone: Option<String>,
    },
    /// Growing an Azure scale set is refused with `OperationNotAllowed` (HTTP 409): the
    /// core quota.
    OperationNotAllowed {
        instance_type: Option<String>,
        region: Option<String>,
    },
    /// Every Azure request is throttled: HTTP 429 `TooManyRequests` with `Retry-After`.
    TooManyRequests {
        #[serde(default = "default_retry_after")]
        retry_after_seconds: u64,
    },
    /// Azure long-running operations (of `scaleSet`) started while this is active
    /// end `Failed` with `code`.
    OperationFailed {
        #[serde(default = "default_operation_error")]
        code: String,
        message: Option<String>,
        scale_set: Option<String>,
    },
    /// Azure long-running operations (of `scaleSet`) started while this is active
    /// stay `InProgress` until it is cleared, then finish normally.
    OperationStalled { scale_set: Option<String> },
    /// Every request to `provider` is answered `millis` later.
    Latency { provider: Provider, millis: u64 },
    /// The registrar never makes a Node of the matching machines (`zone`: the AWS
    /// zone, or the Azure zone "1".."3"): a launch that never joins the cluster.
    NeverRegisters {
        provider: Provider,
        instance_type: Option<String>,
        zone: Option<String>,
    },
    /// The registrar holds this one Node NotReady, as a broken machine would be.
    NodeNotReady { provider: Provider, node: String },
}

fn default_retry_after() -> u64 {
    1
}

fn default_operation_error() -> String {
    "InternalExecutionError".to_string()
}

impl Fault {
    /// The provider whose API this fault breaks.
    pub fn provider(&self) -> Provider {
        match self {
            Fault::InsufficientInstanceCapacity { .. }
            | Fault::VcpuLimitExceeded { .. }
            | Fault::RequestLimitExceeded { .. }
            | Fault::InternalError { .. } => Provider::Aws,
            Fault::SkuNotAvailable { .. }
            | Fault::ZonalAllocationFailed { .. }
            | Fault::OperationNotAllowed { .. }
            | Fault::TooManyRequests { .. }
            | Fault::OperationFailed { .. }
            | Fault::OperationStalled { .. } => Provider::Azure,
            Fault::Latency { provider, .. }
            | Fault::NeverRegisters { provider, .. }
            | Fault::NodeNotReady { provider, .. } => *provider,
        }
    }
}

/// True when the optional `filter` is absent or equals `value`.
pub(crate) fn matches(filter: &Option<String>, value: &str) -> bool {
    filter.as_deref().is_none_or(|f| f == value)
}

/// Like [`matches`], for a value that may itself be absent (a regional Azure scale
/// set has no zone): a set filter never matches an absent value.
pub(crate) fn matches_opt(filter: &Option<String>, value: Option<&str>) -> bool {
    match filter {
        None => true,
        Some(f) => value == Some(f.as_str()),
    }
}

/// A fault as injected: its id (for `DELETE /faults/{id}`) and how many more
/// requests it hits (`None`: until cleared).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InjectedFault {
    pub id: String,
    #[serde(flatten)]
    pub fault: Fault,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining: Option<u32>,
}

/// A provider-wide (or, with `region`, region-wide) outage: the provider's Nodes
/// turn NotReady and, with `api`, its API answers 503 as well.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Outage {
    pub provider: Provider,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default)]
    pub api: bool,
    /// One Node only (a `NodeNotReady` fault): neither its region nor the API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

impl Outage {
    /// True when this outage covers `region` of `provider` (a one-node outage
    /// covers no region).
    pub fn covers(&self, provider: Provider, region: &str) -> bool {
        self.node.is_none() && self.provider == provider && matches(&self.region, region)
    }

    /// True when this outage covers the Node `node` of `provider` in `region`.
    pub fn covers_node(&self, provider: Provider, region: &str, node: &str) -> bool {
        match &self.node {
            Some(n) => self.provider == provider && n == node,
            None => self.covers(provider, region),
        }
    }

    /// How the outage is named on the Nodes it affects: `aws`, `aws/us-east-1` or
    /// `aws/node/NAME`.
    pub fn label(&self) -> String {
        match (&self.node, &self.region) {
            (Some(node), _) => format!("{}/node/{node}", self.provider),
            (None, Some(region)) => format!("{}/{region}", self.provider),
            (None, None) => self.provider.to_string(),
        }
    }
}

/// A finite capacity: at most `limit` instances of `instance_type` may run in
/// `region` (only in `zone`, when set). AWS zones are full zone names
/// (`us-east-1a`, from which `region` may be left out); Azure zones are "1".."3".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CapacityLimit {
    pub provider: Provider,
    pub instance_type: String,
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// `None` in a request removes the limit.
    pub limit: Option<u32>,
}

/// Why a capacity limit was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CapacityError {
    #[error("a capacity limit needs a region (or, for aws, a zone such as us-east-1a)")]
    NoRegion,
    #[error("zone {zone} is not in region {region}")]
    ZoneOutsideRegion { zone: String, region: String },
}

impl CapacityLimit {
    /// Fills in an AWS region from the zone and checks the scope is complete.
    pub fn normalized(mut self) -> Result<Self, CapacityError> {
        if self.region.is_none() && self.provider == Provider::Aws {
            self.region = self.zone.as_deref().map(aws_region_of_zone);
        }
        let Some(region) = &self.region else {
            return Err(CapacityError::NoRegion);
        };
        if let (Provider::Aws, Some(zone)) = (self.provider, &self.zone)
            && aws_region_of_zone(zone) != *region
        {
            return Err(CapacityError::ZoneOutsideRegion {
                zone: zone.clone(),
                region: region.clone(),
            });
        }
        Ok(self)
    }

    fn same_scope(&self, other: &CapacityLimit) -> bool {
        self.provider == other.provider
            && self.instance_type == other.instance_type
            && self.region == other.region
            && self.zone == other.zone
    }

    /// True when an instance of `instance_type` in `region`/`zone` counts against this limit.
    pub fn applies_to(
        &self,
        provider: Provider,
        instance_type: &str,
        region: &str,
        zone: Option<&str>,
    ) -> bool {
        self.provider == provider
            && self.instance_type == instance_type
            && matches(&self.region, region)
            && matches_opt(&self.zone, zone)
    }
}

/// The region of an AWS availability zone: `us-east-1a` -> `us-east-1`.
pub fn aws_region_of_zone(zone: &str) -> String {
    zone.trim_end_matches(|c: char| c.is_ascii_lowercase())
        .to_string()
}

/// Everything that is currently broken or limited, behind one lock.
#[derive(Debug, Default)]
pub struct FaultBook {
    next_id: u64,
    faults: Vec<InjectedFault>,
    outages: Vec<Outage>,
    capacity: Vec<CapacityLimit>,
}

impl FaultBook {
    /// Adds a fault that hits the next `times` matching requests (`None`: until
    /// cleared) and returns its id.
    pub fn inject(&mut self, fault: Fault, times: Option<u32>) -> String {
        self.next_id += 1;
        let id = format!("f{}", self.next_id);
        self.faults.push(InjectedFault {
            id: id.clone(),
            fault,
            remaining: times,
        });
        id
    }

    pub fn faults(&self) -> &[InjectedFault] {
        &self.faults
    }

    /// Removes one fault; false when no fault has that id.
    pub fn clear(&mut self, id: &str) -> bool {
        let before = self.faults.len();
        self.faults.retain(|f| f.id != id);
        self.faults.len() != before
    }

    /// Removes every fault (of `provider`, when given); returns how many.
    pub fn clear_all(&mut self, provider: Option<Provider>) -> usize {
        let before = self.faults.len();
        self.faults
            .retain(|f| provider.is_some_and(|p| f.fault.provider() != p));
        before - self.faults.len()
    }

    /// True while the fault with this id is still injected.
    pub fn is_active(&self, id: &str) -> bool {
        self.faults.iter().any(|f| f.id == id)
    }

    /// The first fault for which `hits` is true, counted as one hit (a fault whose
    /// `times` run out is removed); its id and a copy.
    pub fn trigger(&mut self, hits: impl Fn(&Fault) -> bool) -> Option<(String, Fault)> {
        let index = self.faults.iter().position(|f| hits(&f.fault))?;
        let entry = &mut self.faults[index];
        let found = (entry.id.clone(), entry.fault.clone());
        if let Some(remaining) = &mut entry.remaining {
            *remaining = remaining.saturating_sub(1);
            if *remaining == 0 {
                self.faults.remove(index);
            }
        }
        Some(found)
    }

    /// Added latency for one request to `provider` (the largest active one).
    pub fn latency(&mut self, provider: Provider) -> Duration {
        let hit =
            self.trigger(|f| matches!(f, Fault::Latency { provider: p, .. } if *p == provider));
        match hit {
            Some((_, Fault::Latency { millis, .. })) => Duration::from_millis(millis),
            _ => Duration::ZERO,
        }
    }

    /// Starts an outage, replacing one with the same provider and region.
    pub fn start_outage(&mut self, outage: Outage) {
        self.outages
            .retain(|o| !(o.provider == outage.provider && o.region == outage.region));
        self.outages.push(outage);
    }

    /// Ends the outages of `provider` (every provider when `None`) in `region`
    /// (every region when `None`); returns how many ended.
    pub fn end_outages(&mut self, provider: Option<Provider>, region: Option<&str>) -> usize {
        let before = self.outages.len();
        self.outages.retain(|o| {
            let hit = provider.is_none_or(|p| o.provider == p)
                && region.is_none_or(|r| o.region.as_deref() == Some(r));
            !hit
        });
        before - self.outages.len()
    }

    pub fn outages(&self) -> &[Outage] {
        &self.outages
    }

    /// The outage covering `region` of `provider`, if any.
    pub fn outage(&self, provider: Provider, region: &str) -> Option<&Outage> {
        self.outages.iter().find(|o| o.covers(provider, region))
    }

    /// True when an outage with `api: true` covers `region` of `provider`.
    pub fn api_down(&self, provider: Provider, region: &str) -> bool {
        self.outage(provider, region).is_some_and(|o| o.api)
    }

    /// Sets (or, with `limit: None`, removes) a capacity limit.
    pub fn set_capacity(&mut self, limit: CapacityLimit) -> Result<(), CapacityError> {
        let limit = limit.normalized()?;
        self.capacity.retain(|c| !c.same_scope(&limit));
        if limit.limit.is_some() {
            self.capacity.push(limit);
        }
        Ok(())
    }

    pub fn capacity(&self) -> &[CapacityLimit] {
        &self.capacity
    }

    /// The limits an instance of this type and place counts against.
    pub fn limits_for(
        &self,
        provider: Provider,
        instance_type: &str,
        region: &str,
        zone: Option<&str>,
    ) -> Vec<CapacityLimit> {
        self.capacity
            .iter()
            .filter(|c| c.applies_to(provider, instance_type, region, zone))
            .cloned()
            .collect()
    }

    /// Forgets every fault, outage and capacity limit.
    pub fn reset(&mut self) {
        *self = FaultBook::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ice(zone: Option<&str>) -> Fault {
        Fault::InsufficientInstanceCapacity {
            instance_type: Some("p5.48xlarge".into()),
            region: None,
            zone: zone.map(String::from),
        }
    }

    #[test]
    fn fault_json_names_the_fault_and_its_filters() {
        let f: Fault = serde_json::from_str(
            r#"{"fault":"InsufficientInstanceCapacity","instanceType":"p5.48xlarge","zone":"us-east-1a"}"#,
        )
        .unwrap();
        assert_eq!(f, ice(Some("us-east-1a")));
        assert_eq!(f.provider(), Provider::Aws);
        let throttle: Fault = serde_json::from_str(r#"{"fault":"TooManyRequests"}"#).unwrap();
        assert_eq!(
            throttle,
            Fault::TooManyRequests {
                retry_after_seconds: 1
            }
        );
        assert!(
            serde_json::from_str::<Fault>(r#"{"fault":"VcpuLimitExceeded","zone":"x"}"#).is_err(),
            "unknown filters are refused"
        );
        assert!(serde_json::from_str::<Fault>(r#"{"fault":"NoSuchFault"}"#).is_err());
    }

    #[test]
    fn a_fault_with_times_runs_out() {
        let mut book = FaultBook::default();
        let id = book.inject(ice(None), Some(2));
        let hit = |f: &Fault| matches!(f, Fault::InsufficientInstanceCapacity { .. });
        assert_eq!(book.trigger(hit).map(|(i, _)| i), Some(id.clone()));
        assert!(book.is_active(&id));
        assert!(book.trigger(hit).is_some());
        assert!(!book.is_active(&id));
        assert!(book.trigger(hit).is_none());
    }

    #[test]
    fn clear_all_of_one_provider_keeps_the_others() {
        let mut book = FaultBook::default();
        book.inject(ice(None), None);
        book.inject(Fault::OperationStalled { scale_set: None }, None);
        assert_eq!(book.clear_all(Some(Provider::Azure)), 1);
        assert_eq!(book.faults().len(), 1);
        assert_eq!(book.clear_all(None), 1);
        assert!(book.faults().is_empty());
    }

    #[test]
    fn outages_cover_a_provider_or_one_region() {
        let mut book = FaultBook::default();
        book.start_outage(Outage {
            provider: Provider::Azure,
            region: Some("eastus".into()),
            api: false,
            node: None,
        });
        assert!(book.outage(Provider::Azure, "eastus").is_some());
        assert!(book.outage(Provider::Azure, "westus2").is_none());
        assert!(book.outage(Provider::Aws, "eastus").is_none());
        book.start_outage(Outage {
            provider: Provider::Aws,
            region: None,
            api: true,
            node: None,
        });
        assert!(book.api_down(Provider::Aws, "us-west-2"));
        assert_eq!(book.end_outages(Some(Provider::Aws), None), 1);
        assert_eq!(book.end_outages(None, None), 1);
        assert!(book.outages().is_empty());
    }

    #[test]
    fn a_one_node_outage_covers_that_node_only() {
        let one = Outage {
            provider: Provider::Aws,
            region: None,
            api: false,
            node: Some("i-1".into()),
        };
        assert!(one.covers_node(Provider::Aws, "us-east-1", "i-1"));
        assert!(!one.covers_node(Provider::Aws, "us-east-1", "i-2"));
        assert!(!one.covers(Provider::Aws, "us-east-1"), "not its region");
        assert_eq!(one.label(), "aws/node/i-1");
    }

    #[test]
    fn capacity_limits_take_the_region_from_an_aws_zone() {
        let mut book = FaultBook::default();
        let limit = CapacityLimit {
            provider: Provider::Aws,
            instance_type: "p5.48xlarge".into(),
            region: None,
            zone: Some("us-east-1a".into()),
            limit: Some(2),
        };
        book.set_capacity(limit.clone()).unwrap();
        assert_eq!(book.capacity()[0].region.as_deref(), Some("us-east-1"));
        assert_eq!(
            book.limits_for(
                Provider::Aws,
                "p5.48xlarge",
                "us-east-1",
                Some("us-east-1a")
            )
            .len(),
            1
        );
        assert!(
            book.limits_for(
                Provider::Aws,
                "p5.48xlarge",
                "us-east-1",
                Some("us-east-1b")
            )
            .is_empty()
        );
        book.set_capacity(CapacityLimit {
            limit: None,
            ..limit
        })
        .unwrap();
        assert!(book.capacity().is_empty());
        let no_region = CapacityLimit {
            provider: Provider::Azure,
            instance_type: "Standard_ND96isr_H100_v5".into(),
            region: None,
            zone: Some("1".into()),
            limit: Some(1),
        };
        assert_eq!(book.set_capacity(no_region), Err(CapacityError::NoRegion));
    }

    #[test]
    fn aws_zone_names_end_in_letters() {
        assert_eq!(aws_region_of_zone("us-east-1a"), "us-east-1");
        assert_eq!(aws_region_of_zone("us-west-2-lax-1a"), "us-west-2-lax-1");
    }
}
