//! The simulator's own calls to moto: forwarding client requests, and the few EC2
//! look-ups the proxy and the node registrar need, read from moto's XML.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode};
use roxmltree::{Document, Node};

use super::query::{Ec2Request, TemplateRef};

/// EC2 API version the simulator's own requests speak.
const API_VERSION: &str = "2016-11-15";
/// moto answers 100 reservations per page; more pages than this means a runaway loop.
const MAX_PAGES: usize = 1000;

/// Why a call to moto failed.
#[derive(Debug, thiserror::Error)]
pub enum MotoError {
    #[error("failed to reach moto: {0}")]
    Unreachable(#[from] reqwest::Error),
    #[error("moto answered {status}: {code}: {message}")]
    Api {
        status: StatusCode,
        code: String,
        message: String,
    },
    #[error("failed to parse moto's answer: {0}")]
    Xml(#[from] roxmltree::Error),
}

/// A client of one moto server.
#[derive(Clone, Debug)]
pub struct MotoClient {
    http: reqwest::Client,
    base: String,
}

/// An EC2 instance as the registrar and the proxy see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    /// `pending`, `running`, `shutting-down`, `terminated`, `stopping`, `stopped`.
    pub state: String,
    pub instance_type: String,
    pub zone: String,
    pub tags: BTreeMap<String, String>,
}

impl Instance {
    /// True while the instance runs or is starting.
    pub fn is_up(&self) -> bool {
        matches!(self.state.as_str(), "pending" | "running")
    }
}

/// What an instance type offers a Node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InstanceShape {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub gpus: u32,
}

impl MotoClient {
    pub fn new(base: &str) -> Self {
        MotoClient {
            http: reqwest::Client::new(),
            base: base.trim_end_matches('/').to_string(),
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends a client's request on to moto as it came (less hop-by-hop headers).
    pub async fn forward(
        &self,
        method: Method,
        path_and_query: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<reqwest::Response, MotoError> {
        let mut forwarded = HeaderMap::new();
        for (name, value) in headers {
            if !matches!(
                name.as_str(),
                "host" | "content-length" | "connection" | "transfer-encoding" | "expect"
            ) {
                forwarded.append(name.clone(), value.clone());
            }
        }
        Ok(self
            .http
            .request(method, format!("{}{path_and_query}", self.base))
            .headers(forwarded)
            .body(body)
            .send()
            .await?)
    }

    /// Sends an EC2 request of the simulator's own, signed (in name only) for its region.
    pub async fn call(&self, request: &Ec2Request) -> Result<String, MotoError> {
        let response = self
            .http
            .post(format!("{}/", self.base))
            .header(
                "authorization",
                format!(
                    "AWS4-HMAC-SHA256 Credential=outrigger-sim/20260101/{}/ec2/aws4_request, SignedHeaders=host, Signature=0",
                    request.region
                ),
            )
            .header("content-type", "application/x-www-form-urlencoded")
            .body(request.encode())
            .send()
            .await?;
        let status = response.status();
        let text = response.text().await?;
        if status.is_success() {
            return Ok(text);
        }
        let (code, message) = parse_error(&text).unwrap_or_else(|| ("Unknown".into(), text));
        Err(MotoError::Api {
            status,
            code,
            message,
        })
    }

    /// Instances in `region` matching EC2 `filters` (name, values), every page.
    pub async fn instances(
        &self,
        region: &str,
        filters: &[(&str, &[&str])],
    ) -> Result<Vec<Instance>, MotoError> {
        let mut all = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut request = Ec2Request::new(
                region,
                &[("Action", "DescribeInstances"), ("Version", API_VERSION)],
            );
            for (name, values) in filters {
                request.add_filter(name, values);
            }
            if let Some(t) = &token {
                request.set_param("NextToken", t);
            }
            let xml = self.call(&request).await?;
            let (page, next) = parse_instances(&xml)?;
            all.extend(page);
            match next {
                Some(t) => token = Some(t),
                None => return Ok(all),
            }
        }
        Ok(all)
    }

    /// The region and instance of `id`, looked for in `regions`.
    pub async fn find_instance(
        &self,
        regions: &[String],
        id: &str,
    ) -> Result<Option<(String, Instance)>, MotoError> {
        for region in regions {
            let found = self.instances(region, &[("instance-id", &[id])]).await?;
            if let Some(i) = found.into_iter().find(|i| i.id == id) {
                return Ok(Some((region.clone(), i)));
            }
        }
        Ok(None)
    }

    /// Terminates one instance (what the cloud does at an interruption's deadline).
    pub async fn terminate(&self, region: &str, id: &str) -> Result<(), MotoError> {
        let request = Ec2Request::new(
            region,
            &[
                ("Action", "TerminateInstances"),
                ("Version", API_VERSION),
                ("InstanceId.1", id),
            ],
        );
        self.call(&request).await.map(|_| ())
    }

    /// How many instances of `instance_type` run or start in `region` (in `zone`, when given).
    pub async fn count_up(
        &self,
        region: &str,
        instance_type: &str,
        zone: Option<&str>,
    ) -> Result<u32, MotoError> {
        let mut filters: Vec<(&str, &[&str])> = vec![
            ("instance-type", std::slice::from_ref(&instance_type)),
            ("instance-state-name", &["pending", "running"]),
        ];
        let zone_values;
        if let Some(z) = zone {
            zone_values = [z];
            filters.push(("availability-zone", &zone_values));
        }
        let found = self.instances(region, &filters).await?;
        Ok(u32::try_from(found.len()).unwrap_or(u32::MAX))
    }

    /// The availability zone of a subnet; `None` when moto does not know the subnet.
    pub async fn subnet_zone(
        &self,
        region: &str,
        subnet_id: &str,
    ) -> Result<Option<String>, MotoError> {
        let request = Ec2Request::new(
            region,
            &[
                ("Action", "DescribeSubnets"),
                ("Version", API_VERSION),
                ("SubnetId.1", subnet_id),
            ],
        );
        let xml = match self.call(&request).await {
            Err(MotoError::Api { .. }) => return Ok(None),
            other => other?,
        };
        let doc = Document::parse(&xml)?;
        Ok(path(doc.root_element(), &["subnetSet", "item"])
            .and_then(|item| text(item, "availabilityZone")))
    }

    /// The instance type a launch template version sets; `None` when it sets none or
    /// moto does not know the template.
    pub async fn template_instance_type(
        &self,
        region: &str,
        template: &TemplateRef,
        version: Option<&str>,
    ) -> Result<Option<String>, MotoError> {
        let (key, value) = match template {
            TemplateRef::Id(id) => ("LaunchTemplateId", id.as_str()),
            TemplateRef::Name(name) => ("LaunchTemplateName", name.as_str()),
        };
        let request = Ec2Request::new(
            region,
            &[
                ("Action", "DescribeLaunchTemplateVersions"),
                ("Version", API_VERSION),
                (key, value),
                ("LaunchTemplateVersion.1", version.unwrap_or("$Default")),
            ],
        );
        let xml = match self.call(&request).await {
            Err(MotoError::Api { .. }) => return Ok(None),
            other => other?,
        };
        let doc = Document::parse(&xml)?;
        Ok(path(
            doc.root_element(),
            &["launchTemplateVersionSet", "item", "launchTemplateData"],
        )
        .and_then(|data| text(data, "instanceType")))
    }

    /// vCPUs, memory and GPUs of an instance type; `None` when moto does not know it.
    pub async fn instance_shape(
        &self,
        region: &str,
        instance_type: &str,
    ) -> Result<Option<InstanceShape>, MotoError> {
        let request = Ec2Request::new(
            region,
            &[
                ("Action", "DescribeInstanceTypes"),
                ("Version", API_VERSION),
                ("InstanceType.1", instance_type),
            ],
        );
        let xml = match self.call(&request).await {
            Err(MotoError::Api { .. }) => return Ok(None),
            other => other?,
        };
        parse_instance_shape(&xml)
    }

    /// Forgets every resource moto holds.
    pub async fn reset(&self) -> Result<(), MotoError> {
        self.http
            .post(format!("{}/moto-api/reset", self.base))
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }
}

fn child<'a, 'i>(node: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    node.children()
        .find(|c| c.is_element() && c.tag_name().name() == name)
}

fn children<'a, 'i: 'a>(
    node: Node<'a, 'i>,
    name: &'a str,
) -> impl Iterator<Item = Node<'a, 'i>> + 'a {
    node.children()
        .filter(move |c| c.is_element() && c.tag_name().name() == name)
}

fn path<'a, 'i>(node: Node<'a, 'i>, names: &[&str]) -> Option<Node<'a, 'i>> {
    names.iter().try_fold(node, |n, name| child(n, name))
}

fn text(node: Node<'_, '_>, name: &str) -> Option<String> {
    child(node, name)
        .and_then(|c| c.text())
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// The code and message of an EC2 XML error response.
pub fn parse_error(xml: &str) -> Option<(String, String)> {
    let doc = Document::parse(xml).ok()?;
    let error = path(doc.root_element(), &["Errors", "Error"])?;
    Some((
        text(error, "Code")?,
        text(error, "Message").unwrap_or_default(),
    ))
}

/// The instances of one `DescribeInstances` page, and the next page's token.
pub fn parse_instances(xml: &str) -> Result<(Vec<Instance>, Option<String>), MotoError> {
    let doc = Document::parse(xml)?;
    let root = doc.root_element();
    let mut found = Vec::new();
    for reservation in child(root, "reservationSet")
        .into_iter()
        .flat_map(|set| children(set, "item"))
    {
        for item in child(reservation, "instancesSet")
            .into_iter()
            .flat_map(|set| children(set, "item"))
        {
            let tags = child(item, "tagSet")
                .into_iter()
                .flat_map(|set| children(set, "item"))
                .filter_map(|tag| Some((text(tag, "key")?, text(tag, "value").unwrap_or_default())))
                .collect();
            found.push(Instance {
                id: text(item, "instanceId").unwrap_or_default(),
                state: path(item, &["instanceState"])
                    .and_then(|s| text(s, "name"))
                    .unwrap_or_default(),
                instance_type: text(item, "instanceType").unwrap_or_default(),
                zone: path(item, &["placement"])
                    .and_then(|p| text(p, "availabilityZone"))
                    .unwrap_or_default(),
                tags,
            });
        }
    }
    Ok((found, text(root, "nextToken")))
}

/// The shape of the first instance type in a `DescribeInstanceTypes` answer.
pub fn parse_instance_shape(xml: &str) -> Result<Option<InstanceShape>, MotoError> {
    let doc = Document::parse(xml)?;
    let Some(item) = path(doc.root_element(), &["instanceTypeSet", "item"]) else {
        return Ok(None);
    };
    let number = |node: Option<Node<'_, '_>>, name: &str| {
        node.and_then(|n| text(n, name))
            .and_then(|t| t.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let gpus = child(item, "gpuInfo")
        .and_then(|g| child(g, "gpus"))
        .into_iter()
        .flat_map(|set| children(set, "item"))
        .map(|gpu| number(Some(gpu), "count"))
        .sum::<u64>();
    Ok(Some(InstanceShape {
        vcpus: u32::try_from(number(child(item, "vCpuInfo"), "defaultVCpus")).unwrap_or(u32::MAX),
        memory_mib: number(child(item, "memoryInfo"), "sizeInMiB"),
        gpus: u32::try_from(gpus).unwrap_or(u32::MAX),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DESCRIBE: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15"><requestId>r</requestId>
<reservationSet><item><reservationId>r-1</reservationId><groupSet/><instancesSet>
<item><instanceId>i-1</instanceId><instanceState><code>16</code><name>running</name></instanceState>
<instanceType>p5.48xlarge</instanceType><placement><availabilityZone>us-east-1b</availabilityZone></placement>
<groupSet><item><groupId>sg-1</groupId></item></groupSet>
<tagSet><item><key>outrigger.dev/pool</key><value>aws-h100</value></item><item><key>empty</key><value/></item></tagSet></item>
<item><instanceId>i-2</instanceId><instanceState><code>48</code><name>terminated</name></instanceState>
<instanceType>p5.48xlarge</instanceType><placement><availabilityZone>us-east-1a</availabilityZone></placement></item>
</instancesSet></item></reservationSet><nextToken>r-1</nextToken></DescribeInstancesResponse>"#;

    #[test]
    fn describe_instances_yields_state_zone_and_tags() {
        let (instances, next) = parse_instances(DESCRIBE).unwrap();
        assert_eq!(next.as_deref(), Some("r-1"));
        assert_eq!(instances.len(), 2);
        let first = &instances[0];
        assert_eq!(first.id, "i-1");
        assert!(first.is_up());
        assert_eq!(first.zone, "us-east-1b");
        assert_eq!(
            first.tags.get("outrigger.dev/pool").map(String::as_str),
            Some("aws-h100")
        );
        assert_eq!(first.tags.get("empty").map(String::as_str), Some(""));
        assert!(!instances[1].is_up());
    }

    #[test]
    fn instance_shape_counts_gpus_not_gpu_memory() {
        let xml = r#"<DescribeInstanceTypesResponse><instanceTypeSet><item>
<instanceType>p5.48xlarge</instanceType><vCpuInfo><defaultVCpus>192</defaultVCpus></vCpuInfo>
<memoryInfo><sizeInMiB>2097152</sizeInMiB></memoryInfo>
<gpuInfo><gpus><item><name>H100</name><count>8</count><memoryInfo><sizeInMiB>81920</sizeInMiB></memoryInfo></item></gpus></gpuInfo>
</item></instanceTypeSet></DescribeInstanceTypesResponse>"#;
        assert_eq!(
            parse_instance_shape(xml).unwrap(),
            Some(InstanceShape {
                vcpus: 192,
                memory_mib: 2_097_152,
                gpus: 8
            })
        );
        assert_eq!(
            parse_instance_shape("<R><instanceTypeSet/></R>").unwrap(),
            None
        );
    }

    #[test]
    fn error_responses_give_code_and_message() {
        let xml = r#"<Response><Errors><Error><Code>InvalidSubnetID.NotFound</Code><Message>nope</Message></Error></Errors><RequestID>x</RequestID></Response>"#;
        assert_eq!(
            parse_error(xml),
            Some(("InvalidSubnetID.NotFound".into(), "nope".into()))
        );
    }
}
