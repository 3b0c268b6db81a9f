//! The PeerCluster controller: one read-only link per PeerCluster, from the
//! kubeconfig in its Secret (`observe::peers`), and its status: `Reachable` and
//! `Mutual` with messages that say what to fix, `lastSeenTime`, the peer's
//! versions, and the typed `lostSince` and `backSince` that both sides plan with.
//! A loss and a return are Events (`PeerLost`, `PeerBack`).

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Client, Resource, ResourceExt};
use outrigger_crds::{PeerCluster, PeerClusterStatus, condition};

use super::apply::{manager, without_nulls};
use super::{Context, Error};
use crate::observe::peers::{Contact, Link, Peers, Problem};
use crate::status;
use crate::telemetry::PeerLabels;

pub const CONTROLLER: &str = "peercluster";
/// Look again this often with no trigger, which refreshes `lastSeenTime`.
const RECHECK: Duration = Duration::from_secs(15);
/// `lastSeenTime` moves in steps of this, not with every probe.
const LAST_SEEN_STEP: SignedDuration = SignedDuration::from_secs(15);
/// The reason when this cluster has no `--cluster-name`.
const CLUSTER_NAME_MISSING: &str = "ClusterNameMissing";
/// How long a connection to a peer's API may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Ctx {
    pub shared: Arc<Context>,
    pub peers: Arc<Peers>,
    pub client: Client,
}

#[tracing::instrument(name = "reconcile", skip_all, fields(controller = CONTROLLER, object = peer.metadata.name.as_deref().unwrap_or_default()))]
pub async fn reconcile(peer: Arc<PeerCluster>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let _timer = ctx.shared.metrics.reconcile_timer(CONTROLLER);
    let name = peer.name_any();
    let link = if ctx.peers.me.name.is_empty() {
        Err(problem(
            CLUSTER_NAME_MISSING,
            format!(
                "this cluster has no name, so cluster {name} cannot tell it from others: set the chart value clusterName (--cluster-name, OUTRIGGER_CLUSTER_NAME) to the name of cluster {name}'s PeerCluster for this one"
            ),
        ))
    } else {
        match connect(&peer, &ctx).await {
            Ok((client, server, fingerprint)) => {
                Ok(ctx
                    .peers
                    .ensure(&peer, client, server, fingerprint, carried(&peer)))
            }
            // A link that works stays through a failed read of its Secret (only a
            // deleted PeerCluster drops it): planning without a peer would launch its
            // share here.
            Err(problem) => match ctx.peers.link(&name) {
                Some(link) => {
                    tracing::warn!(peer = %name, reason = problem.reason, message = %problem.message, "keeping the link to a peer whose kubeconfig cannot be read now");
                    Ok(link)
                }
                None => Err(problem),
            },
        }
    };
    ctx.peers.settled(&name);
    let now = ctx.shared.now();
    let desired = desired(&peer, &link, &ctx.peers.me.name, now);
    let labels = PeerLabels { peer: name.clone() };
    let reachable = desired
        .conditions
        .iter()
        .any(|c| c.type_ == condition::REACHABLE && c.status == "True");
    ctx.shared
        .metrics
        .peer_reachable
        .get_or_create(&labels)
        .set(i64::from(reachable));
    if let Ok(link) = &link {
        let seen = link.contact().last_seen.unwrap_or(link.started);
        ctx.shared
            .metrics
            .peer_last_seen_seconds
            .get_or_create(&labels)
            .set(now.duration_since(seen).as_secs_f64().max(0.0));
    }
    let before = peer.status.clone().unwrap_or_default();
    if before != desired {
        ctx.shared
            .applier
            .status::<PeerCluster>(
                None,
                &name,
                manager::PEERS,
                without_nulls(serde_json::to_value(&desired).expect("status serialises")),
            )
            .await?;
        announce(&peer, &before, &desired, &ctx.shared).await;
    }
    Ok(Action::requeue(RECHECK))
}

#[tracing::instrument(name = "error_policy", skip_all, fields(controller = CONTROLLER, object = peer.metadata.name.as_deref().unwrap_or_default()))]
pub fn error_policy(peer: Arc<PeerCluster>, error: &Error, ctx: Arc<Ctx>) -> Action {
    ctx.shared
        .metrics
        .reconcile_failed(CONTROLLER, error.category());
    tracing::warn!(%error, "reconcile failed; retrying in 5 s");
    Action::requeue(Duration::from_secs(5))
}

/// The lost and back times a new link carries over from the status, so that an
/// operator restart neither forgets a loss nor restarts a rebalance clock.
fn carried(peer: &PeerCluster) -> Contact {
    let status = peer.status.as_ref();
    Contact {
        lost_since: status.and_then(|s| s.lost_since.as_ref()).map(|t| t.0),
        back_since: status.and_then(|s| s.back_since.as_ref()).map(|t| t.0),
        ..Contact::default()
    }
}

fn problem(reason: &'static str, message: String) -> Problem {
    Problem {
        reason,
        message,
        misconfigured: true,
    }
}

/// A client of the peer from the kubeconfig in the PeerCluster's Secret, the
/// server it reaches, and a fingerprint of what it was built from.
async fn connect(peer: &PeerCluster, ctx: &Ctx) -> Result<(Client, String, u64), Problem> {
    let reference = &peer.spec.kubeconfig_secret_ref;
    let at = format!("Secret {}/{}", reference.namespace, reference.name);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &reference.namespace);
    let secret = match secrets.get_opt(&reference.name).await {
        Ok(Some(secret)) => secret,
        Ok(None) => {
            return Err(problem(
                "SecretMissing",
                format!(
                    "{at} (spec.kubeconfigSecretRef) does not exist: create it with `outrigger peer add {} --kubeconfig FILE`, or point spec.kubeconfigSecretRef at the Secret that holds the peer's kubeconfig",
                    peer.name_any()
                ),
            ));
        }
        Err(e) => {
            return Err(problem(
                "SecretUnreadable",
                format!(
                    "cannot read {at}: {e}; the operator may read Secrets only in the namespace the chart's peers.secretNamespace names"
                ),
            ));
        }
    };
    let data = secret.data.unwrap_or_default();
    let Some(bytes) = data.get(&reference.key) else {
        let keys: Vec<&str> = data.keys().map(String::as_str).collect();
        return Err(problem(
            "KeyMissing",
            format!(
                "{at} has no key {:?} (spec.kubeconfigSecretRef.key); it has [{}]: set the key that holds the kubeconfig",
                reference.key,
                keys.join(", ")
            ),
        ));
    };
    let invalid = |e: String| {
        // A parser's error may draw the spot over several lines: its first says it.
        let e = e.lines().next().unwrap_or_default();
        problem(
            "KubeconfigInvalid",
            format!(
                "the kubeconfig in {at}, key {}, cannot be used: {e}; write it again with `outrigger peer add {} --kubeconfig FILE`",
                reference.key,
                peer.name_any()
            ),
        )
    };
    let text = std::str::from_utf8(&bytes.0).map_err(|e| invalid(e.to_string()))?;
    let kubeconfig = Kubeconfig::from_yaml(text).map_err(|e| invalid(e.to_string()))?;
    let mut config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(|e| invalid(e.to_string()))?;
    config.connect_timeout = Some(CONNECT_TIMEOUT);
    let server = config.cluster_url.to_string();
    let client = Client::try_from(config).map_err(|e| invalid(e.to_string()))?;
    let mut hasher = DefaultHasher::new();
    serde_json::to_string(&peer.spec)
        .unwrap_or_default()
        .hash(&mut hasher);
    secret.metadata.resource_version.hash(&mut hasher);
    Ok((client, server, hasher.finish()))
}

/// The status the link's contact calls for.
fn desired(
    peer: &PeerCluster,
    link: &Result<Arc<Link>, Problem>,
    me: &str,
    now: Timestamp,
) -> PeerClusterStatus {
    let before = peer.status.clone().unwrap_or_default();
    let previous = before.conditions.as_slice();
    let generation = peer.metadata.generation;
    let name = peer.name_any();
    let cond = |type_: &str, ok: bool, reason: &str, message: String| {
        status::condition(previous, type_, ok, reason, message, generation, now)
    };
    let link = match link {
        Ok(link) => link,
        Err(p) if p.reason == CLUSTER_NAME_MISSING => {
            return PeerClusterStatus {
                conditions: vec![
                    cond(
                        condition::REACHABLE,
                        false,
                        "NotLinked",
                        "no link is made while this cluster has no name (see Mutual)".to_string(),
                    ),
                    cond(condition::MUTUAL, false, p.reason, p.message.clone()),
                ],
                ..before
            };
        }
        Err(p) => {
            return PeerClusterStatus {
                conditions: vec![
                    cond(condition::REACHABLE, false, p.reason, p.message.clone()),
                    cond(
                        condition::MUTUAL,
                        false,
                        "Unknown",
                        "the peer cannot be read until Reachable is fixed".to_string(),
                    ),
                ],
                ..before
            };
        }
    };
    let contact = link.contact();
    let reachable = match (&contact.problem, contact.last_seen) {
        (Some(p), _) => cond(condition::REACHABLE, false, p.reason, p.message.clone()),
        (None, Some(_)) => cond(
            condition::REACHABLE,
            true,
            "Answering",
            format!(
                "the API server at {} answers and cluster {name}'s Outrigger holds its leader Lease",
                link.server
            ),
        ),
        (None, None) => cond(
            condition::REACHABLE,
            false,
            "Connecting",
            format!("not heard from {} yet", link.server),
        ),
    };
    let mutual = if !link.synced() {
        cond(
            condition::MUTUAL,
            false,
            "Unknown",
            format!("cluster {name}'s PeerClusters are not read yet"),
        )
    } else if link
        .remote
        .peers
        .get(&kube::runtime::reflector::ObjectRef::new(me))
        .is_some()
    {
        cond(
            condition::MUTUAL,
            true,
            "Listed",
            format!("cluster {name} has a PeerCluster named {me}: both plan together"),
        )
    } else {
        cond(
            condition::MUTUAL,
            false,
            "NotListed",
            format!(
                "cluster {name} has no PeerCluster named {me}, so it plans without this cluster and both may serve the same replicas: run `outrigger peer add {name} --kubeconfig FILE` here, which registers both ways"
            ),
        )
    };
    // lastSeenTime moves in steps, so a steady peer is not written every probe.
    let last_seen = match (before.last_seen_time.as_ref(), contact.last_seen) {
        (Some(was), Some(seen)) if seen < was.0 + LAST_SEEN_STEP => Some(was.clone()),
        (_, seen) => seen.map(whole_seconds).or(before.last_seen_time.clone()),
    };
    PeerClusterStatus {
        last_seen_time: last_seen,
        version: contact.version.or(before.version),
        operator_version: contact.operator_version.or(before.operator_version),
        lost_since: contact.lost_since.map(whole_seconds),
        back_since: contact.back_since.map(whole_seconds),
        conditions: vec![reachable, mutual],
    }
}

/// A time as the API server keeps it (whole seconds), so a status written once
/// reads back the same and is not written, or announced, again.
fn whole_seconds(t: Timestamp) -> Time {
    Time(Timestamp::from_second(t.as_second()).unwrap_or(t))
}

/// `PeerLost` and `PeerBack`, when the status records a new loss or return.
async fn announce(
    peer: &PeerCluster,
    before: &PeerClusterStatus,
    after: &PeerClusterStatus,
    ctx: &Context,
) {
    let name = peer.name_any();
    let reference = peer.object_ref(&());
    if let Some(since) = after
        .lost_since
        .as_ref()
        .filter(|t| Some(*t) != before.lost_since.as_ref())
    {
        let seen = after
            .last_seen_time
            .as_ref()
            .map_or("never".to_string(), |t| t.0.to_string());
        let note = format!(
            "cluster {name} is lost at {}: last seen {seen}, then silent for spec.unreachableAfterSeconds ({} s); the clusters that remain take its share",
            since.0, peer.spec.unreachable_after_seconds
        );
        ctx.publish(&reference, "Probing", EventType::Warning, "PeerLost", note)
            .await;
    }
    if let Some(back) = after
        .back_since
        .as_ref()
        .filter(|t| Some(*t) != before.back_since.as_ref())
    {
        let lost_for = before.lost_since.as_ref().map_or(String::new(), |l| {
            format!(
                " after {:.1} s lost",
                back.0.duration_since(l.0).as_secs_f64()
            )
        });
        let note = format!(
            "cluster {name} answers again{lost_for}; its pools take new replicas after each ModelDeployment's failover.rebalanceAfterSeconds"
        );
        ctx.publish(&reference, "Probing", EventType::Normal, "PeerBack", note)
            .await;
    }
}
