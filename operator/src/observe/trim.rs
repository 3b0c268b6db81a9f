//! What of each watched object the controllers read. Everything else is dropped
//! before the object enters a store (kube-runtime's `modify` on the watch stream),
//! so memory grows with the facts kept, not with whole Pod and Node objects:
//! managed fields, container images, env, volumes, node images and addresses.
//!
//! Each function keeps exactly what its readers use (named on each field); a new
//! reader of another field must keep it here too, or it reads nothing.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    Container, Node, NodeSpec, NodeStatus, Pod, PodSpec, PodStatus, ResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::labels;

/// Name, namespace, labels, creation time and the annotations in `keep`.
fn meta(meta: &mut ObjectMeta, keep: &[&str]) {
    meta.managed_fields = None;
    meta.owner_references = None;
    meta.finalizers = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.retain(|k, _| keep.contains(&k.as_str()));
    }
}

/// GPU requests and limits, all the inventory counts of a container.
fn resources(container: &mut Container) -> Container {
    Container {
        name: std::mem::take(&mut container.name),
        resources: container.resources.take().map(|r| ResourceRequirements {
            requests: r.requests,
            limits: r.limits,
            ..ResourceRequirements::default()
        }),
        ..Container::default()
    }
}

/// A pod: its labels (owner, pool), node, containers' GPUs and phase (inventory).
pub fn pod(pod: &mut Pod) {
    meta(&mut pod.metadata, &[]);
    pod.spec = pod.spec.take().map(|mut spec| PodSpec {
        node_name: spec.node_name.take(),
        containers: spec.containers.iter_mut().map(resources).collect(),
        ..PodSpec::default()
    });
    pod.status = pod.status.take().map(|s| PodStatus {
        phase: s.phase,
        ..PodStatus::default()
    });
}

/// A node: labels (pool), the scaler's cordon and the interruption annotations,
/// creation time and conditions (readiness, an AKS scheduled event), taints
/// (unreachable), providerID (its instance) and allocatable GPUs.
pub fn node(node: &mut Node) {
    meta(
        &mut node.metadata,
        &[labels::SCALE_DOWN, labels::INTERRUPTION],
    );
    node.spec = node.spec.take().map(|s| NodeSpec {
        provider_id: s.provider_id,
        taints: s.taints,
        unschedulable: s.unschedulable,
        ..NodeSpec::default()
    });
    node.status = node.status.take().map(|s| NodeStatus {
        conditions: s.conditions.map(|cs| {
            cs.into_iter()
                .filter(|c| c.type_ == "Ready" || c.type_ == crate::lifecycle::VM_EVENT_SCHEDULED)
                .collect()
        }),
        allocatable: s
            .allocatable
            .map(|a| a.into_iter().filter(|(k, _)| k == labels::GPU).collect()),
        ..NodeStatus::default()
    });
}

/// A child Deployment: labels (owner, pool), the applied hash, replicas, the
/// containers' GPUs and ready replicas (inventory, applier).
pub fn deployment(deployment: &mut Deployment) {
    meta(&mut deployment.metadata, &[labels::APPLIED_HASH]);
    let spec = &mut deployment.spec;
    spec.template.metadata = None;
    if let Some(pod) = spec.template.spec.as_mut() {
        *pod = PodSpec {
            containers: pod.containers.iter_mut().map(resources).collect(),
            ..PodSpec::default()
        };
    }
    if let Some(status) = deployment.status.as_mut() {
        status.conditions = None;
    }
}

/// A child Service or PodDisruptionBudget: labels and the applied hash (applier).
pub fn child<K: kube::Resource>(object: &mut K) {
    meta(object.meta_mut(), &[labels::APPLIED_HASH]);
}

/// A GpuNodePool: everything but managed fields (specs and statuses are read whole).
pub fn pool<K: kube::Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_pod_keeps_what_the_inventory_reads_only() {
        let mut p: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns",
                "labels": {"outrigger.dev/deployment": "md", "outrigger.dev/pool": "aws-a"},
                "annotations": {"big": "x".repeat(1000)},
                "managedFields": [{"manager": "kubectl"}]},
            "spec": {"nodeName": "n0", "containers": [{"name": "server", "image": "vllm:1",
                "env": [{"name": "A", "value": "b"}],
                "resources": {"limits": {"nvidia.com/gpu": "4"}}}]},
            "status": {"phase": "Running", "podIP": "10.0.0.1"}
        }))
        .unwrap();
        pod(&mut p);
        assert_eq!(crate::observe::inventory::pod_gpus(&p), 4);
        assert_eq!(
            p.spec.as_ref().and_then(|s| s.node_name.as_deref()),
            Some("n0")
        );
        assert_eq!(
            p.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Running")
        );
        assert!(p.metadata.labels.as_ref().is_some_and(|l| l.len() == 2));
        assert!(p.metadata.managed_fields.is_none());
        assert!(p.metadata.annotations.as_ref().is_none_or(|a| a.is_empty()));
        let c = &p.spec.as_ref().unwrap().containers[0];
        assert!(c.image.is_none() && c.env.is_none());
    }

    #[test]
    fn a_node_keeps_readiness_taints_instance_gpus_and_the_cordon_mark() {
        let mut n: Node = serde_json::from_value(json!({
            "metadata": {"name": "n0", "labels": {"outrigger.dev/pool": "aws-a"},
                "annotations": {labels::SCALE_DOWN: "t", "kwok.x-k8s.io/node": "fake"}},
            "spec": {"providerID": "aws:///us-east-1a/i-1", "podCIDR": "10.0.0.0/24",
                "taints": [{"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"}]},
            "status": {"conditions": [{"type": "Ready", "status": "True"},
                                      {"type": "MemoryPressure", "status": "False"}],
                "allocatable": {"nvidia.com/gpu": "8", "cpu": "96"},
                "images": [{"names": ["vllm:1"]}]}
        }))
        .unwrap();
        node(&mut n);
        let spec = n.spec.as_ref().unwrap();
        assert_eq!(spec.provider_id.as_deref(), Some("aws:///us-east-1a/i-1"));
        assert_eq!(spec.taints.as_ref().map(Vec::len), Some(1));
        assert!(spec.pod_cidr.is_none());
        let status = n.status.as_ref().unwrap();
        assert_eq!(status.conditions.as_ref().map(Vec::len), Some(1));
        assert_eq!(
            crate::observe::inventory::gpus_of(status.allocatable.as_ref()),
            8
        );
        assert!(status.images.is_none());
        let annotations = n.metadata.annotations.as_ref().unwrap();
        assert!(annotations.contains_key(labels::SCALE_DOWN) && annotations.len() == 1);
    }
}
