//! AKS agent pools through the managed-cluster API: the machines of a pool, a
//! new `count`, and `deleteMachines`. Typed bodies for exactly what is read and
//! sent; the pool itself goes back as it came, with only `count` changed.

use azure_core::headers::HeaderName;
use azure_core::{Method, Url};
use serde::{Deserialize, Serialize};

use super::super::{CloudError, ErrorKind, Instance, InstanceState, Launch, Target, TargetScaling};
use super::{Azure, failure_with};

/// The AKS API version of these calls (machines are in it).
const API_VERSION: &str = "2025-10-01";

/// Provisioning states in which AKS runs an operation on the pool; another
/// change then is refused (`OperationNotAllowed`), so Outrigger waits.
const BUSY: [&str; 7] = [
    "Creating",
    "Updating",
    "Scaling",
    "Deleting",
    "Upgrading",
    "Starting",
    "Stopping",
];

/// The agent pool a target names.
pub(super) struct Pool<'a> {
    subscription_id: &'a str,
    resource_group: &'a str,
    cluster: &'a str,
    name: &'a str,
}

impl<'a> Pool<'a> {
    pub(super) fn of(target: &'a Target) -> Option<Pool<'a>> {
        match &target.scaling {
            TargetScaling::Aks {
                subscription_id,
                resource_group,
                cluster,
                agent_pool,
            } => Some(Pool {
                subscription_id,
                resource_group,
                cluster,
                name: agent_pool,
            }),
            _ => None,
        }
    }

    fn url(&self, base: &Url, suffix: &str) -> Result<Url, CloudError> {
        let path = format!(
            "subscriptions/{}/resourceGroups/{}/providers/Microsoft.ContainerService/managedClusters/{}/agentPools/{}{suffix}?api-version={API_VERSION}",
            self.subscription_id, self.resource_group, self.cluster, self.name
        );
        base.join(&path)
            .map_err(|e| CloudError::new(ErrorKind::Invalid, "scale", "BadUrl", e.to_string()))
    }
}

#[derive(Deserialize)]
struct AgentPool {
    properties: AgentPoolProperties,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AgentPoolProperties {
    count: Option<u32>,
    provisioning_state: Option<String>,
}

#[derive(Deserialize)]
struct MachineList {
    #[serde(default)]
    value: Vec<Machine>,
    #[serde(rename = "nextLink")]
    next_link: Option<String>,
}

#[derive(Deserialize)]
struct Machine {
    name: String,
    properties: Option<MachineProperties>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MachineProperties {
    resource_id: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DeleteMachines<'a> {
    machine_names: &'a [String],
}

fn unreadable(operation: &'static str, e: &serde_json::Error) -> CloudError {
    CloudError::new(
        ErrorKind::Transient,
        operation,
        "UnreadableResponse",
        format!("the AKS answer is not what the API documents: {e}"),
    )
}

/// A 409 `OperationNotAllowed` from AKS means another operation on the pool runs
/// (Compute uses the code for quota; AKS reports quota as `QuotaExceeded`).
fn busy_if_conflict(mut error: CloudError, status: u16) -> CloudError {
    if status == 409 && error.code == "OperationNotAllowed" {
        error.kind = ErrorKind::Conflict;
    }
    error
}

impl Azure {
    async fn get_json(
        &self,
        operation: &'static str,
        url: &Url,
    ) -> Result<(Vec<u8>, Option<String>), CloudError> {
        let (status, headers, body) = self.send(operation, Method::Get, url, &[], None).await?;
        if !(200..300).contains(&status) {
            return Err(failure_with(operation, status, &headers, &body));
        }
        let etag = headers.get_optional_string(&HeaderName::from_static("etag"));
        Ok((body, etag))
    }

    /// The pool's machines, each as an instance: its name (what `deleteMachines`
    /// takes) and the VM's resource id (what the Node's `providerID` says).
    pub(super) async fn machines(&self, pool: &Pool<'_>) -> Result<Vec<Instance>, CloudError> {
        const OP: &str = "list instances";
        let mut url = pool.url(&self.endpoint, "/machines")?;
        let mut found = Vec::new();
        // A bounded walk of `nextLink`s: a pool has at most 1000 nodes.
        for _ in 0..100 {
            let (body, _) = self.get_json(OP, &url).await?;
            let page: MachineList =
                serde_json::from_slice(&body).map_err(|e| unreadable(OP, &e))?;
            for machine in page.value {
                let Some(resource_id) = machine.properties.and_then(|p| p.resource_id) else {
                    continue;
                };
                found.push(Instance {
                    id: machine.name,
                    provider_id: format!("azure://{resource_id}"),
                    state: InstanceState::Running,
                    launched: None,
                });
            }
            match page.next_link.as_deref().map(Url::parse) {
                Some(Ok(next)) => url = next,
                _ => return Ok(found),
            }
        }
        Ok(found)
    }

    /// Sets `count` to `have + add`, unless AKS is busy with the pool or its count
    /// is not what its machines say (someone else is changing it).
    pub(super) async fn grow_agent_pool(
        &self,
        pool: &Pool<'_>,
        launch: &Launch,
    ) -> Result<u32, CloudError> {
        const OP: &str = "launch";
        let url = pool.url(&self.endpoint, "")?;
        let (body, etag) = self.get_json(OP, &url).await?;
        let current: AgentPool = serde_json::from_slice(&body).map_err(|e| unreadable(OP, &e))?;
        let state = current.properties.provisioning_state.unwrap_or_default();
        if BUSY.contains(&state.as_str()) {
            return Err(CloudError::new(
                ErrorKind::Conflict,
                OP,
                format!("AgentPool{state}"),
                format!(
                    "agent pool {} of cluster {} is {state} (an operation runs on it); Outrigger waits for it to finish instead of changing count",
                    pool.name, pool.cluster
                ),
            ));
        }
        let count = current.properties.count.unwrap_or(0);
        if count != launch.have {
            return Err(CloudError::new(
                ErrorKind::Conflict,
                OP,
                "CountChangedElsewhere",
                format!(
                    "agent pool {} has count {count} but {} machines: someone else changed its count (az aks nodepool scale, the cluster autoscaler?); Outrigger waits for them to match instead of overriding it",
                    pool.name, launch.have
                ),
            ));
        }
        // The pool as it is, with only the count changed: a PUT of less would reset
        // the rest.
        let mut whole: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| unreadable(OP, &e))?;
        whole["properties"]["count"] = serde_json::json!(launch.have + launch.add);
        let put = serde_json::to_vec(&whole).map_err(|e| unreadable(OP, &e))?;
        // Under the ETag read: a change made meanwhile fails the PUT (412) instead
        // of being overwritten.
        let if_match: Vec<(&'static str, String)> =
            etag.into_iter().map(|e| ("if-match", e)).collect();
        let (status, headers, answer) = self
            .send(OP, Method::Put, &url, &if_match, Some(put))
            .await?;
        if !(200..300).contains(&status) {
            let error = failure_with(OP, status, &headers, &answer);
            return Err(if status == 412 {
                CloudError {
                    kind: ErrorKind::Conflict,
                    ..error
                }
            } else {
                busy_if_conflict(error, status)
            });
        }
        self.follow(OP, &headers).await?;
        Ok(launch.add)
    }

    /// Removes the named machines; names no longer in the pool are skipped.
    pub(super) async fn delete_machines(
        &self,
        pool: &Pool<'_>,
        names: &[String],
    ) -> Result<(), CloudError> {
        const OP: &str = "terminate";
        let present: Vec<String> = self
            .machines(pool)
            .await?
            .into_iter()
            .map(|m| m.id)
            .filter(|id| names.contains(id))
            .collect();
        if present.is_empty() {
            return Ok(());
        }
        let url = pool.url(&self.endpoint, "/deleteMachines")?;
        let body = serde_json::to_vec(&DeleteMachines {
            machine_names: &present,
        })
        .map_err(|e| unreadable(OP, &e))?;
        let (status, headers, answer) = self.send(OP, Method::Post, &url, &[], Some(body)).await?;
        if !(200..300).contains(&status) {
            return Err(busy_if_conflict(
                failure_with(OP, status, &headers, &answer),
                status,
            ));
        }
        self.follow(OP, &headers).await
    }
}
