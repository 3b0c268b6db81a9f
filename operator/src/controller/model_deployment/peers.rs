//! Which clusters serve a ModelDeployment, and its view over their pools. Peers
//! whose standing is not known yet make the pass wait, unless their mirrors show
//! they hold no copy of it; lost peers are left out (the others take their share);
//! serving peers count only if they hold a copy.

use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::ObjectRef;
use outrigger_crds::ModelDeployment;

use crate::observe::global::{self, Cluster, GlobalView};
use crate::observe::inventory::{Inventory, Key};
use crate::observe::peers::{Peers, Standing};
use crate::observe::published;

/// On a copy served with peers: it hands its share over before its replicas go.
pub const FINALIZER: &str = "outrigger.dev/peers";
/// The longest a deleted copy waits for the other clusters to take its share.
pub const HAND_OVER_LIMIT: std::time::Duration = std::time::Duration::from_secs(300);

/// Who can take over a deleted copy's share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handover {
    /// No serving peer holds a live copy: nothing to wait for.
    Nobody,
    /// The serving peers with a live copy, and their Ready replicas of it.
    Ready { ready: u32, clusters: Vec<String> },
}

/// Some peer's standing is not known yet.
pub fn waiting(peers: &Peers) -> bool {
    peers
        .links()
        .iter()
        .any(|l| l.standing() == Standing::Waiting)
}

pub fn handover(key: &Key, peers: &Peers) -> Handover {
    let mut ready = 0;
    let mut clusters = Vec::new();
    for link in peers.links() {
        if link.standing() != Standing::Serving {
            continue;
        }
        let live = link
            .remote
            .copies
            .get(&ObjectRef::new(&key.1).within(&key.0))
            .is_some_and(|c| matches!(&c.0, Ok(md) if md.metadata.deletion_timestamp.is_none()));
        if !live {
            continue;
        }
        clusters.push(link.name.clone());
        ready += link
            .facts()
            .children
            .iter()
            .filter(|c| &c.owner == key)
            .map(|c| c.ready.min(c.replicas))
            .sum::<u32>();
    }
    if clusters.is_empty() {
        Handover::Nobody
    } else {
        Handover::Ready { ready, clusters }
    }
}

/// A lost peer that ran some of this deployment's replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost {
    pub peer: String,
    pub since: Timestamp,
    /// Replicas its children asked for when it was last seen.
    pub replicas: u32,
}

pub enum Observed {
    /// No PeerCluster: this cluster alone.
    Alone,
    /// A peer whose standing is not known yet (just linked, or this operator just
    /// started): planning without it could launch its whole share here.
    Wait(String),
    Peers {
        view: GlobalView,
        /// Serving clusters whose copy's spec differs from this one.
        differ: Vec<String>,
        lost: Vec<Lost>,
    },
}

pub fn observe(
    md: &ModelDeployment,
    key: &Key,
    inventory: &Inventory,
    peers: &Peers,
    (grace, rebalance): (std::time::Duration, std::time::Duration),
    now: Timestamp,
) -> Observed {
    if let Some(peer) = peers.pending() {
        return Observed::Wait(peer);
    }
    let links = peers.links();
    if links.is_empty() {
        return Observed::Alone;
    }
    let me = &peers.me.name;
    let spec = serde_json::to_value(&md.spec).ok();
    // This cluster's own facts go through the same bounds its peers apply to
    // them, so every peer builds the same view from the same facts.
    let own = published::facts(
        &inventory.pools,
        &inventory.children,
        k8s_openapi::jiff::SignedDuration::ZERO,
    );
    let mut local = Cluster {
        name: me.clone(),
        pools: own.pools,
        children: own.children,
        back_since: None,
        held: false,
    };
    let mut clusters = Vec::new();
    let mut differ = Vec::new();
    let mut lost = Vec::new();
    for link in links {
        let holds_copy = || {
            link.remote
                .copies
                .get(&ObjectRef::new(&key.1).within(&key.0))
                .is_some()
        };
        match link.standing() {
            // Listed, and without a copy of this deployment: nothing to wait for.
            Standing::Waiting if link.synced() && !holds_copy() => continue,
            Standing::Waiting => return Observed::Wait(link.name.clone()),
            Standing::Misconfigured => continue,
            Standing::Lost { since } => {
                let replicas = link
                    .facts()
                    .children
                    .iter()
                    .filter(|c| &c.owner == key)
                    .map(|c| c.replicas)
                    .sum();
                lost.push(Lost {
                    peer: link.name.clone(),
                    since,
                    replicas,
                });
                continue;
            }
            Standing::Serving => {}
        }
        // What the peer says of this cluster: while it counts this one lost, or
        // for a while after it saw it back, this cluster's pools take nothing new,
        // as in the peer's own plan.
        if let Some(status) = link
            .remote
            .peers
            .get(&ObjectRef::new(me))
            .and_then(|p| p.status.clone())
        {
            local.held |= status.lost_since.is_some();
            if let Some(back) = status.back_since {
                local.back_since = local.back_since.max(Some(link.local_time(back.0)));
            }
        }
        let Some(copy) = link
            .remote
            .copies
            .get(&ObjectRef::new(&key.1).within(&key.0))
        else {
            continue;
        };
        match &copy.0 {
            Ok(theirs) if theirs.metadata.deletion_timestamp.is_some() => continue,
            Ok(theirs) => {
                if serde_json::to_value(&theirs.spec).ok() != spec {
                    differ.push(link.name.clone());
                }
            }
            Err(_) => differ.push(link.name.clone()),
        }
        // Bounded, checked and on the local clock; rejected pools are left out
        // (the PeerCluster's FactsValid says which).
        let facts = link.facts();
        clusters.push(Cluster {
            name: link.name.clone(),
            pools: facts.pools,
            children: facts.children,
            back_since: link.contact().back_since,
            held: false,
        });
    }
    clusters.push(local);
    // The same order on every peer.
    clusters.sort_by(|a, b| a.name.cmp(&b.name));
    Observed::Peers {
        view: global::view(&clusters, key, grace, rebalance, now),
        differ,
        lost,
    }
}
