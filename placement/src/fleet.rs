//! Plans for many deployments over shared pools, solved again only when what a plan
//! depends on changed.
//!
//! Each deployment's last plan is kept with a digest of its input. The digest reads
//! the request and, of each pool, everything when the pool is eligible, but only its
//! name, groups and eligibility facts (provider, region, zone, GPU type and count,
//! capacity type, health) when it is not: a pool that cannot take a deployment
//! appears in its plan by name, group and the reason only, never by capacity,
//! nodes or price. So a change in one pool's capacity leaves the digest, and the
//! plan, of every deployment it is not eligible for as it was, and an index from
//! each pool to the deployments it is eligible for names the ones to re-plan.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use crate::model::{Plan, Pool, Request};
use crate::problem::Ineligible;

/// What a plan reads of a pool that is not eligible, and what decides whether it is.
type EligibilityFacts<'a> = (
    &'a str,
    &'a str,
    &'a str,
    Option<&'a str>,
    &'a str,
    u32,
    &'a str,
    bool,
);

fn eligibility_facts(pool: &Pool) -> EligibilityFacts<'_> {
    (
        &pool.name,
        &pool.provider,
        &pool.region,
        pool.zone.as_deref(),
        &pool.gpu_type,
        pool.gpus_per_node,
        &pool.capacity_type,
        pool.healthy,
    )
}

/// What decides a pool's capacity and cost.
fn capacity_facts(pool: &Pool, hasher: &mut impl Hasher) {
    (
        pool.price_per_node_hour.to_bits(),
        pool.max_nodes,
        pool.scalable,
        pool.growth_blocked,
        &pool.nodes,
    )
        .hash(hasher);
}

/// The digest of what `solve(request, pools)` depends on, and the eligible pools.
fn digest<'a>(request: &Request, pools: &'a [Pool]) -> (u64, Vec<&'a str>) {
    let mut hasher = DefaultHasher::new();
    request.hash(&mut hasher);
    pools.len().hash(&mut hasher);
    let mut eligible = Vec::new();
    for pool in pools {
        eligibility_facts(pool).hash(&mut hasher);
        if Ineligible::of(request, pool).is_none() {
            capacity_facts(pool, &mut hasher);
            eligible.push(pool.name.as_str());
        }
    }
    (hasher.finish(), eligible)
}

struct Entry {
    digest: u64,
    eligible: Vec<String>,
    plan: Arc<Plan>,
}

/// A deployment's plan from a [`Fleet`].
#[derive(Clone, Debug)]
pub struct Planned {
    pub plan: Arc<Plan>,
    /// Solved for this call; false when the input was as last time and the last
    /// plan was returned.
    pub solved: bool,
}

/// The last plan of each deployment (keyed by `K`), the digest of the input it was
/// solved from, and for each pool the deployments it was eligible for.
pub struct Fleet<K> {
    entries: BTreeMap<K, Entry>,
    eligible: HashMap<String, BTreeSet<K>>,
    /// Keep each plan's full explanation (its typed `rules` and
    /// `unplaced_reason` are always kept).
    explained: bool,
}

impl<K> Default for Fleet<K> {
    fn default() -> Self {
        Fleet {
            entries: BTreeMap::new(),
            eligible: HashMap::new(),
            explained: true,
        }
    }
}

impl<K> Fleet<K> {
    /// A fleet that keeps its plans without the line-per-pool explanation, for a
    /// caller that keeps many plans and never shows them whole.
    pub fn without_explanations() -> Self {
        Fleet {
            explained: false,
            ..Fleet::default()
        }
    }
}

impl<K: Ord + Clone> Fleet<K> {
    /// The plan for `key`: `solve(request, pools)`, or the last plan when the input
    /// digest is unchanged (equal by construction, up to a 64-bit hash collision).
    pub fn plan(&mut self, key: &K, request: &Request, pools: &[Pool]) -> Planned {
        let (digest, eligible) = digest(request, pools);
        if let Some(entry) = self.entries.get(key).filter(|e| e.digest == digest) {
            return Planned {
                plan: entry.plan.clone(),
                solved: false,
            };
        }
        self.forget(key);
        let mut plan = crate::solve(request, pools);
        if !self.explained {
            plan.explanation = Vec::new();
        }
        let plan = Arc::new(plan);
        for pool in &eligible {
            self.eligible
                .entry((*pool).to_string())
                .or_default()
                .insert(key.clone());
        }
        self.entries.insert(
            key.clone(),
            Entry {
                digest,
                eligible: eligible.into_iter().map(str::to_string).collect(),
                plan: plan.clone(),
            },
        );
        Planned { plan, solved: true }
    }

    /// The deployments whose plan a change of one pool from `before` to `after` can
    /// change: those it was eligible for when they were last planned, or every one
    /// when what decides eligibility changed (then `plan` skips the rest by digest).
    pub fn affected(&self, before: &Pool, after: &Pool) -> Vec<K> {
        if eligibility_facts(before) != eligibility_facts(after) {
            return self.entries.keys().cloned().collect();
        }
        self.interested(&before.name)
    }

    /// The deployments pool `pool` was eligible for when they were last planned:
    /// those a change of its capacity can re-plan.
    pub fn interested(&self, pool: &str) -> Vec<K> {
        self.eligible
            .get(pool)
            .map(|keys| keys.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Drops what is kept for `key` (its deployment is gone).
    pub fn forget(&mut self, key: &K) {
        let Some(entry) = self.entries.remove(key) else {
            return;
        };
        for pool in &entry.eligible {
            if let Some(keys) = self.eligible.get_mut(pool) {
                keys.remove(key);
                if keys.is_empty() {
                    self.eligible.remove(pool);
                }
            }
        }
    }
}
