//! AKS agent pools: a node pool of a managed cluster is a VM scale set in the
//! cluster's node resource group (`MC_<group>_<cluster>_<location>`), named and
//! labelled as AKS names them. The agent pool API changes its `count` and deletes
//! chosen machines; the scale set underneath is the same model as
//! [`super::scale_set`], so capacity, faults and the registrar treat both alike.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::cloud::{AzureCloud, OperationPlan};
use super::error::ArmError;
use super::plan::add_operation_faults;
use super::scale_set::{ScaleSet, ScaleSetFixture, ScaleSetKey, Vm};
use super::{
    Namespace, OperationLinks, Params, begin_capacity, json_body, operation_headers, settled,
};
use crate::simulator::Shared;

/// Resource type of an agent pool.
pub const AGENT_POOL_TYPE: &str = "Microsoft.ContainerService/managedClusters/agentPools";
/// The Node label AKS gives every node of a pool.
pub const AGENT_POOL_LABEL: &str = "kubernetes.azure.com/agentpool";

/// Which managed cluster and pool a scale set belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AksPool {
    /// The managed cluster's own resource group (not the node resource group).
    pub resource_group: String,
    pub cluster: String,
    pub name: String,
}

impl AksPool {
    pub fn matches(&self, resource_group: &str, cluster: &str, name: &str) -> bool {
        self.resource_group.eq_ignore_ascii_case(resource_group)
            && self.cluster.eq_ignore_ascii_case(cluster)
            && self.name.eq_ignore_ascii_case(name)
    }
}

/// An agent pool to create (a test fixture, through the control API).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentPoolFixture {
    pub subscription_id: String,
    /// The managed cluster's resource group.
    pub resource_group: String,
    /// The managed cluster's name.
    pub cluster: String,
    /// The agent pool's name: 1-12 lowercase letters and digits, a letter first.
    pub name: String,
    pub location: String,
    pub vm_size: String,
    /// Availability zones ("1", "2", "3"); empty: a regional pool.
    #[serde(default)]
    pub zones: Vec<String>,
    /// Nodes it starts with.
    #[serde(default)]
    pub count: u32,
    /// Sets the node label (and tag) `outrigger.dev/pool`.
    #[serde(default)]
    pub pool: Option<String>,
    /// GPUs per node, for a size the catalog does not know.
    #[serde(default)]
    pub gpus: Option<u32>,
}

impl AgentPoolFixture {
    /// The scale set AKS makes for the pool, and the pool it belongs to.
    pub fn into_scale_set(self) -> Result<(ScaleSetFixture, AksPool), ArmError> {
        let name_ok = self.name.len() <= 12
            && self.name.starts_with(|c: char| c.is_ascii_lowercase())
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if !name_ok {
            return Err(ArmError::bad_request(
                "InvalidAgentPoolName",
                format!(
                    "Agent pool name '{}' is invalid: it must be 1-12 lowercase letters and digits, starting with a letter.",
                    self.name
                ),
            ));
        }
        // AKS puts a number derived from the cluster into every scale set's name.
        let id = fnv32(&format!(
            "{}/{}/{}",
            self.subscription_id.to_ascii_lowercase(),
            self.resource_group.to_ascii_lowercase(),
            self.cluster.to_ascii_lowercase()
        )) % 100_000_000;
        let aks = AksPool {
            resource_group: self.resource_group.clone(),
            cluster: self.cluster.clone(),
            name: self.name.clone(),
        };
        let fixture = ScaleSetFixture {
            subscription_id: self.subscription_id,
            resource_group: format!(
                "MC_{}_{}_{}",
                self.resource_group, self.cluster, self.location
            ),
            name: format!("aks-{}-{id:08}-vmss", self.name),
            location: self.location,
            sku: self.vm_size,
            zones: self.zones,
            capacity: self.count,
            pool: self.pool,
            cluster: None,
            tags: BTreeMap::from([
                ("aks-managed-poolName".to_string(), self.name.clone()),
                (
                    "aks-managed-createOperationID".to_string(),
                    uuid::Uuid::new_v4().to_string(),
                ),
            ]),
            gpus: self.gpus,
        };
        Ok((fixture, aks))
    }
}

fn fnv32(text: &str) -> u32 {
    text.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// The ARM id of an agent pool.
pub fn agent_pool_id(subscription: &str, aks: &AksPool) -> String {
    format!(
        "/subscriptions/{subscription}/resourceGroups/{}/providers/Microsoft.ContainerService/managedClusters/{}/agentPools/{}",
        aks.resource_group, aks.cluster, aks.name
    )
}

/// An agent pool as AKS shows it.
pub fn agent_pool_json(set: &ScaleSet, aks: &AksPool) -> Value {
    let mut properties = json!({
        "count": set.capacity,
        "vmSize": set.sku,
        "osType": "Linux",
        "mode": "User",
        "type": "VirtualMachineScaleSets",
        "enableAutoScaling": false,
        "provisioningState": set.provisioning_state,
        "powerState": {"code": "Running"},
        "nodeLabels": set.tags.get(outrigger_crds::POOL_LABEL).map(|p| json!({outrigger_crds::POOL_LABEL: p})).unwrap_or_else(|| json!({})),
    });
    if !set.zones.is_empty() {
        properties["availabilityZones"] = json!(set.zones);
    }
    json!({
        "id": agent_pool_id(&set.subscription, aks),
        "name": aks.name,
        "type": AGENT_POOL_TYPE,
        "properties": properties,
    })
}

/// One machine (node) of an agent pool: its name is the Node's, its `resourceId`
/// the scale-set VM's.
pub fn machine_json(set: &ScaleSet, aks: &AksPool, vm: &Vm) -> Value {
    let name = set.computer_name(vm.instance_id);
    let mut body = json!({
        "id": format!("{}/machines/{name}", agent_pool_id(&set.subscription, aks)),
        "name": name,
        "type": format!("{AGENT_POOL_TYPE}/machines"),
        "properties": {
            "resourceId": format!("{}/virtualMachines/{}", set.id(), vm.instance_id),
            "network": {"ipAddresses": [{"family": "IPv4", "ip": format!("10.224.{}.{}", vm.instance_id / 250, 4 + vm.instance_id % 250)}]},
        },
    });
    if let Some(zone) = &vm.zone {
        body["zones"] = json!([zone]);
    }
    body
}

/// The scale set of the agent pool a request names, or AKS's not-found error.
fn find_pool(
    cloud: &AzureCloud,
    (sub, rg, cluster, pool): &(String, String, String, String),
) -> Result<ScaleSetKey, ArmError> {
    cloud.agent_pool(sub, rg, cluster, pool).ok_or_else(|| {
        ArmError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("The agent pool '{pool}' of managed cluster '{cluster}' in resource group '{rg}' was not found."),
        )
    })
}

fn pool_of<'a>(
    cloud: &'a AzureCloud,
    key: &ScaleSetKey,
) -> Result<(&'a ScaleSet, &'a AksPool), ArmError> {
    cloud
        .scale_set(key)
        .and_then(|set| set.aks.as_ref().map(|aks| (set, aks)))
        .ok_or_else(|| {
            ArmError::new(
                StatusCode::NOT_FOUND,
                "NotFound",
                "The agent pool was not found.",
            )
        })
}

type PoolPath = Path<(String, String, String, String)>;

pub(super) async fn list(
    State(shared): State<Arc<Shared>>,
    Path((sub, rg, cluster)): Path<(String, String, String)>,
) -> Response {
    let cloud = settled(&shared);
    let value: Vec<Value> = cloud
        .scale_sets()
        .filter(|s| s.subscription.eq_ignore_ascii_case(&sub))
        .filter_map(|s| {
            let aks = s.aks.as_ref()?;
            (aks.resource_group.eq_ignore_ascii_case(&rg)
                && aks.cluster.eq_ignore_ascii_case(&cluster))
            .then(|| agent_pool_json(s, aks))
        })
        .collect();
    axum::Json(json!({ "value": value })).into_response()
}

pub(super) async fn get(
    State(shared): State<Arc<Shared>>,
    Path(path): PoolPath,
) -> Result<Response, ArmError> {
    let cloud = settled(&shared);
    let (set, aks) = pool_of(&cloud, &find_pool(&cloud, &path)?)?;
    Ok(axum::Json(agent_pool_json(set, aks)).into_response())
}

/// PUT or PATCH of an agent pool: only `properties.count` changes. As in AKS, a
/// second operation while one runs is refused, and a quota check fails the
/// request itself; a shortage of VMs fails the operation later.
pub(super) async fn update(
    State(shared): State<Arc<Shared>>,
    Path(path): PoolPath,
    Query(query): Params,
    body: Bytes,
) -> Result<Response, ArmError> {
    let update: Value = json_body(&body)?;
    let mut cloud = settled(&shared);
    let key = find_pool(&cloud, &path)?;
    let (set, aks) = pool_of(&cloud, &key)?;
    if let Some(size) = update.pointer("/properties/vmSize").and_then(Value::as_str)
        && !size.eq_ignore_ascii_case(&set.sku)
    {
        return Err(ArmError::bad_request(
            "PropertyChangeNotAllowed",
            "Changing property 'vmSize' is not allowed.",
        ));
    }
    let Some(target) = update.pointer("/properties/count").and_then(Value::as_u64) else {
        return Ok(axum::Json(agent_pool_json(set, aks)).into_response());
    };
    let target = u32::try_from(target)
        .ok()
        .filter(|t| *t <= 1000)
        .ok_or_else(|| {
            ArmError::bad_request(
                "InvalidParameter",
                "properties.count must be between 0 and 1000.",
            )
        })?;
    if cloud.busy(&key) {
        return Err(in_progress(&path.3));
    }
    let (location, name) = (set.location.clone(), aks.name.clone());
    let operation = begin_capacity(&shared, &mut cloud, &key, target, &name, Instant::now())
        .map_err(as_aks_error)?;
    let retry_after = cloud.retry_after_seconds();
    let (set, aks) = pool_of(&cloud, &key)?;
    let body = agent_pool_json(set, aks);
    drop(cloud);
    shared.wake_registrar();
    tracing::info!(agent_pool = %name, target, %operation, "azure: agent pool count update accepted");
    let mut response = axum::Json(body).into_response();
    operation_headers(
        &shared,
        response.headers_mut(),
        &OperationLinks {
            namespace: Namespace::ContainerService,
            sub: &path.0,
            location: &location,
            operation: &operation,
            retry_after,
        },
        &query,
    );
    Ok(response)
}

/// The error AKS gives while another operation on the pool runs.
fn in_progress(pool: &str) -> ArmError {
    ArmError::new(
        StatusCode::CONFLICT,
        "OperationNotAllowed",
        format!(
            "Operation is not allowed because there's an in progress scale operation on agent pool '{pool}'. Please wait for it to finish before sending another request."
        ),
    )
}

/// Compute's quota refusal as AKS reports it (its preflight check).
fn as_aks_error(error: ArmError) -> ArmError {
    if error.code == "OperationNotAllowed" {
        return ArmError::bad_request(
            "QuotaExceeded",
            format!(
                "Preflight validation check for resource(s) for container service failed. {}",
                error.message
            ),
        );
    }
    error
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MachineNames {
    machine_names: Vec<String>,
}

/// `deleteMachines`: removes the named machines and lowers `count` by as many.
pub(super) async fn delete_machines(
    State(shared): State<Arc<Shared>>,
    Path(path): PoolPath,
    Query(query): Params,
    body: Bytes,
) -> Result<Response, ArmError> {
    let names: MachineNames = json_body(&body)?;
    let mut cloud = settled(&shared);
    let key = find_pool(&cloud, &path)?;
    if cloud.busy(&key) {
        return Err(in_progress(&path.3));
    }
    let (set, aks) = pool_of(&cloud, &key)?;
    let mut ids = Vec::new();
    for name in &names.machine_names {
        let id = set
            .live_vms()
            .find(|vm| set.computer_name(vm.instance_id).eq_ignore_ascii_case(name))
            .ok_or_else(|| {
                ArmError::bad_request(
                    "InvalidParameter",
                    format!(
                        "Machine '{name}' was not found in agent pool '{}'.",
                        aks.name
                    ),
                )
            })?;
        ids.push(id.instance_id.to_string());
    }
    let (location, name) = (set.location.clone(), aks.name.clone());
    let mut plan = OperationPlan::default();
    add_operation_faults(&mut shared.book(), &mut plan, &name);
    let operation = cloud.begin_delete_instances(&key, &ids, plan, Instant::now())?;
    let retry_after = cloud.retry_after_seconds();
    drop(cloud);
    shared.wake_registrar();
    tracing::info!(agent_pool = %name, machines = ?names.machine_names, %operation, "azure: deleteMachines accepted");
    let mut response = StatusCode::ACCEPTED.into_response();
    operation_headers(
        &shared,
        response.headers_mut(),
        &OperationLinks {
            namespace: Namespace::ContainerService,
            sub: &path.0,
            location: &location,
            operation: &operation,
            retry_after,
        },
        &query,
    );
    Ok(response)
}

pub(super) async fn list_machines(
    State(shared): State<Arc<Shared>>,
    Path(path): PoolPath,
) -> Result<Response, ArmError> {
    let cloud = settled(&shared);
    let (set, aks) = pool_of(&cloud, &find_pool(&cloud, &path)?)?;
    let value: Vec<Value> = set
        .live_vms()
        .map(|vm| machine_json(set, aks, vm))
        .collect();
    Ok(axum::Json(json!({ "value": value })).into_response())
}

pub(super) async fn get_machine(
    State(shared): State<Arc<Shared>>,
    Path((sub, rg, cluster, pool, machine)): Path<(String, String, String, String, String)>,
) -> Result<Response, ArmError> {
    let cloud = settled(&shared);
    let (set, aks) = pool_of(&cloud, &find_pool(&cloud, &(sub, rg, cluster, pool))?)?;
    let vm = set
        .live_vms()
        .find(|vm| {
            set.computer_name(vm.instance_id)
                .eq_ignore_ascii_case(&machine)
        })
        .ok_or_else(|| {
            ArmError::new(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("Machine '{machine}' was not found."),
            )
        })?;
    Ok(axum::Json(machine_json(set, aks, vm)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> AgentPoolFixture {
        AgentPoolFixture {
            subscription_id: "sub".to_string(),
            resource_group: "rg-llm".to_string(),
            cluster: "aks-east".to_string(),
            name: name.to_string(),
            location: "eastus".to_string(),
            vm_size: "Standard_ND96isr_H100_v5".to_string(),
            zones: vec!["1".to_string()],
            count: 2,
            pool: Some("azure-h100".to_string()),
            gpus: None,
        }
    }

    #[test]
    fn an_agent_pool_is_a_scale_set_named_as_aks_names_it() {
        let (set, aks) = fixture("gpu").into_scale_set().expect("a valid pool");
        assert_eq!(set.resource_group, "MC_rg-llm_aks-east_eastus");
        assert!(set.name.starts_with("aks-gpu-"), "{}", set.name);
        assert!(set.name.ends_with("-vmss"), "{}", set.name);
        assert_eq!(set.name.len(), "aks-gpu-12345678-vmss".len());
        assert_eq!(aks.name, "gpu");
        // The same cluster always gets the same number.
        let (again, _) = fixture("gpu").into_scale_set().expect("a valid pool");
        assert_eq!(set.name, again.name);
    }

    #[test]
    fn agent_pool_names_follow_aks_rules() {
        for bad in ["GPU", "1gpu", "gpu-pool", "averyverylongname"] {
            let e = fixture(bad).into_scale_set().expect_err(bad);
            assert_eq!(e.code, "InvalidAgentPoolName", "{bad}");
        }
    }
}
