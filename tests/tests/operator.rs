//! The operator on the local cluster: real API server, scheduler, controller-manager
//! and kwok nodes. Each test has its own namespace and pools, and its own operator.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use outrigger_crds::ModelDeployment;
use outrigger_tests::e2e::{self, Fleet, Operator, PoolSpec, TestNamespace, wait_for};
use outrigger_tests::harness::Control;
use serde_json::json;

const CONVERGE: Duration = Duration::from_secs(60);

fn two_providers(tag: &str) -> (String, String) {
    (format!("aws-{tag}"), format!("azure-{tag}"))
}

/// Two pools, one per provider, in regions of this test's own.
async fn fleet(client: &Client, tag: &str, nodes: u32) -> Fleet {
    let (aws, azure) = two_providers(tag);
    let (aws_region, azure_region) = (format!("us-{tag}"), format!("eu-{tag}"));
    let aws_zone = format!("{aws_region}a");
    Fleet::new(
        client,
        &[
            PoolSpec {
                name: &aws,
                provider: "aws",
                region: &aws_region,
                zone: &aws_zone,
                nodes,
                gpus_per_node: 8,
                price: 98.32,
            },
            PoolSpec {
                name: &azure,
                provider: "azure",
                region: &azure_region,
                zone: "1",
                nodes,
                gpus_per_node: 8,
                price: 98.32,
            },
        ],
    )
    .await
}

fn model_deployment(
    name: &str,
    replicas: i32,
    regions: &[String],
    extra: serde_json::Value,
) -> ModelDeployment {
    let mut spec = json!({
        "replicas": replicas,
        "gpu": {"count": 4},
        "template": {"spec": {"containers": [{"name": "server", "image": "vllm/vllm-openai:v0.6.4"}]}},
        "placement": {
            "regions": regions,
            "spread": [{"by": "provider", "minGroups": 2, "maxShare": 60}]
        },
        "failover": {"unhealthyAfterSeconds": 5, "rebalanceAfterSeconds": 20},
        "service": {"port": 8000}
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            spec.insert(k.clone(), v.clone());
        }
    }
    serde_json::from_value(json!({
        "apiVersion": "outrigger.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .expect("valid ModelDeployment")
}

/// Ready pods of the ModelDeployment, per pool.
async fn ready_per_pool(client: &Client, ns: &str, md: &str) -> BTreeMap<String, u32> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let list = pods
        .list(&ListParams::default().labels(&format!("outrigger.dev/deployment={md}")))
        .await
        .expect("pods listed");
    let mut per_pool = BTreeMap::new();
    for pod in list {
        let ready = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        if ready && pod.metadata.deletion_timestamp.is_none() {
            let pool = pod
                .labels()
                .get("outrigger.dev/pool")
                .cloned()
                .unwrap_or_default();
            *per_pool.entry(pool).or_default() += 1;
        }
    }
    per_pool
}

use kube::ResourceExt;

async fn wait_placed(client: &Client, ns: &str, md: &str, want: &[(&str, u32)]) {
    let want: BTreeMap<String, u32> = want.iter().map(|(p, n)| (p.to_string(), *n)).collect();
    wait_for(&format!("{md} Ready as {want:?}"), CONVERGE, || async {
        (ready_per_pool(client, ns, md).await == want).then_some(())
    })
    .await;
}

async fn condition(
    client: &Client,
    ns: &str,
    md: &str,
    type_: &str,
) -> Option<(String, String, String)> {
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), ns);
    let md = api.get(md).await.ok()?;
    md.status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status, c.reason, c.message))
}

#[tokio::test]
async fn places_over_both_providers_within_the_share_cap() {
    if !e2e::enabled("places_over_both_providers_within_the_share_cap") {
        return;
    }
    let _turn = e2e::serial().await;
    let client = e2e::client().await;
    let tag = format!("place-{}", e2e::suffix());
    let fleet = fleet(&client, &tag, 2).await;
    let ns = TestNamespace::new(&client, "place").await;
    let operator = Operator::start("place", &[]).await;
    operator.wait_leading().await;
    let (aws, azure) = two_providers(&tag);

    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    api.create(
        &PostParams::default(),
        &model_deployment("llama", 5, &fleet.regions(), json!({})),
    )
    .await
    .expect("created");
    e2e::kubectl(&[
        "wait",
        "--for=condition=Ready",
        "md/llama",
        "-n",
        &ns.name,
        "--timeout=60s",
    ]);

    let per_pool = ready_per_pool(&client, &ns.name, "llama").await;
    assert_eq!(per_pool.values().sum::<u32>(), 5, "{per_pool:?}");
    assert_eq!(
        per_pool.len(),
        2,
        "both providers hold replicas: {per_pool:?}"
    );
    for (pool, n) in &per_pool {
        assert!(*n <= 3, "{pool} holds {n} of 5, over 60%");
        assert!(pool == &aws || pool == &azure);
    }
    let status = api.get("llama").await.expect("md").status.expect("status");
    assert_eq!(status.ready_replicas, Some(5));
    assert_eq!(status.unplaced_replicas, Some(0));
    assert_eq!(status.placements.len(), 2);
    let providers = status.providers.expect("providers");
    assert!(
        providers.contains("aws=") && providers.contains("azure="),
        "{providers}"
    );
    let row = e2e::kubectl(&["get", "md", "llama", "-n", &ns.name, "--no-headers"]);
    let columns: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&columns[..3], &["llama", "5", "5"], "{row}");
    assert!(row.contains("True"), "Diversified column: {row}");
    let services: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    assert!(
        services.get_opt("llama").await.expect("get").is_some(),
        "the Service exists"
    );

    operator.stop().await;
    ns.delete().await;
    fleet.delete().await;
}

#[tokio::test]
async fn follows_scaling_rule_and_image_changes() {
    if !e2e::enabled("follows_scaling_rule_and_image_changes") {
        return;
    }
    let _turn = e2e::serial().await;
    let client = e2e::client().await;
    let tag = format!("change-{}", e2e::suffix());
    let fleet = fleet(&client, &tag, 2).await;
    let ns = TestNamespace::new(&client, "change").await;
    let operator = Operator::start("change", &[]).await;
    operator.wait_leading().await;
    let (aws, azure) = two_providers(&tag);
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    api.create(
        &PostParams::default(),
        &model_deployment("m", 4, &fleet.regions(), json!({})),
    )
    .await
    .expect("created");
    wait_placed(&client, &ns.name, "m", &[(&aws, 2), (&azure, 2)]).await;

    let patch = |body: serde_json::Value| {
        let api = api.clone();
        async move {
            api.patch("m", &PatchParams::default(), &Patch::Merge(body))
                .await
                .expect("patched")
        }
    };
    patch(json!({"spec": {"replicas": 6}})).await;
    wait_placed(&client, &ns.name, "m", &[(&aws, 3), (&azure, 3)]).await;
    patch(json!({"spec": {"replicas": 2}})).await;
    wait_placed(&client, &ns.name, "m", &[(&aws, 1), (&azure, 1)]).await;

    // A looser rule lets the cheaper pool take more: make azure cheaper first.
    let pools: Api<outrigger_crds::GpuNodePool> = Api::all(client.clone());
    pools
        .patch(
            &azure,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"pricePerNodeHour": 40.0}})),
        )
        .await
        .expect("price changed");
    patch(json!({"spec": {"replicas": 4, "placement": {"spread": [{"by": "provider", "minGroups": 2, "maxShare": 75}]}}})).await;
    wait_placed(&client, &ns.name, "m", &[(&aws, 1), (&azure, 3)]).await;

    // An image change rolls out without dropping below the budget (at most 1 down).
    patch(json!({"spec": {"template": {"spec": {"containers": [{"name": "server", "image": "vllm/vllm-openai:v0.6.5"}]}}}})).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let lowest = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(u32::MAX));
    wait_for("every pod on the new image and Ready", CONVERGE, || {
        let pods = pods.clone();
        let client = client.clone();
        let ns = ns.name.clone();
        let lowest = lowest.clone();
        async move {
            let ready: u32 = ready_per_pool(&client, &ns, "m").await.values().sum();
            lowest.fetch_min(ready, std::sync::atomic::Ordering::Relaxed);
            let list = pods
                .list(&ListParams::default().labels("outrigger.dev/deployment=m"))
                .await
                .ok()?;
            let all_new = list
                .items
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .all(|p| {
                    p.spec.as_ref().is_some_and(|s| {
                        s.containers[0].image.as_deref() == Some("vllm/vllm-openai:v0.6.5")
                    })
                });
            (all_new && ready == 4).then_some(())
        }
    })
    .await;
    let lowest = lowest.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        lowest >= 3,
        "ready replicas dropped to {lowest} of 4 during the rollout"
    );

    operator.stop().await;
    ns.delete().await;
    fleet.delete().await;
}

#[tokio::test]
async fn refuses_bad_specs_and_explains_unmet_rules() {
    if !e2e::enabled("refuses_bad_specs_and_explains_unmet_rules") {
        return;
    }
    let _turn = e2e::serial().await;
    let client = e2e::client().await;
    let tag = format!("bad-{}", e2e::suffix());
    let fleet = fleet(&client, &tag, 1).await;
    let ns = TestNamespace::new(&client, "bad").await;
    let operator = Operator::start("bad", &[]).await;
    operator.wait_leading().await;
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);

    let mut bad = model_deployment("zero-share", 2, &fleet.regions(), json!({}));
    bad.spec.placement.spread[0].max_share = 0;
    let refused = api
        .create(&PostParams::default(), &bad)
        .await
        .expect_err("maxShare 0 is refused");
    assert!(refused.to_string().contains("maxShare"), "{refused}");

    // Three providers asked, two exist: what can be placed is, and the rule is named.
    let mut unsatisfiable = model_deployment("three", 2, &fleet.regions(), json!({}));
    unsatisfiable.spec.placement.spread[0].min_groups = 3;
    unsatisfiable.spec.placement.spread[0].max_share = 100;
    api.create(&PostParams::default(), &unsatisfiable)
        .await
        .expect("created");
    let (status, reason, message) = wait_for("Diversified=False", CONVERGE, || async {
        condition(&client, &ns.name, "three", "Diversified")
            .await
            .filter(|c| c.0 == "False")
    })
    .await;
    assert_eq!((status.as_str(), reason.as_str()), ("False", "RulesNotMet"));
    assert!(
        message.contains("spread by provider") && message.contains("needs 3 providers"),
        "{message}"
    );
    wait_for("both replicas Ready anyway", CONVERGE, || async {
        (ready_per_pool(&client, &ns.name, "three")
            .await
            .values()
            .sum::<u32>()
            == 2)
            .then_some(())
    })
    .await;

    operator.stop().await;
    ns.delete().await;
    fleet.delete().await;
}

/// A region pair only the failover test uses, so its outage touches no other test.
const FAILOVER_AWS_REGION: &str = "us-east-2";
const FAILOVER_AWS_ZONE: &str = "us-east-2a";
const FAILOVER_AZURE_REGION: &str = "northeurope";
const SUBSCRIPTION: &str = "00000000-0000-0000-0000-0000000fa110";

/// Two pools whose nodes are machines of the simulated clouds: EC2 instances
/// launched through the EC2 endpoint and a scale set's VMs, which the simulator's
/// registrar turns into kwok Nodes.
struct SimFleet {
    client: Client,
    control: Control,
    ec2: aws_sdk_ec2::Client,
    aws: String,
    azure: String,
    instances: Vec<String>,
}

impl SimFleet {
    async fn new(client: &Client, tag: &str, nodes: i32) -> SimFleet {
        let sim = e2e::SimClouds::from_env();
        let fleet = SimFleet {
            client: client.clone(),
            ec2: sim.ec2(FAILOVER_AWS_REGION).await,
            control: sim.control,
            aws: format!("aws-{tag}"),
            azure: format!("azure-{tag}"),
            instances: Vec::new(),
        };
        let pools: Api<outrigger_crds::GpuNodePool> = Api::all(client.clone());
        for (name, provider, region, zone, instance_type) in [
            (
                &fleet.aws,
                "aws",
                FAILOVER_AWS_REGION,
                FAILOVER_AWS_ZONE,
                "p5.48xlarge",
            ),
            (
                &fleet.azure,
                "azure",
                FAILOVER_AZURE_REGION,
                "1",
                "Standard_ND96isr_H100_v5",
            ),
        ] {
            let pool = serde_json::from_value(json!({
                "apiVersion": "outrigger.dev/v1alpha1", "kind": "GpuNodePool",
                "metadata": {"name": name},
                "spec": {"provider": provider, "region": region, "zone": zone, "instanceType": instance_type,
                    "gpu": {"type": "H100", "count": 8}, "pricePerNodeHour": 98.32, "nodes": {"min": 0, "max": nodes}}
            }))
            .expect("pool");
            pools
                .create(&PostParams::default(), &pool)
                .await
                .expect("pool created");
        }
        fleet.control.create_scale_set(json!({
            "subscriptionId": SUBSCRIPTION, "resourceGroup": "e2e", "name": format!("fo{tag}").replace('-', ""),
            "location": FAILOVER_AZURE_REGION, "sku": "Standard_ND96isr_H100_v5", "zones": ["1"],
            "capacity": nodes, "pool": fleet.azure,
        }))
        .await;
        let launched = fleet
            .ec2
            .run_instances()
            .image_id("ami-12345678")
            .instance_type(aws_sdk_ec2::types::InstanceType::from("p5.48xlarge"))
            .placement(
                aws_sdk_ec2::types::Placement::builder()
                    .availability_zone(FAILOVER_AWS_ZONE)
                    .build(),
            )
            .min_count(nodes)
            .max_count(nodes)
            .tag_specifications(
                aws_sdk_ec2::types::TagSpecification::builder()
                    .resource_type(aws_sdk_ec2::types::ResourceType::Instance)
                    .tags(
                        aws_sdk_ec2::types::Tag::builder()
                            .key("outrigger.dev/pool")
                            .value(&fleet.aws)
                            .build(),
                    )
                    .build(),
            )
            .send()
            .await
            .expect("RunInstances");
        let mut fleet = fleet;
        fleet.instances = launched
            .instances()
            .iter()
            .filter_map(|i| i.instance_id().map(str::to_string))
            .collect();
        let nodes_api: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
        for pool in [fleet.aws.clone(), fleet.azure.clone()] {
            wait_for(
                &format!("{nodes} Ready nodes of {pool}"),
                CONVERGE,
                || async {
                    let list = nodes_api
                        .list(&ListParams::default().labels(&format!("outrigger.dev/pool={pool}")))
                        .await
                        .ok()?;
                    (list.items.iter().filter(|n| e2e::node_ready(n)).count()
                        == usize::try_from(nodes).unwrap_or(0))
                    .then_some(())
                },
            )
            .await;
        }
        fleet
    }

    async fn delete(self) {
        let _ = self
            .control
            .call(reqwest::Method::DELETE, "/outage", None)
            .await;
        if !self.instances.is_empty() {
            let _ = self
                .ec2
                .terminate_instances()
                .set_instance_ids(Some(self.instances.clone()))
                .send()
                .await;
        }
        self.control
            .delete_scale_set(
                SUBSCRIPTION,
                "e2e",
                &format!("fo{}", self.aws.trim_start_matches("aws-")).replace('-', ""),
            )
            .await;
        let pools: Api<outrigger_crds::GpuNodePool> = Api::all(self.client.clone());
        for name in [&self.aws, &self.azure] {
            let _ = pools.delete(name, &DeleteParams::background()).await;
        }
    }
}

#[tokio::test]
async fn fails_over_in_seconds_and_returns_after_rebalance() {
    if !e2e::enabled("fails_over_in_seconds_and_returns_after_rebalance") {
        return;
    }
    let _turn = e2e::serial().await;
    let client = e2e::client().await;
    let tag = format!("fo-{}", e2e::suffix());
    let fleet = SimFleet::new(&client, &tag, 2).await;
    let ns = TestNamespace::new(&client, "failover").await;
    let operator = Operator::start("failover", &[]).await;
    operator.wait_leading().await;
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let regions = [
        FAILOVER_AWS_REGION.to_string(),
        FAILOVER_AZURE_REGION.to_string(),
    ];
    let md = model_deployment("llama", 4, &regions, json!({}));
    api.create(&PostParams::default(), &md)
        .await
        .expect("created");
    let (aws, azure) = (fleet.aws.clone(), fleet.azure.clone());
    wait_placed(&client, &ns.name, "llama", &[(&aws, 2), (&azure, 2)]).await;

    // An AWS-wide outage, from the simulator's control endpoint.
    let lost = Instant::now();
    fleet
        .control
        .outage(json!({"provider": "aws", "region": FAILOVER_AWS_REGION}))
        .await;
    wait_placed(&client, &ns.name, "llama", &[(&azure, 4)]).await;
    let failover = lost.elapsed();
    println!(
        "failover: {:.1} s from the AWS outage to 4 replicas Ready on Azure (unhealthyAfterSeconds: 5)",
        failover.as_secs_f64()
    );
    let (_, reason, message) = condition(&client, &ns.name, "llama", "Diversified")
        .await
        .expect("condition");
    assert_eq!(reason, "RulesNotMet", "{message}");

    let back = Instant::now();
    fleet.control.recover("aws").await;
    wait_for("the AWS pool Ready again", CONVERGE, || async {
        let pools: Api<outrigger_crds::GpuNodePool> = Api::all(client.clone());
        let pool = pools.get(&aws).await.ok()?;
        pool.status?
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready" && c.status == "True")
            .map(|_| ())
    })
    .await;
    wait_placed(&client, &ns.name, "llama", &[(&aws, 2), (&azure, 2)]).await;
    let returned = back.elapsed();
    println!(
        "rebalance: replicas back on AWS {:.1} s after its nodes recovered (rebalanceAfterSeconds: 20)",
        returned.as_secs_f64()
    );
    // The condition times have one-second resolution.
    assert!(
        returned >= Duration::from_secs(19),
        "replicas returned after {returned:?}, before rebalanceAfterSeconds"
    );
    let failovers = operator.metric("outrigger_failover_seconds_count").await;
    assert_eq!(failovers, Some(1.0));

    operator.stop().await;
    ns.delete().await;
    fleet.delete().await;
}

#[tokio::test]
async fn deleting_a_model_deployment_leaves_nothing_and_steady_state_writes_nothing() {
    if !e2e::enabled("deleting_a_model_deployment_leaves_nothing_and_steady_state_writes_nothing") {
        return;
    }
    let _turn = e2e::serial().await;
    let client = e2e::client().await;
    let tag = format!("del-{}", e2e::suffix());
    let fleet = fleet(&client, &tag, 1).await;
    let ns = TestNamespace::new(&client, "delete").await;
    let operator = Operator::start("steady", &[]).await;
    operator.wait_leading().await;
    let (aws, azure) = two_providers(&tag);
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    api.create(
        &PostParams::default(),
        &model_deployment("m", 2, &fleet.regions(), json!({})),
    )
    .await
    .expect("created");
    wait_placed(&client, &ns.name, "m", &[(&aws, 1), (&azure, 1)]).await;
    wait_for("status caught up", CONVERGE, || async {
        let md = api.get("m").await.ok()?;
        (md.status?.ready_replicas == Some(2)).then_some(())
    })
    .await;

    // Converged: for 30 s nothing changes, so the operator writes nothing.
    let from = e2e::audit_log_len();
    let quiet = Instant::now();
    let agent = "outrigger/";
    while quiet.elapsed() < Duration::from_secs(30) {
        let writes = e2e::writes_since(from, agent);
        assert!(writes.is_empty(), "writes in steady state: {writes:?}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let renewals = e2e::audit_since(from, agent).len();
    println!(
        "steady state: 0 API writes by the operator in 30 s after convergence ({renewals} leader Lease renewals)"
    );

    api.delete("m", &DeleteParams::foreground())
        .await
        .expect("deleted");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    wait_for("every child gone", CONVERGE, || async {
        let lp = ListParams::default().labels("outrigger.dev/deployment=m");
        let left = deployments.list(&lp).await.ok()?.items.len()
            + services.list(&lp).await.ok()?.items.len()
            + budgets.list(&lp).await.ok()?.items.len()
            + pods.list(&lp).await.ok()?.items.len()
            + usize::from(api.get_opt("m").await.ok()?.is_some());
        (left == 0).then_some(())
    })
    .await;

    operator.stop().await;
    ns.delete().await;
    fleet.delete().await;
}
