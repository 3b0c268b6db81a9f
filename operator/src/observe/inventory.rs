//! What the cluster holds, from the reflectors' stores: each pool's nodes, their
//! GPUs and who uses them, and the children Outrigger applied. Pure: the stores'
//! contents and the time go in, solver inputs and pool counts come out.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use outrigger_crds::{CapacityBackoff, GpuNodePool, Offering, Provider};
use outrigger_placement as placement;

use crate::lifecycle::Interruption;
use crate::{inputs, labels};

/// A ModelDeployment by namespace and name.
pub type Key = (String, String);

/// One node, as far as placement cares.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    pub name: String,
    /// Index into the inventory's pools.
    pub pool: Option<usize>,
    pub readiness: Readiness,
    pub allocatable: u32,
    /// GPUs requested on this node, by the ModelDeployment that placed the pod
    /// (`None` for other workloads).
    pub used: Vec<(Option<Key>, u32)>,
    /// `spec.providerID`: the cloud instance behind it.
    pub provider_id: Option<String>,
    /// Cordoned by the scaler to be returned (`outrigger.dev/scale-down`).
    pub cordoned: bool,
    /// The cloud takes it back: an interruption notice, until its deadline.
    pub interruption: Option<Interruption>,
}

impl NodeFacts {
    /// Doomed by an interruption notice: no capacity for planning, and its
    /// replicas stay only until replacements are Ready or the deadline comes.
    pub fn doomed(&self) -> bool {
        self.interruption.is_some()
    }

    /// No ModelDeployment replica runs here.
    pub fn runs_no_replica(&self) -> bool {
        self.used.iter().all(|(owner, _)| owner.is_none())
    }

    /// GPUs that other workloads (not ModelDeployments) request here.
    pub fn others_gpus(&self) -> u32 {
        self.used
            .iter()
            .filter(|(owner, _)| owner.is_none())
            .map(|(_, g)| g)
            .sum()
    }

    /// When the node stopped counting; `None` while Ready or booting.
    pub fn lost_since(&self) -> Option<Timestamp> {
        match self.readiness {
            Readiness::Lost(since) => Some(since),
            Readiness::Ready | Readiness::Booting => None,
        }
    }
}

/// How a node counts for placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Readiness {
    Ready,
    /// Registered but never Ready yet (a new node starting): neither capacity nor
    /// lost. Placement counts it as the pool's room to grow, as before it registered.
    Booting,
    /// Not Ready, or tainted unreachable, since then.
    Lost(Timestamp),
}

/// A node whose kubelet says `KubeletNotReady` and whose Ready condition has not
/// moved since (within this much of) its registration has not been Ready yet: it is
/// booting, not lost. The slack covers the kubelet's clock against the API server's.
const FIRST_READY_WINDOW: SignedDuration = SignedDuration::from_secs(10);
/// The kubelet's reason for a Ready=False condition while it starts.
const KUBELET_NOT_READY: &str = "KubeletNotReady";

/// One child Deployment Outrigger applied.
#[derive(Debug, Clone)]
pub struct Child {
    pub owner: Key,
    pub pool: String,
    pub name: String,
    pub replicas: u32,
    pub ready: u32,
    /// GPUs per replica.
    pub gpus: u32,
    /// Its pods that are bound to a node.
    pub scheduled: u32,
    pub applied_hash: Option<String>,
}

impl Child {
    /// The child a Deployment of Outrigger's is, with `scheduled` of its pods bound;
    /// `None` for a Deployment without an owner or pool label.
    pub fn of(d: &Deployment, scheduled: u32) -> Option<Child> {
        let l = d.metadata.labels.as_ref()?;
        let owner = owner_of(Some(l), d.metadata.namespace.as_ref())?;
        let pool = l.get(labels::POOL)?.clone();
        let spec = &d.spec;
        let count = |n: Option<i32>| n.unwrap_or(0).max(0).unsigned_abs();
        Some(Child {
            scheduled,
            owner,
            pool,
            name: d.metadata.name.clone().unwrap_or_default(),
            replicas: count(spec.replicas.or(Some(1))),
            ready: count(d.status.as_ref().and_then(|s| s.ready_replicas)),
            gpus: spec.template.spec.as_ref().map_or(0, spec_gpus),
            applied_hash: d
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(labels::APPLIED_HASH))
                .cloned(),
        })
    }
}

/// Counts a pool's status reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolCounts {
    pub nodes: u32,
    pub ready_nodes: u32,
    /// Registered, not Ready yet for the first time.
    pub booting_nodes: u32,
    pub allocatable: u32,
    pub requested: u32,
}

/// How one pool looks to one ModelDeployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Healthy,
    /// Every node lost for at least `unhealthyAfterSeconds`: replicas leave.
    Unhealthy {
        lost_since: Timestamp,
    },
    /// Back after an outage but not yet for `rebalanceAfterSeconds`: keeps what it
    /// has, takes nothing new.
    Recovering {
        until: Timestamp,
    },
}

pub struct Inventory {
    pub pools: Vec<Arc<GpuNodePool>>,
    pub nodes: Vec<NodeFacts>,
    pub children: Vec<Child>,
    /// Per pool (by index), its nodes (indexes into `nodes`).
    nodes_of: Vec<Vec<usize>>,
    /// Per pool name, its children (indexes into `children`).
    children_in: BTreeMap<String, Vec<usize>>,
    /// Per ModelDeployment, its children (indexes into `children`).
    children_by: BTreeMap<Key, Vec<usize>>,
    by_pool_name: BTreeMap<String, usize>,
    by_node_name: BTreeMap<String, usize>,
    /// Per offering (`offering_key`), the capacity backoff that ends last: from
    /// every pool's status, and from capacity reclaimed just now (`reclaimed`).
    /// Every pool with that offering stops growing until it ends.
    backoffs: BTreeMap<String, CapacityBackoff>,
    /// Per pool (by index), its offering's key.
    offerings: Vec<String>,
    /// Offerings a node of which is being reclaimed (spot, Preempt).
    reclaimed: std::collections::BTreeSet<String>,
}

/// What a backoff is shared by: provider, instance type, zone and capacity type.
pub fn offering_key(provider: Provider, offering: &Offering) -> String {
    format!(
        "{}/{}/{}/{}",
        provider.as_str(),
        offering.instance_type,
        offering.zone.as_deref().unwrap_or("-"),
        offering.capacity_type.as_str()
    )
}

/// The offering a pool's launches ask for.
pub fn offering_of(pool: &GpuNodePool) -> Offering {
    Offering {
        instance_type: pool.spec.instance_type.clone(),
        zone: pool.spec.zone.clone(),
        capacity_type: pool.spec.capacity_type,
    }
}

/// What the solver needs for one ModelDeployment, and when that view changes on its own.
pub struct View {
    pub pools: Vec<placement::Pool>,
    pub health: BTreeMap<String, Health>,
    /// The next time a lost node crosses the grace period or a recovering pool may
    /// take replicas again: reconcile then.
    pub next_change: Option<Timestamp>,
}

pub fn gpus_of(quantities: Option<&BTreeMap<String, Quantity>>) -> u32 {
    quantities
        .and_then(|q| q.get(labels::GPU))
        .and_then(|q| q.0.parse::<u32>().ok())
        .unwrap_or(0)
}

/// GPUs one pod asks for: per container, requests or else limits. The one rule for
/// GPUs per replica, for running pods and for a child's pod template alike.
pub fn pod_gpus(pod: &Pod) -> u32 {
    pod.spec.as_ref().map_or(0, spec_gpus)
}

fn spec_gpus(spec: &k8s_openapi::api::core::v1::PodSpec) -> u32 {
    spec.containers
        .iter()
        .map(|c| {
            let r = c.resources.as_ref();
            let requested = gpus_of(r.and_then(|r| r.requests.as_ref()));
            if requested > 0 {
                requested
            } else {
                gpus_of(r.and_then(|r| r.limits.as_ref()))
            }
        })
        .sum()
}

/// What a Node says, as far as Outrigger reads it. The inventory is built from it,
/// and a Node's change is told to the controllers only when it changes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeReport {
    pub labels: BTreeMap<String, String>,
    pub reported: Reported,
    pub allocatable: u32,
    pub provider_id: Option<String>,
    pub cordoned: bool,
    pub interruption: Option<Interruption>,
}

impl NodeReport {
    pub fn of(node: &Node) -> NodeReport {
        NodeReport {
            labels: node.metadata.labels.clone().unwrap_or_default(),
            reported: reported(node),
            allocatable: gpus_of(node.status.as_ref().and_then(|s| s.allocatable.as_ref())),
            provider_id: node.spec.as_ref().and_then(|s| s.provider_id.clone()),
            cordoned: node
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(labels::SCALE_DOWN)),
            interruption: Interruption::of(node),
        }
    }
}

/// What a Pod says, as far as Outrigger reads it: where it runs, for whom, and the
/// GPUs it holds. `None` for a pod that holds nothing (not bound, or finished).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PodReport {
    pub node: String,
    pub owner: Option<Key>,
    pub pool: Option<String>,
    pub gpus: u32,
}

impl PodReport {
    pub fn of(pod: &Pod) -> Option<PodReport> {
        let node = pod.spec.as_ref()?.node_name.clone()?;
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            return None;
        }
        let labels_ = pod.metadata.labels.as_ref();
        Some(PodReport {
            node,
            owner: owner_of(labels_, pod.metadata.namespace.as_ref()),
            pool: labels_.and_then(|l| l.get(labels::POOL)).cloned(),
            gpus: pod_gpus(pod),
        })
    }
}

/// What placement reads of a GpuNodePool: its spec and the typed facts of its
/// status (lost since, recovered at, capacity backoff), never its counts or words.
pub fn pool_report(pool: &GpuNodePool) -> impl std::hash::Hash + '_ {
    let status = pool.status.as_ref();
    (
        serde_json::to_string(&pool.spec).unwrap_or_default(),
        status.and_then(|s| s.lost_since.as_ref()).map(|t| t.0),
        status.and_then(|s| s.recovered_at.as_ref()).map(|t| t.0),
        status
            .and_then(|s| s.capacity_backoff.as_ref())
            .map(|b| serde_json::to_string(b).unwrap_or_default()),
    )
}

/// Keeps, per offering, the backoff that ends last.
fn later(backoffs: &mut BTreeMap<String, CapacityBackoff>, provider: Provider, b: CapacityBackoff) {
    let key = offering_key(provider, &b.offering);
    match backoffs.get(&key) {
        Some(kept) if kept.until.0 >= b.until.0 => {}
        _ => {
            backoffs.insert(key, b);
        }
    }
}

/// The ModelDeployment an object of Outrigger's belongs to, from its labels.
pub fn owner_of(
    labels_: Option<&BTreeMap<String, String>>,
    namespace: Option<&String>,
) -> Option<Key> {
    let md = labels_?.get(labels::DEPLOYMENT)?;
    Some((namespace?.clone(), md.clone()))
}

/// What a node's own status says: Ready, booting (no Ready condition yet, or the
/// kubelet's `KubeletNotReady` from registration on), or lost, since the time its
/// Ready condition left True (`Unknown` when the node stopped reporting) or it was
/// tainted unreachable, when the node says so. Some node agents write conditions
/// without `lastTransitionTime`: then the status gives no time, and
/// [`LostClock`] supplies the first time the operator saw the node lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reported {
    Ready,
    Booting,
    Lost(Option<Timestamp>),
}

pub fn reported(node: &Node) -> Reported {
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"));
    let unreachable = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .and_then(|ts| ts.iter().find(|t| t.key == labels::UNREACHABLE_TAINT));
    let created = node.metadata.creation_timestamp.as_ref().map(|t| t.0);
    match (ready, unreachable) {
        (_, Some(t)) => Reported::Lost(t.time_added.as_ref().map(|t| t.0)),
        (Some(c), None) if c.status == "True" => Reported::Ready,
        (None, None) => Reported::Booting,
        (Some(c), None) => {
            let since = c.last_transition_time.as_ref().map(|t| t.0);
            let starting = c.status == "False"
                && c.reason.as_deref() == Some(KUBELET_NOT_READY)
                && match (since, created) {
                    (Some(since), Some(created)) => since <= created + FIRST_READY_WINDOW,
                    _ => false,
                };
            if starting {
                Reported::Booting
            } else {
                Reported::Lost(since)
            }
        }
    }
}

/// The first time this process saw each node lost, so that a missing or stale
/// timestamp in a node's status can never hold the failover clock still: a node
/// counts as lost since the earlier of what it reports and what was seen. A node
/// that is no longer lost is forgotten, so its next loss starts a new clock.
#[derive(Debug, Default)]
pub struct LostClock {
    first_seen: BTreeMap<String, Timestamp>,
}

impl LostClock {
    /// How the node counts now, given what it reports.
    pub fn readiness(&mut self, node: &str, reported: Reported, now: Timestamp) -> Readiness {
        match reported {
            Reported::Ready => {
                self.first_seen.remove(node);
                Readiness::Ready
            }
            Reported::Booting => {
                self.first_seen.remove(node);
                Readiness::Booting
            }
            Reported::Lost(since) => {
                let seen = *self.first_seen.entry(node.to_string()).or_insert(now);
                Readiness::Lost(since.map_or(seen, |s| s.min(seen)))
            }
        }
    }

    /// Forgets the nodes that are gone.
    pub fn retain(&mut self, nodes: &[Arc<Node>]) {
        let names: std::collections::BTreeSet<&str> = nodes
            .iter()
            .filter_map(|n| n.metadata.name.as_deref())
            .collect();
        self.first_seen.retain(|n, _| names.contains(n.as_str()));
    }
}

impl Inventory {
    pub fn new(
        mut pools: Vec<Arc<GpuNodePool>>,
        nodes: &[Arc<Node>],
        pods: &[Arc<Pod>],
        deployments: &[Arc<Deployment>],
        now: Timestamp,
        clock: &mut LostClock,
    ) -> Inventory {
        clock.retain(nodes);
        pools.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        let mut by_name = BTreeMap::new();
        let mut facts: Vec<NodeFacts> = nodes
            .iter()
            .map(|node| {
                let report = NodeReport::of(node);
                let name = node.metadata.name.clone().unwrap_or_default();
                NodeFacts {
                    readiness: clock.readiness(&name, report.reported, now),
                    pool: pools.iter().position(|p| p.selects(&report.labels)),
                    name,
                    allocatable: report.allocatable,
                    used: Vec::new(),
                    provider_id: report.provider_id,
                    cordoned: report.cordoned,
                    interruption: report.interruption,
                }
            })
            .collect();
        facts.sort_by(|a, b| a.name.cmp(&b.name));
        for (i, n) in facts.iter().enumerate() {
            by_name.insert(n.name.clone(), i);
        }
        let mut scheduled: BTreeMap<(Key, String), u32> = BTreeMap::new();
        for pod in pods.iter().filter_map(|p| PodReport::of(p)) {
            if let (Some(owner), Some(pool)) = (&pod.owner, &pod.pool) {
                *scheduled.entry((owner.clone(), pool.clone())).or_default() += 1;
            }
            if let Some(&i) = by_name.get(&pod.node) {
                facts[i].used.push((pod.owner, pod.gpus));
            }
        }
        let children = deployments
            .iter()
            .filter_map(|d| {
                let l = d.metadata.labels.as_ref()?;
                let owner = owner_of(Some(l), d.metadata.namespace.as_ref())?;
                let pool = l.get(labels::POOL)?;
                let scheduled = scheduled.get(&(owner, pool.clone())).copied().unwrap_or(0);
                Child::of(d, scheduled)
            })
            .collect();
        Inventory::from_facts(pools, facts, children)
    }

    /// An inventory of these facts, indexed by pool and by owner. `nodes[i].pool`
    /// indexes into `pools`.
    pub fn from_facts(
        pools: Vec<Arc<GpuNodePool>>,
        facts: Vec<NodeFacts>,
        children: Vec<Child>,
    ) -> Inventory {
        let mut nodes_of = vec![Vec::new(); pools.len()];
        for (i, n) in facts.iter().enumerate() {
            if let Some(pool) = n.pool {
                nodes_of[pool].push(i);
            }
        }
        let mut children_in: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        let mut children_by: BTreeMap<Key, Vec<usize>> = BTreeMap::new();
        for (i, c) in children.iter().enumerate() {
            children_in.entry(c.pool.clone()).or_default().push(i);
            children_by.entry(c.owner.clone()).or_default().push(i);
        }
        let by_pool_name = pools
            .iter()
            .enumerate()
            .map(|(i, p)| (p.metadata.name.clone().unwrap_or_default(), i))
            .collect();
        let by_node_name = facts
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.clone(), i))
            .collect();
        let mut backoffs = BTreeMap::new();
        for pool in &pools {
            if let Some(b) = pool
                .status
                .as_ref()
                .and_then(|s| s.capacity_backoff.as_ref())
            {
                later(&mut backoffs, pool.spec.provider, b.clone());
            }
        }
        let offerings: Vec<String> = pools
            .iter()
            .map(|p| offering_key(p.spec.provider, &offering_of(p)))
            .collect();
        let reclaimed = facts
            .iter()
            .filter(|n| n.interruption.is_some_and(|i| i.kind.reclaims_capacity()))
            .filter_map(|n| offerings.get(n.pool?).cloned())
            .collect();
        Inventory {
            pools,
            nodes: facts,
            children,
            nodes_of,
            children_in,
            children_by,
            by_pool_name,
            by_node_name,
            backoffs,
            offerings,
            reclaimed,
        }
    }

    /// Capacity the cloud reclaimed (a spot interruption), as a backoff of its
    /// offering, before any pool's status says so.
    pub fn reclaimed(&mut self, records: &[(Provider, CapacityBackoff)]) {
        for (provider, record) in records {
            later(&mut self.backoffs, *provider, record.clone());
        }
    }

    /// A node of pool `pool`'s offering (in any pool) is being reclaimed (a spot
    /// interruption, a Preempt): the offering is short now, before the backoff the
    /// interruption starts is recorded.
    pub fn offering_reclaimed(&self, pool: usize) -> bool {
        self.offerings
            .get(pool)
            .is_some_and(|key| self.reclaimed.contains(key))
    }

    /// The backoff of pool `pool`'s offering that ends last, whichever pool (or
    /// interruption) it came from.
    pub fn offering_backoff(&self, pool: usize) -> Option<&CapacityBackoff> {
        self.backoffs.get(self.offerings.get(pool)?)
    }

    pub fn pool_index(&self, name: &str) -> Option<usize> {
        self.by_pool_name.get(name).copied()
    }

    pub fn pool(&self, name: &str) -> Option<&Arc<GpuNodePool>> {
        self.pool_index(name).map(|i| &self.pools[i])
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> Option<&NodeFacts> {
        self.by_node_name.get(name).map(|&i| &self.nodes[i])
    }

    /// The nodes of pool `pool` (an index): each node counts for the first pool,
    /// by name, whose selector it matches.
    pub fn nodes_in(&self, pool: usize) -> impl Iterator<Item = &NodeFacts> + '_ {
        self.nodes_of
            .get(pool)
            .into_iter()
            .flatten()
            .map(|&i| &self.nodes[i])
    }

    /// The children placed on the pool named `pool`.
    pub fn children_in<'a>(&'a self, pool: &str) -> impl Iterator<Item = &'a Child> + 'a {
        self.children_in
            .get(pool)
            .into_iter()
            .flatten()
            .map(|&i| &self.children[i])
    }

    /// The children of one ModelDeployment.
    pub fn children_of<'a>(&'a self, owner: &Key) -> impl Iterator<Item = &'a Child> + 'a {
        self.children_by
            .get(owner)
            .into_iter()
            .flatten()
            .map(|&i| &self.children[i])
    }

    /// Replicas per pool a ModelDeployment runs now.
    pub fn current(&self, owner: &Key) -> BTreeMap<String, u32> {
        self.children_of(owner)
            .filter(|c| c.replicas > 0)
            .map(|c| (c.pool.clone(), c.replicas))
            .collect()
    }

    /// Replicas per pool a ModelDeployment runs on doomed nodes whose deadline has
    /// not come (they serve until their replacements are Ready), and the first
    /// notice among those nodes.
    pub fn doomed(&self, owner: &Key, now: Timestamp) -> BTreeMap<String, (u32, Timestamp)> {
        let mut doomed: BTreeMap<String, (u32, Timestamp)> = BTreeMap::new();
        for n in &self.nodes {
            let (Some(pool), Some(i)) = (n.pool, n.interruption) else {
                continue;
            };
            let here = n
                .used
                .iter()
                .filter(|(o, _)| o.as_ref() == Some(owner))
                .count();
            if i.deadline > now && here > 0 {
                let name = self.pools[pool].metadata.name.clone().unwrap_or_default();
                let entry = doomed.entry(name).or_insert((0, i.noticed));
                entry.0 += u32::try_from(here).unwrap_or(u32::MAX);
                entry.1 = entry.1.min(i.noticed);
            }
        }
        doomed
    }

    /// Ready replicas per pool of a ModelDeployment's children.
    pub fn ready(&self, owner: &Key) -> BTreeMap<String, u32> {
        self.children_of(owner)
            .map(|c| (c.pool.clone(), c.ready))
            .collect()
    }

    /// Every pool by name, as a plan over this cluster alone names them.
    pub fn pool_refs(&self) -> BTreeMap<String, super::global::PoolRef> {
        self.pools
            .iter()
            .map(|p| {
                (
                    p.metadata.name.clone().unwrap_or_default(),
                    super::global::PoolRef {
                        cluster: None,
                        pool: p.clone(),
                    },
                )
            })
            .collect()
    }

    /// Node and GPU counts of one pool.
    pub fn counts(&self, pool: usize) -> PoolCounts {
        let mut counts = PoolCounts::default();
        for n in self.nodes_in(pool) {
            counts.nodes += 1;
            counts.requested += n.used.iter().map(|(_, g)| g).sum::<u32>();
            match n.readiness {
                Readiness::Ready => {
                    counts.ready_nodes += 1;
                    counts.allocatable += n.allocatable;
                }
                Readiness::Booting => counts.booting_nodes += 1,
                Readiness::Lost(_) => {}
            }
        }
        counts
    }

    /// Since when every node of the pool has been lost, if it has nodes and all
    /// are (booting nodes aside).
    pub fn pool_lost_since(&self, pool: usize) -> Option<Timestamp> {
        let mut latest: Option<Timestamp> = None;
        let mut any = false;
        for n in self
            .nodes_in(pool)
            .filter(|n| n.readiness != Readiness::Booting)
        {
            any = true;
            let since = n.lost_since()?;
            latest = Some(latest.map_or(since, |l| l.max(since)));
        }
        if any { latest } else { None }
    }

    /// The pools as `owner` sees them: what other workloads and other
    /// ModelDeployments use is taken, nodes lost for less than `grace` still hold
    /// the owner's own replicas, and pools back from an outage take nothing new for
    /// `rebalance`.
    pub fn view(&self, owner: &Key, grace: Duration, rebalance: Duration, now: Timestamp) -> View {
        let grace = SignedDuration::try_from(grace).unwrap_or(SignedDuration::MAX);
        let rebalance = SignedDuration::try_from(rebalance).unwrap_or(SignedDuration::MAX);
        let mut next: Option<Timestamp> = None;
        let mut soonest = |t: Timestamp| {
            if t > now {
                next = Some(next.map_or(t, |n: Timestamp| n.min(t)));
            }
        };
        let mut pools = Vec::with_capacity(self.pools.len());
        let mut health = BTreeMap::new();
        for (i, pool) in self.pools.iter().enumerate() {
            let name = pool.metadata.name.clone().unwrap_or_default();
            let status = pool.status.as_ref();
            let lost = self.pool_lost_since(i);
            // Typed facts of the pool's status, never its condition's words.
            let recovering_until = match (
                status.and_then(|s| s.recovered_at.as_ref()),
                status.is_some_and(|s| s.lost_since.is_some()),
            ) {
                (Some(at), _) => Some(at.0 + rebalance),
                // Nodes are back but the pool status has not caught up yet: the
                // recovery is happening now.
                (None, true) if lost.is_none() => Some(now + rebalance),
                _ => None,
            }
            .filter(|until| *until > now);
            let state = match (lost, recovering_until) {
                (Some(since), _) if since + grace <= now => Health::Unhealthy { lost_since: since },
                (_, Some(until)) => Health::Recovering { until },
                _ => Health::Healthy,
            };
            if let Some(since) = lost {
                soonest(since + grace);
            }
            if let Some(until) = recovering_until {
                soonest(until);
            }
            let mut nodes = Vec::new();
            // Per node, the GPUs of its free room that this deployment's own bound
            // pods hold.
            let mut held = Vec::new();
            // Booting nodes stay out: the solver sees them as room to grow.
            for n in self
                .nodes_in(i)
                .filter(|n| n.readiness != Readiness::Booting)
            {
                let (own, others): (Vec<_>, Vec<_>) =
                    n.used.iter().partition(|(o, _)| o.as_ref() == Some(owner));
                let own: u32 = own.iter().map(|(_, g)| g).sum();
                let others: u32 = others.iter().map(|(_, g)| g).sum();
                let free = n.allocatable.saturating_sub(others);
                let node = match n.lost_since() {
                    // Going: its replicas are replaced elsewhere (they stay until
                    // then, see `doomed`).
                    _ if n.doomed() => {
                        if let Some(i) = n.interruption {
                            soonest(i.deadline);
                        }
                        placement::Node {
                            ready: false,
                            free_gpus: 0,
                        }
                    }
                    None if !matches!(state, Health::Recovering { .. }) => placement::Node {
                        ready: true,
                        free_gpus: free,
                    },
                    None => placement::Node {
                        ready: true,
                        free_gpus: own.min(free),
                    },
                    Some(since) if since + grace > now => {
                        soonest(since + grace);
                        placement::Node {
                            ready: true,
                            free_gpus: own.min(free),
                        }
                    }
                    Some(_) => placement::Node {
                        ready: false,
                        free_gpus: 0,
                    },
                };
                held.push(own.min(node.free_gpus));
                nodes.push(node);
            }
            let shared = self.offering_backoff(i).filter(|b| b.until.0 > now);
            let growth_blocked = inputs::growth_blocked(status, now)
                || shared.is_some()
                || self.offering_reclaimed(i)
                || matches!(state, Health::Recovering { .. });
            // A backoff's end makes room: plan again then.
            for backoff in status
                .and_then(|s| s.capacity_backoff.as_ref())
                .into_iter()
                .chain(shared)
            {
                soonest(backoff.until.0);
            }
            let mut solver_pool = inputs::pool(
                pool,
                nodes,
                growth_blocked,
                !matches!(state, Health::Unhealthy { .. }),
            );
            // Replicas other ModelDeployments planned here but that are not bound
            // yet will take room too, but only room that nothing is bound to: the
            // scheduler cannot give them what this deployment's own pods hold, so
            // they never make its running replicas look out of place.
            debug_assert_eq!(held.len(), solver_pool.nodes.len());
            for (node, held) in solver_pool.nodes.iter_mut().zip(&held) {
                node.free_gpus -= held;
            }
            for child in self.children_in(&name).filter(|c| &c.owner != owner) {
                solver_pool.reserve(child.replicas.saturating_sub(child.scheduled), child.gpus);
            }
            for (node, held) in solver_pool.nodes.iter_mut().zip(&held) {
                node.free_gpus += held;
            }
            pools.push(solver_pool);
            health.insert(name, state);
        }
        View {
            pools,
            health,
            next_change: next,
        }
    }
}

#[cfg(test)]
mod tests;
