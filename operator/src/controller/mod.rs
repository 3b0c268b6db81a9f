//! The controllers and what they share: the reflectors' stores, the applier, the
//! clock, metrics and the Event recorder. Each controller keeps its own state in
//! its own context (`model_deployment::Ctx`, `scaler::Ctx`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::Store;
use outrigger_crds::{CapacityBackoff, GpuNodePool, Provider};

use crate::cloud::{CloudError, Clouds};
use crate::observe::inventory::{Inventory, LostClock};
use crate::observe::written::WrittenChildren;
use crate::telemetry::Metrics;

pub mod apply;
pub mod interruption;
pub mod model_deployment;
pub mod peer;
pub mod pool;
pub mod scaler;
#[cfg(test)]
mod tests;

/// An inventory, the store generation it was built at, and when a write it counts
/// stops counting (it is built again then).
type Built = Option<(u64, Option<Timestamp>, Arc<Inventory>)>;

/// Caches of everything the controllers read; they never list on a reconcile.
#[derive(Clone)]
pub struct Stores {
    pub pools: Store<GpuNodePool>,
    pub nodes: Store<Node>,
    pub pods: Store<Pod>,
    pub deployments: Store<Deployment>,
    pub services: Store<Service>,
    pub budgets: Store<PodDisruptionBudget>,
    /// Bumped on every change the inventory reads (pools, nodes, pods, child
    /// Deployments), after the store holds it.
    pub generation: Arc<AtomicU64>,
    /// The inventory as of a generation, shared by every pass until the next change.
    built: Arc<std::sync::Mutex<Built>>,
    /// When each lost node was first seen lost, across reconciles.
    lost_clock: Arc<std::sync::Mutex<LostClock>>,
    /// Capacity the clouds reclaimed (spot interruptions), as offering backoffs,
    /// until the scalers' pool statuses carry them.
    reclaimed: Arc<std::sync::Mutex<Vec<(Provider, CapacityBackoff)>>>,
    /// Child Deployments written that the store does not show yet: the inventory
    /// counts them, so the next plan sees the room the last one took (and a second
    /// pass does not write the same child again) before the watch brings them.
    written: WrittenChildren,
}

impl Stores {
    pub fn new(
        pools: Store<GpuNodePool>,
        nodes: Store<Node>,
        pods: Store<Pod>,
        deployments: Store<Deployment>,
        services: Store<Service>,
        budgets: Store<PodDisruptionBudget>,
        generation: Arc<AtomicU64>,
    ) -> Stores {
        Stores {
            pools,
            nodes,
            pods,
            deployments,
            services,
            budgets,
            generation,
            built: Arc::default(),
            lost_clock: Arc::default(),
            reclaimed: Arc::default(),
            written: WrittenChildren::default(),
        }
    }

    /// These stores, with the written children their Deployment watch reports to.
    pub fn with_written(self, written: WrittenChildren) -> Stores {
        Stores { written, ..self }
    }

    /// Records a child Deployment this operator applied (`Some`, as the API server
    /// answered) or deleted (`None`), so that the inventory counts it before the
    /// store shows it.
    pub fn wrote(&self, namespace: &str, name: &str, applied: Option<Deployment>, now: Timestamp) {
        self.written.wrote(namespace, name, applied, now);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Records reclaimed capacity as a backoff of its offering, and has the next
    /// inventory build again with it. Records that have ended are dropped.
    pub fn reclaim(&self, provider: Provider, record: CapacityBackoff, now: Timestamp) {
        let mut reclaimed = self.reclaimed.lock().unwrap_or_else(|e| e.into_inner());
        reclaimed.retain(|(_, r)| r.until.0 > now);
        reclaimed.push((provider, record));
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// The inventory: built from the stores once per change, and shared until the
    /// next one. `now` starts the lost clock of nodes first seen lost in this build.
    pub fn inventory(&self, now: Timestamp) -> Arc<Inventory> {
        // Read before building: a change that lands during the build makes the
        // next call build again.
        let generation = self.generation.load(Ordering::Acquire);
        // A panic while a lock is held leaves plain data behind; carry on with it.
        let mut built = self.built.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, ends, inventory)) = built.as_ref()
            && *at == generation
            && ends.is_none_or(|ends| now < ends)
        {
            return inventory.clone();
        }
        let mut clock = self.lost_clock.lock().unwrap_or_else(|e| e.into_inner());
        let (deployments, ends) = self.written.overlay(&self.deployments, now);
        let mut inventory = Inventory::new(
            self.pools.state(),
            &self.nodes.state(),
            &self.pods.state(),
            &deployments,
            now,
            &mut clock,
        );
        inventory.reclaimed(&self.reclaimed.lock().unwrap_or_else(|e| e.into_inner()));
        let inventory = Arc::new(inventory);
        *built = Some((generation, ends, inventory.clone()));
        inventory
    }
}

/// What time it is; tests set it.
pub type Clock = Arc<dyn Fn() -> Timestamp + Send + Sync>;

pub struct Context {
    pub stores: Stores,
    pub applier: apply::Applier,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    /// The clouds scalable pools grow in.
    pub clouds: Clouds,
    pub clock: Clock,
    /// How long an offering whose capacity the cloud reclaimed (a spot
    /// interruption) stays in backoff: `--capacity-backoff-seconds`.
    pub reclaim_backoff: std::time::Duration,
    /// The links to peer clusters; `None` when the PeerCluster CRD is not served.
    pub peers: Option<Arc<crate::observe::peers::Peers>>,
}

impl Context {
    pub fn now(&self) -> Timestamp {
        (self.clock)()
    }

    /// Records an Event on `reference`; a failure to record is logged, never fatal.
    pub async fn publish(
        &self,
        reference: &k8s_openapi::api::core::v1::ObjectReference,
        action: &str,
        type_: kube::runtime::events::EventType,
        reason: &str,
        note: String,
    ) {
        tracing::info!(
            object = %format!(
                "{}/{}",
                reference.namespace.as_deref().unwrap_or_default(),
                reference.name.as_deref().unwrap_or_default()
            ),
            reason,
            %note,
            "event"
        );
        let event = kube::runtime::events::Event {
            type_,
            reason: reason.to_string(),
            note: Some(note),
            action: action.to_string(),
            secondary: None,
        };
        let sent = std::time::Instant::now();
        match self.recorder.publish(&event, reference).await {
            Ok(()) => self.metrics.wrote("events", "create", sent.elapsed()),
            Err(e) => tracing::warn!(error = %e, "failed to publish an Event"),
        }
    }
}

/// Why a reconcile failed; `category` labels metrics.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to apply {kind} {name}: {source}")]
    Apply {
        kind: String,
        name: String,
        source: kube::Error,
    },
    #[error("failed to delete {kind} {name}: {source}")]
    Delete {
        kind: String,
        name: String,
        source: kube::Error,
    },
    #[error("failed to write the status of {name}: {source}")]
    Status { name: String, source: kube::Error },
    #[error("failed to scale pool {pool}: {source}")]
    Cloud { pool: String, source: CloudError },
    #[error("failed to release pool {pool}: {running} instances still running")]
    Releasing { pool: String, running: usize },
    #[error("failed to update the finalizer: {0}")]
    Finalizer(String),
}

impl Error {
    pub fn category(&self) -> &'static str {
        match self {
            Error::Apply { .. } => "apply",
            Error::Delete { .. } => "delete",
            Error::Status { .. } => "status",
            Error::Cloud { source, .. } => source.category(),
            Error::Releasing { .. } => "releasing",
            Error::Finalizer(_) => "finalizer",
        }
    }
}
