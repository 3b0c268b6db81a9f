//! Solver speed at growing sizes, with two spread rules: by provider (minGroups 2,
//! maxShare 60) and by zone (minGroups 3). Figures go in docs/benchmarks.md.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use outrigger_placement::{Level, Pool, Request, SpreadRule, Strategy, solve};

/// `pools` pools over two providers, four regions each, three zones a region, with
/// room for twice `replicas` replicas of 4 GPUs in all and prices that differ.
fn fleet(pools: usize, replicas: u32) -> (Request, Vec<Pool>) {
    let per_pool = (2 * replicas).div_ceil(pools as u32);
    let fleet = (0..pools)
        .map(|i| {
            let provider = if i % 2 == 0 { "aws" } else { "azure" };
            let region = format!("{provider}-region-{}", (i / 2) % 4);
            Pool {
                name: format!("pool-{i:05}"),
                provider: provider.to_string(),
                zone: Some(format!("{region}-{}", (i / 8) % 3)),
                region,
                gpu_type: if i % 3 == 0 { "A100-80GB" } else { "H100" }.to_string(),
                gpus_per_node: 8,
                capacity_type: "on-demand".to_string(),
                // A spread of prices so the cheapest pools are a real choice.
                price_per_node_hour: 30.0 + ((i * 7919) % 97) as f64,
                max_nodes: per_pool.div_ceil(2),
                scalable: true,
                growth_blocked: false,
                healthy: true,
                nodes: Vec::new(),
            }
        })
        .collect();
    let request = Request {
        replicas,
        gpus_per_replica: 4,
        gpu_types: vec!["H100".into(), "A100-80GB".into()],
        strategy: Strategy::Cost,
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
    };
    (request, fleet)
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("solve");
    group.sample_size(10);
    for (pools, replicas) in [(10, 100), (100, 1_000), (1_000, 10_000)] {
        let (request, fleet) = fleet(pools, replicas);
        let plan = solve(&request, &fleet);
        assert!(plan.satisfied, "the bench fleet has room for every replica");
        group.bench_with_input(
            BenchmarkId::new("cost", format!("{pools}x{replicas}")),
            &(request, fleet),
            |b, (request, fleet)| b.iter(|| solve(black_box(request), black_box(fleet))),
        );
    }
    for (pools, replicas) in [(10, 100), (100, 1_000), (1_000, 10_000)] {
        let (mut request, fleet) = fleet(pools, replicas);
        request.strategy = Strategy::Balanced;
        group.bench_with_input(
            BenchmarkId::new("balanced", format!("{pools}x{replicas}")),
            &(request, fleet),
            |b, (request, fleet)| b.iter(|| solve(black_box(request), black_box(fleet))),
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
