//! The request and pools turned into numbers the solver works on: eligibility,
//! capacity, per-replica cost, groups per level, and the objective of a plan.

use std::collections::BTreeMap;

use crate::model::{Level, Pool, Request, Strategy, WhenUnsatisfiable};

/// Costs are kept in micro-dollars per hour so sums are exact and ties are real ties.
const MICRO: f64 = 1e6;

/// One pool as the solver sees it.
pub(crate) struct PoolFacts {
    /// Index into the caller's pool slice.
    pub input: usize,
    /// `Err` names why the pool cannot take this deployment.
    pub eligible: Result<(), String>,
    pub capacity: u32,
    /// Micro-USD per hour of one replica.
    pub cost: i64,
    /// Position of the pool's GPU type in the preference list (0 = preferred).
    pub preference: i64,
    /// Position by name: the last tie-break.
    pub rank: i64,
    /// Replicas running here now that may stay (the pool is healthy and eligible).
    pub current: u32,
    /// The pool's group at each level.
    pub group: [usize; 4],
}

/// The rules that apply at one level, and its groups.
#[derive(Default)]
pub(crate) struct LevelRules {
    /// `maxShare` caps in replicas, ascending.
    pub caps: Vec<u32>,
    /// `minGroups`, ascending.
    pub mins: Vec<u32>,
    /// A printable name per group.
    pub names: Vec<String>,
}

impl LevelRules {
    pub fn max_min(&self) -> u32 {
        self.mins.last().copied().unwrap_or(0)
    }

    pub fn tightest_cap(&self) -> Option<u32> {
        self.caps.first().copied()
    }

    /// Replicas above the caps for a group holding `held`.
    pub fn excess(&self, held: u32) -> i64 {
        self.caps
            .iter()
            .map(|&u| i64::from(held.saturating_sub(u)))
            .sum()
    }

    /// Groups missing from `minGroups` when `used` groups hold a replica.
    pub fn missing(&self, used: u32) -> i64 {
        self.mins
            .iter()
            .map(|&m| i64::from(m.saturating_sub(used)))
            .sum()
    }

    /// The missing-groups reward of the `j`-th used group (1-based): how many rules
    /// still count it.
    pub fn reward(&self, j: u32) -> i64 {
        self.mins.iter().filter(|&&m| m >= j).count() as i64
    }
}

pub(crate) struct Problem {
    pub replicas: u32,
    pub pools: Vec<PoolFacts>,
    pub levels: [LevelRules; 4],
    pub dns: bool,
    pub balanced: bool,
}

/// Positions in the flow's cost vector.
pub(crate) const K: usize = 8;
pub(crate) const FORCE: usize = 0;
pub(crate) const KEPT: usize = 4;
pub(crate) const COST: usize = 5;
pub(crate) const PREFERENCE: usize = 6;
pub(crate) const NAME: usize = 7;

impl Problem {
    pub fn new(request: &Request, pools: &[Pool]) -> Problem {
        let g = request.gpus_per_replica;
        let mut order: Vec<usize> = (0..pools.len()).collect();
        order.sort_by(|&a, &b| pools[a].name.cmp(&pools[b].name).then(a.cmp(&b)));

        let mut levels: [LevelRules; 4] = Default::default();
        let mut keys: [BTreeMap<String, usize>; 4] = Default::default();
        let mut facts = Vec::with_capacity(pools.len());
        for (rank, &i) in order.iter().enumerate() {
            let pool = &pools[i];
            let zone = match &pool.zone {
                Some(z) => format!("{}/{}", pool.region, z),
                None => format!("{}/({})", pool.region, pool.name),
            };
            let names = [
                pool.provider.clone(),
                format!("{}/{}", pool.provider, pool.region),
                format!("{}/{}", pool.provider, zone),
                pool.name.clone(),
            ];
            let mut group = [0; 4];
            for (l, name) in names.into_iter().enumerate() {
                let next = keys[l].len();
                group[l] = *keys[l].entry(name.clone()).or_insert_with(|| {
                    levels[l].names.push(name);
                    next
                });
            }
            let eligible = eligibility(request, pool);
            let capacity = if eligible.is_ok() {
                pool.capacity(g)
            } else {
                0
            };
            let current = if eligible.is_ok() && pool.healthy {
                request.current.get(&pool.name).copied().unwrap_or(0)
            } else {
                0
            };
            facts.push(PoolFacts {
                input: i,
                eligible,
                capacity: capacity.min(request.replicas),
                cost: (pool.replica_cost(g.max(1)) * MICRO).round() as i64,
                preference: preference(request, pool),
                rank: rank as i64,
                current,
                group,
            });
        }
        for rule in &request.spread {
            let level = &mut levels[rule.by.index()];
            level.caps.push(rule.cap(request.replicas));
            level.mins.push(rule.min_groups.max(1));
        }
        for level in &mut levels {
            level.caps.sort_unstable();
            level.mins.sort_unstable();
        }
        Problem {
            replicas: request.replicas,
            pools: facts,
            levels,
            dns: request.when_unsatisfiable == WhenUnsatisfiable::DoNotSchedule,
            balanced: request.strategy == Strategy::Balanced,
        }
    }

    pub fn level(&self, level: Level) -> &LevelRules {
        &self.levels[level.index()]
    }

    /// Positions of placed, excess and missing in the cost vector: DoNotSchedule
    /// puts meeting `minGroups` before placing more.
    pub fn positions(&self) -> (usize, usize, usize) {
        if self.dns { (2, 3, 1) } else { (1, 2, 3) }
    }

    /// Replicas per group at `level` for plan `x`.
    pub fn held(&self, level: Level, x: &[u32]) -> Vec<u32> {
        let mut held = vec![0u32; self.level(level).names.len()];
        for (p, &n) in self.pools.iter().zip(x) {
            held[p.group[level.index()]] += n;
        }
        held
    }

    pub fn excess(&self, x: &[u32]) -> i64 {
        Level::ALL
            .iter()
            .map(|&l| {
                let rules = self.level(l);
                self.held(l, x)
                    .iter()
                    .map(|&h| rules.excess(h))
                    .sum::<i64>()
            })
            .sum()
    }

    /// Groups missing from `minGroups` at one level; none when nothing is asked for.
    pub fn missing_at(&self, level: Level, x: &[u32]) -> i64 {
        if self.replicas == 0 {
            return 0;
        }
        let used = self.held(level, x).iter().filter(|&&h| h > 0).count() as u32;
        self.level(level).missing(used)
    }

    pub fn missing(&self, x: &[u32]) -> i64 {
        Level::ALL.iter().map(|&l| self.missing_at(l, x)).sum()
    }

    pub fn kept(&self, x: &[u32]) -> i64 {
        self.pools
            .iter()
            .zip(x)
            .map(|(p, &n)| i64::from(p.current.min(n)))
            .sum()
    }

    /// The objective of plan `x`, lexicographically smaller is better:
    /// most placed, then (ScheduleAnyway) least excess and fewest missing groups,
    /// most kept, then balance when asked, cost, preference and name.
    /// DoNotSchedule puts missing groups first; its plans have no excess.
    pub fn score(&self, x: &[u32], with_balance: bool) -> Vec<i64> {
        let placed: i64 = x.iter().map(|&n| i64::from(n)).sum();
        let (excess, missing) = (self.excess(x), self.missing(x));
        let mut score = if self.dns {
            vec![missing, -placed, excess]
        } else {
            vec![-placed, excess, missing]
        };
        score.push(-self.kept(x));
        if with_balance && self.balanced {
            for level in [Level::Provider, Level::Region, Level::Zone] {
                score.push(i64::from(
                    self.held(level, x).into_iter().max().unwrap_or(0),
                ));
            }
        }
        let linear = |f: fn(&PoolFacts) -> i64| -> i64 {
            // Saturating: absurd prices times absurd replica counts must not overflow.
            self.pools.iter().zip(x).fold(0i64, |sum, (p, &n)| {
                sum.saturating_add(f(p).saturating_mul(i64::from(n)))
            })
        };
        score.push(linear(|p| p.cost));
        score.push(linear(|p| p.preference));
        score.push(linear(|p| p.rank));
        score
    }
}

/// Why a pool may not take this deployment, in words a person acts on.
fn eligibility(request: &Request, pool: &Pool) -> Result<(), String> {
    match Ineligible::of(request, pool) {
        Some(why) => Err(why.reason(request, pool)),
        None => Ok(()),
    }
}

/// What keeps a pool from taking a deployment (docs/placement.md, the contract, rule 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ineligible {
    Provider,
    Region,
    GpuType,
    CapacityType,
    NoGpuCount,
    FewGpus,
    Unhealthy,
}

impl Ineligible {
    /// The first reason `pool` may not take `request`, if any. Reads only the pool's
    /// provider, region, GPU type and count, capacity type and health.
    pub fn of(request: &Request, pool: &Pool) -> Option<Ineligible> {
        let capacity_type_allowed = if request.capacity_types.is_empty() {
            pool.capacity_type == "on-demand"
        } else {
            request.capacity_types.contains(&pool.capacity_type)
        };
        if !request.providers.is_empty() && !request.providers.contains(&pool.provider) {
            Some(Ineligible::Provider)
        } else if !request.regions.is_empty() && !request.regions.contains(&pool.region) {
            Some(Ineligible::Region)
        } else if !request.gpu_types.is_empty() && !request.gpu_types.contains(&pool.gpu_type) {
            Some(Ineligible::GpuType)
        } else if !capacity_type_allowed {
            Some(Ineligible::CapacityType)
        } else if request.gpus_per_replica == 0 {
            Some(Ineligible::NoGpuCount)
        } else if pool.gpus_per_node < request.gpus_per_replica {
            Some(Ineligible::FewGpus)
        } else if !pool.healthy {
            Some(Ineligible::Unhealthy)
        } else {
            None
        }
    }

    fn reason(self, request: &Request, pool: &Pool) -> String {
        match self {
            Ineligible::Provider => {
                format!("provider {} is not in placement.providers", pool.provider)
            }
            Ineligible::Region => format!("region {} is not in placement.regions", pool.region),
            Ineligible::GpuType => format!("GPU type {} is not in gpu.types", pool.gpu_type),
            Ineligible::CapacityType => format!(
                "capacity type {} is not in placement.capacityTypes",
                pool.capacity_type
            ),
            Ineligible::NoGpuCount => "gpu.count is 0; it must be at least 1".to_string(),
            Ineligible::FewGpus => format!(
                "a node has {} GPUs, a replica needs {}",
                pool.gpus_per_node, request.gpus_per_replica
            ),
            Ineligible::Unhealthy => "the pool is unhealthy (its nodes are lost)".to_string(),
        }
    }
}

fn preference(request: &Request, pool: &Pool) -> i64 {
    request
        .gpu_types
        .iter()
        .position(|t| *t == pool.gpu_type)
        .unwrap_or(0) as i64
}
