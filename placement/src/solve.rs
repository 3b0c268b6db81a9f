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
//! Balance (strategy `balanced`) is a hard bound on every group of a level, found by
//! binary search, level after level.

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

/// The optimal plan: replicas per pool, in the problem's (name) order.
pub(crate) fn optimal(problem: &Problem) -> Vec<u32> {
    let hubs = Hubs::choose(problem);
    let mut limit = [None; 4];
    let mut x = best_plan(problem, &hubs, limit);
    if problem.balanced {
        // Placed, excess, missing and kept come before balance.
        let target = problem.score(&x, false)[..4].to_vec();
        for level in [Level::Provider, Level::Region, Level::Zone] {
            let mut lo = 0;
            let mut hi = problem.held(level, &x).into_iter().max().unwrap_or(0);
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                limit[level.index()] = Some(mid);
                let candidate = best_plan(problem, &hubs, limit);
                if problem.score(&candidate, false)[..4] == target[..] {
                    hi = mid;
                    x = candidate;
                } else {
                    lo = mid + 1;
                }
            }
            limit[level.index()] = Some(hi);
        }
    }
    x
}
