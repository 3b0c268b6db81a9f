//! The control API: what tests and `hack/cluster fault` use to break the clouds
//! and to set up fixtures. JSON in and out; errors are `{"error": "..."}`.
//!
//! | call | what it does |
//! |---|---|
//! | `GET /healthz` | `ok` |
//! | `GET /state` | faults, outages, capacity limits, AWS regions, Azure scale sets and VMs |
//! | `GET /faults` | the injected faults |
//! | `POST /faults` | inject `{"fault": "<code>", <filters>..., "times": N}`; answers its `id` |
//! | `DELETE /faults[?provider=aws]` | clear every fault (of one provider) |
//! | `DELETE /faults/{id}` | clear one fault |
//! | `POST /outage` | `{"provider": "aws", "region": "us-east-1", "api": false}`: Nodes go NotReady |
//! | `DELETE /outage[?provider=&region=]` | end outages; the Nodes go Ready again |
//! | `GET /capacity`, `PUT /capacity` | `{"provider", "instanceType", "region", "zone", "limit": N or null}` |
//! | `POST /azure/scalesets` | create a scale set (see [`ScaleSetFixture`]) |
//! | `DELETE /azure/scalesets/{subscription}/{resourceGroup}/{name}` | delete one, with its VMs |
//! | `POST /azure/agentpools` | create an AKS agent pool, as a scale set in its node resource group (see [`AgentPoolFixture`]); answers the agent pool and its `scaleSet` |
//! | `GET /links` | the peer links between clusters (`hack/peers`) and their modes |
//! | `POST /links/partition` | `{"a": "aws", "b": "azure", "mode": "refuse", "blackhole" or "stall"}`: cut both directions |
//! | `POST /links/heal` | `{"a": "aws", "b": "azure"}` (either or both optional): open the links again |
//! | `POST /clusters/{name}/down` | stop a whole cluster's control plane, keeping its data (`hack/peers fault down`) |
//! | `POST /clusters/{name}/up` | start it again with the same data |
//! | `GET /launches` | the last 1000 EC2 `RunInstances` requests: `at`, `pool` (its tag), `instanceType`, `zone`, `refused` (a fault's code) |
//! | `POST /interrupt` | `{"provider", "instanceId" or "node", "kind": "spot", "rebalance", "scheduled" or "preempt", "noticeSeconds"}` (see [`crate::interrupt`]) |
//! | `GET /aws/interruption-queue[?name=]` | `{"queueUrl", "messages"}`: an SQS queue in moto that AWS interruptions go to (made if needed; default `outrigger-interruptions`), and how many messages it holds |
//! | `POST /aws/interruption-queue` | any body: sent as it is to every such queue (bad messages, for tests) |
//! | `POST /reset` | forget everything: moto's resources, scale sets, faults, outages, limits; heal every link |

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use outrigger_crds::Provider;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::azure::agent_pool::{AgentPoolFixture, agent_pool_json};
use crate::azure::scale_set::{ScaleSetFixture, ScaleSetKey};
use crate::faults::{CapacityLimit, Fault, Outage};
use crate::links::LinkMode;
use crate::simulator::Shared;

/// A control API error: a status and a message.
struct ControlError(StatusCode, String);

impl IntoResponse for ControlError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

fn bad_request(message: impl std::fmt::Display) -> ControlError {
    ControlError(StatusCode::BAD_REQUEST, message.to_string())
}

/// The router of the control API.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/state", get(state))
        .route("/faults", get(list_faults).post(inject).delete(clear_all))
        .route("/faults/{id}", delete(clear_one))
        .route("/outage", post(start_outage).delete(end_outage))
        .route("/capacity", get(list_capacity).put(set_capacity))
        .route("/azure/scalesets", post(create_scale_set))
        .route("/azure/agentpools", post(create_agent_pool))
        .route(
            "/azure/scalesets/{sub}/{rg}/{name}",
            delete(delete_scale_set),
        )
        .route("/links", get(list_links))
        .route("/links/partition", post(partition))
        .route("/links/heal", post(heal))
        .route("/clusters/{name}/{action}", post(cluster_action))
        .route("/launches", get(launches))
        .route("/interrupt", post(interrupt))
        .route(
            "/aws/interruption-queue",
            get(queue_url).post(send_to_queue),
        )
        .route("/reset", post(reset))
        .with_state(shared)
}

async fn state(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let azure = {
        let mut cloud = shared.azure();
        let book = shared.book();
        cloud.advance(Instant::now(), |id| book.is_active(id));
        drop(book);
        let sets: Vec<Value> = cloud
            .scale_sets()
            .map(|s| {
                let vms: Vec<Value> = s
                    .vms
                    .values()
                    .map(|vm| {
                        json!({
                            "instanceId": vm.instance_id.to_string(),
                            "zone": vm.zone,
                            "provisioningState": vm.state.provisioning_state(),
                            "nodeName": s.computer_name(vm.instance_id),
                        })
                    })
                    .collect();
                json!({
                    "subscriptionId": s.subscription,
                    "resourceGroup": s.resource_group,
                    "name": s.name,
                    "location": s.location,
                    "sku": s.sku,
                    "zones": s.zones,
                    "capacity": s.capacity,
                    "provisioningState": s.provisioning_state,
                    "tags": s.tags,
                    "agentPool": s.aks.as_ref().map(|a| json!({"resourceGroup": a.resource_group, "cluster": a.cluster, "name": a.name})),
                    "vms": vms,
                })
            })
            .collect();
        sets
    };
    let book = shared.book();
    Json(json!({
        "faults": book.faults(),
        "outages": book.outages(),
        "capacity": book.capacity(),
        "aws": {"regions": shared.aws_regions(), "moto": shared.moto.base()},
        "azure": {"scaleSets": azure},
        "links": shared.links.states(),
    }))
}

async fn list_faults(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(json!(shared.book().faults()))
}

/// `{"fault": ..., "times": N, <filters>}`: `times` is taken out, the rest must be
/// exactly one fault (unknown filters are refused).
async fn inject(
    State(shared): State<Arc<Shared>>,
    Json(mut body): Json<Value>,
) -> Result<(StatusCode, Json<Value>), ControlError> {
    let times = match body.as_object_mut().and_then(|o| o.remove("times")) {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .filter(|n| *n > 0)
                .ok_or_else(|| bad_request("times must be a positive integer"))?,
        ),
    };
    let fault: Fault =
        serde_json::from_value(body).map_err(|e| bad_request(format!("not a fault: {e}")))?;
    let id = shared.book().inject(fault.clone(), times);
    tracing::info!(%id, ?fault, ?times, "control: fault injected");
    let injected = shared.book().faults().iter().find(|f| f.id == id).cloned();
    Ok((StatusCode::CREATED, Json(json!(injected))))
}

#[derive(Deserialize)]
struct ProviderFilter {
    provider: Option<Provider>,
    region: Option<String>,
}

async fn clear_all(
    State(shared): State<Arc<Shared>>,
    Query(filter): Query<ProviderFilter>,
) -> Json<Value> {
    let cleared = shared.book().clear_all(filter.provider);
    tracing::info!(cleared, provider = ?filter.provider, "control: faults cleared");
    Json(json!({ "cleared": cleared }))
}

async fn clear_one(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ControlError> {
    if shared.book().clear(&id) {
        tracing::info!(%id, "control: fault cleared");
        Ok(Json(json!({ "cleared": 1 })))
    } else {
        Err(ControlError(
            StatusCode::NOT_FOUND,
            format!("no fault with id {id}"),
        ))
    }
}

async fn start_outage(
    State(shared): State<Arc<Shared>>,
    Json(outage): Json<Outage>,
) -> (StatusCode, Json<Value>) {
    tracing::info!(outage = %outage.label(), api = outage.api, "control: outage started");
    shared.book().start_outage(outage.clone());
    shared.wake_registrar();
    (StatusCode::CREATED, Json(json!(outage)))
}

async fn end_outage(
    State(shared): State<Arc<Shared>>,
    Query(filter): Query<ProviderFilter>,
) -> Json<Value> {
    let ended = shared
        .book()
        .end_outages(filter.provider, filter.region.as_deref());
    tracing::info!(ended, "control: outages ended");
    shared.wake_registrar();
    Json(json!({ "ended": ended }))
}

async fn list_capacity(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(json!(shared.book().capacity()))
}

async fn set_capacity(
    State(shared): State<Arc<Shared>>,
    Json(limit): Json<CapacityLimit>,
) -> Result<Json<Value>, ControlError> {
    shared
        .book()
        .set_capacity(limit.clone())
        .map_err(bad_request)?;
    tracing::info!(?limit, "control: capacity set");
    Ok(Json(json!(shared.book().capacity())))
}

async fn create_scale_set(
    State(shared): State<Arc<Shared>>,
    Json(fixture): Json<ScaleSetFixture>,
) -> Result<(StatusCode, Json<Value>), ControlError> {
    let key = ScaleSetKey::new(
        &fixture.subscription_id,
        &fixture.resource_group,
        &fixture.name,
    );
    let mut cloud = shared.azure();
    cloud
        .create_scale_set(fixture, Instant::now())
        .map_err(|e| ControlError(e.status, e.message))?;
    let body = cloud
        .scale_set(&key)
        .map(crate::azure::resources::scale_set_json);
    drop(cloud);
    shared.wake_registrar();
    Ok((StatusCode::CREATED, Json(json!(body))))
}

async fn create_agent_pool(
    State(shared): State<Arc<Shared>>,
    Json(fixture): Json<AgentPoolFixture>,
) -> Result<(StatusCode, Json<Value>), ControlError> {
    let mut cloud = shared.azure();
    let key = cloud
        .create_agent_pool(fixture, Instant::now())
        .map_err(|e| ControlError(e.status, e.message))?;
    let body = cloud.scale_set(&key).and_then(|set| {
        let aks = set.aks.as_ref()?;
        let mut body = agent_pool_json(set, aks);
        body["scaleSet"] = crate::azure::resources::scale_set_json(set);
        Some(body)
    });
    drop(cloud);
    shared.wake_registrar();
    Ok((StatusCode::CREATED, Json(json!(body))))
}

async fn delete_scale_set(
    State(shared): State<Arc<Shared>>,
    Path((sub, rg, name)): Path<(String, String, String)>,
) -> Result<Json<Value>, ControlError> {
    if shared
        .azure()
        .delete_scale_set(&ScaleSetKey::new(&sub, &rg, &name))
    {
        shared.wake_registrar();
        Ok(Json(json!({ "deleted": name })))
    } else {
        Err(ControlError(
            StatusCode::NOT_FOUND,
            format!("no scale set {sub}/{rg}/{name}"),
        ))
    }
}

async fn list_links(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(json!(shared.links.states()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PartitionRequest {
    a: String,
    b: String,
    #[serde(default = "refuse")]
    mode: LinkMode,
}

fn refuse() -> LinkMode {
    LinkMode::Refuse
}

async fn partition(
    State(shared): State<Arc<Shared>>,
    Json(request): Json<PartitionRequest>,
) -> Result<Json<Value>, ControlError> {
    if request.mode == LinkMode::Open {
        return Err(bad_request(
            "mode must be refuse, blackhole or stall; POST /links/heal opens links",
        ));
    }
    if !shared.links.joins(&request.a, &request.b) {
        return Err(ControlError(
            StatusCode::NOT_FOUND,
            format!(
                "no peer link joins {} and {}; the links are set with outrigger-sim serve --link (hack/peers)",
                request.a, request.b
            ),
        ));
    }
    let cut = shared
        .links
        .set(Some(&request.a), Some(&request.b), request.mode);
    tracing::info!(a = %request.a, b = %request.b, mode = ?request.mode, cut, "control: partition");
    Ok(Json(json!({ "cut": cut, "links": shared.links.states() })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HealRequest {
    a: Option<String>,
    b: Option<String>,
}

async fn heal(State(shared): State<Arc<Shared>>, Json(request): Json<HealRequest>) -> Json<Value> {
    let healed = shared
        .links
        .set(request.a.as_deref(), request.b.as_deref(), LinkMode::Open);
    tracing::info!(a = ?request.a, b = ?request.b, healed, "control: links healed");
    Json(json!({ "healed": healed, "links": shared.links.states() }))
}

/// `down` or `up` of a whole cluster, through the script that runs the clusters.
async fn cluster_action(
    State(shared): State<Arc<Shared>>,
    Path((name, action)): Path<(String, String)>,
) -> Result<Json<Value>, ControlError> {
    if !matches!(action.as_str(), "down" | "up") {
        return Err(ControlError(
            StatusCode::NOT_FOUND,
            format!("no cluster action {action:?}: down or up"),
        ));
    }
    let Some(script) = &shared.cluster_script else {
        return Err(ControlError(
            StatusCode::NOT_IMPLEMENTED,
            "this simulator runs no clusters of its own (start it with --cluster-script, as hack/peers does)".to_string(),
        ));
    };
    let output = tokio::process::Command::new(script)
        .args(["fault", &action, &name])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| {
            ControlError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("failed to run {}: {e}", script.display()),
            )
        })?;
    let log = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() {
        return Err(ControlError(
            StatusCode::CONFLICT,
            format!("{} fault {action} {name} failed: {log}", script.display()),
        ));
    }
    tracing::info!(cluster = %name, %action, "control: cluster {action}");
    shared.wake_registrar();
    Ok(Json(
        json!({ "cluster": name, "action": action, "log": log }),
    ))
}

async fn reset(State(shared): State<Arc<Shared>>) -> Result<Json<Value>, ControlError> {
    shared
        .moto
        .reset()
        .await
        .map_err(|e| ControlError(StatusCode::BAD_GATEWAY, e.to_string()))?;
    *shared.launches.lock().await = HashMap::new();
    shared.azure().reset();
    shared.book().reset();
    shared.links.set(None, None, LinkMode::Open);
    shared.wake_registrar();
    tracing::info!("control: reset");
    Ok(Json(json!({ "reset": true })))
}

async fn interrupt(
    State(shared): State<Arc<Shared>>,
    Json(request): Json<crate::interrupt::Request>,
) -> Result<(StatusCode, Json<Value>), ControlError> {
    crate::interrupt::interrupt(shared, request)
        .await
        .map(|done| (StatusCode::CREATED, Json(done)))
        .map_err(bad_request)
}

#[derive(Deserialize)]
struct QueueName {
    name: Option<String>,
}

async fn queue_url(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<QueueName>,
) -> Result<Json<Value>, ControlError> {
    let gateway = |e| ControlError(StatusCode::BAD_GATEWAY, e);
    let name = query
        .name
        .unwrap_or_else(|| crate::interrupt::QUEUE_NAME.to_string());
    let url = shared.queue.url(&name).await.map_err(gateway)?;
    let messages = shared.queue.depth(&name).await.map_err(gateway)?;
    Ok(Json(json!({ "queueUrl": url, "messages": messages })))
}

async fn send_to_queue(
    State(shared): State<Arc<Shared>>,
    body: String,
) -> Result<StatusCode, ControlError> {
    shared
        .queue
        .send(body)
        .await
        .map_err(|e| ControlError(StatusCode::BAD_GATEWAY, e))?;
    Ok(StatusCode::CREATED)
}

async fn launches(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(json!(shared.launch_log()))
}
