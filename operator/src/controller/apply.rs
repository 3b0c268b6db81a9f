//! The one place Outrigger writes objects and statuses: server-side apply under a
//! named field manager (callers skip a child whose cached copy carries the same
//! [`applied_hash`]), deletes that treat "already gone" as done, and every write
//! counted.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::{Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::Error;
use crate::labels;
use crate::telemetry::Metrics;

/// Who owns which fields. Each writer applies under its own manager, so one
/// writer's apply never clears what another one set.
pub mod manager {
    /// The children (Deployments, Service, PodDisruptionBudget) and the
    /// ModelDeployment status.
    pub const CHILDREN: &str = crate::labels::FIELD_MANAGER;
    /// A ModelDeployment's `Ready` condition for a spec that cannot be used or a
    /// child the API server refused; the rest of its status stays as it was.
    pub const VALIDATION: &str = "outrigger-validation";
    /// A pool's observed counts, `lostSince`, `recoveredAt` and `Ready`.
    pub const INVENTORY: &str = "outrigger-inventory";
    /// A pool's `desiredNodes`, `cloudInstances`, `capacityBackoff`,
    /// `CapacityAvailable` and `CloudReachable`.
    pub const SCALER: &str = "outrigger-scaler";
    /// A PeerCluster's status.
    pub const PEERS: &str = "outrigger-peers";
}

/// Writes to the API server on behalf of every controller.
#[derive(Clone)]
pub struct Applier {
    client: Client,
    metrics: Arc<Metrics>,
}

/// The applied-hash annotation of an object's metadata.
pub fn applied_hash(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Option<&str> {
    meta.annotations
        .as_ref()?
        .get(labels::APPLIED_HASH)
        .map(String::as_str)
}

impl Applier {
    pub fn new(client: Client, metrics: Arc<Metrics>) -> Applier {
        Applier { client, metrics }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Applies `desired` (a child, stamped with its applied hash) in `namespace`,
    /// and returns the object as the API server answered. The caller skips children
    /// whose cached copy carries the same hash ([`applied_hash`]).
    pub async fn child<K>(&self, namespace: &str, desired: &K) -> Result<K, Error>
    where
        K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
            + Serialize
            + DeserializeOwned
            + Clone
            + Debug,
    {
        let name = desired.meta().name.clone().unwrap_or_default();
        let api: Api<K> = Api::namespaced(self.client.clone(), namespace);
        let sent = Instant::now();
        let applied = api
            .patch(
                &name,
                &PatchParams::apply(manager::CHILDREN).force(),
                &Patch::Apply(desired),
            )
            .await
            .map_err(|source| Error::Apply {
                kind: K::kind(&()).to_string(),
                name,
                source,
            })?;
        self.metrics.wrote(&K::plural(&()), "apply", sent.elapsed());
        Ok(applied)
    }

    /// Deletes a child; one that is gone already counts as deleted.
    pub async fn delete<K>(&self, namespace: &str, name: &str) -> Result<(), Error>
    where
        K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
            + DeserializeOwned
            + Clone
            + Debug,
    {
        let api: Api<K> = Api::namespaced(self.client.clone(), namespace);
        let sent = Instant::now();
        match api.delete(name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.is_not_found() => return Ok(()),
            Err(source) => {
                return Err(Error::Delete {
                    kind: K::kind(&()).to_string(),
                    name: name.to_string(),
                    source,
                });
            }
        }
        self.metrics
            .wrote(&K::plural(&()), "delete", sent.elapsed());
        Ok(())
    }

    /// Server-side applies `status` (the fields `manager` owns, nulls dropped) to
    /// the status of `K` `name`, in `namespace` when `K` is namespaced. The answer
    /// is read untyped, so an object whose spec no longer parses can be told so.
    pub async fn status<K>(
        &self,
        namespace: Option<&str>,
        name: &str,
        manager: &str,
        status: serde_json::Value,
    ) -> Result<(), Error>
    where
        K: Resource<DynamicType = ()>,
    {
        let resource = ApiResource::erase::<K>(&());
        let api: Api<DynamicObject> = match namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &resource),
            None => Api::all_with(self.client.clone(), &resource),
        };
        let patch = serde_json::json!({
            "apiVersion": resource.api_version,
            "kind": resource.kind,
            "status": without_nulls(status),
        });
        let sent = Instant::now();
        api.patch_status(
            name,
            &PatchParams::apply(manager).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(|source| Error::Status {
            name: name.to_string(),
            source,
        })?;
        self.metrics.wrote(
            &format!("{}/status", resource.plural),
            "apply",
            sent.elapsed(),
        );
        Ok(())
    }

    /// A JSON merge patch of a cluster-scoped object (a Node's cordon); an object
    /// that is gone counts as done. True when it wrote.
    pub async fn merge<K>(&self, name: &str, patch: &serde_json::Value) -> Result<bool, Error>
    where
        K: Resource<DynamicType = ()> + DeserializeOwned + Clone + Debug,
    {
        let api: Api<K> = Api::all_with(self.client.clone(), &());
        let sent = Instant::now();
        match api
            .patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.is_not_found() => return Ok(false),
            Err(source) => {
                return Err(Error::Apply {
                    kind: K::kind(&()).to_string(),
                    name: name.to_string(),
                    source,
                });
            }
        }
        self.metrics.wrote(&K::plural(&()), "patch", sent.elapsed());
        Ok(true)
    }

    /// Deletes a pod at once (grace period 0): a pod of a node whose kubelet is gone
    /// and whose instance is being terminated (a repair) can never stop by itself.
    pub async fn delete_pod_now(&self, namespace: &str, name: &str) -> Result<(), Error> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let sent = Instant::now();
        match pods
            .delete(name, &DeleteParams::default().grace_period(0))
            .await
        {
            Ok(_) => self.metrics.wrote("pods", "delete", sent.elapsed()),
            Err(kube::Error::Api(e)) if e.is_not_found() => {}
            Err(source) => {
                return Err(Error::Delete {
                    kind: "Pod".to_string(),
                    name: format!("{namespace}/{name}"),
                    source,
                });
            }
        }
        Ok(())
    }

    /// A JSON merge patch of a pod (its deletion cost); a pod that is gone counts
    /// as done.
    pub async fn merge_pod(
        &self,
        namespace: &str,
        name: &str,
        patch: &serde_json::Value,
    ) -> Result<(), Error> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let sent = Instant::now();
        match api
            .patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Ok(_) => self.metrics.wrote("pods", "patch", sent.elapsed()),
            Err(kube::Error::Api(e)) if e.is_not_found() => {}
            Err(source) => {
                return Err(Error::Apply {
                    kind: "Pod".to_string(),
                    name: format!("{namespace}/{name}"),
                    source,
                });
            }
        }
        Ok(())
    }
}

/// A server-side apply patch body without nulls: in an apply patch a null would
/// claim the field and clear it.
pub fn without_nulls(mut value: serde_json::Value) -> serde_json::Value {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                map.retain(|_, v| !v.is_null());
                map.values_mut().for_each(strip);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    strip(&mut value);
    value
}
