//! The clouds behind scalable GpuNodePools: one trait with plain-data results and
//! errors classified into the kinds the scaler acts on, two implementations
//! ([`aws`] on `aws-sdk-ec2`, [`azure`] on `azure_mgmt_compute`), a decorator that
//! adds timeouts, retries and metrics ([`metered`]), and a recording fake for unit
//! tests ([`fake`]).

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use outrigger_crds::{CapacityType, GpuNodePool, Provider};

pub mod aws;
pub mod azure;
#[cfg(test)]
pub mod fake;
pub mod metered;
#[cfg(test)]
mod simulated;

/// The tag on every instance Outrigger launches: the pool it belongs to.
pub const POOL_TAG: &str = "outrigger.dev/pool";
pub use outrigger_crds::CLUSTER_TAG;

/// What a cloud call is about: one pool's instances, and how to launch them.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub pool: String,
    pub region: String,
    pub zone: Option<String>,
    pub instance_type: String,
    pub capacity_type: CapacityType,
    pub scaling: TargetScaling,
}

/// The provider's own handle on the pool.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetScaling {
    Aws {
        launch_template: String,
        version: Option<String>,
        subnet_ids: Vec<String>,
    },
    /// A VM scale set.
    Azure {
        subscription_id: String,
        resource_group: String,
        scale_set: String,
    },
    /// An AKS agent pool (node pool) of a managed cluster.
    Aks {
        subscription_id: String,
        resource_group: String,
        cluster: String,
        agent_pool: String,
    },
}

impl Target {
    /// The target of a pool with `scaling` for its own provider; `None` otherwise.
    pub fn of(pool: &GpuNodePool) -> Option<Target> {
        let spec = &pool.spec;
        let scaling = spec.scaling.as_ref()?;
        let scaling = match spec.provider {
            Provider::Aws => {
                let aws = scaling.aws.as_ref()?;
                TargetScaling::Aws {
                    launch_template: aws.launch_template.name.clone(),
                    version: aws.launch_template.version.clone(),
                    subnet_ids: aws.subnet_ids.clone(),
                }
            }
            Provider::Azure => {
                let azure = scaling.azure.as_ref()?;
                match (&azure.agent_pool, &azure.scale_set_name) {
                    (Some(pool), _) => TargetScaling::Aks {
                        subscription_id: pool.subscription_id.clone(),
                        resource_group: pool.resource_group.clone(),
                        cluster: pool.cluster.clone(),
                        agent_pool: pool.name.clone(),
                    },
                    (None, Some(scale_set)) => TargetScaling::Azure {
                        subscription_id: azure.subscription_id.clone()?,
                        resource_group: azure.resource_group.clone()?,
                        scale_set: scale_set.clone(),
                    },
                    (None, None) => return None,
                }
            }
        };
        Some(Target {
            pool: pool.metadata.name.clone().unwrap_or_default(),
            region: spec.region.clone(),
            zone: spec.zone.clone(),
            instance_type: spec.instance_type.clone(),
            capacity_type: spec.capacity_type,
            scaling,
        })
    }
}

/// Where an instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceState {
    /// Launched, not yet running.
    Pending,
    Running,
    /// Being terminated or deleted.
    Stopping,
    /// Gone; the cloud still lists it for a while.
    Terminated,
}

/// One instance (EC2) or VM (scale set) of a pool.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    /// The id the provider's terminate call takes (`i-...`, or the VM instance id).
    pub id: String,
    /// What the Node's `spec.providerID` says for it.
    pub provider_id: String,
    pub state: InstanceState,
    /// When it was launched, if the cloud says.
    pub launched: Option<Timestamp>,
}

impl Instance {
    /// Pending or running: it is or will become a node.
    pub fn live(&self) -> bool {
        matches!(self.state, InstanceState::Pending | InstanceState::Running)
    }
}

/// A request for more instances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// Live instances the pool has now (Azure sets the scale set to `have + add`).
    pub have: u32,
    /// How many more to launch.
    pub add: u32,
    /// Idempotency token: the same token with the same request never launches
    /// twice (EC2 `ClientToken`; at most 64 ASCII characters).
    pub token: String,
}

/// The kinds of cloud failure the scaler acts on differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The cloud has no capacity for this instance type here right now.
    InsufficientCapacity,
    /// An account limit (vCPU or core quota) stops the launch.
    QuotaExceeded,
    /// Too many requests; try again after `retry_after` (the server's `Retry-After`,
    /// when it sent one).
    Throttled { retry_after: Option<Duration> },
    /// The pool's cloud resource (launch template, subnet, scale set, instance) does
    /// not exist.
    NotFound,
    /// The credentials are missing, wrong or not allowed to do this.
    Unauthorized,
    /// The cloud refused the request itself (bad parameters); repeating it will not help.
    Invalid,
    /// The pool's cloud resource is busy with an operation someone else started,
    /// or changed by someone else (an AKS agent pool `Updating`, its `count` not
    /// what its machines are): Outrigger waits instead of overriding it.
    Conflict,
    /// Anything that may work if tried again: 5xx, timeouts, connection errors,
    /// failed long-running operations.
    Transient,
    /// Launched instances never became Ready Nodes (the registration timeout): a
    /// failed launch of the offering, found by the scaler, not sent by a cloud.
    NotRegistered,
}

/// A failed cloud call: its kind, the provider's error code and message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("failed to {operation} ({code}): {message}")]
pub struct CloudError {
    pub kind: ErrorKind,
    pub operation: &'static str,
    pub code: String,
    pub message: String,
}

impl CloudError {
    pub fn new(
        kind: ErrorKind,
        operation: &'static str,
        code: impl Into<String>,
        message: impl Into<String>,
    ) -> CloudError {
        CloudError {
            kind,
            operation,
            code: code.into(),
            message: message.into(),
        }
    }

    /// A label for metrics, Events and condition reasons.
    pub fn category(&self) -> &'static str {
        match self.kind {
            ErrorKind::InsufficientCapacity => "InsufficientCapacity",
            ErrorKind::QuotaExceeded => "QuotaExceeded",
            ErrorKind::Throttled { .. } => "Throttled",
            ErrorKind::NotFound => "NotFound",
            ErrorKind::Unauthorized => "Unauthorized",
            ErrorKind::Invalid => "Invalid",
            ErrorKind::Conflict => "ResourceBusy",
            ErrorKind::Transient => "Transient",
            ErrorKind::NotRegistered => "RegistrationTimeout",
        }
    }

    /// The pool cannot grow for a while: it goes into capacity backoff.
    pub fn blocks_growth(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::InsufficientCapacity | ErrorKind::QuotaExceeded | ErrorKind::NotRegistered
        )
    }

    /// Worth repeating the same request soon.
    pub fn retryable(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::Throttled { .. } | ErrorKind::Transient
        )
    }
}

/// A cloud that holds pools of instances. Implementations send exactly the requests
/// each method names (no retries of their own: [`metered::Metered`] adds them), and
/// classify every failure into an [`ErrorKind`].
#[async_trait::async_trait]
pub trait CloudProvider: Send + Sync {
    fn provider(&self) -> Provider;

    /// Every instance the cloud holds for the pool, in any state, including those
    /// still pending and those terminated recently.
    async fn instances(&self, target: &Target) -> Result<Vec<Instance>, CloudError>;

    /// Launches up to `launch.add` more instances, tagged for the pool; returns how
    /// many were accepted (EC2 may accept fewer). Repeating the same `launch` (same
    /// token, same `have`) never launches twice. A capacity or quota error stops the
    /// whole request: nothing else is tried for the same offering.
    async fn launch(&self, target: &Target, launch: &Launch) -> Result<u32, CloudError>;

    /// Terminates the chosen instances and waits until the cloud has accepted
    /// (EC2) or finished (Azure) it. Ids already gone are not an error.
    async fn terminate(&self, target: &Target, ids: &[String]) -> Result<(), CloudError>;
}

/// The providers this operator can scale, as configured.
#[derive(Clone, Default)]
pub struct Clouds {
    pub aws: Option<std::sync::Arc<dyn CloudProvider>>,
    pub azure: Option<std::sync::Arc<dyn CloudProvider>>,
}

impl Clouds {
    pub fn get(&self, provider: Provider) -> Option<&std::sync::Arc<dyn CloudProvider>> {
        match provider {
            Provider::Aws => self.aws.as_ref(),
            Provider::Azure => self.azure.as_ref(),
        }
    }
}
