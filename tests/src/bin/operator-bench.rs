//! Operator benchmark on the local cluster (not a test): by default 200
//! ModelDeployments over 50 pools and 500 kwok nodes (`OUTRIGGER_BENCH_DEPLOYMENTS`,
//! `OUTRIGGER_BENCH_POOLS`, `OUTRIGGER_BENCH_NODES_PER_POOL` change that). Prints
//! the time from apply to all Ready (followed from a watch), reconcile latency
//! p50/p99 and the share within 100 ms, split into the pass's own work and its
//! writes; each kind of apply as the operator saw it beside the API server's own
//! time for it; the API server's time for every client's writes (from its audit
//! log); the CPU each process used; API writes by resource and in a quiet window
//! after convergence (with what a pool status write there changed), and the
//! operator's peak RSS, also per object it keeps in its stores.
//!
//! `make bench-operator` builds the operator and this binary in release and runs it
//! on a fresh local cluster (`hack/bench-operator`).

use std::time::{Duration, Instant};

use kube::api::{Api, PostParams};
use outrigger_crds::ModelDeployment;
use outrigger_tests::e2e::{self, Fleet, Operator, PoolSpec, TestNamespace};
use serde_json::json;

/// The default size: 50 pools of 10 nodes, 200 ModelDeployments of 3 replicas.
const POOLS: usize = 50;
const NODES_PER_POOL: u32 = 10;
const DEPLOYMENTS: usize = 200;
/// How long all ModelDeployments may take to be Ready.
const READY_WITHIN: Duration = Duration::from_secs(1800);
/// How long the converged operator is watched for writes (steady state: none).
const QUIET: Duration = Duration::from_secs(30);

fn size(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A Prometheus histogram's cumulative buckets: (upper bound, count).
type Buckets = Vec<(f64, f64)>;

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

/// The cumulative buckets of histogram `name` in the Prometheus text `metrics`,
/// summed over the series whose labels include every one of `labels`
/// (`key="value"`).
fn histogram(metrics: &str, name: &str, labels: &[&str]) -> Buckets {
    let prefix = format!("{name}_bucket{{");
    let mut buckets: std::collections::BTreeMap<u64, f64> = Default::default();
    for line in metrics
        .lines()
        .filter(|l| l.starts_with(&prefix) && labels.iter().all(|label| l.contains(label)))
    {
        let Some(le) = line.split("le=\"").nth(1).and_then(|l| l.split('"').next()) else {
            continue;
        };
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or(f64::NAN)
        };
        let count: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|c| c.parse().ok())
            .unwrap_or(0.0);
        // Bounds are positive, so their bits order as they do.
        *buckets.entry(le.to_bits()).or_default() += count;
    }
    buckets
        .into_iter()
        .map(|(le, count)| (f64::from_bits(le), count))
        .collect()
}

/// The API server's own `/metrics`.
async fn apiserver_metrics(client: &kube::Client) -> String {
    let request = http::Request::get("/metrics")
        .body(Vec::new())
        .expect("a request");
    client.request_text(request).await.unwrap_or_default()
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

/// The share of observations at or under `bound` (a bucket bound).
fn share_within(buckets: &[(f64, f64)], bound: f64) -> f64 {
    let total = buckets.last().map_or(0.0, |b| b.1);
    let within = buckets
        .iter()
        .find(|(le, _)| (*le - bound).abs() < 1e-9)
        .map_or(f64::NAN, |b| b.1);
    within / total.max(1.0)
}

/// One line of figures for a latency histogram.
fn latency(buckets: &[(f64, f64)]) -> String {
    format!(
        "p50 {:.1} ms, p99 {:.1} ms, {:.2} % within 100 ms, over {} passes",
        quantile(buckets, 0.5) * 1e3,
        quantile(buckets, 0.99) * 1e3,
        share_within(buckets, 0.1) * 100.0,
        buckets.last().map_or(0.0, |b| b.1)
    )
}

/// A memory figure of `/proc/<pid>/status` (`VmHWM` peak, `VmRSS` now), in MiB.
fn memory_mib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// CPU seconds (user + system) process `pid` has used, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line (11 and 12 after the name).
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on Linux.
    Some(ticks / 100.0)
}

/// The processes the 2 cores are shared by: the local cluster's (their pids in
/// `$OUTRIGGER_CLUSTER_DIR/pids`) and the operator.
fn processes(operator: Option<u32>) -> Vec<(String, u32)> {
    let mut found: Vec<(String, u32)> = std::fs::read_dir(e2e::cluster_dir().join("pids"))
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let name = path
                .file_name()?
                .to_str()?
                .strip_suffix(".pid")?
                .to_string();
            let pid = std::fs::read_to_string(&path).ok()?.trim().parse().ok()?;
            Some((name, pid))
        })
        .collect();
    found.extend(operator.map(|pid| ("outrigger".to_string(), pid)));
    found.sort();
    found
}

/// CPU seconds per process now.
fn cpu_use(processes: &[(String, u32)]) -> Vec<(String, f64)> {
    processes
        .iter()
        .filter_map(|(name, pid)| match cpu_seconds(*pid) {
            Some(seconds) => Some((name.clone(), seconds)),
            None => {
                println!("CPU use of {name} (pid {pid}) not readable; left out");
                None
            }
        })
        .collect()
}

/// The API server's own time for each client's writes audited between byte `from`
/// and byte `to` of the audit log (from `RequestReceived` to `ResponseComplete`),
/// in milliseconds, by user and program (its user agent's name), the busiest
/// first; Outrigger's also by resource and verb.
fn served_by_user(from: u64, to: u64) -> Vec<(String, Vec<f64>)> {
    let mut by_user: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    for entry in e2e::audit_between(from, to) {
        let at = |field: &str| entry[field].as_str()?.parse::<jiff::Timestamp>().ok();
        let (Some(received), Some(complete)) =
            (at("requestReceivedTimestamp"), at("stageTimestamp"))
        else {
            continue;
        };
        let took = complete.duration_since(received).as_secs_f64() * 1e3;
        let user = entry["user"]["username"].as_str().unwrap_or("?");
        let agent = entry["userAgent"].as_str().unwrap_or("?");
        let agent = agent.split(['/', ' ']).next().unwrap_or(agent);
        let client = format!("{} ({agent})", user.trim_start_matches("system:"));
        if agent == "outrigger" {
            let object = &entry["objectRef"];
            let resource = match object["subresource"].as_str() {
                Some(sub) => format!("{}/{sub}", object["resource"].as_str().unwrap_or("?")),
                None => object["resource"].as_str().unwrap_or("?").to_string(),
            };
            let verb = entry["verb"].as_str().unwrap_or("?");
            by_user
                .entry(format!("{client}, {verb} {resource}"))
                .or_default()
                .push(took);
        }
        by_user.entry(client).or_default().push(took);
    }
    let mut by_user: Vec<(String, Vec<f64>)> = by_user.into_iter().collect();
    for (_, times) in &mut by_user {
        times.sort_by(f64::total_cmp);
    }
    by_user.sort_by_key(|(_, times)| std::cmp::Reverse(times.len()));
    by_user
}

/// p50, p99 and the share within 100 ms of sorted milliseconds.
fn spread(sorted: &[f64]) -> String {
    if sorted.is_empty() {
        return "no writes".to_string();
    }
    let at =
        |q: f64| sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1];
    format!(
        "p50 {:.1} ms, p99 {:.1} ms, {:.2} % within 100 ms, over {} writes",
        at(0.5),
        at(0.99),
        sorted.iter().filter(|t| **t <= 100.0).count() as f64 * 100.0 / sorted.len() as f64,
        sorted.len()
    )
}

fn is_ready(md: &ModelDeployment) -> bool {
    md.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

/// When `count` ModelDeployments are Ready, read from a watch: polling lists of
/// every ModelDeployment would load the API server the operator is measured on.
async fn all_ready(api: &Api<ModelDeployment>, count: usize) -> Instant {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};
    let mut ready = std::collections::BTreeMap::new();
    let mut events =
        std::pin::pin!(watcher(api.clone(), watcher::Config::default()).default_backoff());
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Apply(md) | watcher::Event::InitApply(md)) => {
                ready.insert(md.metadata.name.clone().unwrap_or_default(), is_ready(&md));
            }
            Ok(watcher::Event::Delete(md)) => {
                ready.remove(&md.metadata.name.clone().unwrap_or_default());
            }
            Ok(watcher::Event::Init | watcher::Event::InitDone) => {}
            Err(error) => eprintln!("watching ModelDeployments: {error}; the watch restarts"),
        }
        if ready.values().filter(|r| **r).count() >= count {
            return Instant::now();
        }
    }
    panic!("the ModelDeployment watch ended");
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
    let busy = processes(operator.pid());
    let cpu_before = cpu_use(&busy);
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
    let ready_after = tokio::time::timeout(READY_WITHIN, all_ready(&api, deployments))
        .await
        .unwrap_or_else(|_| {
            panic!("not all {deployments} ModelDeployments Ready within {READY_WITHIN:?}")
        });
    let ready_after = ready_after.duration_since(applied);
    let cpu_after = cpu_use(&busy);
    let audit_to = e2e::audit_log_len();

    let controller = "controller=\"modeldeployment\"";
    let metrics = operator
        .metrics_text()
        .await
        .expect("the operator's metrics");
    let buckets = histogram(
        &metrics,
        "outrigger_reconcile_duration_seconds",
        &[controller],
    );
    let deciding = histogram(
        &metrics,
        "outrigger_reconcile_phase_seconds",
        &[controller, "phase=\"decide\""],
    );
    let writing = histogram(
        &metrics,
        "outrigger_reconcile_phase_seconds",
        &[controller, "phase=\"write\""],
    );
    // The same writes as the operator timed them (sent to answer read), and as the
    // API server did (its handler, every client's, mostly ours).
    let served = apiserver_metrics(&client).await;
    let per_write: Vec<(&str, Buckets, Buckets)> = [
        ("Deployment applies", "deployments", ("deployments", "")),
        (
            "ModelDeployment status applies",
            "modeldeployments/status",
            ("modeldeployments", "status"),
        ),
        (
            "PodDisruptionBudget applies",
            "poddisruptionbudgets",
            ("poddisruptionbudgets", ""),
        ),
    ]
    .into_iter()
    .map(|(what, ours, (theirs, subresource))| {
        (
            what,
            histogram(
                &metrics,
                "outrigger_api_write_duration_seconds",
                &[&format!("resource=\"{ours}\""), "verb=\"apply\""],
            ),
            histogram(
                &served,
                "apiserver_request_duration_seconds",
                &[
                    "verb=\"APPLY\"",
                    &format!("resource=\"{theirs}\""),
                    &format!("subresource=\"{subresource}\""),
                ],
            ),
        )
    })
    .collect();
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
    // Converged: once the pods of children deleted on the way are gone too, a quiet
    // window in which nothing changes, so nothing is written.
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), &ns.name);
    let settled = Instant::now();
    e2e::wait_for("no pod terminating", Duration::from_secs(300), || async {
        let list = pods.list(&Default::default()).await.ok()?;
        list.items
            .iter()
            .all(|p| p.metadata.deletion_timestamp.is_none())
            .then_some(())
    })
    .await;
    println!(
        "settled: no pod terminating {:.1} s after all Ready",
        settled.elapsed().as_secs_f64()
    );
    let quiet_from = e2e::audit_log_len();
    let pools_api: Api<outrigger_crds::GpuNodePool> = Api::all(client.clone());
    let statuses = || async {
        pools_api
            .list(&Default::default())
            .await
            .map(|l| {
                l.items
                    .into_iter()
                    .map(|p| {
                        let status = serde_json::to_value(&p.status).unwrap_or_default();
                        (p.metadata.name.unwrap_or_default(), status)
                    })
                    .collect::<std::collections::BTreeMap<_, _>>()
            })
            .unwrap_or_default()
    };
    let before = statuses().await;
    tokio::time::sleep(QUIET).await;
    let quiet_writes = e2e::writes_since(
        quiet_from,
        &format!("outrigger/{} bench", env!("CARGO_PKG_VERSION")),
    );
    let rss = operator.pid().and_then(|pid| memory_mib(pid, "VmHWM:"));
    let rss_now = operator.pid().and_then(|pid| memory_mib(pid, "VmRSS:"));
    let rss_file = operator.pid().and_then(|pid| memory_mib(pid, "RssFile:"));
    let stored = stored_objects(&client).await;
    println!(
        "apply: {deployments} ModelDeployments created in {:.1} s",
        created.as_secs_f64()
    );
    println!(
        "all Ready: {:.1} s after the first apply (goal: 60 s)",
        ready_after.as_secs_f64()
    );
    let spent: Vec<String> = cpu_after
        .iter()
        .filter_map(|(name, after)| {
            let before = cpu_before.iter().find(|(n, _)| n == name)?.1;
            Some(format!("{name} {:.1} s", after - before))
        })
        .collect();
    println!(
        "CPU used from the first apply to all Ready: {}",
        spent.join(", ")
    );
    println!("reconcile latency (modeldeployment): {}", latency(&buckets));
    println!("  of which deciding (no I/O): {}", latency(&deciding));
    println!(
        "  of which writing (passes that wrote): {}",
        latency(&writing)
    );
    for (what, ours, theirs) in &per_write {
        println!("  {what}, as the operator saw each: {}", latency(ours));
        println!("  {what}, the API server's own time: {}", latency(theirs));
    }
    println!("API server's own time for every client's writes, from the first apply to all Ready:");
    for (user, times) in served_by_user(audit_from, audit_to)
        .iter()
        .filter(|(_, times)| times.len() >= 20)
    {
        println!("  {user}: {}", spread(times));
    }
    println!(
        "API writes: {writes} counted by the operator, {audited} in the audit log; {:.2} per reconcile",
        writes / reconciles.max(1.0)
    );
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("outrigger_api_writes_total{"))
    {
        println!("  {line}");
    }
    println!(
        "steady state: {} API writes in the {QUIET:?} after convergence",
        quiet_writes.len()
    );
    for write in &quiet_writes {
        println!("  {write}");
    }
    // What those writes changed, for the first few pools.
    let after = statuses().await;
    for (name, status) in after
        .iter()
        .filter(|(n, s)| before.get(*n) != Some(*s))
        .take(3)
    {
        println!(
            "  pool {name}: was {}",
            before.get(name).cloned().unwrap_or_default()
        );
        println!("  pool {name}: now {status}");
    }
    match rss {
        Some(mib) => println!(
            "operator peak RSS: {mib:.1} MiB (goal: 48 MiB; {:.1} MiB at the end, {:.1} MiB of it mapped files such as the binary's code), {stored} objects in its stores: {:.1} KiB per object",
            rss_now.unwrap_or(f64::NAN),
            rss_file.unwrap_or(f64::NAN),
            mib * 1024.0 / stored.max(1) as f64
        ),
        None => println!("operator peak RSS: unknown"),
    }
    operator.stop().await;
    ns.delete().await;
    fleet.delete().await;
}
