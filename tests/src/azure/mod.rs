//! The Azure Resource Manager (compute) endpoint: the calls Outrigger makes on VM
//! scale sets, answered like ARM, including its long-running operations.
//!
//! - `GET|PATCH .../virtualMachineScaleSets/{name}`: a PATCH of `sku.capacity`
//!   answers 200 with `provisioningState: Updating` and the headers
//!   `Azure-AsyncOperation` (the operation status resource), `Location` (the
//!   operation result) and `Retry-After`;
//! - `GET .../virtualMachineScaleSets/{name}/virtualMachines[/{id}]`;
//! - `POST .../virtualMachineScaleSets/{name}/delete` (`deleteInstances`): 202 and
//!   the same headers;
//! - `GET .../locations/{location}/operations/{id}`: `{"status": "InProgress"}`,
//!   then `Succeeded`, or `Failed` with an `error`;
//! - `GET /subscriptions/{sub}/providers/Microsoft.Compute/skus`.
//!
//! Any bearer token is accepted; `api-version` is required, as in ARM. Tokens
//! come from the identity platform's endpoint beside it ([`identity`]).

pub mod agent_pool;
pub mod cloud;
pub mod error;
pub mod identity;
mod plan;
pub mod resources;
pub mod scale_set;
pub mod skus;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use outrigger_crds::Provider;
use serde_json::{Value, json};

use crate::faults::Fault;
use crate::simulator::Shared;
use cloud::{AzureCloud, OperationPlan, OperationStatus};
use error::ArmError;
use plan::{add_operation_faults, growth_plan};
use resources::{SCALE_SET_TYPE, scale_set_json, vm_json};
use scale_set::{ScaleSet, ScaleSetKey};

const SCALE_SETS: &str =
    "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachineScaleSets";
const LOCATIONS: &str = "/subscriptions/{sub}/providers/Microsoft.Compute/locations/{location}";
const AGENT_POOLS: &str = "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.ContainerService/managedClusters/{cluster}/agentPools";
const AKS_LOCATIONS: &str =
    "/subscriptions/{sub}/providers/Microsoft.ContainerService/locations/{location}";

type Params = Query<HashMap<String, String>>;

/// The router of the ARM endpoint.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(SCALE_SETS, get(list_scale_sets))
        .route(
            &format!("{SCALE_SETS}/{{name}}"),
            get(get_scale_set).patch(update_scale_set),
        )
        .route(
            &format!("{SCALE_SETS}/{{name}}/virtualMachines"),
            get(list_vms),
        )
        .route(
            &format!("{SCALE_SETS}/{{name}}/virtualMachines/{{id}}"),
            get(get_vm),
        )
        .route(
            &format!("{SCALE_SETS}/{{name}}/delete"),
            post(delete_instances),
        )
        .route(
            "/subscriptions/{sub}/providers/Microsoft.Compute/skus",
            get(list_skus),
        )
        .route(
            &format!("{LOCATIONS}/operations/{{id}}"),
            get(operation_status),
        )
        .route(
            &format!("{LOCATIONS}/operationResults/{{id}}"),
            get(operation_result),
        )
        .route(AGENT_POOLS, get(agent_pool::list))
        .route(
            &format!("{AGENT_POOLS}/{{pool}}"),
            get(agent_pool::get)
                .put(agent_pool::update)
                .patch(agent_pool::update),
        )
        .route(
            &format!("{AGENT_POOLS}/{{pool}}/machines"),
            get(agent_pool::list_machines),
        )
        .route(
            &format!("{AGENT_POOLS}/{{pool}}/machines/{{machine}}"),
            get(agent_pool::get_machine),
        )
        .route(
            &format!("{AGENT_POOLS}/{{pool}}/deleteMachines"),
            post(agent_pool::delete_machines),
        )
        .route(
            &format!("{AKS_LOCATIONS}/operations/{{id}}"),
            get(operation_status),
        )
        .route(
            &format!("{AKS_LOCATIONS}/operationresults/{{id}}"),
            get(operation_result),
        )
        .fallback(unknown_route)
        .layer(middleware::from_fn_with_state(shared.clone(), gate))
        // Not behind the gate (a layer wraps only the routes added before it): a
        // token request carries no token and no api-version.
        .route(identity::TOKEN_PATH, post(identity::token))
        .with_state(shared)
}

/// What every ARM request passes first: latency, `api-version`, a bearer token,
/// throttling and `api` outages.
async fn gate(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let delay = shared.book().latency(Provider::Azure);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let request_id = uuid::Uuid::new_v4().to_string();
    let mut response = match refusal(&shared, &request) {
        Some(error) => {
            tracing::info!(path = %request.uri().path(), code = %error.code, "azure: request refused");
            error.into_response()
        }
        None => next.run(request).await,
    };
    if let Ok(id) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-ms-request-id", id);
    }
    response
}

fn refusal(shared: &Shared, request: &Request) -> Option<ArmError> {
    let has_api_version = request
        .uri()
        .query()
        .is_some_and(|q| form_urlencoded::parse(q.as_bytes()).any(|(k, _)| k == "api-version"));
    if !has_api_version {
        return Some(ArmError::bad_request(
            "MissingApiVersionParameter",
            "The api-version query parameter (?api-version=) is required for all requests.",
        ));
    }
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("Bearer ") && v.len() > "Bearer ".len());
    if !bearer {
        return Some(ArmError::new(
            StatusCode::UNAUTHORIZED,
            "AuthenticationFailed",
            "Authentication failed. The 'Authorization' header is missing or is not a bearer token.",
        ));
    }
    let region = region_of_path(shared, request.uri().path());
    let mut book = shared.book();
    let down = match &region {
        Some(r) => book.api_down(Provider::Azure, r),
        None => book
            .outages()
            .iter()
            .any(|o| o.provider == Provider::Azure && o.region.is_none() && o.api),
    };
    if down {
        return Some(ArmError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "The service is currently unavailable.",
        ));
    }
    let (_, fault) = book.trigger(|f| matches!(f, Fault::TooManyRequests { .. }))?;
    let Fault::TooManyRequests {
        retry_after_seconds,
    } = fault
    else {
        return None;
    };
    let mut error = ArmError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "TooManyRequests",
        "The request is being throttled as the limit has been reached for this operation type. Retry after the time in the Retry-After header.",
    );
    error.retry_after = Some(retry_after_seconds);
    Some(error)
}

/// The region a request is about: the location of an operation, or of a scale set.
fn region_of_path(shared: &Shared, path: &str) -> Option<String> {
    let parts: Vec<&str> = path.split('/').collect();
    let after = |name: &str| {
        parts
            .iter()
            .position(|p| p.eq_ignore_ascii_case(name))
            .and_then(|i| parts.get(i + 1))
            .copied()
    };
    if let Some(location) = after("locations") {
        return Some(location.to_ascii_lowercase());
    }
    if let Some(pool) = after("agentPools") {
        let cloud = shared.azure();
        let key = cloud.agent_pool(
            after("subscriptions")?,
            after("resourceGroups")?,
            after("managedClusters")?,
            pool,
        )?;
        return cloud
            .scale_set(&key)
            .map(|s| s.location.to_ascii_lowercase());
    }
    let key = ScaleSetKey::new(
        after("subscriptions")?,
        after("resourceGroups")?,
        after("virtualMachineScaleSets")?,
    );
    shared
        .azure()
        .scale_set(&key)
        .map(|s| s.location.to_ascii_lowercase())
}

async fn unknown_route() -> ArmError {
    ArmError::new(
        StatusCode::NOT_FOUND,
        "InvalidResourceType",
        "The simulator does not serve this resource type or action.",
    )
}

/// Locks the cloud after finishing the operations that are due.
fn settled(shared: &Shared) -> std::sync::MutexGuard<'_, AzureCloud> {
    let mut cloud = shared.azure();
    let book = shared.book();
    cloud.advance(Instant::now(), |id| book.is_active(id));
    drop(book);
    cloud
}

fn find<'a>(
    cloud: &'a AzureCloud,
    sub: &str,
    rg: &str,
    name: &str,
) -> Result<&'a ScaleSet, ArmError> {
    cloud
        .scale_set(&ScaleSetKey::new(sub, rg, name))
        .ok_or_else(|| ArmError::not_found(SCALE_SET_TYPE, name, rg))
}

async fn list_scale_sets(
    State(shared): State<Arc<Shared>>,
    Path((sub, rg)): Path<(String, String)>,
) -> Response {
    let cloud = settled(&shared);
    let value: Vec<Value> = cloud
        .scale_sets()
        .filter(|s| {
            s.subscription.eq_ignore_ascii_case(&sub) && s.resource_group.eq_ignore_ascii_case(&rg)
        })
        .map(scale_set_json)
        .collect();
    axum::Json(json!({ "value": value })).into_response()
}

async fn get_scale_set(
    State(shared): State<Arc<Shared>>,
    Path((sub, rg, name)): Path<(String, String, String)>,
) -> Result<Response, ArmError> {
    let cloud = settled(&shared);
    Ok(axum::Json(scale_set_json(find(&cloud, &sub, &rg, &name)?)).into_response())
}

async fn update_scale_set(
    State(shared): State<Arc<Shared>>,
    Path((sub, rg, name)): Path<(String, String, String)>,
    Query(query): Params,
    body: Bytes,
) -> Result<Response, ArmError> {
    let update: Value = json_body(&body)?;
    let now = Instant::now();
    let key = ScaleSetKey::new(&sub, &rg, &name);
    let mut cloud = settled(&shared);
    let set = find(&cloud, &sub, &rg, &name)?;
    if let Some(size) = update.pointer("/sku/name").and_then(Value::as_str)
        && !size.eq_ignore_ascii_case(&set.sku)
    {
        return Err(ArmError::new(
            StatusCode::CONFLICT,
            "PropertyChangeNotAllowed",
            "Changing property 'sku.name' is not allowed by the simulator.",
        ));
    }
    let Some(target) = update.pointer("/sku/capacity").and_then(Value::as_u64) else {
        // Nothing the simulator models changes: the scale set as it is.
        return Ok(axum::Json(scale_set_json(set)).into_response());
    };
    let target = u32::try_from(target)
        .map_err(|_| ArmError::bad_request("InvalidParameter", "sku.capacity is too large."))?;
    let location = set.location.clone();
    let operation = begin_capacity(&shared, &mut cloud, &key, target, &name, now)?;
    let retry_after = cloud.retry_after_seconds();
    let body = scale_set_json(find(&cloud, &sub, &rg, &name)?);
    drop(cloud);
    shared.wake_registrar();
    tracing::info!(scale_set = %name, target, %operation, "azure: capacity update accepted");
    let mut response = axum::Json(body).into_response();
    operation_headers(
        &shared,
        response.headers_mut(),
        &OperationLinks {
            namespace: Namespace::Compute,
            sub: &sub,
            location: &location,
            operation: &operation,
            retry_after,
        },
        &query,
    );
    Ok(response)
}

/// Starts setting the VM count of `key` to `target`, as faults and capacity
/// allow; `fault_name` is the name the faults' `scaleSet` filter matches.
fn begin_capacity(
    shared: &Shared,
    cloud: &mut AzureCloud,
    key: &ScaleSetKey,
    target: u32,
    fault_name: &str,
    now: Instant,
) -> Result<String, ArmError> {
    let growth = cloud.zones_for_growth(key, target);
    let plan = {
        let mut book = shared.book();
        let mut plan = match cloud.scale_set(key) {
            Some(set) if !growth.is_empty() => growth_plan(&mut book, cloud, set, &growth)?,
            _ => OperationPlan::default(),
        };
        add_operation_faults(&mut book, &mut plan, fault_name);
        plan
    };
    cloud.begin_scale(key, target, plan, now)
}

/// A request body as JSON, or ARM's error for content it cannot read.
fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ArmError> {
    serde_json::from_slice(body).map_err(|e| {
        ArmError::bad_request(
            "InvalidRequestContent",
            format!("The request content was invalid and could not be deserialized: {e}"),
        )
    })
}

/// The resource provider whose operation resources a long-running operation
/// reports under.
#[derive(Clone, Copy)]
enum Namespace {
    Compute,
    ContainerService,
}

impl Namespace {
    fn as_str(self) -> &'static str {
        match self {
            Namespace::Compute => "Microsoft.Compute",
            Namespace::ContainerService => "Microsoft.ContainerService",
        }
    }

    /// The path segment of an operation's result (AKS spells it in lower case).
    fn results(self) -> &'static str {
        match self {
            Namespace::Compute => "operationResults",
            Namespace::ContainerService => "operationresults",
        }
    }
}

struct OperationLinks<'a> {
    namespace: Namespace,
    sub: &'a str,
    location: &'a str,
    operation: &'a str,
    retry_after: u64,
}

fn operation_headers(
    shared: &Shared,
    headers: &mut HeaderMap,
    links: &OperationLinks<'_>,
    query: &HashMap<String, String>,
) {
    let api_version = query
        .get("api-version")
        .map_or("2024-07-01", String::as_str);
    let url = |kind: &str| {
        format!(
            "{}/subscriptions/{}/providers/{}/locations/{}/{kind}/{}?api-version={api_version}",
            shared.azure_base,
            links.sub,
            links.namespace.as_str(),
            links.location.to_ascii_lowercase(),
            links.operation,
        )
    };
    for (name, value) in [
        ("azure-asyncoperation", url("operations")),
        ("location", url(links.namespace.results())),
        ("retry-after", links.retry_after.to_string()),
        ("azure-asyncnotification", "Enabled".to_string()),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    }
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct InstanceIds {
    instance_ids: Vec<String>,
}

async fn delete_instances(
    State(shared): State<Arc<Shared>>,
    Path((sub, rg, name)): Path<(String, String, String)>,
    Query(query): Params,
    body: Bytes,
) -> Result<Response, ArmError> {
    let ids: InstanceIds = json_body(&body)?;
    let key = ScaleSetKey::new(&sub, &rg, &name);
    let mut cloud = settled(&shared);
    let location = find(&cloud, &sub, &rg, &name)?.location.clone();
    let mut plan = OperationPlan::default();
    add_operation_faults(&mut shared.book(), &mut plan, &name);
    let operation = cloud.begin_delete_instances(&key, &ids.instance_ids, plan, Instant::now())?;
    let retry_after = cloud.retry_after_seconds();
    drop(cloud);
    shared.wake_registrar();
    tracing::info!(scale_set = %name, ids = ?ids.instance_ids, %operation, "azure: deleteInstances accepted");
    let mut response = StatusCode::ACCEPTED.into_response();
    operation_headers(
        &shared,
        response.headers_mut(),
        &OperationLinks {
            namespace: Namespace::Compute,
            sub: &sub,
            location: &location,
            operation: &operation,
            retry_after,
        },
        &query,
    );
    Ok(response)
}

async fn list_vms(
    State(shared): State<Arc<Shared>>,
    Path((sub, rg, name)): Path<(String, String, String)>,
    Query(query): Params,
) -> Result<Response, ArmError> {
    let cloud = settled(&shared);
    let set = find(&cloud, &sub, &rg, &name)?;
    let expand = expands_instance_view(&query);
    let value: Vec<Value> = set
        .vms
        .values()
        .map(|vm| vm_json(set, vm, expand))
        .collect();
    Ok(axum::Json(json!({ "value": value })).into_response())
}

async fn get_vm(
    State(shared): State<Arc<Shared>>,
    Path((sub, rg, name, id)): Path<(String, String, String, String)>,
    Query(query): Params,
) -> Result<Response, ArmError> {
    let cloud = settled(&shared);
    let set = find(&cloud, &sub, &rg, &name)?;
    let vm = id
        .parse::<u32>()
        .ok()
        .and_then(|i| set.vms.get(&i))
        .ok_or_else(|| {
            ArmError::not_found(
                &format!("{SCALE_SET_TYPE}/{name}/virtualMachines"),
                &id,
                &rg,
            )
        })?;
    Ok(axum::Json(vm_json(set, vm, expands_instance_view(&query))).into_response())
}

fn expands_instance_view(query: &HashMap<String, String>) -> bool {
    query
        .get("$expand")
        .is_some_and(|e| e.eq_ignore_ascii_case("instanceView"))
}

async fn list_skus(State(shared): State<Arc<Shared>>, Query(query): Params) -> Response {
    let mut regions: Vec<String> = skus::REGIONS.iter().map(|r| r.to_string()).collect();
    regions.extend(shared.azure().regions());
    regions.sort();
    regions.dedup();
    // `$filter=location eq 'eastus'` is the one filter ARM supports here.
    let only = query.get("$filter").and_then(|f| {
        let (_, value) = f.split_once("eq")?;
        Some(value.trim().trim_matches('\'').to_string())
    });
    let book = shared.book();
    let faults = book.faults().iter().map(|f| &f.fault);
    axum::Json(skus::resource_skus(&regions, only.as_deref(), faults)).into_response()
}

async fn operation_status(
    State(shared): State<Arc<Shared>>,
    Path((_sub, _location, id)): Path<(String, String, String)>,
) -> Result<Response, ArmError> {
    let cloud = settled(&shared);
    let op = cloud.operation(&id).ok_or_else(|| {
        ArmError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("Operation {id} was not found."),
        )
    })?;
    let mut body = json!({
        "name": op.id,
        "startTime": op.started.to_string(),
    });
    match &op.status {
        OperationStatus::InProgress => body["status"] = json!("InProgress"),
        OperationStatus::Succeeded => body["status"] = json!("Succeeded"),
        OperationStatus::Failed(error) => {
            body["status"] = json!("Failed");
            body["error"] = error.detail();
        }
    }
    if let Some(ended) = op.ended {
        body["endTime"] = json!(ended.to_string());
    }
    let mut response = axum::Json(body).into_response();
    if op.status == OperationStatus::InProgress {
        response.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(cloud.retry_after_seconds()),
        );
    }
    Ok(response)
}

async fn operation_result(
    State(shared): State<Arc<Shared>>,
    Path((_sub, _location, id)): Path<(String, String, String)>,
    uri: axum::http::Uri,
) -> Result<Response, ArmError> {
    let cloud = settled(&shared);
    let op = cloud.operation(&id).ok_or_else(|| {
        ArmError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("Operation {id} was not found."),
        )
    })?;
    match &op.status {
        OperationStatus::InProgress => {
            let mut response = StatusCode::ACCEPTED.into_response();
            let headers = response.headers_mut();
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from(cloud.retry_after_seconds()),
            );
            if let Ok(v) = HeaderValue::from_str(&format!("{}{uri}", shared.azure_base)) {
                headers.insert(header::LOCATION, v);
            }
            Ok(response)
        }
        OperationStatus::Failed(error) => {
            let mut error = error.clone();
            if error.status.is_success() {
                error.status = StatusCode::CONFLICT;
            }
            Err(error)
        }
        OperationStatus::Succeeded => {
            match op.scale_set.as_ref().and_then(|k| cloud.scale_set(k)) {
                Some(set) => Ok(axum::Json(match &set.aks {
                    Some(aks) => agent_pool::agent_pool_json(set, aks),
                    None => scale_set_json(set),
                })
                .into_response()),
                None => Ok(StatusCode::NO_CONTENT.into_response()),
            }
        }
    }
}
