//! Plain input and output types of the solver. The operator converts Kubernetes
//! resources into these; nothing here knows about Kubernetes.

use std::collections::BTreeMap;

use serde::Serialize;

/// The grouping a spread rule counts by. Groups nest: a provider holds regions, a
/// region holds zones, a zone holds pools.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Provider,
    Region,
    Zone,
    Pool,
}

impl Level {
    pub const ALL: [Level; 4] = [Level::Provider, Level::Region, Level::Zone, Level::Pool];

    pub fn as_str(self) -> &'static str {
        match self {
            Level::Provider => "provider",
            Level::Region => "region",
            Level::Zone => "zone",
            Level::Pool => "pool",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// What the solver minimises after placing replicas and keeping current ones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// Least total cost per hour.
    #[default]
    Cost,
    /// The smallest largest group at provider, then region, then zone level; then cost.
    Balanced,
}

/// What to do when the spread rules cannot all hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum WhenUnsatisfiable {
    /// Place as many replicas as capacity allows, breaking rules as little as possible.
    #[default]
    ScheduleAnyway,
    /// Place only what keeps every rule; nothing if `minGroups` cannot be met.
    DoNotSchedule,
}

/// One spread rule: at least `min_groups` groups hold a replica, and no group holds
/// more than `max(1, floor(replicas * max_share / 100))`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SpreadRule {
    pub by: Level,
    pub min_groups: u32,
    /// Percent, 1..=100; values outside are clamped into that range.
    pub max_share: u32,
}

impl SpreadRule {
    /// The most replicas one group may hold under this rule for `replicas` in all.
    pub fn cap(&self, replicas: u32) -> u32 {
        let share = u64::from(self.max_share.clamp(1, 100));
        let cap = u64::from(replicas) * share / 100;
        u32::try_from(cap).unwrap_or(u32::MAX).max(1)
    }
}

/// One existing node of a pool, as the inventory sees it for this deployment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Node {
    pub ready: bool,
    /// GPUs not requested by other workloads.
    pub free_gpus: u32,
}

/// A pool of identical GPU nodes in one provider and region.
#[derive(Clone, Debug, PartialEq)]
pub struct Pool {
    pub name: String,
    pub provider: String,
    pub region: String,
    pub zone: Option<String>,
    pub gpu_type: String,
    pub gpus_per_node: u32,
    /// `on-demand` or `spot`.
    pub capacity_type: String,
    /// USD per node-hour; non-finite or negative prices count as 0.
    pub price_per_node_hour: f64,
    /// `nodes.max`.
    pub max_nodes: u32,
    /// The pool has a `scaling` block, so Outrigger may add nodes up to `max_nodes`.
    pub scalable: bool,
    /// The cloud reported a capacity or quota error within the backoff window.
    pub growth_blocked: bool,
    /// False while the pool's nodes have been lost for `unhealthyAfterSeconds`.
    pub healthy: bool,
    /// Existing nodes; ones not Ready count toward the node limit but hold nothing.
    pub nodes: Vec<Node>,
}

impl Pool {
    /// Replicas of `gpus` GPUs each that fit on one fresh node.
    pub fn slots_per_node(&self, gpus: u32) -> u32 {
        self.gpus_per_node.checked_div(gpus).unwrap_or(0)
    }

    /// The node count this pool may reach for this plan.
    pub fn node_limit(&self) -> u32 {
        let existing = self.existing_nodes();
        if self.scalable && !self.growth_blocked {
            self.max_nodes.max(existing)
        } else {
            existing
        }
    }

    pub fn existing_nodes(&self) -> u32 {
        u32::try_from(self.nodes.len()).unwrap_or(u32::MAX)
    }

    /// Replicas of `gpus` GPUs each that fit on free GPUs of ready nodes.
    pub fn free_slots(&self, gpus: u32) -> u64 {
        self.nodes
            .iter()
            .filter(|n| n.ready)
            .map(|n| u64::from(n.free_gpus.checked_div(gpus).unwrap_or(0)))
            .sum()
    }

    /// Capacity in replicas (docs/placement.md, the contract, rule 2).
    pub fn capacity(&self, gpus: u32) -> u32 {
        let growth = u64::from(self.node_limit() - self.existing_nodes())
            * u64::from(self.slots_per_node(gpus));
        u32::try_from(self.free_slots(gpus) + growth).unwrap_or(u32::MAX)
    }

    /// Takes `replicas` replicas of `gpus` GPUs from this pool's free capacity, so a
    /// later plan sees what this one used: first free GPUs of ready nodes, then new
    /// nodes. Replicas beyond capacity are ignored.
    pub fn reserve(&mut self, replicas: u32, gpus: u32) {
        if gpus == 0 {
            return;
        }
        let mut left = replicas;
        for node in self.nodes.iter_mut().filter(|n| n.ready) {
            let fit = (node.free_gpus / gpus).min(left);
            node.free_gpus -= fit * gpus;
            left -= fit;
        }
        let slots = self.slots_per_node(gpus);
        while left > 0 && slots > 0 && self.existing_nodes() < self.node_limit() {
            let fit = slots.min(left);
            self.nodes.push(Node {
                ready: true,
                free_gpus: self.gpus_per_node - fit * gpus,
            });
            left -= fit;
        }
    }

    /// USD per hour of one replica: the node price over the replicas a node holds.
    pub fn replica_cost(&self, gpus: u32) -> f64 {
        let price = if self.price_per_node_hour.is_finite() {
            self.price_per_node_hour.clamp(0.0, 1e9)
        } else {
            0.0
        };
        match self.slots_per_node(gpus) {
            0 => 0.0,
            slots => price / f64::from(slots),
        }
    }
}

/// What one ModelDeployment asks of the solver.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Request {
    pub replicas: u32,
    /// GPUs per replica, at least 1.
    pub gpus_per_replica: u32,
    /// Acceptable GPU types, preferred first; empty accepts any.
    pub gpu_types: Vec<String>,
    /// Provider allow-list; empty allows all.
    pub providers: Vec<String>,
    /// Region allow-list; empty allows all.
    pub regions: Vec<String>,
    /// Allowed capacity types; empty means `[on-demand]`.
    pub capacity_types: Vec<String>,
    pub strategy: Strategy,
    pub spread: Vec<SpreadRule>,
    pub when_unsatisfiable: WhenUnsatisfiable,
    /// Replicas per pool now, by pool name.
    pub current: BTreeMap<String, u32>,
}

/// Replicas on one pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Placement {
    pub pool: String,
    pub provider: String,
    pub region: String,
    pub zone: Option<String>,
    pub replicas: u32,
}

/// The solver's answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Pools with at least one replica, by pool name.
    pub placements: Vec<Placement>,
    pub placed: u32,
    pub unplaced: u32,
    /// Every spread rule holds for the replicas placed.
    pub diversified: bool,
    /// Every spread rule holds and every replica is placed.
    pub satisfied: bool,
    /// Replicas moved off healthy pools they run on now.
    pub moved: u32,
    pub cost_per_hour: f64,
    /// Why each pool got its count, and what would fix a rule that is not met.
    pub explanation: Vec<String>,
    /// Of the explanation, the lines about the spread rules (one per rule, and the
    /// DoNotSchedule line when it applies).
    pub rules: Vec<String>,
    /// Of the explanation, why replicas are unplaced, when some are.
    pub unplaced_reason: Option<String>,
    /// The objective the plan minimises, lexicographically; equal scores are equally good.
    pub score: Vec<i64>,
}

impl Plan {
    pub fn replicas_on(&self, pool: &str) -> u32 {
        self.placements
            .iter()
            .find(|p| p.pool == pool)
            .map_or(0, |p| p.replicas)
    }
}
