//! EC2 Query API requests as they reach the proxy: `Action=RunInstances&...`,
//! form-encoded in the body (what the SDKs send) or in the query string.

use axum::http::HeaderMap;

/// The region EC2 falls back to when a request names none.
pub const DEFAULT_REGION: &str = "us-east-1";

/// One EC2 request: its parameters in order, and the region it was signed for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ec2Request {
    pub region: String,
    params: Vec<(String, String)>,
}

impl Ec2Request {
    /// Reads the parameters of the query string and the form body, and the region
    /// from the SigV4 credential scope (`Credential=AKID/20250101/us-west-2/ec2/aws4_request`).
    pub fn parse(headers: &HeaderMap, query: Option<&str>, body: &[u8]) -> Self {
        let mut params: Vec<(String, String)> = Vec::new();
        if let Some(q) = query {
            params.extend(form_urlencoded::parse(q.as_bytes()).into_owned());
        }
        params.extend(form_urlencoded::parse(body).into_owned());
        let region = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(region_of_authorization)
            .or_else(|| {
                params
                    .iter()
                    .find(|(k, _)| k == "X-Amz-Credential")
                    .and_then(|(_, v)| region_of_credential(v))
            })
            .unwrap_or(DEFAULT_REGION)
            .to_string();
        Ec2Request { region, params }
    }

    /// A request built by the simulator itself.
    pub fn new(region: &str, params: &[(&str, &str)]) -> Self {
        Ec2Request {
            region: region.to_string(),
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// The `Action` parameter, e.g. `RunInstances`.
    pub fn action(&self) -> Option<&str> {
        self.param("Action")
    }

    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Values of the numbered parameters `prefix.1.suffix`, `prefix.2.suffix`, ...
    pub fn numbered(&self, prefix: &str, suffix: &str) -> Vec<&str> {
        self.params
            .iter()
            .filter(|(k, _)| {
                k.strip_prefix(prefix)
                    .and_then(|rest| rest.strip_prefix('.'))
                    .and_then(|rest| rest.split_once('.'))
                    .is_some_and(|(n, s)| s == suffix && n.parse::<u32>().is_ok())
            })
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The value of tag `key` in the request's tag specifications
    /// (`TagSpecification.N.Tag.M.Key` and `.Value`).
    pub fn tag(&self, key: &str) -> Option<&str> {
        let name = self
            .params
            .iter()
            .find(|(k, v)| k.starts_with("TagSpecification.") && k.ends_with(".Key") && v == key)
            .map(|(k, _)| k.trim_end_matches(".Key").to_string())?;
        self.param(&format!("{name}.Value"))
    }

    /// Sets a parameter, replacing an existing one in place.
    pub fn set_param(&mut self, name: &str, value: &str) {
        match self.params.iter_mut().find(|(k, _)| k == name) {
            Some((_, v)) => *v = value.to_string(),
            None => self.params.push((name.to_string(), value.to_string())),
        }
    }

    /// Adds `Filter.N.Name=name` and `Filter.N.Value.M=...` after the filters present.
    pub fn add_filter(&mut self, name: &str, values: &[&str]) {
        let n = self
            .params
            .iter()
            .filter(|(k, _)| k.starts_with("Filter.") && k.ends_with(".Name"))
            .count()
            + 1;
        self.params
            .push((format!("Filter.{n}.Name"), name.to_string()));
        for (m, value) in values.iter().enumerate() {
            self.params
                .push((format!("Filter.{n}.Value.{}", m + 1), value.to_string()));
        }
    }

    /// The parameters, form-encoded.
    pub fn encode(&self) -> String {
        form_urlencoded::Serializer::new(String::new())
            .extend_pairs(self.params.iter())
            .finish()
    }

    /// Every parameter except `ClientToken`, in a canonical order: what makes two
    /// `RunInstances` calls with the same token the same request.
    pub fn fingerprint(&self) -> String {
        let mut params: Vec<_> = self
            .params
            .iter()
            .filter(|(k, _)| k != "ClientToken")
            .collect();
        params.sort();
        form_urlencoded::Serializer::new(String::new())
            .extend_pairs(params)
            .finish()
    }
}

/// The region in a SigV4 `Authorization` header.
pub fn region_of_authorization(value: &str) -> Option<&str> {
    let credential = value.split("Credential=").nth(1)?;
    let credential = credential.split([',', ' ']).next()?;
    region_of_credential(credential)
}

/// The region in a SigV4 credential: `AKID/date/region/service/aws4_request`.
fn region_of_credential(credential: &str) -> Option<&str> {
    let region = credential.split('/').nth(2)?;
    (!region.is_empty()).then_some(region)
}

/// A launch template as `RunInstances` names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TemplateRef {
    Id(String),
    Name(String),
}

/// What a `RunInstances` request asks for, before anything is looked up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchRequest {
    pub min_count: u32,
    pub max_count: u32,
    pub instance_type: Option<String>,
    pub template: Option<(TemplateRef, Option<String>)>,
    pub subnet_id: Option<String>,
    pub zone: Option<String>,
}

impl LaunchRequest {
    pub fn of(request: &Ec2Request) -> Self {
        let count = |name: &str| request.param(name).and_then(|v| v.parse::<u32>().ok());
        let min_count = count("MinCount").unwrap_or(1);
        let max_count = count("MaxCount").unwrap_or(min_count).max(min_count);
        let template = request
            .param("LaunchTemplate.LaunchTemplateId")
            .map(|id| TemplateRef::Id(id.to_string()))
            .or_else(|| {
                request
                    .param("LaunchTemplate.LaunchTemplateName")
                    .map(|name| TemplateRef::Name(name.to_string()))
            })
            .map(|t| (t, request.param("LaunchTemplate.Version").map(String::from)));
        let subnet_id = request
            .param("SubnetId")
            .or_else(|| {
                request
                    .numbered("NetworkInterface", "SubnetId")
                    .first()
                    .copied()
            })
            .map(String::from);
        LaunchRequest {
            min_count,
            max_count,
            instance_type: request.param("InstanceType").map(String::from),
            template,
            subnet_id,
            zone: request
                .param("Placement.AvailabilityZone")
                .map(String::from),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn signed(region: &str, body: &str) -> Ec2Request {
        let mut headers = HeaderMap::new();
        headers.insert(
            "authorization",
            HeaderValue::from_str(&format!(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20260101/{region}/ec2/aws4_request, SignedHeaders=host;x-amz-date, Signature=abc"
            ))
            .unwrap(),
        );
        Ec2Request::parse(&headers, None, body.as_bytes())
    }

    #[test]
    fn region_comes_from_the_credential_scope() {
        let r = signed("eu-west-1", "Action=DescribeInstances&Version=2016-11-15");
        assert_eq!(r.region, "eu-west-1");
        assert_eq!(r.action(), Some("DescribeInstances"));
        let unsigned = Ec2Request::parse(&HeaderMap::new(), Some("Action=X"), b"");
        assert_eq!(unsigned.region, DEFAULT_REGION);
        assert_eq!(unsigned.action(), Some("X"));
    }

    #[test]
    fn launch_request_reads_counts_template_and_placement() {
        let r = signed(
            "us-east-1",
            "Action=RunInstances&MinCount=1&MaxCount=3&LaunchTemplate.LaunchTemplateName=gpu&LaunchTemplate.Version=%24Latest&NetworkInterface.1.SubnetId=subnet-9&NetworkInterface.1.DeviceIndex=0",
        );
        let launch = LaunchRequest::of(&r);
        assert_eq!((launch.min_count, launch.max_count), (1, 3));
        assert_eq!(
            launch.template,
            Some((TemplateRef::Name("gpu".into()), Some("$Latest".into())))
        );
        assert_eq!(launch.subnet_id.as_deref(), Some("subnet-9"));
        assert_eq!(launch.instance_type, None);
        assert_eq!(launch.zone, None);
    }

    #[test]
    fn set_param_and_encode_round_trip() {
        let mut r = signed("us-east-1", "Action=RunInstances&MinCount=1&MaxCount=4");
        r.set_param("MinCount", "2");
        r.set_param("MaxCount", "2");
        r.add_filter("instance-state-name", &["pending", "running"]);
        assert_eq!(
            r.encode(),
            "Action=RunInstances&MinCount=2&MaxCount=2&Filter.1.Name=instance-state-name&Filter.1.Value.1=pending&Filter.1.Value.2=running"
        );
    }

    #[test]
    fn fingerprint_ignores_the_client_token_and_order() {
        let a = signed("us-east-1", "Action=RunInstances&ClientToken=a&MinCount=1");
        let b = signed("us-east-1", "MinCount=1&Action=RunInstances&ClientToken=b");
        assert_eq!(a.fingerprint(), b.fingerprint());
    }
}
