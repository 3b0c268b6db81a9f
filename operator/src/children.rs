//! The objects a ModelDeployment owns, built from its spec and its plan: one
//! Deployment per pool it uses, a Service when `spec.service` is set, and a
//! PodDisruptionBudget over all its pods. Pure.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Affinity, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, Service,
    ServicePort, ServiceSpec, Toleration,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use outrigger_crds::{GpuNodePool, ModelDeployment};

use crate::labels;

/// Kubernetes names are at most 63 characters for labels and Services.
const MAX_NAME: usize = 63;

/// A stable short hash (FNV-1a), for names and the applied-hash annotation. Stable
/// across releases, unlike `std`'s hasher.
pub fn fnv(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// `<md>-<pool>`, shortened with a hash when too long.
pub fn deployment_name(md: &str, pool: &str) -> String {
    let name = format!("{md}-{pool}");
    if name.len() <= MAX_NAME {
        return name;
    }
    let hash = &fnv(&name)[..8];
    let keep = MAX_NAME - hash.len() - 1;
    format!("{}-{hash}", name[..keep].trim_end_matches('-'))
}

fn owner_reference(md: &ModelDeployment) -> Option<OwnerReference> {
    md.controller_owner_ref(&())
}

fn base_labels(md: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels::DEPLOYMENT.to_string(), md.to_string()),
        (labels::MANAGED_BY.to_string(), labels::MANAGER.to_string()),
    ])
}

/// Stamps `applied-hash` over everything else Outrigger sets, so an unchanged child
/// need not be written again.
fn stamp<T: serde::Serialize>(meta: &mut ObjectMeta, object: &T) {
    let text = serde_json::to_string(object).expect("objects serialise");
    meta.annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(labels::APPLIED_HASH.to_string(), fnv(&text));
}

/// The Deployment that runs `replicas` replicas of `md` on `pool`.
pub fn deployment(md: &ModelDeployment, pool: &GpuNodePool, replicas: u32) -> Deployment {
    let md_name = md.metadata.name.clone().unwrap_or_default();
    let pool_name = pool.metadata.name.clone().unwrap_or_default();
    let mut selector = base_labels(&md_name);
    selector.remove(labels::MANAGED_BY);
    selector.insert(labels::POOL.to_string(), pool_name.clone());
    let mut object_labels = base_labels(&md_name);
    object_labels.insert(labels::POOL.to_string(), pool_name.clone());

    let mut template = md.spec.template.clone();
    let meta = template.metadata.get_or_insert_with(ObjectMeta::default);
    meta.labels
        .get_or_insert_with(BTreeMap::new)
        .extend(object_labels.clone());
    let spec = template.spec.get_or_insert_with(Default::default);
    // Node affinity to the pool's nodes, added to (ANDed with) any the user set.
    let requirements: Vec<NodeSelectorRequirement> = pool
        .node_selector()
        .into_iter()
        .map(|(key, value)| NodeSelectorRequirement {
            key,
            operator: "In".to_string(),
            values: Some(vec![value]),
        })
        .collect();
    let affinity = spec.affinity.get_or_insert_with(Affinity::default);
    let node_affinity = affinity
        .node_affinity
        .get_or_insert_with(NodeAffinity::default);
    let required = node_affinity
        .required_during_scheduling_ignored_during_execution
        .get_or_insert_with(|| NodeSelector {
            node_selector_terms: vec![NodeSelectorTerm::default()],
        });
    if required.node_selector_terms.is_empty() {
        required
            .node_selector_terms
            .push(NodeSelectorTerm::default());
    }
    for term in &mut required.node_selector_terms {
        term.match_expressions
            .get_or_insert_with(Vec::new)
            .extend(requirements.iter().cloned());
    }
    let tolerations = spec.tolerations.get_or_insert_with(Vec::new);
    for taint in &pool.spec.taints {
        tolerations.push(Toleration {
            key: Some(taint.key.clone()),
            operator: Some(
                if taint.value.is_some() {
                    "Equal"
                } else {
                    "Exists"
                }
                .to_string(),
            ),
            value: taint.value.clone(),
            effect: Some(taint.effect.clone()),
            ..Toleration::default()
        });
    }
    if spec.tolerations.as_ref().is_some_and(Vec::is_empty) {
        spec.tolerations = None;
    }
    // The server container (the first) asks for the GPUs of one replica.
    if let Some(server) = spec.containers.first_mut() {
        let gpus = Quantity(md.spec.gpu.count.to_string());
        let resources = server.resources.get_or_insert_with(Default::default);
        resources
            .limits
            .get_or_insert_with(BTreeMap::new)
            .insert(labels::GPU.to_string(), gpus.clone());
        resources
            .requests
            .get_or_insert_with(BTreeMap::new)
            .insert(labels::GPU.to_string(), gpus);
    }

    let mut deployment = Deployment {
        metadata: ObjectMeta {
            name: Some(deployment_name(&md_name, &pool_name)),
            namespace: md.metadata.namespace.clone(),
            labels: Some(object_labels),
            owner_references: owner_reference(md).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: DeploymentSpec {
            replicas: Some(i32::try_from(replicas).unwrap_or(i32::MAX)),
            selector: LabelSelector {
                match_labels: Some(selector),
                ..LabelSelector::default()
            },
            // Surge, never unavailable: an image change keeps every replica serving.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".to_string()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template,
            ..DeploymentSpec::default()
        },
        status: None,
    };
    let snapshot = deployment.clone();
    stamp(&mut deployment.metadata, &snapshot);
    deployment
}

/// One Service over the replicas of every pool.
pub fn service(md: &ModelDeployment) -> Option<Service> {
    let port = md.spec.service.as_ref()?.port;
    let name = md.metadata.name.clone().unwrap_or_default();
    let mut service = Service {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: md.metadata.namespace.clone(),
            labels: Some(base_labels(&name)),
            owner_references: owner_reference(md).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            selector: Some(BTreeMap::from([(labels::DEPLOYMENT.to_string(), name)])),
            ports: Some(vec![ServicePort {
                name: Some("http".to_string()),
                port: i32::from(port),
                target_port: Some(IntOrString::Int(i32::from(port))),
                protocol: Some("TCP".to_string()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    };
    let snapshot = service.clone();
    stamp(&mut service.metadata, &snapshot);
    Some(service)
}

/// At most one replica of the whole ModelDeployment down at a time by eviction.
pub fn disruption_budget(md: &ModelDeployment) -> PodDisruptionBudget {
    let name = md.metadata.name.clone().unwrap_or_default();
    let mut pdb = PodDisruptionBudget {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: md.metadata.namespace.clone(),
            labels: Some(base_labels(&name)),
            owner_references: owner_reference(md).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(labels::DEPLOYMENT.to_string(), name)])),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    };
    let snapshot = pdb.clone();
    stamp(&mut pdb.metadata, &snapshot);
    pdb
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md() -> ModelDeployment {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "outrigger.dev/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": "llama", "namespace": "ml", "uid": "u-1"},
            "spec": {
                "replicas": 4,
                "gpu": {"count": 4},
                "template": {
                    "metadata": {"labels": {"app": "llama"}},
                    "spec": {"containers": [{"name": "server", "image": "vllm:1"}, {"name": "sidecar", "image": "s:1"}]}
                },
                "service": {"port": 8000}
            }
        }))
        .expect("valid ModelDeployment")
    }

    fn pool() -> GpuNodePool {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "outrigger.dev/v1alpha1",
            "kind": "GpuNodePool",
            "metadata": {"name": "aws-use1-h100"},
            "spec": {
                "provider": "aws", "region": "us-east-1", "instanceType": "p5.48xlarge",
                "gpu": {"type": "H100", "count": 8}, "nodes": {"min": 0, "max": 4},
                "taints": [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}]
            }
        }))
        .expect("valid GpuNodePool")
    }

    #[test]
    fn a_child_deployment_targets_its_pool_and_asks_for_gpus() {
        let d = deployment(&md(), &pool(), 3);
        assert_eq!(d.metadata.name.as_deref(), Some("llama-aws-use1-h100"));
        let spec = d.spec;
        assert_eq!(spec.replicas, Some(3));
        let pod = spec.template.spec.expect("pod spec");
        let terms = &pod
            .affinity
            .and_then(|a| a.node_affinity)
            .and_then(|n| n.required_during_scheduling_ignored_during_execution)
            .expect("required node affinity")
            .node_selector_terms;
        let expr = &terms[0].match_expressions.as_ref().expect("expressions")[0];
        assert_eq!(expr.key, labels::POOL);
        assert_eq!(
            expr.values.as_deref(),
            Some(&["aws-use1-h100".to_string()][..])
        );
        let limits = pod.containers[0]
            .resources
            .as_ref()
            .and_then(|r| r.limits.as_ref());
        assert_eq!(
            limits.and_then(|l| l.get(labels::GPU)),
            Some(&Quantity("4".into()))
        );
        assert!(
            pod.containers[1].resources.is_none(),
            "only the server container gets GPUs"
        );
        let tolerations = pod.tolerations.expect("tolerations");
        assert_eq!(tolerations[0].key.as_deref(), Some("nvidia.com/gpu"));
        let labels_ = spec
            .template
            .metadata
            .and_then(|m| m.labels)
            .expect("pod labels");
        assert_eq!(
            labels_.get("app").map(String::as_str),
            Some("llama"),
            "user labels kept"
        );
        assert_eq!(
            labels_.get(labels::POOL).map(String::as_str),
            Some("aws-use1-h100")
        );
        let owner = &d.metadata.owner_references.expect("owner")[0];
        assert_eq!(owner.controller, Some(true));
    }

    #[test]
    fn the_applied_hash_changes_only_with_the_content() {
        let hash = |d: &Deployment| {
            d.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(labels::APPLIED_HASH))
                .cloned()
        };
        let a = deployment(&md(), &pool(), 3);
        assert_eq!(hash(&a), hash(&deployment(&md(), &pool(), 3)));
        assert_ne!(hash(&a), hash(&deployment(&md(), &pool(), 2)));
    }

    #[test]
    fn long_names_are_shortened_stably() {
        let name = deployment_name(&"m".repeat(50), &"p".repeat(40));
        assert!(name.len() <= MAX_NAME, "{name}");
        assert_eq!(name, deployment_name(&"m".repeat(50), &"p".repeat(40)));
    }

    #[test]
    fn service_and_budget_select_every_pool() {
        let s = service(&md()).expect("service set");
        let selector = s.spec.and_then(|s| s.selector).expect("selector");
        assert_eq!(selector.len(), 1);
        assert_eq!(
            selector.get(labels::DEPLOYMENT).map(String::as_str),
            Some("llama")
        );
        let pdb = disruption_budget(&md());
        assert_eq!(
            pdb.spec.and_then(|s| s.max_unavailable),
            Some(IntOrString::Int(1))
        );
    }
}
