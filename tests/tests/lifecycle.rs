//! End-to-end: node lifecycle on the local cluster with the simulated clouds. A
//! spot interruption (AWS, through the interruption queue) and an Azure Preempt
//! (a Node condition) are replaced before the deadline, with the ModelDeployment's
//! Ready pods, sampled from a watch, never under its replicas; bad queue messages
//! are deleted and counted. Needs the local cluster (`hack/e2e --test lifecycle`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_ec2::types::{InstanceType, RequestLaunchTemplateData};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Event, Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use outrigger_crds::{GpuNodePool, ModelDeployment};
use outrigger_tests::e2e::{self, Operator, SimClouds, TestNamespace, wait_for};
use serde_json::{Value, json};

const SUB: &str = "00000000-0000-0000-0000-000000000013";
const AWS_REGION: &str = "us-east-1";
const AZURE_REGION: &str = "eastus";
const TEMPLATE: &str = "outrigger-e2e-h100";
const DEADLINE: Duration = Duration::from_secs(90);

/// One scalable pool of 8-GPU H100 nodes, `min` to 3 (`extra` is merged into its spec).
struct PoolDef {
    name: String,
    provider: &'static str,
    zone: &'static str,
    capacity: &'static str,
    price: f64,
    min: u32,
    extra: Value,
}

impl PoolDef {
    fn new(name: &str, provider: &'static str, zone: &'static str, price: f64) -> PoolDef {
        PoolDef {
            name: name.to_string(),
            provider,
            zone,
            capacity: "on-demand",
            price,
            min: 0,
            extra: json!({}),
        }
    }

    fn spot(self) -> PoolDef {
        PoolDef {
            capacity: "spot",
            ..self
        }
    }
}

struct Scene {
    client: Client,
    sim: SimClouds,
    pools: Vec<PoolDef>,
    queue_name: String,
    queue: String,
}

impl Scene {
    async fn new(pools: Vec<PoolDef>) -> Scene {
        let client = e2e::client().await;
        let sim = SimClouds::from_env();
        let ec2 = sim.ec2(AWS_REGION).await;
        sim.control.clear_all().await;
        let _ = ec2
            .create_launch_template()
            .launch_template_name(TEMPLATE)
            .launch_template_data(
                RequestLaunchTemplateData::builder()
                    .image_id("ami-12345678")
                    .instance_type(InstanceType::from("p5.48xlarge"))
                    .build(),
            )
            .send()
            .await;
        let api: Api<GpuNodePool> = Api::all(client.clone());
        for p in &pools {
            let (region, instance_type, scaling) = if p.provider == "aws" {
                (
                    AWS_REGION,
                    "p5.48xlarge",
                    json!({"aws": {"launchTemplate": {"name": TEMPLATE, "version": "$Latest"}}}),
                )
            } else {
                sim.control
                    .create_scale_set(json!({
                        "subscriptionId": SUB, "resourceGroup": "e2e", "name": p.name,
                        "location": AZURE_REGION, "sku": "Standard_ND96isr_H100_v5",
                        "zones": [p.zone], "capacity": 0, "pool": p.name,
                    }))
                    .await;
                (
                    AZURE_REGION,
                    "Standard_ND96isr_H100_v5",
                    json!({"azure": {"subscriptionId": SUB, "resourceGroup": "e2e", "scaleSetName": p.name}}),
                )
            };
            let mut spec = json!({"provider": p.provider, "region": region, "zone": p.zone,
                "instanceType": instance_type, "gpu": {"type": "H100", "count": 8},
                "capacityType": p.capacity, "pricePerNodeHour": p.price,
                "nodes": {"min": p.min, "max": 3}, "scaling": scaling});
            if let (Some(spec), Some(extra)) = (spec.as_object_mut(), p.extra.as_object()) {
                spec.extend(extra.clone());
            }
            let pool: GpuNodePool = serde_json::from_value(json!({
                "apiVersion": "outrigger.dev/v1alpha1", "kind": "GpuNodePool",
                "metadata": {"name": p.name}, "spec": spec
            }))
            .expect("pool");
            api.create(&PostParams::default(), &pool)
                .await
                .expect("pool created");
        }
        // A queue of this test's own (see tests/src/interrupt.rs).
        let queue_name = format!("outrigger-interruptions-{}", e2e::suffix());
        let queue = sim
            .control
            .call(
                reqwest::Method::GET,
                &format!("/aws/interruption-queue?name={queue_name}"),
                None,
            )
            .await["queueUrl"]
            .as_str()
            .expect("the simulator's queue URL")
            .to_string();
        Scene {
            client,
            sim,
            pools,
            queue_name,
            queue,
        }
    }

    async fn operator(&self, identity: &str) -> Operator {
        Operator::start(
            identity,
            &[
                "--leader-elect=false",
                "--aws-endpoint-url",
                &self.sim.ec2_url,
                "--aws-interruption-queue",
                &self.queue,
                "--azure-endpoint-url",
                &self.sim.azure_url,
                "--azure-ca-file",
                &self.sim.azure_ca_file,
                "--azure-token",
                "e2e",
                "--cluster-name",
                "e2e",
                "--scale-down-after-seconds",
                "5",
            ],
        )
        .await
    }

    /// Deletes the pools (their finalizers release the instances) and scale sets.
    async fn delete(self) {
        let api: Api<GpuNodePool> = Api::all(self.client.clone());
        for p in &self.pools {
            let _ = api.delete(&p.name, &DeleteParams::default()).await;
        }
        wait_for("the pools gone", DEADLINE, || async {
            for p in &self.pools {
                if api.get_opt(&p.name).await.ok()?.is_some() {
                    return None;
                }
            }
            Some(())
        })
        .await;
        for p in self.pools.iter().filter(|p| p.provider == "azure") {
            self.sim.control.delete_scale_set(SUB, "e2e", &p.name).await;
        }
    }
}

fn model(replicas: i32) -> ModelDeployment {
    serde_json::from_value(json!({
        "apiVersion": "outrigger.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "llm"},
        "spec": {
            "replicas": replicas, "gpu": {"count": 8, "types": ["H100"]},
            "template": {"spec": {"containers": [{"name": "server", "image": "vllm/vllm-openai:v0.6.4"}]}},
            "placement": {"regions": [AWS_REGION, AZURE_REGION],
                          "capacityTypes": ["spot", "on-demand"],
                          "spread": [{"by": "provider", "minGroups": 2}]}
        }
    }))
    .expect("model")
}

fn pod_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// What a watch of the deployment's pods saw: the fewest Ready pods after the
/// first full list, and when `replicas` Ready pods first ran off the doomed node.
#[derive(Default)]
struct Seen {
    fewest: Option<usize>,
    replaced: Option<Instant>,
}

/// Watches the deployment's pods until aborted.
fn sample(
    client: &Client,
    ns: &str,
    doomed: &str,
    replicas: usize,
) -> (Arc<Mutex<Seen>>, tokio::task::JoinHandle<()>) {
    let doomed = doomed.to_string();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let out = seen.clone();
    let task = tokio::spawn(async move {
        let mut pods: BTreeMap<String, Pod> = BTreeMap::new();
        let mut listing: BTreeMap<String, Pod> = BTreeMap::new();
        let mut synced = false;
        let config = watcher::Config::default().labels("outrigger.dev/deployment=llm");
        let mut events = std::pin::pin!(watcher(api, config));
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::Apply(p)) => {
                    pods.insert(p.name_any(), p);
                }
                Ok(watcher::Event::Delete(p)) => {
                    pods.remove(&p.name_any());
                }
                Ok(watcher::Event::Init) => listing.clear(),
                Ok(watcher::Event::InitApply(p)) => {
                    listing.insert(p.name_any(), p);
                }
                Ok(watcher::Event::InitDone) => {
                    pods = std::mem::take(&mut listing);
                    synced = true;
                }
                Err(_) => continue,
            }
            if !synced {
                continue;
            }
            let ready: Vec<&Pod> = pods.values().filter(|p| pod_ready(p)).collect();
            let elsewhere = ready
                .iter()
                .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some(&doomed))
                .count();
            let mut seen = out.lock().unwrap_or_else(|e| e.into_inner());
            seen.fewest = Some(seen.fewest.map_or(ready.len(), |f| f.min(ready.len())));
            if elsewhere >= replicas && seen.replaced.is_none() {
                seen.replaced = Some(Instant::now());
            }
        }
    });
    (seen, task)
}

/// Ready pods per pool.
async fn ready_per_pool(client: &Client, ns: &str) -> BTreeMap<String, u32> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut per = BTreeMap::new();
    for p in api
        .list(&ListParams::default().labels("outrigger.dev/deployment=llm"))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
    {
        if pod_ready(&p) {
            let pool = p
                .labels()
                .get("outrigger.dev/pool")
                .cloned()
                .unwrap_or_default();
            *per.entry(pool).or_default() += 1;
        }
    }
    per
}

/// The name of the Node that runs the deployment's pod in `pool`.
async fn node_of_pod_in(client: &Client, ns: &str, pool: &str) -> String {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pods = api
        .list(&ListParams::default().labels(&format!(
            "outrigger.dev/deployment=llm,outrigger.dev/pool={pool}"
        )))
        .await
        .expect("pods listed");
    pods.items
        .iter()
        .find_map(|p| p.spec.as_ref()?.node_name.clone())
        .expect("a pod of the pool on a node")
}

async fn events_with(client: &Client, reason: &str) -> Vec<String> {
    let api: Api<Event> = Api::all(client.clone());
    api.list(&ListParams::default().fields(&format!("reason={reason}")))
        .await
        .map(|l| {
            l.items
                .into_iter()
                .filter_map(|e| e.message)
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
}

async fn backoff_reason(client: &Client, pool: &str) -> Option<String> {
    let api: Api<GpuNodePool> = Api::all(client.clone());
    Some(api.get(pool).await.ok()?.status?.capacity_backoff?.reason)
}

/// The common course: the deployment Ready on `doomed_pool` and another provider;
/// an interruption with `notice` on the doomed pool's node (given by `interrupt`);
/// the replacement Ready on `replacement_pool` while the doomed node still exists;
/// the doomed node gone at the deadline; the fewest Ready pods seen never under 2.
/// It runs its own operator and namespace (named after `identity`), and removes them
/// and `scene` after.
async fn replaced_before_the_deadline(
    scene: Scene,
    identity: &str,
    (doomed_pool, other_pool, replacement_pool): (&str, &str, &str),
    interrupt: impl Fn(&str) -> Value,
    what: &str,
) {
    let operator = scene.operator(&format!("lifecycle-{identity}")).await;
    let ns = TestNamespace::new(&scene.client, identity).await;
    let client = &scene.client;
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    api.create(&PostParams::default(), &model(2))
        .await
        .expect("ModelDeployment created");
    let want = BTreeMap::from([(doomed_pool.to_string(), 1), (other_pool.to_string(), 1)]);
    wait_for(&format!("llm Ready as {want:?}"), DEADLINE, || async {
        (ready_per_pool(client, &ns.name).await == want).then_some(())
    })
    .await;
    let node = node_of_pod_in(client, &ns.name, doomed_pool).await;
    let (seen, watch) = sample(client, &ns.name, &node, 2);
    wait_for("the pod watch synced", DEADLINE, || async {
        seen.lock().ok()?.fewest.map(|_| ())
    })
    .await;

    let noticed = Instant::now();
    scene
        .sim
        .control
        .call(reqwest::Method::POST, "/interrupt", Some(interrupt(&node)))
        .await;
    let nodes: Api<Node> = Api::all(client.clone());
    let replaced = wait_for(
        &format!("2 Ready pods off the doomed node {node} after the {what}"),
        DEADLINE,
        || async { seen.lock().ok()?.replaced },
    )
    .await;
    // Ordering, not time: when the replacement is Ready, the doomed node's
    // machine is still there.
    let doomed_still_there = nodes.get_opt(&node).await.expect("node read").is_some();
    let seconds = replaced.duration_since(noticed).as_secs_f64();
    println!("{what}: replacement Ready {seconds:.1} s after the notice");
    assert!(
        doomed_still_there,
        "the replacement was Ready only after the doomed node {node} went"
    );
    let want = BTreeMap::from([
        (other_pool.to_string(), 1),
        (replacement_pool.to_string(), 1),
    ]);
    wait_for(
        &format!("the doomed node {node} gone at the deadline, llm Ready as {want:?}"),
        DEADLINE,
        || async {
            let gone = nodes.get_opt(&node).await.ok()?.is_none();
            (gone && ready_per_pool(client, &ns.name).await == want).then_some(())
        },
    )
    .await;
    watch.abort();
    let fewest = seen.lock().map(|s| s.fewest).ok().flatten();
    println!("{what}: fewest Ready pods seen from the notice on: {fewest:?} (replicas 2)");
    assert_eq!(
        fewest,
        Some(2),
        "Ready pods fell under spec.replicas during the {what}"
    );
    assert_eq!(
        backoff_reason(client, doomed_pool).await.as_deref(),
        Some("Interrupted"),
        "the interrupted offering is in backoff"
    );
    let interrupted = events_with(client, "Interrupted").await;
    assert!(
        interrupted.iter().any(|m| m.contains(&node)),
        "an Interrupted Event names {node}: {interrupted:?}"
    );
    let replaced_events = events_with(client, "Replaced").await;
    assert!(
        replaced_events.iter().any(|m| m.contains(doomed_pool)),
        "a Replaced Event names {doomed_pool}: {replaced_events:?}"
    );
    assert!(
        operator.metric("outrigger_interruptions_total").await >= Some(1.0),
        "the interruption is counted"
    );
    api.delete("llm", &DeleteParams::default())
        .await
        .expect("ModelDeployment deleted");
    ns.delete().await;
    scene.delete().await;
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the local cluster: hack/e2e runs it"]
async fn a_spot_interruption_is_replaced_before_the_deadline() {
    if !e2e::enabled("spot interruption") {
        return;
    }
    let _turn = e2e::serial().await;
    let tag = e2e::suffix();
    let (spot, od, azure) = (
        format!("spot-{tag}"),
        format!("od-{tag}"),
        format!("azure-{tag}"),
    );
    let scene = Scene::new(vec![
        PoolDef::new(&spot, "aws", "us-east-1a", 5.0).spot(),
        PoolDef::new(&od, "aws", "us-east-1b", 10.0),
        PoolDef::new(&azure, "azure", "1", 20.0),
    ])
    .await;
    replaced_before_the_deadline(
        scene,
        "spot",
        (&spot, &azure, &od),
        |node| json!({"provider": "aws", "instanceId": node, "kind": "spot", "noticeSeconds": 20}),
        "spot interruption (20 s notice)",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the local cluster: hack/e2e runs it"]
async fn an_azure_preempt_is_replaced_before_the_deadline() {
    if !e2e::enabled("azure preempt") {
        return;
    }
    let _turn = e2e::serial().await;
    let tag = e2e::suffix();
    let (spot, od, aws) = (
        format!("azspot{tag}"),
        format!("azod{tag}"),
        format!("aws-{tag}"),
    );
    let scene = Scene::new(vec![
        PoolDef::new(&spot, "azure", "1", 5.0).spot(),
        PoolDef::new(&od, "azure", "2", 10.0),
        PoolDef::new(&aws, "aws", "us-east-1c", 20.0),
    ])
    .await;
    replaced_before_the_deadline(
        scene,
        "preempt",
        (&spot, &aws, &od),
        |node| json!({"provider": "azure", "node": node, "kind": "preempt", "noticeSeconds": 15}),
        "Azure Preempt (15 s notice)",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the local cluster: hack/e2e runs it"]
async fn bad_queue_messages_are_deleted_and_counted() {
    if !e2e::enabled("bad queue messages") {
        return;
    }
    let _turn = e2e::serial().await;
    let scene = Scene::new(Vec::new()).await;
    let mut operator = scene.operator("lifecycle-queue").await;
    let unknown_instance = json!({"version": "0", "id": "1", "detail-type": "EC2 Spot Instance Interruption Warning",
        "source": "aws.ec2", "account": "123456789012", "time": "2026-12-02T10:00:00Z", "region": "us-east-1",
        "resources": [], "detail": {"instance-id": "i-00000000000000000", "instance-action": "terminate"}});
    let unknown_type = json!({"version": "0", "id": "2", "detail-type": "EC2 Something New",
        "source": "aws.ec2", "account": "123456789012", "time": "2026-12-02T10:00:00Z", "region": "us-east-1",
        "resources": [], "detail": {}});
    for body in [
        "not json at all".to_string(),
        unknown_type.to_string(),
        unknown_instance.to_string(),
    ] {
        let sent = reqwest::Client::new()
            .post(format!("{}/aws/interruption-queue", scene.sim.control_url))
            .body(body)
            .send()
            .await
            .expect("sent to the queue");
        assert!(sent.status().is_success());
    }
    let counted = |kind: &'static str, action: &'static str| {
        let operator = &operator;
        async move {
            let text = operator.metrics_text().await?;
            text.lines()
                .find(|l| {
                    l.starts_with("outrigger_interruptions_total{")
                        && l.contains(&format!("kind=\"{kind}\""))
                        && l.contains(&format!("action=\"{action}\""))
                })
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        }
    };
    wait_for("the three bad messages counted", DEADLINE, || async {
        let unparsable = counted("unparsable", "deleted").await?;
        let unknown = counted("unknown-type", "deleted").await?;
        let not_ours = counted("spot", "not-ours").await?;
        (unparsable >= 1.0 && unknown >= 1.0 && not_ours >= 1.0).then_some(())
    })
    .await;
    wait_for("the queue empty", DEADLINE, || async {
        let state = scene
            .sim
            .control
            .call(
                reqwest::Method::GET,
                &format!("/aws/interruption-queue?name={}", scene.queue_name),
                None,
            )
            .await;
        (state["messages"].as_u64() == Some(0)).then_some(())
    })
    .await;
    assert!(!operator.exited(), "the operator keeps running");
    scene.delete().await;
    operator.stop().await;
}

/// Names of the pool's Ready Nodes.
async fn ready_nodes(client: &Client, pool: &str) -> Vec<String> {
    let api: Api<Node> = Api::all(client.clone());
    api.list(&ListParams::default().labels(&format!("outrigger.dev/pool={pool}")))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(e2e::node_ready)
        .map(|n| n.name_any())
        .collect()
}

async fn pool_condition(client: &Client, pool: &str, type_: &str) -> Option<(String, String)> {
    let api: Api<GpuNodePool> = Api::all(client.clone());
    api.get(pool)
        .await
        .ok()?
        .status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status, c.reason))
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the local cluster: hack/e2e runs it"]
async fn a_broken_node_is_repaired_and_an_outage_is_not() {
    if !e2e::enabled("node repair") {
        return;
    }
    let _turn = e2e::serial().await;
    let tag = e2e::suffix();
    let (aws, azure) = (format!("rep-{tag}"), format!("repaz-{tag}"));
    let mut aws_pool = PoolDef::new(&aws, "aws", "us-east-1d", 5.0);
    aws_pool.min = 2;
    aws_pool.extra = json!({"repair": {"notReadyAfterSeconds": 5}});
    let scene = Scene::new(vec![aws_pool, PoolDef::new(&azure, "azure", "3", 20.0)]).await;
    let ec2 = scene.sim.ec2(AWS_REGION).await;
    let operator = scene.operator("lifecycle-repair").await;
    let ns = TestNamespace::new(&scene.client, "repair").await;
    let client = &scene.client;
    let md: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    md.create(&PostParams::default(), &model(2))
        .await
        .expect("ModelDeployment created");
    let want = BTreeMap::from([(aws.clone(), 1), (azure.clone(), 1)]);
    wait_for(
        "llm Ready on both pools, two aws nodes",
        DEADLINE,
        || async {
            (ready_per_pool(client, &ns.name).await == want
                && ready_nodes(client, &aws).await.len() == 2)
                .then_some(())
        },
    )
    .await;

    // One broken node: replaced.
    let broken = node_of_pod_in(client, &ns.name, &aws).await;
    let fault = scene
        .sim
        .control
        .inject(json!({"fault": "NodeNotReady", "provider": "aws", "node": broken}))
        .await;
    let nodes: Api<Node> = Api::all(client.clone());
    let broke = Instant::now();
    wait_for(
        &format!("{broken} repaired: gone, two Ready aws nodes again, llm Ready"),
        DEADLINE,
        || async {
            let gone = nodes.get_opt(&broken).await.ok()?.is_none();
            (gone
                && ready_nodes(client, &aws).await.len() == 2
                && ready_per_pool(client, &ns.name).await == want)
                .then_some(())
        },
    )
    .await;
    println!(
        "repair: {broken} NotReady to a Ready replacement and llm Ready again in {:.1} s (notReadyAfterSeconds 5)",
        broke.elapsed().as_secs_f64()
    );
    scene.sim.control.clear(&fault).await;
    assert!(
        operator.metric("outrigger_repairs_total").await == Some(1.0),
        "one repair counted"
    );
    assert!(
        events_with(client, "Repairing")
            .await
            .iter()
            .any(|m| m.contains(&broken)),
        "a Repairing Event names {broken}"
    );

    // The whole pool's region down: an outage, nothing is terminated.
    let before = e2e::live_instances(&ec2, &aws)
        .await
        .expect("instances listed");
    scene
        .sim
        .control
        .outage(json!({"provider": "aws", "region": AWS_REGION}))
        .await;
    wait_for(
        "NodeRepair=False ProviderOutage, and llm moved off the lost pool",
        DEADLINE,
        || async {
            let condition = pool_condition(client, &aws, "NodeRepair").await?;
            let moved = ready_per_pool(client, &ns.name).await.get(&azure) == Some(&2);
            (condition == ("False".to_string(), "ProviderOutage".to_string()) && moved)
                .then_some(())
        },
    )
    .await;
    let after = e2e::live_instances(&ec2, &aws)
        .await
        .expect("instances listed");
    assert_eq!(before, after, "an outage terminated instances");
    assert_eq!(
        operator.metric("outrigger_repairs_total").await,
        Some(1.0),
        "no repair during the outage"
    );
    scene.sim.control.recover("aws").await;
    md.delete("llm", &DeleteParams::default())
        .await
        .expect("ModelDeployment deleted");
    ns.delete().await;
    scene.delete().await;
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the local cluster: hack/e2e runs it"]
async fn a_launch_that_never_registers_is_terminated_and_the_replica_lands_elsewhere() {
    if !e2e::enabled("registration timeout") {
        return;
    }
    let _turn = e2e::serial().await;
    let tag = e2e::suffix();
    let (stuck, other, azure) = (
        format!("stuck-{tag}"),
        format!("other-{tag}"),
        format!("regaz-{tag}"),
    );
    let mut stuck_pool = PoolDef::new(&stuck, "aws", "us-east-1a", 5.0);
    stuck_pool.extra = json!({"registrationTimeoutSeconds": 10});
    let scene = Scene::new(vec![
        stuck_pool,
        PoolDef::new(&other, "aws", "us-east-1b", 10.0),
        PoolDef::new(&azure, "azure", "1", 20.0),
    ])
    .await;
    let ec2 = scene.sim.ec2(AWS_REGION).await;
    scene
        .sim
        .control
        .inject(json!({"fault": "NeverRegisters", "provider": "aws",
                       "instanceType": "p5.48xlarge", "zone": "us-east-1a"}))
        .await;
    let operator = scene.operator("lifecycle-registration").await;
    let ns = TestNamespace::new(&scene.client, "register").await;
    let client = &scene.client;
    let md: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    md.create(&PostParams::default(), &model(2))
        .await
        .expect("ModelDeployment created");
    wait_for(
        &format!("an instance launched for {stuck}"),
        DEADLINE,
        || async { (!e2e::live_instances(&ec2, &stuck).await?.is_empty()).then_some(()) },
    )
    .await;
    let launched = Instant::now();
    let want = BTreeMap::from([(other.clone(), 1), (azure.clone(), 1)]);
    wait_for(
        &format!("the stuck instance terminated, llm Ready on {other} and {azure}"),
        DEADLINE,
        || async {
            let none_left = e2e::live_instances(&ec2, &stuck).await?.is_empty();
            (none_left && ready_per_pool(client, &ns.name).await == want).then_some(())
        },
    )
    .await;
    println!(
        "registration timeout: from the stuck launch to the replica Ready elsewhere {:.1} s (registrationTimeoutSeconds 10)",
        launched.elapsed().as_secs_f64()
    );
    assert_eq!(
        backoff_reason(client, &stuck).await.as_deref(),
        Some("RegistrationTimeout"),
        "a failed registration is a failed launch of the offering"
    );
    scene.sim.control.clear_all().await;
    md.delete("llm", &DeleteParams::default())
        .await
        .expect("ModelDeployment deleted");
    ns.delete().await;
    scene.delete().await;
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the local cluster: hack/e2e runs it"]
async fn a_capacity_error_holds_back_every_pool_with_the_offering_only() {
    if !e2e::enabled("offering memory") {
        return;
    }
    let _turn = e2e::serial().await;
    let tag = e2e::suffix();
    let (a, b, sibling) = (
        format!("offa-{tag}"),
        format!("offb-{tag}"),
        format!("offc-{tag}"),
    );
    // a and b: the same offering (p5.48xlarge, us-east-1a, on-demand); the
    // sibling is in us-east-1b.
    let scene = Scene::new(vec![
        PoolDef::new(&a, "aws", "us-east-1a", 5.0),
        PoolDef::new(&b, "aws", "us-east-1a", 6.0),
        PoolDef::new(&sibling, "aws", "us-east-1b", 7.0),
    ])
    .await;
    scene
        .sim
        .control
        .inject(json!({"fault": "InsufficientInstanceCapacity",
                       "instanceType": "p5.48xlarge", "zone": "us-east-1a"}))
        .await;
    let operator = scene.operator("lifecycle-offering").await;
    let ns = TestNamespace::new(&scene.client, "offering").await;
    let client = &scene.client;
    let md: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let mut one: ModelDeployment = model(1);
    one.spec.placement.spread.clear();
    md.create(&PostParams::default(), &one)
        .await
        .expect("ModelDeployment created");
    let want = BTreeMap::from([(sibling.clone(), 1)]);
    wait_for(
        &format!("llm Ready on the sibling offering {sibling}"),
        DEADLINE,
        || async { (ready_per_pool(client, &ns.name).await == want).then_some(()) },
    )
    .await;
    wait_for(
        &format!("{b} carries the offering's backoff"),
        DEADLINE,
        || async {
            let api: Api<GpuNodePool> = Api::all(client.clone());
            let backoff = api.get(&b).await.ok()?.status?.capacity_backoff?;
            (backoff.offering.zone.as_deref() == Some("us-east-1a")).then_some(())
        },
    )
    .await;
    let launches = scene
        .sim
        .control
        .call(reqwest::Method::GET, "/launches", None)
        .await;
    let from = |pool: &str| -> Vec<Value> {
        launches
            .as_array()
            .into_iter()
            .flatten()
            .filter(|l| l["pool"] == pool)
            .cloned()
            .collect()
    };
    println!(
        "offering memory: RunInstances from {a}: {:?}; from {b}: {:?}; from {sibling}: {:?}",
        from(&a)
            .iter()
            .map(|l| l["refused"].clone())
            .collect::<Vec<_>>(),
        from(&b).len(),
        from(&sibling)
            .iter()
            .map(|l| l["refused"].clone())
            .collect::<Vec<_>>(),
    );
    assert!(
        from(&a)
            .iter()
            .any(|l| l["refused"] == "InsufficientInstanceCapacity"),
        "{a} was refused"
    );
    assert!(
        from(&b).is_empty(),
        "{b} asked for the offering in backoff: {:?}",
        from(&b)
    );
    assert!(
        from(&sibling).iter().any(|l| l["refused"].is_null()),
        "the sibling offering launched"
    );
    scene.sim.control.clear_all().await;
    md.delete("llm", &DeleteParams::default())
        .await
        .expect("ModelDeployment deleted");
    ns.delete().await;
    scene.delete().await;
    operator.stop().await;
}
