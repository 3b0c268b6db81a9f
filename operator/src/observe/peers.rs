//! Peers: for each PeerCluster, a read-only link to the peer's API server. The link
//! mirrors what the peer publishes (its GpuNodePools, its ModelDeployment copies
//! with the children each status lists, its PeerClusters and its leader Lease) and
//! probes, every 500 ms, that
//! its API answers and that its operator holds its leader Lease. A peer silent for
//! `unreachableAfterSeconds` is lost; its next answer makes it back. Nothing here
//! writes to a peer: every call is a get, a list or a watch.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::Api;
use kube::core::DeserializeGuard;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use outrigger_crds::{
    CLUSTER_NAME_ANNOTATION, GpuNodePool, ModelDeployment, PeerCluster, VERSION_ANNOTATION,
};
use tokio::sync::watch;
use tokio::task::AbortHandle;

use super::inventory::Child;
use super::watch::{Notify, mirror_task};
use super::{published, trim};
use crate::controller::Clock;

/// How often a peer is probed.
pub const PROBE_EVERY: Duration = Duration::from_millis(500);
/// The longest a peer's leader Lease may claim to stay live unrenewed: Outrigger's
/// own is 15 s; more than a few minutes would only delay taking a dead peer's share.
const MAX_LEASE_SECONDS: i32 = 300;
/// How long one probe call may take before the peer counts as not answering.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// What a peer publishes, as this cluster's reflectors mirror it.
#[derive(Clone)]
pub struct Remote {
    pub pools: Store<GpuNodePool>,
    /// Its ModelDeployment copies; each copy's status lists that cluster's
    /// children of it (`status.children`): a peer reads no Deployments.
    pub copies: Store<DeserializeGuard<ModelDeployment>>,
    pub peers: Store<PeerCluster>,
    /// Its operator's leader Lease, renewed every 2 s: the canary that shows the
    /// watches still hear (`freshness`).
    pub lease: Store<Lease>,
}

/// Why the last probe of a peer failed, in the words its PeerCluster shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub reason: &'static str,
    pub message: String,
    /// A configuration mistake (the kubeconfig reaches the wrong cluster, or its
    /// token is refused): the peer takes no part in planning, so this cluster plans
    /// as if it did not exist (capacity errs high), and no loss is recorded.
    pub misconfigured: bool,
}

/// What the probes found, and the lost and back transitions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Contact {
    /// The last time its API answered and its operator held the Lease.
    pub last_seen: Option<Timestamp>,
    pub problem: Option<Problem>,
    /// `gitVersion` of its API server.
    pub version: Option<String>,
    /// Its Outrigger's version, from the Lease.
    pub operator_version: Option<String>,
    /// Since when it has counted as lost.
    pub lost_since: Option<Timestamp>,
    /// When it last came back after being lost.
    pub back_since: Option<Timestamp>,
    /// The peer's clock minus this one's, in whole seconds, from its API server's
    /// `Date` header: what turns the times it publishes into local ones.
    pub skew: Option<SignedDuration>,
    /// Its leader Lease as last seen changing, on this cluster's clock.
    pub lease: Option<LeaseSeen>,
    /// How often this link's watches were started anew: when the peer answered
    /// after a failed probe, or when they had gone silent while it answered.
    pub watch_restarts: u32,
}

/// A peer's leader Lease: its version, and the local time it was seen to change.
/// Liveness is judged by that change, never by comparing the peer's `renewTime`
/// with this cluster's clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseSeen {
    pub version: String,
    pub changed_at: Timestamp,
}

/// The Lease as read now: `version` its resourceVersion, `renewed` its renewTime
/// (the peer's clock), `duration` its leaseDurationSeconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRead {
    pub version: String,
    pub held: bool,
    pub renewed: Option<Timestamp>,
    pub duration: SignedDuration,
}

/// The Lease after one read at `now` (local): a new version is a change seen now;
/// a Lease seen for the first time counts as changed at its renewTime moved onto
/// the local clock by `skew` (never later than now). Live while held and changed
/// within its duration.
pub fn lease_after(
    before: Option<&LeaseSeen>,
    read: &LeaseRead,
    skew: SignedDuration,
    now: Timestamp,
) -> (LeaseSeen, bool) {
    let changed_at = match before {
        Some(seen) if seen.version == read.version => seen.changed_at,
        Some(_) => now,
        None => read
            .renewed
            .and_then(|t| t.checked_sub(skew).ok())
            .map_or(now - read.duration - SignedDuration::from_secs(1), |t| {
                t.min(now)
            }),
    };
    let live = read.held
        && changed_at
            .checked_add(read.duration)
            .unwrap_or(Timestamp::MAX)
            >= now;
    (
        LeaseSeen {
            version: read.version.clone(),
            changed_at,
        },
        live,
    )
}

/// A skew of at most this much is the `Date` header's rounding and the network,
/// not a clock that is off: it is not reported, and not taken over a nearer one.
const SKEW_NOISE: SignedDuration = SignedDuration::from_secs(1);

/// The skew after one measurement: the peer's `Date` (whole seconds) against the
/// midpoint of the local send and receive times, rounded to whole seconds; a new
/// value replaces the old only when they differ by more than the noise, so times
/// moved by it do not wobble between passes.
pub fn skew_after(
    before: Option<SignedDuration>,
    date: Timestamp,
    sent: Timestamp,
    received: Timestamp,
) -> SignedDuration {
    let midpoint = sent + (received.duration_since(sent) / 2);
    // Date truncates to the second: the peer's time was half a second later on average.
    let measured = date
        .checked_add(SignedDuration::from_millis(500))
        .unwrap_or(date)
        .duration_since(midpoint);
    let measured = SignedDuration::from_secs(
        measured
            .round(k8s_openapi::jiff::Unit::Second)
            .map_or(0, |d| d.as_secs()),
    );
    match before {
        Some(was) if (measured - was).abs() <= SKEW_NOISE => was,
        _ => measured,
    }
}

/// How a peer takes part in planning now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Not heard from yet, and not silent long enough to count as lost: plans wait.
    Waiting,
    /// Its published facts count (perhaps a few seconds stale).
    Serving,
    /// Silent for `unreachableAfterSeconds`: the others take its share.
    Lost { since: Timestamp },
    /// Its kubeconfig reaches the wrong cluster: left out.
    Misconfigured,
}

/// The link to one peer.
pub struct Link {
    pub name: String,
    /// Of the PeerCluster's spec and the Secret's version: a change makes a new link.
    pub fingerprint: u64,
    pub server: String,
    pub started: Timestamp,
    pub remote: Remote,
    pub contact: Arc<Mutex<Contact>>,
    synced: Arc<AtomicBool>,
    tasks: Vec<AbortHandle>,
}

impl Drop for Link {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Link {
    pub fn contact(&self) -> Contact {
        self.contact
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Every mirror has listed once.
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    pub fn standing(&self) -> Standing {
        standing(&self.contact(), self.synced())
    }

    /// What the peer publishes, bounded and on the local clock
    /// (`observe::published`): the only way its pools and children are read.
    pub fn facts(&self) -> published::Facts {
        let children: Vec<Child> = self
            .remote
            .copies
            .state()
            .iter()
            .filter_map(|copy| copy.0.as_ref().ok())
            .flat_map(published_children)
            .collect();
        published::facts(
            &self.remote.pools.state(),
            &children,
            self.contact().skew.unwrap_or_default(),
        )
    }

    /// A time the peer wrote, on this cluster's clock.
    pub fn local_time(&self, t: Timestamp) -> Timestamp {
        let skew = self.contact().skew.unwrap_or_default();
        t.checked_sub(skew).unwrap_or(t)
    }
}

/// How a peer with this contact takes part in planning.
pub fn standing(contact: &Contact, synced: bool) -> Standing {
    if contact.problem.as_ref().is_some_and(|p| p.misconfigured) {
        return Standing::Misconfigured;
    }
    if let Some(since) = contact.lost_since {
        return Standing::Lost { since };
    }
    if synced && contact.last_seen.is_some() {
        Standing::Serving
    } else {
        Standing::Waiting
    }
}

/// Whether the mirrors still hear the peer, judged by its leader Lease: the probe
/// reads it directly, and its mirror must show the same version soon after.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Staleness {
    /// Since when the mirror has lagged the probe's Lease.
    pub behind_since: Option<Timestamp>,
    /// When the watches were last started anew for it.
    pub restarted_at: Option<Timestamp>,
    /// The restart did not bring the mirrors back within the limit.
    pub stale: bool,
}

/// What a lagging mirror calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// The mirrors hear (or it is too soon to say).
    Fresh,
    /// Silent for the limit while the probe answers: start the watches anew.
    Restart,
    /// Still silent for the limit after a restart: the facts are stale, and the
    /// peer counts as lost until they are current again; `restart` when the
    /// watches are due another try.
    Stale { since: Timestamp, restart: bool },
}

/// The freshness after one probe that read the Lease at `probed` while its mirror
/// holds `mirrored`, at `now`, with `limit` the peer's unreachableAfterSeconds.
pub fn freshness(
    state: &mut Staleness,
    probed: Option<&str>,
    mirrored: Option<&str>,
    limit: SignedDuration,
    now: Timestamp,
) -> Freshness {
    let Some(probed) = probed else {
        // No Lease read: the probe's own failure says what there is to say.
        return Freshness::Fresh;
    };
    if mirrored == Some(probed) {
        *state = Staleness::default();
        return Freshness::Fresh;
    }
    let since = *state.behind_since.get_or_insert(now);
    let due = state.restarted_at.map_or(since, |restarted| restarted) + limit <= now;
    if due {
        state.stale |= state.restarted_at.is_some();
        state.restarted_at = Some(now);
    }
    match (state.stale, due) {
        (false, false) => Freshness::Fresh,
        (false, true) => Freshness::Restart,
        (true, restart) => Freshness::Stale { since, restart },
    }
}

/// One probe's outcome: the peer answered and leads, or why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Answered {
        version: String,
        operator_version: Option<String>,
    },
    Failed(Problem),
}

/// One probe, and what it measured on the way: the clock skew (when the API server
/// sent a `Date`) and the Lease (when it was read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probed {
    pub probe: Probe,
    pub skew: Option<SignedDuration>,
    pub lease: Option<LeaseSeen>,
}

/// The contact after one probe at `now`: seen, or silent; lost once silent for
/// `unreachable_after` (counted from `started` for a peer never seen), back on the
/// first answer after that.
pub fn after_probe(
    mut contact: Contact,
    probe: Probe,
    started: Timestamp,
    unreachable_after: Duration,
    now: Timestamp,
) -> Contact {
    match probe {
        Probe::Answered {
            version,
            operator_version,
        } => {
            contact.last_seen = Some(now);
            contact.problem = None;
            contact.version = Some(version);
            contact.operator_version = operator_version;
            if contact.lost_since.take().is_some() {
                contact.back_since = Some(now);
            }
        }
        Probe::Failed(problem) => {
            let misconfigured = problem.misconfigured;
            contact.problem = Some(problem);
            let silent_since = contact.last_seen.unwrap_or(started);
            let limit = SignedDuration::try_from(unreachable_after).unwrap_or(SignedDuration::MAX);
            if !misconfigured && contact.lost_since.is_none() && silent_since + limit <= now {
                contact.lost_since = Some(now);
                contact.back_since = None;
            }
        }
    }
    contact
}

/// A peer that answers but whose mirrors have not listed within `unreachable_after`
/// of the link's start cannot be planned with: left out, not waited for.
pub fn unreadable(
    peer: &str,
    synced: bool,
    started: Timestamp,
    unreachable_after: Duration,
    now: Timestamp,
) -> Option<Problem> {
    let limit = SignedDuration::try_from(unreachable_after).unwrap_or(SignedDuration::MAX);
    (!synced && started + limit <= now).then(|| Problem {
        reason: "NotReadable",
        message: format!(
            "cluster {peer} answers, but its GpuNodePools, ModelDeployments, PeerClusters or leader Lease could not be listed within spec.unreachableAfterSeconds: install the Outrigger CRDs there (kubectl apply -f crds/), and bind the token's ServiceAccount to the ClusterRole outrigger-peer-reader (outrigger peer add)"
        ),
        misconfigured: true,
    })
}

/// Who this cluster is, for telling a peer apart from itself.
#[derive(Debug, Clone)]
pub struct Me {
    /// `--cluster-name`.
    pub name: String,
    /// The UID of this cluster's `kube-system` namespace.
    pub uid: Option<String>,
    /// The leader Lease's name, which peers use too.
    pub lease_name: String,
    /// The one namespace where this cluster keeps its peers' kubeconfig Secrets.
    pub secret_namespace: String,
}

/// The links to every peer, and a channel poked whenever what they publish, or
/// their standing, changes.
pub struct Peers {
    pub me: Me,
    links: Mutex<BTreeMap<String, Arc<Link>>>,
    /// Links made from a changed Secret, each waiting for its first answer before
    /// it replaces the serving link of its peer.
    successors: Mutex<BTreeMap<String, Arc<Link>>>,
    /// PeerClusters that existed at start and have not been linked (or found
    /// unusable) yet: until then no plan is made, or it would leave them out.
    pending: Mutex<std::collections::BTreeSet<String>>,
    pub changed: watch::Sender<u64>,
    clock: Clock,
}

impl Peers {
    pub fn new(me: Me, clock: Clock) -> Peers {
        Peers {
            me,
            links: Mutex::default(),
            successors: Mutex::default(),
            pending: Mutex::default(),
            changed: watch::channel(0).0,
            clock,
        }
    }

    fn poke(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// The PeerClusters there are at start: plans wait for each to be linked.
    pub fn expect(&self, names: impl IntoIterator<Item = String>) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(names);
    }

    /// The PeerCluster `name` has been linked, found unusable, or deleted.
    pub fn settled(&self, name: &str) {
        let removed = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        if removed {
            self.poke();
        }
    }

    /// Every PeerCluster that existed at start and is not settled yet.
    pub fn pending_names(&self) -> Vec<String> {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// A PeerCluster that existed at start and is not linked yet.
    pub fn pending(&self) -> Option<String> {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .first()
            .cloned()
    }

    /// Every link, by peer name.
    pub fn links(&self) -> Vec<Arc<Link>> {
        self.links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub fn link(&self, name: &str) -> Option<Arc<Link>> {
        self.links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Drops the link to `name` (its PeerCluster is gone or cannot be used).
    pub fn drop_link(&self, name: &str) {
        self.successors().remove(name);
        let removed = self
            .links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        if removed.is_some() {
            tracing::info!(peer = %name, "dropped the link to a peer");
            self.poke();
        }
    }

    /// Starts (or keeps, when `fingerprint` is the same) the link to `peer`,
    /// through `client`. `contact` carries the lost and back times of a link
    /// before this one (from the PeerCluster's status), so a restart keeps them.
    /// While a serving link is replaced, it is the one returned until its
    /// successor has answered.
    pub fn ensure(
        self: &Arc<Self>,
        peer: &PeerCluster,
        client: Client,
        server: String,
        fingerprint: u64,
        contact: Contact,
    ) -> Arc<Link> {
        let name = peer.name_any();
        let current = self.link(&name);
        if let Some(link) = current.as_ref().filter(|l| l.fingerprint == fingerprint) {
            self.successors().remove(&name);
            return link.clone();
        }
        // A link that serves keeps serving while its successor (new credentials:
        // a rotated token, say) connects; the successor takes over once it has an
        // answer, good or bad, so planning never waits on a change of Secret.
        let limit = SignedDuration::from_secs(i64::from(peer.spec.unreachable_after_seconds));
        if let Some(old) = current.filter(|l| l.standing() == Standing::Serving) {
            let known = self
                .successors()
                .get(&name)
                .filter(|s| s.fingerprint == fingerprint)
                .cloned();
            let successor = known.unwrap_or_else(|| {
                let carried = old.contact();
                let successor = self.start(
                    peer,
                    client,
                    server,
                    fingerprint,
                    Contact {
                        lost_since: carried.lost_since,
                        back_since: carried.back_since,
                        skew: carried.skew,
                        lease: carried.lease,
                        ..Contact::default()
                    },
                );
                self.successors().insert(name.clone(), successor.clone());
                successor
            });
            // It takes over when it works, when it cannot work (a refused token,
            // say), or once it has had as long as a silent peer gets; a passing
            // failure of its first probe does not make it take over.
            let answer = successor.contact();
            let works = successor.synced() && answer.last_seen.is_some();
            let cannot = answer.problem.as_ref().is_some_and(|p| p.misconfigured);
            let waited = successor.started + limit <= (self.clock)();
            if !(works || cannot || waited) {
                return old;
            }
            self.successors().remove(&name);
            tracing::info!(peer = %name, "the link made from the changed Secret answers; it replaces the one before");
            self.install(&name, successor.clone());
            return successor;
        }
        // A successor already made for this Secret takes over at once once the link
        // it was to replace no longer serves.
        let pending = self
            .successors()
            .remove(&name)
            .filter(|s| s.fingerprint == fingerprint);
        let link =
            pending.unwrap_or_else(|| self.start(peer, client, server, fingerprint, contact));
        self.install(&name, link.clone());
        link
    }

    fn successors(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Link>>> {
        self.successors.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn install(&self, name: &str, link: Arc<Link>) {
        self.links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), link);
        self.poke();
    }

    /// A new link to `peer` with its mirrors and probe running, not yet used.
    fn start(
        self: &Arc<Self>,
        peer: &PeerCluster,
        client: Client,
        server: String,
        fingerprint: u64,
        contact: Contact,
    ) -> Arc<Link> {
        let name = peer.name_any();
        let poke = self.changed.clone();
        // Bumped when the peer answers after a failed probe: every mirror starts a
        // new watch then.
        let (rewatch, rewatched) = tokio::sync::watch::channel(0u64);
        let mut tasks = Vec::new();
        let remote = Remote {
            pools: keep(
                &mut tasks,
                mirror_task(
                    Api::<GpuNodePool>::all(client.clone()),
                    watcher::Config::default(),
                    trim::pool,
                    Notify::Fingerprint(poke.clone(), published_pool),
                    None,
                    Some(rewatched.clone()),
                ),
            ),
            copies: keep(
                &mut tasks,
                mirror_task(
                    Api::<DeserializeGuard<ModelDeployment>>::all(client.clone()),
                    watcher::Config::default(),
                    trim::pool,
                    Notify::Fingerprint(poke.clone(), published_copy),
                    None,
                    Some(rewatched.clone()),
                ),
            ),
            peers: keep(
                &mut tasks,
                mirror_task(
                    Api::<PeerCluster>::all(client.clone()),
                    watcher::Config::default(),
                    trim::pool,
                    Notify::Fingerprint(poke, published_peer),
                    None,
                    Some(rewatched.clone()),
                ),
            ),
            lease: keep(
                &mut tasks,
                mirror_task(
                    Api::<Lease>::namespaced(client.clone(), &peer.spec.operator_namespace),
                    watcher::Config::default()
                        .fields(&format!("metadata.name={}", self.me.lease_name)),
                    trim::pool,
                    Notify::Nobody,
                    None,
                    Some(rewatched.clone()),
                ),
            ),
        };
        let synced = Arc::new(AtomicBool::new(false));
        let contact = Arc::new(Mutex::new(contact));
        let started = (self.clock)();
        {
            let (remote, synced, peers) = (remote.clone(), synced.clone(), self.clone());
            tasks.push(
                tokio::spawn(async move {
                    let _ = remote.pools.wait_until_ready().await;
                    let _ = remote.copies.wait_until_ready().await;
                    let _ = remote.peers.wait_until_ready().await;
                    let _ = remote.lease.wait_until_ready().await;
                    synced.store(true, Ordering::Release);
                    peers.poke();
                })
                .abort_handle(),
            );
        }
        let unreachable_after = Duration::from_secs(u64::from(peer.spec.unreachable_after_seconds));
        {
            let peers = self.clone();
            let contact = contact.clone();
            let synced = synced.clone();
            let namespace = peer.spec.operator_namespace.clone();
            let name = name.clone();
            let lease_store = remote.lease.clone();
            let limit = SignedDuration::try_from(unreachable_after).unwrap_or(SignedDuration::MAX);
            tasks.push(
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(PROBE_EVERY);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    let mut failing = false;
                    let mut staleness = Staleness::default();
                    let lease_ref = ObjectRef::new(&peers.me.lease_name).within(&namespace);
                    loop {
                        tick.tick().await;
                        let before = contact.lock().unwrap_or_else(|e| e.into_inner()).clone();
                        let mut probed = probe(&client, &peers, &name, &namespace, &before).await;
                        let answered = matches!(probed.probe, Probe::Answered { .. });
                        let mut restarted = false;
                        if answered && failing {
                            tracing::info!(peer = %name, "the peer answers again; its mirrors watch anew");
                            rewatch.send_modify(|n| *n += 1);
                            restarted = true;
                        }
                        failing = !answered;
                        let now = (peers.clock)();
                        let mirrored = lease_store
                            .get(&lease_ref)
                            .and_then(|l| l.metadata.resource_version.clone());
                        let probed_version = answered
                            .then(|| probed.lease.as_ref().map(|l| l.version.clone()))
                            .flatten();
                        let fresh = if synced.load(Ordering::Acquire) {
                            freshness(
                                &mut staleness,
                                probed_version.as_deref(),
                                mirrored.as_deref(),
                                limit,
                                now,
                            )
                        } else {
                            Freshness::Fresh
                        };
                        match fresh {
                            Freshness::Fresh => {}
                            Freshness::Restart => {
                                tracing::warn!(peer = %name, "the peer answers but its watches have heard nothing for spec.unreachableAfterSeconds; starting them anew");
                                rewatch.send_modify(|n| *n += 1);
                                restarted = true;
                            }
                            Freshness::Stale { since, restart } => {
                                if restart {
                                    rewatch.send_modify(|n| *n += 1);
                                    restarted = true;
                                }
                                probed.probe = Probe::Failed(Problem {
                                    reason: "WatchesStalled",
                                    message: format!(
                                        "cluster {name} answers its probes, but what it publishes has not reached this cluster since {since}, not even after its watches were started anew: its facts are stale, so it counts as lost; check what sits between the clusters (a proxy or load balancer that holds long requests)"
                                    ),
                                    misconfigured: false,
                                });
                            }
                        }
                        let changed = {
                            let mut c = contact.lock().unwrap_or_else(|e| e.into_inner());
                            let before = c.clone();
                            *c = after_probe(
                                before.clone(),
                                probed.probe,
                                started,
                                unreachable_after,
                                now,
                            );
                            c.skew = probed.skew.or(before.skew);
                            c.lease = probed.lease.or(before.lease.clone());
                            if let Freshness::Stale { .. } = fresh
                                && c.lost_since.is_none()
                            {
                                // It answers, so silence is not what makes it lost:
                                // the facts went stale for the limit, twice over.
                                c.lost_since = Some(now);
                                c.back_since = None;
                            }
                            if restarted {
                                c.watch_restarts += 1;
                            }
                            if c.problem.is_none() {
                                c.problem = unreadable(
                                    &name,
                                    synced.load(Ordering::Acquire),
                                    started,
                                    unreachable_after,
                                    now,
                                );
                            }
                            // A new last-seen time alone changes no plan; a new skew
                            // moves the peer's times.
                            (
                                before.lost_since,
                                before.back_since,
                                before.problem.is_some(),
                                before.skew,
                                before.watch_restarts,
                            ) != (
                                c.lost_since,
                                c.back_since,
                                c.problem.is_some(),
                                c.skew,
                                c.watch_restarts,
                            )
                        };
                        if changed {
                            peers.poke();
                        }
                    }
                })
                .abort_handle(),
            );
        }
        let link = Arc::new(Link {
            name: name.clone(),
            fingerprint,
            server,
            started,
            remote,
            contact,
            synced,
            tasks,
        });
        tracing::info!(peer = %name, server = %link.server, "linked to a peer");
        link
    }
}

/// A mirror's store, its task kept to be stopped with the link.
fn keep<K>(tasks: &mut Vec<AbortHandle>, (store, task): (Store<K>, AbortHandle)) -> Store<K>
where
    K: kube::Resource + 'static,
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    tasks.push(task);
    store
}

/// Asks the peer's API server for its version (and, from its `Date`, the clock
/// skew), its `kube-system` namespace (is it this same cluster?) and its operator's
/// leader Lease (does it lead, seen changing on this cluster's clock, and which
/// cluster does it say it is?).
async fn probe(
    client: &Client,
    peers: &Peers,
    peer: &str,
    namespace: &str,
    before: &Contact,
) -> Probed {
    let me = &peers.me;
    let failed = |probe: Probe, skew| Probed {
        probe,
        skew,
        lease: None,
    };
    let unreachable = |e: String| {
        Probe::Failed(Problem {
            reason: "Unreachable",
            message: format!(
                "the peer's API server does not answer: {e}; check the kubeconfig's server address, the network between the clusters, and that cluster {peer} is up"
            ),
            misconfigured: false,
        })
    };
    // Refused credentials are a configuration mistake, not a silent peer: it is
    // left out of planning rather than counted as lost.
    let forbidden = |e: String| {
        Probe::Failed(Problem {
            reason: "Forbidden",
            message: format!(
                "cluster {peer}'s API server refused the token in the kubeconfig ({e}): it may have expired (status.tokenExpiresAt) or been revoked; run `outrigger peer rotate {peer} --kubeconfig FILE`, or `outrigger peer add {peer} --kubeconfig FILE` again"
            ),
            misconfigured: true,
        })
    };
    let refused = |e: &kube::Error| match e {
        kube::Error::Api(s) if s.code == 401 || s.code == 403 => Some(forbidden(e.to_string())),
        _ => None,
    };
    let sent = (peers.clock)();
    let (version, skew) = match tokio::time::timeout(PROBE_TIMEOUT, version(client)).await {
        Ok(Ok((info, date))) => {
            let received = (peers.clock)();
            (
                info,
                date.map(|d| skew_after(before.skew, d, sent, received)),
            )
        }
        Ok(Err(VersionError::Refused(e))) => return failed(forbidden(e), None),
        Ok(Err(VersionError::Failed(e))) => return failed(unreachable(e), None),
        Err(_) => {
            return failed(
                unreachable(format!("no answer within {PROBE_TIMEOUT:?}")),
                None,
            );
        }
    };
    let namespaces: Api<Namespace> = Api::all(client.clone());
    match tokio::time::timeout(PROBE_TIMEOUT, namespaces.get_opt("kube-system")).await {
        Ok(Ok(Some(ns))) if ns.metadata.uid.is_some() && ns.metadata.uid == me.uid => {
            return failed(
                Probe::Failed(Problem {
                    reason: "SameCluster",
                    message: format!(
                        "the kubeconfig in spec.kubeconfigSecretRef points back at this cluster ({}): give it the address and token of cluster {peer} (outrigger peer add {peer} --kubeconfig FILE)",
                        me.name
                    ),
                    misconfigured: true,
                }),
                skew,
            );
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            return failed(
                refused(&e).unwrap_or_else(|| unreachable(e.to_string())),
                skew,
            );
        }
        Err(_) => {
            return failed(
                unreachable(format!("no answer within {PROBE_TIMEOUT:?}")),
                skew,
            );
        }
    }
    let leases: Api<Lease> = Api::namespaced(client.clone(), namespace);
    let lease = match tokio::time::timeout(PROBE_TIMEOUT, leases.get_opt(&me.lease_name)).await {
        Ok(Ok(lease)) => lease,
        Ok(Err(e)) => {
            return failed(
                refused(&e).unwrap_or_else(|| unreachable(e.to_string())),
                skew,
            );
        }
        Err(_) => {
            return failed(
                unreachable(format!("no answer within {PROBE_TIMEOUT:?}")),
                skew,
            );
        }
    };
    let Some(lease) = lease else {
        return failed(
            Probe::Failed(Problem {
                reason: "NotLeading",
                message: format!(
                    "cluster {peer} has no Lease {namespace}/{}: its Outrigger has never run there; install the chart in namespace {namespace} or set spec.operatorNamespace",
                    me.lease_name
                ),
                misconfigured: false,
            }),
            skew,
        );
    };
    let annotations = lease.metadata.annotations.clone().unwrap_or_default();
    let said = annotations.get(CLUSTER_NAME_ANNOTATION);
    if said == Some(&me.name) {
        return failed(
            Probe::Failed(Problem {
                reason: "DuplicateName",
                message: format!(
                    "cluster {peer}'s Outrigger runs with --cluster-name {}, the same as this cluster's: give each cluster its own clusterName (chart value) and name the PeerCluster after it",
                    me.name
                ),
                misconfigured: true,
            }),
            skew,
        );
    }
    if let Some(said) = said.filter(|s| s.as_str() != peer) {
        return failed(
            Probe::Failed(Problem {
                reason: "NameMismatch",
                message: format!(
                    "the peer's Outrigger runs with --cluster-name {said}, but this PeerCluster is named {peer}: rename the PeerCluster to {said} (outrigger peer remove {peer}; outrigger peer add {said} ...)"
                ),
                misconfigured: true,
            }),
            skew,
        );
    }
    let spec = lease.spec.clone().unwrap_or_default();
    let read = LeaseRead {
        version: lease.metadata.resource_version.clone().unwrap_or_default(),
        held: spec
            .holder_identity
            .as_deref()
            .is_some_and(|h| !h.is_empty()),
        renewed: spec.renew_time.map(|t| t.0),
        // The peer's own number, bounded: a Lease that claimed years would keep a
        // dead peer live here, and its share unserved.
        duration: SignedDuration::from_secs(i64::from(
            spec.lease_duration_seconds
                .unwrap_or(15)
                .clamp(1, MAX_LEASE_SECONDS),
        )),
    };
    let (seen, live) = lease_after(
        before.lease.as_ref(),
        &read,
        skew.or(before.skew).unwrap_or_default(),
        (peers.clock)(),
    );
    if !live {
        return Probed {
            probe: Probe::Failed(Problem {
                reason: "NotLeading",
                message: format!(
                    "the leader Lease {namespace}/{} of cluster {peer} has no live holder (not renewed for its leaseDurationSeconds, as seen from here): its Outrigger is not running (kubectl -n {namespace} get pods, in that cluster)",
                    me.lease_name
                ),
                misconfigured: false,
            }),
            skew,
            lease: Some(seen),
        };
    }
    Probed {
        probe: Probe::Answered {
            version,
            operator_version: annotations.get(VERSION_ANNOTATION).cloned(),
        },
        skew,
        lease: Some(seen),
    }
}

enum VersionError {
    /// 401 or 403: the token is refused.
    Refused(String),
    Failed(String),
}

/// The API server's `gitVersion`, and the `Date` its answer carried.
async fn version(client: &Client) -> Result<(String, Option<Timestamp>), VersionError> {
    let request = axum::http::Request::get("/version")
        .body(kube::client::Body::empty())
        .map_err(|e| VersionError::Failed(e.to_string()))?;
    let response = client
        .send(request)
        .await
        .map_err(|e| VersionError::Failed(e.to_string()))?;
    let status = response.status();
    let date = response
        .headers()
        .get(axum::http::header::DATE)
        .and_then(|d| d.to_str().ok())
        .and_then(http_date);
    let body = response
        .into_body()
        .collect_bytes()
        .await
        .map_err(|e| VersionError::Failed(e.to_string()))?;
    if status == axum::http::StatusCode::UNAUTHORIZED || status == axum::http::StatusCode::FORBIDDEN
    {
        return Err(VersionError::Refused(format!("HTTP {status}")));
    }
    if !status.is_success() {
        return Err(VersionError::Failed(format!(
            "GET /version answered HTTP {status}"
        )));
    }
    let info: k8s_openapi::apimachinery::pkg::version::Info = serde_json::from_slice(&body)
        .map_err(|e| VersionError::Failed(format!("GET /version answered no version: {e}")))?;
    Ok((info.git_version, date))
}

/// An HTTP `Date` (RFC 9110's IMF-fixdate, as every API server sends it).
fn http_date(text: &str) -> Option<Timestamp> {
    k8s_openapi::jiff::fmt::rfc2822::parse(text)
        .ok()
        .map(|zoned| zoned.timestamp())
}

fn hash_json<T: serde::Serialize>(value: &T) -> u64 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut h = DefaultHasher::new();
    serde_json::to_string(value)
        .unwrap_or_default()
        .hash(&mut h);
    h.finish()
}

/// What a peer's pool publishes for planning: its spec, and its status but for the
/// conditions' words and times.
fn published_pool(pool: &GpuNodePool) -> u64 {
    let status = pool.status.clone().map(|mut s| {
        s.conditions.clear();
        s
    });
    hash_json(&(&pool.spec, status))
}

fn published_copy(copy: &DeserializeGuard<ModelDeployment>) -> u64 {
    match &copy.0 {
        Ok(md) => hash_json(&(
            &md.spec,
            md.metadata.deletion_timestamp.is_some(),
            md.status.as_ref().map(|s| &s.children),
        )),
        Err(invalid) => hash_json(&invalid.error),
    }
}

/// The children a copy's status says its cluster runs.
fn published_children(md: &ModelDeployment) -> impl Iterator<Item = Child> + '_ {
    let owner = (
        md.metadata.namespace.clone().unwrap_or_default(),
        md.metadata.name.clone().unwrap_or_default(),
    );
    md.status
        .iter()
        .flat_map(|s| &s.children)
        .map(move |c| Child {
            owner: owner.clone(),
            pool: c.pool.clone(),
            name: format!("{}-{}", owner.1, c.pool),
            replicas: c.replicas,
            ready: c.ready_replicas,
            gpus: c.gpus_per_replica,
            scheduled: c.ready_replicas,
            applied_hash: None,
        })
}

fn published_peer(peer: &PeerCluster) -> u64 {
    hash_json(&(
        peer.status.as_ref().and_then(|s| s.lost_since.clone()),
        peer.status.as_ref().and_then(|s| s.back_since.clone()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn answered() -> Probe {
        Probe::Answered {
            version: "v1.37.2".into(),
            operator_version: Some("0.1.0".into()),
        }
    }

    fn failed() -> Probe {
        Probe::Failed(Problem {
            reason: "Unreachable",
            message: "down".into(),
            misconfigured: false,
        })
    }

    const AFTER: Duration = Duration::from_secs(5);

    #[test]
    fn a_peer_silent_for_the_limit_is_lost_and_its_next_answer_brings_it_back() {
        let c = after_probe(Contact::default(), answered(), at(0), AFTER, at(1));
        assert_eq!(standing(&c, true), Standing::Serving);
        let c = after_probe(c, failed(), at(0), AFTER, at(5));
        assert_eq!(standing(&c, true), Standing::Serving, "4 s silent");
        let c = after_probe(c, failed(), at(0), AFTER, at(6));
        assert_eq!(standing(&c, true), Standing::Lost { since: at(6) });
        let c = after_probe(c, failed(), at(0), AFTER, at(9));
        assert_eq!(c.lost_since, Some(at(6)), "the loss keeps its time");
        let c = after_probe(c, answered(), at(0), AFTER, at(20));
        assert_eq!(standing(&c, true), Standing::Serving);
        assert_eq!(c.back_since, Some(at(20)));
        assert_eq!(c.lost_since, None);
    }

    #[test]
    fn a_peer_never_heard_from_is_waited_for_then_lost() {
        let c = after_probe(Contact::default(), failed(), at(0), AFTER, at(3));
        assert_eq!(standing(&c, true), Standing::Waiting);
        let c = after_probe(c, failed(), at(0), AFTER, at(5));
        assert!(matches!(standing(&c, true), Standing::Lost { .. }));
    }

    #[test]
    fn a_peer_answering_before_its_mirrors_listed_is_waited_for() {
        let c = after_probe(Contact::default(), answered(), at(0), AFTER, at(1));
        assert_eq!(standing(&c, false), Standing::Waiting);
    }

    #[test]
    fn a_peer_whose_mirrors_never_list_is_left_out_once_the_limit_passes() {
        assert_eq!(unreadable("p", false, at(0), AFTER, at(4)), None);
        assert_eq!(unreadable("p", true, at(0), AFTER, at(60)), None);
        let problem = unreadable("p", false, at(0), AFTER, at(5)).expect("unreadable");
        assert!(problem.misconfigured);
        assert_eq!(problem.reason, "NotReadable");
    }

    #[test]
    fn a_lease_counts_live_by_changes_seen_here_whatever_its_clock_says() {
        let d = SignedDuration::from_secs(15);
        let read = |v: &str, renewed: i64| LeaseRead {
            version: v.into(),
            held: true,
            renewed: Some(at(renewed)),
            duration: d,
        };
        // The peer's clock runs 60 s behind: its renewTime says 60 s ago, and the
        // measured skew of -60 s puts that at now.
        let skew = SignedDuration::from_secs(-60);
        let (seen, live) = lease_after(None, &read("1", -60), skew, at(0));
        assert!(live, "first seen, corrected by the skew");
        // Renewed (a new version) every 2 s: live, though its times stay 60 s behind.
        let (seen, live) = lease_after(Some(&seen), &read("2", -58), skew, at(2));
        assert!(live);
        assert_eq!(seen.changed_at, at(2));
        // No change for longer than its duration: not live.
        let (_, live) = lease_after(Some(&seen), &read("2", -58), skew, at(18));
        assert!(!live);
        // First seen with a renewTime long past (no skew known): not live.
        let (_, live) = lease_after(None, &read("9", -100), SignedDuration::ZERO, at(0));
        assert!(!live);
        // Not held: not live.
        let mut free = read("3", 0);
        free.held = false;
        assert!(!lease_after(None, &free, SignedDuration::ZERO, at(0)).1);
    }

    #[test]
    fn the_skew_is_measured_from_the_date_and_kept_through_noise() {
        // The peer's Date says 60 s behind the midpoint of a 200 ms round trip.
        let sent = at(100);
        let received = sent + SignedDuration::from_millis(200);
        let skew = skew_after(None, at(40), sent, received);
        assert_eq!(skew, SignedDuration::from_secs(-60));
        // Half a second of rounding later, the same skew is kept.
        let again = skew_after(
            Some(skew),
            at(41),
            sent + SignedDuration::from_millis(700),
            received + SignedDuration::from_millis(700),
        );
        assert_eq!(again, skew);
        // A clock that moved: the new skew replaces it.
        assert_eq!(
            skew_after(Some(skew), at(90), sent, received),
            SignedDuration::from_secs(-10)
        );
        assert_eq!(
            skew_after(None, at(100), sent, received),
            SignedDuration::ZERO
        );
        assert_eq!(
            http_date("Mon, 07 Dec 2026 23:38:51 GMT").map(|t| t.as_second()),
            Some(1_796_686_731)
        );
    }

    #[test]
    fn silent_watches_are_restarted_then_the_peer_is_stale_until_they_hear() {
        let limit = SignedDuration::from_secs(5);
        let mut state = Staleness::default();
        let f = |state: &mut Staleness, mirrored: &str, t: i64| {
            freshness(state, Some("7"), Some(mirrored), limit, at(t))
        };
        assert_eq!(f(&mut state, "7", 0), Freshness::Fresh);
        assert_eq!(
            f(&mut state, "6", 1),
            Freshness::Fresh,
            "lagging, not yet long"
        );
        assert_eq!(f(&mut state, "6", 6), Freshness::Restart);
        assert_eq!(
            f(&mut state, "6", 8),
            Freshness::Fresh,
            "the restart gets its time"
        );
        assert_eq!(
            f(&mut state, "6", 11),
            Freshness::Stale {
                since: at(1),
                restart: true
            }
        );
        assert_eq!(
            f(&mut state, "6", 12),
            Freshness::Stale {
                since: at(1),
                restart: false
            }
        );
        assert_eq!(f(&mut state, "7", 13), Freshness::Fresh, "heard again");
        assert_eq!(state, Staleness::default());
        // A probe that read no Lease judges nothing.
        assert_eq!(
            freshness(&mut state, None, Some("1"), limit, at(99)),
            Freshness::Fresh
        );
    }

    #[test]
    fn a_misconfigured_peer_is_left_out_and_never_lost() {
        let wrong = Probe::Failed(Problem {
            reason: "SameCluster",
            message: "points back".into(),
            misconfigured: true,
        });
        let c = after_probe(Contact::default(), wrong, at(0), AFTER, at(60));
        assert_eq!(standing(&c, true), Standing::Misconfigured);
        assert_eq!(c.lost_since, None);
    }
}
