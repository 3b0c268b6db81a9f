//! The ModelDeployment decisions from fixtures: what a first pass writes, that a
//! converged pass writes nothing, make-before-break, and failover.

use std::sync::Arc;
use std::time::Duration;

use outrigger_crds::GpuNodePool;
use serde_json::json;

use super::*;
use crate::inputs;
use crate::observe::inventory::{Child, NodeFacts, Readiness};

fn at(t: &str) -> Timestamp {
    t.parse().unwrap()
}

const NOW: &str = "2026-01-01T00:10:00Z";

fn md() -> ModelDeployment {
    serde_saphyr::from_str(
        r#"
apiVersion: outrigger.dev/v1alpha1
kind: ModelDeployment
metadata: {name: llm, namespace: ns, uid: u-md, generation: 1}
spec:
  replicas: 4
  gpu: {count: 8}
  placement:
    spread:
    - {by: provider, minGroups: 2, maxShare: 60}
  service: {port: 8000}
  template:
    spec:
      containers: [{name: server, image: vllm}]
"#,
    )
    .unwrap()
}

fn pool(name: &str, provider: &str) -> Arc<GpuNodePool> {
    Arc::new(
        serde_json::from_value(json!({
            "apiVersion": "outrigger.dev/v1alpha1", "kind": "GpuNodePool",
            "metadata": {"name": name},
            "spec": {"provider": provider, "region": "r1", "instanceType": "gpu8",
                     "gpu": {"type": "H100", "count": 8}, "nodes": {"min": 0, "max": 4}}
        }))
        .unwrap(),
    )
}

fn ready_node(name: &str, pool: usize) -> NodeFacts {
    NodeFacts {
        name: name.into(),
        pool: Some(pool),
        readiness: Readiness::Ready,
        allocatable: 8,
        used: Vec::new(),
        provider_id: None,
        cordoned: false,
        interruption: None,
    }
}

fn key() -> Key {
    ("ns".into(), "llm".into())
}

/// One pass over `inventory`, as the controller makes it.
fn pass(
    md: &ModelDeployment,
    inventory: &Inventory,
    existing: &Existing,
    failing_over: Option<Timestamp>,
    now: Timestamp,
) -> Decision {
    let key = key();
    let view = inventory.view(&key, Duration::from_secs(5), Duration::from_secs(60), now);
    let mut request = inputs::request(md);
    request.current = inventory.current(&key);
    let plan = outrigger_placement::solve(&request, &view.pools);
    decide(
        md,
        &Facts {
            key: &key,
            cluster: None,
            inventory,
            view: &view,
            plan: &plan,
            pools: &inventory.pool_refs(),
            current: &request.current,
            ready: &inventory.ready(&key),
            in_sync: None,
            existing,
            failing_over,
            now,
        },
    )
}

fn replicas_of(writes: &[Write]) -> BTreeMap<String, i32> {
    writes
        .iter()
        .filter_map(|w| match w {
            Write::Deployment(d) => Some((
                d.metadata
                    .labels
                    .as_ref()?
                    .get(crate::labels::POOL)?
                    .clone(),
                d.spec.replicas?,
            )),
            _ => None,
        })
        .collect()
}

/// The children a decision's writes make, as the caches would then hold them,
/// with `ready` of each Deployment's replicas Ready.
fn applied(decision: &Decision, ready: bool) -> (Vec<Child>, Existing) {
    let mut children = Vec::new();
    let mut existing = Existing::default();
    for w in decision.grow.iter().chain(&decision.then) {
        match w {
            Write::Deployment(d) => {
                let pool = d.metadata.labels.as_ref().unwrap()[crate::labels::POOL].clone();
                let replicas = u32::try_from(d.spec.replicas.unwrap()).unwrap();
                let hash = applied_hash(&d.metadata).map(str::to_string);
                existing.deployments.push((
                    pool.clone(),
                    d.metadata.name.clone().unwrap(),
                    hash.clone(),
                ));
                children.push(Child {
                    owner: key(),
                    pool,
                    name: d.metadata.name.clone().unwrap(),
                    replicas,
                    ready: if ready { replicas } else { 0 },
                    gpus: 8,
                    scheduled: replicas,
                    applied_hash: hash,
                });
            }
            Write::Service(s) => {
                existing.service = Some(applied_hash(&s.metadata).map(str::to_string))
            }
            Write::Budget(b) => {
                existing.budget = Some(applied_hash(&b.metadata).map(str::to_string))
            }
            Write::DeleteDeployment(_) | Write::DeleteService(_) => {}
        }
    }
    (children, existing)
}

/// Counts for pools `a` and `b`.
fn ab(a: u32, b: u32) -> BTreeMap<String, u32> {
    BTreeMap::from([("a".to_string(), a), ("b".to_string(), b)])
}

/// A plan of `a` replicas on pool a (aws) and `b` on pool b (azure), every rule met.
fn plan_ab(a: u32, b: u32) -> placement::Plan {
    placement::Plan {
        placements: [("a", "aws", a), ("b", "azure", b)]
            .into_iter()
            .filter(|(_, _, n)| *n > 0)
            .map(|(pool, provider, replicas)| placement::Placement {
                pool: pool.into(),
                provider: provider.into(),
                region: "r".into(),
                zone: None,
                replicas,
            })
            .collect(),
        placed: a + b,
        unplaced: 0,
        diversified: true,
        satisfied: true,
        moved: 0,
        cost_per_hour: 0.0,
        explanation: Vec::new(),
        rules: Vec::new(),
        unplaced_reason: None,
        score: Vec::new(),
    }
}

fn two_pools() -> Vec<Arc<GpuNodePool>> {
    vec![pool("aws-a", "aws"), pool("azure-a", "azure")]
}

fn nodes() -> Vec<NodeFacts> {
    (0..4)
        .map(|i| ready_node(&format!("a{i}"), 0))
        .chain((0..4).map(|i| ready_node(&format!("z{i}"), 1)))
        .collect()
}

#[test]
fn the_first_pass_writes_every_child_growth_first_and_the_status() {
    let md = md();
    let inventory = Inventory::from_facts(two_pools(), nodes(), Vec::new());
    let d = pass(&md, &inventory, &Existing::default(), None, at(NOW));
    assert_eq!(
        replicas_of(&d.grow),
        BTreeMap::from([("aws-a".to_string(), 2), ("azure-a".to_string(), 2)]),
        "both pools grow from nothing, under the 60% cap"
    );
    assert!(
        matches!(
            d.grow[..],
            [
                Write::Deployment(_),
                Write::Deployment(_),
                Write::Service(_),
                Write::Budget(_)
            ]
        ),
        "growth first, with the Service and budget: {:?}",
        d.grow
    );
    assert!(d.then.is_empty(), "nothing shrinks: {:?}", d.then);
    let status = d.status.as_ref().expect("a first status");
    assert_eq!(status.replicas, Some(4));
    assert_eq!(status.ready_replicas, Some(0));
    assert_eq!(d.notes[0].reason, "Placed");
    assert_eq!(d.failover, Failover::Unchanged);
}

#[test]
fn a_converged_pass_writes_nothing() {
    let mut md = md();
    let first = Inventory::from_facts(two_pools(), nodes(), Vec::new());
    let d1 = pass(&md, &first, &Existing::default(), None, at(NOW));
    let (children, existing) = applied(&d1, true);
    let inventory = Inventory::from_facts(two_pools(), nodes(), children);
    // The second pass sees its children Ready and writes the status once more.
    let d2 = pass(&md, &inventory, &existing, None, at(NOW));
    assert!(d2.grow.is_empty() && d2.then.is_empty(), "{d2:?}");
    md.status = d2.status.clone();
    assert_eq!(md.status.as_ref().unwrap().ready_replicas, Some(4));
    let later = at("2026-01-01T00:11:00Z");
    let d3 = pass(&md, &inventory, &existing, None, later);
    assert_eq!(d3.writes(), 0, "{d3:?}");
    assert!(d3.notes.is_empty());
}

#[test]
fn a_lost_pool_fails_over_growth_first_and_the_clock_ends_when_all_are_ready() {
    let mut md = md();
    // Three pools; the replicas run on aws-a and azure-a.
    let pools = vec![
        pool("aws-a", "aws"),
        pool("aws-b", "aws"),
        pool("azure-a", "azure"),
    ];
    let mut facts: Vec<NodeFacts> = (0..2)
        .map(|i| ready_node(&format!("a{i}"), 0))
        .chain((0..2).map(|i| ready_node(&format!("b{i}"), 1)))
        .chain((0..2).map(|i| ready_node(&format!("z{i}"), 2)))
        .collect();
    let first = Inventory::from_facts(pools.clone(), facts.clone(), Vec::new());
    let d1 = pass(&md, &first, &Existing::default(), None, at(NOW));
    let (mut children, existing) = applied(&d1, true);
    let lost_pool = children[0].pool.clone();
    let lost_index = pools
        .iter()
        .position(|p| p.metadata.name.as_deref() == Some(lost_pool.as_str()))
        .unwrap();
    // Every node of that pool lost a minute ago, its replicas on those nodes.
    let since = at("2026-01-01T00:09:00Z");
    for n in facts.iter_mut().filter(|n| n.pool == Some(lost_index)) {
        n.readiness = Readiness::Lost(since);
        n.used = vec![(Some(key()), 8)];
    }
    md.status = d1.status.clone();
    let inventory = Inventory::from_facts(pools.clone(), facts.clone(), children.clone());
    let d2 = pass(&md, &inventory, &existing, None, at(NOW));
    assert_eq!(d2.failover, Failover::Started(since));
    assert_eq!(d2.notes[0].reason, "FailingOver");
    let grown = replicas_of(&d2.grow);
    assert!(!grown.contains_key(&lost_pool), "{grown:?}");
    assert!(
        d2.then
            .iter()
            .any(|w| matches!(w, Write::DeleteDeployment(n) if n.ends_with(&lost_pool))),
        "the lost pool gives its replicas up at once: {:?}",
        d2.then
    );
    // The replacements Ready: the failover ends with its duration.
    let (grown_children, existing) = applied(&d2, true);
    children.retain(|c| c.pool != lost_pool);
    for c in grown_children {
        children.retain(|old| old.pool != c.pool);
        children.push(c);
    }
    let kept: Vec<Child> = children;
    let inventory = Inventory::from_facts(pools, facts, kept);
    let d3 = pass(&md, &inventory, &existing, Some(since), at(NOW));
    assert_eq!(d3.failover, Failover::Ended(60.0));
    assert!(d3.notes.iter().any(|n| n.reason == "FailedOver"));
}

#[test]
fn a_healthy_pool_keeps_its_replicas_until_the_moved_ones_are_ready() {
    let plan = plan_ab(1, 3);
    let none = BTreeMap::new();
    let current = ab(3, 1);
    let health = BTreeMap::from([
        ("a".to_string(), Health::Healthy),
        ("b".to_string(), Health::Healthy),
    ]);
    let not_ready = ab(3, 1);
    assert_eq!(
        targets(&plan, &current, &not_ready, &health, &none).0,
        ab(3, 3),
        "b grows; a keeps its 3 while b's new replicas are not Ready"
    );
    // b's child already asks for 3 (written by the last pass, or by a peer), and
    // only 1 is Ready: a still keeps its 3.
    let grown = ab(3, 3);
    assert_eq!(
        targets(&plan, &grown, &not_ready, &health, &none).0,
        ab(3, 3),
        "a grown child that is not Ready yet does not let a shrink"
    );
    // One of b's new replicas Ready: a gives up one.
    let one_more = ab(3, 2);
    assert_eq!(
        targets(&plan, &grown, &one_more, &health, &none).0,
        ab(2, 3)
    );
    let ready = ab(3, 3);
    assert_eq!(targets(&plan, &grown, &ready, &health, &none).0, ab(1, 3));
    // b back from an outage and reporting its 3 Ready: not trusted until the
    // rebalance window ends, so a keeps its 3.
    let b_back = BTreeMap::from([
        ("a".to_string(), Health::Healthy),
        (
            "b".to_string(),
            Health::Recovering {
                until: at("2026-01-01T00:10:20Z"),
            },
        ),
    ]);
    assert_eq!(
        targets(&plan, &grown, &ready, &b_back, &none).0,
        ab(3, 3),
        "a pool back from an outage does not let others shrink"
    );
    // a keeps only Ready replicas: ones still starting there help nobody.
    let a_starting = ab(1, 1);
    assert_eq!(
        targets(&plan, &grown, &a_starting, &health, &none).0,
        ab(1, 3)
    );
}

#[test]
fn a_doomed_replica_stays_until_its_replacement_is_ready() {
    let health = BTreeMap::from([
        ("a".to_string(), Health::Healthy),
        ("b".to_string(), Health::Healthy),
    ]);
    let one_doomed_in_a = BTreeMap::from([("a".to_string(), 1)]);
    // a ran 2, one of them on a doomed node; the plan moves it to b.
    let plan = plan_ab(1, 2);
    let a_released = |n: u32| BTreeMap::from([("a".to_string(), n)]);
    assert_eq!(
        targets(&plan, &ab(2, 1), &ab(2, 1), &health, &one_doomed_in_a),
        (ab(2, 2), a_released(0)),
        "the doomed replica stays while b's new one is not Ready"
    );
    assert_eq!(
        targets(&plan, &ab(2, 2), &ab(2, 2), &health, &one_doomed_in_a),
        (ab(1, 2), a_released(1)),
        "b's replacement is Ready: a lets the doomed one go"
    );
    // The plan keeps a's count (another node of a has room): a surges by one.
    let plan = plan_ab(2, 1);
    assert_eq!(
        targets(&plan, &ab(2, 1), &ab(2, 1), &health, &one_doomed_in_a).0,
        ab(3, 1),
        "the replacement in the same pool comes first"
    );
    assert_eq!(
        targets(&plan, &ab(3, 1), &ab(3, 1), &health, &one_doomed_in_a).0,
        ab(2, 1)
    );
}
