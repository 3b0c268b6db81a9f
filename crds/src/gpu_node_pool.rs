//! `GpuNodePool`: a set of identical GPU nodes in one provider and region.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Taint;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::POOL_LABEL;
use crate::provider::{CapacityType, Provider};

/// Desired state of a GpuNodePool: where its nodes live, what they carry, what they
/// cost, and how Outrigger may grow and shrink them.
// The printer columns repeat `type_ = ...` and `priority = ...`, which clippy takes
// for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "outrigger.dev",
    version = "v1alpha1",
    kind = "GpuNodePool",
    plural = "gpunodepools",
    shortname = "gnp",
    category = "outrigger",
    status = "GpuNodePoolStatus",
    derive = "PartialEq",
    doc = "A GpuNodePool is a set of identical GPU nodes in one cloud provider and region \
           (an EC2 instance group or an Azure VM scale set). Outrigger places ModelDeployment \
           replicas on pools and, when `scaling` is set, grows and shrinks them.",
    selectable = ".spec.provider",
    selectable = ".spec.region",
    printcolumn(name = "Provider", type_ = "string", json_path = ".spec.provider"),
    printcolumn(name = "Region", type_ = "string", json_path = ".spec.region"),
    printcolumn(name = "Zone", type_ = "string", json_path = ".spec.zone"),
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.instanceType"),
    printcolumn(name = "GPU", type_ = "string", json_path = ".spec.gpu.type"),
    printcolumn(name = "Nodes", type_ = "integer", json_path = ".status.nodes"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyNodes"),
    printcolumn(
        name = "Backoff-Until",
        type_ = "string",
        json_path = ".status.capacityBackoff.until",
        description = "The pool's offering does not grow before this time"
    ),
    printcolumn(
        name = "Capacity",
        type_ = "string",
        json_path = ".spec.capacityType",
        priority = 1
    ),
    printcolumn(
        name = "Max",
        type_ = "integer",
        json_path = ".spec.nodes.max",
        priority = 1
    ),
    printcolumn(
        name = "Price",
        type_ = "number",
        json_path = ".spec.pricePerNodeHour",
        description = "USD per node-hour",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new(
    "!has(self.scaling) || self.provider != 'aws' || (has(self.scaling.aws) && !has(self.scaling.azure))"
).message("provider is aws, so scaling must set scaling.aws (and not scaling.azure)").field_path(".scaling"))]
#[x_kube(validation = Rule::new(
    "!has(self.scaling) || self.provider != 'azure' || (has(self.scaling.azure) && !has(self.scaling.aws))"
).message("provider is azure, so scaling must set scaling.azure (and not scaling.aws)").field_path(".scaling"))]
#[x_kube(validation = Rule::new(
    "!has(self.zone) || self.provider != 'azure' || self.zone in ['1', '2', '3']"
).message("an azure zone is \"1\", \"2\" or \"3\": set zone to one of them or remove it").field_path(".zone"))]
#[x_kube(validation = Rule::new(
    "!has(self.zone) || self.provider != 'aws' || (self.zone.startsWith(self.region) && size(self.zone) > size(self.region))"
).message("an aws zone is its region plus a suffix (us-east-1a in region us-east-1): set zone to a zone of spec.region or remove it").field_path(".zone"))]
#[x_kube(validation = Rule::new(
    "!has(self.nodeSelector) || size(self.nodeSelector) > 0"
).message("nodeSelector must name at least one label (an empty selector matches every node): remove it to use outrigger.dev/pool=<name>").field_path(".nodeSelector"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(transform = crate::schema::kubernetes_conventions)]
pub struct GpuNodePoolSpec {
    /// Cloud provider of the pool's nodes: `aws` or `azure`.
    pub provider: Provider,

    /// Cloud region of the pool's nodes, as the provider names it (`us-east-1`, `eastus`).
    #[schemars(length(min = 1, max = 64))]
    pub region: String,

    /// Availability zone of the pool's nodes, if they are all in one. AWS zones are the
    /// region plus a suffix (`us-east-1a`); Azure zones are "1", "2" or "3". Absent: the
    /// pool is not tied to a zone, and spread rules `by: zone` count it as a zone of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub zone: Option<String>,

    /// Instance type (AWS, e.g. `p5.48xlarge`) or VM size (Azure, e.g.
    /// `Standard_ND96isr_H100_v5`) of every node in the pool.
    #[schemars(length(min = 1, max = 128))]
    pub instance_type: String,

    /// GPUs on each node of the pool.
    pub gpu: PoolGpu,

    /// How the pool's instances are bought: `on-demand` (default) or `spot`. A
    /// ModelDeployment uses spot pools only if its `placement.capacityTypes` allows them.
    #[serde(default)]
    pub capacity_type: CapacityType,

    /// Price of one node for one hour, in USD. The `cost` placement strategy prefers
    /// the pools where a replica costs least; absent, the pool counts as free.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub price_per_node_hour: Option<f64>,

    /// Bounds on the pool's node count. Outrigger never grows the pool beyond `max`
    /// and never shrinks it below `min`.
    pub nodes: NodeRange,

    /// Labels that identify the pool's Nodes; placed replicas get a node affinity to
    /// them. Default: `outrigger.dev/pool: <pool name>`, which Outrigger sets on the
    /// instances it launches. Must not be empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,

    /// Taints the pool's nodes carry. Replicas placed on the pool tolerate them.
    /// Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taints: Vec<Taint>,

    /// How Outrigger launches and removes the pool's instances. It must name the
    /// pool's own provider: `scaling.aws` for `aws`, `scaling.azure` for `azure`.
    /// Absent: Outrigger does not scale the pool and only places replicas on nodes
    /// that already exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaling: Option<Scaling>,

    /// How Outrigger replaces a broken node of a pool with `scaling`. Default: a
    /// node NotReady for 300 s is replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repair: Option<NodeRepair>,

    /// Seconds a launched instance may take to become a Ready Node. One that has
    /// not by then is terminated and counts as a failed launch of the pool's
    /// offering (a capacity backoff). Default: `--instance-boot-grace-seconds`
    /// (600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 86400))]
    #[x_kube(validation = Rule::new("self >= 10 && self <= 86400").message("registrationTimeoutSeconds must be 10 to 86400 (a day)"))]
    pub registration_timeout_seconds: Option<u32>,
}

/// When a broken node is replaced.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeRepair {
    /// Seconds a node must have been NotReady before its instance is terminated and
    /// replaced; 0 turns repair off. Default 300. Nothing is repaired while more
    /// than one node, and more than 20% of the pool's nodes, are unhealthy, or
    /// while a pool of the same provider and region has lost all its nodes: that is
    /// an outage, and replacing nodes would only add churn.
    #[serde(default = "default_not_ready_after")]
    #[schemars(range(min = 0, max = 86400))]
    #[x_kube(validation = Rule::new("self <= 86400").message("repair.notReadyAfterSeconds must be 0 (off) to 86400 (a day)"))]
    pub not_ready_after_seconds: u32,
}

/// How long a node may be NotReady before it is repaired, by default.
pub const DEFAULT_NOT_READY_AFTER_SECONDS: u32 = 300;

fn default_not_ready_after() -> u32 {
    DEFAULT_NOT_READY_AFTER_SECONDS
}

impl Default for NodeRepair {
    fn default() -> Self {
        NodeRepair {
            not_ready_after_seconds: DEFAULT_NOT_READY_AFTER_SECONDS,
        }
    }
}

/// The GPUs on each node of a pool.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PoolGpu {
    /// GPU model, as ModelDeployments name it in `gpu.types` (e.g. `H100`, `A100-80GB`).
    #[serde(rename = "type")]
    #[schemars(length(min = 1, max = 64))]
    pub r#type: String,

    /// Number of GPUs on each node (at least 1).
    #[schemars(range(min = 1))]
    #[x_kube(validation = Rule::new("self >= 1").message("gpu.count (GPUs per node) must be at least 1"))]
    pub count: u32,

    /// Memory of one GPU, in GiB. Informational; placement does not use it.
    #[serde(rename = "memoryGiB", default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub memory_gib: Option<u32>,
}

/// Bounds on a pool's node count (`min <= max`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[x_kube(validation = Rule::new("self.min <= self.max").message("nodes.min must be <= nodes.max"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeRange {
    /// Fewest nodes the pool keeps, even when no replica needs them.
    pub min: u32,
    /// Most nodes the pool may have. A pool without `scaling` never grows, whatever
    /// this says.
    pub max: u32,
}

/// How Outrigger scales a pool: exactly the block of the pool's own provider.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Scaling {
    /// EC2 settings; required when `provider` is `aws`, forbidden otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws: Option<AwsScaling>,
    /// Azure settings; required when `provider` is `azure`, forbidden otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure: Option<AzureScaling>,
}

/// How Outrigger launches a pool's EC2 instances (`RunInstances`).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AwsScaling {
    /// Launch template the instances start from (AMI, instance profile, user data
    /// that joins the cluster).
    pub launch_template: LaunchTemplateRef,
    /// Subnets to launch into, tried in order; with `zone` set they must be in that
    /// zone. Default: empty, the launch template's network settings apply.
    #[serde(default)]
    pub subnet_ids: Vec<String>,
}

/// An EC2 launch template, by name.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LaunchTemplateRef {
    /// Name of the launch template.
    #[schemars(length(min = 1, max = 128))]
    pub name: String,
    /// Version to launch: a number, `$Latest` or `$Default`. Absent: `$Default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// What holds an Azure pool's nodes: exactly one of a VM scale set
/// (`scaleSetName`, for self-managed clusters on Azure VMs) and an AKS node pool
/// (`agentPool`). On AKS use `agentPool`: the scale sets of a node pool belong to
/// AKS, which refuses or undoes changes made to them directly.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("has(self.scaleSetName) != has(self.agentPool)").message("scaling.azure needs exactly one of scaleSetName (a VM scale set) and agentPool (an AKS node pool; use this on AKS)"))]
#[x_kube(validation = Rule::new("!has(self.scaleSetName) || (has(self.subscriptionId) && has(self.resourceGroup))").message("scaling.azure.scaleSetName needs subscriptionId and resourceGroup (the scale set's)"))]
#[x_kube(validation = Rule::new("!has(self.agentPool) || has(self.scaleSetName) || (!has(self.subscriptionId) && !has(self.resourceGroup))").message("with scaling.azure.agentPool, set subscriptionId and resourceGroup inside agentPool (the managed cluster's), not beside it"))]
pub struct AzureScaling {
    /// Subscription ID (a GUID) that owns the scale set; with `scaleSetName`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub subscription_id: Option<String>,
    /// Resource group of the scale set; with `scaleSetName`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 90))]
    pub resource_group: Option<String>,
    /// Name of the VM scale set. Outrigger changes its capacity and deletes chosen
    /// instances; it does not create the scale set. Not for AKS: use `agentPool`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub scale_set_name: Option<String>,
    /// The AKS node pool (agent pool) of a managed cluster. Outrigger sets its
    /// `count` and removes chosen nodes with `deleteMachines`; it does not create
    /// the pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_pool: Option<AgentPoolRef>,
}

/// An AKS agent pool, by its managed cluster.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentPoolRef {
    /// Subscription ID (a GUID) of the managed cluster.
    #[schemars(length(min = 1, max = 64))]
    pub subscription_id: String,
    /// Resource group of the managed cluster (not its node resource group `MC_...`).
    #[schemars(length(min = 1, max = 90))]
    pub resource_group: String,
    /// Name of the managed cluster.
    #[schemars(length(min = 1, max = 63))]
    pub cluster: String,
    /// Name of the agent pool (`az aks nodepool list`): 1-12 lowercase letters and
    /// digits, starting with a letter.
    #[schemars(length(min = 1, max = 12), pattern(r"^[a-z][a-z0-9]{0,11}$"))]
    pub name: String,
}

/// Observed state of a GpuNodePool, written by Outrigger.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::schema::kubernetes_conventions)]
pub struct GpuNodePoolStatus {
    /// Nodes of the pool that exist in the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<u32>,
    /// Nodes of the pool that are Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_nodes: Option<u32>,
    /// GPUs of the pool's Ready nodes: allocatable, and requested by pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<GpuCounts>,
    /// Nodes the current placements need.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_nodes: Option<u32>,
    /// Instances the cloud reports for the pool, including ones not yet Nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_instances: Option<u32>,
    /// Since when every started node of the pool has been lost (NotReady or
    /// unreachable); absent while any is Ready. Placement reads this, not the
    /// `Ready` condition's words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_since: Option<Time>,
    /// When the pool's nodes came back after all were lost; each ModelDeployment
    /// moves replicas back only `failover.rebalanceAfterSeconds` after this.
    /// Absent until a pool first recovers; cleared when it is lost again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovered_at: Option<Time>,
    /// The last capacity or quota error of a pool with `scaling`, and the growth
    /// backoff it started. The pool does not grow while `until` is in the future; it
    /// stays after that, so a repeated error doubles the backoff, and goes when a
    /// launch succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_backoff: Option<CapacityBackoff>,
    /// `Ready`, `CapacityAvailable` and `CloudReachable`, with reason and message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// A growth backoff after a capacity or quota error, as typed facts.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CapacityBackoff {
    /// The pool does not grow before this time.
    pub until: Time,
    /// Length of this backoff in seconds (it doubles while errors repeat).
    pub seconds: u32,
    /// The kind of error: `InsufficientCapacity`, `QuotaExceeded`, `Interrupted`
    /// (the cloud reclaimed a spot instance) or `RegistrationTimeout` (an instance
    /// never became a Ready Node).
    pub reason: String,
    /// The cloud's own error code, e.g. `InsufficientInstanceCapacity`.
    pub code: String,
    /// The offering that failed: instance type, zone (if any) and capacity type.
    pub offering: Offering,
}

/// What a launch asks the cloud for: one instance type in one zone, on-demand or spot.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Offering {
    /// The pool's `instanceType`.
    pub instance_type: String,
    /// The pool's `zone`; absent for a regional pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// The pool's `capacityType`.
    pub capacity_type: CapacityType,
}

/// GPU totals over a pool's Ready nodes.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GpuCounts {
    /// GPUs the nodes can run pods on (`nvidia.com/gpu` allocatable).
    pub allocatable: u32,
    /// GPUs requested by the pods on the nodes, Outrigger's and others'.
    pub requested: u32,
}

impl GpuNodePool {
    /// The labels that select this pool's Nodes: `spec.nodeSelector` when set (and
    /// not empty), otherwise `outrigger.dev/pool: <name>`.
    pub fn node_selector(&self) -> BTreeMap<String, String> {
        match &self.spec.node_selector {
            Some(selector) if !selector.is_empty() => selector.clone(),
            _ => BTreeMap::from([(POOL_LABEL.to_string(), self.name_any())]),
        }
    }

    /// Whether a Node with these labels belongs to this pool.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.node_selector()
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    }
}
