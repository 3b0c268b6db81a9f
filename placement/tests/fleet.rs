//! The fleet re-plans only the deployments a pool change can affect.

use outrigger_placement::{Fleet, Level, Pool, Request, SpreadRule, solve};

fn pool(name: &str, provider: &str, region: &str, gpu: &str) -> Pool {
    Pool {
        name: name.to_string(),
        provider: provider.to_string(),
        region: region.to_string(),
        zone: Some(format!("{region}a")),
        gpu_type: gpu.to_string(),
        gpus_per_node: 8,
        capacity_type: "on-demand".to_string(),
        price_per_node_hour: 98.32,
        max_nodes: 2,
        scalable: true,
        growth_blocked: false,
        healthy: true,
        nodes: Vec::new(),
    }
}

fn request(gpu: &str) -> Request {
    Request {
        replicas: 4,
        gpus_per_replica: 4,
        gpu_types: vec![gpu.to_string()],
        spread: vec![SpreadRule {
            by: Level::Provider,
            min_groups: 2,
            max_share: 60,
        }],
        ..Request::default()
    }
}

#[test]
fn a_capacity_change_replans_only_the_deployments_the_pool_is_eligible_for() {
    let pools = vec![
        pool("aws-h100", "aws", "us-east-1", "H100"),
        pool("aws-a100", "aws", "us-east-1", "A100-80GB"),
        pool("azure-h100", "azure", "eastus", "H100"),
        pool("azure-a100", "azure", "eastus", "A100-80GB"),
    ];
    let deployments = [("h100", request("H100")), ("a100", request("A100-80GB"))];
    let mut fleet = Fleet::default();
    for (key, request) in &deployments {
        assert!(fleet.plan(key, request, &pools).solved);
    }

    let mut changed = pools.clone();
    changed[0].max_nodes = 1;
    assert_eq!(fleet.affected(&pools[0], &changed[0]), vec!["h100"]);
    for (key, request) in &deployments {
        let planned = fleet.plan(key, request, &changed);
        assert_eq!(planned.solved, *key == "h100", "{key}");
        assert_eq!(*planned.plan, solve(request, &changed), "{key}");
    }
}

#[test]
fn an_eligibility_change_may_affect_every_deployment() {
    let pools = vec![
        pool("aws-h100", "aws", "us-east-1", "H100"),
        pool("azure-h100", "azure", "eastus", "H100"),
    ];
    let mut fleet = Fleet::default();
    fleet.plan(&"a100", &request("A100-80GB"), &pools);
    fleet.plan(&"h100", &request("H100"), &pools);
    let mut changed = pools[1].clone();
    changed.gpu_type = "A100-80GB".to_string();
    assert_eq!(fleet.affected(&pools[1], &changed), vec!["a100", "h100"]);
}

#[test]
fn a_forgotten_deployment_is_no_longer_affected() {
    let pools = vec![pool("aws-h100", "aws", "us-east-1", "H100")];
    let mut fleet = Fleet::default();
    fleet.plan(&"h100", &request("H100"), &pools);
    fleet.forget(&"h100");
    assert!(fleet.affected(&pools[0], &pools[0]).is_empty());
}

#[test]
fn a_fleet_without_explanations_keeps_the_typed_words() {
    let mut pools = vec![pool("aws-h100", "aws", "us-east-1", "H100")];
    pools[0].max_nodes = 1;
    let request = request("H100");
    let mut fleet = Fleet::without_explanations();
    let planned = fleet.plan(&"h100", &request, &pools);
    let full = solve(&request, &pools);
    assert!(planned.plan.explanation.is_empty());
    assert!(!full.explanation.is_empty());
    assert_eq!(planned.plan.rules, full.rules);
    assert_eq!(planned.plan.unplaced_reason, full.unplaced_reason);
    assert!(
        full.unplaced_reason.is_some(),
        "one node holds 2 of the 4 replicas"
    );
    assert_eq!(planned.plan.placements, full.placements);
    assert_eq!(fleet.interested("aws-h100"), vec!["h100"]);
}
