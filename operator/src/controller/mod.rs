//! The controllers and what they share: the reflectors' stores, the client, metrics
//! and the Event recorder.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::Store;
use outrigger_crds::GpuNodePool;
use tokio::sync::Mutex;

use crate::cloud::{CloudError, Clouds};
use crate::inventory::{Inventory, Key, LostClock};
use crate::telemetry::Metrics;

pub mod model_deployment;
pub mod pool;
pub mod scaler;

/// Caches of everything the controllers read; they never list on a reconcile.
#[derive(Clone)]
pub struct Stores {
    pub pools: Store<GpuNodePool>,
    pub nodes: Store<Node>,
    pub pods: Store<Pod>,
    pub deployments: Store<Deployment>,
    pub services: Store<Service>,
    pub budgets: Store<PodDisruptionBudget>,
    /// When each lost node was first seen lost, across reconciles.
    pub lost_clock: Arc<std::sync::Mutex<LostClock>>,
}

impl Stores {
    pub fn inventory(&self) -> Inventory {
        // A panic while the lock is held leaves plain data behind; carry on with it.
        let mut clock = self.lost_clock.lock().unwrap_or_else(|e| e.into_inner());
        Inventory::new(
            self.pools.state(),
            &self.nodes.state(),
            &self.pods.state(),
            &self.deployments.state(),
            Timestamp::now(),
            &mut clock,
        )
    }
}

pub struct Context {
    pub client: Client,
    pub stores: Stores,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    /// ModelDeployments moving off a lost pool, and since when its nodes were lost,
    /// until every replacement is Ready.
    pub failovers: Mutex<HashMap<Key, Timestamp>>,
    /// Each ModelDeployment's last plan and a digest of its solver input: a pass
    /// whose input is unchanged (say, only a pool it cannot use changed) does not
    /// solve again.
    pub plans: Mutex<outrigger_placement::Fleet<Key>>,
    /// The clouds scalable pools grow in.
    pub clouds: Clouds,
    pub scaler: scaler::Scaler,
}

impl Context {
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
        match self.recorder.publish(&event, reference).await {
            Ok(()) => self.metrics.wrote("events", "create"),
            Err(e) => tracing::warn!(error = %e, "failed to publish an Event"),
        }
    }
}

/// Why a reconcile failed; `category` labels metrics.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to apply {kind} {name}: {source}")]
    Apply {
        kind: &'static str,
        name: String,
        source: kube::Error,
    },
    #[error("failed to delete {kind} {name}: {source}")]
    Delete {
        kind: &'static str,
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
