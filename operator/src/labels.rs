//! Labels, annotations and resource names Outrigger puts on what it manages.

/// On every child and its pods: the ModelDeployment that owns it.
pub const DEPLOYMENT: &str = "outrigger.dev/deployment";
/// On every child Deployment and its pods: the GpuNodePool it runs on.
pub const POOL: &str = "outrigger.dev/pool";
/// On every child: who manages it.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGER: &str = "outrigger";
/// On every child: a hash of what Outrigger applied, so an unchanged child is not
/// written again.
pub const APPLIED_HASH: &str = "outrigger.dev/applied-hash";
/// The extended resource a GPU is.
pub const GPU: &str = "nvidia.com/gpu";
/// The field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "outrigger";
/// On a Node the scaler cordoned to return it; an admin's cordon is left alone.
pub const SCALE_DOWN: &str = "outrigger.dev/scale-down";
/// The taint the node lifecycle controller puts on an unreachable node.
pub const UNREACHABLE_TAINT: &str = "node.kubernetes.io/unreachable";
/// Pool Ready reason once its nodes are back after being lost: replicas return
/// only after `failover.rebalanceAfterSeconds` from this transition.
pub const REASON_RECOVERED: &str = "Recovered";
pub const REASON_NODES_LOST: &str = "NodesLost";
/// On a Node whose instance is being interrupted: the typed notice
/// (`lifecycle::Interruption` as JSON: kind, when noticed, deadline).
pub const INTERRUPTION: &str = "outrigger.dev/interruption";
/// On a pod of a doomed Node: the ReplicaSet removes it first when it scales down.
pub const POD_DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";
