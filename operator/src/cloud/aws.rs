//! EC2 pools on `aws-sdk-ec2`: instances carry the tags `outrigger.dev/pool` and
//! `outrigger.dev/cluster`; `RunInstances` from the pool's launch template with an
//! idempotent `ClientToken`; `TerminateInstances` on chosen ids.

use std::collections::HashMap;
use std::sync::Mutex;

use aws_config::BehaviorVersion;
use aws_config::environment::EnvironmentVariableRegionProvider;
use aws_config::meta::region::RegionProviderChain;
use aws_config::retry::RetryConfig;
use aws_sdk_ec2::Client;
use aws_sdk_ec2::config::Region;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    Filter, InstanceMarketOptionsRequest, InstanceStateName, InstanceType,
    LaunchTemplateSpecification, MarketType, Placement, ResourceType, Tag, TagSpecification,
};
use k8s_openapi::jiff::Timestamp;
use outrigger_crds::{CapacityType, Provider};

use super::{
    CLUSTER_TAG, CloudError, CloudProvider, ErrorKind, Instance, InstanceState, Launch, POOL_TAG,
    Target, TargetScaling,
};

/// How to reach EC2: the standard AWS chain (environment, profile, web identity,
/// IMDS) for credentials, with these overrides.
#[derive(Debug, Clone, Default)]
pub struct AwsSettings {
    /// Another endpoint (the simulator), instead of EC2's own.
    pub endpoint_url: Option<String>,
    /// One region for every pool, instead of each pool's `spec.region`.
    pub region: Option<String>,
    /// The value of the `outrigger.dev/cluster` tag.
    pub cluster: String,
}

pub struct Aws {
    config: aws_config::SdkConfig,
    settings: AwsSettings,
    clients: Mutex<HashMap<String, Client>>,
}

impl Aws {
    /// Loads the shared AWS configuration: the standard chain with these
    /// overrides; the interruption queue's client is made from it too. The SDK's
    /// own retries are off: the metered wrapper retries, so that each attempt is
    /// counted and `Retry-After` rules are ours (the queue loop receives again).
    pub async fn config(settings: &AwsSettings) -> aws_config::SdkConfig {
        let mut loader =
            aws_config::defaults(BehaviorVersion::latest()).retry_config(RetryConfig::disabled());
        if let Some(url) = &settings.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        // Each pool names its region, so the shared configuration only needs one
        // for credential providers (STS): the flag, else the environment, else a
        // fixed default. Never the instance metadata service, which is not there
        // off EC2 and only delays start-up with warnings.
        let region = RegionProviderChain::first_try(settings.region.clone().map(Region::new))
            .or_else(EnvironmentVariableRegionProvider::new())
            .or_else(Region::from_static("us-east-1"));
        loader = loader.region(region);
        loader.load().await
    }

    /// An adapter on a configuration loaded elsewhere.
    pub fn with_config(config: aws_config::SdkConfig, settings: AwsSettings) -> Aws {
        Aws {
            config,
            settings,
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// EC2 is regional: one client per region, made on first use.
    fn client(&self, target: &Target) -> Client {
        let region = self
            .settings
            .region
            .clone()
            .unwrap_or_else(|| target.region.clone());
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients
            .entry(region.clone())
            .or_insert_with(|| {
                let config = aws_sdk_ec2::config::Builder::from(&self.config)
                    .region(Region::new(region))
                    .build();
                Client::from_conf(config)
            })
            .clone()
    }

    fn tags(&self, target: &Target) -> TagSpecification {
        TagSpecification::builder()
            .resource_type(ResourceType::Instance)
            .tags(Tag::builder().key(POOL_TAG).value(&target.pool).build())
            .tags(
                Tag::builder()
                    .key(CLUSTER_TAG)
                    .value(&self.settings.cluster)
                    .build(),
            )
            .tags(
                Tag::builder()
                    .key("Name")
                    .value(format!("{}-{}", self.settings.cluster, target.pool))
                    .build(),
            )
            .build()
    }
}

/// An EC2 error code as the scaler sees it.
pub fn classify(code: &str) -> ErrorKind {
    match code {
        "InsufficientInstanceCapacity"
        | "InsufficientHostCapacity"
        | "InsufficientReservedInstanceCapacity"
        | "InsufficientCapacityOnHost"
        | "SpotMaxPriceTooLow"
        | "Unsupported" => ErrorKind::InsufficientCapacity,
        "VcpuLimitExceeded"
        | "InstanceLimitExceeded"
        | "MaxSpotInstanceCountExceeded"
        | "InsufficientFreeAddressesInSubnet" => ErrorKind::QuotaExceeded,
        "RequestLimitExceeded" | "Throttling" | "ThrottlingException" => {
            ErrorKind::Throttled { retry_after: None }
        }
        "AuthFailure"
        | "UnauthorizedOperation"
        | "InvalidClientTokenId"
        | "OptInRequired"
        | "SignatureDoesNotMatch"
        | "Blocked" => ErrorKind::Unauthorized,
        c if c.ends_with(".NotFound") || c.ends_with("NotFoundException") => ErrorKind::NotFound,
        "InternalError" | "InternalFailure" | "ServiceUnavailable" | "Unavailable" => {
            ErrorKind::Transient
        }
        c if c.starts_with("Invalid")
            || c.starts_with("Missing")
            || c == "IdempotentParameterMismatch" =>
        {
            ErrorKind::Invalid
        }
        _ => ErrorKind::Transient,
    }
}

fn error<E, R>(operation: &'static str, e: SdkError<E, R>) -> CloudError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match &e {
        SdkError::ServiceError(service) => {
            let err = service.err();
            let code = err.code().unwrap_or("Unknown").to_string();
            let message = err.message().unwrap_or_default().to_string();
            CloudError::new(classify(&code), operation, code, message)
        }
        SdkError::ConstructionFailure(_) => CloudError::new(
            ErrorKind::Invalid,
            operation,
            "ConstructionFailure",
            format!("{}", aws_sdk_ec2::error::DisplayErrorContext(&e)),
        ),
        _ => CloudError::new(
            ErrorKind::Transient,
            operation,
            "Unreachable",
            format!("{}", aws_sdk_ec2::error::DisplayErrorContext(&e)),
        ),
    }
}

fn state_of(name: Option<&InstanceStateName>) -> InstanceState {
    match name {
        Some(InstanceStateName::Pending) => InstanceState::Pending,
        Some(InstanceStateName::Running) => InstanceState::Running,
        Some(InstanceStateName::Terminated) => InstanceState::Terminated,
        _ => InstanceState::Stopping,
    }
}

#[async_trait::async_trait]
impl CloudProvider for Aws {
    fn provider(&self) -> Provider {
        Provider::Aws
    }

    async fn instances(&self, target: &Target) -> Result<Vec<Instance>, CloudError> {
        let client = self.client(target);
        let mut pages = client
            .describe_instances()
            .filters(
                Filter::builder()
                    .name(format!("tag:{POOL_TAG}"))
                    .values(&target.pool)
                    .build(),
            )
            .filters(
                Filter::builder()
                    .name(format!("tag:{CLUSTER_TAG}"))
                    .values(&self.settings.cluster)
                    .build(),
            )
            .into_paginator()
            .send();
        let mut found = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| error("list instances", e))?;
            for instance in page.reservations().iter().flat_map(|r| r.instances()) {
                let Some(id) = instance.instance_id() else {
                    continue;
                };
                let zone = instance
                    .placement()
                    .and_then(|p| p.availability_zone())
                    .unwrap_or_default();
                found.push(Instance {
                    id: id.to_string(),
                    provider_id: format!("aws:///{zone}/{id}"),
                    state: state_of(instance.state().and_then(|s| s.name())),
                    launched: instance
                        .launch_time()
                        .and_then(|t| Timestamp::from_second(t.secs()).ok()),
                });
            }
        }
        Ok(found)
    }

    async fn launch(&self, target: &Target, launch: &Launch) -> Result<u32, CloudError> {
        let TargetScaling::Aws {
            launch_template,
            version,
            subnet_ids,
        } = &target.scaling
        else {
            return Err(CloudError::new(
                ErrorKind::Invalid,
                "launch",
                "NotAnAwsPool",
                format!("pool {} has no scaling.aws", target.pool),
            ));
        };
        let client = self.client(target);
        let mut request = client
            .run_instances()
            .launch_template(
                LaunchTemplateSpecification::builder()
                    .launch_template_name(launch_template)
                    .set_version(version.clone())
                    .build(),
            )
            .instance_type(InstanceType::from(target.instance_type.as_str()))
            // As many as EC2 has room for, up to `add`: a partial launch still helps.
            .min_count(1)
            .max_count(i32::try_from(launch.add).unwrap_or(i32::MAX))
            .client_token(&launch.token)
            .tag_specifications(self.tags(target));
        // The first subnet only: the pool is one offering (type and zone), and a
        // capacity error on it must not be answered with more calls.
        if let Some(subnet) = subnet_ids.first() {
            request = request.subnet_id(subnet);
        } else if let Some(zone) = &target.zone {
            request = request.placement(Placement::builder().availability_zone(zone).build());
        }
        if target.capacity_type == CapacityType::Spot {
            request = request.instance_market_options(
                InstanceMarketOptionsRequest::builder()
                    .market_type(MarketType::Spot)
                    .build(),
            );
        }
        let output = request.send().await.map_err(|e| error("launch", e))?;
        Ok(u32::try_from(output.instances().len()).unwrap_or(u32::MAX))
    }

    async fn terminate(&self, target: &Target, ids: &[String]) -> Result<(), CloudError> {
        if ids.is_empty() {
            return Ok(());
        }
        let client = self.client(target);
        match client
            .terminate_instances()
            .set_instance_ids(Some(ids.to_vec()))
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => {
                let e = error("terminate", e);
                // Already gone is what we wanted.
                if e.kind == ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_classified() {
        for (code, kind) in [
            (
                "InsufficientInstanceCapacity",
                ErrorKind::InsufficientCapacity,
            ),
            ("VcpuLimitExceeded", ErrorKind::QuotaExceeded),
            (
                "RequestLimitExceeded",
                ErrorKind::Throttled { retry_after: None },
            ),
            ("InvalidInstanceID.NotFound", ErrorKind::NotFound),
            (
                "InvalidLaunchTemplateName.NotFoundException",
                ErrorKind::NotFound,
            ),
            ("AuthFailure", ErrorKind::Unauthorized),
            ("InternalError", ErrorKind::Transient),
            ("IdempotentParameterMismatch", ErrorKind::Invalid),
        ] {
            assert_eq!(classify(code), kind, "{code}");
        }
    }
}
