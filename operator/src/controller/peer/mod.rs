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

pub mod kubeconfig;
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
/// How long building a peer's client may take. An admitted kubeconfig holds only
/// inline data, so this is milliseconds; the bound keeps one broken peer from
/// holding up every deployment's plan.
const BUILD_TIMEOUT: Duration = Duration::from_secs(5);
/// The reason of a kubeconfig that holds what a peer's may not.
pub const KUBECONFIG_REFUSED: &str = "KubeconfigRefused";
/// The `FactsValid` reason, and the Event, of a peer whose pools fail the checks.
const PEER_FACTS_REJECTED: &str = "PeerFactsRejected";

pub struct Ctx {
    pub shared: Arc<Context>,
    pub peers: Arc<Peers>,
    pub client: Client,
    /// The one namespace whose Secrets hold peer kubeconfigs
    /// (`--peer-secret-namespace`, chart `peers.secretNamespace`).
    pub secret_namespace: String,
}

#[tracing::instrument(name = "reconcile", skip_all, fields(controller = CONTROLLER, object = peer.metadata.name.as_deref().unwrap_or_default()))]
pub async fn reconcile(peer: Arc<PeerCluster>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let _timer = ctx.shared.metrics.reconcile_timer(CONTROLLER);
    let name = peer.name_any();
    // Some(expiry) once the Secret's kubeconfig was read: the expiry it says, if any.
    let mut token_expires = None;
    let link = if ctx.peers.me.name.is_empty() {
        Err(problem(
            CLUSTER_NAME_MISSING,
            format!(
                "this cluster has no name, so cluster {name} cannot tell it from others: set the chart value clusterName (--cluster-name, OUTRIGGER_CLUSTER_NAME) to the name of cluster {name}'s PeerCluster for this one"
            ),
        ))
    } else {
        match connect(&peer, &ctx).await {
            Ok(connected) => {
                token_expires = Some(connected.token_expires);
                Ok(ctx.peers.ensure(
                    &peer,
                    connected.client,
                    connected.server,
                    connected.fingerprint,
                    carried(&peer),
                ))
            }
            // A refused kubeconfig ends the link: whoever wrote it must not keep
            // steering this cluster through the credentials it replaced.
            Err(problem) if problem.reason == KUBECONFIG_REFUSED => {
                ctx.peers.drop_link(&name);
                Err(problem)
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
    let mut desired = desired(&peer, &link, &ctx.peers.me.name, now);
    if let Some(expires) = token_expires {
        desired.token_expires_at = expires.map(whole_seconds);
    }
    desired
        .conditions
        .extend(trust(&peer, &link, &desired, now));
    let labels = PeerLabels { peer: name.clone() };
    ctx.shared
        .metrics
        .set_conditions("PeerCluster", &name, &desired.conditions);
    if let Some(skew) = desired.clock_skew_seconds {
        ctx.shared
            .metrics
            .peer_clock_skew_seconds
            .get_or_create(&labels)
            .set(skew);
    }
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
        let contact = link.contact();
        ctx.shared
            .metrics
            .peer_watch_restarts
            .get_or_create(&labels)
            .set(i64::from(contact.watch_restarts));
        let seen = contact.last_seen.unwrap_or(link.started);
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

/// A client of the peer, built from an admitted kubeconfig.
struct Connected {
    client: Client,
    /// The server it reaches.
    server: String,
    /// Of the PeerCluster's spec and the Secret's version: a change makes a new link.
    fingerprint: u64,
    /// When its token expires, if it says.
    token_expires: Option<Timestamp>,
}

/// A client of the peer from the kubeconfig in the PeerCluster's Secret.
async fn connect(peer: &PeerCluster, ctx: &Ctx) -> Result<Connected, Problem> {
    let reference = &peer.spec.kubeconfig_secret_ref;
    let at = format!("Secret {}/{}", reference.namespace, reference.name);
    if reference.namespace != ctx.secret_namespace {
        return Err(problem(
            "SecretNamespaceRefused",
            format!(
                "{at} (spec.kubeconfigSecretRef.namespace) is outside the peer Secret namespace {}: the operator reads peer kubeconfigs there only; move the Secret (outrigger peer add --secret-namespace {}) or set the chart value peers.secretNamespace",
                ctx.secret_namespace, ctx.secret_namespace
            ),
        ));
    }
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
    // Parsing reads nothing it names; building a client from it might, so it is
    // checked in between: nothing is read, run or connected to unless it is
    // inline data and an https server.
    let kubeconfig = Kubeconfig::from_yaml(text).map_err(|e| invalid(e.to_string()))?;
    kubeconfig::admit(text).map_err(|refusal| {
        problem(
            KUBECONFIG_REFUSED,
            format!(
                "the kubeconfig in {at}, key {}, is refused and no connection was made: {refusal}; write it again with `outrigger peer add {} --kubeconfig FILE`",
                reference.key,
                peer.name_any()
            ),
        )
    })?;
    let token_expires = kubeconfig::token(text).and_then(|t| token_expiry(&t));
    let mut config = tokio::time::timeout(
        BUILD_TIMEOUT,
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()),
    )
    .await
    .map_err(|_| invalid(format!("building its client took over {BUILD_TIMEOUT:?}")))?
    .map_err(|e| invalid(e.to_string()))?;
    config.connect_timeout = Some(CONNECT_TIMEOUT);
    // kube-client takes HTTPS_PROXY from the environment: a peer is reached
    // directly, as its admitted kubeconfig says, and through nothing else.
    config.proxy_url = None;
    let server = config.cluster_url.to_string();
    let client = Client::try_from(config).map_err(|e| invalid(e.to_string()))?;
    let mut hasher = DefaultHasher::new();
    serde_json::to_string(&peer.spec)
        .unwrap_or_default()
        .hash(&mut hasher);
    secret.metadata.resource_version.hash(&mut hasher);
    Ok(Connected {
        client,
        server,
        fingerprint: hasher.finish(),
        token_expires,
    })
}

/// The `exp` claim of a JSON Web Token (a TokenRequest token has one; a legacy
/// Secret token does not). Read, not verified: the peer's API server verifies it,
/// and this only says when to renew.
fn token_expiry(token: &str) -> Option<Timestamp> {
    use base64::Engine;
    let claims = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(claims.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Timestamp::from_second(claims.get("exp")?.as_i64()?).ok()
}

/// A clock this far from this cluster's is reported (`ClockSkew`): more than the
/// `Date` header's rounding and a slow network, and a third of the shortest
/// `unreachableAfterSeconds` worth caring about.
const SKEW_LIMIT: i64 = 5;
/// `TokenExpiring` turns True this long before the token expires: time for a
/// person to run `outrigger peer rotate` after the alert.
const TOKEN_WARNING: SignedDuration = SignedDuration::from_hours(7 * 24);

/// The conditions on what the peer is trusted with: `FactsValid`, `ClockSkew`
/// and `TokenExpiring`. Each is left out until there is something to judge (the
/// mirrors listed, a `Date` seen, a token read); a previous one stays meanwhile.
fn trust(
    peer: &PeerCluster,
    link: &Result<Arc<Link>, Problem>,
    desired: &PeerClusterStatus,
    now: Timestamp,
) -> Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    let previous = peer
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let generation = peer.metadata.generation;
    let name = peer.name_any();
    let cond = |type_: &str, ok: bool, reason: &str, message: String| {
        status::condition(previous, type_, ok, reason, message, generation, now)
    };
    let kept = |type_: &str| previous.iter().find(|c| c.type_ == type_).cloned();
    let link = link.as_ref().ok();
    let facts = match link.filter(|l| l.synced()) {
        Some(link) => {
            let facts = link.facts();
            Some(if facts.rejected.is_empty() {
                cond(
                    condition::FACTS_VALID,
                    true,
                    "PeerFactsAccepted",
                    format!(
                        "the {} GpuNodePools cluster {name} publishes pass the checks a local pool passes",
                        facts.pools.len()
                    ),
                )
            } else {
                let said: Vec<String> = facts
                    .rejected
                    .iter()
                    .map(|r| format!("pool {}: {}", r.pool, r.problem))
                    .collect();
                cond(
                    condition::FACTS_VALID,
                    false,
                    PEER_FACTS_REJECTED,
                    format!(
                        "cluster {name} publishes GpuNodePools that fail the checks a local pool passes, so they are left out of every plan: {}; fix them in cluster {name}",
                        said.join("; ")
                    ),
                )
            })
        }
        None => kept(condition::FACTS_VALID),
    };
    let skew = match desired.clock_skew_seconds {
        Some(skew) if skew.abs() > SKEW_LIMIT => Some(cond(
            condition::CLOCK_SKEW,
            true,
            "ClockSkewed",
            format!(
                "cluster {name}'s clock is {} s {} this cluster's (from its API server's Date header): the times it publishes are corrected by it, but leader Leases and Events read alike everywhere only with synchronised clocks; run NTP (chrony) on both clusters' nodes",
                skew.abs(),
                if skew > 0 { "ahead of" } else { "behind" }
            ),
        )),
        Some(skew) => Some(cond(
            condition::CLOCK_SKEW,
            false,
            "ClocksAgree",
            format!("cluster {name}'s clock is within {SKEW_LIMIT} s of this cluster's ({skew} s)"),
        )),
        None => kept(condition::CLOCK_SKEW),
    };
    let token = match desired.token_expires_at.as_ref() {
        Some(expires) if expires.0 <= now => Some(cond(
            condition::TOKEN_EXPIRING,
            true,
            "TokenExpired",
            format!(
                "the token this cluster reads cluster {name} with expired at {}: renew it with `outrigger peer rotate {name} --kubeconfig FILE`",
                expires.0
            ),
        )),
        Some(expires) if expires.0 <= now + TOKEN_WARNING => Some(cond(
            condition::TOKEN_EXPIRING,
            true,
            "TokenExpiresSoon",
            format!(
                "the token this cluster reads cluster {name} with expires at {}: renew it with `outrigger peer rotate {name} --kubeconfig FILE`",
                expires.0
            ),
        )),
        Some(expires) => Some(cond(
            condition::TOKEN_EXPIRING,
            false,
            "TokenValid",
            format!("the token expires at {}", expires.0),
        )),
        None if link.is_some() => Some(cond(
            condition::TOKEN_EXPIRING,
            false,
            "NoExpiry",
            "the kubeconfig's credential says no expiry (a client certificate or a legacy token): `outrigger peer rotate` replaces it with a token that expires".to_string(),
        )),
        None => kept(condition::TOKEN_EXPIRING),
    };
    [facts, skew, token].into_iter().flatten().collect()
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
        token_expires_at: before.token_expires_at,
        clock_skew_seconds: contact
            .skew
            .map(|s| s.as_secs())
            .or(before.clock_skew_seconds),
        conditions: vec![reachable, mutual],
    }
}

/// A time as the API server keeps it (whole seconds), so a status written once
/// reads back the same and is not written, or announced, again.
fn whole_seconds(t: Timestamp) -> Time {
    Time(Timestamp::from_second(t.as_second()).unwrap_or(t))
}

/// `PeerLost` and `PeerBack`, when the status records a new loss or return;
/// `PeerFactsRejected`, `ClockSkew` and `TokenExpiring` when they turn bad or say
/// something new.
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
    for (type_, bad, reason) in [
        (condition::FACTS_VALID, "False", PEER_FACTS_REJECTED),
        (condition::CLOCK_SKEW, "True", "ClockSkew"),
        (condition::TOKEN_EXPIRING, "True", "TokenExpiring"),
    ] {
        let find = |s: &PeerClusterStatus| {
            s.conditions
                .iter()
                .find(|c| c.type_ == type_ && c.status == bad)
                .map(|c| (c.reason.clone(), c.message.clone()))
        };
        if let Some((_, message)) = find(after).filter(|now| Some(now) != find(before).as_ref()) {
            ctx.publish(&reference, "Checking", EventType::Warning, reason, message)
                .await;
        }
    }
}
