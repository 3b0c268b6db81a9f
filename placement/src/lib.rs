//! Outrigger's placement solver: plain data in, an optimal plan and its explanation
//! out. No Kubernetes, no async, no I/O (docs/placement.md, "The contract").
//!
//! [`solve`] returns the plan that is best for the lexicographic objective: most
//! replicas placed (for ScheduleAnyway, then fewest replicas above `maxShare` caps
//! and fewest groups missing from `minGroups`; for DoNotSchedule only plans that keep
//! every rule), fewest replicas moved off healthy pools, then least cost (or, for
//! `balanced`, the smallest largest provider, region and zone group, then cost), then
//! preferred GPU types, then pool names. Ties are broken the same way every time.
//!
//! [`Fleet`] keeps the plans of many deployments over shared pools and solves one
//! again only when its input changed; a pool a deployment cannot use enters that
//! input only by what makes it ineligible, so a change in the pool's capacity
//! re-plans just the deployments it is eligible for ([`Fleet::affected`]).

#![forbid(unsafe_code)]

mod explain;
mod fleet;
mod flow;
mod model;
mod problem;
mod solve;

pub use fleet::{Fleet, Planned};
pub use model::{
    Level, Node, Placement, Plan, Pool, Request, SpreadRule, Strategy, WhenUnsatisfiable,
};

use problem::Problem;

/// Plans `request` onto `pools`. Pure and deterministic: the same input (in any pool
/// order) gives the same plan. Never panics, whatever the numbers.
pub fn solve(request: &Request, pools: &[Pool]) -> Plan {
    let problem = Problem::new(request, pools);
    let attempt = solve::optimal(&problem);
    let breaks_rules = problem.excess(&attempt) > 0 || problem.missing(&attempt) > 0;
    let x = if problem.dns && breaks_rules {
        vec![0; attempt.len()]
    } else {
        attempt.clone()
    };
    finish(&problem, request, pools, &attempt, x)
}

/// Each pool's capacity in replicas for this request (0 where it is not eligible),
/// in `pools` order.
pub fn capacities(request: &Request, pools: &[Pool]) -> Vec<u32> {
    let problem = Problem::new(request, pools);
    let mut caps = vec![0; pools.len()];
    for p in &problem.pools {
        caps[p.input] = p.capacity;
    }
    caps
}

/// The score of an arbitrary plan (replicas per pool, in `pools` order), for tests
/// and tools that compare plans: lexicographically smaller is better.
pub fn score(request: &Request, pools: &[Pool], replicas: &[u32]) -> Vec<i64> {
    let problem = Problem::new(request, pools);
    let x: Vec<u32> = problem.pools.iter().map(|p| replicas[p.input]).collect();
    problem.score(&x, true)
}

fn finish(
    problem: &Problem,
    request: &Request,
    pools: &[Pool],
    attempt: &[u32],
    x: Vec<u32>,
) -> Plan {
    let g = request.gpus_per_replica;
    let placed: u32 = x.iter().sum();
    let mut placements = Vec::new();
    let mut cost = 0.0;
    for (facts, &n) in problem.pools.iter().zip(&x).filter(|(_, n)| **n > 0) {
        let pool = &pools[facts.input];
        cost += f64::from(n) * pool.replica_cost(g);
        placements.push(Placement {
            pool: pool.name.clone(),
            provider: pool.provider.clone(),
            region: pool.region.clone(),
            zone: pool.zone.clone(),
            replicas: n,
        });
    }
    let current = problem
        .pools
        .iter()
        .fold(0u32, |sum, p| sum.saturating_add(p.current));
    let kept = problem.kept(&x) as u32;
    let diversified = problem.excess(&x) == 0 && problem.missing(&x) == 0;
    let words = explain::explain(problem, request, pools, attempt, &x);
    Plan {
        placements,
        placed,
        unplaced: request.replicas - placed,
        diversified,
        satisfied: diversified && placed == request.replicas,
        moved: current.min(placed) - kept,
        cost_per_hour: (cost * 1e4).round() / 1e4,
        explanation: words.lines,
        rules: words.rules,
        unplaced_reason: words.unplaced,
        score: problem.score(&x, true),
    }
}
