//! The EC2 endpoint: a proxy in front of moto that adds what moto lacks.
//!
//! Every request goes on to moto unchanged, except that
//! - injected faults and `api` outages answer first, with EC2's XML errors;
//! - `RunInstances` is checked against finite capacity per (instance type, zone)
//!   and launches as many instances as EC2 would (`MaxCount` when there is room,
//!   at least `MinCount`, else `InsufficientInstanceCapacity`; moto itself always
//!   launches `MinCount`), one launch at a time;
//! - a `RunInstances` `ClientToken` is idempotent, as in EC2: the same request
//!   again gets the first answer, a different one `IdempotentParameterMismatch`.
//!
//! Zones are resolved as moto places instances: the subnet's zone, else
//! `Placement.AvailabilityZone`, else the region's zone `a`. Only `RunInstances` is
//! subject to capacity; `CreateFleet` goes to moto as it is.

pub mod error;
pub mod moto;
pub mod query;

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use outrigger_crds::Provider;

use crate::faults::{Fault, matches};
use crate::simulator::Shared;
use error::Ec2Error;
use moto::MotoError;
use query::{Ec2Request, LaunchRequest};

/// Instance type moto launches when neither the request nor its template names one.
const MOTO_DEFAULT_INSTANCE_TYPE: &str = "m1.small";
/// Client tokens remembered at most; a test run uses a few hundred.
const MAX_REMEMBERED_TOKENS: usize = 10_000;

/// The answer to a `RunInstances` call with a `ClientToken`, kept for replays.
#[derive(Clone, Debug)]
pub struct Replay {
    fingerprint: String,
    status: StatusCode,
    content_type: Option<HeaderValue>,
    body: Bytes,
}

/// `RunInstances` answers by (region, client token).
pub type LaunchLedger = HashMap<(String, String), Replay>;

/// The router of the EC2 endpoint.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(handle).with_state(shared)
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request = Ec2Request::parse(&headers, uri.query(), &body);
    let request_id = uuid::Uuid::new_v4().to_string();
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let Some(action) = request.action().map(str::to_string) else {
        // Not an EC2 action (moto's own API, such as /moto-api/reset): pass it on.
        return relay(
            shared.moto.forward(method, &path, &headers, body).await,
            &request_id,
        )
        .await;
    };
    shared.note_aws_region(&request.region);
    let delay = shared.book().latency(Provider::Aws);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if let Some(error) = request_fault(&shared, &action, &request.region) {
        tracing::info!(%action, region = %request.region, code = %error.code, "ec2: injected fault");
        return error.into_response(&request_id);
    }
    let response = if action == "RunInstances" {
        run_instances(&shared, request, &headers, &request_id).await
    } else {
        relay(
            shared.moto.forward(method, &path, &headers, body).await,
            &request_id,
        )
        .await
    };
    if matches!(
        action.as_str(),
        "RunInstances" | "TerminateInstances" | "StopInstances" | "StartInstances" | "CreateFleet"
    ) {
        shared.wake_registrar();
    }
    response
}

/// An outage or a fault that hits every action.
fn request_fault(shared: &Shared, action: &str, region: &str) -> Option<Ec2Error> {
    let mut book = shared.book();
    if book.api_down(Provider::Aws, region) {
        return Some(Ec2Error::unavailable());
    }
    let (_, fault) = book.trigger(|f| match f {
        Fault::RequestLimitExceeded {
            action: a,
            region: r,
        }
        | Fault::InternalError {
            action: a,
            region: r,
        } => matches(a, action) && matches(r, region),
        _ => false,
    })?;
    Some(match fault {
        Fault::RequestLimitExceeded { .. } => Ec2Error::request_limit(),
        _ => Ec2Error::internal("An internal error has occurred."),
    })
}

async fn run_instances(
    shared: &Shared,
    mut request: Ec2Request,
    headers: &HeaderMap,
    request_id: &str,
) -> Response {
    // One launch at a time, so two launches never both take the last free slot.
    let mut ledger = shared.launches.lock().await;
    let region = request.region.clone();
    let token = request.param("ClientToken").map(str::to_string);
    let fingerprint = request.fingerprint();
    if let Some(t) = &token
        && let Some(done) = ledger.get(&(region.clone(), t.clone()))
    {
        if done.fingerprint != fingerprint {
            return Ec2Error::idempotent_mismatch(t).into_response(request_id);
        }
        return replayed(done);
    }

    let launch = LaunchRequest::of(&request);
    let placement = match resolve_placement(&shared.moto, &region, &launch).await {
        Ok(p) => p,
        Err(e) => {
            return Ec2Error::internal(&format!("the simulator could not look up the launch: {e}"))
                .into_response(request_id);
        }
    };
    let mut count = launch.max_count;
    if let Some((instance_type, zone)) = &placement {
        let pool = request.tag(outrigger_crds::POOL_LABEL).map(str::to_string);
        let log = |refused: Option<&str>| {
            shared.log_launch(crate::simulator::LaunchLog {
                at: jiff::Timestamp::now(),
                pool: pool.clone(),
                instance_type: instance_type.clone(),
                zone: zone.clone(),
                refused: refused.map(str::to_string),
            });
        };
        if let Some(error) = launch_fault(shared, &region, instance_type, zone) {
            log(Some(&error.code));
            tracing::info!(%instance_type, %zone, code = %error.code, "ec2: RunInstances refused by an injected fault");
            return error.into_response(request_id);
        }
        match headroom(shared, &region, instance_type, zone).await {
            Ok(None) => log(None),
            Ok(Some(room)) if room >= launch.min_count => {
                log(None);
                count = count.min(room);
            }
            Ok(Some(room)) => {
                log(Some("InsufficientInstanceCapacity"));
                tracing::info!(%instance_type, %zone, room, wanted = launch.min_count, "ec2: RunInstances over capacity");
                return Ec2Error::insufficient_capacity(instance_type, zone)
                    .into_response(request_id);
            }
            Err(e) => {
                return Ec2Error::internal(&format!(
                    "the simulator could not count instances: {e}"
                ))
                .into_response(request_id);
            }
        }
    }
    // moto launches MinCount instances; EC2 launches as many as it can up to MaxCount.
    request.set_param("MinCount", &count.to_string());
    request.set_param("MaxCount", &count.to_string());
    let body = Bytes::from(request.encode());
    let forwarded = match shared.moto.forward(Method::POST, "/", headers, body).await {
        Ok(r) => r,
        Err(e) => return Ec2Error::internal(&e.to_string()).into_response(request_id),
    };
    let status = forwarded.status();
    let content_type = forwarded.headers().get(header::CONTENT_TYPE).cloned();
    let body = match forwarded.bytes().await {
        Ok(b) => b,
        Err(e) => {
            return Ec2Error::internal(&format!("failed to read moto's answer: {e}"))
                .into_response(request_id);
        }
    };
    let done = Replay {
        fingerprint,
        status,
        content_type,
        body,
    };
    let response = replayed(&done);
    if let Some(t) = token
        && status.is_success()
    {
        if ledger.len() >= MAX_REMEMBERED_TOKENS {
            ledger.clear();
        }
        ledger.insert((region, t), done);
    }
    response
}

/// The instance type and zone a launch gets, as moto will place it; `None` when
/// the request names a subnet or template moto does not know (moto answers that).
async fn resolve_placement(
    moto: &moto::MotoClient,
    region: &str,
    launch: &LaunchRequest,
) -> Result<Option<(String, String)>, MotoError> {
    let instance_type = match (&launch.instance_type, &launch.template) {
        (Some(t), _) => t.clone(),
        (None, Some((template, version))) => moto
            .template_instance_type(region, template, version.as_deref())
            .await?
            .unwrap_or_else(|| MOTO_DEFAULT_INSTANCE_TYPE.to_string()),
        (None, None) => MOTO_DEFAULT_INSTANCE_TYPE.to_string(),
    };
    let zone = match (&launch.subnet_id, &launch.zone) {
        (Some(subnet), _) => match moto.subnet_zone(region, subnet).await? {
            Some(z) => z,
            None => return Ok(None),
        },
        (None, Some(z)) => z.clone(),
        (None, None) => format!("{region}a"),
    };
    Ok(Some((instance_type, zone)))
}

/// A fault that refuses this launch.
fn launch_fault(
    shared: &Shared,
    region: &str,
    instance_type: &str,
    zone: &str,
) -> Option<Ec2Error> {
    let (_, fault) = shared.book().trigger(|f| match f {
        Fault::VcpuLimitExceeded {
            instance_type: t,
            region: r,
        } => matches(t, instance_type) && matches(r, region),
        Fault::InsufficientInstanceCapacity {
            instance_type: t,
            region: r,
            zone: z,
        } => matches(t, instance_type) && matches(r, region) && matches(z, zone),
        _ => false,
    })?;
    Some(match fault {
        Fault::VcpuLimitExceeded { .. } => Ec2Error::vcpu_limit(instance_type),
        _ => Ec2Error::insufficient_capacity(instance_type, zone),
    })
}

/// How many more instances of the type fit in the zone (`None`: no limit applies).
async fn headroom(
    shared: &Shared,
    region: &str,
    instance_type: &str,
    zone: &str,
) -> Result<Option<u32>, MotoError> {
    let limits = shared
        .book()
        .limits_for(Provider::Aws, instance_type, region, Some(zone));
    let mut room: Option<u32> = None;
    for limit in limits {
        let used = shared
            .moto
            .count_up(region, instance_type, limit.zone.as_deref())
            .await?;
        let free = limit.limit.unwrap_or(u32::MAX).saturating_sub(used);
        room = Some(room.map_or(free, |r| r.min(free)));
    }
    Ok(room)
}

fn replayed(done: &Replay) -> Response {
    let mut response = (done.status, done.body.clone()).into_response();
    if let Some(ct) = &done.content_type {
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, ct.clone());
    }
    response
}

/// moto's answer, passed back to the client.
async fn relay(forwarded: Result<reqwest::Response, MotoError>, request_id: &str) -> Response {
    let forwarded = match forwarded {
        Ok(r) => r,
        Err(e) => return Ec2Error::internal(&e.to_string()).into_response(request_id),
    };
    let status = forwarded.status();
    let content_type = forwarded.headers().get(header::CONTENT_TYPE).cloned();
    match forwarded.bytes().await {
        Ok(body) => replayed(&Replay {
            fingerprint: String::new(),
            status,
            content_type,
            body,
        }),
        Err(e) => Ec2Error::internal(&format!("failed to read moto's answer: {e}"))
            .into_response(request_id),
    }
}
