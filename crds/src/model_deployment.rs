//! `ModelDeployment`: an inference server, its replicas, and how spread out they must be.

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::provider::{CapacityType, Provider};

/// Desired state of a ModelDeployment: the inference server, how many replicas, which
/// GPUs each needs, and how the replicas must be spread over providers, regions and
/// zones.
// The printer columns repeat `type_ = ...` and `priority = ...`, which clippy takes
// for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "outrigger.dev",
    version = "v1alpha1",
    kind = "ModelDeployment",
    plural = "modeldeployments",
    shortname = "md",
    category = "outrigger",
    namespaced,
    status = "ModelDeploymentStatus",
    derive = "PartialEq",
    doc = "A ModelDeployment runs replicas of a GPU inference server on GpuNodePools, spread \
           over clouds, regions and zones as its placement asks, and moves them when a pool \
           loses nodes or capacity.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Providers", type_ = "string", json_path = ".status.providers"),
    printcolumn(
        name = "Diversified",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Diversified\")].status"
    ),
    printcolumn(
        name = "Unplaced",
        type_ = "integer",
        json_path = ".status.unplacedReplicas",
        priority = 1
    ),
    printcolumn(
        name = "Cost/h",
        type_ = "number",
        json_path = ".status.costPerHour",
        description = "USD per hour of the placed replicas",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    // The name is every child's `outrigger.dev/deployment` label value, and a label
    // value holds at most 63 characters: a longer name could never be applied.
    validation = Rule::new("size(self.metadata.name) <= 63")
        .message("metadata.name must be at most 63 characters: it is the outrigger.dev/deployment label of every replica, and a label value holds at most 63; choose a shorter name")
)]
#[x_kube(validation = Rule::new("has(self.template.spec)")
    .message("template.spec is required: it holds the inference server container(s)")
    .field_path(".template"))]
#[x_kube(validation = Rule::new("!has(self.template.spec) || size(self.template.spec.containers) >= 1")
    .message("template.spec.containers must hold at least one container: the inference server")
    .field_path(".template.spec.containers"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(transform = crate::schema::kubernetes_conventions)]
pub struct ModelDeploymentSpec {
    /// Number of replicas (pods) of the inference server, over all pools (at least 0).
    #[schemars(range(min = 0))]
    #[x_kube(validation = Rule::new("self >= 0").message("replicas must be >= 0"))]
    pub replicas: i32,

    /// GPUs each replica needs, all on one node.
    pub gpu: ReplicaGpu,

    /// Pod template of a replica: the inference server container(s). Outrigger adds the
    /// GPU request, the node affinity to the chosen pool and the pool's tolerations.
    /// The schema of this field is Kubernetes' PodTemplateSpec; see `kubectl explain
    /// pod.spec` for its fields.
    #[schemars(schema_with = "crate::schema::pod_template")]
    pub template: PodTemplateSpec,

    /// Where replicas may go and how spread out they must be.
    #[serde(default)]
    pub placement: PlacementSpec,

    /// How fast replicas leave a failing pool and come back to a recovered one.
    #[serde(default)]
    pub failover: FailoverSpec,

    /// One Service over the replicas of every pool. Absent: no Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceSpec>,
}

/// GPUs of one replica.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReplicaGpu {
    /// GPUs per replica (at least 1); a pool qualifies only if each of its nodes has
    /// at least this many.
    #[schemars(range(min = 1))]
    #[x_kube(validation = Rule::new("self >= 1").message("gpu.count (GPUs per replica) must be at least 1"))]
    pub count: u32,

    /// Acceptable GPU models (a pool's `gpu.type`), most preferred first. Default:
    /// empty, any model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub types: Vec<String>,
}

/// Where a ModelDeployment's replicas may go and how spread out they must be.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PlacementSpec {
    /// Providers replicas may use. Default: empty, every provider.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub providers: Vec<Provider>,

    /// Regions replicas may use (`us-east-1`, `eastus`). Default: empty, every region.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<String>,

    /// Pool capacity types replicas may use: `on-demand`, `spot`. Default: `[on-demand]`.
    #[serde(default = "default_capacity_types")]
    pub capacity_types: Vec<CapacityType>,

    /// How to choose among plans that place as many replicas and honour the spread
    /// rules: `cost` (default) takes the cheapest; `balanced` evens replicas out over
    /// providers, then regions, then zones.
    #[serde(default)]
    pub strategy: Strategy,

    /// Spread rules, at most one per `by`. Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["by".into()]))]
    pub spread: Vec<SpreadRule>,

    /// What to do when the spread rules cannot all hold: `ScheduleAnyway` (default)
    /// places every replica it can and reports `Diversified=False`; `DoNotSchedule`
    /// places only as many replicas as can be placed with every rule holding.
    #[serde(default)]
    pub when_unsatisfiable: WhenUnsatisfiable,
}

impl Default for PlacementSpec {
    fn default() -> Self {
        Self {
            providers: Vec::new(),
            regions: Vec::new(),
            capacity_types: default_capacity_types(),
            strategy: Strategy::default(),
            spread: Vec::new(),
            when_unsatisfiable: WhenUnsatisfiable::default(),
        }
    }
}

fn default_capacity_types() -> Vec<CapacityType> {
    vec![CapacityType::OnDemand]
}

/// How to choose among plans that place equally many replicas: `cost` or `balanced`.
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
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Least total cost per hour.
    #[default]
    Cost,
    /// Smallest largest group at provider, then region, then zone level; then cost.
    Balanced,
}

impl Strategy {
    /// The name used in manifests: `cost` or `balanced`.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Cost => "cost",
            Strategy::Balanced => "balanced",
        }
    }
}

/// A spread rule: replicas must be in at least `minGroups` groups of kind `by`, and no
/// group may hold more than `maxShare` percent of them.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SpreadRule {
    /// What a group is: `provider`, `region`, `zone` (region and zone together; a pool
    /// without a zone is a zone of its own) or `pool`.
    pub by: SpreadBy,

    /// Fewest groups that must hold a replica (at least 1). Default: 1.
    #[serde(default = "default_min_groups")]
    #[schemars(range(min = 1))]
    #[x_kube(validation = Rule::new("self >= 1").message("spread minGroups must be at least 1"))]
    pub min_groups: u32,

    /// Largest share of the replicas one group may hold, in percent (1 to 100): a group
    /// holds at most max(1, floor(replicas * maxShare / 100)). Default: 100.
    #[serde(default = "default_max_share")]
    #[schemars(range(min = 1, max = 100))]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 100")
        .message("spread maxShare is a percentage: it must be between 1 and 100"))]
    pub max_share: u32,
}

fn default_min_groups() -> u32 {
    1
}

fn default_max_share() -> u32 {
    100
}

/// What a spread rule groups pools by.
#[derive(
    Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
#[serde(rename_all = "lowercase")]
pub enum SpreadBy {
    /// The pool's cloud provider.
    Provider,
    /// The pool's region.
    Region,
    /// The pool's region and zone.
    Zone,
    /// The pool itself.
    Pool,
}

impl SpreadBy {
    /// The name used in manifests: `provider`, `region`, `zone` or `pool`.
    pub fn as_str(self) -> &'static str {
        match self {
            SpreadBy::Provider => "provider",
            SpreadBy::Region => "region",
            SpreadBy::Zone => "zone",
            SpreadBy::Pool => "pool",
        }
    }
}

/// What to do when the spread rules cannot all hold.
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
pub enum WhenUnsatisfiable {
    /// Place every replica capacity allows, as close to the rules as possible, and
    /// report `Diversified=False`.
    #[default]
    ScheduleAnyway,
    /// Place only replicas that keep every rule satisfied.
    DoNotSchedule,
}

impl WhenUnsatisfiable {
    /// The name used in manifests: `ScheduleAnyway` or `DoNotSchedule`.
    pub fn as_str(self) -> &'static str {
        match self {
            WhenUnsatisfiable::ScheduleAnyway => "ScheduleAnyway",
            WhenUnsatisfiable::DoNotSchedule => "DoNotSchedule",
        }
    }
}

/// How fast replicas leave a failing pool and come back to a recovered one.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FailoverSpec {
    /// Seconds a pool's nodes may stay lost (NotReady or unreachable) before the pool
    /// counts as unhealthy and its replicas are placed elsewhere. Default: 15.
    #[serde(default = "default_unhealthy_after_seconds")]
    pub unhealthy_after_seconds: u32,

    /// Seconds a recovered pool must stay healthy before replicas move back to it.
    /// Default: 300.
    #[serde(default = "default_rebalance_after_seconds")]
    pub rebalance_after_seconds: u32,
}

impl Default for FailoverSpec {
    fn default() -> Self {
        Self {
            unhealthy_after_seconds: default_unhealthy_after_seconds(),
            rebalance_after_seconds: default_rebalance_after_seconds(),
        }
    }
}

/// 15 s: long enough to ride out a kubelet missing one or two status updates (every
/// 10 s by default), far shorter than Kubernetes' own ~6 minutes before eviction.
fn default_unhealthy_after_seconds() -> u32 {
    15
}

/// 5 minutes: a pool that flaps should not pull replicas back and forth.
fn default_rebalance_after_seconds() -> u32 {
    300
}

/// The Service Outrigger creates over all replicas.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    /// Port the Service listens on and forwards to; the inference server must listen
    /// on it (1 to 65535).
    #[schemars(range(min = 1, max = 65535))]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65535")
        .message("service.port must be between 1 and 65535"))]
    pub port: u16,
}

/// Observed state of a ModelDeployment, written by Outrigger.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::schema::kubernetes_conventions)]
pub struct ModelDeploymentStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Replicas that exist, over all pools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Replicas that are Ready, over all pools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// The label selector of the replicas' pods in this cluster, for the scale
    /// subresource: a HorizontalPodAutoscaler or a KEDA ScaledObject reads it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Replicas the plan could not place on any pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unplaced_replicas: Option<i32>,
    /// Replicas per pool in the current plan.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub placements: Vec<PlacementStatus>,
    /// Placed replicas per provider, for display (e.g. `aws=3 azure=3`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub providers: Option<String>,
    /// Cost of the placed replicas, in USD per hour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_per_hour: Option<f64>,
    /// This cluster's child Deployments of this copy, one per pool, as this
    /// cluster's last pass leaves them: what its peers plan with (a peer reads no
    /// Deployments).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<ChildStatus>,
    /// `Ready`, `Diversified` and `Degraded`, with a message saying what could not be
    /// met and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// One child Deployment in this cluster, as its peers read it.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ChildStatus {
    /// The GpuNodePool (in this cluster) it runs on.
    pub pool: String,
    /// Replicas it asks for.
    pub replicas: u32,
    /// Its Ready replicas.
    pub ready_replicas: u32,
    /// GPUs each replica requests.
    pub gpus_per_replica: u32,
}

/// Replicas of a ModelDeployment on one pool.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PlacementStatus {
    /// The cluster (its `--cluster-name`) that holds the pool; set once the
    /// deployment is served by peers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Name of the GpuNodePool.
    pub pool: String,
    /// Provider of the pool.
    pub provider: Provider,
    /// Region of the pool.
    pub region: String,
    /// Zone of the pool, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Replicas the plan puts on the pool.
    pub replicas: i32,
    /// Replicas on the pool that are Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
}
