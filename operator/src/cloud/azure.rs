//! Azure pools: a VM scale set (on `azure_mgmt_compute`) or an AKS agent pool.
//!
//! - A scale set grows by its `sku.capacity` and shrinks by deleting chosen
//!   instances (`deleteInstances`).
//! - An agent pool grows by its `count` (a read, then a PUT of the whole pool with
//!   the new count, under its ETag) and shrinks by `deleteMachines`. Its instances
//!   are its machines. These few calls go through azure_core's transport with typed
//!   bodies ([`aks`]), not the stale `azure_mgmt_containerservice`, which needs an
//!   azure_core of its own.
//!
//! All four changes are long-running operations that we follow ourselves (the
//! crate's `.await` does not): poll `Azure-AsyncOperation`, falling back to
//! `Location`, honouring `Retry-After`, until `Succeeded`, `Failed` or `Canceled`.

use std::sync::Arc;
use std::time::Duration;

use azure_core::auth::{AccessToken, TokenCredential};
use azure_core::headers::{HeaderName, Headers};
use azure_core::{HttpClient, Method, Request, RetryOptions, TransportOptions, Url};
use azure_mgmt_compute::package_2024_07_01::models::{
    Sku, VirtualMachineScaleSetUpdate, VirtualMachineScaleSetVmInstanceRequiredIDs,
};
use azure_mgmt_compute::package_2024_07_01::{Client, ClientBuilder};
use futures::StreamExt;
use outrigger_crds::Provider;

use super::{
    CloudError, CloudProvider, ErrorKind, Instance, InstanceState, Launch, Target, TargetScaling,
};

mod aks;

/// Azure Resource Manager, when no endpoint is given.
const ARM: &str = "https://management.azure.com";
/// How often an operation is polled when the server does not say (ARM's own
/// guidance for a missing `Retry-After`).
const DEFAULT_POLL: Duration = Duration::from_secs(10);
/// Polls never wait longer than this, whatever `Retry-After` says, so a deadline is
/// noticed in time.
const MAX_POLL: Duration = Duration::from_secs(60);

/// How to reach Azure.
#[derive(Debug, Clone)]
pub struct AzureSettings {
    /// Another ARM endpoint (the simulator).
    pub endpoint_url: Option<String>,
    /// A fixed bearer token (the simulator takes any); otherwise the default
    /// credential chain: client secret from `AZURE_CLIENT_ID`/`AZURE_CLIENT_SECRET`/
    /// `AZURE_TENANT_ID`, workload identity (`AZURE_FEDERATED_TOKEN_FILE`), managed
    /// identity, then the Azure CLI.
    pub static_token: Option<String>,
    /// The most a long-running operation may take before it counts as failed.
    pub operation_timeout: Duration,
    /// CA certificates (PEM) to trust besides the public roots (`--azure-ca-file`):
    /// a private endpoint's, or the simulator's.
    pub ca_pem: Option<Vec<u8>>,
}

/// A credential that hands out one fixed token.
#[derive(Debug)]
struct StaticToken(String);

#[async_trait::async_trait]
impl TokenCredential for StaticToken {
    async fn get_token(&self, _scopes: &[&str]) -> azure_core::Result<AccessToken> {
        Ok(AccessToken::new(
            self.0.clone(),
            time::OffsetDateTime::now_utc() + time::Duration::hours(1),
        ))
    }

    async fn clear_cache(&self) -> azure_core::Result<()> {
        Ok(())
    }
}

tokio::task_local! {
    /// The `Retry-After` of the last throttled answer in this call.
    static RETRY_AFTER: std::cell::Cell<Option<Duration>>;
}

/// The HTTP transport, remembering `Retry-After` of 429 and 503 answers: the
/// crate's errors drop the headers.
#[derive(Debug)]
struct Transport(Arc<dyn HttpClient>);

#[async_trait::async_trait]
impl HttpClient for Transport {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<azure_core::Response> {
        let response = self.0.execute_request(request).await?;
        let status = u16::from(response.status());
        if status == 429 || status == 503 {
            let after = retry_after(response.headers());
            let _ = RETRY_AFTER.try_with(|c| c.set(after));
        }
        Ok(response)
    }
}

fn retry_after(headers: &Headers) -> Option<Duration> {
    headers
        .get_optional_string(&HeaderName::from_static("retry-after"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

pub struct Azure {
    client: Client,
    endpoint: Url,
    credential: Arc<dyn TokenCredential>,
    http: Arc<dyn HttpClient>,
    scope: String,
    operation_timeout: Duration,
}

impl Azure {
    pub fn new(settings: &AzureSettings) -> azure_core::Result<Azure> {
        let credential: Arc<dyn TokenCredential> = match &settings.static_token {
            Some(token) => Arc::new(StaticToken(token.clone())),
            None => azure_identity::create_default_credential()?,
        };
        let endpoint = Url::parse(settings.endpoint_url.as_deref().unwrap_or(ARM))?;
        let scope = endpoint
            .join(azure_core::auth::DEFAULT_SCOPE_SUFFIX)?
            .to_string();
        let inner: Arc<dyn HttpClient> = match &settings.ca_pem {
            Some(pem) => Arc::new(client_trusting(pem)?),
            None => azure_core::new_http_client(),
        };
        let http: Arc<dyn HttpClient> = Arc::new(Transport(inner));
        let client = ClientBuilder::new(credential.clone())
            .endpoint(endpoint.clone())
            .scopes(&[&scope])
            // The metered wrapper retries, counting each attempt.
            .retry(RetryOptions::none())
            .transport(TransportOptions::new(http.clone()))
            .build()?;
        Ok(Azure {
            client,
            endpoint,
            credential,
            http,
            scope,
            operation_timeout: settings.operation_timeout,
        })
    }

    /// Follows a long-running operation from the headers of the answer that
    /// started it.
    async fn follow(&self, operation: &'static str, headers: &Headers) -> Result<(), CloudError> {
        let async_operation =
            headers.get_optional_string(&HeaderName::from_static("azure-asyncoperation"));
        let location = headers.get_optional_string(&HeaderName::from_static("location"));
        let mut wait = retry_after(headers).unwrap_or(DEFAULT_POLL).min(MAX_POLL);
        let (url, via_status) = match (async_operation, location) {
            (Some(url), _) => (url, true),
            (None, Some(url)) => (url, false),
            // Finished synchronously.
            (None, None) => return Ok(()),
        };
        let url = Url::parse(&url).map_err(|e| {
            CloudError::new(
                ErrorKind::Transient,
                operation,
                "BadOperationUrl",
                e.to_string(),
            )
        })?;
        let deadline = tokio::time::Instant::now() + self.operation_timeout;
        loop {
            let now = tokio::time::Instant::now();
            if now + wait > deadline {
                tokio::time::sleep_until(deadline).await;
                return Err(CloudError::new(
                    ErrorKind::Transient,
                    operation,
                    "OperationTimedOut",
                    format!(
                        "the operation {url} did not finish within {:?}",
                        self.operation_timeout
                    ),
                ));
            }
            tokio::time::sleep(wait).await;
            let (status, headers, body) = self.poll(operation, &url).await?;
            wait = retry_after(&headers).unwrap_or(DEFAULT_POLL).min(MAX_POLL);
            if status == 429 {
                continue;
            }
            if via_status {
                if !(200..300).contains(&status) {
                    return Err(http_failure(operation, status, &body));
                }
                let value: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                match value["status"].as_str().unwrap_or("InProgress") {
                    "Succeeded" => return Ok(()),
                    "Failed" | "Canceled" => {
                        let code = value["error"]["code"].as_str().unwrap_or("OperationFailed");
                        let message = value["error"]["message"].as_str().unwrap_or_default();
                        return Err(CloudError::new(
                            classify(code, 200),
                            operation,
                            code,
                            message,
                        ));
                    }
                    _ => {}
                }
            } else {
                match status {
                    202 => {}
                    200..=299 => return Ok(()),
                    _ => return Err(http_failure(operation, status, &body)),
                }
            }
        }
    }

    /// One request with the bearer token, no retries: status, headers and body.
    async fn send(
        &self,
        operation: &'static str,
        method: Method,
        url: &Url,
        headers: &[(&'static str, String)],
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Headers, Vec<u8>), CloudError> {
        let token = self
            .credential
            .get_token(&[&self.scope])
            .await
            .map_err(|e| azure_error(operation, &e))?;
        let mut request = Request::new(url.clone(), method);
        request.insert_header(
            azure_core::headers::AUTHORIZATION,
            format!("Bearer {}", token.token.secret()),
        );
        for (name, value) in headers {
            request.insert_header(HeaderName::from_static(name), value.clone());
        }
        if let Some(body) = body {
            request.insert_header(azure_core::headers::CONTENT_TYPE, "application/json");
            request.set_body(body);
        }
        let response = self
            .http
            .execute_request(&request)
            .await
            .map_err(|e| azure_error(operation, &e))?;
        let (status, headers, body) = response.deconstruct();
        let body = body
            .collect()
            .await
            .map_err(|e| azure_error(operation, &e))?
            .to_vec();
        Ok((u16::from(status), headers, body))
    }

    /// One GET of an operation URL: status, headers and body.
    async fn poll(
        &self,
        operation: &'static str,
        url: &Url,
    ) -> Result<(u16, Headers, Vec<u8>), CloudError> {
        self.send(operation, Method::Get, url, &[], None).await
    }
}

/// A reqwest client (azure_core's transport) that also trusts the CAs in `pem`.
fn client_trusting(pem: &[u8]) -> azure_core::Result<reqwest::Client> {
    let bad = |e: &dyn std::fmt::Display| {
        azure_core::Error::with_message(azure_core::error::ErrorKind::Other, || {
            format!("--azure-ca-file: {e}")
        })
    };
    let certificates = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| bad(&e))?;
    if certificates.is_empty() {
        return Err(bad(&"no PEM CERTIFICATE block in the file"));
    }
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        // As azure_core's own client: no idle connections kept (hyper#2312).
        .pool_max_idle_per_host(0);
    for certificate in certificates {
        builder = builder.add_root_certificate(certificate);
    }
    builder.build().map_err(|e| bad(&e))
}

fn scale_set(target: &Target) -> Result<(&str, &str, &str), CloudError> {
    match &target.scaling {
        TargetScaling::Azure {
            subscription_id,
            resource_group,
            scale_set,
        } => Ok((subscription_id, resource_group, scale_set)),
        _ => Err(CloudError::new(
            ErrorKind::Invalid,
            "scale",
            "NotAScaleSetPool",
            format!("pool {} has no scaling.azure.scaleSetName", target.pool),
        )),
    }
}

/// An ARM error code (and HTTP status) as the scaler sees it.
pub fn classify(code: &str, status: u16) -> ErrorKind {
    match code {
        "SkuNotAvailable"
        | "ZonalAllocationFailed"
        | "AllocationFailed"
        | "OverconstrainedAllocationRequest"
        | "OverconstrainedZonalAllocationRequest" => ErrorKind::InsufficientCapacity,
        "OperationNotAllowed"
        | "QuotaExceeded"
        | "InsufficientVCPUQuota"
        | "ErrCode_InsufficientVCPUQuota" => ErrorKind::QuotaExceeded,
        "TooManyRequests" => ErrorKind::Throttled { retry_after: None },
        "AuthenticationFailed" | "AuthorizationFailed" | "InvalidAuthenticationToken" => {
            ErrorKind::Unauthorized
        }
        "ResourceNotFound" | "NotFound" | "ResourceGroupNotFound" => ErrorKind::NotFound,
        _ => match status {
            429 => ErrorKind::Throttled { retry_after: None },
            401 | 403 => ErrorKind::Unauthorized,
            404 => ErrorKind::NotFound,
            400..=499 => ErrorKind::Invalid,
            _ => ErrorKind::Transient,
        },
    }
}

fn http_failure(operation: &'static str, status: u16, body: &[u8]) -> CloudError {
    let value: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let code = value["error"]["code"]
        .as_str()
        .map_or_else(|| format!("HTTP{status}"), str::to_string);
    let message = value["error"]["message"].as_str().unwrap_or_default();
    CloudError::new(classify(&code, status), operation, code, message)
}

/// A failed answer with its headers: a throttled one keeps its `Retry-After`.
fn failure_with(
    operation: &'static str,
    status: u16,
    headers: &Headers,
    body: &[u8],
) -> CloudError {
    let mut error = http_failure(operation, status, body);
    if let ErrorKind::Throttled { retry_after } = &mut error.kind {
        *retry_after = self::retry_after(headers);
    }
    error
}

fn azure_error(operation: &'static str, e: &azure_core::Error) -> CloudError {
    match e.kind() {
        azure_core::error::ErrorKind::HttpResponse { status, error_code } => {
            let status = u16::from(*status);
            let code = error_code
                .clone()
                .unwrap_or_else(|| format!("HTTP{status}"));
            let mut kind = classify(&code, status);
            if let ErrorKind::Throttled { retry_after } = &mut kind {
                *retry_after = RETRY_AFTER.try_with(std::cell::Cell::get).ok().flatten();
            }
            let message = e
                .as_http_error()
                .and_then(|h| h.error_message())
                .unwrap_or_default()
                .to_string();
            CloudError::new(kind, operation, code, message)
        }
        azure_core::error::ErrorKind::Credential => CloudError::new(
            ErrorKind::Unauthorized,
            operation,
            "Credential",
            e.to_string(),
        ),
        _ => CloudError::new(
            ErrorKind::Transient,
            operation,
            "Unreachable",
            e.to_string(),
        ),
    }
}

fn state_of(provisioning: Option<&str>) -> InstanceState {
    match provisioning {
        Some("Creating" | "Updating") => InstanceState::Pending,
        Some("Deleting") => InstanceState::Stopping,
        Some("Deleted") => InstanceState::Terminated,
        _ => InstanceState::Running,
    }
}

#[async_trait::async_trait]
impl CloudProvider for Azure {
    fn provider(&self) -> Provider {
        Provider::Azure
    }

    async fn instances(&self, target: &Target) -> Result<Vec<Instance>, CloudError> {
        if let Some(pool) = aks::Pool::of(target) {
            return self.machines(&pool).await;
        }
        let (sub, rg, name) = scale_set(target)?;
        RETRY_AFTER
            .scope(std::cell::Cell::new(None), async {
                let mut pages = self
                    .client
                    .virtual_machine_scale_set_v_ms_client()
                    .list(rg, name, sub)
                    .into_stream();
                let mut found = Vec::new();
                while let Some(page) = pages.next().await {
                    let page = page.map_err(|e| azure_error("list instances", &e))?;
                    for vm in page.value {
                        let Some(id) = vm.instance_id.clone() else {
                            continue;
                        };
                        let resource_id = vm.resource.id.clone().unwrap_or_else(|| {
                            format!("/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachineScaleSets/{name}/virtualMachines/{id}")
                        });
                        found.push(Instance {
                            id,
                            provider_id: format!("azure://{resource_id}"),
                            state: state_of(
                                vm.properties
                                    .as_ref()
                                    .and_then(|p| p.provisioning_state.as_deref()),
                            ),
                            launched: None,
                        });
                    }
                }
                Ok(found)
            })
            .await
    }

    async fn launch(&self, target: &Target, launch: &Launch) -> Result<u32, CloudError> {
        if let Some(pool) = aks::Pool::of(target) {
            return self.grow_agent_pool(&pool, launch).await;
        }
        let (sub, rg, name) = scale_set(target)?;
        // An absolute capacity: sending it again after a crash or a timeout asks for
        // the same scale set, never for more.
        let capacity = i64::from(launch.have) + i64::from(launch.add);
        let update = VirtualMachineScaleSetUpdate {
            sku: Some(Sku {
                name: None,
                tier: None,
                capacity: Some(capacity),
            }),
            ..Default::default()
        };
        let started = RETRY_AFTER
            .scope(std::cell::Cell::new(None), async {
                self.client
                    .virtual_machine_scale_sets_client()
                    .update(rg, name, update, sub)
                    .send()
                    .await
                    .map_err(|e| azure_error("launch", &e))
            })
            .await?;
        self.follow("launch", started.into_raw_response().headers())
            .await?;
        Ok(launch.add)
    }

    async fn terminate(&self, target: &Target, ids: &[String]) -> Result<(), CloudError> {
        if ids.is_empty() {
            return Ok(());
        }
        if let Some(pool) = aks::Pool::of(target) {
            return self.delete_machines(&pool, ids).await;
        }
        let (sub, rg, name) = scale_set(target)?;
        let chosen = VirtualMachineScaleSetVmInstanceRequiredIDs {
            instance_ids: ids.to_vec(),
        };
        let started = RETRY_AFTER
            .scope(std::cell::Cell::new(None), async {
                self.client
                    .virtual_machine_scale_sets_client()
                    .delete_instances(rg, name, chosen, sub)
                    .send()
                    .await
                    .map_err(|e| azure_error("terminate", &e))
            })
            .await?;
        self.follow("terminate", started.into_raw_response().headers())
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_classified() {
        for (code, status, kind) in [
            ("SkuNotAvailable", 409, ErrorKind::InsufficientCapacity),
            (
                "ZonalAllocationFailed",
                200,
                ErrorKind::InsufficientCapacity,
            ),
            ("OperationNotAllowed", 409, ErrorKind::QuotaExceeded),
            (
                "TooManyRequests",
                429,
                ErrorKind::Throttled { retry_after: None },
            ),
            ("AuthenticationFailed", 401, ErrorKind::Unauthorized),
            ("ResourceNotFound", 404, ErrorKind::NotFound),
            ("InternalExecutionError", 200, ErrorKind::Transient),
            ("HTTP503", 503, ErrorKind::Transient),
            ("InvalidParameter", 400, ErrorKind::Invalid),
        ] {
            assert_eq!(classify(code, status), kind, "{code}");
        }
    }
}
