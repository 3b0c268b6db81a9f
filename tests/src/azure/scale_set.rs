//! A simulated VM scale set and its VMs: naming, zones, and which VMs a scale-in takes.

use std::collections::BTreeMap;
use std::time::Instant;

use jiff::Timestamp;
use outrigger_crds::{CLUSTER_TAG, POOL_LABEL};
use serde::{Deserialize, Serialize};

use super::agent_pool::AksPool;
use super::error::ArmError;
use super::skus::{self, SkuShape};

/// A scale set is named by subscription, resource group and name; ARM compares
/// them without case.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ScaleSetKey(String, String, String);

impl ScaleSetKey {
    pub fn new(subscription: &str, resource_group: &str, name: &str) -> Self {
        ScaleSetKey(
            subscription.to_ascii_lowercase(),
            resource_group.to_ascii_lowercase(),
            name.to_ascii_lowercase(),
        )
    }
}

/// A scale set to create (a test fixture, through the control API).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScaleSetFixture {
    pub subscription_id: String,
    pub resource_group: String,
    pub name: String,
    pub location: String,
    /// VM size, e.g. `Standard_ND96isr_H100_v5`.
    pub sku: String,
    /// Zones ("1", "2", "3") the VMs are spread over; empty: a regional scale set.
    #[serde(default)]
    pub zones: Vec<String>,
    /// VMs it starts with (running at once).
    #[serde(default)]
    pub capacity: u32,
    /// Sets the tag `outrigger.dev/pool`, which the node registrar reads.
    #[serde(default)]
    pub pool: Option<String>,
    /// Sets the tag `outrigger.dev/cluster`: the cluster whose Nodes its VMs become
    /// (with several clusters, `hack/peers`); absent: the registrar's default cluster.
    #[serde(default)]
    pub cluster: Option<String>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// GPUs per VM, for a size the catalog does not know.
    #[serde(default)]
    pub gpus: Option<u32>,
}

/// Where a VM is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmState {
    Creating,
    Running,
    Deleting,
}

impl VmState {
    pub fn provisioning_state(self) -> &'static str {
        match self {
            VmState::Creating => "Creating",
            VmState::Running => "Succeeded",
            VmState::Deleting => "Deleting",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Vm {
    pub instance_id: u32,
    pub zone: Option<String>,
    pub state: VmState,
    pub vm_id: String,
    pub created: Timestamp,
    /// When it started running (what the node registrar's boot delay counts from).
    pub up_since: Option<Instant>,
}

#[derive(Clone, Debug)]
pub struct ScaleSet {
    pub subscription: String,
    pub resource_group: String,
    pub name: String,
    pub location: String,
    pub sku: String,
    pub zones: Vec<String>,
    pub tags: BTreeMap<String, String>,
    /// `sku.capacity`: the VM count last asked for.
    pub capacity: u32,
    pub provisioning_state: &'static str,
    pub unique_id: String,
    pub created: Timestamp,
    pub gpus: Option<u32>,
    /// The AKS agent pool this scale set is the nodes of, if any.
    pub aks: Option<AksPool>,
    pub vms: BTreeMap<u32, Vm>,
    next_instance_id: u32,
}

impl ScaleSet {
    /// A scale set from its fixture, with `capacity` VMs running since `now`.
    pub(super) fn from_fixture(fixture: ScaleSetFixture, now: Instant) -> Result<Self, ArmError> {
        if let Some(z) = fixture
            .zones
            .iter()
            .find(|z| !matches!(z.as_str(), "1" | "2" | "3"))
        {
            return Err(ArmError::bad_request(
                "InvalidParameter",
                format!("zone {z:?} is not one of \"1\", \"2\", \"3\""),
            ));
        }
        let mut tags = fixture.tags;
        if let Some(pool) = fixture.pool {
            tags.insert(POOL_LABEL.to_string(), pool);
        }
        if let Some(cluster) = fixture.cluster {
            tags.insert(CLUSTER_TAG.to_string(), cluster);
        }
        let mut set = ScaleSet {
            unique_id: uuid::Uuid::new_v4().to_string(),
            subscription: fixture.subscription_id,
            resource_group: fixture.resource_group,
            name: fixture.name,
            location: fixture.location,
            sku: fixture.sku,
            zones: fixture.zones,
            tags,
            capacity: fixture.capacity,
            provisioning_state: "Succeeded",
            created: Timestamp::now(),
            gpus: fixture.gpus,
            aks: None,
            vms: BTreeMap::new(),
            next_instance_id: 0,
        };
        for _ in 0..fixture.capacity {
            let zone = set.next_zone(&[]);
            let id = set.add_vm(zone, VmState::Running);
            if let Some(vm) = set.vms.get_mut(&id) {
                vm.up_since = Some(now);
            }
        }
        Ok(set)
    }

    /// Adds a VM in `zone`; its instance id.
    pub(super) fn add_vm(&mut self, zone: Option<String>, state: VmState) -> u32 {
        let id = self.next_instance_id;
        self.next_instance_id += 1;
        self.vms.insert(
            id,
            Vm {
                instance_id: id,
                zone,
                state,
                vm_id: uuid::Uuid::new_v4().to_string(),
                created: Timestamp::now(),
                up_since: None,
            },
        );
        id
    }

    /// The ARM id, the prefix of every id below it.
    pub fn id(&self) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachineScaleSets/{}",
            self.subscription, self.resource_group, self.name
        )
    }

    pub fn shape(&self) -> Option<SkuShape> {
        skus::shape(&self.sku)
    }

    /// GPUs per VM: the fixture's figure, else the catalog's.
    pub fn gpus_per_vm(&self) -> u32 {
        self.gpus
            .or_else(|| self.shape().map(|s| s.gpus))
            .unwrap_or(0)
    }

    /// The computer name (and Node name) of a VM: the scale set name and the
    /// instance id in base 36, six digits, as AKS names its nodes.
    pub fn computer_name(&self, instance_id: u32) -> String {
        let mut prefix: String = self
            .name
            .to_ascii_lowercase()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        prefix.truncate(56);
        format!("{prefix}{}", base36(instance_id))
    }

    pub(super) fn live_vms(&self) -> impl Iterator<Item = &Vm> {
        self.vms.values().filter(|v| v.state != VmState::Deleting)
    }

    /// Zone for one more VM: the listed zone with the fewest live VMs.
    pub(super) fn next_zone(&self, extra: &[Option<String>]) -> Option<String> {
        self.zones
            .iter()
            .min_by_key(|z| {
                self.live_vms()
                    .filter(|v| v.zone.as_ref() == Some(z))
                    .count()
                    + extra.iter().filter(|e| e.as_ref() == Some(z)).count()
            })
            .cloned()
    }

    /// VMs to remove to get down to `target`: from the zone with the most, the
    /// highest instance id first (Azure's default scale-in policy).
    pub(super) fn scale_in_victims(&self, target: u32) -> Vec<u32> {
        let mut live: Vec<&Vm> = self.live_vms().collect();
        let mut victims = Vec::new();
        while live.len() > target as usize {
            let mut per_zone: BTreeMap<Option<&String>, usize> = BTreeMap::new();
            for vm in &live {
                *per_zone.entry(vm.zone.as_ref()).or_default() += 1;
            }
            let busiest = per_zone
                .iter()
                .max_by_key(|(_, n)| **n)
                .map(|(z, _)| *z)
                .unwrap_or(None);
            let Some(pos) = live
                .iter()
                .enumerate()
                .filter(|(_, v)| v.zone.as_ref() == busiest)
                .max_by_key(|(_, v)| v.instance_id)
                .map(|(i, _)| i)
            else {
                break;
            };
            victims.push(live.remove(pos).instance_id);
        }
        victims
    }
}

/// Instance ids in base 36, zero-padded to six digits (`vmss00000a`).
fn base36(mut n: u32) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = vec![b'0'; 6];
    let mut i = out.len();
    while n > 0 && i > 0 {
        i -= 1;
        out[i] = DIGITS[(n % 36) as usize];
        n /= 36;
    }
    String::from_utf8(out).unwrap_or_default()
}
