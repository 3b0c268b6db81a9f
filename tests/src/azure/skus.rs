//! The VM sizes the Azure simulator knows, and the `resourceSkus` list it serves
//! (`GET /subscriptions/{sub}/providers/Microsoft.Compute/skus`).

use serde_json::{Value, json};

use crate::faults::{Fault, matches};

/// What one VM of a size offers a Node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SkuShape {
    pub name: &'static str,
    pub family: &'static str,
    pub vcpus: u32,
    pub memory_gib: u32,
    pub gpus: u32,
}

/// GPU sizes Outrigger pools use, and one CPU size; figures as Azure publishes them.
pub const CATALOG: &[SkuShape] = &[
    SkuShape {
        name: "Standard_ND96isr_H100_v5",
        family: "standardNDSH100v5Family",
        vcpus: 96,
        memory_gib: 1900,
        gpus: 8,
    },
    SkuShape {
        name: "Standard_ND96isr_H200_v5",
        family: "standardNDSH200v5Family",
        vcpus: 96,
        memory_gib: 1850,
        gpus: 8,
    },
    SkuShape {
        name: "Standard_ND96amsr_A100_v4",
        family: "standardNDAMSv4_A100Family",
        vcpus: 96,
        memory_gib: 1900,
        gpus: 8,
    },
    SkuShape {
        name: "Standard_ND96asr_v4",
        family: "standardNDASv4_A100Family",
        vcpus: 96,
        memory_gib: 900,
        gpus: 8,
    },
    SkuShape {
        name: "Standard_NC24ads_A100_v4",
        family: "StandardNCADSA100v4Family",
        vcpus: 24,
        memory_gib: 220,
        gpus: 1,
    },
    SkuShape {
        name: "Standard_NC48ads_A100_v4",
        family: "StandardNCADSA100v4Family",
        vcpus: 48,
        memory_gib: 440,
        gpus: 2,
    },
    SkuShape {
        name: "Standard_NC96ads_A100_v4",
        family: "StandardNCADSA100v4Family",
        vcpus: 96,
        memory_gib: 880,
        gpus: 4,
    },
    SkuShape {
        name: "Standard_NC40ads_H100_v5",
        family: "standardNCadsH100v5Family",
        vcpus: 40,
        memory_gib: 320,
        gpus: 1,
    },
    SkuShape {
        name: "Standard_NC80adis_H100_v5",
        family: "standardNCadsH100v5Family",
        vcpus: 80,
        memory_gib: 640,
        gpus: 2,
    },
    SkuShape {
        name: "Standard_NV36ads_A10_v5",
        family: "StandardNVADSA10v5Family",
        vcpus: 36,
        memory_gib: 440,
        gpus: 1,
    },
    SkuShape {
        name: "Standard_D4s_v5",
        family: "standardDSv5Family",
        vcpus: 4,
        memory_gib: 16,
        gpus: 0,
    },
];

/// Regions every size is offered in (with zones 1-3), besides those of scale sets.
pub const REGIONS: &[&str] = &[
    "eastus",
    "eastus2",
    "westus2",
    "westus3",
    "southcentralus",
    "westeurope",
    "northeurope",
    "swedencentral",
];

/// The shape of a size the catalog knows.
pub fn shape(sku: &str) -> Option<SkuShape> {
    CATALOG
        .iter()
        .find(|s| s.name.eq_ignore_ascii_case(sku))
        .copied()
}

/// The `resourceSkus` list for `regions` (restricted to `only_region` when the
/// request filtered `location eq '...'`), with a restriction for every active
/// `SkuNotAvailable` fault.
pub fn resource_skus<'a>(
    regions: &[String],
    only_region: Option<&str>,
    faults: impl Iterator<Item = &'a Fault> + Clone,
) -> Value {
    let mut value = Vec::new();
    for sku in CATALOG {
        for region in regions {
            if only_region.is_some_and(|r| !r.eq_ignore_ascii_case(region)) {
                continue;
            }
            let restrictions: Vec<Value> = faults
                .clone()
                .filter_map(|f| match f {
                    Fault::SkuNotAvailable {
                        instance_type,
                        region: fault_region,
                        zone,
                    } if matches(instance_type, sku.name) && matches(fault_region, region) => {
                        Some(restriction(region, zone.as_deref()))
                    }
                    _ => None,
                })
                .collect();
            value.push(json!({
                "resourceType": "virtualMachines",
                "name": sku.name,
                "tier": "Standard",
                "size": sku.name.trim_start_matches("Standard_"),
                "family": sku.family,
                "locations": [region],
                "locationInfo": [{"location": region, "zones": ["1", "2", "3"], "zoneDetails": []}],
                "capabilities": [
                    {"name": "vCPUs", "value": sku.vcpus.to_string()},
                    {"name": "MemoryGB", "value": sku.memory_gib.to_string()},
                    {"name": "GPUs", "value": sku.gpus.to_string()},
                ],
                "restrictions": restrictions,
            }));
        }
    }
    json!({ "value": value })
}

fn restriction(region: &str, zone: Option<&str>) -> Value {
    match zone {
        Some(zone) => json!({
            "type": "Zone",
            "values": [region],
            "restrictionInfo": {"locations": [region], "zones": [zone]},
            "reasonCode": "NotAvailableForSubscription",
        }),
        None => json!({
            "type": "Location",
            "values": [region],
            "restrictionInfo": {"locations": [region]},
            "reasonCode": "NotAvailableForSubscription",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sku_fault_shows_as_a_zone_restriction() {
        let fault = Fault::SkuNotAvailable {
            instance_type: Some("Standard_ND96isr_H100_v5".into()),
            region: Some("eastus".into()),
            zone: Some("2".into()),
        };
        let regions = vec!["eastus".to_string(), "westus2".to_string()];
        let list = resource_skus(&regions, None, std::iter::once(&fault));
        let entries = list["value"].as_array().unwrap();
        assert_eq!(entries.len(), CATALOG.len() * 2);
        let restricted: Vec<&Value> = entries
            .iter()
            .filter(|e| !e["restrictions"].as_array().unwrap().is_empty())
            .collect();
        assert_eq!(restricted.len(), 1);
        assert_eq!(restricted[0]["name"], "Standard_ND96isr_H100_v5");
        assert_eq!(restricted[0]["locations"][0], "eastus");
        assert_eq!(restricted[0]["restrictions"][0]["type"], "Zone");
        assert_eq!(
            restricted[0]["restrictions"][0]["restrictionInfo"]["zones"][0],
            "2"
        );
        let one_region = resource_skus(&regions, Some("WestUS2"), std::iter::empty());
        assert_eq!(one_region["value"].as_array().unwrap().len(), CATALOG.len());
    }

    #[test]
    fn shape_lookup_ignores_case() {
        assert_eq!(shape("standard_nd96isr_h100_v5").map(|s| s.gpus), Some(8));
        assert_eq!(shape("Standard_Nope"), None);
    }
}
