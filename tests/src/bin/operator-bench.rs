//! Operator benchmark on the local cluster (not a test): by default 200
//! ModelDeployments over 50 pools and 500 kwok nodes (`OUTRIGGER_BENCH_DEPLOYMENTS`,
//! `OUTRIGGER_BENCH_POOLS`, `OUTRIGGER_BENCH_NODES_PER_POOL` change that). Prints
//! the time from apply to all Ready, reconcile latency p50/p99, API writes per
//! reconcile and in a quiet window after convergence, and the operator's peak RSS,
//! also per object it keeps in its stores.
//!
//! `make bench-operator` builds the operator and this binary in release and runs it
//! on a fresh local cluster (`hack/bench-operator`).

use std::time::{Duration, Instant};

use kube::api::{Api, PostParams};
use outrigger_crds::ModelDeployment;
use outrigger_tests::e2e::{self, Fleet, Operator, PoolSpec, TestNamespace, wait_for};
use serde_json::json;

/// The default size: 50 pools of 10 nodes, 200 ModelDeployments of 3 replicas.
const POOLS: usize = 50;
const NODES_PER_POOL: u32 = 10;
const DEPLOYMENTS: usize = 200;
/// How long the converged operator is watched for writes (steady state: none).
const QUIET: Duration = Duration::from_secs(30);

fn size(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Quantile `q` from a Prometheus histogram's cumulative buckets, interpolated
/// linearly inside the bucket it falls in.
fn quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let Some(&(_, total)) = buckets.last() else {
        return f64::NAN;
    };
    let rank = q * total;
    let mut previous = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return previous.0;
            }
            let span = count - previous.1;
            let within = if span > 0.0 {
                (rank - previous.1) / span
            } else {
                1.0
            };
            return previous.0 + (le - previous.0) * within;
        }
        previous = (le, count);
    }
    previous.0
}

async fn histogram(operator: &Operator, name: &str, controller: &str) -> Vec<(f64, f64)> {
    let text = reqwest::get(&operator.metrics_url)
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let prefix = format!("{name}_bucket{{");
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter(|l| l.starts_with(&prefix) && l.contains(&format!("controller=\"{controller}\"")))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// What the operator's stores hold: every pool, node and running pod, and its
/// children (Deployments, Services, PodDisruptionBudgets).
async fn stored_objects(client: &kube::Client) -> usize {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::{Node, Pod, Service};
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    use kube::api::ListParams;
    let managed = ListParams::default().labels("app.kubernetes.io/managed-by=outrigger");
    let all = ListParams::default();
    let count = |n: Result<usize, kube::Error>| n.unwrap_or(0);
    count(
        Api::<outrigger_crds::GpuNodePool>::all(client.clone())
            .list(&all)
            .await
            .map(|l| l.items.len()),
    ) + count(
        Api::<Node>::all(client.clone())
            .list(&all)
            .await
            .map(|l| l.items.len()),
    ) + count(
        Api::<Pod>::all(client.clone())
            .list(&all)
            .await
            .map(|l| l.items.len()),
    ) + count(
        Api::<Deployment>::all(client.clone())
            .list(&managed)
            .await
            .map(|l| l.items.len()),
    ) + count(
        Api::<Service>::all(client.clone())
            .list(&managed)
            .await
            .map(|l| l.items.len()),
    ) + count(
        Api::<PodDisruptionBudget>::all(client.clone())
            .list(&managed)
            .await
            .map(|l| l.items.len()),
    )
}

fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

#[tokio::main]
async fn main() {
    let pools = size("OUTRIGGER_BENCH_POOLS", POOLS);
    let nodes_per_pool = u32::try_from(size(
        "OUTRIGGER_BENCH_NODES_PER_POOL",
        NODES_PER_POOL as usize,
    ))
    .unwrap_or(NODES_PER_POOL);
    let deployments = size("OUTRIGGER_BENCH_DEPLOYMENTS", DEPLOYMENTS);
    let client = e2e::client().await;
    let tag = e2e::suffix();
    let names: Vec<(String, String, String, String)> = (0..pools)
        .map(|i| {
            let (provider, region) = if i % 2 == 0 {
                ("aws", format!("us-bench{tag}-{}", i % 5))
            } else {
                ("azure", format!("eu-bench{tag}-{}", i % 5))
            };
            let zone = if provider == "aws" {
                format!("{region}a")
            } else {
                ((i / 2) % 3 + 1).to_string()
            };
            (
                format!("bench-{tag}-{i:02}"),
                provider.to_string(),
                region,
                zone,
            )
        })
        .collect();
    let specs: Vec<PoolSpec<'_>> = names
        .iter()
        .enumerate()
        .map(|(i, (name, provider, region, zone))| PoolSpec {
            name,
            provider,
            region,
            zone,
            nodes: nodes_per_pool,
            gpus_per_node: 8,
            price: 30.0 + (i * 7 % 40) as f64,
        })
        .collect();
    let started = Instant::now();
    let fleet = Fleet::new(&client, &specs).await;
    println!(
        "fleet: {pools} pools, {} kwok nodes Ready in {:.1} s",
        fleet.nodes.len(),
        started.elapsed().as_secs_f64()
    );
    let ns = TestNamespace::new(&client, "bench").await;
    let operator = Operator::start("bench", &[]).await;
    operator.wait_leading().await;
    let audit_from = e2e::audit_log_len();

    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let regions = fleet.regions();
    let applied = Instant::now();
    for i in 0..deployments {
        let md: ModelDeployment = serde_json::from_value(json!({
            "apiVersion": "outrigger.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": format!("model-{i:03}")},
            "spec": {
                "replicas": 3, "gpu": {"count": 1 + (i % 4)},
                "template": {"spec": {"containers": [{"name": "server", "image": "vllm/vllm-openai:v0.6.4"}]}},
                "placement": {"regions": regions, "spread": [{"by": "provider", "minGroups": 2, "maxShare": 67}]}
            }
        }))
        .expect("valid");
        api.create(&PostParams::default(), &md)
            .await
            .expect("created");
    }
    let created = applied.elapsed();
    let ready_after = wait_for(
        "all ModelDeployments Ready",
        Duration::from_secs(1800),
        || async {
            let list = api.list(&Default::default()).await.ok()?;
            let ready = list
                .items
                .iter()
                .filter(|md| {
                    md.status.as_ref().is_some_and(|s| {
                        s.conditions
                            .iter()
                            .any(|c| c.type_ == "Ready" && c.status == "True")
                    })
                })
                .count();
            (ready == deployments).then(|| applied.elapsed())
        },
    )
    .await;

    let buckets = histogram(
        &operator,
        "outrigger_reconcile_duration_seconds",
        "modeldeployment",
    )
    .await;
    let reconciles = buckets.last().map_or(0.0, |b| b.1);
    let writes = operator
        .metric("outrigger_api_writes_total")
        .await
        .unwrap_or(0.0);
    let audited = e2e::writes_since(
        audit_from,
        &format!("outrigger/{} bench", env!("CARGO_PKG_VERSION")),
    )
    .len();
    // Converged: a quiet window in which nothing changes, so nothing is written.
    let quiet_from = e2e::audit_log_len();
    tokio::time::sleep(QUIET).await;
    let quiet_writes = e2e::writes_since(
        quiet_from,
        &format!("outrigger/{} bench", env!("CARGO_PKG_VERSION")),
    )
    .len();
    let rss = operator.pid().and_then(peak_rss_mib);
    let stored = stored_objects(&client).await;
    println!(
        "apply: {deployments} ModelDeployments created in {:.1} s",
        created.as_secs_f64()
    );
    println!(
        "all Ready: {:.1} s after the first apply (goal: 60 s)",
        ready_after.as_secs_f64()
    );
    println!(
        "reconcile latency (modeldeployment): p50 {:.1} ms, p99 {:.1} ms over {reconciles} reconciles",
        quantile(&buckets, 0.5) * 1e3,
        quantile(&buckets, 0.99) * 1e3
    );
    println!(
        "API writes: {writes} counted by the operator, {audited} in the audit log; {:.2} per reconcile",
        writes / reconciles.max(1.0)
    );
    println!("steady state: {quiet_writes} API writes in the {QUIET:?} after convergence");
    match rss {
        Some(mib) => println!(
            "operator peak RSS: {mib:.1} MiB (goal: 48 MiB), {stored} objects in its stores: {:.1} KiB per object",
            mib * 1024.0 / stored.max(1) as f64
        ),
        None => println!("operator peak RSS: unknown"),
    }
    operator.stop().await;
    ns.delete().await;
    fleet.delete().await;
}
