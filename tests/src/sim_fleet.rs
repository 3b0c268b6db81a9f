//! Pools whose nodes are machines of the simulated clouds, for end-to-end tests
//! that need the cloud side too (outages through the simulator's control API).

use std::time::Duration;

use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;

use crate::e2e::{SimClouds, node_ready, wait_for};
use crate::harness::Control;

/// How long the machines may take to become Ready Nodes.
const CONVERGE: Duration = Duration::from_secs(60);

/// A region pair only the failover test uses, so its outage touches no other test.
pub const FAILOVER_AWS_REGION: &str = "us-east-2";
pub const FAILOVER_AWS_ZONE: &str = "us-east-2a";
pub const FAILOVER_AZURE_REGION: &str = "northeurope";
const SUBSCRIPTION: &str = "00000000-0000-0000-0000-0000000fa110";

/// Two pools whose nodes are machines of the simulated clouds: EC2 instances
/// launched through the EC2 endpoint and a scale set's VMs, which the simulator's
/// registrar turns into kwok Nodes.
pub struct SimFleet {
    client: Client,
    pub control: Control,
    ec2: aws_sdk_ec2::Client,
    /// The AWS pool's name.
    pub aws: String,
    /// The Azure pool's name.
    pub azure: String,
    instances: Vec<String>,
}

impl SimFleet {
    /// Both pools with `nodes` machines each, waiting until their Nodes are Ready.
    pub async fn new(client: &Client, tag: &str, nodes: i32) -> SimFleet {
        let sim = SimClouds::from_env();
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
                    (list.items.iter().filter(|n| node_ready(n)).count()
                        == usize::try_from(nodes).unwrap_or(0))
                    .then_some(())
                },
            )
            .await;
        }
        fleet
    }

    /// Ends outages and removes the machines and the pools.
    pub async fn delete(self) {
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
