//! `outrigger-sim`: the simulated clouds of the local cluster.
//!
//!   outrigger-sim serve ...   EC2 proxy (in front of moto), Azure endpoint,
//!                             control API and node registrar
//!   outrigger-sim fault ...   inject and clear faults, outages and capacity
//!                             limits of a running simulator (`hack/cluster fault`)
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use kube::config::{KubeConfigOptions, Kubeconfig};
use outrigger_crds::Provider;
use outrigger_tests::faults::CapacityLimit;
use outrigger_tests::registrar::{ClusterTarget, RegistrarConfig};
use outrigger_tests::tls::TlsIdentity;
use outrigger_tests::{Simulator, SimulatorConfig};
use serde_json::{Map, Value, json};

#[derive(Parser)]
#[command(
    name = "outrigger-sim",
    version,
    about = "Simulated AWS and Azure for Outrigger's local cluster"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the EC2 proxy, the Azure endpoint, the control API and the node registrar.
    Serve(Box<ServeArgs>),
    /// Change what is broken in a running simulator.
    Fault(Box<FaultArgs>),
    /// Make, in the running simulators, the EC2 launch templates and Azure scale
    /// sets that the GpuNodePools in FILEs name (what exists is left alone). The
    /// endpoints come from AWS_ENDPOINT_URL_EC2 and OUTRIGGER_SIM_URL (hack/cluster env).
    Clouds(CloudsArgs),
}

#[derive(Args)]
struct CloudsArgs {
    /// Manifests holding GpuNodePools (other kinds are skipped).
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// The cluster whose Nodes the scale sets' VMs become (`outrigger.dev/cluster`).
    #[arg(long)]
    cluster: Option<String>,
}

#[derive(Args)]
struct ServeArgs {
    /// The moto server the EC2 proxy forwards to.
    #[arg(
        long,
        env = "OUTRIGGER_SIM_MOTO_URL",
        default_value = "http://127.0.0.1:18080"
    )]
    moto_url: String,
    /// Where the EC2 endpoint listens (AWS_ENDPOINT_URL).
    #[arg(long, default_value = "127.0.0.1:18081")]
    ec2_listen: SocketAddr,
    /// Where the Azure Resource Manager endpoint listens.
    #[arg(long, default_value = "127.0.0.1:18082")]
    azure_listen: SocketAddr,
    /// The Azure endpoint's certificate (PEM, chain first), for HTTPS as ARM
    /// serves; hack/cluster issues it from the local cluster's CA. Without it and
    /// --azure-tls-key the endpoint speaks plain HTTP, which Azure SDKs refuse to send
    /// a bearer token over.
    #[arg(long, requires = "azure_tls_key")]
    azure_tls_cert: Option<PathBuf>,
    /// The key of --azure-tls-cert (PEM).
    #[arg(long, requires = "azure_tls_cert")]
    azure_tls_key: Option<PathBuf>,
    /// Where the control API listens (OUTRIGGER_SIM_URL).
    #[arg(long, default_value = "127.0.0.1:18083")]
    control_listen: SocketAddr,
    /// Kubeconfig of the cluster the node registrar registers Nodes in
    /// (default: KUBECONFIG, then ~/.kube/config, unless --cluster is given).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// A named cluster, NAME=KUBECONFIG: machines tagged `outrigger.dev/cluster=NAME`
    /// become its Nodes. Repeatable (hack/peers); with --kubeconfig too, that one
    /// takes the machines no named cluster claims.
    #[arg(long = "cluster", value_parser = parse_cluster)]
    clusters: Vec<(String, PathBuf)>,
    /// A peer link, FROM:TO=LISTEN=TARGET: FROM's operator reaches TO's API server
    /// (TARGET) at LISTEN, and `fault partition` can cut it. Repeatable.
    #[arg(long = "link")]
    links: Vec<outrigger_tests::links::LinkSpec>,
    /// A name for this simulator in its log; hack/cluster passes its run folder, by
    /// which it knows the process as its own.
    #[arg(long)]
    instance: Option<String>,
    /// The script that stops and starts whole clusters (`SCRIPT fault down|up NAME`),
    /// for the control API's /clusters/{name}/down and /up.
    #[arg(long)]
    cluster_script: Option<PathBuf>,
    /// Run the clouds only, without registering Nodes.
    #[arg(long)]
    no_registrar: bool,
    /// Seconds from a machine running to its Node appearing.
    #[arg(long, env = "OUTRIGGER_SIM_BOOT_DELAY", default_value_t = 2.0)]
    boot_delay: f64,
    /// Seconds an Azure long-running operation takes.
    #[arg(
        long,
        env = "OUTRIGGER_SIM_AZURE_OPERATION_SECONDS",
        default_value_t = 1.0
    )]
    azure_operation_seconds: f64,
    /// AWS regions the registrar lists from the start (others once a request uses them).
    #[arg(long = "aws-region", default_value = "us-east-1")]
    aws_regions: Vec<String>,
    /// A capacity limit, PROVIDER/INSTANCE_TYPE/REGION[/ZONE]=LIMIT, e.g.
    /// aws/p5.48xlarge/us-east-1/us-east-1a=4 or azure/Standard_ND96isr_H100_v5/eastus/1=2.
    /// Repeatable; OUTRIGGER_SIM_CAPACITY takes a comma-separated list.
    #[arg(long = "capacity", env = "OUTRIGGER_SIM_CAPACITY", value_delimiter = ',', value_parser = parse_capacity)]
    capacity: Vec<CapacityLimit>,
}

#[derive(Args)]
struct FaultArgs {
    /// The simulator's control API.
    #[arg(
        long,
        env = "OUTRIGGER_SIM_URL",
        default_value = "http://127.0.0.1:18083"
    )]
    url: String,
    #[command(subcommand)]
    action: FaultAction,
}

#[derive(Subcommand)]
enum FaultAction {
    /// Show faults, outages, capacity limits and the Azure scale sets.
    List,
    /// Inject a fault: InsufficientInstanceCapacity, VcpuLimitExceeded,
    /// RequestLimitExceeded, InternalError (aws); SkuNotAvailable,
    /// ZonalAllocationFailed, OperationNotAllowed, TooManyRequests, OperationFailed,
    /// OperationStalled (azure); Latency (either, with --provider and --millis);
    /// NeverRegisters (--provider, --instance-type, --zone) and NodeNotReady
    /// (--provider, --node).
    Inject(Inject),
    /// Clear faults by id, or every fault (of --provider).
    Clear {
        ids: Vec<String>,
        #[arg(long, value_parser = parse_provider)]
        provider: Option<Provider>,
    },
    /// Start an outage: the provider's (region's) Nodes turn NotReady.
    Outage {
        #[arg(value_parser = parse_provider)]
        provider: Provider,
        #[arg(long)]
        region: Option<String>,
        /// The provider's API answers 503 as well.
        #[arg(long)]
        api: bool,
    },
    /// End outages (of one provider, of one region); their Nodes turn Ready again.
    Recover {
        #[arg(value_parser = parse_provider)]
        provider: Option<Provider>,
        #[arg(long)]
        region: Option<String>,
    },
    /// Show the peer links between clusters and their modes.
    Links,
    /// Cut the peer links between clusters A and B, both directions.
    Partition {
        a: String,
        b: String,
        /// refuse: connections are refused and reset; blackhole: accepted, never
        /// answered; stall: open ones held unanswered, new ones forwarded.
        #[arg(long, default_value = "refuse", value_parser = ["refuse", "blackhole", "stall"])]
        mode: String,
    },
    /// Open the peer links again: between A and B, of A, or all.
    Heal {
        a: Option<String>,
        b: Option<String>,
    },
    /// Stop a whole cluster's control plane, keeping its data.
    Down { cluster: String },
    /// Start a stopped cluster again.
    Up { cluster: String },
    /// Interrupt a machine: on aws a spot warning, rebalance recommendation or
    /// scheduled change goes to the interruption queue (the instance is terminated
    /// at the deadline, but for rebalance); on azure a Preempt scheduled event is
    /// set on the Node and its VM deleted at the deadline.
    Interrupt {
        #[arg(value_parser = parse_provider)]
        provider: Provider,
        /// spot, rebalance, scheduled (aws) or preempt (azure).
        #[arg(long, value_parser = ["spot", "rebalance", "scheduled", "preempt"])]
        kind: String,
        /// The EC2 instance id (aws).
        #[arg(long)]
        instance_id: Option<String>,
        /// The Node (either provider).
        #[arg(long)]
        node: Option<String>,
        /// Seconds from the notice to the machine's end.
        #[arg(long, default_value_t = 120)]
        notice_seconds: u64,
    },
    /// Set a capacity limit: LIMIT instances at most, or `unlimited`.
    Capacity {
        #[arg(value_parser = parse_provider)]
        provider: Provider,
        instance_type: String,
        limit: String,
        #[arg(long)]
        region: Option<String>,
        /// AWS: us-east-1a; Azure: 1, 2 or 3.
        #[arg(long)]
        zone: Option<String>,
    },
}

#[derive(Args)]
struct Inject {
    fault: String,
    #[arg(long)]
    instance_type: Option<String>,
    #[arg(long)]
    region: Option<String>,
    #[arg(long)]
    zone: Option<String>,
    /// EC2 action the fault applies to (RequestLimitExceeded, InternalError).
    #[arg(long)]
    action: Option<String>,
    /// Hit only the next N matching requests.
    #[arg(long)]
    times: Option<u32>,
    /// TooManyRequests: seconds in Retry-After.
    #[arg(long)]
    retry_after: Option<u64>,
    /// OperationFailed: the error code of the failed operation.
    #[arg(long)]
    code: Option<String>,
    #[arg(long)]
    message: Option<String>,
    /// OperationFailed, OperationStalled: only the operations of this scale set.
    #[arg(long)]
    scale_set: Option<String>,
    /// Latency: which provider.
    #[arg(long, value_parser = parse_provider)]
    provider: Option<Provider>,
    /// Latency: milliseconds added.
    #[arg(long)]
    millis: Option<u64>,
    /// NodeNotReady: the Node held NotReady.
    #[arg(long)]
    node: Option<String>,
}

fn parse_provider(name: &str) -> Result<Provider, String> {
    Provider::ALL
        .into_iter()
        .find(|p| p.as_str() == name)
        .ok_or_else(|| format!("{name:?} is not a provider: aws or azure"))
}

fn parse_cluster(spec: &str) -> Result<(String, PathBuf), String> {
    match spec.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => {
            Ok((name.to_string(), PathBuf::from(path)))
        }
        _ => Err(format!("{spec:?}: expected NAME=KUBECONFIG")),
    }
}

fn parse_capacity(spec: &str) -> Result<CapacityLimit, String> {
    let usage = "expected PROVIDER/INSTANCE_TYPE/REGION[/ZONE]=LIMIT";
    let (scope, limit) = spec.split_once('=').ok_or(usage)?;
    let limit: u32 = limit
        .trim()
        .parse()
        .map_err(|_| format!("{usage}: {limit:?} is not a number"))?;
    let parts: Vec<&str> = scope.split('/').collect();
    let provider = parse_provider(parts[0]).map_err(|e| format!("{usage}: {e}"))?;
    let (instance_type, region, zone) = match parts[1..] {
        [t, r] => (t, r, None),
        [t, r, z] => (t, r, Some(z.to_string())),
        _ => return Err(usage.to_string()),
    };
    Ok(CapacityLimit {
        provider,
        instance_type: instance_type.to_string(),
        region: Some(region.to_string()),
        zone,
        limit: Some(limit),
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(*args).await,
        Command::Fault(args) => fault(*args).await,
        Command::Clouds(args) => clouds(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("outrigger-sim: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    tracing_subscriber::fmt()
        // hack/cluster sends the log to a file: colour only on a terminal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let seconds =
        |s: f64, what: &str| Duration::try_from_secs_f64(s).map_err(|e| format!("{what} {s}: {e}"));
    if let Some(instance) = &args.instance {
        tracing::info!(%instance, "outrigger-sim: starting");
    }
    let registrar = if args.no_registrar {
        None
    } else {
        let mut clusters = Vec::new();
        if args.kubeconfig.is_some() || args.clusters.is_empty() {
            clusters.push(ClusterTarget {
                name: None,
                client: kube_client(args.kubeconfig.as_deref()).await?,
            });
        }
        for (name, path) in &args.clusters {
            clusters.push(ClusterTarget {
                name: Some(name.clone()),
                client: kube_client(Some(path)).await?,
            });
        }
        Some(RegistrarConfig {
            clusters,
            boot_delay: seconds(args.boot_delay, "--boot-delay")?,
        })
    };
    let azure_tls = match (&args.azure_tls_cert, &args.azure_tls_key) {
        (Some(cert), Some(key)) => Some(
            TlsIdentity::from_files(&cert.to_string_lossy(), &key.to_string_lossy())
                .map_err(|e| format!("--azure-tls-cert/--azure-tls-key: {e}"))?,
        ),
        _ => {
            tracing::warn!(
                "azure: serving plain HTTP (no --azure-tls-cert); Azure SDKs refuse bearer tokens over it"
            );
            None
        }
    };
    let config = SimulatorConfig {
        moto_url: args.moto_url,
        ec2_addr: args.ec2_listen,
        azure_addr: args.azure_listen,
        control_addr: args.control_listen,
        azure_operation_time: seconds(args.azure_operation_seconds, "--azure-operation-seconds")?,
        azure_tls,
        aws_regions: args.aws_regions,
        capacity: args.capacity,
        registrar,
        links: args.links,
        cluster_script: args.cluster_script,
    };
    let sim = Simulator::start(config).await.map_err(|e| e.to_string())?;
    wait_for_signal().await;
    tracing::info!("stopping");
    sim.stop().await;
    Ok(())
}

async fn kube_client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, String> {
    let failed = |e: &dyn std::fmt::Display| {
        format!(
            "failed to connect the node registrar to a cluster ({e}); pass --kubeconfig, or --no-registrar to run without one"
        )
    };
    match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path).map_err(|e| failed(&e))?;
            let config = kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(|e| failed(&e))?;
            kube::Client::try_from(config).map_err(|e| failed(&e))
        }
        None => kube::Client::try_default().await.map_err(|e| failed(&e)),
    }
}

async fn clouds(args: CloudsArgs) -> Result<(), String> {
    let mut pools = Vec::new();
    for file in &args.files {
        pools.extend(outrigger_tests::clouds::pools_in(file).map_err(|e| e.to_string())?);
    }
    let fixtures = outrigger_tests::clouds::needs(&pools, args.cluster.as_deref());
    let sims = outrigger_tests::e2e::SimClouds::from_env();
    for line in outrigger_tests::clouds::create(&sims, &fixtures)
        .await
        .map_err(|e| format!("{e} (are the simulators up? hack/cluster status)"))?
    {
        println!("{line}");
    }
    Ok(())
}

async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot watch SIGTERM ({e}); stop with Ctrl-C");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn fault(args: FaultArgs) -> Result<(), String> {
    let base = args.url.trim_end_matches('/');
    let http = reqwest::Client::new();
    let request = match args.action {
        FaultAction::List => http.get(format!("{base}/state")),
        FaultAction::Inject(inject) => http
            .post(format!("{base}/faults"))
            .json(&inject_body(inject)),
        FaultAction::Clear { ids, provider } if ids.is_empty() => {
            let query: Vec<(&str, String)> = provider
                .map(|p| ("provider", p.to_string()))
                .into_iter()
                .collect();
            http.delete(format!("{base}/faults")).query(&query)
        }
        FaultAction::Clear { ids, .. } => {
            for id in &ids[..ids.len() - 1] {
                send(http.delete(format!("{base}/faults/{id}"))).await?;
            }
            http.delete(format!("{base}/faults/{}", ids[ids.len() - 1]))
        }
        FaultAction::Outage {
            provider,
            region,
            api,
        } => http
            .post(format!("{base}/outage"))
            .json(&json!({"provider": provider, "region": region, "api": api})),
        FaultAction::Recover { provider, region } => {
            let mut query: Vec<(&str, String)> = Vec::new();
            query.extend(provider.map(|p| ("provider", p.to_string())));
            query.extend(region.map(|r| ("region", r)));
            http.delete(format!("{base}/outage")).query(&query)
        }
        FaultAction::Links => http.get(format!("{base}/links")),
        FaultAction::Partition { a, b, mode } => http
            .post(format!("{base}/links/partition"))
            .json(&json!({"a": a, "b": b, "mode": mode})),
        FaultAction::Heal { a, b } => http
            .post(format!("{base}/links/heal"))
            .json(&json!({"a": a, "b": b})),
        FaultAction::Down { cluster } => http.post(format!("{base}/clusters/{cluster}/down")),
        FaultAction::Up { cluster } => http.post(format!("{base}/clusters/{cluster}/up")),
        FaultAction::Interrupt {
            provider,
            kind,
            instance_id,
            node,
            notice_seconds,
        } => http.post(format!("{base}/interrupt")).json(&json!({
            "provider": provider, "kind": kind, "instanceId": instance_id,
            "node": node, "noticeSeconds": notice_seconds,
        })),
        FaultAction::Capacity {
            provider,
            instance_type,
            limit,
            region,
            zone,
        } => {
            let limit: Option<u32> = match limit.as_str() {
                "unlimited" | "none" => None,
                n => Some(
                    n.parse()
                        .map_err(|_| format!("limit {n:?} is not a number or `unlimited`"))?,
                ),
            };
            http.put(format!("{base}/capacity")).json(&json!({
                "provider": provider, "instanceType": instance_type,
                "region": region, "zone": zone, "limit": limit,
            }))
        }
    };
    send(request).await
}

/// The JSON of `POST /faults`: the fault's name and the flags given, camelCase.
fn inject_body(inject: Inject) -> Value {
    let mut body = Map::new();
    body.insert("fault".into(), json!(inject.fault));
    let fields: [(&str, Option<Value>); 12] = [
        ("instanceType", inject.instance_type.map(Value::from)),
        ("region", inject.region.map(Value::from)),
        ("zone", inject.zone.map(Value::from)),
        ("action", inject.action.map(Value::from)),
        ("times", inject.times.map(Value::from)),
        ("retryAfterSeconds", inject.retry_after.map(Value::from)),
        ("code", inject.code.map(Value::from)),
        ("message", inject.message.map(Value::from)),
        ("scaleSet", inject.scale_set.map(Value::from)),
        ("provider", inject.provider.map(|p| Value::from(p.as_str()))),
        ("millis", inject.millis.map(Value::from)),
        ("node", inject.node.map(Value::from)),
    ];
    for (name, value) in fields {
        if let Some(v) = value {
            body.insert(name.into(), v);
        }
    }
    Value::Object(body)
}

async fn send(request: reqwest::RequestBuilder) -> Result<(), String> {
    let response = request
        .send()
        .await
        .map_err(|e| format!("failed to reach the simulator's control API ({e}); is the cluster up (hack/cluster status)?"))?;
    let status = response.status();
    let text = response.text().await.map_err(|e| e.to_string())?;
    let shown = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or(text);
    if status.is_success() {
        println!("{shown}");
        Ok(())
    } else {
        Err(format!("{status}: {shown}"))
    }
}
