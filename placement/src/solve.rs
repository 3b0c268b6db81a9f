//! Builds the flow network for a problem and finds the optimal plan.
//!
//! The network is the group tree: source -> root -> provider -> region -> zone ->
//! pool -> sink. A group's `maxShare` caps sit on the arcs into it (as extra cost
//! per replica above a cap for ScheduleAnyway, as a hard bound for DoNotSchedule).
//! `minGroups` is a reward on the first replica of a group, paid through a hub whose
//! arcs count the used groups, so the reward stops at `minGroups`. The provider
//! level's hub sits above the tree; one more level's hub sits below the pools, on
//! the sink side. Any further level with `minGroups` > 1 is settled by branch and
//! bound over which of its groups hold a replica, with the flow as the bound.
//! Balance (strategy `balanced`) is a hard bound on every group of a level, level
//! after level: the least bound under which the flow still scores as well on
//! everything balance comes after.
//!
//! Why the balance is exact: a bound only removes plans, so "the best plan under
//! bound L scores as well" is monotone in L and the least such L is the best largest
//! group. No plan that places P replicas can have a largest group below the least L
//! for which capacity, summed up the group tree and cut at every bound (and at the
//! hard caps of DoNotSchedule), still holds P; that closed form is computed first,
//! for each level under the ones above. A flow under these bounds that scores as
//! well as the unbounded one proves each of them least at once, and is the plan.
//! Where it does not (current replicas, spread rewards or soft caps pull the other
//! way), each level is searched from its bound up, exponentially then by halving,
//! each step a flow; the search only skips bounds no plan can meet.

use crate::flow::{Cost, Graph, ZERO};
use crate::model::Level;
use crate::problem::{COST, FORCE, KEPT, NAME, PREFERENCE, Problem};

/// Extra bounds for one solve.
#[derive(Clone, Default)]
struct Bounds {
    /// A hard cap on every group of a level.
    limit: [Option<u32>; 4],
    /// Groups (level, group) that must hold a replica.
    forced: Vec<(usize, usize)>,
    /// Groups (level, group) that must hold none.
    forbidden: Vec<(usize, usize)>,
}

/// Where each level's `minGroups` is handled.
struct Hubs {
    source: bool,
    sink: Option<Level>,
    branched: Vec<Level>,
}

impl Hubs {
    fn choose(problem: &Problem) -> Hubs {
        let needs = |l: Level| problem.level(l).max_min() > 1;
        let mut below: Vec<Level> = [Level::Zone, Level::Region, Level::Pool]
            .into_iter()
            .filter(|&l| needs(l))
            .collect();
        let sink = (!below.is_empty()).then(|| below.remove(0));
        Hubs {
            source: needs(Level::Provider),
            sink,
            branched: below,
        }
    }
}

fn cost_at(position: usize, value: i64) -> Cost {
    let mut cost = ZERO;
    cost[position] = value;
    cost
}

/// Adds arcs `from -> to` that pay the `minGroups` reward of the 1st, 2nd, ... unit.
fn reward_arcs(graph: &mut Graph, problem: &Problem, level: Level, from: usize, to: usize) {
    let rules = problem.level(level);
    let missing = problem.positions().2;
    let mut j = 1;
    while j <= rules.max_min() {
        let reward = rules.reward(j);
        let mut run = 1;
        while j + run <= rules.max_min() && rules.reward(j + run) == reward {
            run += 1;
        }
        graph.arc(from, to, i64::from(run), cost_at(missing, -reward));
        j += run;
    }
}

/// Replicas per pool for the cheapest flow under `bounds`.
fn flow_plan(problem: &Problem, hubs: &Hubs, bounds: &Bounds) -> Vec<u32> {
    let r = i64::from(problem.replicas);
    let (placed, excess, _) = problem.positions();
    let usable: Vec<bool> = problem
        .pools
        .iter()
        .map(|p| p.eligible.is_ok() && p.capacity > 0)
        .collect();
    let mut graph = Graph::default();
    let s = graph.node();
    let root = graph.node();
    let source_hub = hubs.source.then(|| graph.node());

    // A level has nodes of its own only when something bounds or rewards its groups;
    // otherwise its groups pass their parent's node on, which keeps the graph small.
    let needed: [bool; 4] = std::array::from_fn(|l| {
        !problem.levels[l].caps.is_empty()
            || (l == 0 && hubs.source)
            || bounds.limit[l].is_some()
            || bounds
                .forced
                .iter()
                .chain(&bounds.forbidden)
                .any(|&(at, _)| at == l)
    });
    // Each group's node; `own` lists the groups with nodes (level, group, parent,
    // entry, capped, node).
    let mut out: [Vec<Option<usize>>; 4] = Default::default();
    let mut own = Vec::new();
    for level in Level::ALL {
        let l = level.index();
        out[l] = vec![None; problem.level(level).names.len()];
        for (pool, _) in problem.pools.iter().zip(&usable).filter(|(_, u)| **u) {
            let g = pool.group[l];
            if out[l][g].is_some() {
                continue;
            }
            let parent = match l {
                0 => root,
                _ => out[l - 1][pool.group[l - 1]].expect("a parent group has a node"),
            };
            if needed[l] {
                let (entry, capped, node) = (graph.node(), graph.node(), graph.node());
                own.push((l, g, parent, entry, capped, node));
                out[l][g] = Some(node);
            } else {
                out[l][g] = Some(parent);
            }
        }
    }
    let sink_groups: Vec<Option<usize>> = match hubs.sink {
        Some(level) => out[level.index()]
            .iter()
            .map(|node| node.map(|_| graph.node()))
            .collect(),
        None => Vec::new(),
    };
    let sink_hub = hubs.sink.map(|_| graph.node());
    let t = graph.node();

    graph.arc(s, root, r, ZERO);
    if let Some(hub) = source_hub {
        reward_arcs(&mut graph, problem, Level::Provider, root, hub);
    }
    for (l, g, parent, entry, capped, node) in own {
        let rules = &problem.levels[l];
        graph.arc(parent, entry, r, ZERO);
        // The caps count every replica of the group, the reward's first one too.
        if problem.dns {
            let cap = rules.tightest_cap().map_or(r, i64::from);
            graph.arc(entry, capped, cap, ZERO);
        } else {
            let mut below = 0;
            for (i, &u) in rules.caps.iter().enumerate() {
                graph.arc(
                    entry,
                    capped,
                    i64::from(u) - below,
                    cost_at(excess, i as i64),
                );
                below = i64::from(u);
            }
            graph.arc(
                entry,
                capped,
                r - below,
                cost_at(excess, rules.caps.len() as i64),
            );
        }
        if let (Some(hub), 0) = (source_hub, l) {
            graph.arc(hub, entry, 1, ZERO);
        }
        let hard = if bounds.forbidden.contains(&(l, g)) {
            0
        } else {
            bounds.limit[l].map_or(r, |c| i64::from(c).min(r))
        };
        if bounds.forced.contains(&(l, g)) {
            graph.arc(capped, node, hard.min(1), cost_at(FORCE, -1));
            graph.arc(capped, node, hard - 1, ZERO);
        } else {
            graph.arc(capped, node, hard, ZERO);
        }
    }

    let mut pool_arcs: Vec<Vec<usize>> = vec![Vec::new(); problem.pools.len()];
    for (p, pool) in problem.pools.iter().enumerate().filter(|(p, _)| usable[*p]) {
        let from = out[Level::Pool.index()][pool.group[Level::Pool.index()]]
            .expect("a usable pool has a node");
        let to = match hubs.sink {
            Some(level) => sink_groups[pool.group[level.index()]].expect("sink group exists"),
            None => t,
        };
        let mut unit = cost_at(placed, -1);
        unit[COST] = pool.cost;
        unit[PREFERENCE] = pool.preference;
        unit[NAME] = pool.rank;
        let keep = pool.current.min(pool.capacity);
        let mut kept = unit;
        kept[KEPT] = -1;
        pool_arcs[p].extend(graph.arc(from, to, i64::from(keep), kept));
        pool_arcs[p].extend(graph.arc(from, to, i64::from(pool.capacity - keep), unit));
    }
    if let (Some(level), Some(hub)) = (hubs.sink, sink_hub) {
        for group in sink_groups.iter().flatten() {
            graph.arc(*group, t, r, ZERO);
            graph.arc(*group, hub, 1, ZERO);
        }
        reward_arcs(&mut graph, problem, level, hub, t);
    }

    graph.min_cost_flow(s, t, r);
    pool_arcs
        .iter()
        .map(|arcs| arcs.iter().map(|&a| graph.flow(a) as u32).sum())
        .collect()
}

/// Groups of `level` that have a usable pool.
fn usable_groups(problem: &Problem, level: Level) -> Vec<bool> {
    let mut usable = vec![false; problem.level(level).names.len()];
    for p in problem
        .pools
        .iter()
        .filter(|p| p.eligible.is_ok() && p.capacity > 0)
    {
        usable[p.group[level.index()]] = true;
    }
    usable
}

/// The best plan under `limit`, ignoring balance: the flow, with branch and bound
/// over the groups of levels whose `minGroups` the network cannot count.
fn best_plan(problem: &Problem, hubs: &Hubs, limit: [Option<u32>; 4]) -> Vec<u32> {
    let missing_at = if problem.dns { 0 } else { 2 };
    let usable: Vec<(Level, Vec<bool>)> = hubs
        .branched
        .iter()
        .map(|&l| (l, usable_groups(problem, l)))
        .collect();
    let mut best: Option<(Vec<i64>, Vec<u32>)> = None;
    let mut open = vec![Bounds {
        limit,
        ..Bounds::default()
    }];
    while let Some(bounds) = open.pop() {
        let x = flow_plan(problem, hubs, &bounds);
        let held: Vec<Vec<u32>> = Level::ALL.iter().map(|&l| problem.held(l, &x)).collect();
        if bounds.forced.iter().any(|&(l, g)| held[l][g] == 0) {
            continue;
        }
        let score = problem.score(&x, false);
        // No plan in this branch misses fewer groups than its allowed groups force.
        let mut floor = 0;
        let mut branched_missing = 0;
        for (level, groups) in &usable {
            let allowed = groups
                .iter()
                .enumerate()
                .filter(|&(g, &u)| u && !bounds.forbidden.contains(&(level.index(), g)))
                .count() as u32;
            floor += if problem.replicas == 0 {
                0
            } else {
                problem.level(*level).missing(allowed)
            };
            branched_missing += problem.missing_at(*level, &x);
        }
        let mut bound = score.clone();
        bound[missing_at] += floor - branched_missing;
        if best.as_ref().is_some_and(|(b, _)| bound >= *b) {
            continue;
        }
        if best.as_ref().is_none_or(|(b, _)| score < *b) {
            best = Some((score, x.clone()));
        }
        if branched_missing == floor {
            continue;
        }
        let undecided = usable.iter().find_map(|(level, groups)| {
            let l = level.index();
            if problem.missing_at(*level, &x) == 0 {
                return None;
            }
            (0..groups.len())
                .find(|&g| {
                    groups[g]
                        && held[l][g] == 0
                        && !bounds.forced.contains(&(l, g))
                        && !bounds.forbidden.contains(&(l, g))
                })
                .map(|g| (l, g))
        });
        if let Some(group) = undecided {
            let mut without = bounds.clone();
            without.forbidden.push(group);
            let mut with = bounds;
            with.forced.push(group);
            open.push(without);
            open.push(with);
        }
    }
    best.map(|(_, x)| x)
        .unwrap_or_else(|| vec![0; problem.pools.len()])
}

/// The most replicas any plan places when no group of a level holds more than
/// that level's limit: pool capacities summed up the group tree, each group's sum
/// cut at its level's limit and, for DoNotSchedule, at its tightest `maxShare` cap
/// (the flow's hard bounds). Spread rewards, soft caps and current replicas only
/// ever lower what a plan places, so this is an upper bound for every plan.
fn most_placeable(problem: &Problem, limit: &[Option<u32>; 4]) -> u64 {
    let cut = |l: usize, sum: u64| -> u64 {
        let hard = problem
            .dns
            .then(|| problem.levels[l].tightest_cap())
            .flatten();
        [limit[l], hard]
            .into_iter()
            .flatten()
            .fold(sum, |s, c| s.min(u64::from(c)))
    };
    let mut sums: [Vec<u64>; 4] = std::array::from_fn(|l| vec![0; problem.levels[l].names.len()]);
    // Each group's parent group (unused at the provider level).
    let mut parent: [Vec<usize>; 4] =
        std::array::from_fn(|l| vec![0; problem.levels[l].names.len()]);
    for pool in problem
        .pools
        .iter()
        .filter(|p| p.eligible.is_ok() && p.capacity > 0)
    {
        sums[3][pool.group[3]] += u64::from(pool.capacity);
        for l in 1..4 {
            parent[l][pool.group[l]] = pool.group[l - 1];
        }
    }
    for l in (1..4).rev() {
        for g in 0..sums[l].len() {
            let held = cut(l, sums[l][g]);
            sums[l - 1][parent[l][g]] += held;
        }
    }
    sums[0].iter().map(|&s| cut(0, s)).sum()
}

/// The smallest limit on every group of `level` that still lets `placed` replicas
/// be placed under the limits above it ([`most_placeable`]): no plan that places
/// them has a smaller largest group there.
fn lowest_limit(problem: &Problem, mut limit: [Option<u32>; 4], level: Level, placed: u32) -> u32 {
    let (mut lo, mut hi) = (0, placed);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        limit[level.index()] = Some(mid);
        if most_placeable(problem, &limit) >= u64::from(placed) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    hi
}

/// The levels `balanced` evens out, in order.
const BALANCED: [Level; 3] = [Level::Provider, Level::Region, Level::Zone];

/// The balanced plan, given `x`, the best plan ignoring balance.
///
/// The best largest group of a level is the least limit under which the best plan
/// still scores `x`'s placed, excess, missing and kept, the limits above fixed at
/// their best: a larger limit only relaxes the flow, so the test is monotone. Each
/// search starts at [`lowest_limit`], a bound no plan with `x`'s count can beat.
/// Where capacity alone decides the balance, as it does when no rule or current
/// replica gets in the way, the bounds are the answer; one flow under all three
/// bounds shows that, and each bound is then the least limit (it cannot be lower,
/// and a plan meets it). Otherwise each level is searched from its bound up,
/// doubling the step until the test holds, then halving.
fn balance(problem: &Problem, hubs: &Hubs, mut x: Vec<u32>) -> Vec<u32> {
    // Placed, excess, missing and kept come before balance.
    let target = problem.score(&x, false)[..4].to_vec();
    let reaches = |plan: &[u32]| problem.score(plan, false)[..4] == target[..];
    let placed: u32 = x.iter().sum();
    let largest = |plan: &[u32], level: Level| problem.held(level, plan).into_iter().max();

    let mut bounds = [None; 4];
    for level in BALANCED {
        bounds[level.index()] = Some(lowest_limit(problem, bounds, level, placed));
    }
    if BALANCED
        .iter()
        .all(|&l| largest(&x, l).unwrap_or(0) <= bounds[l.index()].unwrap_or(0))
    {
        return x;
    }
    let candidate = best_plan(problem, hubs, bounds);
    if reaches(&candidate) {
        return candidate;
    }

    let mut limit = [None; 4];
    for level in BALANCED {
        let l = level.index();
        let mut lo = lowest_limit(problem, limit, level, placed);
        let mut hi = largest(&x, level).unwrap_or(0);
        let mut step: u32 = 1;
        let mut galloping = true;
        while lo < hi {
            let mid = if galloping {
                lo.saturating_add(step - 1).min(hi - 1)
            } else {
                lo + (hi - lo) / 2
            };
            limit[l] = Some(mid);
            let candidate = best_plan(problem, hubs, limit);
            if reaches(&candidate) {
                hi = mid;
                x = candidate;
                galloping = false;
            } else {
                lo = mid + 1;
                step = step.saturating_mul(2);
            }
        }
        limit[l] = Some(hi);
    }
    x
}

/// The optimal plan: replicas per pool, in the problem's (name) order.
pub(crate) fn optimal(problem: &Problem) -> Vec<u32> {
    let hubs = Hubs::choose(problem);
    let x = best_plan(problem, &hubs, [None; 4]);
    if problem.balanced {
        balance(problem, &hubs, x)
    } else {
        x
    }
}
