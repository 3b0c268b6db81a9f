//! Smoke test of the simulated clouds on the local cluster (`hack/cluster up`):
//! EC2 instances and Azure scale-set VMs become kwok Nodes of their pools, a plain
//! GPU Deployment runs on them, an injected capacity error reaches the SDK, an
//! outage turns Nodes NotReady and a recovery Ready again, and the Nodes go with
//! their machines.
//!
//! Runs only with `OUTRIGGER_E2E=1` and the cluster's environment
//! (`eval "$(hack/cluster env)"`); otherwise it says why and passes. Everything it
//! creates has a name of its own and is removed at the end, also when it fails;
//! its faults and outages name a zone and a region no other test uses.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{InstanceType, Placement, ResourceType, Tag, TagSpecification};
use azure_core::headers::HeaderName;
use azure_mgmt_compute::package_2024_07_01::ClientBuilder;
use azure_mgmt_compute::package_2024_07_01::models::{Sku, VirtualMachineScaleSetUpdate};
use futures::FutureExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use outrigger_crds::GpuNodePool;
use outrigger_tests::e2e::SimClouds;
use outrigger_tests::harness::{e2e_requested, eventually};
use serde_json::{Value, json};

/// Nodes appear after the boot delay (2 s) and a registrar pass; pods after the
/// scheduler and kwok. Generous, as the cluster may be busy with other tests.
const DEADLINE: Duration = Duration::from_secs(90);
const AWS_ZONE: &str = "us-east-1a";
/// A region only this test uses, so its outage touches no other test's Nodes.
const AZURE_REGION: &str = "westus3";
const SUBSCRIPTION: &str = "00000000-0000-0000-0000-00000000beef";

/// Names and clients of one run.
struct Run {
    suffix: String,
    kube: Client,
    ec2: aws_sdk_ec2::Client,
    sim: SimClouds,
}

impl Run {
    fn aws_pool(&self) -> String {
        format!("smoke-aws-{}", self.suffix)
    }
    fn azure_pool(&self) -> String {
        format!("smoke-azure-{}", self.suffix)
    }
    fn resource_group(&self) -> String {
        format!("smoke-{}", self.suffix)
    }
    fn scale_set(&self) -> String {
        format!("smoke{}", self.suffix)
    }
    fn namespace(&self) -> String {
        format!("smoke-{}", self.suffix)
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the local cluster: hack/e2e runs it"]
async fn simulated_clouds_make_nodes_that_fail_and_recover() {
    if !e2e_requested("simulated_clouds_make_nodes_that_fail_and_recover") {
        return;
    }
    let kube = Client::try_default()
        .await
        .expect("a kubeconfig for the local cluster (eval \"$(hack/cluster env)\")");
    let sim = SimClouds::from_env();
    let run = Run {
        suffix: uuid::Uuid::new_v4().simple().to_string()[..8].to_string(),
        kube,
        ec2: sim.ec2("us-east-1").await,
        sim,
    };
    let outcome = AssertUnwindSafe(steps(&run)).catch_unwind().await;
    clean_up(&run).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn steps(run: &Run) {
    install_pool_crd(&run.kube).await;
    aws_instances_become_nodes_that_run_gpu_pods(run).await;
    capacity_error_reaches_the_sdk(run).await;
    azure_scale_out_makes_nodes_an_outage_takes_down_and_recovery_brings_back(run).await;
}

/// Installs the GpuNodePool CRD unless it is there (another test may own it).
async fn install_pool_crd(kube: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(kube.clone());
    let name = "gpunodepools.outrigger.dev";
    if crds.get_opt(name).await.expect("read CRDs").is_none() {
        let crd = outrigger_crds::crds()
            .into_iter()
            .find(|c| c.name_any() == name)
            .expect("the GpuNodePool CRD");
        match crds.create(&PostParams::default(), &crd).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.is_already_exists() => {}
            Err(e) => panic!("failed to create the GpuNodePool CRD: {e}"),
        }
    }
    eventually(
        "the GpuNodePool CRD to be established",
        DEADLINE,
        || async {
            let crd = crds.get_opt(name).await.ok()??;
            let established = crd
                .status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            established.then_some(())
        },
    )
    .await;
}

fn pool_nodes(kube: &Client) -> Api<Node> {
    Api::all(kube.clone())
}

async fn nodes_of(kube: &Client, pool: &str) -> Vec<Node> {
    pool_nodes(kube)
        .list(&ListParams::default().labels(&format!("outrigger.dev/pool={pool}")))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
}

fn ready(node: &Node) -> Option<&str> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status.as_str())
}

/// Waits for exactly `n` Nodes of `pool` whose Ready status is `status`.
async fn wait_nodes(kube: &Client, pool: &str, n: usize, status: &str) -> Vec<Node> {
    eventually(
        &format!("{n} nodes of pool {pool} with Ready={status}"),
        DEADLINE,
        || async {
            let nodes = nodes_of(kube, pool).await;
            (nodes.len() == n && nodes.iter().all(|node| ready(node) == Some(status)))
                .then_some(nodes)
        },
    )
    .await
}

async fn aws_instances_become_nodes_that_run_gpu_pods(run: &Run) {
    let pool = run.aws_pool();
    let pools: Api<GpuNodePool> = Api::all(run.kube.clone());
    let object: GpuNodePool = serde_json::from_value(json!({
        "apiVersion": "outrigger.dev/v1alpha1",
        "kind": "GpuNodePool",
        "metadata": {"name": pool},
        "spec": {
            "provider": "aws", "region": "us-east-1", "zone": AWS_ZONE,
            "instanceType": "p5.48xlarge",
            "gpu": {"type": "H100", "count": 8, "memoryGiB": 80},
            "nodes": {"min": 0, "max": 4},
            "nodeSelector": {"outrigger.dev/pool": pool, "smoke.outrigger.dev/run": run.suffix},
            "taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}],
        },
    }))
    .expect("a GpuNodePool");
    pools
        .create(&PostParams::default(), &object)
        .await
        .expect("create the pool");

    let launched = run
        .ec2
        .run_instances()
        .image_id("ami-12345678")
        .instance_type(InstanceType::from("p5.48xlarge"))
        .placement(Placement::builder().availability_zone(AWS_ZONE).build())
        .min_count(2)
        .max_count(2)
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Instance)
                .tags(
                    Tag::builder()
                        .key("outrigger.dev/pool")
                        .value(&pool)
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .expect("RunInstances");
    let ids: Vec<String> = launched
        .instances()
        .iter()
        .filter_map(|i| i.instance_id().map(String::from))
        .collect();
    assert_eq!(ids.len(), 2);

    let nodes = wait_nodes(&run.kube, &pool, 2, "True").await;
    for node in &nodes {
        let labels = node.labels();
        assert_eq!(
            labels["smoke.outrigger.dev/run"], run.suffix,
            "the pool's nodeSelector labels"
        );
        assert_eq!(labels["topology.kubernetes.io/region"], "us-east-1");
        assert_eq!(labels["topology.kubernetes.io/zone"], AWS_ZONE);
        assert_eq!(labels["node.kubernetes.io/instance-type"], "p5.48xlarge");
        let spec = node.spec.as_ref().expect("spec");
        let provider_id = spec.provider_id.as_deref().unwrap_or_default();
        assert!(
            ids.iter()
                .any(|id| provider_id == format!("aws:///{AWS_ZONE}/{id}")),
            "providerID {provider_id} names a launched instance"
        );
        assert!(
            spec.taints
                .iter()
                .flatten()
                .any(|t| t.key == "nvidia.com/gpu"),
            "the pool's taint"
        );
        let capacity = node
            .status
            .as_ref()
            .and_then(|s| s.capacity.as_ref())
            .expect("capacity");
        assert_eq!(
            capacity["nvidia.com/gpu"].0, "8",
            "GPUs per node from the pool"
        );
    }

    // A plain Deployment that asks for the pool's nodes and GPUs runs there.
    let namespace = run.namespace();
    let namespaces: Api<Namespace> = Api::all(run.kube.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": namespace}})).expect("ns"),
        )
        .await
        .expect("create the namespace");
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "inference"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "inference"}},
            "template": {
                "metadata": {"labels": {"app": "inference"}},
                "spec": {
                    "nodeSelector": {"outrigger.dev/pool": pool},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "containers": [{
                        "name": "server", "image": "vllm/vllm-openai:v0.6.4",
                        "resources": {"limits": {"nvidia.com/gpu": "4"}},
                    }],
                },
            },
        },
    }))
    .expect("a Deployment");
    Api::<Deployment>::namespaced(run.kube.clone(), &namespace)
        .create(&PostParams::default(), &deployment)
        .await
        .expect("create the Deployment");
    let node_names: Vec<String> = nodes.iter().map(ResourceExt::name_any).collect();
    let pods: Api<Pod> = Api::namespaced(run.kube.clone(), &namespace);
    eventually("2 Running pods on the pool's nodes", DEADLINE, || async {
        let list = pods
            .list(&ListParams::default().labels("app=inference"))
            .await
            .ok()?;
        let on_pool = list
            .items
            .iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .filter(|p| {
                p.spec
                    .as_ref()
                    .and_then(|s| s.node_name.as_ref())
                    .is_some_and(|n| node_names.contains(n))
            })
            .count();
        (on_pool == 2).then_some(())
    })
    .await;

    run.ec2
        .terminate_instances()
        .set_instance_ids(Some(ids))
        .send()
        .await
        .expect("TerminateInstances");
    eventually(
        "the terminated instances' nodes to go",
        DEADLINE,
        || async { nodes_of(&run.kube, &pool).await.is_empty().then_some(()) },
    )
    .await;
}

async fn capacity_error_reaches_the_sdk(run: &Run) {
    // A zone and a type no other test launches in, and one hit only.
    let fault = run
        .sim
        .control
        .inject(json!({
            "fault": "InsufficientInstanceCapacity",
            "instanceType": "p4d.24xlarge", "zone": "us-east-1f", "times": 1,
        }))
        .await;
    let err = run
        .ec2
        .run_instances()
        .image_id("ami-12345678")
        .instance_type(InstanceType::from("p4d.24xlarge"))
        .placement(Placement::builder().availability_zone("us-east-1f").build())
        .min_count(1)
        .max_count(1)
        .send()
        .await
        .expect_err("no p4d capacity in us-east-1f");
    assert_eq!(err.code(), Some("InsufficientInstanceCapacity"), "{err:?}");
    let left = run.sim.control.state().await;
    assert!(
        left["faults"]
            .as_array()
            .is_none_or(|f| f.iter().all(|x| x["id"] != fault)),
        "the one hit was used"
    );
}

async fn azure_scale_out_makes_nodes_an_outage_takes_down_and_recovery_brings_back(run: &Run) {
    let pool = run.azure_pool();
    let (rg, name) = (run.resource_group(), run.scale_set());
    run.sim
        .control
        .create_scale_set(json!({
            "subscriptionId": SUBSCRIPTION, "resourceGroup": rg, "name": name,
            "location": AZURE_REGION, "sku": "Standard_ND96isr_H100_v5",
            "zones": ["1", "2"], "capacity": 0, "pool": pool,
        }))
        .await;

    let client = ClientBuilder::new(outrigger_tests::azure_client::credential(
        &run.sim.azure_url,
        &run.sim.azure_ca(),
        "outrigger-smoke",
    ))
    .endpoint(azure_core::Url::parse(&run.sim.azure_url).expect("AZURE_ENDPOINT_URL"))
    .transport(outrigger_tests::azure_client::transport(
        &run.sim.azure_ca(),
    ))
    .build()
    .expect("an Azure client");
    let update = VirtualMachineScaleSetUpdate {
        sku: Some(Sku {
            name: None,
            tier: None,
            capacity: Some(2),
        }),
        ..Default::default()
    };
    let response = client
        .virtual_machine_scale_sets_client()
        .update(&rg, &name, update, SUBSCRIPTION)
        .send()
        .await
        .expect("capacity update accepted")
        .into_raw_response();
    let operation = response
        .headers()
        .get_optional_string(&HeaderName::from_static("azure-asyncoperation"))
        .expect("Azure-AsyncOperation");
    let http = outrigger_tests::azure_client::https_client(&run.sim.azure_ca());
    let done = eventually("the scale-out operation to finish", DEADLINE, || async {
        let status: Value = http
            .get(&operation)
            .bearer_auth("outrigger-smoke")
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (status["status"] != "InProgress").then_some(status)
    })
    .await;
    assert_eq!(done["status"], "Succeeded", "{done}");

    let nodes = wait_nodes(&run.kube, &pool, 2, "True").await;
    let mut zones: Vec<String> = nodes
        .iter()
        .map(|n| n.labels()["topology.kubernetes.io/zone"].clone())
        .collect();
    zones.sort();
    assert_eq!(
        zones,
        [format!("{AZURE_REGION}-1"), format!("{AZURE_REGION}-2")]
    );
    for node in &nodes {
        let provider_id = node
            .spec
            .as_ref()
            .and_then(|s| s.provider_id.clone())
            .unwrap_or_default();
        assert!(
            provider_id.starts_with(&format!(
                "azure:///subscriptions/{SUBSCRIPTION}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachineScaleSets/{name}/virtualMachines/"
            )),
            "providerID {provider_id}"
        );
        let capacity = node
            .status
            .as_ref()
            .and_then(|s| s.capacity.as_ref())
            .expect("capacity");
        assert_eq!(
            capacity["nvidia.com/gpu"].0, "8",
            "GPUs of the VM size (no pool object)"
        );
    }

    run.sim
        .control
        .outage(json!({"provider": "azure", "region": AZURE_REGION}))
        .await;
    let down = wait_nodes(&run.kube, &pool, 2, "Unknown").await;
    // kwok acts on any change to a Node it manages; poke the Nodes, then wait for
    // the node lifecycle controller to taint them unreachable: NotReady must hold.
    let api = pool_nodes(&run.kube);
    for node in &down {
        let poke = json!({"metadata": {"labels": {"smoke.outrigger.dev/poked": "yes"}}});
        api.patch(
            &node.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&poke),
        )
        .await
        .expect("label the node");
    }
    eventually(
        "the down nodes to be tainted unreachable",
        DEADLINE,
        || async {
            let nodes = nodes_of(&run.kube, &pool).await;
            let tainted = nodes.iter().all(|n| {
                n.spec
                    .as_ref()
                    .and_then(|s| s.taints.as_ref())
                    .is_some_and(|t| t.iter().any(|t| t.key == "node.kubernetes.io/unreachable"))
            });
            (nodes.len() == 2 && tainted).then_some(())
        },
    )
    .await;
    for node in nodes_of(&run.kube, &pool).await {
        assert_eq!(
            ready(&node),
            Some("Unknown"),
            "NotReady holds during the outage"
        );
    }

    run.sim.control.recover("azure").await;
    wait_nodes(&run.kube, &pool, 2, "True").await;

    run.sim
        .control
        .delete_scale_set(SUBSCRIPTION, &rg, &name)
        .await;
    eventually("the deleted scale set's nodes to go", DEADLINE, || async {
        nodes_of(&run.kube, &pool).await.is_empty().then_some(())
    })
    .await;
}

/// Removes what the run made; each step tolerates it being gone already.
async fn clean_up(run: &Run) {
    let http = reqwest::Client::new();
    let control = &run.sim.control_url;
    let _ = http
        .delete(format!(
            "{control}/outage?provider=azure&region={AZURE_REGION}"
        ))
        .send()
        .await;
    let _ = http
        .delete(format!(
            "{control}/azure/scalesets/{SUBSCRIPTION}/{}/{}",
            run.resource_group(),
            run.scale_set()
        ))
        .send()
        .await;
    // Instances of the run's pool that are still up.
    outrigger_tests::e2e::terminate_pool_instances(&run.ec2, &run.aws_pool()).await;
    let pools: Api<GpuNodePool> = Api::all(run.kube.clone());
    let _ = pools
        .delete(&run.aws_pool(), &DeleteParams::default())
        .await;
    let namespaces: Api<Namespace> = Api::all(run.kube.clone());
    let _ = namespaces
        .delete(&run.namespace(), &DeleteParams::default())
        .await;
    // The registrar removes the Nodes of terminated machines; these are left only
    // if it is not running.
    let api = pool_nodes(&run.kube);
    for pool in [run.aws_pool(), run.azure_pool()] {
        let _ = api
            .delete_collection(
                &DeleteParams::default(),
                &ListParams::default().labels(&format!("outrigger.dev/pool={pool}")),
            )
            .await;
    }
}
