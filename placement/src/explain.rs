//! Words for a plan: why each pool got its count, and for each spread rule whether
//! it holds and, if not, what blocks it and what would fix it.

use crate::model::{Level, Pool, Request, SpreadRule, Strategy};
use crate::problem::Problem;

/// Why a pool has no room, from its inputs.
fn capacity_reason(pool: &Pool, gpus: u32) -> String {
    let nodes = pool.existing_nodes();
    let free = pool.free_slots(gpus);
    if !pool.scalable {
        return format!(
            "no free slot for {gpus} GPUs on its {nodes} nodes and no scaling block to add more"
        );
    }
    if pool.growth_blocked {
        return format!(
            "no free slot for {gpus} GPUs on its {nodes} nodes and growth is paused by a cloud capacity error"
        );
    }
    if free == 0 && nodes >= pool.max_nodes {
        return format!("it is at nodes.max={} with no free slot", pool.max_nodes);
    }
    format!("it has room for {} replicas", pool.capacity(gpus))
}

fn plural(n: u32, one: &str) -> String {
    if n == 1 {
        format!("{n} {one}")
    } else {
        format!("{n} {one}s")
    }
}

/// A plan's words: every line, and apart the ones a status condition repeats.
pub(crate) struct Explanation {
    pub lines: Vec<String>,
    /// One line per spread rule, and the DoNotSchedule line when it applies.
    pub rules: Vec<String>,
    /// Why replicas are unplaced, when some are.
    pub unplaced: Option<String>,
}

pub(crate) fn explain(
    problem: &Problem,
    request: &Request,
    pools: &[Pool],
    attempt: &[u32],
    x: &[u32],
) -> Explanation {
    let g = request.gpus_per_replica;
    let r = request.replicas;
    let placed: u32 = x.iter().sum();
    let mut lines = Vec::new();
    if r == 0 {
        lines.push("replicas is 0: nothing to place".to_string());
    }
    let mut rules = Vec::new();
    if problem.dns && placed == 0 && attempt.iter().any(|&n| n > 0) {
        rules.push(
            "whenUnsatisfiable is DoNotSchedule and the spread rules cannot all hold, so nothing is placed"
                .to_string(),
        );
    }
    for rule in &request.spread {
        rules.push(rule_line(problem, pools, rule, r, attempt, g));
    }
    lines.extend(rules.iter().cloned());

    let held: Vec<Vec<u32>> = Level::ALL.iter().map(|&l| problem.held(l, x)).collect();
    for (facts, &n) in problem.pools.iter().zip(x) {
        let pool = &pools[facts.input];
        let line = match &facts.eligible {
            Err(why) => format!("{}: 0, not eligible: {why}", pool.name),
            Ok(()) if facts.capacity == 0 => {
                format!(
                    "{}: 0, no capacity: {}",
                    pool.name,
                    capacity_reason(pool, g)
                )
            }
            Ok(()) => {
                let capped = Level::ALL.iter().find_map(|&level| {
                    let rules = problem.level(level);
                    let cap = rules.tightest_cap()?;
                    let group = facts.group[level.index()];
                    let held = held[level.index()][group];
                    (held >= cap && n < facts.capacity).then(|| {
                        format!(
                            "held by the maxShare cap of the spread rule by {}: {} holds {held}, the cap is {cap}",
                            level.as_str(),
                            rules.names[group]
                        )
                    })
                });
                let keeps = if facts.current > 0 {
                    format!(", keeps {} of its current replicas", facts.current.min(n))
                } else {
                    String::new()
                };
                let why = if n == facts.capacity {
                    format!("full: capacity is {}", plural(facts.capacity, "replica"))
                } else if let Some(capped) = capped {
                    capped
                } else if n > 0 {
                    match request.strategy {
                        Strategy::Cost => format!(
                            "takes the rest at {:.2} USD/h per replica after cheaper or preferred pools",
                            pool.replica_cost(g)
                        ),
                        Strategy::Balanced => "its share of a balanced spread".to_string(),
                    }
                } else if placed >= r {
                    match request.strategy {
                        Strategy::Cost => format!(
                            "not needed: cheaper or preferred pools hold every replica ({:.2} USD/h per replica here)",
                            pool.replica_cost(g)
                        ),
                        Strategy::Balanced => {
                            "not needed: the other pools already balance every replica".to_string()
                        }
                    }
                } else {
                    "the spread rules keep it empty".to_string()
                };
                format!("{}: {n}, {why}{keeps}", pool.name)
            }
        };
        lines.push(line);
    }
    let unplaced = (placed < r).then(|| {
        let capacity = problem
            .pools
            .iter()
            .fold(0u32, |sum, p| sum.saturating_add(p.capacity));
        format!(
            "{} of {r} unplaced: eligible pools have room for {}{}",
            r - placed,
            plural(capacity.min(r), "replica"),
            blocked_pools(problem, pools, g),
        )
    });
    lines.extend(unplaced.iter().cloned());
    Explanation {
        lines,
        rules,
        unplaced,
    }
}

/// How many pools the unplaced line names before it points at `outrigger plan`.
const BLOCKED_SHOWN: usize = 4;

/// Why the pools that could take no replica took none, for the unplaced line: the
/// same words as each pool's own line, so a condition says what `outrigger plan` says.
fn blocked_pools(problem: &Problem, pools: &[Pool], g: u32) -> String {
    if pools.is_empty() {
        return "; there is no GpuNodePool (kubectl get gnp)".to_string();
    }
    let blocked: Vec<String> = problem
        .pools
        .iter()
        .filter_map(|p| {
            let pool = &pools[p.input];
            match &p.eligible {
                Err(why) => Some(format!("{} is not eligible: {why}", pool.name)),
                Ok(()) if p.capacity == 0 => Some(format!(
                    "{} has no room: {}",
                    pool.name,
                    capacity_reason(pool, g)
                )),
                Ok(()) => None,
            }
        })
        .collect();
    if blocked.is_empty() {
        return String::new();
    }
    let more = blocked.len().saturating_sub(BLOCKED_SHOWN);
    let mut text = format!(
        "; {}",
        blocked[..blocked.len().min(BLOCKED_SHOWN)].join("; ")
    );
    if more > 0 {
        text.push_str(&format!(
            "; and {more} more (outrigger plan lists every pool)"
        ));
    }
    text
}

fn rule_line(
    problem: &Problem,
    pools: &[Pool],
    rule: &SpreadRule,
    r: u32,
    x: &[u32],
    g: u32,
) -> String {
    let level = rule.by;
    let rules = problem.level(level);
    let held = problem.held(level, x);
    let cap = rule.cap(r);
    let min = rule.min_groups.max(1);
    let head = format!(
        "spread by {} (minGroups {min}, maxShare {}% = at most {} per {}): ",
        level.as_str(),
        rule.max_share.clamp(1, 100),
        plural(cap, "replica"),
        level.as_str(),
    );
    let shares: Vec<String> = held
        .iter()
        .enumerate()
        .filter(|(_, h)| **h > 0)
        .map(|(i, h)| format!("{}={h}", rules.names[i]))
        .collect();
    let shares = if shares.is_empty() {
        "nothing placed".to_string()
    } else {
        shares.join(" ")
    };
    let mut problems = Vec::new();
    for (i, &h) in held.iter().enumerate() {
        if h > cap {
            problems.push(format!(
                "{} holds {h}, over the cap of {cap}: the other {}s have no more room",
                rules.names[i],
                level.as_str()
            ));
        }
    }
    let used = held.iter().filter(|&&h| h > 0).count() as u32;
    if r > 0 && used < min {
        let mut blocked = Vec::new();
        for (i, name) in rules
            .names
            .iter()
            .enumerate()
            .filter(|(i, _)| held[*i] == 0)
        {
            let reasons: Vec<String> = problem
                .pools
                .iter()
                .filter(|p| p.group[level.index()] == i)
                .map(|p| {
                    let pool = &pools[p.input];
                    match &p.eligible {
                        Err(why) => format!("pool {} is not eligible ({why})", pool.name),
                        Ok(()) if p.capacity == 0 => {
                            format!("pool {}: {}", pool.name, capacity_reason(pool, g))
                        }
                        Ok(()) => format!("pool {} is kept empty by the other rules", pool.name),
                    }
                })
                .collect();
            blocked.push(format!("{name}: {}", reasons.join("; ")));
        }
        let others = if blocked.is_empty() {
            format!("no other {} has a pool", level.as_str())
        } else {
            blocked.join(", ")
        };
        let more = if r < min {
            format!("; replicas={r} is fewer than minGroups")
        } else {
            String::new()
        };
        problems.push(format!(
            "needs {} with a replica, has {used}: {others}{more}. To fix: add capacity in another {} (a pool or a higher nodes.max), widen the allow-lists, or lower minGroups",
            plural(min, level.as_str()),
            level.as_str(),
        ));
    }
    if problems.is_empty() {
        format!("{head}{shares}: met")
    } else {
        format!("{head}{shares}: NOT met: {}", problems.join("; "))
    }
}
