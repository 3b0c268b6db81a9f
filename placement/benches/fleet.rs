//! A fleet-wide re-plan: 1 000 ModelDeployments of 10 replicas, each with two spread
//! rules (by provider: minGroups 2, maxShare 60; by zone: minGroups 3), over 1 000
//! pools; one pool's capacity changes. Figures go in docs/benchmarks.md.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use outrigger_placement::{Fleet, Level, Pool, Request, SpreadRule, solve};

const POOLS: usize = 1_000;
const DEPLOYMENTS: usize = 1_000;
const REGIONS_PER_PROVIDER: usize = 4;

/// Pools over two providers, four regions each, three zones a region, of H100 or
/// A100 nodes, each with room for 8 replicas of 4 GPUs.
fn pools() -> Vec<Pool> {
    (0..POOLS)
        .map(|i| {
            let provider = if i % 2 == 0 { "aws" } else { "azure" };
            let region = format!("{provider}-region-{}", (i / 2) % REGIONS_PER_PROVIDER);
            Pool {
                name: format!("pool-{i:05}"),
                provider: provider.to_string(),
                // Every region and GPU type gets pools in each of its zones.
                zone: Some(format!("{region}-{}", (i / 24) % 3)),
                region,
                gpu_type: if i % 3 == 0 { "A100-80GB" } else { "H100" }.to_string(),
                gpus_per_node: 8,
                capacity_type: "on-demand".to_string(),
                price_per_node_hour: 30.0 + ((i * 7919) % 97) as f64,
                max_nodes: 4,
                scalable: true,
                growth_blocked: false,
                healthy: true,
                nodes: Vec::new(),
            }
        })
        .collect()
}

/// Deployment `d` asks for one GPU type and one region of each provider, so each
/// pool is eligible for an eighth of the fleet.
fn request(d: usize) -> Request {
    let k = d % REGIONS_PER_PROVIDER;
    Request {
        replicas: 10,
        gpus_per_replica: 4,
        gpu_types: vec![
            if (d / REGIONS_PER_PROVIDER).is_multiple_of(2) {
                "A100-80GB"
            } else {
                "H100"
            }
            .into(),
        ],
        regions: vec![format!("aws-region-{k}"), format!("azure-region-{k}")],
        spread: vec![
            SpreadRule {
                by: Level::Provider,
                min_groups: 2,
                max_share: 60,
            },
            SpreadRule {
                by: Level::Zone,
                min_groups: 3,
                max_share: 100,
            },
        ],
        ..Request::default()
    }
}

fn bench(c: &mut Criterion) {
    let mut pools = pools();
    let requests: Vec<Request> = (0..DEPLOYMENTS).map(request).collect();
    let mut fleet = Fleet::default();
    for (d, request) in requests.iter().enumerate() {
        assert!(fleet.plan(&d, request, &pools).plan.satisfied);
    }
    // Pool 0 loses a node, then gets it back: every iteration is a change.
    let flip = |pools: &mut Vec<Pool>| {
        let before = pools[0].clone();
        pools[0].max_nodes = if before.max_nodes == 4 { 3 } else { 4 };
        (before, pools[0].clone())
    };
    let (before, after) = flip(&mut pools);
    let affected = fleet.affected(&before, &after);
    assert_eq!(affected.len(), DEPLOYMENTS / 8);
    let solved = (0..DEPLOYMENTS)
        .filter(|d| fleet.plan(d, &requests[*d], &pools).solved)
        .count();
    assert_eq!(
        solved,
        affected.len(),
        "only the affected deployments are solved"
    );

    let mut group = c.benchmark_group("fleet");
    group.sample_size(10);
    group.bench_function("replan affected (index)", |b| {
        b.iter(|| {
            let (before, after) = flip(&mut pools);
            for d in fleet.affected(&before, &after) {
                black_box(fleet.plan(&d, &requests[d], &pools));
            }
        })
    });
    group.bench_function("replan every deployment (digest skips)", |b| {
        b.iter(|| {
            flip(&mut pools);
            for (d, request) in requests.iter().enumerate() {
                black_box(fleet.plan(&d, request, &pools));
            }
        })
    });
    group.bench_function("solve every deployment (no fleet)", |b| {
        b.iter(|| {
            flip(&mut pools);
            for request in &requests {
                black_box(solve(request, &pools));
            }
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
