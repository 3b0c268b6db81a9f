//! What the end-to-end tests share: the local cluster (from `hack/cluster up`), a
//! fresh namespace per test, GPU pools with kwok nodes, the operator as a child
//! process, and waiting on conditions with deadlines.
//!
//! The tests are `#[ignore]`d in a plain `cargo test`; `hack/e2e` (in `make test`)
//! starts the cluster and runs them with `-- --ignored` and `OUTRIGGER_E2E=1`.
//! Without `OUTRIGGER_E2E=1` they say so and pass.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Node};
use kube::Client;
use kube::api::{Api, DeleteParams, PostParams};
use outrigger_crds::GpuNodePool;
use serde_json::json;

use crate::harness::Control;
pub use crate::harness::{e2e_requested as enabled, eventually as wait_for};

/// Tests that share the cluster-wide operator take turns.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    TURN.lock().await
}

pub async fn client() -> Client {
    Client::try_default()
        .await
        .expect("a kubeconfig for the local cluster (eval \"$(hack/cluster env)\")")
}

/// The simulators `hack/cluster up` started, at the endpoints `hack/cluster env`
/// exports. Tests use these rather than starting their own: the cluster's node
/// registrar removes Nodes of machines its simulators do not know.
#[derive(Clone, Debug)]
pub struct SimClouds {
    pub ec2_url: String,
    /// The Azure endpoint: HTTPS, with a certificate from the cluster's CA.
    pub azure_url: String,
    /// That CA (`OUTRIGGER_AZURE_CA_FILE`): what `--azure-ca-file` names.
    pub azure_ca_file: String,
    pub control_url: String,
    pub control: Control,
}

impl SimClouds {
    pub fn from_env() -> SimClouds {
        let var =
            |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.into());
        let control_url = var("OUTRIGGER_SIM_URL", "http://127.0.0.1:18083");
        SimClouds {
            ec2_url: var("AWS_ENDPOINT_URL_EC2", "http://127.0.0.1:18081"),
            azure_url: var("AZURE_ENDPOINT_URL", "https://127.0.0.1:18082"),
            azure_ca_file: var(
                "OUTRIGGER_AZURE_CA_FILE",
                &format!(
                    "{}/.cache/outrigger/cluster/pki/ca.crt",
                    var("HOME", "/root")
                ),
            ),
            control: Control::new(&control_url),
            control_url,
        }
    }

    /// The CA of the Azure endpoint, for the real SDK's transport.
    pub fn azure_ca(&self) -> Vec<u8> {
        std::fs::read(&self.azure_ca_file)
            .unwrap_or_else(|e| panic!("the Azure CA {}: {e}", self.azure_ca_file))
    }

    /// The real EC2 client against the simulator, in `region`, with the SDK's own
    /// retries off so every simulated fault reaches the caller as the cloud gave it.
    pub async fn ec2(&self, region: &str) -> aws_sdk_ec2::Client {
        let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(region.to_string()))
            .credentials_provider(aws_sdk_ec2::config::Credentials::new(
                "outrigger-local",
                "outrigger-local",
                None,
                None,
                "e2e",
            ))
            .endpoint_url(&self.ec2_url)
            .retry_config(aws_config::retry::RetryConfig::disabled())
            .load()
            .await;
        aws_sdk_ec2::Client::new(&config)
    }
}

/// Clean-up after a test: terminates the EC2 instances tagged `outrigger.dev/pool=pool`.
/// Failures are ignored; a test's clean-up must not hide its own outcome.
pub async fn terminate_pool_instances(ec2: &aws_sdk_ec2::Client, pool: &str) {
    let Ok(found) = ec2
        .describe_instances()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name(format!("tag:{}", outrigger_crds::POOL_LABEL))
                .values(pool)
                .build(),
        )
        .send()
        .await
    else {
        return;
    };
    let ids: Vec<String> = found
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter_map(|i| i.instance_id().map(String::from))
        .collect();
    if !ids.is_empty() {
        let _ = ec2
            .terminate_instances()
            .set_instance_ids(Some(ids))
            .send()
            .await;
    }
}

/// Live (pending or running) EC2 instances tagged `outrigger.dev/pool=pool`, sorted;
/// `None` when EC2 cannot be listed.
pub async fn live_instances(ec2: &aws_sdk_ec2::Client, pool: &str) -> Option<Vec<String>> {
    use aws_sdk_ec2::types::Filter;
    let out = ec2
        .describe_instances()
        .filters(
            Filter::builder()
                .name("tag:outrigger.dev/pool")
                .values(pool)
                .build(),
        )
        .filters(
            Filter::builder()
                .name("instance-state-name")
                .values("pending")
                .values("running")
                .build(),
        )
        .send()
        .await
        .ok()?;
    let mut ids: Vec<String> = out
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter_map(|i| i.instance_id().map(str::to_string))
        .collect();
    ids.sort();
    Some(ids)
}

/// A short random suffix for names, so tests never collide.
pub fn suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{:05x}", (nanos ^ std::process::id()) & 0xfffff)
}

/// A namespace of its own for one test; `delete` removes it.
pub struct TestNamespace {
    pub name: String,
    client: Client,
}

impl TestNamespace {
    pub async fn new(client: &Client, prefix: &str) -> TestNamespace {
        let name = format!("e2e-{prefix}-{}", suffix());
        let api: Api<Namespace> = Api::all(client.clone());
        let ns: Namespace =
            serde_json::from_value(json!({"metadata": {"name": name}})).expect("namespace");
        api.create(&PostParams::default(), &ns)
            .await
            .expect("namespace created");
        TestNamespace {
            name,
            client: client.clone(),
        }
    }

    /// Deletes the namespace and waits until it is gone, so nothing of this test
    /// is left for the next one's operator to act on.
    pub async fn delete(mut self) {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let _ = api.delete(&self.name, &DeleteParams::background()).await;
        wait_for(
            &format!("namespace {} gone", self.name),
            Duration::from_secs(120),
            || async { matches!(api.get_opt(&self.name).await, Ok(None)).then_some(()) },
        )
        .await;
        self.name.clear();
    }
}

impl Drop for TestNamespace {
    /// On a failed test: delete without waiting, so later tests see none of it.
    fn drop(&mut self) {
        if !self.name.is_empty() {
            let _ = std::process::Command::new("kubectl")
                .args([
                    "delete",
                    "namespace",
                    &self.name,
                    "--wait=false",
                    "--ignore-not-found",
                ])
                .output();
        }
    }
}

/// GpuNodePools without scaling, each with its own kwok nodes, removed by `delete`.
pub struct Fleet {
    client: Client,
    pub pools: Vec<String>,
    pub nodes: Vec<(String, String)>,
    regions: Vec<String>,
}

/// One pool to create: its nodes already exist (no `scaling`).
pub struct PoolSpec<'a> {
    pub name: &'a str,
    pub provider: &'a str,
    pub region: &'a str,
    pub zone: &'a str,
    pub nodes: u32,
    pub gpus_per_node: u32,
    pub price: f64,
}

impl Fleet {
    pub async fn new(client: &Client, pools: &[PoolSpec<'_>]) -> Fleet {
        let mut fleet = Fleet {
            client: client.clone(),
            pools: Vec::new(),
            nodes: Vec::new(),
            regions: Vec::new(),
        };
        let pool_api: Api<GpuNodePool> = Api::all(client.clone());
        let node_api: Api<Node> = Api::all(client.clone());
        for spec in pools {
            let pool: GpuNodePool = serde_json::from_value(json!({
                "apiVersion": "outrigger.dev/v1alpha1",
                "kind": "GpuNodePool",
                "metadata": {"name": spec.name},
                "spec": {
                    "provider": spec.provider, "region": spec.region, "zone": spec.zone,
                    "instanceType": "test", "gpu": {"type": "H100", "count": spec.gpus_per_node},
                    "pricePerNodeHour": spec.price, "nodes": {"min": 0, "max": spec.nodes}
                }
            }))
            .expect("pool");
            pool_api
                .create(&PostParams::default(), &pool)
                .await
                .expect("pool created");
            fleet.pools.push(spec.name.to_string());
            fleet.regions.push(spec.region.to_string());
            for i in 0..spec.nodes {
                let name = format!("{}-{i}", spec.name);
                let node: Node = serde_json::from_value(json!({
                    "metadata": {
                        "name": name,
                        "annotations": {"kwok.x-k8s.io/node": "fake"},
                        "labels": {
                            "type": "kwok",
                            "outrigger.dev/pool": spec.name,
                            "topology.kubernetes.io/region": spec.region,
                            "topology.kubernetes.io/zone": spec.zone,
                        }
                    },
                    "spec": {"providerID": format!("{}:///{}/{name}", spec.provider, spec.zone)},
                    "status": {
                        "allocatable": {"cpu": "96", "memory": "1Ti", "pods": "110", "nvidia.com/gpu": spec.gpus_per_node.to_string()},
                        "capacity": {"cpu": "96", "memory": "1Ti", "pods": "110", "nvidia.com/gpu": spec.gpus_per_node.to_string()}
                    }
                }))
                .expect("node");
                node_api
                    .create(&PostParams::default(), &node)
                    .await
                    .expect("node created");
                fleet.nodes.push((spec.name.to_string(), name));
            }
        }
        for (_, name) in &fleet.nodes {
            let api = node_api.clone();
            wait_for(
                &format!("node {name} Ready"),
                Duration::from_secs(30),
                || {
                    let api = api.clone();
                    let name = name.clone();
                    async move { api.get(&name).await.ok().filter(node_ready).map(|_| ()) }
                },
            )
            .await;
        }
        fleet
    }

    fn nodes_of(&self, pool: &str) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|(p, _)| p == pool)
            .map(|(_, n)| n.clone())
            .collect()
    }

    /// Every node of `pool` goes NotReady, as in a provider outage: kwok stops
    /// managing it and its Ready condition turns False.
    pub async fn outage(&self, pool: &str) {
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        self.not_ready(
            pool,
            json!({"type": "Ready", "status": "False", "reason": "Outage",
                "message": "simulated outage", "lastTransitionTime": now, "lastHeartbeatTime": now}),
        )
        .await;
    }

    /// As [`Fleet::outage`], but the Ready condition carries no times, as some node
    /// agents write it.
    pub async fn outage_without_times(&self, pool: &str) {
        self.not_ready(
            pool,
            json!({"type": "Ready", "status": "False", "reason": "Outage",
                "message": "simulated outage, reported without times"}),
        )
        .await;
    }

    async fn not_ready(&self, pool: &str, condition: serde_json::Value) {
        let api: Api<Node> = Api::all(self.client.clone());
        for name in self.nodes_of(pool) {
            api.patch(
                &name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(json!({
                    "metadata": {"annotations": {"kwok.x-k8s.io/node": null}}
                })),
            )
            .await
            .expect("node released by kwok");
            api.patch_status(
                &name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(json!({"status": {"conditions": [condition]}})),
            )
            .await
            .expect("node NotReady");
        }
    }

    /// The nodes of `pool` come back: kwok manages them again and marks them Ready.
    pub async fn recover(&self, pool: &str) {
        let api: Api<Node> = Api::all(self.client.clone());
        for name in self.nodes_of(pool) {
            api.patch(
                &name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(json!({
                    "metadata": {"annotations": {"kwok.x-k8s.io/node": "fake"}}
                })),
            )
            .await
            .expect("node managed by kwok again");
        }
    }

    pub async fn delete(mut self) {
        let node_api: Api<Node> = Api::all(self.client.clone());
        for (_, name) in &self.nodes {
            let _ = node_api.delete(name, &DeleteParams::background()).await;
        }
        let pool_api: Api<GpuNodePool> = Api::all(self.client.clone());
        for name in &self.pools {
            let _ = pool_api.delete(name, &DeleteParams::background()).await;
        }
        self.pools.clear();
        self.nodes.clear();
    }

    /// The regions of this fleet's pools: a ModelDeployment limited to them sees no
    /// other test's pools.
    pub fn regions(&self) -> Vec<String> {
        let mut regions: Vec<String> = self.regions.clone();
        regions.dedup();
        regions
    }
}

impl Drop for Fleet {
    /// On a failed test: remove its pools and nodes anyway.
    fn drop(&mut self) {
        for name in &self.pools {
            let _ = std::process::Command::new("kubectl")
                .args([
                    "delete",
                    "gpunodepool",
                    name,
                    "--wait=false",
                    "--ignore-not-found",
                ])
                .output();
        }
        for (_, name) in &self.nodes {
            let _ = std::process::Command::new("kubectl")
                .args(["delete", "node", name, "--wait=false", "--ignore-not-found"])
                .output();
        }
    }
}

pub fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The operator binary: `OUTRIGGER_BIN`, else the workspace's debug build.
fn operator_binary() -> PathBuf {
    if let Ok(bin) = std::env::var("OUTRIGGER_BIN") {
        return PathBuf::from(bin);
    }
    let target = std::env::var("CARGO_TARGET_DIR").map_or_else(
        |_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    target.join("debug/outrigger")
}

/// `outrigger run` as a child process with its own metrics port and log file.
pub struct Operator {
    child: tokio::process::Child,
    pub identity: String,
    pub metrics_url: String,
    pub log: PathBuf,
    /// Where the audit log ended when it started (for the ServiceAccount check).
    audit_from: u64,
}

impl Operator {
    /// Starts an operator and waits until it serves.
    pub async fn start(identity: &str, extra: &[&str]) -> Operator {
        Operator::start_with(identity, &[], extra).await
    }

    /// [`Operator::start`], with these environment variables set (say, the
    /// `KUBECONFIG` of one of several clusters).
    pub async fn start_with(identity: &str, env: &[(&str, &str)], extra: &[&str]) -> Operator {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let log = std::env::temp_dir().join(format!("outrigger-{identity}-{}.log", suffix()));
        let file = std::fs::File::create(&log).expect("operator log file");
        let mut command = tokio::process::Command::new(operator_binary());
        // OUTRIGGER_E2E_AS_SA=1: with only the chart's RBAC, not the caller's admin.
        if let Some(kubeconfig) = crate::service_account::kubeconfig() {
            command.env("KUBECONFIG", kubeconfig);
        }
        command.envs(env.iter().copied());
        let audit_from = audit_log_len();
        let child = command
            .arg("run")
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--identity")
            .arg(identity)
            .arg("--lease-namespace")
            .arg("default")
            .args(extra)
            .stdout(Stdio::null())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "failed to start {}: {e} (build it: cargo build -p outrigger)",
                    operator_binary().display()
                )
            });
        let operator = Operator {
            child,
            identity: identity.to_string(),
            metrics_url: format!("http://127.0.0.1:{port}/metrics"),
            log,
            audit_from,
        };
        wait_for(
            "the operator to serve /healthz",
            Duration::from_secs(30),
            || async {
                reqwest::get(operator.metrics_url.replace("/metrics", "/healthz"))
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
                    .map(|_| ())
            },
        )
        .await;
        operator
    }

    /// One metric's value (the sum over its label sets), if exported.
    /// The operator's `/metrics`, as Prometheus text.
    pub async fn metrics_text(&self) -> Option<String> {
        reqwest::get(&self.metrics_url)
            .await
            .ok()?
            .text()
            .await
            .ok()
    }

    pub async fn metric(&self, name: &str) -> Option<f64> {
        let text = self.metrics_text().await?;
        let values: Vec<f64> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split([' ', '{']).next() == Some(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        (!values.is_empty()).then(|| values.iter().sum())
    }

    pub async fn leading(&self) -> bool {
        self.metric("outrigger_leader").await == Some(1.0)
    }

    pub async fn wait_leading(&self) {
        wait_for(
            &format!("{} to lead", self.identity),
            Duration::from_secs(40),
            || async { self.leading().await.then_some(()) },
        )
        .await;
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGTERM, then wait for it to exit (it releases the Lease). As the chart's
    /// ServiceAccount, fails if the API server refused any of its writes.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
        if tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
        if crate::service_account::enabled() {
            let refused = crate::service_account::forbidden_since(self.audit_from);
            assert!(
                refused.is_empty(),
                "the API server refused requests of {} (charts/outrigger/rbac-rules.yaml does not allow them): {refused:?}",
                crate::service_account::username()
            );
        }
    }

    /// SIGKILL: dies without releasing anything.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }

    /// Whether the process has exited on its own.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

/// Runs kubectl (from `hack/cluster env`'s PATH) and returns stdout; panics with
/// stderr on failure.
pub fn kubectl(args: &[&str]) -> String {
    let out = std::process::Command::new("kubectl")
        .args(args)
        .output()
        .expect("kubectl on PATH (eval \"$(hack/cluster env)\")");
    assert!(
        out.status.success(),
        "kubectl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The local cluster's run folder (see hack/cluster): certificates, logs, pids.
pub fn cluster_dir() -> PathBuf {
    std::env::var("OUTRIGGER_CLUSTER_DIR").map_or_else(
        |_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/outrigger/cluster")
        },
        PathBuf::from,
    )
}

/// The API server's audit log (see hack/cluster).
pub fn audit_log() -> PathBuf {
    std::env::var("OUTRIGGER_AUDIT_LOG")
        .map_or_else(|_| cluster_dir().join("logs/audit.log"), PathBuf::from)
}

/// Writes in the audit log after byte `from` whose user agent starts with `agent`,
/// apart from leader Lease renewals (every 2 s by design, see `leader.rs`).
pub fn writes_since(from: u64, agent: &str) -> Vec<String> {
    audit_since(from, agent)
        .into_iter()
        .filter(|w| !w.contains("/leases/"))
        .collect()
}

/// Every audited write after byte `from` whose user agent starts with `agent`.
pub fn audit_since(from: u64, agent: &str) -> Vec<String> {
    audit_between(from, u64::MAX)
        .into_iter()
        .filter(|e| {
            e["userAgent"]
                .as_str()
                .is_some_and(|a| a.starts_with(agent))
        })
        .map(|e| {
            format!(
                "{} {}",
                e["verb"].as_str().unwrap_or(""),
                e["requestURI"].as_str().unwrap_or("")
            )
        })
        .collect()
}

/// The audit log's completed requests between byte `from` and byte `to` (both
/// clamped to the file; nothing when the log was rotated under them), whole lines
/// only.
pub fn audit_between(from: u64, to: u64) -> Vec<serde_json::Value> {
    let text = std::fs::read(audit_log()).unwrap_or_default();
    let at = |offset: u64| {
        usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(text.len())
    };
    let Some(span) = text.get(at(from)..at(to).max(at(from))) else {
        return Vec::new();
    };
    String::from_utf8_lossy(span)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|e| e["stage"] == "ResponseComplete")
        .collect()
}

pub fn audit_log_len() -> u64 {
    std::fs::metadata(audit_log()).map_or(0, |m| m.len())
}
