//! Logs, metrics and the health endpoints (`/metrics`, `/healthz`, `/readyz`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Reconcile and write buckets: 100 ms, the latency goal, is a bound, so the share
/// of reconciles within it is read off `/metrics` without interpolation; 150 and
/// 200 ms are too, so a tail just over the goal is not smeared up to 250 ms.
const RECONCILE_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Structured logs on stderr; `RUST_LOG` filters (default `info`).
pub fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub controller: String,
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub controller: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplicaLabels {
    pub deployment: String,
    pub provider: String,
    pub pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloudLabels {
    pub provider: String,
    pub operation: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloudOperationLabels {
    pub provider: String,
    pub operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    pub resource: String,
    pub verb: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InterruptionLabels {
    pub provider: String,
    pub kind: String,
    pub action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RepairLabels {
    pub provider: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub peer: String,
}

/// One condition of one object, as kube-state-metrics shows them: the series with
/// the current status and reason is 1.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConditionLabels {
    /// `ModelDeployment` or `PeerCluster`.
    pub kind: String,
    /// `namespace/name`, or the name of a cluster-scoped object.
    pub name: String,
    pub r#type: String,
    pub status: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeploymentLabels {
    pub deployment: String,
}

/// Every metric Outrigger exports, prefixed `outrigger_`.
pub struct Metrics {
    pub registry: Registry,
    pub reconcile_duration: Family<ControllerLabels, Histogram>,
    reconcile_phase: Family<PhaseLabels, Histogram>,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    replicas: Family<ReplicaLabels, Gauge>,
    /// The series of `replicas` set per ModelDeployment, so a deleted one's go too.
    replica_series: std::sync::Mutex<HashMap<String, HashSet<ReplicaLabels>>>,
    pub failover_seconds: Histogram,
    pub api_writes: Family<WriteLabels, Counter>,
    api_write_duration: Family<WriteLabels, Histogram>,
    pub leader: Gauge,
    pub cloud_requests: Family<CloudLabels, Counter>,
    interruptions: Family<InterruptionLabels, Counter>,
    repairs: Family<RepairLabels, Counter>,
    pub cloud_request_duration: Family<CloudOperationLabels, Histogram>,
    pub peer_reachable: Family<PeerLabels, Gauge>,
    pub peer_last_seen_seconds: Family<PeerLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub peer_clock_skew_seconds: Family<PeerLabels, Gauge>,
    pub peer_watch_restarts: Family<PeerLabels, Gauge>,
    status_condition: Family<ConditionLabels, Gauge>,
    /// The series of `status_condition` set per object (kind and name), so a
    /// changed or deleted condition's go.
    condition_series: std::sync::Mutex<HashMap<(String, String), Vec<ConditionLabels>>>,
    replicas_over_spec: Family<DeploymentLabels, Gauge>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("outrigger");
        // Reconciles take milliseconds; a slow API server can stretch them to seconds.
        let reconcile_duration =
            Family::<ControllerLabels, Histogram>::new_with_constructor(|| {
                Histogram::new(RECONCILE_BUCKETS)
            });
        let reconcile_phase = Family::<PhaseLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(RECONCILE_BUCKETS)
        });
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        let replicas = Family::<ReplicaLabels, Gauge>::default();
        // Failover goals are seconds; Kubernetes alone takes about 350 s.
        let failover_seconds = Histogram::new(exponential_buckets(0.5, 2.0, 12));
        let api_writes = Family::<WriteLabels, Counter>::default();
        let api_write_duration = Family::<WriteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(RECONCILE_BUCKETS)
        });
        let leader = Gauge::default();
        let cloud_requests = Family::<CloudLabels, Counter>::default();
        // Lists take tens of milliseconds; Azure scale-set operations take minutes.
        let cloud_request_duration =
            Family::<CloudOperationLabels, Histogram>::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.01, 2.0, 16))
            });
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconcile took",
            reconcile_duration.clone(),
        );
        registry.register(
            "reconcile_phase_seconds",
            "Time a reconcile spent in one phase: decide (observe, plan and decide, no I/O) or write (its writes, sent together; passes that wrote only)",
            reconcile_phase.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by controller and error kind",
            reconcile_errors.clone(),
        );
        registry.register(
            "replicas",
            "Replicas placed, by ModelDeployment, provider and pool",
            replicas.clone(),
        );
        registry.register(
            "failover_seconds",
            "From a pool's nodes being lost to every replacement replica Ready",
            failover_seconds.clone(),
        );
        registry.register(
            "api_writes",
            "Writes Outrigger sent to the API server, by resource and verb",
            api_writes.clone(),
        );
        registry.register(
            "api_write_duration_seconds",
            "Time one write took, as Outrigger saw it (request sent to answer read), by resource and verb",
            api_write_duration.clone(),
        );
        registry.register(
            "leader",
            "1 while this process holds the leader Lease",
            leader.clone(),
        );
        registry.register(
            "cloud_requests",
            "Cloud API attempts, by provider, operation and result (ok or the error kind)",
            cloud_requests.clone(),
        );
        let interruptions = Family::<InterruptionLabels, Counter>::default();
        registry.register(
            "interruptions",
            "Interruption notices and queue messages, by provider, kind (spot, scheduled, state-change, preempt, rebalance, or unparsable) and what Outrigger did (cordoned, event, not-ours, ignored, deleted)",
            interruptions.clone(),
        );
        let repairs = Family::<RepairLabels, Counter>::default();
        registry.register(
            "repairs",
            "Broken nodes whose instance the scaler terminated to replace it, by provider and reason",
            repairs.clone(),
        );
        let peer_reachable = Family::<PeerLabels, Gauge>::default();
        let peer_last_seen_seconds =
            Family::<PeerLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "peer_reachable",
            "1 while the peer's API answers and its operator leads, by PeerCluster",
            peer_reachable.clone(),
        );
        registry.register(
            "peer_last_seen_seconds",
            "Seconds since the peer last answered, by PeerCluster",
            peer_last_seen_seconds.clone(),
        );
        let peer_clock_skew_seconds = Family::<PeerLabels, Gauge>::default();
        registry.register(
            "peer_clock_skew_seconds",
            "The peer's clock minus this cluster's, in whole seconds, from its API server's Date header, by PeerCluster",
            peer_clock_skew_seconds.clone(),
        );
        let peer_watch_restarts = Family::<PeerLabels, Gauge>::default();
        registry.register(
            "peer_watch_restarts",
            "How often the current link's watches of the peer were started anew (it answered after a failed probe, or they went silent while it answered), by PeerCluster",
            peer_watch_restarts.clone(),
        );
        let status_condition = Family::<ConditionLabels, Gauge>::default();
        registry.register(
            "status_condition",
            "1 for each condition's current status and reason, by kind (ModelDeployment, PeerCluster), object, type, status and reason",
            status_condition.clone(),
        );
        let replicas_over_spec = Family::<DeploymentLabels, Gauge>::default();
        registry.register(
            "replicas_over_spec",
            "Replicas a ModelDeployment runs over its spec.replicas, in every cluster this one knows of (its own, and each peer's as last seen): above 0 for long, a partition or a misconfigured peer has both sides serving the whole spec",
            replicas_over_spec.clone(),
        );
        registry.register(
            "cloud_request_duration_seconds",
            "Time one cloud API attempt took, long-running operation included",
            cloud_request_duration.clone(),
        );
        Metrics {
            registry,
            cloud_requests,
            interruptions,
            repairs,
            cloud_request_duration,
            reconcile_duration,
            reconcile_phase,
            reconcile_errors,
            replicas,
            replica_series: Default::default(),
            failover_seconds,
            api_writes,
            api_write_duration,
            leader,
            peer_reachable,
            peer_last_seen_seconds,
            peer_clock_skew_seconds,
            peer_watch_restarts,
            status_condition,
            condition_series: Default::default(),
            replicas_over_spec,
        }
    }

    /// Sets `outrigger_status_condition` of one object to its conditions now,
    /// dropping the series of statuses and reasons it no longer has.
    pub fn set_conditions(
        &self,
        kind: &str,
        name: &str,
        conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    ) {
        let labels: Vec<ConditionLabels> = conditions
            .iter()
            .map(|c| ConditionLabels {
                kind: kind.to_string(),
                name: name.to_string(),
                r#type: c.type_.clone(),
                status: c.status.clone(),
                reason: c.reason.clone(),
            })
            .collect();
        let mut series = self
            .condition_series
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let key = (kind.to_string(), name.to_string());
        for gone in series.get(&key).into_iter().flatten() {
            if !labels.contains(gone) {
                self.status_condition.remove(gone);
            }
        }
        for l in &labels {
            self.status_condition.get_or_create(l).set(1);
        }
        series.insert(key, labels);
    }

    fn forget_conditions(&self, kind: &str, name: &str) {
        let mut series = self
            .condition_series
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for gone in series
            .remove(&(kind.to_string(), name.to_string()))
            .unwrap_or_default()
        {
            self.status_condition.remove(&gone);
        }
    }

    /// Sets `outrigger_replicas_over_spec` of a ModelDeployment (`namespace/name`).
    pub fn set_over_spec(&self, deployment: &str, over: u32) {
        self.replicas_over_spec
            .get_or_create(&DeploymentLabels {
                deployment: deployment.to_string(),
            })
            .set(i64::from(over));
    }

    fn replica_series(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashSet<ReplicaLabels>>> {
        // A panic while the lock is held leaves plain data behind; carry on with it.
        self.replica_series
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Sets `outrigger_replicas` of one ModelDeployment on one pool; 0 removes the series.
    pub fn set_replicas(&self, labels: ReplicaLabels, replicas: u32) {
        let mut series = self.replica_series();
        if replicas > 0 {
            self.replicas
                .get_or_create(&labels)
                .set(i64::from(replicas));
            series
                .entry(labels.deployment.clone())
                .or_default()
                .insert(labels);
        } else {
            self.replicas.remove(&labels);
            if let Some(set) = series.get_mut(&labels.deployment) {
                set.remove(&labels);
            }
        }
    }

    /// Drops a removed peer's series.
    pub fn forget_peer(&self, peer: &str) {
        let labels = PeerLabels {
            peer: peer.to_string(),
        };
        self.peer_reachable.remove(&labels);
        self.peer_last_seen_seconds.remove(&labels);
        self.peer_clock_skew_seconds.remove(&labels);
        self.peer_watch_restarts.remove(&labels);
        self.forget_conditions("PeerCluster", peer);
    }

    /// Removes every series of a ModelDeployment that is gone (`namespace/name`).
    pub fn forget_deployment(&self, deployment: &str) {
        for labels in self.replica_series().remove(deployment).unwrap_or_default() {
            self.replicas.remove(&labels);
        }
        self.forget_conditions("ModelDeployment", deployment);
        self.replicas_over_spec.remove(&DeploymentLabels {
            deployment: deployment.to_string(),
        });
    }

    /// Counts and times one cloud API attempt.
    pub fn cloud_request(
        &self,
        provider: &str,
        operation: &str,
        result: &str,
        took: std::time::Duration,
    ) {
        self.cloud_requests
            .get_or_create(&CloudLabels {
                provider: provider.to_string(),
                operation: operation.to_string(),
                result: result.to_string(),
            })
            .inc();
        self.cloud_request_duration
            .get_or_create(&CloudOperationLabels {
                provider: provider.to_string(),
                operation: operation.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }

    /// Counts a write that took `took`.
    pub fn wrote(&self, resource: &str, verb: &str, took: std::time::Duration) {
        let labels = WriteLabels {
            resource: resource.to_string(),
            verb: verb.to_string(),
        };
        self.api_write_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        self.api_writes.get_or_create(&labels).inc();
    }

    /// Starts timing a reconcile; the duration is recorded when the guard drops.
    pub fn reconcile_timer(&self, controller: &str) -> ReconcileTimer<'_> {
        ReconcileTimer {
            metrics: self,
            controller: controller.to_string(),
            start: Instant::now(),
        }
    }

    /// Records how long a reconcile of `controller` spent in `phase`.
    pub fn reconcile_phase(&self, controller: &str, phase: &str, took: std::time::Duration) {
        self.reconcile_phase
            .get_or_create(&PhaseLabels {
                controller: controller.to_string(),
                phase: phase.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    pub fn interruption(&self, provider: &str, kind: &str, action: &str) {
        self.interruptions
            .get_or_create(&InterruptionLabels {
                provider: provider.to_string(),
                kind: kind.to_string(),
                action: action.to_string(),
            })
            .inc();
    }

    pub fn repaired(&self, provider: &str, reason: &str) {
        self.repairs
            .get_or_create(&RepairLabels {
                provider: provider.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn reconcile_failed(&self, controller: &str, kind: &str) {
        self.reconcile_errors
            .get_or_create(&ErrorLabels {
                controller: controller.to_string(),
                kind: kind.to_string(),
            })
            .inc();
    }
}

pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    controller: String,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .reconcile_duration
            .get_or_create(&ControllerLabels {
                controller: std::mem::take(&mut self.controller),
            })
            .observe(self.start.elapsed().as_secs_f64());
    }
}

/// What the health endpoints report.
#[derive(Clone)]
pub struct Health {
    pub metrics: Arc<Metrics>,
    /// True once the stores are synced (or while standing by for the Lease).
    pub ready: Arc<AtomicBool>,
}

async fn metrics(State(health): State<Health>) -> (StatusCode, String) {
    match health.metrics.encode() {
        Ok(text) => (StatusCode::OK, text),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "failed to encode metrics".into(),
        ),
    }
}

async fn readyz(State(health): State<Health>) -> (StatusCode, &'static str) {
    if health.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced")
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, health: Health) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(health);
    axum::serve(listener, app).await
}
