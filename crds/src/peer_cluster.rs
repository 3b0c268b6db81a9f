//! `PeerCluster`: another cluster whose Outrigger serves the same ModelDeployments.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Desired state of a PeerCluster: how this cluster's Outrigger reads the peer's
/// API (read-only), and how long the peer may stay silent before it counts as lost.
// The printer columns repeat `type_ = ...`, which clippy takes for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "outrigger.dev",
    version = "v1alpha1",
    kind = "PeerCluster",
    plural = "peerclusters",
    shortname = "peer",
    category = "outrigger",
    status = "PeerClusterStatus",
    derive = "PartialEq",
    doc = "A PeerCluster is another cluster whose Outrigger serves the same ModelDeployments. \
           Its name is that cluster's `--cluster-name`. Every peer plans each ModelDeployment \
           over the pools of all the clusters that hold a copy of it, and acts only on its \
           own cluster. `outrigger peer add` creates PeerClusters in both directions.",
    printcolumn(
        name = "Reachable",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Reachable\")].status"
    ),
    printcolumn(
        name = "Mutual",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Mutual\")].status"
    ),
    printcolumn(
        name = "Facts-Valid",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"FactsValid\")].status"
    ),
    printcolumn(name = "Version", type_ = "string", json_path = ".status.version"),
    printcolumn(
        name = "Token-Expires",
        type_ = "date",
        priority = "1",
        json_path = ".status.tokenExpiresAt"
    ),
    printcolumn(name = "Last-Seen", type_ = "date", json_path = ".status.lastSeenTime"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(transform = crate::schema::kubernetes_conventions)]
pub struct PeerClusterSpec {
    /// The Secret key that holds a kubeconfig for the peer's API server, with a
    /// read-only token (`outrigger peer add` makes it).
    pub kubeconfig_secret_ref: SecretKeyRef,

    /// Seconds the peer's API may stay unreachable, or its operator's leader Lease
    /// expired, before the peer counts as lost and the other clusters take its
    /// share. Default 10.
    #[serde(default = "default_unreachable_after")]
    #[schemars(range(min = 1, max = 3600))]
    pub unreachable_after_seconds: u32,

    /// Namespace of the peer's Outrigger (its leader Lease lives there). Default
    /// `outrigger-system`.
    #[serde(default = "default_operator_namespace")]
    #[schemars(length(min = 1, max = 63))]
    pub operator_namespace: String,
}

fn default_unreachable_after() -> u32 {
    10
}

fn default_operator_namespace() -> String {
    "outrigger-system".to_string()
}

/// One key of one Secret.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[x_kube(validation = Rule::new(
    "self.key.matches('^[-._a-zA-Z0-9]+$')"
).message("kubeconfigSecretRef.key must be a Secret data key (letters, digits, '-', '_', '.'), e.g. kubeconfig").field_path(".key"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretKeyRef {
    /// Namespace of the Secret.
    #[schemars(length(min = 1, max = 63))]
    pub namespace: String,
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key in the Secret's data. Default `kubeconfig`.
    #[serde(default = "default_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_key() -> String {
    "kubeconfig".to_string()
}

/// Observed state of a PeerCluster, written by this cluster's Outrigger.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::schema::kubernetes_conventions)]
pub struct PeerClusterStatus {
    /// The last time the peer's API answered and its operator held its Lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen_time: Option<Time>,
    /// The peer API server's version (`gitVersion`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The peer's Outrigger version, from its leader Lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator_version: Option<String>,
    /// Since when this cluster counts the peer as lost (its share taken over);
    /// absent while it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_since: Option<Time>,
    /// When the peer came back after it was lost: its pools take no new replicas
    /// until each ModelDeployment's `failover.rebalanceAfterSeconds` after this.
    /// The peer reads this too, so both sides hold back alike.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub back_since: Option<Time>,
    /// When the token in the kubeconfig Secret expires (its `exp` claim); renew it
    /// before then with `outrigger peer rotate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_expires_at: Option<Time>,
    /// The peer's clock minus this cluster's, in whole seconds, measured from its
    /// API server's `Date` header. The times the peer publishes are corrected by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_skew_seconds: Option<i64>,
    /// `Reachable` (the API answers and the operator leads), `Mutual` (the peer
    /// has a PeerCluster for this cluster), `FactsValid` (its published pools pass
    /// the checks), `ClockSkew` (its clock is off by more than 5 s) and
    /// `TokenExpiring` (the token expires within 7 days), with reason and message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}
