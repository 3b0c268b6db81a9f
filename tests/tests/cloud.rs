//! End-to-end: the operator scales AWS and Azure pools in the cluster's simulated
//! clouds (whose registrar turns instances into kwok Nodes): from zero to Running
//! replicas, around an AWS capacity error and an Azure quota error, back to
//! `nodes.min`, through ten operator kills, and releasing a deleted pool's instances;
//! and the same course with an AKS agent pool (grown by `count`, shrunk by
//! `deleteMachines`) in place of the scale set.
//! Needs the local cluster (`hack/e2e --test cloud`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use aws_sdk_ec2::types::{InstanceType, RequestLaunchTemplateData};
use k8s_openapi::api::core::v1::Node;
use kube::Client;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use outrigger_crds::{GpuNodePool, GpuNodePoolStatus, ModelDeployment};
use outrigger_tests::e2e::{self, Operator, SimClouds, TestNamespace, wait_for};
use serde_json::json;

const SUB: &str = "00000000-0000-0000-0000-000000000005";
const AWS_REGION: &str = "us-east-1";
const AZURE_REGION: &str = "eastus";
const TEMPLATE: &str = "outrigger-e2e-h100";
const DEADLINE: Duration = Duration::from_secs(90);

/// What holds the Azure pool's nodes.
#[derive(Clone, Copy, PartialEq)]
enum AzureKind {
    ScaleSet,
    /// An AKS agent pool `h100` of a managed cluster of the run's own.
    AgentPool,
}

/// An AWS and an Azure pool of 8-GPU H100 nodes, empty, up to 4 nodes each; AWS
/// is the cheaper.
struct Pools {
    aws: String,
    azure: String,
}

impl Pools {
    async fn create(
        client: &Client,
        sim: &SimClouds,
        ec2: &aws_sdk_ec2::Client,
        kind: AzureKind,
    ) -> Pools {
        let tag = e2e::suffix();
        let pools = Pools {
            aws: format!("aws-{tag}"),
            azure: match kind {
                AzureKind::ScaleSet => format!("azure-{tag}"),
                AzureKind::AgentPool => format!("aks-{tag}"),
            },
        };
        // The launch template is shared by every run against this cluster.
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
        let azure_scaling = match kind {
            AzureKind::ScaleSet => {
                sim.control
                    .create_scale_set(json!({
                        "subscriptionId": SUB, "resourceGroup": "e2e", "name": pools.azure,
                        "location": AZURE_REGION, "sku": "Standard_ND96isr_H100_v5", "zones": ["1"],
                        "capacity": 0, "pool": pools.azure,
                    }))
                    .await;
                json!({"subscriptionId": SUB, "resourceGroup": "e2e", "scaleSetName": pools.azure})
            }
            AzureKind::AgentPool => {
                sim.control
                    .create_agent_pool(json!({
                        "subscriptionId": SUB, "resourceGroup": "e2e", "cluster": pools.azure,
                        "name": "h100", "location": AZURE_REGION,
                        "vmSize": "Standard_ND96isr_H100_v5", "zones": ["1"], "count": 0,
                        "pool": pools.azure,
                    }))
                    .await;
                json!({"agentPool": {"subscriptionId": SUB, "resourceGroup": "e2e",
                                     "cluster": pools.azure, "name": "h100"}})
            }
        };
        let api: Api<GpuNodePool> = Api::all(client.clone());
        for spec in [
            json!({
                "provider": "aws", "region": AWS_REGION, "zone": "us-east-1a",
                "instanceType": "p5.48xlarge", "gpu": {"type": "H100", "count": 8},
                "pricePerNodeHour": 10.0, "nodes": {"min": 0, "max": 4},
                "scaling": {"aws": {"launchTemplate": {"name": TEMPLATE, "version": "$Latest"}}}
            }),
            json!({
                "provider": "azure", "region": AZURE_REGION, "zone": "1",
                "instanceType": "Standard_ND96isr_H100_v5", "gpu": {"type": "H100", "count": 8},
                "pricePerNodeHour": 20.0, "nodes": {"min": 0, "max": 4},
                "scaling": {"azure": azure_scaling}
            }),
        ] {
            let name = if spec["provider"] == "aws" {
                &pools.aws
            } else {
                &pools.azure
            };
            let pool: GpuNodePool = serde_json::from_value(json!({
                "apiVersion": "outrigger.dev/v1alpha1", "kind": "GpuNodePool",
                "metadata": {"name": name}, "spec": spec
            }))
            .expect("pool");
            api.create(&PostParams::default(), &pool)
                .await
                .expect("pool created");
        }
        pools
    }

    fn names(&self) -> [&str; 2] {
        [&self.aws, &self.azure]
    }
}

/// The operator with the simulators' endpoints, a 5 s scale-down cool-down and a
/// 10 s first capacity backoff.
async fn operator(sim: &SimClouds, identity: &str) -> Operator {
    Operator::start(
        identity,
        &[
            "--leader-elect=false",
            "--aws-endpoint-url",
            &sim.ec2_url,
            "--azure-endpoint-url",
            &sim.azure_url,
            "--azure-ca-file",
            &sim.azure_ca_file,
            "--azure-token",
            "e2e",
            "--cluster-name",
            "e2e",
            "--scale-down-after-seconds",
            "5",
            "--capacity-backoff-seconds",
            "10",
        ],
    )
    .await
}

fn model(replicas: i32) -> ModelDeployment {
    serde_json::from_value(json!({
        "apiVersion": "outrigger.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "llm"},
        "spec": {
            "replicas": replicas, "gpu": {"count": 8, "types": ["H100"]},
            "template": {"spec": {"containers": [{"name": "server", "image": "vllm/vllm-openai:v0.6.4"}]}},
            "placement": {"regions": [AWS_REGION, AZURE_REGION],
                          "spread": [{"by": "provider", "minGroups": 2}]}
        }
    }))
    .expect("model")
}

async fn set_replicas(api: &Api<ModelDeployment>, replicas: i32) {
    api.patch(
        "llm",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": replicas}})),
    )
    .await
    .expect("replicas patched");
}

/// Ready replicas per pool, from the ModelDeployment's status.
async fn ready_by_pool(api: &Api<ModelDeployment>) -> Option<(i32, BTreeMap<String, i32>)> {
    let status = api.get("llm").await.ok()?.status?;
    let placed = status
        .placements
        .iter()
        .map(|p| (p.pool.clone(), p.ready_replicas.unwrap_or(0)))
        .collect();
    Some((status.ready_replicas.unwrap_or(0), placed))
}

async fn pool_status(api: &Api<GpuNodePool>, name: &str) -> Option<GpuNodePoolStatus> {
    api.get(name).await.ok()?.status
}

async fn capacity_available(api: &Api<GpuNodePool>, name: &str) -> Option<String> {
    pool_status(api, name)
        .await?
        .conditions
        .into_iter()
        .find(|c| c.type_ == "CapacityAvailable")
        .map(|c| c.status)
}

/// The simulator's scale set of a pool (tagged with its name): its resource group,
/// name and VMs. An agent pool's is in the node resource group.
async fn scale_set_of(sim: &SimClouds, pool: &str) -> Option<(String, String, usize)> {
    let state = sim.control.state().await;
    state["azure"]["scaleSets"]
        .as_array()?
        .iter()
        .find(|s| s["tags"]["outrigger.dev/pool"] == pool)
        .map(|s| {
            let text = |key: &str| s[key].as_str().unwrap_or_default().to_string();
            let vms = s["vms"].as_array().map_or(0, Vec::len);
            (text("resourceGroup"), text("name"), vms)
        })
}

/// VMs of the pool's scale set in the simulator.
async fn live_vms(sim: &SimClouds, pool: &str) -> Option<usize> {
    scale_set_of(sim, pool).await.map(|(_, _, vms)| vms)
}

/// Nodes of a pool (the default selector `outrigger.dev/pool=<name>`).
async fn nodes_of(client: &Client, pool: &str) -> Option<usize> {
    let nodes: Api<Node> = Api::all(client.clone());
    let list = nodes
        .list(&ListParams::default().labels(&format!("outrigger.dev/pool={pool}")))
        .await
        .ok()?;
    Some(list.items.len())
}

/// The cloud's instances, the pool's Nodes and `status.cloudInstances` all equal `n`.
async fn settled_at(
    client: &Client,
    sim: &SimClouds,
    ec2: &aws_sdk_ec2::Client,
    pools: &Pools,
    aws: usize,
    azure: usize,
) -> bool {
    let pool_api: Api<GpuNodePool> = Api::all(client.clone());
    let cloud = (
        e2e::live_instances(ec2, &pools.aws).await.map(|v| v.len()),
        live_vms(sim, &pools.azure).await,
    );
    let nodes = (
        nodes_of(client, &pools.aws).await,
        nodes_of(client, &pools.azure).await,
    );
    let status = (
        pool_status(&pool_api, &pools.aws)
            .await
            .and_then(|s| s.cloud_instances),
        pool_status(&pool_api, &pools.azure)
            .await
            .and_then(|s| s.cloud_instances),
    );
    let (a, z) = (Some(aws), Some(azure));
    cloud == (a, z) && nodes == (a, z) && status == (a.map(|n| n as u32), z.map(|n| n as u32))
}

async fn delete_pools(client: &Client, sim: &SimClouds, ec2: &aws_sdk_ec2::Client, pools: &Pools) {
    let pool_api: Api<GpuNodePool> = Api::all(client.clone());
    for name in pools.names() {
        pool_api
            .delete(name, &DeleteParams::default())
            .await
            .expect("pool deleted");
    }
    wait_for(
        "the pools gone, their instances released",
        DEADLINE,
        || async {
            for name in pools.names() {
                if pool_api.get_opt(name).await.ok()?.is_some() {
                    return None;
                }
            }
            let aws = e2e::live_instances(ec2, &pools.aws).await?;
            let vms = live_vms(sim, &pools.azure).await?;
            (aws.is_empty() && vms == 0).then_some(())
        },
    )
    .await;
    if let Some((rg, name, _)) = scale_set_of(sim, &pools.azure).await {
        sim.control.delete_scale_set(SUB, &rg, &name).await;
    }
}

/// The cluster's client and simulators, cleared of faults, and a fresh pair of pools.
struct Scene {
    client: Client,
    sim: SimClouds,
    ec2: aws_sdk_ec2::Client,
    pools: Pools,
}

impl Scene {
    async fn new(kind: AzureKind) -> Scene {
        let client = e2e::client().await;
        let sim = SimClouds::from_env();
        let ec2 = sim.ec2(AWS_REGION).await;
        sim.control.clear_all().await;
        let pools = Pools::create(&client, &sim, &ec2, kind).await;
        Scene {
            client,
            sim,
            ec2,
            pools,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the local cluster: hack/e2e runs it"]
async fn pools_scale_from_zero_route_around_capacity_errors_and_shrink_back() {
    if !e2e::enabled("cloud scaling") {
        return;
    }
    let _turn = e2e::serial().await;
    let Scene {
        client,
        sim,
        ec2,
        pools,
    } = Scene::new(AzureKind::ScaleSet).await;
    let pool_api: Api<GpuNodePool> = Api::all(client.clone());
    let operator = operator(&sim, "cloud-e2e").await;
    println!("operator log: {}", operator.log.display());

    // From empty pools: both clouds scale up, one replica on each.
    let ns = TestNamespace::new(&client, "cloud").await;
    let md_api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let started = Instant::now();
    md_api
        .create(&PostParams::default(), &model(2))
        .await
        .expect("ModelDeployment created");
    wait_for("2 replicas Ready, one per cloud", DEADLINE, || async {
        let (ready, placed) = ready_by_pool(&md_api).await?;
        (ready == 2 && placed.get(&pools.aws) == Some(&1) && placed.get(&pools.azure) == Some(&1))
            .then_some(())
    })
    .await;
    println!(
        "scale-up from 0 on both clouds: {:.1} s to 2 replicas Ready",
        started.elapsed().as_secs_f64()
    );
    assert!(settled_at(&client, &sim, &ec2, &pools, 1, 1).await);

    // AWS has no H100s: the third replica, planned on the cheaper AWS, runs on Azure.
    sim.control
        .inject(
            json!({"fault": "InsufficientInstanceCapacity", "instanceType": "p5.48xlarge",
                       "region": AWS_REGION}),
        )
        .await;
    set_replicas(&md_api, 3).await;
    wait_for("AWS CapacityAvailable=False", DEADLINE, || async {
        (capacity_available(&pool_api, &pools.aws).await? == "False").then_some(())
    })
    .await;
    let error_seen = Instant::now();
    wait_for("3 replicas Ready, 2 on Azure", DEADLINE, || async {
        let (ready, placed) = ready_by_pool(&md_api).await?;
        (ready == 3 && placed.get(&pools.azure) == Some(&2)).then_some(())
    })
    .await;
    println!(
        "InsufficientInstanceCapacity on AWS to the replacement Ready on Azure: {:.1} s (2 s node boot)",
        error_seen.elapsed().as_secs_f64()
    );
    let aws_status = pool_status(&pool_api, &pools.aws).await.expect("status");
    let condition = aws_status
        .conditions
        .iter()
        .find(|c| c.type_ == "CapacityAvailable")
        .expect("CapacityAvailable");
    assert_eq!(condition.reason, "InsufficientCapacity");
    assert!(
        condition.message.contains("does not grow until"),
        "{}",
        condition.message
    );
    // What placement reads is the typed record, not the words.
    let backoff = aws_status.capacity_backoff.expect("status.capacityBackoff");
    assert_eq!(
        (backoff.reason.as_str(), backoff.code.as_str()),
        ("InsufficientCapacity", "InsufficientInstanceCapacity")
    );
    assert_eq!(backoff.offering.instance_type, "p5.48xlarge");
    assert!(backoff.seconds > 0, "{backoff:?}");
    sim.control.clear_all().await;

    // The other way: Azure, now the cheaper, refuses more cores (quota); the
    // replicas it cannot take run on AWS once its backoff has passed.
    wait_for("AWS backoff over", DEADLINE, || async {
        (capacity_available(&pool_api, &pools.aws).await? == "True").then_some(())
    })
    .await;
    sim.control
        .inject(json!({"fault": "OperationNotAllowed", "region": AZURE_REGION}))
        .await;
    pool_api
        .patch(
            &pools.azure,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"pricePerNodeHour": 5.0}})),
        )
        .await
        .expect("Azure price patched");
    set_replicas(&md_api, 4).await;
    wait_for("Azure CapacityAvailable=False", DEADLINE, || async {
        (capacity_available(&pool_api, &pools.azure).await? == "False").then_some(())
    })
    .await;
    let error_seen = Instant::now();
    wait_for("4 replicas Ready, 2 on AWS", DEADLINE, || async {
        let (ready, placed) = ready_by_pool(&md_api).await?;
        (ready == 4 && placed.get(&pools.aws) == Some(&2) && placed.get(&pools.azure) == Some(&2))
            .then_some(())
    })
    .await;
    println!(
        "OperationNotAllowed (quota) on Azure to 4 replicas Ready: {:.1} s",
        error_seen.elapsed().as_secs_f64()
    );
    sim.control.clear_all().await;

    // Replicas to 0: both pools return to nodes.min (0) after the cool-down.
    set_replicas(&md_api, 0).await;
    let shrink = Instant::now();
    wait_for("both pools back at 0 instances", DEADLINE, || async {
        settled_at(&client, &sim, &ec2, &pools, 0, 0)
            .await
            .then_some(())
    })
    .await;
    println!(
        "shrink to nodes.min: {:.1} s (5 s cool-down)",
        shrink.elapsed().as_secs_f64()
    );

    // nodes.min is kept with no replica; deleting a pool releases what it launched.
    pool_api
        .patch(
            &pools.azure,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"nodes": {"min": 1}}})),
        )
        .await
        .expect("min 1");
    wait_for("the Azure pool at nodes.min=1", DEADLINE, || async {
        settled_at(&client, &sim, &ec2, &pools, 0, 1)
            .await
            .then_some(())
    })
    .await;
    delete_pools(&client, &sim, &ec2, &pools).await;
    ns.delete().await;
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the local cluster: hack/e2e runs it"]
async fn an_aks_pool_scales_from_zero_routes_around_a_quota_error_and_shrinks_back() {
    if !e2e::enabled("AKS agent pool scaling") {
        return;
    }
    let _turn = e2e::serial().await;
    let Scene {
        client,
        sim,
        ec2,
        pools,
    } = Scene::new(AzureKind::AgentPool).await;
    let pool_api: Api<GpuNodePool> = Api::all(client.clone());
    let operator = operator(&sim, "cloud-aks-e2e").await;
    println!("operator log: {}", operator.log.display());

    // From an empty agent pool: its count goes up, and its machine joins as AKS
    // names and labels its nodes.
    let ns = TestNamespace::new(&client, "cloud-aks").await;
    let md_api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let started = Instant::now();
    md_api
        .create(&PostParams::default(), &model(2))
        .await
        .expect("ModelDeployment created");
    wait_for(
        "2 replicas Ready, one on AWS, one on AKS",
        DEADLINE,
        || async {
            let (ready, placed) = ready_by_pool(&md_api).await?;
            (ready == 2
                && placed.get(&pools.aws) == Some(&1)
                && placed.get(&pools.azure) == Some(&1))
            .then_some(())
        },
    )
    .await;
    println!(
        "AKS agent pool from 0: {:.1} s to 2 replicas Ready",
        started.elapsed().as_secs_f64()
    );
    assert!(settled_at(&client, &sim, &ec2, &pools, 1, 1).await);
    let nodes: Api<Node> = Api::all(client.clone());
    let aks_nodes = nodes
        .list(&ListParams::default().labels("kubernetes.azure.com/agentpool=h100"))
        .await
        .expect("Nodes");
    let names: Vec<String> = aks_nodes
        .items
        .iter()
        .filter(|n| n.labels().get("outrigger.dev/pool") == Some(&pools.azure))
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(
        names[0].starts_with("aks-h100-") && names[0].contains("-vmss00000"),
        "{names:?}"
    );

    // AKS, now the cheaper, refuses the cores (its preflight quota check): the
    // replica it cannot take runs on AWS instead.
    sim.control
        .inject(json!({"fault": "OperationNotAllowed", "region": AZURE_REGION}))
        .await;
    pool_api
        .patch(
            &pools.azure,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"pricePerNodeHour": 5.0}})),
        )
        .await
        .expect("Azure price patched");
    set_replicas(&md_api, 3).await;
    wait_for("AKS CapacityAvailable=False", DEADLINE, || async {
        (capacity_available(&pool_api, &pools.azure).await? == "False").then_some(())
    })
    .await;
    let error_seen = Instant::now();
    wait_for("3 replicas Ready, 2 on AWS", DEADLINE, || async {
        let (ready, placed) = ready_by_pool(&md_api).await?;
        (ready == 3 && placed.get(&pools.aws) == Some(&2) && placed.get(&pools.azure) == Some(&1))
            .then_some(())
    })
    .await;
    println!(
        "QuotaExceeded on the AKS pool to 3 replicas Ready: {:.1} s",
        error_seen.elapsed().as_secs_f64()
    );
    let backoff = pool_status(&pool_api, &pools.azure)
        .await
        .and_then(|s| s.capacity_backoff)
        .expect("status.capacityBackoff");
    assert_eq!(
        (backoff.reason.as_str(), backoff.code.as_str()),
        ("QuotaExceeded", "QuotaExceeded")
    );
    sim.control.clear_all().await;

    // Replicas to 0: deleteMachines takes the agent pool back to 0.
    set_replicas(&md_api, 0).await;
    let shrink = Instant::now();
    wait_for("both pools back at 0 instances", DEADLINE, || async {
        settled_at(&client, &sim, &ec2, &pools, 0, 0)
            .await
            .then_some(())
    })
    .await;
    println!(
        "AKS pool shrink to 0: {:.1} s (5 s cool-down)",
        shrink.elapsed().as_secs_f64()
    );
    let state = sim.control.state().await;
    let set = state["azure"]["scaleSets"]
        .as_array()
        .and_then(|sets| {
            sets.iter()
                .find(|s| s["tags"]["outrigger.dev/pool"] == pools.azure.as_str())
        })
        .cloned()
        .expect("the agent pool's scale set");
    assert_eq!(set["capacity"], 0, "the agent pool's count: {set}");
    assert_eq!(set["agentPool"]["name"], "h100", "{set}");
    let log = std::fs::read_to_string(&operator.log).unwrap_or_default();
    assert!(
        !log.contains("virtualMachineScaleSets/aks-"),
        "no direct scale-set call"
    );
    delete_pools(&client, &sim, &ec2, &pools).await;
    ns.delete().await;
    operator.stop().await;
}

/// A small deterministic generator for the kill moments, seeded from the clock and
/// printed, so a failing run can be told apart.
struct Moments(u64);

impl Moments {
    fn next_ms(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the local cluster: hack/e2e runs it"]
async fn operator_killed_during_scaling_leaves_no_duplicate_orphan_or_lost_replica() {
    if !e2e::enabled("cloud chaos") {
        return;
    }
    let _turn = e2e::serial().await;
    let Scene {
        client,
        sim,
        ec2,
        pools,
    } = Scene::new(AzureKind::ScaleSet).await;
    let ns = TestNamespace::new(&client, "chaos").await;
    let md_api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    md_api
        .create(&PostParams::default(), &model(2))
        .await
        .expect("ModelDeployment created");

    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    println!("kill moments seed: {seed}");
    let mut moments = Moments(seed);
    // Up and down: every kill lands in a scale-up or a scale-down (cool-down 5 s).
    let replicas = [4, 1, 5, 2, 6, 2, 4, 1, 3, 2];
    for (round, &n) in replicas.iter().enumerate() {
        let operator = operator(&sim, &format!("chaos-{round}")).await;
        set_replicas(&md_api, n).await;
        let after = Duration::from_millis(moments.next_ms(6000));
        // The kill moment is the fault being injected, not a wait for a state.
        tokio::time::sleep(after).await;
        println!(
            "round {round}: replicas {n}, SIGKILL after {:.1} s",
            after.as_secs_f64()
        );
        operator.kill().await;
    }

    // A last operator converges: every replica Ready, the instances exactly the
    // nodes the plan needs (one 8-GPU replica per node), each a Node.
    let operator = operator(&sim, "chaos-final").await;
    let last = *replicas.last().expect("rounds");
    wait_for(
        "every replica Ready and the clouds at the plan's node counts",
        Duration::from_secs(120),
        || async {
            let (ready, placed) = ready_by_pool(&md_api).await?;
            let aws = *placed.get(&pools.aws).unwrap_or(&0) as usize;
            let azure = *placed.get(&pools.azure).unwrap_or(&0) as usize;
            (ready == last && settled_at(&client, &sim, &ec2, &pools, aws, azure).await)
                .then_some(())
        },
    )
    .await;
    let (_, placed) = ready_by_pool(&md_api).await.expect("status");
    println!("after 10 kills: {placed:?}, instances match, nothing duplicated or orphaned");

    delete_pools(&client, &sim, &ec2, &pools).await;
    ns.delete().await;
    operator.stop().await;
}
