//! The simulated Azure compute state: VM scale sets, their VMs, and the
//! long-running operations that change them. Pure: time comes in as `now`, and
//! what faults decide comes in as an [`OperationPlan`].

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use jiff::Timestamp;

use super::agent_pool::AgentPoolFixture;
use super::error::ArmError;
use super::scale_set::{ScaleSet, ScaleSetFixture, ScaleSetKey, VmState};

/// What the faults decided about an operation before it starts.
#[derive(Clone, Debug, Default)]
pub struct OperationPlan {
    /// The operation will end `Failed` with this error.
    pub failure: Option<ArmError>,
    /// The operation stays `InProgress` while the fault with this id is active.
    pub stalled_by: Option<String>,
}

#[derive(Clone, Debug)]
enum Change {
    Scale {
        key: ScaleSetKey,
        created: Vec<u32>,
        removed: Vec<u32>,
    },
    DeleteInstances {
        key: ScaleSetKey,
        ids: Vec<u32>,
    },
}

/// The status of a long-running operation, as its status resource shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OperationStatus {
    InProgress,
    Succeeded,
    Failed(ArmError),
}

#[derive(Clone, Debug)]
pub struct Operation {
    pub id: String,
    pub started: Timestamp,
    pub ended: Option<Timestamp>,
    pub status: OperationStatus,
    /// For an update: the scale set whose body the operation result returns.
    pub scale_set: Option<ScaleSetKey>,
    due: Instant,
    plan: OperationPlan,
    change: Change,
}

/// All scale sets and operations of the simulated Azure.
#[derive(Debug)]
pub struct AzureCloud {
    scale_sets: BTreeMap<ScaleSetKey, ScaleSet>,
    operations: HashMap<String, Operation>,
    operation_time: Duration,
}

impl AzureCloud {
    /// A cloud whose operations take `operation_time` each.
    pub fn new(operation_time: Duration) -> Self {
        AzureCloud {
            scale_sets: BTreeMap::new(),
            operations: HashMap::new(),
            operation_time,
        }
    }

    /// The time an operation takes, which `Retry-After` advertises (at least 1 s).
    pub fn retry_after_seconds(&self) -> u64 {
        self.operation_time.as_secs().max(1)
    }

    pub fn create_scale_set(
        &mut self,
        fixture: ScaleSetFixture,
        now: Instant,
    ) -> Result<(), ArmError> {
        let key = ScaleSetKey::new(
            &fixture.subscription_id,
            &fixture.resource_group,
            &fixture.name,
        );
        if self.scale_sets.contains_key(&key) {
            return Err(ArmError::new(
                StatusCode::CONFLICT,
                "Conflict",
                format!("scale set {} already exists", fixture.name),
            ));
        }
        let set = ScaleSet::from_fixture(fixture, now)?;
        self.scale_sets.insert(key, set);
        Ok(())
    }

    /// Creates an AKS agent pool: its scale set in the node resource group.
    pub fn create_agent_pool(
        &mut self,
        fixture: AgentPoolFixture,
        now: Instant,
    ) -> Result<ScaleSetKey, ArmError> {
        let (fixture, aks) = fixture.into_scale_set()?;
        if self
            .agent_pool(
                &fixture.subscription_id,
                &aks.resource_group,
                &aks.cluster,
                &aks.name,
            )
            .is_some()
        {
            return Err(ArmError::new(
                StatusCode::CONFLICT,
                "Conflict",
                format!(
                    "agent pool {} of cluster {} already exists",
                    aks.name, aks.cluster
                ),
            ));
        }
        let key = ScaleSetKey::new(
            &fixture.subscription_id,
            &fixture.resource_group,
            &fixture.name,
        );
        self.create_scale_set(fixture, now)?;
        if let Some(set) = self.scale_sets.get_mut(&key) {
            set.aks = Some(aks);
        }
        Ok(key)
    }

    /// The scale set of an agent pool.
    pub fn agent_pool(
        &self,
        subscription: &str,
        resource_group: &str,
        cluster: &str,
        name: &str,
    ) -> Option<ScaleSetKey> {
        self.scale_sets.iter().find_map(|(key, set)| {
            (set.subscription.eq_ignore_ascii_case(subscription)
                && set
                    .aks
                    .as_ref()
                    .is_some_and(|a| a.matches(resource_group, cluster, name)))
            .then(|| key.clone())
        })
    }

    /// True while an operation on `key` runs (AKS refuses another one then).
    pub fn busy(&self, key: &ScaleSetKey) -> bool {
        self.operations.values().any(|o| {
            o.status == OperationStatus::InProgress
                && matches!(&o.change, Change::Scale { key: k, .. } | Change::DeleteInstances { key: k, .. } if k == key)
        })
    }

    /// Removes a scale set and its VMs at once; false when there is none.
    pub fn delete_scale_set(&mut self, key: &ScaleSetKey) -> bool {
        self.scale_sets.remove(key).is_some()
    }

    /// The scale set and instance id of the VM whose computer name (its Node's
    /// name) is `name`.
    pub fn vm_named(&self, name: &str) -> Option<(ScaleSetKey, u32)> {
        self.scale_sets.iter().find_map(|(key, set)| {
            set.vms
                .keys()
                .find(|id| set.computer_name(**id) == name)
                .map(|id| (key.clone(), *id))
        })
    }

    /// Deletes one VM at once, as Azure does to an evicted spot VM whose eviction
    /// policy is Delete: the scale set's capacity drops by one.
    pub fn evict(&mut self, (key, id): &(ScaleSetKey, u32)) {
        if let Some(set) = self.scale_sets.get_mut(key)
            && set.vms.remove(id).is_some()
        {
            set.capacity = set.capacity.saturating_sub(1);
        }
    }

    pub fn scale_set(&self, key: &ScaleSetKey) -> Option<&ScaleSet> {
        self.scale_sets.get(key)
    }

    pub fn scale_sets(&self) -> impl Iterator<Item = &ScaleSet> {
        self.scale_sets.values()
    }

    /// Regions of the scale sets.
    pub fn regions(&self) -> Vec<String> {
        let mut regions: Vec<String> = self
            .scale_sets
            .values()
            .map(|s| s.location.to_ascii_lowercase())
            .collect();
        regions.sort();
        regions.dedup();
        regions
    }

    pub fn operation(&self, id: &str) -> Option<&Operation> {
        self.operations.get(id)
    }

    /// Live VMs of `sku` in `region` (in `zone`, when given), over every scale set.
    pub fn count_vms(&self, sku: &str, region: &str, zone: Option<&str>) -> u32 {
        let n = self
            .scale_sets
            .values()
            .filter(|s| s.sku.eq_ignore_ascii_case(sku) && s.location.eq_ignore_ascii_case(region))
            .flat_map(|s| s.live_vms())
            .filter(|v| zone.is_none() || v.zone.as_deref() == zone)
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// The zones the VMs added by growing `key` to `target` would go to (one entry
    /// per new VM); empty when `target` does not grow it.
    pub fn zones_for_growth(&self, key: &ScaleSetKey, target: u32) -> Vec<Option<String>> {
        let Some(set) = self.scale_sets.get(key) else {
            return Vec::new();
        };
        let live = set.live_vms().count() as u32;
        let mut zones = Vec::new();
        for _ in live..target {
            let zone = set.next_zone(&zones);
            zones.push(zone);
        }
        zones
    }

    /// Starts setting `sku.capacity` of `key` to `target`; returns the operation id.
    pub fn begin_scale(
        &mut self,
        key: &ScaleSetKey,
        target: u32,
        plan: OperationPlan,
        now: Instant,
    ) -> Result<String, ArmError> {
        let zones = self.zones_for_growth(key, target);
        let set = self.scale_sets.get_mut(key).ok_or_else(|| {
            ArmError::new(
                StatusCode::NOT_FOUND,
                "ResourceNotFound",
                "scale set not found",
            )
        })?;
        let removed = set.scale_in_victims(target);
        for id in &removed {
            if let Some(vm) = set.vms.get_mut(id) {
                vm.state = VmState::Deleting;
            }
        }
        let created = zones
            .into_iter()
            .map(|zone| set.add_vm(zone, VmState::Creating))
            .collect();
        set.capacity = target;
        set.provisioning_state = "Updating";
        Ok(self.start(
            Some(key.clone()),
            Change::Scale {
                key: key.clone(),
                created,
                removed,
            },
            plan,
            now,
        ))
    }

    /// Starts deleting the VMs `instance_ids` of `key` (`deleteInstances`).
    pub fn begin_delete_instances(
        &mut self,
        key: &ScaleSetKey,
        instance_ids: &[String],
        plan: OperationPlan,
        now: Instant,
    ) -> Result<String, ArmError> {
        let set = self.scale_sets.get_mut(key).ok_or_else(|| {
            ArmError::new(
                StatusCode::NOT_FOUND,
                "ResourceNotFound",
                "scale set not found",
            )
        })?;
        let mut ids = Vec::new();
        for raw in instance_ids {
            match raw
                .parse::<u32>()
                .ok()
                .filter(|id| set.vms.contains_key(id))
            {
                Some(id) => ids.push(id),
                None => {
                    return Err(ArmError::new(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        format!(
                            "The virtual machine scale set VM with instance id '{raw}' was not found in scale set '{}'.",
                            set.name
                        ),
                    ));
                }
            }
        }
        if ids.is_empty() {
            return Err(ArmError::bad_request(
                "InvalidParameter",
                "instanceIds must name at least one VM of the scale set.",
            ));
        }
        let mut newly = 0;
        for id in &ids {
            if let Some(vm) = set.vms.get_mut(id)
                && vm.state != VmState::Deleting
            {
                vm.state = VmState::Deleting;
                newly += 1;
            }
        }
        set.capacity = set.capacity.saturating_sub(newly);
        set.provisioning_state = "Updating";
        Ok(self.start(
            None,
            Change::DeleteInstances {
                key: key.clone(),
                ids,
            },
            plan,
            now,
        ))
    }

    fn start(
        &mut self,
        scale_set: Option<ScaleSetKey>,
        change: Change,
        plan: OperationPlan,
        now: Instant,
    ) -> String {
        let id = format!("{}", uuid::Uuid::new_v4());
        self.operations.insert(
            id.clone(),
            Operation {
                id: id.clone(),
                started: Timestamp::now(),
                ended: None,
                status: OperationStatus::InProgress,
                scale_set,
                due: now + self.operation_time,
                plan,
                change,
            },
        );
        id
    }

    /// Finishes every operation that is due and not stalled (`still_active` says
    /// whether a stalling fault is still injected).
    pub fn advance(&mut self, now: Instant, still_active: impl Fn(&str) -> bool) {
        let due: Vec<String> = self
            .operations
            .values()
            .filter(|op| op.status == OperationStatus::InProgress && op.due <= now)
            .filter(|op| {
                op.plan
                    .stalled_by
                    .as_deref()
                    .is_none_or(|id| !still_active(id))
            })
            .map(|op| op.id.clone())
            .collect();
        for id in due {
            let Some(op) = self.operations.get(&id).cloned() else {
                continue;
            };
            let status = self.finish(&op, now);
            if let Some(entry) = self.operations.get_mut(&id) {
                entry.status = status;
                entry.ended = Some(Timestamp::now());
            }
        }
    }

    fn finish(&mut self, op: &Operation, now: Instant) -> OperationStatus {
        let key = match &op.change {
            Change::Scale { key, .. } | Change::DeleteInstances { key, .. } => key.clone(),
        };
        let pending_after = self
            .operations
            .values()
            .filter(|o| o.id != op.id && o.status == OperationStatus::InProgress)
            .any(|o| matches!(&o.change, Change::Scale { key: k, .. } | Change::DeleteInstances { key: k, .. } if *k == key));
        let Some(set) = self.scale_sets.get_mut(&key) else {
            return OperationStatus::Failed(ArmError::new(
                StatusCode::NOT_FOUND,
                "ResourceNotFound",
                "The scale set was deleted while the operation ran.",
            ));
        };
        let outcome = match (&op.change, &op.plan.failure) {
            (
                Change::Scale {
                    created, removed, ..
                },
                None,
            ) => {
                for id in created {
                    if let Some(vm) = set.vms.get_mut(id) {
                        vm.state = VmState::Running;
                        vm.up_since = Some(now);
                    }
                }
                for id in removed {
                    set.vms.remove(id);
                }
                OperationStatus::Succeeded
            }
            (
                Change::Scale {
                    created, removed, ..
                },
                Some(error),
            ) => {
                // Nothing was allocated: the new VMs go, the ones to remove stay.
                for id in created {
                    set.vms.remove(id);
                }
                for id in removed {
                    if let Some(vm) = set.vms.get_mut(id) {
                        vm.state = VmState::Running;
                    }
                }
                set.capacity = set.live_vms().count() as u32;
                OperationStatus::Failed(error.clone())
            }
            (Change::DeleteInstances { ids, .. }, None) => {
                for id in ids {
                    set.vms.remove(id);
                }
                OperationStatus::Succeeded
            }
            (Change::DeleteInstances { ids, .. }, Some(error)) => {
                for id in ids {
                    if let Some(vm) = set.vms.get_mut(id) {
                        vm.state = VmState::Running;
                    }
                }
                set.capacity = set.live_vms().count() as u32;
                OperationStatus::Failed(error.clone())
            }
        };
        set.provisioning_state = match (&outcome, pending_after) {
            (_, true) => "Updating",
            (OperationStatus::Failed(_), false) => "Failed",
            _ => "Succeeded",
        };
        outcome
    }

    /// Forgets every scale set and operation.
    pub fn reset(&mut self) {
        self.scale_sets.clear();
        self.operations.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn fixture(zones: &[&str], capacity: u32) -> ScaleSetFixture {
        ScaleSetFixture {
            subscription_id: "sub".into(),
            resource_group: "rg".into(),
            name: "gpu".into(),
            location: "eastus".into(),
            sku: "Standard_ND96isr_H100_v5".into(),
            zones: zones.iter().map(|z| z.to_string()).collect(),
            capacity,
            pool: Some("azure-h100".into()),
            cluster: None,
            tags: BTreeMap::new(),
            gpus: None,
        }
    }

    fn cloud_with(zones: &[&str], capacity: u32, t0: Instant) -> (AzureCloud, ScaleSetKey) {
        let mut cloud = AzureCloud::new(SECOND);
        cloud
            .create_scale_set(fixture(zones, capacity), t0)
            .unwrap();
        (cloud, ScaleSetKey::new("SUB", "RG", "GPU"))
    }

    fn states(cloud: &AzureCloud, key: &ScaleSetKey) -> Vec<(u32, Option<String>, VmState)> {
        cloud
            .scale_set(key)
            .unwrap()
            .vms
            .values()
            .map(|v| (v.instance_id, v.zone.clone(), v.state))
            .collect()
    }

    #[test]
    fn scaling_out_spreads_over_zones_and_finishes_when_due() {
        let t0 = Instant::now();
        let (mut cloud, key) = cloud_with(&["1", "2"], 1, t0);
        let op = cloud
            .begin_scale(&key, 3, OperationPlan::default(), t0)
            .unwrap();
        assert_eq!(cloud.scale_set(&key).unwrap().capacity, 3);
        assert_eq!(
            cloud.scale_set(&key).unwrap().provisioning_state,
            "Updating"
        );
        assert_eq!(
            states(&cloud, &key),
            vec![
                (0, Some("1".into()), VmState::Running),
                (1, Some("2".into()), VmState::Creating),
                (2, Some("1".into()), VmState::Creating),
            ]
        );
        cloud.advance(t0, |_| false);
        assert_eq!(
            cloud.operation(&op).unwrap().status,
            OperationStatus::InProgress
        );
        cloud.advance(t0 + SECOND, |_| false);
        assert_eq!(
            cloud.operation(&op).unwrap().status,
            OperationStatus::Succeeded
        );
        assert!(
            states(&cloud, &key)
                .iter()
                .all(|(_, _, s)| *s == VmState::Running)
        );
        assert_eq!(
            cloud.scale_set(&key).unwrap().provisioning_state,
            "Succeeded"
        );
        assert_eq!(
            cloud.count_vms("standard_nd96isr_h100_v5", "EastUS", Some("1")),
            2
        );
    }

    #[test]
    fn scaling_in_takes_the_highest_id_of_the_busiest_zone() {
        let t0 = Instant::now();
        let (mut cloud, key) = cloud_with(&["1", "2"], 3, t0);
        cloud
            .begin_scale(&key, 2, OperationPlan::default(), t0)
            .unwrap();
        assert_eq!(
            states(&cloud, &key)[2],
            (2, Some("1".into()), VmState::Deleting)
        );
        cloud.advance(t0 + SECOND, |_| false);
        assert_eq!(states(&cloud, &key).len(), 2);
    }

    #[test]
    fn a_failed_scale_out_leaves_the_set_as_it_was() {
        let t0 = Instant::now();
        let (mut cloud, key) = cloud_with(&["1"], 1, t0);
        let error = ArmError::new(StatusCode::OK, "ZonalAllocationFailed", "no room");
        let plan = OperationPlan {
            failure: Some(error.clone()),
            stalled_by: None,
        };
        let op = cloud.begin_scale(&key, 4, plan, t0).unwrap();
        cloud.advance(t0 + SECOND, |_| false);
        assert_eq!(
            cloud.operation(&op).unwrap().status,
            OperationStatus::Failed(error)
        );
        let set = cloud.scale_set(&key).unwrap();
        assert_eq!(
            (set.capacity, set.vms.len(), set.provisioning_state),
            (1, 1, "Failed")
        );
    }

    #[test]
    fn a_stalled_operation_waits_for_its_fault_to_clear() {
        let t0 = Instant::now();
        let (mut cloud, key) = cloud_with(&[], 0, t0);
        let plan = OperationPlan {
            failure: None,
            stalled_by: Some("f1".into()),
        };
        let op = cloud.begin_scale(&key, 1, plan, t0).unwrap();
        cloud.advance(t0 + 10 * SECOND, |id| id == "f1");
        assert_eq!(
            cloud.operation(&op).unwrap().status,
            OperationStatus::InProgress
        );
        cloud.advance(t0 + 10 * SECOND, |_| false);
        assert_eq!(
            cloud.operation(&op).unwrap().status,
            OperationStatus::Succeeded
        );
        assert_eq!(states(&cloud, &key), vec![(0, None, VmState::Running)]);
    }

    #[test]
    fn delete_instances_lowers_capacity_and_removes_the_vms() {
        let t0 = Instant::now();
        let (mut cloud, key) = cloud_with(&["1", "2", "3"], 3, t0);
        let unknown =
            cloud.begin_delete_instances(&key, &["7".into()], OperationPlan::default(), t0);
        assert_eq!(unknown.unwrap_err().code, "NotFound");
        let op = cloud
            .begin_delete_instances(
                &key,
                &["0".into(), "2".into()],
                OperationPlan::default(),
                t0,
            )
            .unwrap();
        assert_eq!(cloud.scale_set(&key).unwrap().capacity, 1);
        cloud.advance(t0 + SECOND, |_| false);
        assert_eq!(
            cloud.operation(&op).unwrap().status,
            OperationStatus::Succeeded
        );
        assert_eq!(
            states(&cloud, &key),
            vec![(1, Some("2".into()), VmState::Running)]
        );
    }

    #[test]
    fn computer_names_follow_aks() {
        let t0 = Instant::now();
        let (cloud, key) = cloud_with(&[], 0, t0);
        let set = cloud.scale_set(&key).unwrap();
        assert_eq!(set.computer_name(0), "gpu000000");
        assert_eq!(set.computer_name(37), "gpu000011");
        assert_eq!(set.gpus_per_vm(), 8);
    }
}
