//! The simulator as one thing to start and stop: the EC2 proxy, the Azure
//! endpoint, the control API and (with a cluster) the node registrar, sharing one
//! state. Used by the `outrigger-sim` binary and, in process, by the tests.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

use crate::azure::cloud::AzureCloud;
use crate::ec2::LaunchLedger;
use crate::ec2::moto::MotoClient;
use crate::ec2::query::DEFAULT_REGION;
use crate::faults::{CapacityError, CapacityLimit, FaultBook};
use crate::links::{LinkError, LinkSpec, Links};
use crate::registrar::RegistrarConfig;
use crate::tls::{self, TlsError, TlsIdentity};
use crate::{azure, control, ec2, registrar};

/// How the simulator is set up.
#[derive(Clone)]
pub struct SimulatorConfig {
    /// Where moto serves, e.g. `http://127.0.0.1:18080`.
    pub moto_url: String,
    /// Addresses to serve on; port 0 picks a free one.
    pub ec2_addr: SocketAddr,
    pub azure_addr: SocketAddr,
    pub control_addr: SocketAddr,
    /// How long an Azure long-running operation takes.
    pub azure_operation_time: Duration,
    /// The Azure endpoint's server identity: it serves HTTPS, as ARM does; `None`
    /// serves plain HTTP.
    pub azure_tls: Option<TlsIdentity>,
    /// AWS regions the registrar lists from the start (others once a request uses them).
    pub aws_regions: Vec<String>,
    /// Capacity limits from the start.
    pub capacity: Vec<CapacityLimit>,
    /// The node registrar; `None` runs the clouds without a cluster.
    pub registrar: Option<RegistrarConfig>,
    /// Peer links between clusters, which the control API can cut (`hack/peers`).
    pub links: Vec<LinkSpec>,
    /// The script whose `fault down NAME` / `fault up NAME` stops and starts a
    /// whole cluster, for the control API's `/clusters/{name}/down|up`.
    pub cluster_script: Option<std::path::PathBuf>,
}

impl SimulatorConfig {
    /// Everything on free loopback ports, no registrar, 1 s operations, Azure on
    /// HTTPS with a CA made for this simulator ([`Simulator::azure_ca_pem`]).
    pub fn local(moto_url: &str) -> Result<Self, TlsError> {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Ok(SimulatorConfig {
            moto_url: moto_url.to_string(),
            ec2_addr: any,
            azure_addr: any,
            control_addr: any,
            azure_operation_time: Duration::from_secs(1),
            azure_tls: Some(TlsIdentity::generate()?),
            aws_regions: vec![DEFAULT_REGION.to_string()],
            capacity: Vec::new(),
            registrar: None,
            links: Vec::new(),
            cluster_script: None,
        })
    }
}

/// Why the simulator did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("failed to listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("failed to set a capacity limit: {0}")]
    Capacity(#[from] CapacityError),
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("the Azure endpoint's TLS identity: {0}")]
    Tls(#[from] TlsError),
}

/// How many `RunInstances` requests the launch log keeps.
const MAX_LAUNCH_LOG: usize = 1000;

/// One EC2 `RunInstances` request as the proxy saw it.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct LaunchLog {
    pub at: jiff::Timestamp,
    /// The request's `outrigger.dev/pool` tag.
    pub pool: Option<String>,
    pub instance_type: String,
    pub zone: String,
    /// The error code of an injected fault that refused it.
    pub refused: Option<String>,
}

/// The state the endpoints and the registrar share.
pub(crate) struct Shared {
    book: Mutex<FaultBook>,
    azure: Mutex<AzureCloud>,
    pub(crate) moto: MotoClient,
    /// Serialises `RunInstances` and remembers client tokens.
    pub(crate) launches: tokio::sync::Mutex<LaunchLedger>,
    aws_regions: Mutex<BTreeSet<String>>,
    pub(crate) registrar_wake: Notify,
    /// Base URL of the Azure endpoint, for operation links.
    pub(crate) azure_base: String,
    pub(crate) links: Links,
    pub(crate) cluster_script: Option<std::path::PathBuf>,
    /// The last `RunInstances` requests, oldest first (`GET /launches`).
    launches_log: Mutex<std::collections::VecDeque<LaunchLog>>,
    /// The interruption queue in moto.
    pub(crate) queue: crate::interrupt::Queue,
    /// The clusters the registrar serves, for Node conditions (Azure interruptions).
    pub(crate) clusters: Vec<kube::Client>,
}

impl Shared {
    // A panic while a lock is held leaves plain data behind; carry on with it.
    pub(crate) fn book(&self) -> MutexGuard<'_, FaultBook> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The Azure state. Lock order: this before [`Shared::book`].
    pub(crate) fn azure(&self) -> MutexGuard<'_, AzureCloud> {
        self.azure.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn note_aws_region(&self, region: &str) {
        let mut regions = self.aws_regions.lock().unwrap_or_else(|e| e.into_inner());
        if !regions.contains(region) {
            regions.insert(region.to_string());
        }
    }

    pub(crate) fn aws_regions(&self) -> Vec<String> {
        let regions = self.aws_regions.lock().unwrap_or_else(|e| e.into_inner());
        regions.iter().cloned().collect()
    }

    pub(crate) fn log_launch(&self, entry: LaunchLog) {
        let mut log = self.launches_log.lock().unwrap_or_else(|e| e.into_inner());
        if log.len() >= MAX_LAUNCH_LOG {
            log.pop_front();
        }
        log.push_back(entry);
    }

    pub(crate) fn launch_log(&self) -> Vec<LaunchLog> {
        let log = self.launches_log.lock().unwrap_or_else(|e| e.into_inner());
        log.iter().cloned().collect()
    }

    pub(crate) fn wake_registrar(&self) {
        self.registrar_wake.notify_one();
    }
}

/// A running simulator.
pub struct Simulator {
    ec2_url: String,
    azure_url: String,
    azure_ca_pem: Option<Vec<u8>>,
    control_url: String,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
    link_tasks: JoinSet<()>,
}

impl Simulator {
    /// Binds the three endpoints and starts serving (and the registrar, if configured).
    pub async fn start(config: SimulatorConfig) -> Result<Self, StartError> {
        let ec2 = bind(config.ec2_addr).await?;
        let azure_listener = bind(config.azure_addr).await?;
        let control_listener = bind(config.control_addr).await?;
        let url = |l: &TcpListener, scheme: &str| {
            l.local_addr()
                .map(|a| format!("{scheme}://{a}"))
                .unwrap_or_default()
        };
        let acceptor = config
            .azure_tls
            .as_ref()
            .map(TlsIdentity::acceptor)
            .transpose()?;
        let azure_scheme = if acceptor.is_some() { "https" } else { "http" };
        let (ec2_url, azure_url, control_url) = (
            url(&ec2, "http"),
            url(&azure_listener, azure_scheme),
            url(&control_listener, "http"),
        );

        let mut book = FaultBook::default();
        for limit in config.capacity {
            book.set_capacity(limit)?;
        }
        // The links serve until the simulator stops; they have no graceful end.
        let mut link_tasks = JoinSet::new();
        let links = Links::start(config.links, &mut link_tasks).await?;
        let shared = Arc::new(Shared {
            book: Mutex::new(book),
            azure: Mutex::new(AzureCloud::new(config.azure_operation_time)),
            moto: MotoClient::new(&config.moto_url),
            launches: tokio::sync::Mutex::new(HashMap::new()),
            aws_regions: Mutex::new(config.aws_regions.into_iter().collect()),
            registrar_wake: Notify::new(),
            azure_base: azure_url.clone(),
            links,
            cluster_script: config.cluster_script,
            launches_log: Mutex::default(),
            queue: crate::interrupt::Queue::new(&config.moto_url),
            clusters: config
                .registrar
                .iter()
                .flat_map(|r| r.clusters.iter().map(|c| c.client.clone()))
                .collect(),
        });

        let (shutdown, stop) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let azure_router = azure::router(shared.clone());
        let mut plain = vec![
            (ec2, ec2::router(shared.clone()), "ec2"),
            (control_listener, control::router(shared.clone()), "control"),
        ];
        match acceptor {
            Some(acceptor) => {
                tasks.spawn(tls::serve(
                    azure_listener,
                    azure_router,
                    acceptor,
                    stop.clone(),
                ));
            }
            None => plain.push((azure_listener, azure_router, "azure")),
        }
        for (listener, router, name) in plain {
            let mut stop = stop.clone();
            tasks.spawn(async move {
                let served = axum::serve(listener, router)
                    .with_graceful_shutdown(async move {
                        let _ = stop.wait_for(|s| *s).await;
                    })
                    .await;
                if let Err(e) = served {
                    tracing::error!("{name} endpoint failed: {e}");
                }
            });
        }
        if let Some(registrar) = config.registrar {
            tasks.spawn(registrar::run(shared.clone(), registrar, stop));
        }
        tracing::info!(%ec2_url, %azure_url, %control_url, moto = %config.moto_url, "simulator: serving");
        Ok(Simulator {
            ec2_url,
            azure_url,
            azure_ca_pem: config.azure_tls.and_then(|t| t.ca_pem),
            control_url,
            shutdown,
            tasks,
            link_tasks,
        })
    }

    /// The EC2 endpoint (what `AWS_ENDPOINT_URL` points at).
    pub fn ec2_url(&self) -> &str {
        &self.ec2_url
    }

    /// The Azure Resource Manager endpoint.
    pub fn azure_url(&self) -> &str {
        &self.azure_url
    }

    /// The CA that signed the Azure endpoint's certificate, when the simulator made it.
    pub fn azure_ca_pem(&self) -> Option<&[u8]> {
        self.azure_ca_pem.as_deref()
    }

    /// The control API.
    pub fn control_url(&self) -> &str {
        &self.control_url
    }

    /// Stops serving and waits for the endpoints and the registrar to finish.
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        while self.tasks.join_next().await.is_some() {}
        self.link_tasks.shutdown().await;
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Listen { addr, source })
}
