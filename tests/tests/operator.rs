//! The operator on the local cluster: real API server, scheduler, controller-manager
//! and kwok nodes. Each test has its own namespace and pools, and its own operator.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use outrigger_crds::{ModelDeployment, PeerCluster};
use outrigger_tests::e2e::{self, Fleet, Operator, PoolSpec, TestNamespace, wait_for};
use outrigger_tests::sim_fleet::{FAILOVER_AWS_REGION, FAILOVER_AZURE_REGION, SimFleet};
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
#[ignore = "needs the local cluster: hack/e2e runs it"]
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
#[ignore = "needs the local cluster: hack/e2e runs it"]
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
#[ignore = "needs the local cluster: hack/e2e runs it"]
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

    // This operator runs without --cluster-name: a PeerCluster says the name is
    // required, and no link is made.
    let peers: Api<PeerCluster> = Api::all(client.clone());
    let peer = format!("unnamed-{tag}");
    peers
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "outrigger.dev/v1alpha1", "kind": "PeerCluster",
                "metadata": {"name": peer},
                "spec": {"kubeconfigSecretRef": {"namespace": ns.name, "name": "nowhere"}},
            }))
            .expect("a PeerCluster"),
        )
        .await
        .expect("created");
    let message = wait_for("Mutual=False ClusterNameMissing", CONVERGE, || async {
        peers
            .get(&peer)
            .await
            .ok()?
            .status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Mutual" && c.reason == "ClusterNameMissing")
            .map(|c| c.message)
    })
    .await;
    assert!(message.contains("clusterName"), "{message}");
    peers
        .delete(&peer, &DeleteParams::default())
        .await
        .expect("deleted");

    operator.stop().await;
    ns.delete().await;
    fleet.delete().await;
}

#[tokio::test]
#[ignore = "needs the local cluster: hack/e2e runs it"]
async fn reports_what_the_api_server_accepts_but_cannot_work() {
    if !e2e::enabled("reports_what_the_api_server_accepts_but_cannot_work") {
        return;
    }
    let _turn = e2e::serial().await;
    let client = e2e::client().await;
    let tag = format!("in-{}", e2e::suffix());
    let fleet = fleet(&client, &tag, 1).await;
    let ns = TestNamespace::new(&client, "input").await;
    let operator = Operator::start("input", &[]).await;
    operator.wait_leading().await;
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let regions = fleet.regions();

    // What could never apply is refused at admission, naming the field and the fix.
    let long = "m".repeat(70);
    let refused = api
        .create(
            &PostParams::default(),
            &model_deployment(&long, 1, &regions, json!({})),
        )
        .await
        .expect_err("a 70-character name is refused");
    assert!(
        refused.to_string().contains("at most 63 characters"),
        "{refused}"
    );
    let refused = api
        .create(
            &PostParams::default(),
            &model_deployment(
                "empty",
                1,
                &regions,
                json!({"template": {"spec": {"containers": []}}}),
            ),
        )
        .await
        .expect_err("no container is refused");
    assert!(
        refused.to_string().contains("template.spec.containers"),
        "{refused}"
    );

    // A child the API server refuses: Ready=False ApplyFailed with its message, and
    // a Warning Event.
    api.create(
        &PostParams::default(),
        &model_deployment(
            "badname",
            1,
            &regions,
            json!({"template": {"spec": {"containers": [{"name": "Not_A_DNS_Label", "image": "server:1"}]}}}),
        ),
    )
    .await
    .expect("the schema cannot tell a bad container name");
    let (_, reason, message) = wait_for("Ready=False ApplyFailed", CONVERGE, || async {
        condition(&client, &ns.name, "badname", "Ready")
            .await
            .filter(|c| c.1 == "ApplyFailed")
    })
    .await;
    assert!(
        message.contains("refused Deployment") && message.contains("containers[0].name"),
        "{reason}: {message}"
    );
    wait_for("the ApplyFailed Event", CONVERGE, || async {
        let events = e2e::kubectl(&[
            "get",
            "events",
            "-n",
            &ns.name,
            "--field-selector",
            "reason=ApplyFailed",
            "-o",
            "name",
        ]);
        (!events.trim().is_empty()).then_some(())
    })
    .await;

    // No pool has the GPU asked for: the condition says why, as `outrigger plan` does.
    api.create(
        &PostParams::default(),
        &model_deployment(
            "h200",
            1,
            &regions,
            json!({"gpu": {"count": 4, "types": ["H200"]}}),
        ),
    )
    .await
    .expect("created");
    let (_, _, message) = wait_for("Ready=False ReplicasUnplaced", CONVERGE, || async {
        condition(&client, &ns.name, "h200", "Ready")
            .await
            .filter(|c| c.1 == "ReplicasUnplaced")
    })
    .await;
    assert!(
        message.contains("GPU type H100 is not in gpu.types"),
        "{message}"
    );

    // A deleted ModelDeployment's metric series go with it.
    let (aws, azure) = two_providers(&tag);
    api.create(
        &PostParams::default(),
        &model_deployment("gone", 2, &regions, json!({})),
    )
    .await
    .expect("created");
    wait_placed(&client, &ns.name, "gone", &[(&aws, 1), (&azure, 1)]).await;
    let series = format!("deployment=\"{}/gone\"", ns.name);
    let exported = || async {
        reqwest::get(&operator.metrics_url)
            .await
            .ok()?
            .text()
            .await
            .ok()
            .map(|t| {
                t.lines()
                    .any(|l| l.starts_with("outrigger_replicas{") && l.contains(&series))
            })
    };
    wait_for("the replicas series of gone", CONVERGE, || async {
        exported().await.filter(|on| *on)
    })
    .await;
    api.delete("gone", &DeleteParams::default())
        .await
        .expect("deleted");
    wait_for("the replicas series of gone removed", CONVERGE, || async {
        exported().await.filter(|on| !*on)
    })
    .await;

    operator.stop().await;
    ns.delete().await;
    fleet.delete().await;
}

/// Less than the node lifecycle controller's grace (50 s) plus `unhealthyAfterSeconds`:
/// only the operator's own clock of when it saw the nodes lost can make this deadline,
/// not a timestamp the controller-manager writes later.
const OWN_CLOCK: Duration = Duration::from_secs(30);

#[tokio::test]
#[ignore = "needs the local cluster: hack/e2e runs it"]
async fn fails_over_when_lost_nodes_report_no_condition_times() {
    if !e2e::enabled("fails_over_when_lost_nodes_report_no_condition_times") {
        return;
    }
    let _turn = e2e::serial().await;
    let client = e2e::client().await;
    let tag = format!("nt-{}", e2e::suffix());
    let fleet = fleet(&client, &tag, 2).await;
    let ns = TestNamespace::new(&client, "notimes").await;
    let operator = Operator::start("notimes", &[]).await;
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

    let lost = Instant::now();
    fleet.outage_without_times(&aws).await;
    let want: BTreeMap<String, u32> = BTreeMap::from([(azure.clone(), 4)]);
    wait_for(
        "every replica Ready on azure, lost nodes reporting no times",
        OWN_CLOCK,
        || async { (ready_per_pool(&client, &ns.name, "m").await == want).then_some(()) },
    )
    .await;
    println!(
        "failover without condition times: {:.1} s (unhealthyAfterSeconds: 5)",
        lost.elapsed().as_secs_f64()
    );

    operator.stop().await;
    ns.delete().await;
    fleet.delete().await;
}

#[tokio::test]
#[ignore = "needs the local cluster: hack/e2e runs it"]
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
    let pools: Api<outrigger_crds::GpuNodePool> = Api::all(client.clone());
    let typed = |pool: outrigger_crds::GpuNodePool| {
        let status = pool.status.unwrap_or_default();
        (status.lost_since.is_some(), status.recovered_at.is_some())
    };
    assert_eq!(
        typed(pools.get(&aws).await.expect("pool")),
        (true, false),
        "the lost pool publishes status.lostSince"
    );

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
    assert_eq!(
        typed(pools.get(&aws).await.expect("pool")),
        (false, true),
        "the recovered pool publishes status.recoveredAt"
    );
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
#[ignore = "needs the local cluster: hack/e2e runs it"]
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

#[tokio::test]
#[ignore = "needs the local cluster: hack/e2e runs it"]
async fn autoscalers_drive_it_through_the_scale_subresource() {
    if !e2e::enabled("autoscalers_drive_it_through_the_scale_subresource") {
        return;
    }
    let _turn = e2e::serial().await;
    let client = e2e::client().await;
    let tag = format!("scale-{}", e2e::suffix());
    let fleet = fleet(&client, &tag, 2).await;
    let ns = TestNamespace::new(&client, "scale").await;
    let operator = Operator::start("scale", &[]).await;
    operator.wait_leading().await;
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    api.create(
        &PostParams::default(),
        &model_deployment("llama", 2, &fleet.regions(), json!({})),
    )
    .await
    .expect("created");
    let ready = |n: u32| {
        let (client, ns) = (client.clone(), ns.name.clone());
        async move {
            wait_for(&format!("{n} replicas Ready"), CONVERGE, || async {
                let per_pool = ready_per_pool(&client, &ns, "llama").await;
                (per_pool.values().sum::<u32>() == n).then_some(per_pool)
            })
            .await
        }
    };
    ready(2).await;

    // `kubectl scale` goes through the scale subresource; the plan follows within
    // the rules (60% of 5 is at most 3 per provider).
    e2e::kubectl(&["scale", "md/llama", "--replicas=5", "-n", &ns.name]);
    let per_pool = ready(5).await;
    assert_eq!(per_pool.len(), 2, "both providers: {per_pool:?}");
    assert!(per_pool.values().all(|n| *n <= 3), "{per_pool:?}");
    let scale = wait_for("the scale subresource's selector", CONVERGE, || async {
        let scale = api.get_scale("llama").await.ok()?;
        let status = scale.status.clone()?;
        (status.replicas == 5 && status.selector.is_some()).then_some(scale)
    })
    .await;
    assert_eq!(scale.spec.and_then(|s| s.replicas), Some(5));
    assert_eq!(
        scale.status.and_then(|s| s.selector).as_deref(),
        Some("outrigger.dev/deployment=llama")
    );

    // A real HorizontalPodAutoscaler: the controller-manager's HPA controller reads
    // the target's scale and selector (there is no metrics server, so it cannot
    // compute a utilization, which is a different condition).
    e2e::kubectl(&[
        "autoscale",
        "md/llama",
        "--min=2",
        "--max=6",
        "--cpu-percent=70",
        "-n",
        &ns.name,
    ]);
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), &ns.name);
    let status = wait_for("the HPA to read the scale", CONVERGE, || async {
        let status = hpas.get("llama").await.ok()?.status?;
        let conditions = status.conditions.clone().unwrap_or_default();
        conditions
            .iter()
            .any(|c| c.type_ == "AbleToScale" && c.status == "True")
            .then_some(status)
    })
    .await;
    let conditions = status.conditions.clone().unwrap_or_default();
    let able = conditions
        .iter()
        .find(|c| c.type_ == "AbleToScale")
        .expect("AbleToScale");
    assert_eq!(
        able.reason.as_deref(),
        Some("SucceededGetScale"),
        "{able:?}"
    );
    assert_eq!(status.current_replicas, Some(5), "{status:?}");
    assert!(
        conditions.iter().all(|c| {
            !matches!(
                c.reason.as_deref(),
                Some("InvalidSelector" | "FailedGetScale" | "SelectorRequired")
            )
        }),
        "the HPA resolves the selector: {conditions:?}"
    );
    println!(
        "HPA on md/llama: {}",
        conditions
            .iter()
            .map(|c| format!(
                "{}={} {}",
                c.type_,
                c.status,
                c.reason.as_deref().unwrap_or_default()
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );

    operator.stop().await;
    ns.delete().await;
    fleet.delete().await;
}
