//! Property tests: every plan obeys capacity, eligibility and the rules it can, and
//! its score equals the best one exhaustive search finds on small inputs.

use std::collections::BTreeMap;

use outrigger_placement::{
    Fleet, Level, Node, Pool, Request, SpreadRule, Strategy as Objective, WhenUnsatisfiable,
    capacities, score, solve,
};
use proptest::prelude::*;
use proptest::sample::select;

fn pool_strategy() -> impl Strategy<Value = Pool> {
    (
        (
            select(vec!["aws", "azure", "gcp"]),
            0..2usize,
            prop::option::of(select(vec!["a", "b"])),
            select(vec!["H100", "A100-80GB"]),
            select(vec![1u32, 2, 4, 8]),
            select(vec!["on-demand", "on-demand", "spot"]),
        ),
        (
            0u32..120,
            0u32..4,
            any::<bool>(),
            prop::bool::weighted(0.2),
            prop::bool::weighted(0.9),
            prop::collection::vec((prop::bool::weighted(0.8), 0u32..9), 0..3),
        ),
    )
        .prop_map(
            |(
                (provider, region, zone, gpu, per_node, cap_type),
                (price, max, scalable, blocked, healthy, nodes),
            )| {
                Pool {
                    name: String::new(),
                    provider: provider.to_string(),
                    region: format!("{provider}-r{region}"),
                    zone: zone.map(str::to_string),
                    gpu_type: gpu.to_string(),
                    gpus_per_node: per_node,
                    capacity_type: cap_type.to_string(),
                    price_per_node_hour: f64::from(price) * 0.75,
                    max_nodes: max,
                    scalable,
                    growth_blocked: blocked,
                    healthy,
                    nodes: nodes
                        .into_iter()
                        .map(|(ready, free)| Node {
                            ready,
                            free_gpus: free.min(per_node),
                        })
                        .collect(),
                }
            },
        )
}

fn rule_strategy() -> impl Strategy<Value = SpreadRule> {
    (
        select(Level::ALL.to_vec()),
        1u32..5,
        select(vec![1u32, 25, 34, 50, 60, 75, 100]),
    )
        .prop_map(|(by, min_groups, max_share)| SpreadRule {
            by,
            min_groups,
            max_share,
        })
}

fn case() -> impl Strategy<Value = (Request, Vec<Pool>)> {
    (
        prop::collection::vec(pool_strategy(), 0..=6),
        (0u32..=8, select(vec![1u32, 1, 2, 4, 0])),
        prop::collection::vec(rule_strategy(), 0..=3),
        (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()),
        prop::collection::vec(0u32..4, 6),
        Just(()).prop_perturb(|_, mut rng| {
            let mut order: Vec<usize> = (0..6).collect();
            for i in (1..6).rev() {
                order.swap(i, rng.random_range(0..=i));
            }
            order
        }),
    )
        .prop_map(
            |(
                mut pools,
                (replicas, gpus),
                spread,
                (balanced, dns, spot, a100_only),
                current,
                order,
            )| {
                for (i, pool) in pools.iter_mut().enumerate() {
                    pool.name = format!("pool-{}", order[i]);
                }
                let current: BTreeMap<String, u32> = pools
                    .iter()
                    .zip(&current)
                    .filter(|(_, n)| **n > 0)
                    .map(|(p, n)| (p.name.clone(), *n))
                    .collect();
                let request = Request {
                    replicas,
                    gpus_per_replica: gpus,
                    gpu_types: if a100_only {
                        vec!["A100-80GB".into()]
                    } else {
                        vec!["H100".into(), "A100-80GB".into()]
                    },
                    providers: Vec::new(),
                    regions: Vec::new(),
                    capacity_types: if spot {
                        vec!["on-demand".into(), "spot".into()]
                    } else {
                        Vec::new()
                    },
                    strategy: if balanced {
                        Objective::Balanced
                    } else {
                        Objective::Cost
                    },
                    spread,
                    when_unsatisfiable: if dns {
                        WhenUnsatisfiable::DoNotSchedule
                    } else {
                        WhenUnsatisfiable::ScheduleAnyway
                    },
                    current,
                };
                (request, pools)
            },
        )
}

/// Every plan within capacity with at most `replicas` placed.
fn each_plan(caps: &[u32], budget: u32, x: &mut Vec<u32>, visit: &mut dyn FnMut(&[u32])) {
    if x.len() == caps.len() {
        visit(x);
        return;
    }
    for n in 0..=caps[x.len()].min(budget) {
        x.push(n);
        each_plan(caps, budget - n, x, visit);
        x.pop();
    }
}

struct Exhaustive {
    best: Vec<i64>,
    /// Some plan keeps every rule with every replica placed.
    all_placed_diversified: bool,
    /// Some non-empty plan keeps every rule.
    some_diversified: bool,
}

fn exhaustive(request: &Request, pools: &[Pool]) -> Exhaustive {
    let caps = capacities(request, pools);
    let dns = request.when_unsatisfiable == WhenUnsatisfiable::DoNotSchedule;
    let zero = vec![0; pools.len()];
    let mut out = Exhaustive {
        best: score(request, pools, &zero),
        all_placed_diversified: false,
        some_diversified: false,
    };
    let mut best_dns: Option<Vec<i64>> = None;
    each_plan(&caps, request.replicas, &mut Vec::new(), &mut |x| {
        let s = score(request, pools, x);
        let placed: u32 = x.iter().sum();
        // DoNotSchedule scores start [missing, -placed, excess]; ScheduleAnyway [-placed, excess, missing].
        let (missing, excess) = if dns { (s[0], s[2]) } else { (s[2], s[1]) };
        let keeps_rules = missing == 0 && excess == 0;
        if keeps_rules && placed > 0 {
            out.some_diversified = true;
        }
        if keeps_rules && placed == request.replicas {
            out.all_placed_diversified = true;
        }
        if dns {
            if keeps_rules && best_dns.as_ref().is_none_or(|b| s < *b) {
                best_dns = Some(s);
            }
        } else if s < out.best {
            out.best = s;
        }
    });
    if let Some(best) = best_dns {
        out.best = best;
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn plans_are_feasible_and_optimal((request, pools) in case()) {
        let plan = solve(&request, &pools);
        let caps = capacities(&request, &pools);
        let x: Vec<u32> = pools.iter().map(|p| plan.replicas_on(&p.name)).collect();
        for (i, pool) in pools.iter().enumerate() {
            prop_assert!(x[i] <= caps[i], "{} holds {} over capacity {}", pool.name, x[i], caps[i]);
        }
        prop_assert!(plan.placed <= request.replicas);
        prop_assert_eq!(plan.placed, x.iter().sum::<u32>());
        prop_assert_eq!(plan.placed + plan.unplaced, request.replicas);
        let reference = exhaustive(&request, &pools);
        prop_assert_eq!(&plan.score, &reference.best, "plan {:?}", plan.placements);
        if reference.all_placed_diversified {
            prop_assert!(plan.satisfied, "a plan keeps every rule, this one does not: {:?}", plan);
        }
        if reference.some_diversified && request.when_unsatisfiable == WhenUnsatisfiable::DoNotSchedule {
            prop_assert!(plan.diversified && plan.placed > 0);
        }
    }

    #[test]
    fn same_input_same_plan((request, pools) in case()) {
        let first = solve(&request, &pools);
        let mut reversed = pools.clone();
        reversed.reverse();
        prop_assert_eq!(&first, &solve(&request, &reversed));
        prop_assert_eq!(&first, &solve(&request, &pools));
    }
}

/// A change of one pool's capacity, price, nodes or health.
fn pool_change() -> impl Strategy<Value = (prop::sample::Index, Pool)> {
    (any::<prop::sample::Index>(), pool_strategy())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// The fleet returns what `solve` would, and skips the solve of a deployment the
    /// changed pool is not eligible for.
    #[test]
    fn fleet_plans_equal_fresh_solves((request, pools) in case(), (which, other) in pool_change()) {
        let mut fleet = Fleet::default();
        let key = "default/md";
        let first = fleet.plan(&key, &request, &pools);
        prop_assert!(first.solved);
        prop_assert_eq!(&*first.plan, &solve(&request, &pools));
        prop_assert!(!fleet.plan(&key, &request, &pools).solved, "unchanged input, no solve");
        if pools.is_empty() {
            return Ok(());
        }

        let i = which.index(pools.len());
        let mut changed = pools.clone();
        changed[i].price_per_node_hour = other.price_per_node_hour;
        changed[i].max_nodes = other.max_nodes;
        changed[i].scalable = other.scalable;
        changed[i].growth_blocked = other.growth_blocked;
        changed[i].nodes = other.nodes.clone();
        changed[i].healthy = other.healthy;
        let affected = fleet.affected(&pools[i], &changed[i]);
        let again = fleet.plan(&key, &request, &changed);
        prop_assert_eq!(&*again.plan, &solve(&request, &changed));
        if !affected.contains(&key) {
            prop_assert!(!again.solved, "{} is not eligible, yet the plan was solved again", changed[i].name);
        }
    }
}

fn extreme_pool() -> impl Strategy<Value = Pool> {
    (
        any::<u32>(),
        any::<u32>(),
        prop::collection::vec((any::<bool>(), any::<u32>()), 0..4),
        select(vec![f64::NAN, f64::INFINITY, -5.0, 0.0, 1e300, 98.32]),
        (any::<bool>(), any::<bool>(), any::<bool>()),
        "[a-c]{0,2}",
    )
        .prop_map(
            |(per_node, max, nodes, price, (scalable, blocked, healthy), zone)| Pool {
                name: format!("p{zone}{per_node}"),
                provider: zone.clone(),
                region: zone.clone(),
                zone: Some(zone),
                gpu_type: "H100".into(),
                gpus_per_node: per_node,
                capacity_type: "on-demand".into(),
                price_per_node_hour: price,
                max_nodes: max,
                scalable,
                growth_blocked: blocked,
                healthy,
                nodes: nodes
                    .into_iter()
                    .map(|(ready, free_gpus)| Node { ready, free_gpus })
                    .collect(),
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn extreme_inputs_never_panic(
        pools in prop::collection::vec(extreme_pool(), 0..8),
        replicas in any::<u32>(),
        gpus in any::<u32>(),
        rules in prop::collection::vec((select(Level::ALL.to_vec()), any::<u32>(), any::<u32>()), 0..3),
        balanced in any::<bool>(),
        dns in any::<bool>(),
    ) {
        let request = Request {
            replicas,
            gpus_per_replica: gpus,
            strategy: if balanced { Objective::Balanced } else { Objective::Cost },
            when_unsatisfiable: if dns { WhenUnsatisfiable::DoNotSchedule } else { WhenUnsatisfiable::ScheduleAnyway },
            spread: rules
                .into_iter()
                .map(|(by, min, share)| SpreadRule { by, min_groups: min % 64, max_share: share })
                .collect(),
            ..Request::default()
        };
        let plan = solve(&request, &pools);
        prop_assert!(plan.placed <= replicas);
        prop_assert!(plan.cost_per_hour.is_finite());
    }
}
