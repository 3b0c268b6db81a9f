//! `outrigger run`: the operator. Serves health and metrics, waits for the leader
//! Lease, fills its caches, then runs the controllers until shutdown or until the
//! Lease is lost (then it exits, so it never writes without the Lease).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use futures::channel::mpsc;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::Api;
use kube::core::DeserializeGuard;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, controller, watcher};
use kube::{Client, ResourceExt};
use outrigger_crds::{GpuNodePool, ModelDeployment, PeerCluster};
use tokio::sync::watch;

use crate::cloud::metered::{self, Metered};
use crate::cloud::{CloudProvider, Clouds, aws, azure};
use crate::controller::apply::Applier;
use crate::controller::{Context, Stores, interruption, model_deployment, peer, pool, scaler};
use crate::labels;
use crate::leader::Elector;
use crate::observe::peers::{Me, Peers};
use crate::observe::trim;
use crate::observe::watch::{
    Notify, mirror, node_fingerprint, pod_fingerprint, pokes, pool_fingerprint, route,
};
use crate::observe::written::WrittenChildren;
use crate::telemetry::{self, Health, LogFormat, Metrics};

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Where /metrics, /healthz and /readyz listen.
    #[arg(long, env = "OUTRIGGER_METRICS_ADDR", default_value = "127.0.0.1:8080")]
    metrics_addr: SocketAddr,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Take the leader Lease before acting (turn off only for a single replica).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Namespace of the leader Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, default_value = "outrigger-leader")]
    lease_name: String,
    /// This replica's name in the Lease (default: the pod name, or host and process id).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// The one namespace whose Secrets may hold peer kubeconfigs: a PeerCluster
    /// whose spec.kubeconfigSecretRef names another is refused, unread. Keep it
    /// apart from the operator's own namespace (chart peers.secretNamespace).
    #[arg(long, env = "OUTRIGGER_PEER_SECRET_NAMESPACE", default_value = crate::peer_cli::SECRET_NAMESPACE, value_parser = namespace_name)]
    peer_secret_namespace: String,
    #[command(flatten)]
    cloud: CloudArgs,
}

/// How Outrigger reaches the clouds and paces scaling (docs/cloud.md).
#[derive(clap::Args, Debug)]
pub struct CloudArgs {
    /// This cluster's name (a DNS label): the name its peers' PeerCluster for it
    /// has, required once it has peers, and the `outrigger.dev/cluster` tag on the
    /// EC2 instances it launches (only instances with it are listed, scaled and
    /// released; without a name the tag is `outrigger`).
    #[arg(long, env = "OUTRIGGER_CLUSTER_NAME", value_parser = cluster_name)]
    cluster_name: Option<String>,
    /// Another EC2 endpoint (the simulator); credentials still come from the
    /// standard AWS chain.
    #[arg(long)]
    aws_endpoint_url: Option<String>,
    /// One AWS region for every pool (default: each pool's spec.region).
    #[arg(long)]
    aws_region: Option<String>,
    /// The URL of an SQS queue that EventBridge rules fill with EC2 spot
    /// interruption warnings, rebalance recommendations, instance state changes and
    /// AWS Health scheduled changes (docs/cloud.md). Read with the same
    /// credentials and endpoint override as EC2. Without it, AWS interruptions are
    /// noticed only when the nodes go.
    #[arg(long, env = "OUTRIGGER_AWS_INTERRUPTION_QUEUE", value_parser = queue_url)]
    aws_interruption_queue: Option<String>,
    /// Another Azure Resource Manager endpoint (the simulator).
    #[arg(long)]
    azure_endpoint_url: Option<String>,
    /// A PEM file of CA certificates the Azure endpoint's certificate may chain to,
    /// besides the public roots: a private endpoint's CA, or the local cluster's
    /// for the simulator. Chart: cloud.azure.caBundle.
    #[arg(long, env = "OUTRIGGER_AZURE_CA_FILE", value_parser = ca_file)]
    azure_ca_file: Option<CaBundle>,
    /// A fixed Azure bearer token (the simulator); without it, a client secret or
    /// workload identity from the AZURE_* environment.
    #[arg(long, env = "OUTRIGGER_AZURE_TOKEN", hide_env_values = true)]
    azure_token: Option<String>,
    /// Seconds an Azure long-running operation may take before it counts as failed.
    #[arg(long, default_value_t = 600)]
    azure_operation_timeout_seconds: u64,
    /// Seconds a node must stay empty before it is returned to the cloud.
    #[arg(long, default_value_t = 300)]
    scale_down_after_seconds: u64,
    /// Seconds a launched instance may take to become a Ready Node before it is
    /// terminated as a failed launch of its offering (a capacity backoff): the
    /// default of each pool's spec.registrationTimeoutSeconds.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(10..))]
    instance_boot_grace_seconds: u64,
    /// Seconds a pool stops growing after a capacity or quota error; doubles while
    /// the errors repeat, up to ten times this.
    #[arg(long, default_value_t = crate::scaling::BACKOFF_FIRST.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    capacity_backoff_seconds: u64,
}

/// The instance tag of a cluster without `--cluster-name`.
const UNNAMED_TAG: &str = "outrigger";

fn queue_url(url: &str) -> Result<String, String> {
    if url.starts_with("https://") || url.starts_with("http://") {
        Ok(url.to_string())
    } else {
        Err(format!(
            "{url:?} is not a queue URL: give the QueueUrl SQS shows, such as https://sqs.us-east-1.amazonaws.com/123456789012/outrigger-interruptions"
        ))
    }
}

/// The contents of `--azure-ca-file`, read and checked when the flags are parsed.
#[derive(Clone, Debug)]
pub struct CaBundle(Vec<u8>);

fn ca_file(path: &str) -> Result<CaBundle, String> {
    let pem = std::fs::read(path)
        .map_err(|e| format!("cannot read {path}: {e}; give a PEM file of CA certificates"))?;
    if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
        return Err(format!(
            "{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----); give the CA bundle in PEM"
        ));
    }
    Ok(CaBundle(pem))
}

fn namespace_name(name: &str) -> Result<String, String> {
    crate::validate::dns_label(name)
        .map(|()| name.to_string())
        .map_err(|_| format!("{name:?} is not a namespace name: use lower-case letters, digits and '-' (a DNS label)"))
}

fn cluster_name(name: &str) -> Result<String, String> {
    crate::validate::dns_label(name).map_err(String::from)?;
    Ok(name.to_string())
}

impl CloudArgs {
    /// The clouds, and the interruption queue when one is named.
    async fn clouds(&self, metrics: &Arc<Metrics>) -> (Clouds, Option<interruption::Queue>) {
        let operation_timeout = Duration::from_secs(self.azure_operation_timeout_seconds);
        let policy = metered::Policy {
            operation_timeout: operation_timeout + Duration::from_secs(30),
            ..metered::Policy::default()
        };
        let settings = aws::AwsSettings {
            endpoint_url: self.aws_endpoint_url.clone(),
            region: self.aws_region.clone(),
            cluster: self
                .cluster_name
                .clone()
                .unwrap_or_else(|| UNNAMED_TAG.to_string()),
        };
        let config = aws::Aws::config(&settings).await;
        let queue = self
            .aws_interruption_queue
            .clone()
            .map(|url| interruption::Queue::new(&config, url));
        let aws = aws::Aws::with_config(config, settings);
        let azure = match azure::Azure::new(&azure::AzureSettings {
            endpoint_url: self.azure_endpoint_url.clone(),
            static_token: self.azure_token.clone(),
            operation_timeout,
            ca_pem: self.azure_ca_file.as_ref().map(|c| c.0.clone()),
        }) {
            Ok(a) => {
                Some(Arc::new(Metered::new(a, metrics.clone(), policy)) as Arc<dyn CloudProvider>)
            }
            Err(e) => {
                tracing::warn!(error = %e, "no Azure credentials: Azure pools will not scale");
                None
            }
        };
        (
            Clouds {
                aws: Some(Arc::new(Metered::new(aws, metrics.clone(), policy))),
                azure,
            },
            queue,
        )
    }

    fn scaler(&self) -> scaler::Settings {
        scaler::Settings {
            cooldown: Duration::from_secs(self.scale_down_after_seconds),
            boot_grace: Duration::from_secs(self.instance_boot_grace_seconds),
            backoff: Duration::from_secs(self.capacity_backoff_seconds),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("failed to reach the Kubernetes API (kubeconfig or in-cluster config): {0}")]
    Client(#[source] kube::Error),
    #[error("failed to listen on {addr} for metrics: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("lost the leader Lease ({0}); stopped to let another replica lead")]
    LostLease(String),
    #[error("--identity {0:?} is not valid in an HTTP header; use letters, digits, '-' and '.'")]
    Identity(String),
    #[error("the controllers stopped unexpectedly")]
    Stopped,
}

pub async fn run(args: &RunArgs) -> Result<(), RunError> {
    telemetry::init_logs(args.log_format);
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "outrigger".to_string());
        format!("{host}-{}", std::process::id())
    });
    let client = client(&identity).await?;
    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .map_err(|source| RunError::Listen {
            addr: args.metrics_addr,
            source,
        })?;
    tracing::info!(addr = %args.metrics_addr, "serving /metrics, /healthz and /readyz");
    tokio::spawn(telemetry::serve(
        listener,
        Health {
            metrics: metrics.clone(),
            ready: ready.clone(),
        },
    ));

    let elector = Elector::new(
        client.clone(),
        &args.lease_namespace,
        &args.lease_name,
        &identity,
        args.cloud.cluster_name.as_deref().unwrap_or_default(),
    );
    if args.leader_elect {
        // A standby is ready: it serves, it just does not act.
        ready.store(true, Ordering::Relaxed);
        tokio::select! {
            () = elector.acquire() => {}
            () = shutdown_signal() => return Ok(()),
        }
        ready.store(false, Ordering::Relaxed);
    }
    metrics.leader.set(1);

    let (clouds, queue) = args.cloud.clouds(&metrics).await;
    let (stop_tx, stop_rx) = watch::channel(false);
    let me = Me {
        name: args.cloud.cluster_name.clone().unwrap_or_default(),
        uid: None,
        lease_name: args.lease_name.clone(),
        secret_namespace: args.peer_secret_namespace.clone(),
    };
    let mut controllers = tokio::spawn(run_controllers(
        client,
        metrics.clone(),
        ready,
        identity,
        (clouds, queue, args.cloud.scaler()),
        me,
        stop_rx,
    ));
    let lost = async {
        if args.leader_elect {
            elector.hold().await
        } else {
            futures::future::pending().await
        }
    };
    tokio::select! {
        reason = lost => {
            tracing::error!(%reason, "lost the leader Lease; stopping at once");
            controllers.abort();
            metrics.leader.set(0);
            Err(RunError::LostLease(reason))
        }
        () = shutdown_signal() => {
            tracing::info!("shutting down: finishing reconciles in flight");
            let _ = stop_tx.send(true);
            // In-flight reconciles get a few seconds to finish.
            if tokio::time::timeout(Duration::from_secs(10), &mut controllers).await.is_err() {
                controllers.abort();
            }
            if args.leader_elect {
                elector.release().await;
            }
            Ok(())
        }
        _ = &mut controllers => Err(RunError::Stopped),
    }
}

/// A client from the kubeconfig or the in-cluster config, that names itself
/// `outrigger/<version> <identity>` so audit logs tell its writes apart.
async fn client(identity: &str) -> Result<Client, RunError> {
    let mut config = kube::Config::infer()
        .await
        .map_err(|e| RunError::Client(kube::Error::InferConfig(e)))?;
    config.headers.push((
        axum::http::header::USER_AGENT,
        axum::http::HeaderValue::from_str(&format!(
            "outrigger/{} {identity}",
            env!("CARGO_PKG_VERSION")
        ))
        .map_err(|_| RunError::Identity(identity.to_string()))?,
    ));
    Client::try_from(config).map_err(RunError::Client)
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler installs");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// How long a ModelDeployment or pool reconcile waits for more triggers of the same
/// object: short next to failover's seconds, long enough to merge a burst.
const DEBOUNCE: Duration = Duration::from_millis(300);
/// The least time between two pokes of a controller from a shared change signal:
/// wider than DEBOUNCE, so a cluster that keeps changing cannot hold its
/// reconciles back (`observe::watch::pokes`).
const POKE_SPACING: Duration = Duration::from_millis(600);

/// How often the API is asked again for CRDs that are missing: the fix is one
/// `kubectl apply`, after which the controllers should start promptly.
const CRD_RECHECK: Duration = Duration::from_secs(5);
/// How often a missing CRD is said again in the log while it stays missing.
const CRD_REMINDER: Duration = Duration::from_secs(60);

/// Outrigger's resources, by plural, that the API server must serve.
const RESOURCES: [&str; 2] = ["gpunodepools", "modeldeployments"];

/// Waits until the API server serves Outrigger's resources. Until then it says which
/// are missing and how to install them, instead of failing every watch with an
/// unparsable 404; `/readyz` stays false meanwhile.
async fn wait_for_crds(client: &Client) {
    let api_version = format!("{}/{}", outrigger_crds::GROUP, outrigger_crds::VERSION);
    let mut said: Option<(Vec<String>, std::time::Instant)> = None;
    loop {
        let missing: Vec<String> = match client.list_api_group_resources(&api_version).await {
            Ok(list) => RESOURCES
                .into_iter()
                .filter(|r| !list.resources.iter().any(|x| x.name == *r))
                .map(String::from)
                .collect(),
            Err(kube::Error::Api(status)) if status.code == 404 => {
                RESOURCES.into_iter().map(String::from).collect()
            }
            Err(e) => {
                tracing::warn!(error = %e, "failed to ask the API server which Outrigger resources it serves; asking again");
                tokio::time::sleep(CRD_RECHECK).await;
                continue;
            }
        };
        if missing.is_empty() {
            if said.is_some() {
                tracing::info!("the Outrigger CRDs are installed now; starting the controllers");
            }
            return;
        }
        let due = said
            .as_ref()
            .is_none_or(|(before, at)| *before != missing || at.elapsed() >= CRD_REMINDER);
        if due {
            tracing::error!(
                missing = %missing.join(", "),
                "the API server does not serve {api_version} {}: the Outrigger CRDs are not installed. Install them with `kubectl apply -f crds/` (or the Helm chart, which ships them); the controllers start once they are",
                missing.join(" and ")
            );
            said = Some((missing, std::time::Instant::now()));
        }
        tokio::time::sleep(CRD_RECHECK).await;
    }
}

async fn run_controllers(
    client: Client,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    identity: String,
    (clouds, queue, scaler): (Clouds, Option<interruption::Queue>, scaler::Settings),
    mut me: Me,
    stop: watch::Receiver<bool>,
) {
    wait_for_crds(&client).await;
    let peers = if peers_served(&client).await {
        // Told apart from a peer by its kube-system namespace.
        me.uid = Api::<Namespace>::all(client.clone())
            .get_opt("kube-system")
            .await
            .ok()
            .flatten()
            .and_then(|ns| ns.metadata.uid);
        let peers = Peers::new(me, Arc::new(k8s_openapi::jiff::Timestamp::now));
        // Plans wait until each PeerCluster there is now is linked: planning before
        // would leave its cluster out, and launch its share here.
        loop {
            match Api::<PeerCluster>::all(client.clone())
                .list(&Default::default())
                .await
            {
                Ok(list) => break peers.expect(list.items.iter().map(ResourceExt::name_any)),
                Err(e) => {
                    tracing::warn!(error = %e, "failed to list PeerClusters at start; listing again");
                    tokio::time::sleep(CRD_RECHECK).await;
                }
            }
        }
        Some(Arc::new(peers))
    } else {
        None
    };
    let managed = format!("{}={}", labels::MANAGED_BY, labels::MANAGER);
    // Node and pool changes can change any plan; pod changes only change GPU counts,
    // which the pool controllers report (a plan sees them on its next pass).
    let (changed, _) = watch::channel(0u64);
    let (usage, _) = watch::channel(0u64);
    // Child Deployments trigger their ModelDeployment through their store.
    let (children_changed, owners) = mpsc::unbounded();
    // A node's change names its pools; the ModelDeployments those pools concern
    // are triggered (see `route`).
    let (pools_changed, pool_names) = mpsc::unbounded();
    let generation = Arc::new(AtomicU64::new(0));
    let pools_store = mirror(
        Api::all(client.clone()),
        watcher::Config::default(),
        trim::pool,
        Notify::Fingerprint(changed.clone(), pool_fingerprint),
        Some(generation.clone()),
    );
    let written = WrittenChildren::default();
    let stores = Stores::new(
        pools_store.clone(),
        mirror(
            Api::all(client.clone()),
            watcher::Config::default(),
            trim::node,
            Notify::Pools {
                usage: usage.clone(),
                everyone: changed.clone(),
                fingerprint: node_fingerprint,
                pools_changed,
                pools: pools_store,
            },
            Some(generation.clone()),
        ),
        mirror(
            Api::all(client.clone()),
            watcher::Config::default().fields("status.phase!=Succeeded,status.phase!=Failed"),
            trim::pod,
            Notify::Fingerprint(usage.clone(), pod_fingerprint),
            Some(generation.clone()),
        ),
        mirror(
            Api::<Deployment>::all(client.clone()),
            watcher::Config::default().labels(&managed),
            trim::deployment,
            Notify::Owner(children_changed, written.clone()),
            Some(generation.clone()),
        ),
        mirror(
            Api::<Service>::all(client.clone()),
            watcher::Config::default().labels(&managed),
            trim::child,
            Notify::Nobody,
            None,
        ),
        mirror(
            Api::<PodDisruptionBudget>::all(client.clone()),
            watcher::Config::default().labels(&managed),
            trim::child,
            Notify::Nobody,
            None,
        ),
        generation,
    )
    .with_written(written);
    for (what, waited) in [
        (
            "GpuNodePools",
            stores.pools.wait_until_ready().await.is_ok(),
        ),
        ("Nodes", stores.nodes.wait_until_ready().await.is_ok()),
        ("Pods", stores.pods.wait_until_ready().await.is_ok()),
        (
            "Deployments",
            stores.deployments.wait_until_ready().await.is_ok(),
        ),
        ("Services", stores.services.wait_until_ready().await.is_ok()),
        (
            "PodDisruptionBudgets",
            stores.budgets.wait_until_ready().await.is_ok(),
        ),
    ] {
        if !waited {
            tracing::error!("the {what} cache never filled");
            return;
        }
    }
    ready.store(true, Ordering::Relaxed);
    tracing::info!("caches synced; controllers starting");

    let shared = Arc::new(Context {
        stores,
        applier: Applier::new(client.clone(), metrics.clone()),
        metrics,
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "outrigger".into(),
                instance: Some(identity),
            },
        ),
        clouds,
        clock: Arc::new(k8s_openapi::jiff::Timestamp::now),
        reclaim_backoff: scaler.backoff,
        peers: peers.clone(),
    });
    if let Some(queue) = queue {
        tokio::spawn(queue.run(shared.clone(), stop.clone()));
    }
    let md_ctx = Arc::new(model_deployment::Ctx::new(shared.clone()));
    let (routed, node_triggers) = mpsc::unbounded();
    tokio::spawn(route(pool_names, routed, md_ctx.clone()));
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    // One reconcile at a time: each plan sees the capacity the previous one took.
    // Triggers for one object within DEBOUNCE make one reconcile: a rollout's burst
    // of child status updates is planned and written once, not once per update.
    let config = controller::Config::default()
        .concurrency(1)
        .debounce(DEBOUNCE);
    let forget = md_ctx.clone();
    let deployments = Controller::new(
        Api::<DeserializeGuard<ModelDeployment>>::all(client.clone()),
        watcher::Config::default(),
    )
    .reconcile_on(owners)
    .reconcile_on(node_triggers)
    .reconcile_all_on(pokes(changed.subscribe(), POKE_SPACING))
    .reconcile_all_on(match &peers {
        Some(p) => pokes(p.changed.subscribe(), POKE_SPACING).left_stream(),
        None => futures::stream::pending().right_stream(),
    })
    .with_config(config.clone())
    .graceful_shutdown_on(stopped(stop.clone()))
    .run(
        model_deployment::reconcile,
        model_deployment::error_policy,
        md_ctx,
    )
    .for_each(move |result| {
        let forget = forget.clone();
        async move {
            // A deleted ModelDeployment is triggered once more and is no longer in
            // the store: its metric series and its cached plan go with it.
            if let Err(controller::Error::ObjectNotFound(gone)) = result {
                let key = (
                    gone.namespace.clone().unwrap_or_default(),
                    gone.name.clone(),
                );
                forget
                    .shared
                    .metrics
                    .forget_deployment(&format!("{}/{}", key.0, key.1));
                forget.plans.lock().await.forget(&key);
            }
        }
    });
    let pools = Controller::new(
        Api::<GpuNodePool>::all(client.clone()),
        watcher::Config::default(),
    )
    .reconcile_all_on(pokes(changed.subscribe(), POKE_SPACING))
    .reconcile_all_on(pokes(usage.subscribe(), POKE_SPACING))
    .with_config(config)
    .graceful_shutdown_on(stopped(stop.clone()))
    .run(pool::reconcile, pool::error_policy, shared.clone())
    .for_each(|_| futures::future::ready(()));
    let (shared_for_peers, peer_client, stop_peers) =
        (shared.clone(), client.clone(), stop.clone());
    // Pools scale independently, and one may wait minutes on an Azure operation.
    let scalers = Controller::new(Api::<GpuNodePool>::all(client), watcher::Config::default())
        .reconcile_all_on(pokes(changed.subscribe(), POKE_SPACING))
        .reconcile_all_on(pokes(usage.subscribe(), POKE_SPACING))
        .with_config(controller::Config::default().concurrency(8))
        .graceful_shutdown_on(stopped(stop))
        .run(
            scaler::reconcile,
            scaler::error_policy,
            Arc::new(scaler::Ctx::new(shared, scaler)),
        )
        .for_each(|_| futures::future::ready(()));
    let peer_clusters = async {
        let Some(peers) = peers else {
            return;
        };
        let ctx = Arc::new(peer::Ctx {
            shared: shared_for_peers,
            secret_namespace: peers.me.secret_namespace.clone(),
            peers: peers.clone(),
            client: peer_client,
        });
        let forget = ctx.clone();
        let controller = Controller::new(
            Api::<PeerCluster>::all(ctx.client.clone()),
            watcher::Config::default(),
        );
        // A PeerCluster listed at start but deleted before the controller listed
        // is never reconciled: plans must not wait for it.
        let store = controller.store();
        let expected = peers.clone();
        tokio::spawn(async move {
            if store.wait_until_ready().await.is_ok() {
                for name in expected.pending_names() {
                    if store.get(&ObjectRef::new(&name)).is_none() {
                        expected.settled(&name);
                    }
                }
            }
        });
        controller
            .reconcile_all_on(pokes(peers.changed.subscribe(), POKE_SPACING))
            .with_config(controller::Config::default().debounce(DEBOUNCE))
            .graceful_shutdown_on(stopped(stop_peers))
            .run(peer::reconcile, peer::error_policy, ctx)
            .for_each(move |result| {
                // A deleted PeerCluster: its link and metric series go.
                if let Err(controller::Error::ObjectNotFound(gone)) = result {
                    forget.peers.drop_link(&gone.name);
                    forget.peers.settled(&gone.name);
                    forget.shared.metrics.forget_peer(&gone.name);
                }
                futures::future::ready(())
            })
            .await;
    };
    tokio::join!(deployments, pools, scalers, peer_clusters);
}

/// Whether the API server serves PeerClusters. An operator upgraded before its
/// CRDs runs as a single cluster, and says how to add peers.
async fn peers_served(client: &Client) -> bool {
    let api_version = format!("{}/{}", outrigger_crds::GROUP, outrigger_crds::VERSION);
    // Only a definite answer counts: planning alone by mistake would launch the
    // peers' shares here.
    let served = loop {
        match client.list_api_group_resources(&api_version).await {
            Ok(list) => break list.resources.iter().any(|r| r.name == "peerclusters"),
            Err(kube::Error::Api(status)) if status.code == 404 => break false,
            Err(e) => {
                tracing::warn!(error = %e, "failed to ask the API server whether it serves PeerClusters; asking again");
                tokio::time::sleep(CRD_RECHECK).await;
            }
        }
    };
    if !served {
        tracing::warn!(
            "the API server does not serve {api_version} peerclusters: running as a single cluster. Apply crds/peerclusters.yaml (or upgrade the chart) to serve ModelDeployments with peers"
        );
    }
    served
}
