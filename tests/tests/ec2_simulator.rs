//! The EC2 simulator (moto behind the proxy) through the real `aws-sdk-ec2`: no
//! cluster needed. Each test starts its own moto and simulator on free ports.

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_sdk_ec2::Client;
use aws_sdk_ec2::config::{Credentials, Region};
use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{
    Filter, InstanceType, LaunchTemplateSpecification, RequestLaunchTemplateData, ResourceType,
    Tag, TagSpecification,
};
use outrigger_tests::harness::{Control, Moto};
use outrigger_tests::{Simulator, SimulatorConfig};
use serde_json::json;

const POOL: &str = "aws-use1-h100";
const H100: &str = "p5.48xlarge";

struct Clouds {
    sim: Simulator,
    control: Control,
    _moto: Moto,
}

async fn clouds() -> Clouds {
    let moto = Moto::start().await.expect("moto starts");
    let sim = Simulator::start(SimulatorConfig::local(moto.url()).expect("a TLS identity"))
        .await
        .expect("the simulator starts");
    let control = Control::new(sim.control_url());
    Clouds {
        sim,
        control,
        _moto: moto,
    }
}

/// An EC2 client of the simulator, as the operator makes one (standard chain,
/// endpoint overridden); `retries: false` shows each error as it comes.
async fn ec2(sim: &Simulator, retries: bool) -> Client {
    let retry = if retries {
        RetryConfig::standard()
    } else {
        RetryConfig::disabled()
    };
    let config = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new(
            "AKIDOUTRIGGERTEST",
            "secret",
            None,
            None,
            "test",
        ))
        .endpoint_url(sim.ec2_url())
        .retry_config(retry)
        .load()
        .await;
    Client::new(&config)
}

fn pool_tags(pool: &str) -> TagSpecification {
    TagSpecification::builder()
        .resource_type(ResourceType::Instance)
        .tags(Tag::builder().key("outrigger.dev/pool").value(pool).build())
        .tags(
            Tag::builder()
                .key("outrigger.dev/cluster")
                .value("test")
                .build(),
        )
        .build()
}

async fn subnet_in(client: &Client, zone: &str) -> String {
    let subnets = client
        .describe_subnets()
        .filters(
            Filter::builder()
                .name("availability-zone")
                .values(zone)
                .build(),
        )
        .send()
        .await
        .expect("DescribeSubnets");
    subnets.subnets()[0]
        .subnet_id()
        .expect("a default subnet")
        .to_string()
}

async fn running_in_pool(client: &Client, pool: &str) -> Vec<String> {
    let found = client
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
        .expect("DescribeInstances");
    let mut ids: Vec<String> = found
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter_map(|i| i.instance_id().map(String::from))
        .collect();
    ids.sort();
    ids
}

async fn launch(client: &Client, zone: &str, min: i32, max: i32) -> Result<Vec<String>, String> {
    let launched = client
        .run_instances()
        .image_id("ami-12345678")
        .instance_type(InstanceType::from(H100))
        .placement(
            aws_sdk_ec2::types::Placement::builder()
                .availability_zone(zone)
                .build(),
        )
        .min_count(min)
        .max_count(max)
        .tag_specifications(pool_tags(POOL))
        .send()
        .await
        .map_err(|e| e.code().unwrap_or("no code").to_string())?;
    Ok(launched
        .instances()
        .iter()
        .filter_map(|i| i.instance_id().map(String::from))
        .collect())
}

#[tokio::test(flavor = "multi_thread")]
async fn run_describe_and_terminate_with_tags_and_a_launch_template() {
    let clouds = clouds().await;
    let client = ec2(&clouds.sim, true).await;
    client
        .create_launch_template()
        .launch_template_name("gpu-h100")
        .launch_template_data(
            RequestLaunchTemplateData::builder()
                .image_id("ami-12345678")
                .instance_type(InstanceType::from(H100))
                .build(),
        )
        .send()
        .await
        .expect("CreateLaunchTemplate");
    let subnet = subnet_in(&client, "us-east-1b").await;

    let run = || {
        client
            .run_instances()
            .launch_template(
                LaunchTemplateSpecification::builder()
                    .launch_template_name("gpu-h100")
                    .version("$Latest")
                    .build(),
            )
            .subnet_id(&subnet)
            .min_count(1)
            .max_count(2)
            .client_token("scale-up-1")
            .tag_specifications(pool_tags(POOL))
            .send()
    };
    let launched = run().await.expect("RunInstances");
    let instances = launched.instances();
    assert_eq!(
        instances.len(),
        2,
        "EC2 launches MaxCount when there is room"
    );
    for instance in instances {
        assert_eq!(
            instance.instance_type().map(InstanceType::as_str),
            Some(H100),
            "type from the launch template"
        );
        assert_eq!(
            instance.placement().and_then(|p| p.availability_zone()),
            Some("us-east-1b"),
            "zone from the subnet"
        );
    }
    let mut ids: Vec<String> = instances
        .iter()
        .filter_map(|i| i.instance_id().map(String::from))
        .collect();
    ids.sort();

    let again = run()
        .await
        .expect("RunInstances with the same client token");
    let mut replayed: Vec<String> = again
        .instances()
        .iter()
        .filter_map(|i| i.instance_id().map(String::from))
        .collect();
    replayed.sort();
    assert_eq!(
        replayed, ids,
        "the same ClientToken gets the same instances"
    );
    assert_eq!(running_in_pool(&client, POOL).await, ids);
    assert!(running_in_pool(&client, "another-pool").await.is_empty());

    let mismatch = client
        .run_instances()
        .image_id("ami-12345678")
        .min_count(1)
        .max_count(1)
        .client_token("scale-up-1")
        .send()
        .await
        .expect_err("a reused token with other parameters");
    assert_eq!(mismatch.code(), Some("IdempotentParameterMismatch"));

    let terminated = client
        .terminate_instances()
        .set_instance_ids(Some(ids.clone()))
        .send()
        .await
        .expect("TerminateInstances");
    assert_eq!(terminated.terminating_instances().len(), 2);
    assert!(running_in_pool(&client, POOL).await.is_empty());
    clouds.sim.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn finite_capacity_launches_what_fits_then_refuses() {
    let clouds = clouds().await;
    let client = ec2(&clouds.sim, false).await;
    clouds
        .control
        .capacity(
            json!({"provider": "aws", "instanceType": H100, "zone": "us-east-1a", "limit": 3}),
        )
        .await;

    assert_eq!(
        launch(&client, "us-east-1a", 1, 2).await.map(|i| i.len()),
        Ok(2)
    );
    assert_eq!(
        launch(&client, "us-east-1a", 2, 2).await,
        Err("InsufficientInstanceCapacity".to_string()),
        "two more do not fit"
    );
    let last = launch(&client, "us-east-1a", 1, 5)
        .await
        .expect("one more fits");
    assert_eq!(last.len(), 1, "launches as many as fit, at least MinCount");
    assert_eq!(
        launch(&client, "us-east-1b", 2, 2).await.map(|i| i.len()),
        Ok(2),
        "another zone is not limited"
    );

    client
        .terminate_instances()
        .set_instance_ids(Some(last))
        .send()
        .await
        .expect("TerminateInstances");
    assert_eq!(
        launch(&client, "us-east-1a", 1, 1).await.map(|i| i.len()),
        Ok(1),
        "a terminated instance frees its slot"
    );

    clouds
        .control
        .capacity(
            json!({"provider": "aws", "instanceType": H100, "zone": "us-east-1a", "limit": null}),
        )
        .await;
    assert_eq!(
        launch(&client, "us-east-1a", 4, 4).await.map(|i| i.len()),
        Ok(4),
        "unlimited again"
    );
    clouds.sim.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn injected_faults_reach_the_sdk_with_their_codes() {
    let clouds = clouds().await;
    let control = &clouds.control;
    let client = ec2(&clouds.sim, false).await;

    let ice = control
        .inject(json!({"fault": "InsufficientInstanceCapacity", "instanceType": H100, "zone": "us-east-1a"}))
        .await;
    let err = client
        .run_instances()
        .image_id("ami-12345678")
        .instance_type(InstanceType::from(H100))
        .placement(
            aws_sdk_ec2::types::Placement::builder()
                .availability_zone("us-east-1a")
                .build(),
        )
        .min_count(1)
        .max_count(1)
        .send()
        .await
        .expect_err("no capacity in us-east-1a");
    assert_eq!(err.code(), Some("InsufficientInstanceCapacity"));
    assert_eq!(err.raw_response().map(|r| r.status().as_u16()), Some(500));
    assert!(err.message().is_some_and(|m| m.contains("us-east-1a")));
    assert_eq!(
        launch(&client, "us-east-1b", 1, 1).await.map(|i| i.len()),
        Ok(1),
        "other zones launch"
    );
    control.clear(&ice).await;
    assert_eq!(
        launch(&client, "us-east-1a", 1, 1).await.map(|i| i.len()),
        Ok(1),
        "cleared"
    );

    control.inject(json!({"fault": "VcpuLimitExceeded"})).await;
    let err = launch(&client, "us-east-1a", 1, 1).await;
    assert_eq!(err, Err("VcpuLimitExceeded".to_string()));
    control.clear_all().await;

    control
        .inject(json!({"fault": "RequestLimitExceeded", "action": "DescribeInstances"}))
        .await;
    let err = client
        .describe_instances()
        .send()
        .await
        .expect_err("throttled");
    assert_eq!(err.code(), Some("RequestLimitExceeded"));
    assert_eq!(err.raw_response().map(|r| r.status().as_u16()), Some(503));
    assert!(
        client.describe_subnets().send().await.is_ok(),
        "other actions are not throttled"
    );
    control.clear_all().await;

    // The SDK's standard retries ride out a throttle that lasts two requests.
    control
        .inject(json!({"fault": "RequestLimitExceeded", "times": 2}))
        .await;
    let retrying = ec2(&clouds.sim, true).await;
    assert!(retrying.describe_instances().send().await.is_ok());
    assert!(
        control.state().await["faults"]
            .as_array()
            .unwrap()
            .is_empty(),
        "both hits used"
    );

    control
        .inject(json!({"fault": "InternalError", "times": 1}))
        .await;
    let err = client
        .describe_instances()
        .send()
        .await
        .expect_err("internal error");
    assert_eq!(err.code(), Some("InternalError"));
    assert_eq!(err.raw_response().map(|r| r.status().as_u16()), Some(500));
    assert!(
        client.describe_instances().send().await.is_ok(),
        "times: 1 hits once"
    );

    control
        .inject(json!({"fault": "Latency", "provider": "aws", "millis": 200}))
        .await;
    assert!(
        client.describe_instances().send().await.is_ok(),
        "slow but answered"
    );
    control.clear_all().await;

    control
        .outage(json!({"provider": "aws", "region": "us-east-1", "api": true}))
        .await;
    let err = client
        .describe_instances()
        .send()
        .await
        .expect_err("region down");
    assert_eq!(err.code(), Some("Unavailable"));
    control.recover("aws").await;
    assert!(client.describe_instances().send().await.is_ok());
    clouds.sim.stop().await;
}
