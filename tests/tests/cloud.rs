//! End-to-end: the operator scales AWS and Azure pools in the simulated clouds
//! (in process here, with the node registrar turning instances into kwok Nodes),
//! routes around a capacity error, shrinks back, and releases a deleted pool's
//! instances. Needs the local cluster (`hack/e2e --test cloud`).

use std::time::{Duration, Instant};

use aws_config::BehaviorVersion;
use aws_sdk_ec2::config::{Credentials, Region};
use aws_sdk_ec2::types::{Filter, InstanceType, RequestLaunchTemplateData};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use outrigger_crds::{GpuNodePool, ModelDeployment};
use outrigger_tests::e2e::{self, TestNamespace, wait_for};
use outrigger_tests::harness::{Control, Moto};
use outrigger_tests::registrar::RegistrarConfig;
use outrigger_tests::{Simulator, SimulatorConfig};
use serde_json::json;

const SUB: &str = "00000000-0000-0000-0000-000000000005";
const DEADLINE: Duration = Duration::from_secs(90);

fn pools(tag: &str) -> (String, String, Vec<GpuNodePool>) {
    let (aws, azure) = (format!("aws-{tag}"), format!("azure-{tag}"));
    let pool = |name: &str, spec: serde_json::Value| -> GpuNodePool {
        serde_json::from_value(json!({
            "apiVersion": "outrigger.dev/v1alpha1", "kind": "GpuNodePool",
            "metadata": {"name": name}, "spec": spec
        }))
        .expect("pool")
    };
    let list = vec![
        pool(
            &aws,
            json!({
                "provider": "aws", "region": "us-east-1", "zone": "us-east-1a",
                "instanceType": "p5.48xlarge", "gpu": {"type": "H100", "count": 8},
                "pricePerNodeHour": 10.0, "nodes": {"min": 0, "max": 3},
                "scaling": {"aws": {"launchTemplate": {"name": "gpu-h100", "version": "$Latest"}}}
            }),
        ),
        pool(
            &azure,
            json!({
                "provider": "azure", "region": "eastus", "zone": "1",
                "instanceType": "Standard_ND96isr_H100_v5", "gpu": {"type": "H100", "count": 8},
                "pricePerNodeHour": 20.0, "nodes": {"min": 0, "max": 3},
                "scaling": {"azure": {"subscriptionId": SUB, "resourceGroup": "e2e", "scaleSetName": azure}}
            }),
        ),
    ];
    (aws, azure, list)
}

fn model(name: &str, replicas: i32) -> ModelDeployment {
    serde_json::from_value(json!({
        "apiVersion": "outrigger.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas, "gpu": {"count": 8, "types": ["H100"]},
            "template": {"spec": {"containers": [{"name": "server", "image": "vllm/vllm-openai:v0.6.4"}]}},
            "placement": {"regions": ["us-east-1", "eastus"],
                          "spread": [{"by": "provider", "minGroups": 2}]}
        }
    }))
    .expect("model")
}

async fn ready_replicas(api: &Api<ModelDeployment>, name: &str) -> i32 {
    api.get(name)
        .await
        .ok()
        .and_then(|m| m.status)
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0)
}

async fn pool_status(
    api: &Api<GpuNodePool>,
    name: &str,
) -> Option<outrigger_crds::GpuNodePoolStatus> {
    api.get(name).await.ok()?.status
}

async fn live_ec2(client: &aws_sdk_ec2::Client, pool: &str) -> usize {
    client
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
        .map_or(usize::MAX, |o| {
            o.reservations().iter().map(|r| r.instances().len()).sum()
        })
}

#[tokio::test(flavor = "multi_thread")]
async fn pools_scale_from_zero_route_around_capacity_errors_and_shrink_back() {
    if !e2e::enabled("cloud scaling") {
        return;
    }
    let _turn = e2e::serial().await;
    let client = e2e::client().await;
    let moto = Moto::start().await.expect("moto");
    let sim = Simulator::start(SimulatorConfig {
        registrar: Some(RegistrarConfig {
            client: client.clone(),
            boot_delay: Duration::from_secs(2),
        }),
        ..SimulatorConfig::local(moto.url())
    })
    .await
    .expect("simulator");
    let control = Control::new(sim.control_url());
    let config = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("AKIDE2E", "secret", None, None, "test"))
        .endpoint_url(sim.ec2_url())
        .load()
        .await;
    let ec2 = aws_sdk_ec2::Client::new(&config);
    ec2.create_launch_template()
        .launch_template_name("gpu-h100")
        .launch_template_data(
            RequestLaunchTemplateData::builder()
                .image_id("ami-12345678")
                .instance_type(InstanceType::from("p5.48xlarge"))
                .build(),
        )
        .send()
        .await
        .expect("launch template");
    let tag = e2e::suffix();
    let (aws, azure, pool_list) = pools(&tag);
    control
        .create_scale_set(json!({
            "subscriptionId": SUB, "resourceGroup": "e2e", "name": azure,
            "location": "eastus", "sku": "Standard_ND96isr_H100_v5", "zones": ["1"],
            "capacity": 0, "pool": azure,
        }))
        .await;
    let pool_api: Api<GpuNodePool> = Api::all(client.clone());
    for p in &pool_list {
        pool_api
            .create(&PostParams::default(), p)
            .await
            .expect("pool created");
    }

    // The operator, with the simulators' endpoints and credentials.
    let port = outrigger_tests::harness::free_port().expect("a port");
    let log = std::env::temp_dir().join(format!("outrigger-cloud-{tag}.log"));
    let binary = std::env::var("OUTRIGGER_BIN").unwrap_or_else(|_| {
        format!(
            "{}/debug/outrigger",
            std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into())
        )
    });
    let mut operator = tokio::process::Command::new(binary)
        .args([
            "run",
            "--leader-elect=false",
            "--identity",
            "cloud-e2e",
            "--metrics-addr",
        ])
        .arg(format!("127.0.0.1:{port}"))
        .args([
            "--aws-endpoint-url",
            sim.ec2_url(),
            "--azure-endpoint-url",
            sim.azure_url(),
        ])
        .args([
            "--azure-token",
            "e2e",
            "--cluster-name",
            "e2e",
            "--scale-down-after-seconds",
            "5",
        ])
        .env("AWS_ACCESS_KEY_ID", "AKIDE2E")
        .env("AWS_SECRET_ACCESS_KEY", "secret")
        .stderr(std::fs::File::create(&log).expect("log"))
        .kill_on_drop(true)
        .spawn()
        .expect("the operator starts");
    println!("operator log: {}", log.display());

    let ns = TestNamespace::new(&client, "cloud").await;
    let md_api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let started = Instant::now();
    md_api
        .create(&PostParams::default(), &model("llm", 2))
        .await
        .expect("md");
    wait_for(
        "2 replicas Ready on both clouds from empty pools",
        DEADLINE,
        || async { (ready_replicas(&md_api, "llm").await == 2).then_some(()) },
    )
    .await;
    println!(
        "scale-up from 0 on both clouds: {:.1} s to 2 replicas Ready",
        started.elapsed().as_secs_f64()
    );

    // AWS runs out of H100s; a third replica (cheaper on AWS) must land on Azure.
    control
        .inject(json!({"fault": "InsufficientInstanceCapacity", "instanceType": "p5.48xlarge"}))
        .await;
    md_api
        .patch(
            "llm",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 3}})),
        )
        .await
        .expect("scaled to 3");
    wait_for("AWS CapacityAvailable=False", DEADLINE, || async {
        let s = pool_status(&pool_api, &aws).await?;
        s.conditions
            .iter()
            .any(|c| c.type_ == "CapacityAvailable" && c.status == "False")
            .then_some(())
    })
    .await;
    let error_seen = Instant::now();
    wait_for(
        "3 replicas Ready, the new one on Azure",
        DEADLINE,
        || async { (ready_replicas(&md_api, "llm").await == 3).then_some(()) },
    )
    .await;
    println!(
        "capacity error to replacement Ready: {:.1} s (2 s node boot)",
        error_seen.elapsed().as_secs_f64()
    );
    let azure_nodes = pool_status(&pool_api, &azure)
        .await
        .and_then(|s| s.cloud_instances);
    assert_eq!(azure_nodes, Some(2), "Azure took the replica");
    control.clear_all().await;

    // Replicas to 0: both pools shrink to nodes.min after the cool-down.
    md_api
        .patch(
            "llm",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 0}})),
        )
        .await
        .expect("scaled to 0");
    let shrink = Instant::now();
    wait_for("both pools back at 0 instances", DEADLINE, || async {
        let a = pool_status(&pool_api, &aws).await?.cloud_instances?;
        let z = pool_status(&pool_api, &azure).await?.cloud_instances?;
        (a == 0 && z == 0 && live_ec2(&ec2, &aws).await == 0).then_some(())
    })
    .await;
    println!(
        "shrink to nodes.min: {:.1} s (5 s cool-down)",
        shrink.elapsed().as_secs_f64()
    );

    // Deleting a pool releases what it launched: grow the Azure pool by its min.
    pool_api
        .patch(
            &azure,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"nodes": {"min": 1}}})),
        )
        .await
        .expect("min 1");
    wait_for("the Azure pool at nodes.min=1", DEADLINE, || async {
        (pool_status(&pool_api, &azure).await?.cloud_instances? == 1).then_some(())
    })
    .await;
    for name in [&aws, &azure] {
        pool_api
            .delete(name, &DeleteParams::default())
            .await
            .expect("pool deleted");
    }
    wait_for("the pools gone (finalizer done)", DEADLINE, || async {
        (pool_api.get_opt(&aws).await.ok()?.is_none()
            && pool_api.get_opt(&azure).await.ok()?.is_none())
        .then_some(())
    })
    .await;
    let state = control.state().await;
    let vms = state["azure"]["scaleSets"]
        .as_array()
        .and_then(|sets| sets.iter().find(|s| s["name"] == azure.as_str()))
        .map_or(0, |s| s["vms"].as_array().map_or(0, Vec::len));
    assert_eq!(vms, 0, "the deleted pool's VMs are gone: {state}");

    ns.delete().await;
    let _ = operator.kill().await;
    sim.stop().await;
}
