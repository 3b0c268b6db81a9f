//! What Node a cloud machine becomes, and how an outage shows on it. Pure.

use std::collections::BTreeMap;
use std::time::Instant;

use k8s_openapi::api::core::v1::{Node, NodeCondition, NodeSpec, NodeStatus, Taint};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use outrigger_crds::{GpuNodePool, POOL_LABEL, Provider};
use serde_json::{Value, json};

use crate::azure::agent_pool::{AGENT_POOL_LABEL, AksPool};
use crate::faults::Outage;

/// Label on every Node the registrar made; it only ever touches those.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "outrigger-sim";
/// kwok manages (heartbeats, runs pods on) Nodes with this annotation; see the
/// `--manage-nodes-with-annotation-selector` that hack/cluster gives kwok.
pub const KWOK_ANNOTATION: &str = "kwok.x-k8s.io/node";
pub const KWOK_VALUE: &str = "fake";
/// Set while a simulated outage holds the Node NotReady; names the outage.
pub const OUTAGE_ANNOTATION: &str = "sim.outrigger.dev/outage";
/// The provider of a Node's machine.
pub const PROVIDER_LABEL: &str = "outrigger.dev/provider";
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
pub const INSTANCE_TYPE_LABEL: &str = "node.kubernetes.io/instance-type";
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// Pods per Node, the kubelet's default.
const MAX_PODS: &str = "110";

/// CPUs, memory and GPUs of one machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub cpus: u32,
    pub memory_mib: u64,
    pub gpus: u32,
}

impl Shape {
    /// What a machine of an unknown type is taken to have.
    pub const UNKNOWN: Shape = Shape {
        cpus: 4,
        memory_mib: 16 * 1024,
        gpus: 0,
    };
}

/// A running instance or scale-set VM: what its Node is made from.
#[derive(Clone, Debug, PartialEq)]
pub struct Machine {
    pub provider: Provider,
    pub node_name: String,
    pub provider_id: String,
    pub region: String,
    /// The `topology.kubernetes.io/zone` value: the AWS zone, or for Azure
    /// `<region>-<zone>` (`0` for a regional scale set), as AKS labels nodes.
    pub zone_label: String,
    pub instance_type: String,
    /// The machine's `outrigger.dev/pool` tag.
    pub pool: Option<String>,
    /// The machine's `outrigger.dev/cluster` tag: the cluster its Node joins.
    pub cluster: Option<String>,
    /// For a scale-set VM: subscription, resource group and scale set name.
    pub scale_set: Option<(String, String, String)>,
    /// For a VM of an AKS agent pool: the managed cluster's resource group, the
    /// cluster and the pool.
    pub agent_pool: Option<AksPool>,
    pub shape: Shape,
    /// When it started running; `None` while it is still being created.
    pub up_since: Option<Instant>,
}

/// What a Node takes from its pool.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolTraits {
    pub labels: BTreeMap<String, String>,
    /// GPUs per node; `None`: the machine type's own count.
    pub gpus: Option<u32>,
    pub taints: Vec<Taint>,
}

impl PoolTraits {
    /// From the GpuNodePool object: its node selector, GPUs per node and taints.
    pub fn of(pool: &GpuNodePool) -> Self {
        PoolTraits {
            labels: pool.node_selector(),
            gpus: Some(pool.spec.gpu.count),
            taints: pool.spec.taints.clone(),
        }
    }

    /// Without the object: `outrigger.dev/pool=<tag>` and the machine type's GPUs.
    pub fn from_tag(pool: Option<&str>) -> Self {
        PoolTraits {
            labels: pool
                .map(|p| BTreeMap::from([(POOL_LABEL.to_string(), p.to_string())]))
                .unwrap_or_default(),
            gpus: None,
            taints: Vec::new(),
        }
    }

    /// True when this pool's scaling names the scale set or agent pool of `machine`.
    pub fn scales(pool: &GpuNodePool, machine: &Machine) -> bool {
        let (Some(azure), Some((sub, rg, name))) = (
            pool.spec.scaling.as_ref().and_then(|s| s.azure.as_ref()),
            &machine.scale_set,
        ) else {
            return false;
        };
        match (&azure.agent_pool, &machine.agent_pool) {
            (Some(wanted), Some(aks)) => {
                wanted.subscription_id.eq_ignore_ascii_case(sub)
                    && aks.matches(&wanted.resource_group, &wanted.cluster, &wanted.name)
            }
            (None, None) => {
                let same = |a: &Option<String>, b: &str| {
                    a.as_deref().is_some_and(|a| a.eq_ignore_ascii_case(b))
                };
                same(&azure.subscription_id, sub)
                    && same(&azure.resource_group, rg)
                    && same(&azure.scale_set_name, name)
            }
            _ => false,
        }
    }
}

/// The Node for `machine` in `pool`; NotReady and left alone by kwok when an
/// outage covers it.
pub fn node_for(machine: &Machine, pool: &PoolTraits, outage: Option<&Outage>) -> Node {
    let mut labels = BTreeMap::from([
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
        ("type".to_string(), "kwok".to_string()),
        (
            "kubernetes.io/hostname".to_string(),
            machine.node_name.clone(),
        ),
        ("kubernetes.io/os".to_string(), "linux".to_string()),
        ("kubernetes.io/arch".to_string(), "amd64".to_string()),
        (PROVIDER_LABEL.to_string(), machine.provider.to_string()),
        (REGION_LABEL.to_string(), machine.region.clone()),
        (ZONE_LABEL.to_string(), machine.zone_label.clone()),
        (
            INSTANCE_TYPE_LABEL.to_string(),
            machine.instance_type.clone(),
        ),
    ]);
    if let Some(aks) = &machine.agent_pool {
        labels.insert(AGENT_POOL_LABEL.to_string(), aks.name.clone());
        labels.insert("kubernetes.azure.com/mode".to_string(), "user".to_string());
    }
    labels.extend(pool.labels.clone());

    let mut annotations = BTreeMap::new();
    match outage {
        Some(o) => {
            annotations.insert(OUTAGE_ANNOTATION.to_string(), o.label());
        }
        None => {
            annotations.insert(KWOK_ANNOTATION.to_string(), KWOK_VALUE.to_string());
        }
    }

    let gpus = pool.gpus.unwrap_or(machine.shape.gpus);
    let mut resources = BTreeMap::from([
        ("cpu".to_string(), Quantity(machine.shape.cpus.to_string())),
        (
            "memory".to_string(),
            Quantity(format!("{}Mi", machine.shape.memory_mib)),
        ),
        ("pods".to_string(), Quantity(MAX_PODS.to_string())),
    ]);
    if gpus > 0 {
        resources.insert(GPU_RESOURCE.to_string(), Quantity(gpus.to_string()));
    }

    Node {
        metadata: ObjectMeta {
            name: Some(machine.node_name.clone()),
            labels: Some(labels),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec {
            provider_id: Some(machine.provider_id.clone()),
            taints: (!pool.taints.is_empty()).then(|| pool.taints.clone()),
            ..NodeSpec::default()
        }),
        status: Some(NodeStatus {
            capacity: Some(resources.clone()),
            allocatable: Some(resources),
            conditions: outage.map(|o| vec![outage_condition(o)]),
            ..NodeStatus::default()
        }),
    }
}

fn outage_condition(outage: &Outage) -> NodeCondition {
    let now = Time(jiff::Timestamp::now());
    NodeCondition {
        type_: "Ready".to_string(),
        status: "Unknown".to_string(),
        reason: Some("SimulatedOutage".to_string()),
        message: Some(format!(
            "outrigger-sim: outage of {}; the node stopped posting its status",
            outage.label()
        )),
        last_heartbeat_time: Some(now.clone()),
        last_transition_time: Some(now),
    }
}

/// The outage covering a Node (by its provider and region labels), if any.
pub fn outage_of<'a>(node: &Node, outages: &'a [Outage]) -> Option<&'a Outage> {
    let labels = node.metadata.labels.as_ref()?;
    let provider = match labels.get(PROVIDER_LABEL)?.as_str() {
        "aws" => Provider::Aws,
        "azure" => Provider::Azure,
        _ => return None,
    };
    let region = labels.get(REGION_LABEL)?;
    let name = node.metadata.name.as_deref().unwrap_or_default();
    outages
        .iter()
        .find(|o| o.covers_node(provider, region, name))
}

fn annotation<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    node.metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

/// The status of a Node's Ready condition (`True`, `False`, `Unknown`), if it has one.
pub fn ready_status(node: &Node) -> Option<&str> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status.as_str())
}

/// What the registrar must do to a Node for the outage state to hold.
#[derive(Clone, Debug, PartialEq)]
pub enum OutageChange {
    /// Take the Node from kwok and mark it NotReady: a metadata patch, then a status patch.
    Down { metadata: Value, status: Value },
    /// Give the Node back to kwok, which makes it Ready again.
    Up { metadata: Value },
}

/// The change a Node needs, given the outages; `None` when it is as it should be.
/// A Node under an outage that reads Ready again (kwok or anyone else wrote it)
/// is taken down again, so NotReady sticks for as long as the outage lasts.
pub fn outage_change(node: &Node, outages: &[Outage]) -> Option<OutageChange> {
    match outage_of(node, outages) {
        Some(outage) => {
            let held = annotation(node, OUTAGE_ANNOTATION).is_some()
                && annotation(node, KWOK_ANNOTATION).is_none()
                && ready_status(node) != Some("True");
            (!held).then(|| OutageChange::Down {
                metadata: json!({"metadata": {"annotations": {
                    KWOK_ANNOTATION: null,
                    OUTAGE_ANNOTATION: outage.label(),
                }}}),
                status: json!({"status": {"conditions": [outage_condition(outage)]}}),
            })
        }
        None => annotation(node, OUTAGE_ANNOTATION)
            .is_some()
            .then(|| OutageChange::Up {
                metadata: json!({"metadata": {"annotations": {
                    KWOK_ANNOTATION: KWOK_VALUE,
                    OUTAGE_ANNOTATION: null,
                }}}),
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> Machine {
        Machine {
            provider: Provider::Aws,
            node_name: "i-0abc".into(),
            provider_id: "aws:///us-east-1b/i-0abc".into(),
            region: "us-east-1".into(),
            zone_label: "us-east-1b".into(),
            instance_type: "p5.48xlarge".into(),
            pool: Some("aws-h100".into()),
            cluster: None,
            scale_set: None,
            agent_pool: None,
            shape: Shape {
                cpus: 192,
                memory_mib: 2_097_152,
                gpus: 8,
            },
            up_since: Some(Instant::now()),
        }
    }

    fn outage(region: Option<&str>) -> Outage {
        Outage {
            provider: Provider::Aws,
            region: region.map(String::from),
            api: false,
            node: None,
        }
    }

    #[test]
    fn node_carries_pool_labels_topology_provider_id_and_gpus() {
        let pool = PoolTraits {
            labels: BTreeMap::from([("outrigger.dev/pool".into(), "aws-h100".into())]),
            gpus: Some(4),
            taints: vec![Taint {
                key: "nvidia.com/gpu".into(),
                effect: "NoSchedule".into(),
                ..Taint::default()
            }],
        };
        let node = node_for(&machine(), &pool, None);
        let labels = node.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["outrigger.dev/pool"], "aws-h100");
        assert_eq!(labels[ZONE_LABEL], "us-east-1b");
        assert_eq!(labels[REGION_LABEL], "us-east-1");
        assert_eq!(labels[INSTANCE_TYPE_LABEL], "p5.48xlarge");
        assert_eq!(labels[MANAGED_BY_LABEL], MANAGED_BY);
        assert_eq!(annotation(&node, KWOK_ANNOTATION), Some(KWOK_VALUE));
        let spec = node.spec.as_ref().unwrap();
        assert_eq!(
            spec.provider_id.as_deref(),
            Some("aws:///us-east-1b/i-0abc")
        );
        assert_eq!(spec.taints.as_ref().unwrap().len(), 1);
        let status = node.status.as_ref().unwrap();
        assert_eq!(status.capacity.as_ref().unwrap()[GPU_RESOURCE].0, "4");
        assert_eq!(
            status.allocatable.as_ref().unwrap()["memory"].0,
            "2097152Mi"
        );
        assert!(status.conditions.is_none(), "kwok sets the conditions");
    }

    #[test]
    fn without_a_pool_object_the_tag_and_the_type_decide() {
        let node = node_for(&machine(), &PoolTraits::from_tag(Some("aws-h100")), None);
        assert_eq!(
            node.metadata.labels.as_ref().unwrap()[POOL_LABEL],
            "aws-h100"
        );
        assert_eq!(
            node.status.as_ref().unwrap().capacity.as_ref().unwrap()[GPU_RESOURCE].0,
            "8"
        );
    }

    #[test]
    fn a_node_born_in_an_outage_is_not_ready_and_not_kwoks() {
        let o = outage(None);
        let node = node_for(&machine(), &PoolTraits::from_tag(None), Some(&o));
        assert_eq!(annotation(&node, KWOK_ANNOTATION), None);
        assert_eq!(annotation(&node, OUTAGE_ANNOTATION), Some("aws"));
        assert_eq!(ready_status(&node), Some("Unknown"));
        assert_eq!(outage_change(&node, std::slice::from_ref(&o)), None);
    }

    #[test]
    fn outage_changes_take_nodes_down_keep_them_down_and_bring_them_back() {
        let up = node_for(&machine(), &PoolTraits::from_tag(None), None);
        let outages = [outage(Some("us-east-1"))];
        assert!(matches!(
            outage_change(&up, &outages),
            Some(OutageChange::Down { .. })
        ));
        assert_eq!(outage_change(&up, &[outage(Some("us-west-2"))]), None);
        assert_eq!(outage_change(&up, &[]), None);

        let mut down = node_for(&machine(), &PoolTraits::from_tag(None), Some(&outages[0]));
        assert_eq!(outage_change(&down, &outages), None);
        // Something wrote Ready=True during the outage: it is taken down again.
        down.status.as_mut().unwrap().conditions.as_mut().unwrap()[0].status = "True".into();
        assert!(matches!(
            outage_change(&down, &outages),
            Some(OutageChange::Down { .. })
        ));
        match outage_change(&down, &[]) {
            Some(OutageChange::Up { metadata }) => {
                assert_eq!(
                    metadata["metadata"]["annotations"][KWOK_ANNOTATION],
                    KWOK_VALUE
                );
                assert!(metadata["metadata"]["annotations"][OUTAGE_ANNOTATION].is_null());
            }
            other => panic!("expected Up, got {other:?}"),
        }
    }
}
