//! The adapters against the cloud simulators (`outrigger-tests`), through the real
//! SDK clients: every error class produced by the simulator and classified, the
//! metered wrapper waiting out `Retry-After`, a stalled Azure operation timing out,
//! and a repeated EC2 launch never launching twice. Each test starts its own
//! simulator on free loopback ports (and moto for EC2).

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_config::BehaviorVersion;
use aws_sdk_ec2::config::{Credentials, Region};
use aws_sdk_ec2::types::{InstanceType, RequestLaunchTemplateData};
use outrigger_crds::{CapacityType, Provider};
use outrigger_tests::harness::{Control, Moto, eventually};
use outrigger_tests::{Simulator, SimulatorConfig};
use serde_json::json;

use super::aws::{Aws, AwsSettings};
use super::azure::{Azure, AzureSettings};
use super::metered::{Metered, Policy};
use super::{CloudError, CloudProvider, ErrorKind, Launch, Target, TargetScaling};
use crate::telemetry::Metrics;

const SUB: &str = "00000000-0000-0000-0000-000000000001";
const RG: &str = "outrigger-test";
const H100_VM: &str = "Standard_ND96isr_H100_v5";
const H100_EC2: &str = "p5.48xlarge";

fn azure_target(scale_set: &str) -> Target {
    Target {
        pool: format!("azure-{scale_set}"),
        region: "eastus".into(),
        zone: Some("1".into()),
        instance_type: H100_VM.into(),
        capacity_type: CapacityType::OnDemand,
        scaling: TargetScaling::Azure {
            subscription_id: SUB.into(),
            resource_group: RG.into(),
            scale_set: scale_set.into(),
        },
    }
}

fn aks_target(agent_pool: &str) -> Target {
    Target {
        scaling: TargetScaling::Aks {
            subscription_id: SUB.into(),
            resource_group: RG.into(),
            cluster: "aks-east".into(),
            agent_pool: agent_pool.into(),
        },
        ..azure_target(agent_pool)
    }
}

/// Both kinds of Azure pool: a scale set and an AKS agent pool, each with the
/// code a quota refusal has there.
fn azure_targets() -> [(Target, &'static str); 2] {
    [
        (azure_target("h100"), "OperationNotAllowed"),
        (aks_target("h100"), "QuotaExceeded"),
    ]
}

async fn azure_sim() -> (Simulator, Control) {
    // The Azure endpoint never calls moto.
    let config = SimulatorConfig::local("http://127.0.0.1:9").expect("a TLS identity");
    let sim = Simulator::start(config)
        .await
        .expect("the simulator starts");
    assert!(
        sim.azure_url().starts_with("https://"),
        "{}",
        sim.azure_url()
    );
    let control = Control::new(sim.control_url());
    control
        .create_scale_set(json!({
            "subscriptionId": SUB, "resourceGroup": RG, "name": "h100",
            "location": "eastus", "sku": H100_VM, "zones": ["1"], "capacity": 0,
            "pool": "azure-h100",
        }))
        .await;
    control
        .create_agent_pool(json!({
            "subscriptionId": SUB, "resourceGroup": RG, "cluster": "aks-east", "name": "h100",
            "location": "eastus", "vmSize": H100_VM, "zones": ["1"], "count": 0,
            "pool": "aks-h100",
        }))
        .await;
    (sim, control)
}

/// The adapter over HTTPS, trusting the simulator's CA.
fn azure(sim: &Simulator, token: &str, operation_timeout: Duration) -> Azure {
    Azure::new(&AzureSettings {
        endpoint_url: Some(sim.azure_url().to_string()),
        static_token: Some(token.to_string()),
        operation_timeout,
        ca_pem: sim.azure_ca_pem().map(<[u8]>::to_vec),
    })
    .expect("an Azure adapter")
}

fn launch(have: u32, add: u32) -> Launch {
    Launch {
        have,
        add,
        token: format!("t-{have}-{add}"),
    }
}

async fn expect_error(result: Result<u32, CloudError>, kind: ErrorKind, code: &str) {
    let error = result.expect_err("an error");
    println!("{error}");
    assert_eq!((error.kind, error.code.as_str()), (kind, code), "{error}");
}

#[tokio::test(flavor = "multi_thread")]
async fn azure_grows_lists_and_deletes_chosen_instances() {
    let (sim, _control) = azure_sim().await;
    let cloud = azure(&sim, "t", Duration::from_secs(20));
    for (target, _) in azure_targets() {
        assert_eq!(cloud.launch(&target, &launch(0, 3)).await, Ok(3));
        let vms = cloud.instances(&target).await.expect("VMs");
        assert_eq!(vms.len(), 3);
        assert!(vms.iter().all(|v| v.live()));
        let scale_set = match &target.scaling {
            TargetScaling::Aks { .. } => "/virtualMachineScaleSets/aks-h100-",
            _ => "/virtualMachineScaleSets/h100/virtualMachines/",
        };
        assert!(
            vms[0].provider_id.starts_with("azure:///subscriptions/")
                && vms[0].provider_id.contains(scale_set),
            "{}",
            vms[0].provider_id
        );
        if let TargetScaling::Aks { .. } = &target.scaling {
            // Machines are named as AKS names its nodes.
            assert!(
                vms[0].id.starts_with("aks-h100-") && vms[0].id.contains("-vmss00000"),
                "{}",
                vms[0].id
            );
        }
        cloud
            .terminate(&target, &[vms[0].id.clone()])
            .await
            .expect("deleteInstances / deleteMachines");
        let left: Vec<String> = cloud
            .instances(&target)
            .await
            .expect("VMs")
            .into_iter()
            .filter(|v| v.live())
            .map(|v| v.id)
            .collect();
        assert_eq!(left.len(), 2, "{target:?}");
        assert!(!left.contains(&vms[0].id));
        if let TargetScaling::Aks { .. } = &target.scaling {
            // A machine gone already is skipped, not sent.
            cloud
                .terminate(&target, &[vms[0].id.clone()])
                .await
                .expect("a machine already gone");
        }
    }
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_pool_changed_elsewhere_is_left_alone() {
    let (sim, control) = azure_sim().await;
    let target = aks_target("h100");
    // Someone else's operation runs (and stalls): Outrigger's client gives up on it.
    let impatient = azure(&sim, "t", Duration::from_secs(2));
    let id = control.inject(json!({"fault": "OperationStalled"})).await;
    let error = impatient
        .launch(&target, &launch(0, 1))
        .await
        .expect_err("stalled");
    assert_eq!(error.code, "OperationTimedOut", "{error}");
    // While it runs, the pool is Updating: no second change is sent.
    let cloud = azure(&sim, "t", Duration::from_secs(20));
    expect_error(
        cloud.launch(&target, &launch(1, 1)).await,
        ErrorKind::Conflict,
        "AgentPoolUpdating",
    )
    .await;
    control.clear(&id).await;
    // Once done, count is 1: a launch that thinks there are none does not override it.
    let error = eventually(
        "the stalled operation to finish",
        Duration::from_secs(20),
        || async {
            let error = cloud
                .launch(&target, &launch(0, 1))
                .await
                .expect_err("a conflict");
            (error.code != "AgentPoolUpdating").then_some(error)
        },
    )
    .await;
    assert_eq!(
        (error.kind, error.code.as_str()),
        (ErrorKind::Conflict, "CountChangedElsewhere"),
        "{error}"
    );
    assert_eq!(cloud.launch(&target, &launch(1, 1)).await, Ok(1));
    assert_eq!(cloud.instances(&target).await.expect("machines").len(), 2);
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn azure_errors_are_classified() {
    let (sim, control) = azure_sim().await;
    let cloud = azure(&sim, "t", Duration::from_secs(20));
    for (target, quota) in azure_targets() {
        let cases = [
            (
                "SkuNotAvailable",
                ErrorKind::InsufficientCapacity,
                "SkuNotAvailable",
            ),
            (
                "ZonalAllocationFailed",
                ErrorKind::InsufficientCapacity,
                "ZonalAllocationFailed",
            ),
            ("OperationNotAllowed", ErrorKind::QuotaExceeded, quota),
        ];
        for (fault, kind, code) in cases {
            // A one-shot fault: gone once it has hit.
            control.inject(json!({"fault": fault, "times": 1})).await;
            expect_error(cloud.launch(&target, &launch(0, 1)).await, kind, code).await;
        }
        control
            .inject(json!({"fault": "TooManyRequests", "retryAfterSeconds": 2, "times": 1}))
            .await;
        let error = cloud.instances(&target).await.expect_err("throttled");
        assert_eq!(
            error.kind,
            ErrorKind::Throttled {
                retry_after: Some(Duration::from_secs(2))
            },
            "{error}"
        );
    }
    let target = azure_target("h100");
    let missing = azure_target("nope");
    let error = cloud.instances(&missing).await.expect_err("not found");
    assert_eq!(error.kind, ErrorKind::NotFound, "{error}");
    let anonymous = azure(&sim, "", Duration::from_secs(20));
    let error = anonymous.instances(&target).await.expect_err("no token");
    assert_eq!(error.kind, ErrorKind::Unauthorized, "{error}");
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_azure_operation_times_out_cleanly() {
    let (sim, control) = azure_sim().await;
    let timeout = Duration::from_secs(3);
    let cloud = azure(&sim, "t", timeout);
    for (target, _) in azure_targets() {
        let id = control.inject(json!({"fault": "OperationStalled"})).await;
        let started = Instant::now();
        let error = cloud
            .launch(&target, &launch(0, 1))
            .await
            .expect_err("timed out");
        println!("stalled operation given up after {:?}", started.elapsed());
        assert_eq!(
            (error.kind, error.code.as_str()),
            (ErrorKind::Transient, "OperationTimedOut")
        );
        control.clear(&id).await;
    }
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_metered_wrapper_waits_out_retry_after() {
    let (sim, control) = azure_sim().await;
    let metrics = Arc::new(Metrics::new());
    let cloud = Metered::new(
        azure(&sim, "t", Duration::from_secs(20)),
        metrics.clone(),
        Policy::default(),
    );
    for (target, _) in azure_targets() {
        control
            .inject(json!({"fault": "TooManyRequests", "retryAfterSeconds": 2, "times": 1}))
            .await;
        let started = Instant::now();
        cloud
            .instances(&target)
            .await
            .expect("listed on the second attempt");
        let waited = started.elapsed();
        println!("throttled list succeeded after {waited:?} (Retry-After: 2s)");
        // A lower bound, not a speed: the retry must not go out before Retry-After.
        assert!(waited >= Duration::from_secs(2), "{waited:?}");
    }
    let text = metrics.encode().expect("metrics");
    assert!(text.contains(
        r#"outrigger_cloud_requests_total{provider="azure",operation="list",result="Throttled"} 2"#
    ));
    sim.stop().await;
}

struct Ec2 {
    sim: Simulator,
    control: Control,
    config: aws_config::SdkConfig,
    _moto: Moto,
}

async fn ec2_sim() -> Ec2 {
    let moto = Moto::start().await.expect("moto starts");
    let sim = Simulator::start(SimulatorConfig::local(moto.url()).expect("a TLS identity"))
        .await
        .expect("the simulator starts");
    let control = Control::new(sim.control_url());
    let config = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new(
            "AKIDOUTRIGGER",
            "secret",
            None,
            None,
            "test",
        ))
        .endpoint_url(sim.ec2_url())
        .retry_config(aws_config::retry::RetryConfig::disabled())
        .load()
        .await;
    aws_sdk_ec2::Client::new(&config)
        .create_launch_template()
        .launch_template_name("gpu-h100")
        .launch_template_data(
            RequestLaunchTemplateData::builder()
                .image_id("ami-12345678")
                .instance_type(InstanceType::from(H100_EC2))
                .build(),
        )
        .send()
        .await
        .expect("a launch template");
    Ec2 {
        sim,
        control,
        config,
        _moto: moto,
    }
}

fn aws(ec2: &Ec2) -> Aws {
    Aws::with_config(
        ec2.config.clone(),
        AwsSettings {
            endpoint_url: Some(ec2.sim.ec2_url().to_string()),
            region: None,
            cluster: "test".into(),
        },
    )
}

fn aws_target(template: &str) -> Target {
    Target {
        pool: "aws-h100".into(),
        region: "us-east-1".into(),
        zone: Some("us-east-1a".into()),
        instance_type: H100_EC2.into(),
        capacity_type: CapacityType::OnDemand,
        scaling: TargetScaling::Aws {
            launch_template: template.into(),
            version: Some("$Latest".into()),
            subnet_ids: Vec::new(),
        },
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ec2_launches_once_per_token_lists_by_tags_and_terminates() {
    let ec2 = ec2_sim().await;
    let cloud = aws(&ec2);
    let target = aws_target("gpu-h100");
    assert_eq!(cloud.provider(), Provider::Aws);
    assert_eq!(cloud.launch(&target, &launch(0, 2)).await, Ok(2));
    // The same request again (a retry, or a restart before the list shows them).
    assert_eq!(cloud.launch(&target, &launch(0, 2)).await, Ok(2));
    let instances = cloud.instances(&target).await.expect("listed");
    assert_eq!(instances.len(), 2, "launched once: {instances:?}");
    assert!(instances[0].provider_id.starts_with("aws:///us-east-1a/i-"));
    let ids: Vec<String> = instances.iter().map(|i| i.id.clone()).collect();
    cloud.terminate(&target, &ids).await.expect("terminated");
    let live = cloud
        .instances(&target)
        .await
        .expect("listed")
        .iter()
        .filter(|i| i.live())
        .count();
    assert_eq!(live, 0);
    ec2.sim.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ec2_errors_are_classified() {
    let ec2 = ec2_sim().await;
    let cloud = aws(&ec2);
    let target = aws_target("gpu-h100");
    let cases = [
        (
            "InsufficientInstanceCapacity",
            ErrorKind::InsufficientCapacity,
        ),
        ("VcpuLimitExceeded", ErrorKind::QuotaExceeded),
        (
            "RequestLimitExceeded",
            ErrorKind::Throttled { retry_after: None },
        ),
        ("InternalError", ErrorKind::Transient),
    ];
    for (i, (fault, kind)) in cases.into_iter().enumerate() {
        ec2.control
            .inject(json!({"fault": fault, "times": 1}))
            .await;
        let attempt = Launch {
            token: format!("errors-{i}"),
            ..launch(0, 1)
        };
        expect_error(cloud.launch(&target, &attempt).await, kind, fault).await;
    }
    let error = cloud
        .launch(&aws_target("no-such-template"), &launch(0, 1))
        .await
        .expect_err("no template");
    println!("{error}");
    assert_eq!(error.kind, ErrorKind::NotFound, "{error}");
    ec2.sim.stop().await;
}
