//! What the simulated clouds must hold before GpuNodePools can scale in them: the
//! EC2 launch templates, and the Azure scale sets and AKS agent pools the pools name. A real account has
//! these made by its owner; here `hack/cluster clouds FILE...` (`outrigger-sim
//! clouds`) makes them from the pools' manifests, once, and again changes nothing.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use outrigger_crds::{GpuNodePool, Provider};
use serde_json::{Value, json};

use crate::azure::agent_pool::AgentPoolFixture;
use crate::azure::scale_set::ScaleSetFixture;
use crate::e2e::SimClouds;

/// The AMI every simulated launch template starts from (moto takes any id).
const SIMULATED_AMI: &str = "ami-12345678";

/// What some pools need from the clouds.
#[derive(Debug, Default, PartialEq)]
pub struct CloudFixtures {
    /// `(region, launch template name)`.
    pub launch_templates: BTreeSet<(String, String)>,
    pub scale_sets: Vec<ScaleSetFixture>,
    pub agent_pools: Vec<AgentPoolFixture>,
}

/// Why the fixtures could not be read or made.
#[derive(Debug, thiserror::Error)]
pub enum CloudsError {
    #[error("failed to read {file}: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to parse {file} as YAML: {source}")]
    Yaml {
        file: PathBuf,
        source: Box<serde_saphyr::Error>,
    },
    #[error(
        "{file}, document {document}: not a GpuNodePool the API would accept ({source}); check it with `kubectl apply --dry-run=server -f {file}`"
    )]
    Pool {
        file: PathBuf,
        document: usize,
        source: serde_json::Error,
    },
    #[error("failed to create the launch template {name} in {region}: {message}")]
    LaunchTemplate {
        region: String,
        name: String,
        message: String,
    },
    #[error("failed to create the {what} {name}: {message}")]
    Azure {
        what: &'static str,
        name: String,
        message: String,
    },
}

/// The GpuNodePools in a manifest file; other kinds are skipped.
pub fn pools_in(file: &Path) -> Result<Vec<GpuNodePool>, CloudsError> {
    let text = std::fs::read_to_string(file).map_err(|source| CloudsError::Read {
        file: file.to_path_buf(),
        source,
    })?;
    let documents: Vec<Value> =
        serde_saphyr::from_multiple(&text).map_err(|source| CloudsError::Yaml {
            file: file.to_path_buf(),
            source: Box::new(source),
        })?;
    let mut pools = Vec::new();
    for (i, document) in documents.into_iter().enumerate() {
        if document.get("kind").and_then(Value::as_str) != Some("GpuNodePool") {
            continue;
        }
        let pool = serde_json::from_value(document).map_err(|source| CloudsError::Pool {
            file: file.to_path_buf(),
            document: i + 1,
            source,
        })?;
        pools.push(pool);
    }
    Ok(pools)
}

/// What `pools` need; scale sets are tagged with `cluster` when given, so their VMs
/// become Nodes of that cluster (`hack/peers`).
pub fn needs(pools: &[GpuNodePool], cluster: Option<&str>) -> CloudFixtures {
    let mut fixtures = CloudFixtures::default();
    for pool in pools {
        let Some(scaling) = &pool.spec.scaling else {
            continue;
        };
        match (pool.spec.provider, &scaling.aws, &scaling.azure) {
            (Provider::Aws, Some(aws), _) => {
                fixtures
                    .launch_templates
                    .insert((pool.spec.region.clone(), aws.launch_template.name.clone()));
            }
            (Provider::Azure, _, Some(azure)) => match (&azure.agent_pool, &azure.scale_set_name) {
                (Some(aks), _) => fixtures.agent_pools.push(AgentPoolFixture {
                    subscription_id: aks.subscription_id.clone(),
                    resource_group: aks.resource_group.clone(),
                    cluster: aks.cluster.clone(),
                    name: aks.name.clone(),
                    location: pool.spec.region.clone(),
                    vm_size: pool.spec.instance_type.clone(),
                    zones: pool.spec.zone.iter().cloned().collect(),
                    count: 0,
                    pool: pool.metadata.name.clone(),
                    gpus: Some(pool.spec.gpu.count),
                }),
                (None, Some(name)) => fixtures.scale_sets.push(ScaleSetFixture {
                    subscription_id: azure.subscription_id.clone().unwrap_or_default(),
                    resource_group: azure.resource_group.clone().unwrap_or_default(),
                    name: name.clone(),
                    location: pool.spec.region.clone(),
                    sku: pool.spec.instance_type.clone(),
                    zones: pool.spec.zone.iter().cloned().collect(),
                    capacity: 0,
                    pool: pool.metadata.name.clone(),
                    cluster: cluster.map(str::to_string),
                    tags: Default::default(),
                    gpus: Some(pool.spec.gpu.count),
                }),
                (None, None) => {}
            },
            _ => {}
        }
    }
    fixtures
}

/// Makes the fixtures in the simulators; what exists already is left as it is.
/// Returns one line per fixture saying what happened.
pub async fn create(
    clouds: &SimClouds,
    fixtures: &CloudFixtures,
) -> Result<Vec<String>, CloudsError> {
    let mut done = Vec::new();
    for (region, name) in &fixtures.launch_templates {
        let ec2 = clouds.ec2(region).await;
        let created = ec2
            .create_launch_template()
            .launch_template_name(name)
            .launch_template_data(
                aws_sdk_ec2::types::RequestLaunchTemplateData::builder()
                    .image_id(SIMULATED_AMI)
                    .build(),
            )
            .send()
            .await;
        match created {
            Ok(_) => done.push(format!("launch template {name} ({region}): created")),
            Err(e) => {
                let code = e.as_service_error().and_then(|s| {
                    aws_sdk_ec2::error::ProvideErrorMetadata::code(s).map(str::to_string)
                });
                if code.as_deref() == Some("InvalidLaunchTemplateName.AlreadyExistsException") {
                    done.push(format!("launch template {name} ({region}): exists"));
                } else {
                    return Err(CloudsError::LaunchTemplate {
                        region: region.clone(),
                        name: name.clone(),
                        message: aws_sdk_ec2::error::DisplayErrorContext(&e).to_string(),
                    });
                }
            }
        }
    }
    let http = reqwest::Client::new();
    let base = clouds.control_url.trim_end_matches('/');
    let azure = fixtures
        .scale_sets
        .iter()
        .map(|s| {
            (
                "scalesets",
                "scale set",
                s.name.clone(),
                &s.location,
                json!(s),
            )
        })
        .chain(fixtures.agent_pools.iter().map(|p| {
            let name = format!("{}/{}", p.cluster, p.name);
            ("agentpools", "agent pool", name, &p.location, json!(p))
        }));
    for (path, what, name, location, body) in azure {
        let url = format!("{base}/azure/{path}");
        let failed = |message: String| CloudsError::Azure {
            what,
            name: name.clone(),
            message,
        };
        let response = http
            .post(&url)
            .json(&body)
            .send()
            .await
            .map_err(|e| failed(format!("the control API at {url} did not answer: {e}")))?;
        match response.status().as_u16() {
            201 => done.push(format!("{what} {name} ({location}): created")),
            409 => done.push(format!("{what} {name} ({location}): exists")),
            status => {
                let text = response.text().await.unwrap_or_default();
                return Err(failed(format!("{status}: {text}")));
            }
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pools() -> Vec<GpuNodePool> {
        let root = crate::harness::repo_root();
        let mut pools = pools_in(&root.join("examples/pools-aws.yaml")).unwrap();
        pools.extend(pools_in(&root.join("examples/pools-azure.yaml")).unwrap());
        pools
    }

    #[test]
    fn the_example_pools_need_their_launch_templates_and_scale_sets() {
        let fixtures = needs(&pools(), Some("azure"));
        let templates: Vec<(&str, &str)> = fixtures
            .launch_templates
            .iter()
            .map(|(r, n)| (r.as_str(), n.as_str()))
            .collect();
        assert_eq!(
            templates,
            [
                ("us-east-1", "outrigger-gpu-h100"),
                ("us-west-2", "outrigger-gpu-a100")
            ]
        );
        let sets: Vec<&str> = fixtures
            .scale_sets
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(
            sets,
            [
                "outrigger-eastus-h100",
                "outrigger-eastus2-a100",
                "outrigger-westus3-h100-spot"
            ]
        );
        let first = &fixtures.scale_sets[0];
        assert_eq!(first.zones, ["1"]);
        assert_eq!(first.pool.as_deref(), Some("azure-eastus-h100"));
        assert_eq!(first.cluster.as_deref(), Some("azure"));
        assert_eq!(first.capacity, 0);
    }

    #[test]
    fn a_file_that_is_not_a_pool_names_the_file_and_document() {
        let dir = std::env::temp_dir().join(format!("outrigger-clouds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("bad.yaml");
        std::fs::write(
            &file,
            "kind: ConfigMap\n---\napiVersion: outrigger.dev/v1alpha1\nkind: GpuNodePool\nmetadata: {name: x}\nspec: {provider: gcp}\n",
        )
        .unwrap();
        let e = pools_in(&file).unwrap_err().to_string();
        assert!(e.contains("bad.yaml, document 2"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
